#!/usr/bin/env python
"""Does the CPU flash-attention kernel care how Q/K/V and the output gradient are laid out? (issue 20)

The kernel is the same for every caller, yet a profile showed its backward slower on our tensors
than on Hugging Face's. Ours are views: Q and K of the rotated ``[b, s, hq+hkv, hd]`` buffer, V of
the fused projection output ``[b, s, hq+2hkv, hd]``, so a row (one token of one head) sits
``(hq+2hkv)*hd`` elements after the previous one; Hugging Face's are one buffer per tensor.

Two tables, every candidate timed in each round in a rotated order (paired), ratios to ``ours``:
- kernel: the aten forward and backward ops alone, on inputs already in the candidate layout;
- path: the whole core as the model runs it, from the fused projection output (a leaf) through
  RoPE, whatever copies the layout needs, SDPA and the output reshape, then backward to the leaf,
  so a layout that is faster in the kernel but costs a copy is charged for it.
Results are filed by machine kind in ``results/attention_layout.json`` (``benchmarks/machine.py``).

usage: python benchmarks/attention_layout.py [--rounds 11] [--dtypes bf16,fp32] [--shapes mha,gqa] [--path-only V,..]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Tuple

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks import machine  # noqa: E402
from megallama.model.rope import RotaryEmbedding, apply_rotary  # noqa: E402

SHAPES = {"mha": dict(b=4, s=512, hq=12, hkv=12, hd=64), "gqa": dict(b=4, s=512, hq=12, hkv=4, hd=64)}
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
FWD = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
BWD = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward


def _bshd(b, s, h, d, dt):
    """``[b, h, s, d]`` stored as ``[b, s, h, d]`` (the kernel's own output and gradient layout)."""
    return torch.randn(b, s, h, d, dtype=dt).transpose(1, 2)


def kernel_inputs(layout: str, b, s, hq, hkv, hd, dt) -> Tuple[torch.Tensor, ...]:
    """q, k, v, grad_out, all logically ``[b, heads, s, hd]``."""
    g = _bshd(b, s, hq, hd, dt)       # Wo's backward hands back [b, s, hq*hd]
    if layout == "ours":              # views of the rotated Q|K buffer and of the fused QKV output
        qk = torch.randn(b, s, hq + hkv, hd, dtype=dt)
        fused = torch.randn(b, s, hq + 2 * hkv, hd, dtype=dt)
        q, k = (t.transpose(1, 2) for t in qk.split([hq, hkv], dim=2))
        return q, k, fused[:, :, hq + hkv:].transpose(1, 2), g
    if layout == "bshd":              # one buffer per tensor (Hugging Face's, after its RoPE)
        return _bshd(b, s, hq, hd, dt), _bshd(b, s, hkv, hd, dt), _bshd(b, s, hkv, hd, dt), g
    if layout == "bhsd":              # contiguous [b, h, s, d] everywhere, grad_out too
        mk = lambda h: torch.randn(b, h, s, hd, dtype=dt)  # noqa: E731
        return mk(hq), mk(hkv), mk(hkv), mk(hq)
    if layout == "bhsd_qk":           # RoPE writing q, k as [b, h, s, d]; v and grad_out as now
        fused = torch.randn(b, s, hq + 2 * hkv, hd, dtype=dt)
        q, k = torch.randn(b, hq, s, hd, dtype=dt), torch.randn(b, hkv, s, hd, dtype=dt)
        return q, k, fused[:, :, hq + hkv:].transpose(1, 2), g
    if layout == "bhsd_qkv":          # inputs contiguous [b, h, s, d], grad_out as Wo gives it
        mk = lambda h: torch.randn(b, h, s, hd, dtype=dt)  # noqa: E731
        return mk(hq), mk(hkv), mk(hkv), g
    raise ValueError(layout)


def kernel_case(layout: str, shape: Dict, dt, expand: bool) -> Tuple[Callable, Callable]:
    """(forward, backward) closures on fixed inputs; ``expand``: K/V repeated to all query heads
    (contiguous copies, as ``repeat_kv``) instead of the kernel's own GQA."""
    q, k, v, g = kernel_inputs(layout, **shape, dt=dt)
    if expand:
        rep = shape["hq"] // shape["hkv"]
        k, v = (t.repeat_interleave(rep, dim=1) for t in (k, v))
    state = {}

    def fwd():
        state["o"], state["lse"] = FWD(q, k, v, 0.0, True)

    def bwd():
        BWD(g, q, k, v, state["o"], state["lse"], 0.0, True)
    fwd()
    return fwd, bwd


def path_case(variant: str, shape: Dict, dt) -> Callable:
    """One forward + backward of the core from the fused projection output, as ``variant`` arranges it."""
    b, s, hq, hkv, hd = (shape[x] for x in ("b", "s", "hq", "hkv", "hd"))
    rope = RotaryEmbedding(hd, s)
    fused = torch.randn(b, s, (hq + 2 * hkv) * hd, dtype=dt, requires_grad=True)
    grad = torch.randn(b, s, hq * hd, dtype=dt)

    def step():
        fused.grad = None
        qkv = fused.view(b, s, hq + 2 * hkv, hd)
        if variant == "hf":  # separate projections: one buffer each, RoPE as HF writes it
            q, k, v = (t.contiguous() for t in qkv.split([hq, hkv, hkv], dim=2))
            q, k = rope(q), rope(k)
        elif variant == "rope_bhsd":  # RoPE writes q, k straight into [b, h, s, d]
            qk, v = qkv.split([hq + hkv, hkv], dim=2)
            cos, sin = rope._tables(dt, fused.device)
            q, k = apply_rotary(qk.transpose(1, 2), cos[:s], sin[:s]).split([hq, hkv], dim=1)
            v = v.transpose(1, 2)
        else:
            qk, v = qkv.split([hq + hkv, hkv], dim=2)
            q, k = rope(qk).split([hq, hkv], dim=2)
        if variant != "rope_bhsd":
            q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if variant in ("v_contig", "qkv_contig"):
            v = v.contiguous()
        if variant == "qkv_contig":
            q, k = q.contiguous(), k.contiguous()
        if variant == "expand_kv" and hkv != hq:
            k, v = (t.repeat_interleave(hq // hkv, dim=1) for t in (k, v))
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=k.size(1) != q.size(1))
        out = out.transpose(1, 2).reshape(b, s, hq * hd)
        out.backward(grad)
        return out.detach(), fused.grad
    return step


def timed_rounds(cases: Dict[str, Callable], rounds: int, warmup: int = 1) -> Dict[str, List[Tuple[float, float]]]:
    """(wall, process CPU) seconds per round and case; CPU time is the steadier figure on a shared box."""
    names = list(cases)
    for _ in range(warmup):
        for fn in cases.values():
            fn()
    times = {n: [] for n in names}
    for r in range(rounds):
        order = names[r % len(names):] + names[:r % len(names)]   # rotate who goes first
        for n in order:
            w0, c0 = time.perf_counter(), time.process_time()
            cases[n]()
            times[n].append((time.perf_counter() - w0, time.process_time() - c0))
    return times


def paired_ratios(times: Dict[str, List[Tuple[float, float]]], base: str) -> Dict[str, Dict[str, float]]:
    """Per candidate: median wall ms, and the median over rounds of (candidate / base) in that
    round, of wall and of CPU time."""
    out = {}
    for n, t in times.items():
        b = times[base]
        out[n] = {"median_ms": 1e3 * statistics.median(w for w, _ in t),
                  "ratio": statistics.median(w / bw for (w, _), (bw, _) in zip(t, b)),
                  "cpu_ratio": statistics.median(c / bc for (_, c), (_, bc) in zip(t, b))}
    return out


def run_kernel(shape_name: str, dt_name: str, rounds: int) -> Dict:
    shape, dt = SHAPES[shape_name], DTYPES[dt_name]
    gqa = shape["hq"] != shape["hkv"]
    layouts = ["ours", "bshd", "bhsd", "bhsd_qkv", "bhsd_qk"]
    cases = {}
    for lay in layouts:
        for expand in ([False, True] if gqa else [False]):
            fwd, bwd = kernel_case(lay, shape, dt, expand)
            name = lay + ("+expanded_kv" if expand else "")
            cases[name + ":fwd"], cases[name + ":bwd"] = fwd, bwd
    times = timed_rounds(cases, rounds)
    out = {}
    for part in ("fwd", "bwd"):
        sub = {n.split(":")[0]: t for n, t in times.items() if n.endswith(":" + part)}
        out[part] = paired_ratios(sub, "ours")
    return out


PATH_VARIANTS = ["ours", "v_contig", "qkv_contig", "rope_bhsd", "hf", "expand_kv"]


def run_path(shape_name: str, dt_name: str, rounds: int, only: List[str] = PATH_VARIANTS) -> Dict:
    shape, dt = SHAPES[shape_name], DTYPES[dt_name]
    variants = [v for v in PATH_VARIANTS if v in only and (v != "expand_kv" or shape["hq"] != shape["hkv"])]
    cases = {}
    for v in variants:  # same seed: every variant must compute ours' output and gradient
        torch.manual_seed(1)
        cases[v] = path_case(v, shape, dt)
    want = cases["ours"]()
    for v, fn in cases.items():
        got, tol = fn(), 1e-2 if dt == torch.bfloat16 else 1e-5
        if not all(((g.float() - w.float()).norm() / w.float().norm()).item() < tol for g, w in zip(got, want)):
            raise SystemExit(f"layout {v} computes something else than ours ({shape_name}/{dt_name})")
    return paired_ratios(timed_rounds(cases, rounds), "ours")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=11)
    ap.add_argument("--dtypes", default="bf16,fp32")
    ap.add_argument("--shapes", default="mha,gqa")
    ap.add_argument("--path-only", default=None, metavar="V1,V2",
                    help=f"time only these core-path variants (ours is always included) and no kernel table: "
                         f"{','.join(PATH_VARIANTS)}")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "attention_layout.json")
    a = ap.parse_args(argv)
    unknown = set((a.path_only or "").split(",")) - set(PATH_VARIANTS) - {""}
    if unknown or not set(a.shapes.split(",")) <= set(SHAPES) or not set(a.dtypes.split(",")) <= set(DTYPES):
        ap.error(f"--path-only takes {','.join(PATH_VARIANTS)}; --shapes {','.join(SHAPES)}; --dtypes {','.join(DTYPES)}")
    torch.manual_seed(0)
    desc = machine.describe("cpu")
    print(machine.banner(desc))
    result = {"machine": desc, "command": " ".join(["python", "benchmarks/attention_layout.py", *sys.argv[1:]]),
              "shapes": SHAPES, "rounds": a.rounds, "kernel": {}, "path": {}}
    for shape_name in a.shapes.split(","):
        for dt_name in a.dtypes.split(","):
            key = f"{shape_name}/{dt_name}"
            only = PATH_VARIANTS if a.path_only is None else ["ours", *a.path_only.split(",")]
            k = result["kernel"][key] = run_kernel(shape_name, dt_name, a.rounds) if a.path_only is None else {}
            p = result["path"][key] = run_path(shape_name, dt_name, a.rounds, only)
            print(f"== {key} {SHAPES[shape_name]}: median ms (median of paired ratios to ours: wall / CPU time)")
            for label, rows in (("kernel fwd", k.get("fwd", {})), ("kernel bwd", k.get("bwd", {})), ("path fwd+bwd", p)):
                if not rows:
                    continue
                print(f"  {label}: " + "  ".join(f"{n} {v['median_ms']:.1f} ({v['ratio']:.3f}/{v['cpu_ratio']:.3f})"
                                              for n, v in rows.items()))
            sys.stdout.flush()
    machine.record(a.out, result, desc["kind"], None if a.path_only is None else "path_only:" + a.path_only)
    print(f"recorded under {desc['kind']} in {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
