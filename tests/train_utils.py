"""Run ``megallama train`` as users do (plain, torchrun, deepspeed, mpiexec) and read its report."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import List, Optional, Sequence

import yaml

from tests.dist_utils import free_port
from tests.fork_launch import run_forked

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def tiny_run_config(tmp: Path, data_cache: Path, **train) -> Path:
    """A 5-step fp32 run on the embedded corpus (cache shared between runs)."""
    cfg = {
        "run_dir": str(tmp / "run"),
        "model": {"preset": "tiny", "max_seq_len": 128},
        "parallel": {"tp": 1, "pp": 1},
        "train": {"steps": 5, "seed": 7, "seq_len": 64, "micro_batch_size": 4, "global_batch_size": 8,
                  "lr": 2e-3, "warmup_steps": 1 if train.get("steps", 5) > 1 else 0, "log_every": 1, **train},
        "data": {"cache_dir": str(data_cache), "embedded_max_files": 40},
        "checkpoint": {"every": 0},
        "deepspeed": str(ROOT / "ds_configs" / "zero0.json"),
    }
    path = tmp / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "ROLE_RANK", "NODE_RANK")


def env() -> dict:
    """The test process's environment without launcher variables an in-process test may have left
    (a stale WORLD_SIZE=1 makes every rank under mpiexec, which sets only PMI_*, a world of one)."""
    e = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARS}
    e["OMP_NUM_THREADS"] = "1"
    e["PYTHONPATH"] = str(ROOT) + os.pathsep + e.get("PYTHONPATH", "")
    e["PATH"] = str(BIN) + os.pathsep + e.get("PATH", "")
    return e


def launch_cmd(launcher: str, world: int, module: str = "megallama") -> List[str]:
    """``module``: the entry point each rank runs (``tests.fault_injection`` to install faults)."""
    if launcher == "none":
        return [sys.executable, "-m", module]
    if launcher == "torchrun":
        return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(world),
                "--master_port", str(free_port()), "-m", module]
    if launcher == "deepspeed":
        return [str(BIN / "deepspeed"), "--num_gpus", str(world), "--master_port", str(free_port()),
                "--module", module]
    if launcher == "mpiexec":
        return [str(BIN / "mpiexec"), "-n", str(world), "-env", "MASTER_PORT", str(free_port()),
                sys.executable, "-m", module]
    raise ValueError(launcher)


def run_train(config: Path, overrides: List[str], world: int = 1, launcher: Optional[str] = None,
              timeout: int = 300, faults: Sequence[str] = ()) -> dict:
    """``faults``: flags of ``tests.fault_injection`` (e.g. ``["--nonfinite-steps", "2"]``).
    Without a ``launcher``, the run's process (or each rank, under a launcher's variables) forks
    from the tests' fork server (``tests.fork_launch``); a named launcher runs as typed."""
    args = list(faults) + ["train", str(config)] + [x for o in overrides for x in ("--set", o)]
    module = "tests.fault_injection" if faults else "megallama"
    if launcher is None:
        launcher = "forked"
        proc = run_forked(args, world if world > 1 else None, env(), ROOT, timeout, module)
    else:
        proc = subprocess.run(launch_cmd(launcher, world, module) + args, capture_output=True, text=True, env=env(),
                              timeout=timeout, cwd=ROOT)
    assert proc.returncode == 0, f"{launcher} x{world} {overrides} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    run_dir = next(o.split("=", 1)[1] for o in overrides if o.startswith("run_dir="))
    report = json.loads((Path(run_dir) / "report.json").read_text())
    report["stdout"], report["stderr"] = proc.stdout, proc.stderr
    return report


def _report(run_dir: Path) -> dict:
    report = json.loads((run_dir / "report.json").read_text())
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    report["grad_norms"] = [r["grad_norm"] for r in records if "loss" in r]
    report["run_dir"] = run_dir
    return report


def train_together(runs: Sequence[tuple], timeout: int = 300) -> List[dict]:
    """Independent single-process runs ``[(config, overrides), ...]`` (each naming its ``run_dir=``)
    one after another in one process (``tests.train_many``, forked from the tests' fork server):
    start-up, most of a tiny run's cost, is paid once. Each report carries its ``grad_norms`` and
    ``run_dir``; its time and memory figures are not a fresh process's, and stdout/stderr are not
    kept apart."""
    run_dirs = [Path(next(x.split("=", 1)[1] for x in o if x.startswith("run_dir="))) for _, o in runs]
    listing = run_dirs[0].with_name(run_dirs[0].name + "-runs.json")
    listing.parent.mkdir(parents=True, exist_ok=True)
    listing.write_text(json.dumps([(str(cfg), list(o)) for cfg, o in runs]))
    proc = run_forked([str(listing)], None, env(), ROOT, timeout * len(runs), "tests.train_many")
    assert proc.returncode == 0, f"{runs} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return [_report(run_dir) for run_dir in run_dirs]


_REFERENCES: dict = {}  # the session's single-process references, by their effective config


def _reference_key(config: Path, overrides: List[str]) -> str:
    """The run as the trainer sees it, less where it writes: two files that configure the same run
    differently (a --set here, a YAML key there) share one reference."""
    from megallama.config import load_run_config

    tree = load_run_config(config, overrides).model_dump(mode="json")
    tree.pop("run_dir")
    return json.dumps(tree, sort_keys=True)


def reference_runs(runs: Sequence[tuple], timeout: int = 300) -> List[dict]:
    """Single-process runs for parity tests to compare against, as :func:`train_together` (those
    this session has not trained yet, together); one another file already trained is reused, so
    a caller reads the results only and writes nothing into ``report["run_dir"]``."""
    keys = [_reference_key(cfg, list(o)) for cfg, o in runs]
    todo = {k: run for k, run in zip(keys, runs) if k not in _REFERENCES}
    if todo:
        _REFERENCES.update(zip(todo, train_together(list(todo.values()), timeout)))
    return [dict(_REFERENCES[k]) for k in keys]


def cli_in_process(argv: Sequence, monkeypatch, capsys, launcher_env: Optional[dict] = None) -> tuple:
    """``megallama ARGV`` in this process: (exit code, stdout, stderr). For refusals, which come
    before anything starts, a subprocess would spend seconds importing torch to print one line;
    a few end-to-end subprocess checks of the same contract (exit 2, one line, no traceback) stay.
    An exception that escapes ``main`` fails the test as a traceback would. ``launcher_env``: the
    variables a launcher would set (RANK, WORLD_SIZE, ...), on top of a shell without any."""
    import torch.distributed as dist

    from megallama.cli import main

    for key in LAUNCHER_VARS:
        monkeypatch.delenv(key, raising=False)
    for key, value in (launcher_env or {}).items():
        monkeypatch.setenv(key, value)
    monkeypatch.chdir(ROOT)
    capsys.readouterr()
    try:
        rc = main([str(a) for a in argv])
    except SystemExit as exc:  # argparse: a bad flag or value
        rc = exc.code
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    out = capsys.readouterr()
    return rc, out.out, out.err
