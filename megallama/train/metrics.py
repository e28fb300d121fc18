"""What a user watches: a progress line on rank 0, ``RUN_DIR/metrics.jsonl``, TensorBoard.

FLOPs are counted as Megatron counts them (matmuls of forward and backward, attention
included): ``tflops_per_rank`` and ``mfu`` use model FLOPs, ``hfu`` adds recomputation.
"""
from __future__ import annotations

import json
import logging
import math
import os
import resource
import sys
import time
from pathlib import Path
from typing import Any, Dict, Optional

import torch

log = logging.getLogger(__name__)


def peak_memory_bytes() -> int:
    if torch.cuda.is_available():
        return int(torch.cuda.max_memory_allocated())
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux reports KiB


def current_rss_bytes() -> int:
    """Resident set size now (Linux), to spot growth that a peak figure hides."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * resource.getpagesize()
    except OSError:
        return 0


def open_fds() -> int:
    try:
        import os

        return len(os.listdir("/proc/self/fd"))
    except OSError:
        return -1


def device_peak_flops(precision: str) -> tuple:
    """Dense peak FLOP/s of one rank's device and where the figure came from."""
    from megallama.profiling import hardware

    if torch.cuda.is_available():
        name = torch.cuda.get_device_name().lower()
        big = torch.cuda.get_device_properties(0).total_memory > 50 * 2**30
        for marker, key in (("h200", "h200"), ("h100", "h100-sxm"), ("a100", "a100-80gb" if big else "a100-40gb")):
            if marker in name:
                return hardware.load_hardware(key).peak(precision), key
        return float("nan"), name
    return cpu_peak_flops(precision)


def peak_cache_path() -> Path:
    root = os.environ.get("MEGALLAMA_CACHE_DIR") or \
        Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "megallama"
    return Path(root) / "peak_flops.json"


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine() or "unknown cpu"


def cpu_peak_flops(precision: str) -> tuple:
    """This machine's GEMM peak, measured once and cached per CPU model, dtype and thread count:
    measured afresh each run it moved with the load of the moment, so two runs' MFU could not be
    compared. Delete the cache file to measure again."""
    from megallama.profiling import hardware

    key = f"{_cpu_model()} | {precision} | {torch.get_num_threads()} threads"
    path = peak_cache_path()
    try:
        table = json.loads(path.read_text())
        table = table if isinstance(table, dict) else {}
    except (OSError, ValueError):
        table = {}
    entry = table.get(key)
    if isinstance(entry, dict) and isinstance(entry.get("flops"), (int, float)) and entry["flops"] > 0 \
            and math.isfinite(entry["flops"]) and isinstance(entry.get("date"), str):
        return float(entry["flops"]), f"CPU {precision} GEMM peak measured {entry['date']}, cached in {path} [{key}]"
    flops = hardware.measure_cpu_gemm_peak(precision, 2.0)
    date = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    table[key] = {"flops": flops, "date": date}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        tmp.write_text(json.dumps(table, indent=1))
        os.replace(tmp, path)
    except OSError as exc:
        return flops, f"CPU {precision} GEMM peak measured now, {date} (not cached: {path}: {exc.strerror or exc})"
    return flops, f"CPU {precision} GEMM peak measured now, {date}, cached in {path} [{key}]"


def keep_records_through(path: Path, step: int) -> int:
    """Drop records past ``step`` (a resume from an older checkpoint replays them) and any torn last
    line, by writing a new file and renaming it over the old. Returns how many were dropped."""
    try:
        lines = path.read_text().splitlines()
    except FileNotFoundError:
        return 0
    kept = []
    for line in lines:
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), int) and record["step"] <= step:
            kept.append(line)
    if len(kept) == len(lines):
        return 0
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        f.write("".join(line + "\n" for line in kept))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return len(lines) - len(kept)


def _fmt_eta(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


class MetricsLogger:
    def __init__(self, run_dir: str, enabled: bool, total_steps: int, tokens_per_step: int, world_size: int,
                 flops_model_per_token: float, flops_hw_per_token: float, peak_flops: float, start_step: int = 0):
        """``start_step``: where this run starts; earlier runs' records past it are replaced, in
        ``metrics.jsonl`` and TensorBoard alike, so a resume never doubles a step."""
        self.enabled = enabled
        self.total_steps = total_steps
        self.tokens_per_step = tokens_per_step
        self.world = world_size
        self.fm, self.fh, self.peak = flops_model_per_token, flops_hw_per_token, peak_flops
        self.path = Path(run_dir) / "metrics.jsonl"
        self._file = None
        self._tb = None
        self.last: Dict[str, Any] = {}
        self._start = time.perf_counter()
        if enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            dropped = keep_records_through(self.path, start_step)
            if dropped:
                log.info("%s: dropped %d records past step %d (this run replays those steps)", self.path, dropped,
                         start_step)
            self._file = open(self.path, "a", buffering=1)
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(str(Path(run_dir) / "tensorboard"), purge_step=start_step + 1)
            except Exception:  # tensorboard not installed
                self._tb = None

    def log(self, step: int, loss: float, lr: float, grad_norm: Optional[float], step_time: float,
            steps_done_this_run: int, extra: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
        tps = self.tokens_per_step / step_time if step_time > 0 else 0.0
        tflops = tps * self.fm / self.world / 1e12
        record = {
            "step": step, "loss": loss, "lr": lr, "grad_norm": grad_norm, "step_time_s": step_time,
            "tokens_per_s": tps, "tflops_per_rank": tflops, "mfu": tps * self.fm / self.world / self.peak,
            "hfu": tps * self.fh / self.world / self.peak, "mem_bytes": peak_memory_bytes(),
            "rss_bytes": current_rss_bytes(), "open_fds": open_fds(),
            "time": time.time(), **(extra or {}),
        }
        self.last = record
        if not self.enabled:
            return record
        self._file.write(json.dumps(record) + "\n")
        if self._tb is not None:
            for key in ("loss", "lr", "grad_norm", "tokens_per_s", "tflops_per_rank", "mfu", "mem_bytes"):
                if record.get(key) is not None:
                    self._tb.add_scalar(f"train/{key}", record[key], step)
        elapsed = time.perf_counter() - self._start
        eta = elapsed / max(steps_done_this_run, 1) * (self.total_steps - step)
        gn = f"{grad_norm:.3f}" if grad_norm is not None else "n/a"
        sys.stdout.write(
            f"step {step:>6}/{self.total_steps} | loss {loss:.4f} | lr {lr:.2e} | gnorm {gn} | "
            f"{tps:,.0f} tok/s | {tflops:.3f} TFLOP/s/rank | MFU {100 * record['mfu']:.1f}% | "
            f"mem {record['mem_bytes'] / 2**30:.2f} GiB | ETA {_fmt_eta(eta)}\n")
        sys.stdout.flush()
        return record

    def log_eval(self, step: int, result: Dict[str, Any]) -> None:
        if not self.enabled:
            return
        record = {"step": step, "eval_loss": result["loss"], "eval_ppl": result["perplexity"],
                  "eval_tokens": result["tokens"], "time": time.time()}
        self._file.write(json.dumps(record) + "\n")
        if self._tb is not None:
            self._tb.add_scalar("eval/loss", result["loss"], step)
        sys.stdout.write(f"eval at step {step}: loss {result['loss']:.4f} | perplexity {result['perplexity']:.2f} "
                         f"over {result['tokens']:,} tokens\n")
        sys.stdout.flush()

    def close(self) -> None:
        if self._file:
            self._file.close()
        if self._tb is not None:
            self._tb.close()
