#!/usr/bin/env python
"""One training step of megallama's LlamaForCausalLM against transformers' LlamaForCausalLM.

Both models are built from one config with identical weights (megallama.checkpoint.hf mapping),
run the same batch under bf16 autocast (fp32 master weights) with the same AdamW recipe and
gradient clipping 1.0, and are timed in turn (A B, B A, ...) after warm-up in one process.
HF gets what ``transformers.Trainer`` uses by default on torch >= 2.8: ``AdamW(fused=True)``.
Each round also times a bf16 GEMM (the machine's peak at that moment), so the fraction of peak
is taken round by round, under the same load as the steps. Then our model through the
DeepSpeed engine (ZeRO-1, world size 1) against our plain loop.

usage: python benchmarks/peer_step.py [--dim 768] [--layers 8] [--seq 512] [--mbs 4] [--rounds 6]
       [--compile] [--no-deepspeed] [--no-rss] [--profile benchmarks/results/peer_step_profile_after.txt]
``--compile`` adds a third contender, our model with ``train.compile`` (compiled blocks).
The result names the CPU (model, AMX / AVX-512-BF16) and is filed under its machine kind in
benchmarks/results/peer_step.json, next to the other kinds' (``--out FILE``: this run alone).
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

DEVICE = torch.device("cpu")  # set from --device in main()
AMP = dict(device_type="cpu", dtype=torch.bfloat16)


def use_device(name: str) -> None:
    global DEVICE
    DEVICE = torch.device(name)
    AMP["device_type"] = DEVICE.type


def sync() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()
OURS, COMPILED, HF = "megallama", "megallama+compile", "hf"
RESULTS = ROOT / "benchmarks" / "results" / "peer_step.json"


def model_config(a):
    from megallama.config import ModelConfig

    return ModelConfig(dim=a.dim, n_layers=a.layers, n_heads=a.heads, n_kv_heads=a.kv_heads, vocab_size=a.vocab,
                       multiple_of=256, max_seq_len=a.seq, norm_eps=1e-5)


def train_config(a):
    from megallama.config import TrainConfig

    return TrainConfig(seq_len=a.seq, micro_batch_size=a.mbs, lr=3e-4, warmup_steps=0, steps=1000, seed=1)


def build_ours(a, compiled: bool = False):
    from megallama.model import build_model
    from megallama.model.compile import maybe_compile
    from megallama.train.optim import build_optimizer

    model = maybe_compile(build_model(model_config(a), seed=1).to(DEVICE), compiled)
    return model, build_optimizer(model, train_config(a))


def build_hf(a, ours):
    """transformers' Llama with our weights, and AdamW as HF's Trainer builds it by default."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from megallama.checkpoint.hf import config_to_hf, state_to_hf
    from megallama.train.optim import param_groups

    cfg = model_config(a)
    hf = LlamaForCausalLM(LlamaConfig(**{**config_to_hf(cfg, torch.float32), "attn_implementation": "sdpa"}))
    hf.load_state_dict({k: v.detach().clone() for k, v in state_to_hf(ours.state_dict(), cfg).items()}, strict=True)
    hf.to(DEVICE)
    t = train_config(a)
    opt = torch.optim.AdamW(param_groups(hf.named_parameters(), t.weight_decay), lr=t.lr, betas=(t.beta1, t.beta2),
                            eps=t.eps, fused=True)
    return hf.train(), opt


def forward_loss(model, x, y, hf: bool):
    if hf:  # shift_labels: HF's loss takes y as already-shifted targets, exactly our labels
        return model(input_ids=x, labels=y, shift_labels=y, use_cache=False).loss
    return model(x, labels=y)


def train_step(model, opt, x, y, hf: bool):
    with torch.autocast(**AMP):
        loss = forward_loss(model, x, y, hf)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss.detach()


def batch(a, vocab):
    tok = torch.randint(0, vocab, (a.mbs, a.seq + 1), generator=torch.Generator().manual_seed(0)).to(DEVICE)
    return tok[:, :-1].contiguous(), tok[:, 1:].contiguous()


