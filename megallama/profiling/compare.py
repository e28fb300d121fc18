"""The cost models' figures for a measured session's own layout, beside what it measured.

Why a separate module: the profile command and the measurement tests must ask the models the
same question a census answers (this rank's pipeline stage, this DeepSpeed config's buckets,
the activation implementation of this device), or a disagreement says nothing about the models.
"""
from __future__ import annotations

from typing import Any, Dict, Optional

from megallama.profiling import activations as act
from megallama.profiling.arch import ArchSpec
from megallama.profiling.comm import collective_bytes_per_step
from megallama.profiling.layout import Layout
from megallama.profiling.memory import model_state_bytes, stage_activation_bytes
from megallama.train.ds_settings import DeepSpeedSettings

GROUPS = ("tp", "dp", "pp")


def layout_of(cfg: Any, state: Any, ds: Dict[str, Any], gpus_per_node: Optional[int] = None) -> Layout:
    """The :class:`Layout` a run config runs as on ``state``'s groups with DeepSpeed config ``ds``
    (with the blocks per stage the run builds)."""
    settings = DeepSpeedSettings.of(ds)
    return Layout(tp=state.tp, pp=state.pp, dp=state.dp, zero=settings.zero_stage, mbs=cfg.train.micro_batch_size,
                  grad_accum=cfg.train.batch_layout(state.dp).accum, recompute=cfg.train.activation_checkpointing.mode,
                  sp=bool(state.sequence_parallel), offload=settings.offload_optimizer is not None,
                  dtype=settings.precision, gpus_per_node=gpus_per_node or state.world_size,
                  pipeline_layers=tuple(cfg.stage_layers()) if state.pp > 1 else None,
                  ulysses=getattr(state, "ulysses", 1))


def impl_of(cfg: Any, device_type: str) -> act.ActivationImpl:
    """Which implementation's saved tensors to count: this device's norm kernel and attention
    (with ``data.document_mask`` every block's self-attention takes a mask), and DeepSpeed's
    ``partition_activations`` when the run sets it."""
    return act.ActivationImpl.named("megallama", device_type, bool(cfg.data.document_mask),
                                    cfg.train.activation_checkpointing.partition_activations)


def predicted_census(cfg: Any, layout: Layout, stage: int, ds: Dict[str, Any], device_type: str = "cpu"
                     ) -> Dict[str, Any]:
    """What :func:`megallama.profiling.harness.census` should measure on a rank of ``stage``."""
    spec = ArchSpec.from_model_config(cfg.model)
    seq, impl = cfg.train.seq_len, impl_of(cfg, device_type)
    buckets = DeepSpeedSettings.of(ds).buckets
    states = model_state_bytes(spec, layout.tp, layout.pp, layout.zero_dp, layout.zero, layout.dtype, layout.offload,
                               stage, buckets, layout.grad_accum)
    acts = stage_activation_bytes(spec, layout, seq, stage, impl)
    transient = 0.0
    if stage == layout.pp - 1:
        transient = sum(x.bytes for x in act.last_stage_saved_tensors(spec, seq // layout.seq_shards, layout.mbs,
                                                                      layout.tp, layout.sp, layout.dtype_bytes, impl)
                        if not x.saved)
    one = layout.with_(grad_accum=1)    # the saved set of one micro-batch, as at the end of its forward
    one_acts = stage_activation_bytes(spec, one, seq, stage, impl)
    comm = collective_bytes_per_step(spec, layout, seq, stage, impl, scatter_gather="deepspeed",
                                     reuse_distance=buckets.reuse_distance)
    return {"stage": stage,
            "model_states": states,
            "activations": {"forward_end": one_acts["blocks"] + one_acts["embedding"] + one_acts["head_and_loss"]
                            - transient,
                            "peak": acts["blocks"] + acts["embedding"]
                            + max(acts["head_and_loss"] - transient, acts["recompute_working"]),
                            "recompute_working": acts["recompute_working"]},
            "collectives": {g: comm[g] for g in GROUPS}}


def rel_error(measured: float, predicted: float) -> Optional[float]:
    """(predicted - measured) / measured; 0 when both are 0, None when only the measurement is 0."""
    if measured == 0:
        return 0.0 if predicted == 0 else None
    return (predicted - measured) / measured


def side_by_side(measured: Dict[str, Any], predicted: Dict[str, Any]) -> Dict[str, Dict[str, Any]]:
    """``{"what": {"measured", "predicted", "error"}}`` for every figure both sides have."""
    rows: Dict[str, Dict[str, Any]] = {}

    def add(name: str, m: float, p: float) -> None:
        rows[name] = {"measured": m, "predicted": p, "error": rel_error(m, p)}

    for k in ("params", "grads", "optimizer", "step_buffers", "buffers"):
        add(f"model_states.{k}", measured["model_states"].get(k, 0), predicted["model_states"][k])
    for k in ("forward_end", "peak", "recompute_working"):
        if measured["activations"].get(k) is not None:
            add(f"activations.{k}", measured["activations"][k], predicted["activations"][k])
    for g in GROUPS:
        add(f"collectives.{g}.payload_bytes", measured["collectives"].get(g, {}).get("payload_bytes", 0),
            predicted["collectives"][g]["payload_bytes"])
    return rows
