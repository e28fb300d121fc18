"""Analytic cost models: FLOPs/MFU, memory, communication, hardware profiles, the planner.

One idea per module, imported lazily by the CLI (nothing here imports torch except the CPU
measurement in :mod:`hardware`):

* :mod:`arch` -- ``ArchSpec``: LLaMA (our presets) or GPT blocks; ``resolve_model``.
* :mod:`flops` -- ``parameter_count``, ``flops_per_token`` (``.model`` for MFU, ``.hardware`` for HFU).
* :mod:`activations` -- the tensors autograd saves per block; ``activation_bytes_per_layer``.
* :mod:`memory` -- ``model_state_bytes`` (ZeRO 0-3, offload), ``memory_breakdown`` per stage.
* :mod:`comm` -- ``collectives``, ``collective_bytes_per_step``, ring/tree times over NVLink/IB.
* :mod:`hardware` -- ``load_hardware``, ``measure_cpu_gemm_peak``.
* :mod:`efficiency` -- GEMM, attention and collective rates from shapes and the hardware.
* :mod:`steptime` -- ``predict`` one layout; :mod:`planner` -- ``plan`` (enumerate, fit, rank).
* :mod:`published` -- Narayanan et al. 2021 Table 1 and the validation against it;
  :mod:`published_runs` -- MPT and torchtitan runs (A100, H100); :mod:`calibration` -- the fit.

Measured runs (import torch and DeepSpeed; not imported here): :mod:`measure` (saved
activations), :mod:`measure_states` (model states a DeepSpeed engine holds), :mod:`measure_comm`
(wrapped collectives, per TP/DP/PP group), :mod:`harness` (``megallama profile``: the trainer's
parts, one step at a time, under those instruments), :mod:`compare` (the models asked the same
question), :mod:`report` (the JSON, measured beside predicted).
"""
from megallama.profiling.activations import ActivationImpl, activation_bytes_per_layer, layer_saved_tensors
from megallama.profiling.arch import ArchSpec, as_spec, resolve_model
from megallama.profiling.comm import collective_bytes_per_step, collectives
from megallama.profiling.flops import FlopCount, flops_per_token, hfu, mfu, parameter_count
from megallama.profiling.hardware import HardwareProfile, load_hardware, measure_cpu_gemm_peak
from megallama.profiling.layout import Layout
from megallama.profiling.memory import memory_breakdown, model_state_bytes, params_per_rank
from megallama.profiling.planner import plan
from megallama.profiling.steptime import Efficiency, StepPrediction, predict

__all__ = [
    "ActivationImpl", "activation_bytes_per_layer", "layer_saved_tensors", "ArchSpec", "as_spec", "resolve_model",
    "collective_bytes_per_step", "collectives", "FlopCount", "flops_per_token", "hfu", "mfu", "parameter_count",
    "HardwareProfile", "load_hardware", "measure_cpu_gemm_peak", "Layout", "memory_breakdown",
    "model_state_bytes", "params_per_rank", "plan", "Efficiency", "StepPrediction", "predict",
]