def gemm_peak(budget_s: float = 1.0, n: int = 0) -> float:
    """Best bf16 FLOP/s of an n x n x n GEMM over about ``budget_s`` (n: 2048 on CPU, 8192 on GPU)."""
    n = n or (8192 if DEVICE.type == "cuda" else 2048)
    a, b = (torch.randn(n, n, device=DEVICE).bfloat16() for _ in range(2))
    torch.mm(a, b)
    sync()
    best, spent = float("inf"), 0.0
    while spent < budget_s:
        t0 = time.perf_counter()
        torch.mm(a, b)
        sync()
        dt = time.perf_counter() - t0
        spent, best = spent + dt, min(best, dt)
    return 2.0 * n ** 3 / best


def alternate(fns: dict, rounds: int, warmup: int, peak_budget_s: float = 0.0) -> dict:
    """Wall and CPU seconds per call of each fn, the order rotated every round, after ``warmup``
    rounds; with ``peak_budget_s`` each timed round also measures the GEMM peak."""
    names, times, cpu, peaks = list(fns), {k: [] for k in fns}, {k: [] for k in fns}, []
    for i in range(warmup + rounds):
        order = names[i % len(names):] + names[:i % len(names)]
        for name in order if (i // len(names)) % 2 == 0 else order[::-1]:
            sync()
            t0, c0 = time.perf_counter(), time.process_time()
            fns[name]()
            sync()
            if i >= warmup:
                times[name].append(time.perf_counter() - t0)
                cpu[name].append(time.process_time() - c0)
        if i >= warmup and peak_budget_s:
            peaks.append(gemm_peak(peak_budget_s))
    out = {k: {"median_s": statistics.median(v), "min_s": min(v), "all_s": v,
               "cpu_median_s": statistics.median(cpu[k]), "cpu_all_s": cpu[k]} for k, v in times.items()}
    return {"steps": out, "peaks": peaks} if peak_budget_s else out


def static_bytes(model, opt) -> int:
    state = [t for s in opt.state.values() for t in s.values() if torch.is_tensor(t)]
    return sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()) + state)


def step_peak_bytes(fn) -> int:
    """Peak of live torch CPU allocations during ``fn`` above what was live when it started: the
    running sum of the profiler's allocation/free events (CPU's max_memory_allocated); on a GPU,
    ``torch.cuda.max_memory_allocated`` above the allocations live at the start."""
    from torch.profiler import ProfilerActivity, profile

    if DEVICE.type == "cuda":
        sync()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        sync()
        return torch.cuda.max_memory_allocated() - base

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    ev = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]")
    cur = peak = 0
    for _, n in ev:
        cur += n
        peak = max(peak, cur)
    return peak


def rss_child(which: str) -> int:
    """Peak RSS (VmHWM, bytes) over 3 steps of a fresh process holding one model (ru_maxrss would
    carry this parent's peak into the child)."""
    code = (f"import sys; sys.argv=['x']+{sys.argv[1:]!r}; sys.path.insert(0, {str(ROOT)!r});"
            f"import benchmarks.peer_step as p; p.rss_main({which!r})")
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True, cwd=ROOT)
    return int(out.stdout.strip().splitlines()[-1])


def rss_main(which: str) -> None:
    """HF's weights come from our model, dropped before the steps; the peak is reset after
    building (``clear_refs`` 5) so it covers the training steps only."""
    import gc

    a = parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    use_device(a.device)
    model, opt = build_ours(a)
    if which == HF:
        model, opt = build_hf(a, model)
    gc.collect()
    x, y = batch(a, a.vocab)
    Path("/proc/self/clear_refs").write_text("5")
    for _ in range(3):
        train_step(model, opt, x, y, which == HF)
    status = Path("/proc/self/status").read_text().splitlines()
    print(int(next(l for l in status if l.startswith("VmHWM")).split()[1]) * 1024)


