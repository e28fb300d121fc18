"""What the ``convert_memory*.py`` benchmarks share, so they measure alike.

A random model is generated tensor by tensor (seeded by name and row, never held whole), and each
measurement is a fresh process reporting its own peak resident set: ``VmHWM`` (file pages mapped
by ``safe_open`` included; not ``ru_maxrss``, which Linux carries over from the forking parent
across ``exec``), beside a process that only imported what the conversion imports.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
import zlib
from pathlib import Path
from typing import Callable, Dict, Iterator, Optional, Sequence

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

_CHILD = """
import json, sys, time
sys.argv = ["megallama"] + sys.argv[1:]
IMPORTS
t0 = time.perf_counter()
MODESif sys.argv[1] != "--baseline":
    assert megallama.cli.main(sys.argv[1:]) == 0
hwm = next(line for line in open("/proc/self/status") if line.startswith("VmHWM:"))
print(json.dumps({"peak_rss_mb": int(hwm.split()[1]) / 1024, "seconds": time.perf_counter() - t0}))
"""


def child(imports: str, modes: Optional[Dict[str, str]] = None) -> str:
    """The measured program: ``imports`` (its baseline is a process that ran only those), then
    ``megallama <argv>``, or the code of ``modes[argv[0]]`` (other arguments in ``sys.argv[2:]``)."""
    branches = "".join(f"if sys.argv[1] == {flag!r}:\n{textwrap.indent(code.strip(), '    ')}\nel"
                       for flag, code in (modes or {}).items())
    return _CHILD.replace("IMPORTS", imports).replace("MODES", branches)


def env() -> Dict[str, str]:
    return dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")


def measure(program: str, *argv) -> Dict:
    """``{"peak_rss_mb", "seconds"}`` of ``program`` (:func:`child`) run with ``argv``."""
    proc = subprocess.run([sys.executable, "-c", program, *map(str, argv)], env=env(), capture_output=True,
                          text=True)
    if proc.returncode:
        raise SystemExit(f"{argv}: failed\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run_cases(program: str, cases: Sequence, runs: Optional[Dict] = None) -> Dict:
    """Measure each ``(what, argv)`` or ``(what, argv, output)`` into ``runs`` (with the output's
    size when named), printing a line each; new ``runs`` start with the imports-only baseline."""
    if runs is None:
        runs = {"baseline (imports only)": measure(program, "--baseline")}
    for what, argv, *output in cases:
        runs[what] = measure(program, *argv)
        if output:
            runs[what]["output_bytes"] = size_of(output[0])
        print(f"{what}: peak RSS {runs[what]['peak_rss_mb']:,.0f} MB in {runs[what]['seconds']:.1f} s", flush=True)
    return runs


def arguments(doc: str, **sizes: int) -> argparse.Namespace:
    """The command line: an integer flag per size (``train_layers=2``: ``--train-layers``, default
    2) and ``--workdir``."""
    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    for name, default in sizes.items():
        ap.add_argument("--" + name.replace("_", "-"), type=int, default=default)
    ap.add_argument("--workdir", default=None, help="where the (multi-GB) checkpoints go (default: a temp dir)")
    return ap.parse_args()


def llama_1b(layers: int, **overrides):
    """Llama 3.2 1B's shape, untied (a 128,256-token vocabulary unless overridden), ``layers`` blocks."""
    from megallama.config import ModelConfig

    return ModelConfig.preset("llama3.2-1b", n_layers=layers, **{"tie_embeddings": False, "max_seq_len": 8192,
                                                                 **overrides})


def random_state(cfg, dtype, positive: bool = False) -> Dict:
    """Lazy random weights (N(0, 0.02), absolute if ``positive``: valid second moments) for ``cfg``."""
    import torch

    from megallama.checkpoint.consolidated import expected_shapes
    from megallama.checkpoint.streaming import Lazy

    def generator(name, shape):
        def read(start, stop):
            g = torch.Generator().manual_seed(zlib.crc32(f"{name}:{start}".encode()))
            t = torch.empty((stop - start,) + tuple(shape[1:])).normal_(0.0, 0.02, generator=g)
            return t.abs_() if positive else t
        return read

    return {k: Lazy(v, dtype, generator(k, v)) for k, v in expected_shapes(cfg, "benchmark").items()}


def random_checkpoint(out: Path, layers: int, save: Callable) -> Dict:
    """A bf16 Llama 3.2 1B-shaped model of random weights written by ``save(state, cfg, out)``."""
    import torch

    cfg = llama_1b(layers)
    state = random_state(cfg, torch.bfloat16)
    save(state, cfg, out)
    largest = max(state.values(), key=lambda t: t.numel())
    return {"preset": "llama3.2-1b (untied)", "n_layers": layers,
            "parameters": sum(t.numel() for t in state.values()),
            "bytes_bf16": sum(t.numel() * 2 for t in state.values()), "largest_tensor": list(largest.shape),
            "largest_tensor_mb_bf16": largest.numel() * 2 / 2**20,
            "largest_tensor_mb_fp32": largest.numel() * 4 / 2**20}


def size_of(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


@contextlib.contextmanager
def workdir(prefix: str, parent: Optional[str]) -> Iterator[Path]:
    """A scratch directory for the (multi-GB) checkpoints, removed however the run ends."""
    work = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    try:
        yield work
    finally:
        shutil.rmtree(work, ignore_errors=True)


def timed(make: Callable[[], Dict]) -> Dict:
    """``make()``'s description of the model it wrote, with the seconds it took."""
    t0 = time.perf_counter()
    return {**make(), "generate_seconds": time.perf_counter() - t0}


def write_result(name: str, result: Dict) -> None:
    """``result`` with the host and command, as ``benchmarks/results/<name>.json`` and on stdout."""
    result = {**result, "host": socket.gethostname(), "cpus": os.cpu_count(), "load_average": os.getloadavg(),
              "python": platform.python_version(), "command": f"python benchmarks/{name}.py " + " ".join(sys.argv[1:])}
    out = ROOT / "benchmarks" / "results" / f"{name}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
