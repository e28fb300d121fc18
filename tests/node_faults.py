"""Losing a node of the virtual cluster mid-run, twice, then finishing the run: the sequence that
``tests/test_node_faults.py`` checks and ``benchmarks/node_loss.py`` records.

2 nodes x 2 ranks (TP2 x DP2, tiny preset, fp32, a checkpoint every step), started as ``srun``
starts them (no launcher process: nothing but the watchdog stops the survivors). First every
process of node 2 is killed; after a resume its link is cut; a last launch resumes and finishes.
The per-step losses, the killed launches' included, must be the uninterrupted run's.
"""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List

from tests.train_utils import ROOT, env

NODES, PER_NODE, STEPS, HEARTBEAT_S = 2, 2, 10, 5
COMMON = [f"train.steps={STEPS}", "train.seq_len=32", "train.global_batch_size=8", "train.log_every=1"]
CLUSTER = COMMON + ["parallel.tp=2", "train.micro_batch_size=4", "checkpoint.every=1", "checkpoint.keep=2",
                    f"train.heartbeat_timeout_s={HEARTBEAT_S}", "train.dist_timeout_s=60"]
REFERENCE = COMMON + ["parallel.tp=1", "train.micro_batch_size=8"]  # one process, uninterrupted


def _rank_env(node: int, local: int, nodelist: str) -> dict:
    """What ``srun -N2 --ntasks-per-node=2`` gives a task (the master address comes from the nodelist)."""
    e = {k: v for k, v in env().items() if k not in ("MASTER_ADDR", "MASTER_PORT")}
    e.update(OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="eth0", SLURM_PROCID=str(node * PER_NODE + local),
             SLURM_NTASKS=str(NODES * PER_NODE), SLURM_LOCALID=str(local), SLURM_NODEID=str(node),
             SLURM_JOB_NODELIST=nodelist, SLURM_JOB_NUM_NODES=str(NODES), SLURM_JOB_ID="4242")
    return e


def launch(cluster, cfg: Path, run_dir: Path, logs: Path, name: str) -> List[subprocess.Popen]:
    argv = [sys.executable, "-m", "megallama", "train", str(cfg)] + \
        [x for o in CLUSTER + [f"run_dir={run_dir}"] for x in ("--set", o)]
    procs = []
    for node in range(NODES):
        for local in range(PER_NODE):
            log = logs / f"{name}-rank{node * PER_NODE + local}.log"
            with open(log, "w") as fh:
                proc = cluster.popen(node, argv, env=_rank_env(node, local, cluster.slurm_nodelist), cwd=ROOT,
                                     stdout=fh, stderr=subprocess.STDOUT)
            proc.log = log
            procs.append(proc)
    return procs


def latest_step(run_dir: Path) -> int:
    pointer = run_dir / "checkpoints" / "latest"
    try:
        return int(pointer.read_text().strip()[len("step"):])
    except (OSError, ValueError):
        return 0


def wait_for_checkpoint(procs, run_dir: Path, step: int, limit: float = 300) -> int:
    deadline = time.monotonic() + limit
    while latest_step(run_dir) < step:
        bad = [p.log.read_text()[-3000:] for p in procs if p.poll() is not None]
        assert not bad and time.monotonic() < deadline, f"no checkpoint of step {step}: {bad}"
        time.sleep(0.05)
    return latest_step(run_dir)


def error_line(proc) -> str:
    lines = [ln for ln in proc.log.read_text().splitlines() if ln.startswith("megallama train: error:")]
    return lines[-1] if lines else ""


def survivors_exit(procs, since: float, limit: float = 120) -> Dict[str, list]:
    """Seconds from the fault to each survivor's exit, its exit code and its line."""
    waited = []
    for p in procs:
        try:
            p.wait(timeout=max(1.0, limit - (time.monotonic() - since)))
            waited.append(round(time.monotonic() - since, 2))
        except subprocess.TimeoutExpired:
            waited.append(None)
    return {"time_to_exit_s": waited, "exit_codes": [p.poll() for p in procs], "lines": [error_line(p) for p in procs]}


def losses_by_step(run_dir: Path) -> Dict[int, float]:
    """The last loss logged for each step (a resumed launch logs again the steps after its checkpoint)."""
    out = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        if "loss" in row and "step" in row:
            out[row["step"]] = row["loss"]
    return out


def node_loss_sequence(cluster, cfg: Path, work: Path) -> dict:
    """Kill node 2, resume, cut node 2's link, resume to the end; what happened, measured."""
    run_dir, logs = work / "run", work / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    result = {"heartbeat_timeout_s": HEARTBEAT_S, "steps": STEPS, "nodes": NODES, "ranks_per_node": PER_NODE}

    procs = launch(cluster, cfg, run_dir, logs, "a")
    result["kill_node"] = {"at_checkpoint": wait_for_checkpoint(procs, run_dir, 2)}
    fault = time.monotonic()
    cluster.kill_node(1)
    result["kill_node"].update(survivors_exit(procs[:PER_NODE], fault))

    procs = launch(cluster, cfg, run_dir, logs, "b")
    start = latest_step(run_dir)
    result["link_down"] = {"resumed_from": start, "at_checkpoint": wait_for_checkpoint(procs, run_dir, start + 2)}
    fault = time.monotonic()
    cluster.link_down(1)
    result["link_down"].update(survivors_exit(procs[:PER_NODE], fault))
    cut_off = survivors_exit(procs[PER_NODE:], fault, limit=60)  # they lost the store: they leave too
    result["link_down"]["cut_off_node"] = cut_off
    cluster.kill_node(1)
    cluster.link_up(1)

    procs = launch(cluster, cfg, run_dir, logs, "c")
    result["final"] = {"resumed_from": latest_step(run_dir)}
    for p in procs:
        p.wait(timeout=600)
    result["final"]["exit_codes"] = [p.returncode for p in procs]
    assert all(p.returncode == 0 for p in procs), [p.log.read_text()[-3000:] for p in procs if p.returncode]
    result["losses"] = losses_by_step(run_dir)
    return result
