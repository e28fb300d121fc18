"""The JSON ``megallama profile`` prints: measured figures beside the planner's for the same layout.

Why one place: a figure a user compares must mean the same on both sides -- tokens/s of the
whole job, TFLOP/s per GPU of *model* FLOPs (MFU's numerator; HFU adds recomputation), peak
memory per GPU, the share of a step spent inside collectives, the pipeline bubble -- so the
measured and predicted dictionaries carry the same keys.
"""
from __future__ import annotations

import statistics
from dataclasses import replace
from typing import Any, Dict, List, Optional

from megallama.profiling.arch import ArchSpec
from megallama.profiling.flops import flops_per_token, parameter_count
from megallama.profiling.layout import Layout

GROUPS = ("tp", "dp", "pp")


def _hardware(world: int, rates: Optional[Dict[str, float]]):
    """(profile, where its peak came from, notes) for the device this process runs on. On CPU the
    measured profile with the rates measured on this run (``harness._cpu_rates``)."""
    import torch

    from megallama.profiling.detect import detect
    from megallama.profiling.hardware import cpu_profile, load_hardware
    from megallama.profiling.steptime import Efficiency

    if torch.cuda.is_available():
        found = detect()
        if found is None or found.profile is None:   # an unknown GPU: MFU is reported against no peak
            return None, found.reason if found else "no device", []
        return load_hardware(found.profile), found.profile, []
    hw, notes = cpu_profile(), []
    if rates:   # measured on every rank at once, under the run's own sharing of the cores
        hw = replace(hw, peak_flops={k: rates["gemm_flops"] for k in hw.peak_flops},
                     memory_bandwidth=rates["memory_bandwidth"], gpus_per_node=max(hw.gpus_per_node, world))
        notes.append(f"GEMM peak {rates['gemm_flops'] / 1e9:.1f} GFLOP/s and copy bandwidth "
                     f"{rates['memory_bandwidth'] / 1e9:.1f} GB/s per rank, measured on all {world} ranks at once")
    if rates and "bus_bandwidth" in rates:
        hw = replace(hw, intra_node_bandwidth=rates["bus_bandwidth"] / Efficiency().bus,
                     intra_node_latency_s=rates["latency_s"])
        notes.append(f"collective link measured on this run: {rates['bus_bandwidth'] / 1e9:.2f} GB/s bus bandwidth, "
                     f"{rates['latency_s'] * 1e6:.0f} us per ring step")
    return hw, "cpu: GEMM measured on every rank at once" if rates else "cpu: GEMM measured in one process", notes


def _bubble(layout: Layout, records: List[Dict[str, Any]]) -> Dict[str, Any]:
    predicted = (layout.pp - 1) / (layout.grad_accum + layout.pp - 1) if layout.pp > 1 else 0.0
    per_stage: Dict[int, List[float]] = {}
    for r in records:
        if r.get("pipeline_bubble") is not None:
            per_stage.setdefault(r["stage"], []).append(r["pipeline_bubble"])
    if layout.pp == 1:
        return {"value": 0.0, "source": "no pipeline", "predicted": 0.0, "per_stage": {}}
    if not per_stage:
        return {"value": predicted, "source": "predicted", "predicted": predicted, "per_stage": {}}
    stages = {s: statistics.mean(v) for s, v in sorted(per_stage.items())}
    return {"value": statistics.mean(stages.values()), "source": "measured", "predicted": predicted,
            "per_stage": stages,
            "definition": "share of each stage's 1F1B schedule outside its own forward/backward passes "
                          "(waiting on neighbours, sends, receives), averaged over stages; predicted: (pp-1)/(m+pp-1)"}


def _worst_errors(records: List[Dict[str, Any]]) -> Dict[str, Optional[float]]:
    """Per compared figure, the largest |error| over ranks (None: measured 0, predicted not)."""
    worst: Dict[str, Optional[float]] = {}
    for r in records:
        for name, row in (r.get("check") or {}).items():
            err, cur = row["error"], worst.get(name, 0.0)
            if err is None or cur is None:
                worst[name] = None
            elif abs(err) >= abs(cur):
                worst[name] = err
    return worst


