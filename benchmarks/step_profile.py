"""By-operator profile of alternated training steps, and the kernel-bound ceiling on a speed-up.

Used by ``peer_step.py --profile``; kept apart so the timing script stays one idea.
"""
from __future__ import annotations

import os
import statistics
import sys
from pathlib import Path

import torch

HF = "hf"


KERNELS = ("aten::mm", "aten::bmm", "aten::addmm", "aten::_scaled_dot_product_flash_attention_for_cpu",
           "aten::_scaled_dot_product_flash_attention_for_cpu_backward")


def _ceiling(med: dict, totals: dict) -> str:
    """Both models run the same GEMMs and the same attention kernels; the speed-up over HF cannot
    exceed HF's step over our kernel time even if everything else took no time at all."""
    kernel = {n: sum(d.get(k, 0.0) for k in KERNELS) for n, d in med.items()}
    out = ["GEMM + attention kernels, ms per step: " + ", ".join(f"{n} {v:.1f}" for n, v in kernel.items()),
           "everything else, ms per step: " + ", ".join(f"{n} {totals[n] - kernel[n]:.1f}" for n in kernel)]
    if HF in kernel:
        for n in kernel:
            if n != HF and kernel[n]:
                out.append(f"ceiling on the speed-up of {n} over hf (everything else free): "
                           f"{totals[HF] / kernel[n]:.3f}x; now {totals[HF] / totals[n]:.3f}x")
    return "\n".join(out)


def profile_table(path: Path, steps: dict, rounds: int, device: torch.device, sync=lambda: None,
                  machine: str = "") -> None:
    """Self CPU time by operator per step (median over ``rounds`` steps, the models profiled in
    turn, so a load spike on the shared machine does not pick a side); then torch's own table for
    the last profiled step of each."""
    from torch.profiler import ProfilerActivity, profile

    per, last = {k: {} for k in steps}, {}
    gpu = device.type == "cuda"  # GPU: kernel time on the device, not the host's launch time
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if gpu else [])
    key = "self_device_time_total" if gpu else "self_cpu_time_total"
    for i in range(rounds):
        for name in list(steps) if i % 2 == 0 else list(steps)[::-1]:
            with profile(activities=acts) as prof:
                steps[name]()
                sync()
            last[name] = prof.key_averages()
            for e in last[name]:
                per[name].setdefault(e.key, [0.0] * rounds)[i] = getattr(e, key) / 1e3
    med = {n: {k: statistics.median(v) for k, v in d.items()} for n, d in per.items()}
    totals = {n: statistics.median(sum(v[i] for v in per[n].values()) for i in range(rounds)) for n in steps}
    names = list(steps)
    keys = sorted(set().union(*med.values()), key=lambda k: -max(med[n].get(k, 0.0) for n in names))
    lines = [f"{'operator: self ' + ('GPU' if gpu else 'CPU') + ' ms per step, median of ' + str(rounds) + ' steps':<64}"
             + "".join(f"{n:>18}" for n in names),
             f"{'TOTAL (median of per-step totals)':<64}" + "".join(f"{totals[n]:18.1f}" for n in names)]
    lines += [f"{k[:63]:<64}" + "".join(f"{med[n].get(k, 0.0):18.1f}" for n in names) for k in keys[:45]]
    lines += ["", _ceiling(med, totals)] if not gpu else []  # kernel names below are the CPU's
    parts = ["\n".join(lines)] + [f"==== {n}: last profiled step, by operator ====\n" + last[n].table(
        sort_by=key, row_limit=30, max_name_column_width=60) for n in names]
    head = [" ".join(sys.argv)] + ([machine] if machine else [])
    header = "\n".join(head + [f"threads {torch.get_num_threads()}, load average {os.getloadavg()}"]) + "\n\n"
    path.write_text(header + "\n\n".join(parts))
    print(f"wrote {path}")