def deepspeed_vs_plain(a, x, y, stage: int = 1) -> dict:
    from megallama.config import load_run_config
    from megallama.parallel import initialize
    from megallama.train.distributed import init_distributed
    from megallama.train.ds_config import build_ds_config
    from megallama.train.engine import build_engine

    cfg = load_run_config(data={"model": model_config(a).model_dump(), "deepspeed": {"zero_optimization": {"stage": stage}},
                                "train": train_config(a).model_dump(exclude={"activation_checkpointing"})})
    init_distributed()
    engine = build_engine(cfg, initialize(), build_ds_config(cfg, 1), DEVICE).engine
    plain, opt = build_ours(a)

    def ds_step():
        with torch.autocast(**AMP):
            loss = engine(x, labels=y)
        engine.backward(loss)
        engine.step()
        return loss.detach()

    first = {"deepspeed": float(ds_step()), "plain": float(train_step(plain, opt, x, y, False))}
    t = alternate({"deepspeed": ds_step, "plain": lambda: train_step(plain, opt, x, y, False)}, a.rounds, 1)
    return {"first_loss": first, "timing": t,
            "ratio_deepspeed_over_plain": t["deepspeed"]["median_s"] / t["plain"]["median_s"],
            "cpu_ratio_deepspeed_over_plain": t["deepspeed"]["cpu_median_s"] / t["plain"]["cpu_median_s"]}


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                    help="cpu or cuda (default: cuda when available)")
    ap.add_argument("--dim", type=int, default=768)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--heads", type=int, default=12)
    ap.add_argument("--kv-heads", type=int, default=None)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--mbs", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=6, help="timed rounds after warm-up")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--compile", action="store_true", help="also time our model with train.compile")
    ap.add_argument("--no-deepspeed", action="store_true")
    ap.add_argument("--no-rss", action="store_true", help="skip the peak-RSS subprocesses")
    ap.add_argument("--profile", type=Path, default=None, help="write a by-operator profile table here and stop")
    ap.add_argument("--out", type=Path, default=None,
                    help=f"write this run's result alone here (default: filed by machine kind in {RESULTS.name})")
    return ap.parse_args(argv)


def _command() -> str:
    script = Path(sys.argv[0]).resolve()
    return "python " + " ".join([script.relative_to(ROOT).as_posix() if script.is_relative_to(ROOT) else sys.argv[0]]
                                + sys.argv[1:])


