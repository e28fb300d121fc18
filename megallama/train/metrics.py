"""What a user watches: a progress line on rank 0 and one record per logged step, written by the
sinks of ``train.trackers`` (``megallama/train/trackers.py``).

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


def device_peak_flops(precision: str, ranks: int = 1, measured: Optional[float] = None) -> tuple:
    """Dense peak FLOP/s of one rank's device and the hardware profile it came from (detected by
    the device's exact name, ``profiling/detect.py``); on a device no profile lists, NaN and why;
    on CPU :func:`cpu_peak_flops` (``ranks``, ``measured``: its arguments)."""
    from megallama.profiling import detect, hardware

    found = detect.detect()
    if found is None:
        return cpu_peak_flops(precision, ranks, measured)
    if found.profile is None:
        log.warning("%s", found.reason)
        return float("nan"), found.reason
    log.info("%s", found.reason)
    return hardware.load_hardware(found.profile).peak(precision), found.profile


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


def _peak_key(precision: str, ranks: int) -> str:
    return f"{_cpu_model()} | {precision} | {torch.get_num_threads()} threads | {ranks} ranks"


def cached_cpu_peak(precision: str, ranks: int = 1) -> Optional[tuple]:
    """(FLOP/s, where from) cached for this CPU, dtype, thread count and ranks per node, or None."""
    path, key = peak_cache_path(), _peak_key(precision, ranks)
    try:
        entry = json.loads(path.read_text()).get(key)
    except (OSError, ValueError, AttributeError):
        return None
    if isinstance(entry, dict) and isinstance(entry.get("flops"), (int, float)) and entry["flops"] > 0 \
            and math.isfinite(entry["flops"]) and isinstance(entry.get("date"), str):
        return float(entry["flops"]), f"CPU {precision} GEMM peak measured {entry['date']}, cached in {path} [{key}]"
    return None


def cpu_peak_flops(precision: str, ranks: int = 1, measured: Optional[float] = None) -> tuple:
    """This machine's GEMM peak per rank with ``ranks`` ranks per node at work, measured once and
    cached per CPU model, dtype, thread count and ranks: measured afresh each run it moved with the
    load of the moment, so two runs' MFU could not be compared. ``measured``: the rate every rank
    measured at once at this run's start (the one its prediction costs with), cached as it is;
    without it the GEMM is timed here. Delete the cache file to measure again."""
    from megallama.profiling import hardware

    hit = cached_cpu_peak(precision, ranks)
    if hit is not None:
        return hit
    path, key = peak_cache_path(), _peak_key(precision, ranks)
    flops = measured if measured else hardware.measure_cpu_gemm_peak(precision, 2.0)
    date = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    how = f"CPU {precision} GEMM peak measured now" + (f" on {ranks} ranks at once" if measured else "") + f", {date}"
    try:
        table = json.loads(path.read_text())
        table = table if isinstance(table, dict) else {}
    except (OSError, ValueError):
        table = {}
    table[key] = {"flops": flops, "date": date}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        tmp.write_text(json.dumps(table, indent=1))
        os.replace(tmp, path)
    except OSError as exc:
        return flops, f"{how} (not cached: {path}: {exc.strerror or exc})"
    return flops, f"{how}, cached in {path} [{key}]"


def relative_error(measured: Optional[float], predicted: Optional[float]) -> Optional[float]:
    """``megallama profile``'s (predicted - measured) / measured; None without both figures."""
    from megallama.profiling.compare import rel_error

    return rel_error(measured, predicted) if measured and predicted is not None else None


def _fmt_eta(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


class MetricsLogger:
    """One record per logged step: the training figures, the evaluation merged in when the step
    evaluated, handed to every sink of ``train.trackers`` (rank 0) once the step is over."""

    def __init__(self, cfg, enabled: bool, world_size: int, flops_model_per_token: float,
                 flops_hw_per_token: float, peak_flops: float, start_step: int = 0,
                 mem_predicted: Optional[float] = None, step_time_predicted: Optional[float] = None):
        """``start_step``: where this run starts; earlier runs' records past it are replaced in every
        file sink, so a resume never doubles a step. ``mem_predicted``, ``step_time_predicted``: the
        run's prediction (:mod:`megallama.train.prediction`), recorded beside what was measured with
        the error; memory's only where the measurement is the allocator's peak (on CPU the RSS also
        holds the interpreter and its libraries, which the model does not count)."""
        from megallama.train.trackers import open_sinks

        self.enabled = enabled
        self.total_steps = cfg.train.steps
        self.world = world_size
        self.fm, self.fh, self.peak = flops_model_per_token, flops_hw_per_token, peak_flops
        self.mem_predicted, self.step_time_predicted = mem_predicted, step_time_predicted
        self.step_times: list = []    # measured per logged window, for the final report
        self.path = Path(cfg.run_dir) / "metrics.jsonl"
        self.sinks = open_sinks(cfg, start_step) if enabled else []
        self.pending: Optional[Dict[str, Any]] = None
        self.last: Dict[str, Any] = {}
        self._start = time.perf_counter()

    def log(self, step: int, loss: float, lr: float, grad_norm: Optional[float], step_time: float,
            tokens_per_s: float, steps_done_this_run: int, extra: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
        tps = tokens_per_s
        tflops = tps * self.fm / self.world / 1e12
        mem = peak_memory_bytes()
        pred = self.step_time_predicted
        self.step_times.append(step_time)
        values = {
            "step": step, "loss": loss, "lr": lr, "grad_norm": grad_norm, "step_time_s": step_time,
            "tokens_per_s": tps, "tflops_per_rank": tflops, "mfu": tps * self.fm / self.world / self.peak,
            "hfu": tps * self.fh / self.world / self.peak, "mem_bytes": mem,
            "mem_predicted_bytes": self.mem_predicted, "step_time_predicted_s": pred,
            "step_time_error": relative_error(step_time, pred),
            "tokens_per_s_predicted": tps * step_time / pred if pred else None,
            "mem_error": relative_error(mem, self.mem_predicted) if torch.cuda.is_available() else None,
            "rss_bytes": current_rss_bytes(), "open_fds": open_fds(),
            "time": time.time(), **(extra or {}),
        }
        from megallama.train.trackers import FIELDS

        record = {k: values.get(k) for k in FIELDS if not k.startswith("eval_")}
        self.last = self.pending = record
        if not self.enabled:
            return record
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
        """Merged into the step's record (every evaluating step is a logged step)."""
        record = self.pending if self.pending is not None and self.pending["step"] == step else \
            {"step": step, "time": time.time()}
        record.update(eval_loss=result["loss"], eval_ppl=result["perplexity"], eval_tokens=result["tokens"])
        self.pending = record
        if not self.enabled:
            return
        sys.stdout.write(f"eval at step {step}: loss {result['loss']:.4f} | perplexity {result['perplexity']:.2f} "
                         f"over {result['tokens']:,} tokens\n")
        sys.stdout.flush()

    def commit(self) -> None:
        """The step is over: its record (if it logged one) goes to every sink."""
        if self.pending is not None:
            for sink in self.sinks:
                sink.write(self.pending)
        self.pending = None

    def close(self) -> None:
        self.commit()
        for sink in self.sinks:
            sink.close()
        self.sinks = []
