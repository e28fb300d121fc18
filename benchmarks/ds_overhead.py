#!/usr/bin/env python
"""DeepSpeed's cost made visible: its engine against PyTorch's own loops on one tiny-width model.

Paired, in one run: each data-parallel size is one launch whose contenders take a step in turn,
the order rotated every round (a load spike on a shared machine does not pick a side):
  DP=1: ZeRO-0 and ZeRO-1 engines against a plain loop (forward, backward, clip 1.0, AdamW);
  DP=2: ZeRO-1 and ZeRO-2 engines against torch.nn.parallel.DistributedDataParallel (gloo).
Every contender starts from the same weights on the same batch (first losses checked), builds its
AdamW with ``build_optimizer`` and clips at ``train.grad_clip``. ``--autocast`` runs all of them
under bf16 autocast over fp32 weights (as ``peer_step.py`` does); otherwise fp32.
``--scaling`` adds tokens/s of ``megallama train`` at 1 and 2 ranks.

usage: python benchmarks/ds_overhead.py [--preset tiny] [--seq 256] [--mbs 8] [--steps 20] [--autocast]
       [--threads 1] [--scaling] [--profile-zero0 FILE]
Filed by machine kind and precision in benchmarks/results/ds_overhead.json (``--out FILE``: this run alone).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

RESULTS = ROOT / "benchmarks" / "results" / "ds_overhead.json"
BASELINE = {1: "plain", 2: "ddp"}
ENGINES = {1: (0, 1), 2: (1, 2)}  # ZeRO stages measured at each DP size


def _run_config(args, stage: int, world: int):
    from megallama.config import load_run_config

    return load_run_config(data={"model": args.preset, "deepspeed": {"zero_optimization": {"stage": stage}},
                                 "train": {"seq_len": args.seq, "micro_batch_size": args.mbs, "seed": 1,
                                           "global_batch_size": args.mbs * world}})


def _contenders(args, world: int, device) -> dict:
    """name -> one training step; the engines first, then PyTorch's own loop."""
    import torch

    from megallama.model import build_model
    from megallama.parallel import initialize
    from megallama.train.ds_config import build_ds_config
    from megallama.train.engine import build_engine
    from megallama.train.optim import build_optimizer

    amp = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if args.autocast else contextlib.nullcontext
    rank = torch.distributed.get_rank()
    tokens = torch.randint(0, 2048, (args.mbs, args.seq + 1), generator=torch.Generator().manual_seed(rank))
    x, y = tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()
    steps = {}
    for stage in ENGINES[world]:
        cfg = _run_config(args, stage, world)
        engine = build_engine(cfg, initialize(), build_ds_config(cfg, world), device).engine

        def ds_step(engine=engine):
            with amp():
                loss = engine(x, labels=y)
            engine.backward(loss)
            engine.step()
            return loss.detach()

        steps[f"zero{stage}"] = ds_step
    cfg = _run_config(args, 0, world)
    model = build_model(cfg.model, seed=cfg.train.seed).to(device)
    if world > 1:
        model = torch.nn.parallel.DistributedDataParallel(model)
    opt = build_optimizer(model, cfg.train)

    def torch_step():
        with amp():
            loss = model(x, labels=y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    steps[BASELINE[world]] = torch_step
    return steps


def worker(args) -> None:
    """One rank of one launch: every contender's first loss, then ``args.steps`` timed rounds after
    3 of warm-up. A step's wall time is the slowest rank's (barrier before, max-reduced after);
    its CPU time is summed over ranks (on a shared machine the steadier figure of work done)."""
    import torch
    import torch.distributed as dist

    from megallama.train.distributed import init_distributed

    torch.set_num_threads(args.threads)
    info = init_distributed()
    steps = _contenders(args, info.world_size, torch.device("cpu"))
    first = {k: float(fn()) for k, fn in steps.items()}
    names, warm = list(steps), 3
    wall, cpu = {k: [] for k in names}, {k: [] for k in names}
    for i in range(warm + args.steps):
        order = names[i % len(names):] + names[:i % len(names)]
        for name in order if (i // len(names)) % 2 == 0 else order[::-1]:
            dist.barrier()
            t0, c0 = time.perf_counter(), time.process_time()
            steps[name]()
            if i >= warm:
                wall[name].append(time.perf_counter() - t0)
                cpu[name].append(time.process_time() - c0)
    reduced = {}
    for key, d, op in (("wall", wall, dist.ReduceOp.MAX), ("cpu", cpu, dist.ReduceOp.SUM)):
        flat = torch.tensor([d[k] for k in names], dtype=torch.float64)
        dist.all_reduce(flat, op=op)
        reduced[key] = dict(zip(names, flat.tolist()))
    if args.profile_zero0 and "zero0" in steps:
        _profile(steps, args.profile_zero0)
    if dist.get_rank() == 0:
        Path(args.worker_out).write_text(json.dumps({"first_loss": first, **reduced, "world": info.world_size}))


def _profile(steps: dict, path: str, rounds: int = 5) -> None:
    """Self CPU ms per step by operator, ZeRO-0 engine against the plain loop, alternated."""
    from torch.profiler import ProfilerActivity, profile

    per = {k: {} for k in ("zero0", "plain")}
    for i in range(rounds):
        for name in ("zero0", "plain") if i % 2 == 0 else ("plain", "zero0"):
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                steps[name]()
            for e in prof.key_averages():
                per[name].setdefault(e.key, []).append(e.self_cpu_time_total / 1e3)
    med = {n: {k: statistics.median(v + [0.0] * (rounds - len(v))) for k, v in d.items()} for n, d in per.items()}
    keys = sorted(set(med["zero0"]) | set(med["plain"]),
                  key=lambda k: -abs(med["zero0"].get(k, 0.0) - med["plain"].get(k, 0.0)))
    title = f"operator (self CPU ms per step, median of {rounds})"
    lines = [f"{title:<70}{'zero0':>10}{'plain':>10}{'diff':>10}",
             f"{'TOTAL':<70}" + "".join(f"{sum(med[n].values()):10.2f}" for n in ("zero0", "plain"))
             + f"{sum(med['zero0'].values()) - sum(med['plain'].values()):10.2f}"]
    lines += [f"{k[:69]:<70}{med['zero0'].get(k, 0.0):10.2f}{med['plain'].get(k, 0.0):10.2f}"
              f"{med['zero0'].get(k, 0.0) - med['plain'].get(k, 0.0):10.2f}" for k in keys[:40]]
    Path(path).write_text("\n".join(lines) + "\n")
    print(f"wrote {path}")


def launch(args, world: int) -> dict:
    """One paired launch of ``world`` ranks under torchrun; the ratios of each engine to PyTorch's loop."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "worker.json"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(world),
               __file__, "--worker-out", str(out), *sys.argv[1:]]
        env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), PYTHONPATH=str(ROOT))
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
        if proc.returncode != 0:
            sys.exit(f"ds_overhead: the DP={world} launch failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
        r = json.loads(out.read_text())
    base, tol = BASELINE[world], 2e-2 if args.autocast else 1e-4
    for name, loss in r["first_loss"].items():
        if abs(loss - r["first_loss"][base]) > tol * abs(r["first_loss"][base]):
            sys.exit(f"ds_overhead: DP={world} first losses differ beyond {tol}: {r['first_loss']}")
    t, c = r["wall"], r["cpu"]
    med = {k: statistics.median(v) for k, v in t.items()}
    cpu = {k: statistics.median(v) for k, v in c.items()}
    return {"first_loss": r["first_loss"], "median_step_s": med, "all_step_s": t,
            "median_cpu_s": cpu, "all_cpu_s": c,
            "ratio_to_" + base: {k: med[k] / med[base] for k in t if k != base},
            "median_of_paired_ratios": {k: statistics.median(a / b for a, b in zip(t[k], t[base]))
                                        for k in t if k != base},
            "cpu_ratio_to_" + base: {k: cpu[k] / cpu[base] for k in c if k != base}}


def scaling(args) -> dict:
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for world in (1, 2):
            run_dir = Path(tmp) / f"w{world}"
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(world),
                   "-m", "megallama", "train", str(ROOT / "examples" / "tiny.yaml"), "--set", f"run_dir={run_dir}",
                   "--set", f"train.steps={args.steps}", "--set", "train.warmup_steps=1", "--set", "train.log_every=1",
                   "--set", "checkpoint.every=0",
                   "--set", "train.global_batch_size=16", "--set", "train.activation_checkpointing.mode=none",
                   "--set", f"data.cache_dir={Path(tmp) / 'data'}", "--set", "data.embedded_max_files=60"]
            env = dict(os.environ, OMP_NUM_THREADS=str(max(1, (os.cpu_count() or 2) // world)))
            subprocess.run(cmd, check=True, capture_output=True, env=env, cwd=ROOT)
            records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
            out[world] = statistics.median(r["tokens_per_s"] for r in records[3:])  # after warm-up
    return {"tokens_per_s": out, "speedup_2_vs_1": out[2] / out[1]}


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--mbs", type=int, default=8)
    ap.add_argument("--steps", type=int, default=20, help="timed rounds after 3 of warm-up")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    ap.add_argument("--autocast", action="store_true", help="bf16 autocast over fp32 weights (default fp32)")
    ap.add_argument("--scaling", action="store_true", help="also tokens/s of `megallama train` at 1 and 2 ranks")
    ap.add_argument("--profile-zero0", default=None, help="write a by-operator table, ZeRO-0 vs plain at DP=1")
    ap.add_argument("--out", type=Path, default=None, help="write this run's result alone here")
    ap.add_argument("--worker-out", default=None, help=argparse.SUPPRESS)  # set on the ranks launch() starts
    return ap.parse_args(argv)


def summary(res: dict) -> str:
    def pair(dp: int, stage: int, base: str) -> str:
        r = res[f"dp{dp}"]
        return (f"ZeRO-{stage} / {'DDP' if base == 'ddp' else base} {r['ratio_to_' + base][f'zero{stage}']:.3f} "
                f"(cpu {r['cpu_ratio_to_' + base][f'zero{stage}']:.3f})")

    return (f"DP=1: {pair(1, 0, 'plain')}, {pair(1, 1, 'plain')}; DP=2: {pair(2, 1, 'ddp')}, {pair(2, 2, 'ddp')} "
            f"[median step-time ratios, wall (CPU); target ZeRO-0 / plain <= 1.05]")


def main() -> int:
    args = parse_args()
    if args.worker_out:
        worker(args)
        return 0
    import torch

    from benchmarks.machine import banner, describe, record

    torch.set_num_threads(args.threads)
    machine = describe()
    print(banner(machine), flush=True)
    load0 = os.getloadavg()
    res = {"command": "python benchmarks/ds_overhead.py " + " ".join(sys.argv[1:]), "machine": machine,
           "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}}
    for world in (1, 2):
        res[f"dp{world}"] = r = launch(args, world)
        base = BASELINE[world]
        print(f"DP={world}: " + ", ".join(f"{k} {v * 1e3:.1f} ms" for k, v in r["median_step_s"].items())
              + " per step; " + ", ".join(f"{k} / {base} {v:.3f}" for k, v in r["ratio_to_" + base].items())
              + " (median of paired rounds: " + ", ".join(f"{v:.3f}" for v in r["median_of_paired_ratios"].values())
              + "; CPU time: " + ", ".join(f"{v:.3f}" for v in r["cpu_ratio_to_" + base].values()) + ")", flush=True)
    res["machine"]["loadavg_start"], res["machine"]["loadavg_end"] = load0, os.getloadavg()
    res["summary"] = summary(res)
    print(f"load avg {load0[0]:.2f} -> {os.getloadavg()[0]:.2f}\n{res['summary']}")
    if args.scaling:
        res["scaling"] = s = scaling(args)
        print(f"megallama train tokens/s: 1 rank {s['tokens_per_s'][1]:,.0f}, 2 ranks {s['tokens_per_s'][2]:,.0f} "
              f"-> speedup {s['speedup_2_vs_1']:.2f}x")
    if args.out:
        args.out.write_text(json.dumps(res, indent=2))
        print(f"wrote {args.out}")
    else:
        variant = "autocast-bf16" if args.autocast else "fp32"
        record(RESULTS, res, machine["kind"], variant)
        print(f"wrote {RESULTS} [{machine['kind']}][{variant}]")
    return 0


if __name__ == "__main__":
    sys.exit(main())