def main() -> int:
    from megallama.profiling.flops import flops_per_token

    from benchmarks.machine import banner, describe, record

    a = parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    use_device(a.device)
    torch.manual_seed(0)
    machine = describe(DEVICE.type)
    print(banner(machine), flush=True)
    load0 = os.getloadavg()
    ours, opt = build_ours(a)
    hf, hf_opt = build_hf(a, ours)
    x, y = batch(a, a.vocab)
    with torch.no_grad():  # fp32 forward: same function, tight tolerance
        l32 = float(forward_loss(ours, x, y, False)), float(forward_loss(hf, x, y, True))
    assert abs(l32[0] - l32[1]) < 1e-4 * abs(l32[1]), f"fp32 losses differ: {l32}"
    contenders = {OURS: (ours, opt, False), HF: (hf, hf_opt, True)}
    if a.compile:
        contenders[COMPILED] = build_ours(a, compiled=True) + (False,)
    first = {k: float(train_step(m, o, x, y, h)) for k, (m, o, h) in contenders.items()}
    for k, v in first.items():
        assert abs(v - first[HF]) < 2e-2 * abs(first[HF]), f"bf16 first-step losses differ: {first}"
    steps = {k: (lambda m=m, o=o, h=h: train_step(m, o, x, y, h)) for k, (m, o, h) in contenders.items()}
    if a.profile:
        from benchmarks.step_profile import profile_table

        profile_table(a.profile, steps, a.rounds, DEVICE, sync, machine=banner(machine))
        return 0
    run = alternate(steps, a.rounds, a.warmup, peak_budget_s=0.5)
    t, peaks = run["steps"], run["peaks"]
    mem = {k: step_peak_bytes(fn) for k, fn in steps.items()}
    static = {k: static_bytes(m, o) for k, (m, o, _) in contenders.items()}
    load1, tokens = os.getloadavg(), a.mbs * a.seq
    fl = flops_per_token(model_config(a), a.seq).model
    tps = {k: tokens / v["median_s"] for k, v in t.items()}
    frac = {k: statistics.median(tokens * fl / s / p for s, p in zip(v["all_s"], peaks)) for k, v in t.items()}
    ours_keys = [k for k in t if k != HF]
    speedup = {k: {"ratio_of_medians": t[HF]["median_s"] / t[k]["median_s"],
                   "median_of_paired_rounds": statistics.median(h / s for h, s in zip(t[HF]["all_s"], t[k]["all_s"])),
                   "ratio_of_minima": t[HF]["min_s"] / t[k]["min_s"],
                   "cpu_time_ratio": t[HF]["cpu_median_s"] / t[k]["cpu_median_s"]} for k in ours_keys}
    res = {
        "command": _command(),
        "machine": {**machine, "loadavg_start": load0, "loadavg_end": load1},
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(a).items()},
        "loss_fp32": l32, "first_step_loss_bf16": first, "tokens_per_step": tokens, "model_flops_per_token": fl,
        "timing": t, "tokens_per_s": tps, "speedup_vs_hf": speedup,
        "gemm_peak_bf16_flops_per_round": peaks, "gemm_peak_bf16_flops_median": statistics.median(peaks),
        "model_tflops": {k: v * fl / 1e12 for k, v in tps.items()},
        "fraction_of_gemm_peak_per_round_median": frac,
        "fraction_of_best_gemm_peak": {k: tokens * fl / v["min_s"] / max(peaks) for k, v in t.items()},
        "memory": {"what": "static = params+buffers+optimizer state; step_peak = profiler-tracked peak of live "
                           "torch allocations above static during one step; total = static + step_peak",
                   "static_bytes": static, "step_peak_bytes": mem,
                   "total_peak_bytes": {k: static[k] + mem[k] for k in mem}},
    }
    print(f"load avg {load0[0]:.2f} -> {load1[0]:.2f}")
    print(f"losses fp32 {l32[0]:.5f} vs {l32[1]:.5f}; first bf16 step "
          + ", ".join(f"{k} {v:.4f}" for k, v in first.items()))
    print(f"bf16 GEMM peak per round: median {statistics.median(peaks) / 1e12:.3f}, best {max(peaks) / 1e12:.3f} TFLOP/s")
    for k in steps:
        print(f"{k:>18}: median {t[k]['median_s']:6.2f} s/step (min {t[k]['min_s']:.2f}, cpu {t[k]['cpu_median_s']:.2f})"
              f" {tps[k]:6.1f} tok/s {res['model_tflops'][k]:.3f} TFLOP/s = {frac[k]:.1%} of the round's GEMM peak"
              f" (fastest step vs best peak {res['fraction_of_best_gemm_peak'][k]:.1%}); peak memory "
              f"{res['memory']['total_peak_bytes'][k] / 2**20:,.0f} MiB (step {mem[k] / 2**20:,.0f} MiB)")
    for k, v in speedup.items():
        print(f"speedup {k} / HF (target >= 1.25): " + ", ".join(f"{n.replace('_', ' ')} {x:.3f}x" for n, x in v.items()))
    if not a.no_rss and DEVICE.type == "cpu":  # on a GPU the peak allocated bytes above are the figure
        res["memory"]["peak_rss_bytes"] = {k: rss_child(k) for k in (OURS, HF)}
        print("peak RSS over 3 steps (fresh process each): " + ", ".join(
            f"{k} {v / 2**20:,.0f} MiB" for k, v in res["memory"]["peak_rss_bytes"].items()))
    if not a.no_deepspeed:
        del contenders, steps, ours, opt, hf, hf_opt  # the engine comparison runs without their memory around
        gc.collect()
        for stage in (1, 0):
            res["deepspeed" if stage == 1 else "deepspeed_zero0"] = d = deepspeed_vs_plain(a, x, y, stage)
            gc.collect()
            print(f"DeepSpeed ZeRO-{stage} (world 1) / plain loop step time: {d['ratio_deepspeed_over_plain']:.3f} "
                  f"(CPU time {d['cpu_ratio_deepspeed_over_plain']:.3f}) "
                  f"(first losses {d['first_loss']['deepspeed']:.4f} vs {d['first_loss']['plain']:.4f})")
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps(res, indent=2))
        print(f"wrote {a.out}")
    else:
        record(RESULTS, res, machine["kind"])
        print(f"wrote {RESULTS} [{machine['kind']}]")
    return 0


if __name__ == "__main__":
    sys.exit(main())
