"""Where each logged step's record goes (``train.trackers``): ``metrics.jsonl``, ``metrics.csv``,
TensorBoard, Weights & Biases. Every sink is handed the same record dict; the file sinks drop
the records past the step a resumed run starts from, so a resume never doubles a step.

The record's columns are fixed (:data:`FIELDS`) so a CSV header written by the first run holds
for every resume; evaluation fields are present only on the steps that evaluated.
"""
from __future__ import annotations

import csv
import importlib.util
import json
import logging
import os
from pathlib import Path
from typing import Any, Dict, List

from megallama.errors import UserError

log = logging.getLogger(__name__)

FIELDS = ("step", "loss", "lr", "grad_norm", "loss_scale", "skipped_steps", "global_batch_size", "tokens",
          "step_time_s", "step_time_predicted_s", "step_time_error", "tokens_per_s", "tokens_per_s_predicted",
          "tflops_per_rank", "mfu", "hfu", "mem_bytes", "mem_predicted_bytes", "mem_error", "rss_bytes", "open_fds",
          "eval_loss", "eval_ppl", "eval_tokens", "time")
TB_SCALARS = {"loss": "train/loss", "lr": "train/lr", "grad_norm": "train/grad_norm", "loss_scale": "train/loss_scale",
              "global_batch_size": "train/global_batch_size", "tokens_per_s": "train/tokens_per_s",
              "tflops_per_rank": "train/tflops_per_rank", "mfu": "train/mfu", "mem_bytes": "train/mem_bytes",
              "eval_loss": "eval/loss", "eval_ppl": "eval/perplexity"}


def _rewrite(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def keep_records_through(path: Path, step: int) -> int:
    """Drop JSONL records past ``step`` (a resume from an older checkpoint replays them) and any torn
    last line, by writing a new file and renaming it over the old. Returns how many were dropped."""
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
    _rewrite(path, "".join(line + "\n" for line in kept))
    return len(lines) - len(kept)


def keep_rows_through(path: Path, step: int) -> int:
    """The CSV twin of :func:`keep_records_through`; a header other than :data:`FIELDS` (an older
    version's) is rewritten to it, keeping the columns both have."""
    try:
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            rows, header = list(reader), tuple(reader.fieldnames or ())
    except FileNotFoundError:
        return 0
    kept = [r for r in rows if (r.get("step") or "").isdigit() and int(r["step"]) <= step]
    if len(kept) == len(rows) and header == FIELDS:
        return 0
    import io

    out = io.StringIO()
    writer = csv.DictWriter(out, FIELDS, restval="", extrasaction="ignore")
    writer.writeheader()
    writer.writerows(kept)
    _rewrite(path, out.getvalue())
    return len(rows) - len(kept)


class JsonlSink:
    def __init__(self, run_dir: Path, start_step: int):
        self.path = run_dir / "metrics.jsonl"
        dropped = keep_records_through(self.path, start_step)
        if dropped:
            log.info("%s: dropped %d records past step %d (this run replays those steps)", self.path, dropped,
                     start_step)
        self._file = open(self.path, "a", buffering=1)

    def write(self, record: Dict[str, Any]) -> None:
        self._file.write(json.dumps(record) + "\n")

    def close(self) -> None:
        self._file.close()


class CsvSink:
    def __init__(self, run_dir: Path, start_step: int):
        self.path = run_dir / "metrics.csv"
        keep_rows_through(self.path, start_step)
        fresh = not self.path.exists()
        self._file = open(self.path, "a", newline="", buffering=1)
        self._writer = csv.DictWriter(self._file, FIELDS, restval="")
        if fresh:
            self._writer.writeheader()

    def write(self, record: Dict[str, Any]) -> None:
        self._writer.writerow({k: "" if v is None else v for k, v in record.items()})

    def close(self) -> None:
        self._file.close()


class TensorBoardSink:
    def __init__(self, writer):
        self._tb = writer

    @classmethod
    def open(cls, run_dir: Path, start_step: int):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # an optional extra (megallama[tools]); the other sinks still write
            log.info("train.trackers: tensorboard is not installed; skipping it")
            return None
        return cls(SummaryWriter(str(run_dir / "tensorboard"), purge_step=start_step + 1))

    def write(self, record: Dict[str, Any]) -> None:
        for key, tag in TB_SCALARS.items():
            if record.get(key) is not None:
                self._tb.add_scalar(tag, record[key], record["step"])

    def close(self) -> None:
        self._tb.close()


class WandbSink:
    """One wandb run per process start (a resume is a new run whose steps continue the old ones)."""

    def __init__(self, cfg):
        import wandb

        w = cfg.train.wandb
        try:
            self._run = wandb.init(project=w.project, name=w.name or Path(cfg.run_dir).name,
                                   dir=w.dir or cfg.run_dir, mode=w.mode, config=cfg.model_dump(mode="json"),
                                   settings=wandb.Settings(console="off", silent=True, x_disable_stats=True,
                                                           disable_git=True))
        except Exception as exc:  # no API key online, an unwritable dir: wandb's own words, in one line
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
            raise UserError(f"train.trackers: wandb did not start ({first}); set WANDB_MODE=offline or "
                            "train.wandb.mode=offline to log without a network") from None

    def write(self, record: Dict[str, Any]) -> None:
        self._run.log({k: v for k, v in record.items() if v is not None and k != "step"}, step=record["step"])

    def close(self) -> None:
        self._run.finish()


def check_trackers(trackers: List[str]) -> None:
    """Every rank, before the run starts: a tracker asked for but not installed is one line."""
    if "wandb" in trackers and importlib.util.find_spec("wandb") is None:
        raise UserError("train.trackers: wandb is not installed (pip install wandb, or remove it from the list)")


def open_sinks(cfg, start_step: int) -> list:
    """Rank 0's sinks for ``cfg.train.trackers``."""
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    sinks = []
    for name in cfg.train.trackers:
        if name == "jsonl":
            sinks.append(JsonlSink(run_dir, start_step))
        elif name == "csv":
            sinks.append(CsvSink(run_dir, start_step))
        elif name == "tensorboard":
            sinks.append(TensorBoardSink.open(run_dir, start_step))
        elif name == "wandb":
            sinks.append(WandbSink(cfg))
    return [s for s in sinks if s is not None]
