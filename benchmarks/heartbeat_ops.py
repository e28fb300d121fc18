"""Heartbeat operations per second: file heartbeats (every rank reads every other rank's file, the
watchdog up to ``--old-rev``) vs the rendezvous store (one judge, ``megallama/train/watchdog.py``).

N simulated ranks run as threads of this process, each with its own watchdog exactly as a rank
runs it (interval 1 s): the old class is loaded from git at ``--old-rev`` and writes its files in a
temporary directory; the new one talks to a real TCPStore over one client connection per rank.
Counted where the operations are issued: file opens (``Path.open``) and renames for the old scheme,
store requests and the keys they touch for the new. Figures are per second at the 1 s interval
(total operations / rounds per rank), so a loaded machine slows the run but not the figures.

    python benchmarks/heartbeat_ops.py                      # 8, 32, 128 ranks; ~1 min on 2 cores
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import threading
import time
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch.distributed as dist  # noqa: E402

from megallama.train.watchdog import Watchdog  # noqa: E402


class Counter:
    def __init__(self):
        self.lock, self.ops, self.keys, self.rounds = threading.Lock(), 0, 0, 0

    def add(self, ops=0, keys=0, rounds=0):
        with self.lock:
            self.ops, self.keys, self.rounds = self.ops + ops, self.keys + keys, self.rounds + rounds

    def steady(self, world: int, warm_s: float, seconds: float) -> dict:
        """Operations per second at the 1 s interval, between two snapshots once every rank has
        reported (start-up checks and the final done markers left out)."""
        time.sleep(warm_s)
        with self.lock:
            before = (self.ops, self.keys, self.rounds)
        time.sleep(seconds)
        with self.lock:
            ops, keys, rounds = self.ops - before[0], self.keys - before[1], self.rounds - before[2]
        return {"ops_per_s": ops * world / max(rounds, 1), "keys_per_s": keys * world / max(rounds, 1),
                "rounds": rounds}


class CountingStore:
    """One rank's store client; every request and the keys it names are counted."""

    def __init__(self, store, counter: Counter):
        self.store, self.counter = store, counter

    def __getattr__(self, name):
        real = getattr(self.store, name)

        def call(*args):
            keys = len(args[0]) if name in ("check", "multi_get", "multi_set") else 1
            self.counter.add(ops=1, keys=keys)
            return real(*args)

        return call


def old_watchdog_module(rev: str) -> types.ModuleType:
    source = subprocess.run(["git", "show", f"{rev}:megallama/train/watchdog.py"], cwd=ROOT, capture_output=True,
                            text=True)
    if source.returncode:
        sys.exit(f"heartbeat_ops: cannot read the file-heartbeat watchdog at {rev}: {source.stderr.strip()}")
    module = types.ModuleType("old_watchdog")
    exec(compile(source.stdout, f"{rev}:watchdog.py", "exec"), module.__dict__)
    return module


def run_old(module, world: int, seconds: float) -> dict:
    counter, real_open, real_replace = Counter(), pathlib.Path.open, os.replace

    def counted_open(self, *args, **kwargs):
        counter.add(ops=1)
        return real_open(self, *args, **kwargs)

    def counted_replace(*args):
        counter.add(keys=1)  # renames are counted apart from opens
        return real_replace(*args)

    os.environ["LOCAL_WORLD_SIZE"] = str(world)
    with tempfile.TemporaryDirectory() as tmp:
        dogs = [module.Watchdog(tmp, r, world, timeout_s=600) for r in range(world)]
        for dog in dogs:
            real_dead = dog.dead_rank
            dog.dead_rank = lambda real_dead=real_dead: (counter.add(rounds=1), real_dead())[1]
        pathlib.Path.open, module.os.replace = counted_open, counted_replace
        try:
            for dog in dogs:
                dog.start()
            got = counter.steady(world, 2.0, seconds)
        finally:
            for dog in dogs:
                dog.stop()
            pathlib.Path.open, module.os.replace = real_open, real_replace
    return {"opens_per_s": got["ops_per_s"], "file_ops_per_s": got["ops_per_s"] + got["keys_per_s"],
            "rounds": got["rounds"]}


def run_store(world: int, seconds: float) -> dict:
    counter = Counter()
    master = dist.TCPStore("127.0.0.1", 0, 1, True, wait_for_workers=False)

    def connect():
        client = dist.TCPStore("127.0.0.1", master.port, 1, False, wait_for_workers=False,
                               timeout=datetime.timedelta(seconds=10))
        return CountingStore(dist.PrefixStore(f"w{world}", client), counter)

    dogs = [Watchdog(r, world, timeout_s=600, connect=connect) for r in range(world)]
    for dog in dogs:
        real_round = dog._round
        dog._round = lambda real_round=real_round: (counter.add(rounds=1), real_round())[1]
    for dog in dogs:
        dog.start()
    got = counter.steady(world, 2.0, seconds)
    for dog in dogs:
        dog.stop()
    return {"requests_per_s": got["ops_per_s"], "key_ops_per_s": got["keys_per_s"], "rounds": got["rounds"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ranks", type=int, nargs="+", default=[8, 32, 128])
    ap.add_argument("--seconds", type=float, default=5.0, help="per scheme and size")
    ap.add_argument("--old-rev", default="aa6d37c", help="a commit with the file-heartbeat watchdog")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "heartbeat_ops.json"))
    args = ap.parse_args()
    old = old_watchdog_module(args.old_rev)
    rows = []
    print(f"{'ranks':>6} {'file opens/s':>13} {'file ops/s':>11} {'store key ops/s':>16} {'store requests/s':>17}")
    for world in args.ranks:
        f, s = run_old(old, world, args.seconds), run_store(world, args.seconds)
        rows.append({"ranks": world, "file": f, "store": s})
        print(f"{world:>6} {f['opens_per_s']:>13,.0f} {f['file_ops_per_s']:>11,.0f} {s['key_ops_per_s']:>16,.0f} "
              f"{s['requests_per_s']:>17,.0f}")
    big = rows[-1]  # per-rank coefficients measured at the largest size, carried to 2048 ranks
    n = big["ranks"]
    out = {"command": " ".join([Path(sys.executable).name] + sys.argv), "interval_s": 1.0,
           "load_average": os.getloadavg(), "old_rev": args.old_rev, "rows": rows,
           f"extrapolated_to_2048_ranks_from_{n}": {
               "file_opens_per_s (x N^2)": round(big["file"]["opens_per_s"] / n ** 2 * 2048 ** 2),
               "store_key_ops_per_s (x N)": round(big["store"]["key_ops_per_s"] / n * 2048)}}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    plot(rows, Path(args.out).with_suffix(".png"))
    print(f"wrote {args.out}")


def plot(rows, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = [r["ranks"] for r in rows]
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.loglog(n, [r["file"]["opens_per_s"] for r in rows], "o-", label="file heartbeats: opens/s")
    ax.loglog(n, [r["store"]["key_ops_per_s"] for r in rows], "s-", label="store (one judge): key ops/s")
    ax.set_xlabel("ranks")
    ax.set_ylabel("operations per second")
    ax.set_xticks(n, [str(x) for x in n])
    ax.legend()
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


if __name__ == "__main__":
    main()
