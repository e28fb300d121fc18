#!/usr/bin/env python
"""Save-side hashing and resume-side verification of a multi-GB checkpoint: the per-rank path
(each rank hashes the files it wrote; verification split over ranks) at 1 and N ranks, and the
old rank-0-only path (rank 0 hashes every file while the others wait; rank 0 verifies alone),
measured side by side in one run on the same files.

Each rank writes its share of ``--gb`` gigabytes as plain files (the same for every path, not
timed: the writes were always parallel), then: ``new``: ``checkpoint.commit`` (digest own files,
gather, manifest, ``latest``) and ``verify_dist.verify_all``; ``old``: ``manifest.write_manifest``
(one process hashes and fsyncs everything) and ``manifest.verify`` on rank 0. Files are rewritten
before each path so each starts from freshly written (dirty) data.

usage: python benchmarks/checkpoint_verify.py [--gb 2] [--ranks 1 4] [--files-per-rank 2]
Writes benchmarks/results/checkpoint_verify.json (and .png).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import socket
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
BLOCK = 64 << 20


def _write_share(tag_dir: Path, rank: int, world: int, total: int, per_rank: int):
    share = total // world
    block = (bytes([rank % 251 + 1]) * 4096) * (BLOCK // 4096)
    paths = []
    for i in range(per_rank):
        path = tag_dir / f"zero_pp_rank_{rank}_part{i}_optim_states.pt"
        left = share // per_rank
        with open(path, "wb") as f:
            f.write(f"{rank}/{i}".encode())  # distinct contents per file
            while left > 0:
                n = min(left, BLOCK)
                f.write(block[:n])
                left -= n
        paths.append(path)
    return paths


def _timed(fn):
    import torch.distributed as dist

    dist.barrier()
    t = time.perf_counter()
    fn()
    dist.barrier()
    return time.perf_counter() - t


def _worker(rank, world, port, root, total, per_rank, queue):
    import torch
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    from megallama.train import checkpoint as ckpt
    from megallama.train import manifest as mf
    from megallama.train.verify_dist import verify_all

    ckpt_dir = Path(root) / f"world{world}"
    tag = ckpt_dir / "step00000001"
    out = {}
    for path in ("new", "old"):
        if rank == 0:
            shutil.rmtree(ckpt_dir, ignore_errors=True)
            tag.mkdir(parents=True)
        dist.barrier()
        t = time.perf_counter()
        written = _write_share(tag, rank, world, total, per_rank)
        dist.barrier()
        write_s = time.perf_counter() - t
        if path == "new":
            save_s = _timed(lambda: ckpt.commit(ckpt_dir, tag, 1, written, [], 1, {"step": 1}))
            verdict = []
            verify_s = _timed(lambda: verdict.append(verify_all(tag)))
        else:
            def rank0_manifest():
                if rank == 0:
                    (tag / "meta.json").write_text(json.dumps({"step": 1}))
                    mf.write_manifest(tag)
                    mf.atomic_write(ckpt_dir / "latest", tag.name)

            save_s = _timed(rank0_manifest)
            verdict = []
            verify_s = _timed(lambda: verdict.append(mf.verify(tag) if rank == 0 else None))
        assert verdict[0] is None, verdict
        out[path] = {"write_s": write_s, "hash_and_manifest_s": save_s, "verify_s": verify_s,
                     "save_plus_verify_s": save_s + verify_s}
    if rank == 0:
        queue.put(out)
        shutil.rmtree(ckpt_dir, ignore_errors=True)
    dist.destroy_process_group()


def run(world: int, root: str, total: int, per_rank: int) -> dict:
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [ctx.Process(target=_worker, args=(r, world, port, root, total, per_rank, queue)) for r in range(world)]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    if any(p.exitcode for p in procs):
        raise SystemExit(f"a rank failed at world {world}: exit codes {[p.exitcode for p in procs]}")
    return queue.get()


def _plot(results, path: Path) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    labels, values = [], []
    for r in results:
        for kind in ("old", "new"):
            labels.append(f"{kind}\n{r['ranks']} rank(s)")
            values.append(r[kind]["save_plus_verify_s"])
    fig, ax = plt.subplots(figsize=(6, 3.2))
    ax.bar(labels, values, color=["#b55", "#58b"] * len(results))
    ax.set_ylabel("save hashing + verify (s)")
    ax.set_title("checkpoint hashing: rank 0 alone (old) vs every rank its own (new)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gb", type=float, default=2.0, help="checkpoint size in GB (split over the ranks)")
    ap.add_argument("--ranks", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--files-per-rank", type=int, default=2)
    ap.add_argument("--dir", default=None, help="where to write (default: a temporary directory under /tmp)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "checkpoint_verify.json"))
    args = ap.parse_args()
    total = int(args.gb * 1e9)
    root = tempfile.mkdtemp(prefix="ckpt-verify-", dir=args.dir)
    try:
        results = [{"ranks": n, **run(n, root, total, args.files_per_rank)} for n in args.ranks]
    finally:
        shutil.rmtree(root, ignore_errors=True)
    base = next(r for r in results if r["ranks"] == min(args.ranks))
    for r in results:
        r["speedup_new_vs_old"] = r["old"]["save_plus_verify_s"] / r["new"]["save_plus_verify_s"]
        r["speedup_new_vs_1rank_new"] = base["new"]["save_plus_verify_s"] / r["new"]["save_plus_verify_s"]
        print(f"{r['ranks']} rank(s), {args.gb:g} GB: old (rank 0 alone) {r['old']['hash_and_manifest_s']:.2f} s "
              f"hash + {r['old']['verify_s']:.2f} s verify = {r['old']['save_plus_verify_s']:.2f} s | new (each rank "
              f"its own) {r['new']['hash_and_manifest_s']:.2f} s + {r['new']['verify_s']:.2f} s = "
              f"{r['new']['save_plus_verify_s']:.2f} s -> old/new {r['speedup_new_vs_old']:.2f}x")
    record = {"gb": args.gb, "files_per_rank": args.files_per_rank, "cpu_count": os.cpu_count(),
              "load_average": os.getloadavg(), "machine": platform.processor() or platform.machine(),
              "command": "python benchmarks/checkpoint_verify.py " + " ".join(sys.argv[1:]), "results": results}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2))
    _plot(results, out.with_suffix(".png"))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
