#!/usr/bin/env python
"""DeepSpeed engine (ZeRO-1, world size 1) against a plain PyTorch loop on the same model, timed
alternately in one process; then tokens/s of `megallama train` at 1 and 2 ranks on this machine.

usage: python benchmarks/ds_overhead.py [--preset tiny] [--seq 256] [--mbs 8] [--steps 20] [--no-scaling]
Writes benchmarks/results/ds_overhead.json.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _plain_step(model, opt, tokens, clip):
    import torch

    loss = model(tokens[:, :-1], labels=tokens[:, 1:])
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss


def _ds_step(engine, tokens):
    loss = engine(tokens[:, :-1], labels=tokens[:, 1:])
    engine.backward(loss)
    engine.step()
    return loss


def overhead(args) -> dict:
    import torch

    from megallama.config import load_run_config
    from megallama.model import build_model
    from megallama.parallel import initialize
    from megallama.train.distributed import init_distributed
    from megallama.train.ds_config import build_ds_config
    from megallama.train.engine import build_engine
    from megallama.train.optim import build_optimizer

    cfg = load_run_config(data={"model": args.preset, "deepspeed": {"zero_optimization": {"stage": 1}},
                                "train": {"seq_len": args.seq, "micro_batch_size": args.mbs, "seed": 1}})
    init_distributed()
    state = initialize()
    ds = build_ds_config(cfg, 1)
    engine = build_engine(cfg, state, ds, torch.device("cpu")).engine
    plain = build_model(cfg.model, seed=1)
    opt = build_optimizer(plain, cfg.train)
    tokens = torch.randint(0, cfg.model.vocab_size, (args.mbs, args.seq + 1), generator=torch.Generator().manual_seed(0))
    first_ds, first_plain = _ds_step(engine, tokens).item(), _plain_step(plain, opt, tokens, 1.0).item()
    assert abs(first_ds - first_plain) < 1e-4 * abs(first_plain), (first_ds, first_plain)
    times = {"deepspeed": [], "plain": []}
    for i in range(args.steps + 3):
        for name in ("deepspeed", "plain") if i % 2 == 0 else ("plain", "deepspeed"):
            t0 = time.perf_counter()
            _ds_step(engine, tokens) if name == "deepspeed" else _plain_step(plain, opt, tokens, 1.0)
            if i >= 3:
                times[name].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    tok = args.mbs * args.seq
    return {"first_loss_deepspeed": first_ds, "first_loss_plain": first_plain,
            "median_step_s": med, "tokens_per_s": {k: tok / v for k, v in med.items()},
            "overhead_ratio": med["deepspeed"] / med["plain"]}


def scaling(args) -> dict:
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for world in (1, 2):
            run_dir = Path(tmp) / f"w{world}"
            cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(world), "-m", "megallama",
                   "train", str(ROOT / "examples" / "tiny.yaml"), "--set", f"run_dir={run_dir}",
                   "--set", f"train.steps={args.steps}", "--set", "train.warmup_steps=1", "--set", "train.log_every=1",
                   "--set", "checkpoint.every=0",
                   "--set", "train.global_batch_size=16", "--set", "train.activation_checkpointing.mode=none",
                   "--set", f"data.cache_dir={Path(tmp) / 'data'}", "--set", "data.embedded_max_files=60"]
            env = dict(os.environ, OMP_NUM_THREADS=str(max(1, (os.cpu_count() or 2) // world)))
            subprocess.run(cmd, check=True, capture_output=True, env=env, cwd=ROOT)
            records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
            out[world] = statistics.median(r["tokens_per_s"] for r in records[3:])  # after warm-up
    return {"tokens_per_s": out, "speedup_2_vs_1": out[2] / out[1]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--mbs", type=int, default=8)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--no-scaling", action="store_true")
    args = ap.parse_args()
    result = {"machine": {"platform": platform.platform(), "processor": platform.processor(),
                          "cpus": os.cpu_count()}, "args": vars(args), "overhead": overhead(args)}
    o = result["overhead"]
    print(f"DeepSpeed ZeRO-1 (world 1) vs plain PyTorch: {o['median_step_s']['deepspeed'] * 1e3:.1f} ms vs "
          f"{o['median_step_s']['plain'] * 1e3:.1f} ms per step -> overhead ratio {o['overhead_ratio']:.3f} "
          f"(target <= 1.05)")
    if not args.no_scaling:
        result["scaling"] = scaling(args)
        s = result["scaling"]
        print(f"megallama train tokens/s: 1 rank {s['tokens_per_s'][1]:,.0f}, 2 ranks {s['tokens_per_s'][2]:,.0f} "
              f"-> speedup {s['speedup_2_vs_1']:.2f}x")
    out = ROOT / "benchmarks" / "results" / "ds_overhead.json"
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