def build_report(cfg: Any, s: Any, layout: Layout, records: List[Dict[str, Any]], steps: int,
                 warmup: int, rates: Optional[Dict[str, float]] = None) -> Dict[str, Any]:
    from megallama.profiling.steptime import predict

    spec = ArchSpec.from_model_config(cfg.model)
    seq, world = cfg.train.seq_len, layout.world
    fc = flops_per_token(spec, seq, layout.recompute)
    hw, peak_source, notes = _hardware(world, rates)
    peak = hw.peak(layout.dtype) if hw is not None else float("nan")
    step_time = max(statistics.mean(r["step_times_s"]) for r in records)   # the slowest rank sets the pace
    tokens = float(s.tokens_per_step)
    tps = tokens / step_time
    timed = [r for r in records if r["comm_seconds"] is not None]
    shares = {r["rank"]: r["comm_seconds"] / sum(r["step_times_s"]) for r in timed}
    device_peaks = [r["peak_device_bytes"] for r in records if r["peak_device_bytes"] is not None]
    census0 = records[0].get("census")
    counted = None
    if census0:
        counted = max(r["census"]["model_states"]["total"] - r["census"]["model_states"]["step_buffers"]
                      + max(r["census"]["activations"]["peak"], r["census"]["model_states"]["step_buffers"])
                      for r in records)
    measured = {
        "step_time_s": step_time, "step_time_s_per_step": records[0]["step_times_s"],
        "tokens_per_s": tps, "tokens_per_s_per_gpu": tps / world,
        "tflops_per_gpu": tps * fc.model / world / 1e12, "hardware_tflops_per_gpu": tps * fc.hardware / world / 1e12,
        "mfu": tps * fc.model / world / peak, "hfu": tps * fc.hardware / world / peak,
        "peak_memory_bytes": max(device_peaks) if device_peaks else counted,
        "peak_memory_source": "torch.cuda.max_memory_allocated" if device_peaks else
        "counted: engine model states + saved activations at their peak (no allocator peak on CPU)",
        "peak_rss_bytes": max(r["peak_rss_bytes"] for r in records),
        "comm_share": statistics.mean(shares.values()) if shares else None, "comm_share_per_rank": shares,
        "collectives_per_step": {g: {k: v / steps for k, v in records[0]["collectives"].get(g, {}).items()}
                                 for g in GROUPS if g in records[0]["collectives"]},
    }
    if census0:
        measured.update(model_state_bytes=census0["model_states"], activation_bytes=census0["activations"],
                        census_collectives=census0["collectives"])
    out: Dict[str, Any] = {
        "model": f"llama d{spec.dim} L{spec.n_layers} h{spec.n_heads} V{spec.vocab_size}",
        "parameters": parameter_count(spec),
        "layout": layout.as_dict(), "describe": layout.describe(), "seq": seq, "world_size": world,
        "launcher": s.info.launcher, "device": str(s.device), "tokens_per_step": tokens,
        "warmup_steps": warmup, "steps": steps, "peak_flops_per_gpu": peak, "peak_source": peak_source,
        "flops_per_token": {"model": fc.model, "hardware": fc.hardware}, "hardware_notes": notes,
        "cpu_rates": rates,
    }
    bubble = _bubble(layout, records)
    measured["pipeline_bubble"] = bubble["value"] if bubble["source"] != "predicted" else None
    predicted: Dict[str, Any] = {}
    if hw is not None:
        from megallama.profiling.compare import impl_of
        from megallama.profiling.memory import memory_breakdown
        from megallama.train.ds_settings import DeepSpeedSettings

        impl = impl_of(cfg, s.device.type)
        mem = memory_breakdown(spec, layout, seq, None, impl, DeepSpeedSettings.of(s.ds).buckets)
        p = predict(spec, layout, seq, hw, impl=impl, scatter_gather="deepspeed", memory=mem)
        comm_t = p.time.get("tp_and_pp_comm", 0.0) + p.time.get("dp_comm_exposed", 0.0)
        predicted = {"step_time_s": p.step_time_s, "tokens_per_s": p.tokens_per_s,
                     "tokens_per_s_per_gpu": p.tokens_per_s_per_gpu, "tflops_per_gpu": p.tflops_per_gpu,
                     "hardware_tflops_per_gpu": p.hardware_tflops_per_gpu, "mfu": p.mfu, "hfu": p.hfu,
                     "peak_memory_bytes": p.memory.total, "comm_share": comm_t / p.step_time_s,
                     "pipeline_bubble": bubble["predicted"], "time_breakdown_s": p.time,
                     "memory_breakdown_bytes": dict(p.memory.components)}
    if census0:
        pc = records[0]["predicted_census"]
        predicted.update(model_state_bytes=pc["model_states"], activation_bytes=pc["activations"],
                         census_collectives=pc["collectives"])
        out["model_check_worst_error"] = _worst_errors(records)
    out.update(tokens_per_s=tps, tflops_per_gpu=measured["tflops_per_gpu"], mfu=measured["mfu"],
               hfu=measured["hfu"], peak_memory_bytes=measured["peak_memory_bytes"],
               comm_share=measured["comm_share"], pipeline_bubble=bubble, measured=measured, predicted=predicted)
    return out
