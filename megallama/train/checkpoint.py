"""Crash-safe checkpoints: DeepSpeed's native files, the layout-free form, RNG and data position.

A save writes into ``CKPT_DIR/TAG/``: DeepSpeed's engine checkpoint (model, optimizer, LR
schedule, loss scaler), ``universal/`` (layout-free weights and Adam moments), one RNG file per
rank, and ``meta.json``. Only after every rank has written and a barrier has passed does rank 0
fsync every file, write ``manifest.json`` (sizes and SHA-256), and then atomically replace the
``latest`` pointer. A kill at any moment therefore leaves ``latest`` on a complete checkpoint.
A write that fails on any rank (a full disk) stops every rank within seconds with one line naming
the file; the partial checkpoint is removed and ``latest`` is left as it was.
Loading verifies the manifest and falls back to the newest older checkpoint that verifies.
Assumes the checkpoint directory is shared by all ranks (as DeepSpeed's own checkpoints do).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Dict, List, Optional

import torch
import torch.distributed as dist

from megallama.errors import UserError
from megallama.train.distributed import on_rank0_then_share
from megallama.train.hooks import NO_HOOKS, Hooks

log = logging.getLogger(__name__)

LATEST = "latest"
MANIFEST = "manifest.json"


def tag_for(step: int) -> str:
    return f"step{step:08d}"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
        os.fsync(f.fileno())
    return h.hexdigest()


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
    except OSError:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)
    dfd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def rng_state(tracker) -> Dict[str, torch.Tensor]:
    """The default streams and every stream of ``tracker`` (a layout's ``rng``)."""
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    for name, value in tracker.get_states().items():
        state[f"tracker/{name}"] = value
    return state


def restore_rng(state: Dict[str, torch.Tensor], tracker) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    streams = {k.split("/", 1)[1]: v for k, v in state.items() if k.startswith("tracker/")}
    if streams:
        tracker.set_states(streams)


def write_manifest(tag_dir: Path) -> Dict:
    files = sorted(p for p in tag_dir.rglob("*") if p.is_file() and p.name != MANIFEST)
    entries = {str(p.relative_to(tag_dir)): {"bytes": p.stat().st_size, "sha256": _sha256(p)} for p in files}
    manifest = {"tag": tag_dir.name, "files": entries, "time": time.time()}
    _atomic_write(tag_dir / MANIFEST, json.dumps(manifest, indent=1))
    return manifest


def _manifest_entries(mf: Path):
    """``(relative path, bytes, sha256)`` of each file a manifest lists, or a one-line reason."""
    from megallama.checkpoint.safe_read import read_json

    try:
        manifest = read_json(mf)
    except UserError as exc:
        return f"unreadable manifest: {exc}"
    files = manifest.get("files")
    if not isinstance(files, dict):
        return f"{mf}: 'files' must be an object of file entries"
    out = []
    for rel, entry in files.items():
        parts = Path(rel).parts
        if not rel or Path(rel).is_absolute() or ".." in parts:
            return f"{mf}: entry {rel[:100]!r} is not a path inside the checkpoint"
        if not (isinstance(entry, dict) and isinstance(entry.get("bytes"), int) and
                isinstance(entry.get("sha256"), str)):
            return f"{mf}: entry {rel[:100]!r} needs an integer 'bytes' and a string 'sha256'"
        out.append((rel, entry["bytes"], entry["sha256"]))
    return out


def verify(tag_dir: Path, checksums: bool = True) -> Optional[str]:
    """None when ``tag_dir`` is complete and intact, else a one-line reason naming the file."""
    mf = tag_dir / MANIFEST
    if not mf.is_file():
        return f"{mf}: missing (checkpoint incomplete)"
    entries = _manifest_entries(mf)
    if isinstance(entries, str):
        return entries
    for rel, nbytes, sha in entries:
        path = tag_dir / rel
        if not path.is_file():
            return f"{path}: missing shard listed in the manifest"
        if path.stat().st_size != nbytes:
            return f"{path}: size {path.stat().st_size} differs from the manifest's {nbytes}"
        if checksums and _sha256(path) != sha:
            return f"{path}: checksum mismatch (corrupted)"
    return None


def list_tags(ckpt_dir: Path) -> List[Path]:
    return sorted((p for p in ckpt_dir.glob("step*") if p.is_dir()), key=lambda p: p.name, reverse=True)


def find_resumable(ckpt_dir: Path) -> Optional[Path]:
    """The checkpoint ``latest`` names if it verifies, else the newest older one that does."""
    pointer = ckpt_dir / LATEST
    if not pointer.is_file():
        return None
    try:
        name = pointer.read_text().strip()
    except (UnicodeDecodeError, OSError) as exc:
        name = f"<unreadable: {type(exc).__name__}>"
    if not name or len(name) > 200 or any(c in name for c in "/\\") or name in (".", "..") \
            or not name.isprintable():
        raise UserError(f"{pointer}: does not name a checkpoint directory (got {name[:60]!r})")
    named = ckpt_dir / name
    problem = verify(named) if named.is_dir() else f"{named}: missing (named by {pointer})"
    if problem is None:
        return named
    for tag in list_tags(ckpt_dir):
        if tag.name < named.name and verify(tag) is None:
            log.warning("%s; falling back to %s", problem, tag)
            return tag
    raise UserError(f"checkpoint: {problem}; no earlier complete checkpoint to fall back to")


def prune(ckpt_dir: Path, keep: int, current: Path) -> None:
    """Keep the newest ``keep`` complete checkpoints; drop older and abandoned ones."""
    complete = [t for t in list_tags(ckpt_dir) if (t / MANIFEST).is_file()]
    for tag in complete[keep:]:
        shutil.rmtree(tag, ignore_errors=True)
    for tag in list_tags(ckpt_dir):
        if not (tag / MANIFEST).is_file() and tag.name < current.name:
            shutil.rmtree(tag, ignore_errors=True)


def _write_failure(exc: BaseException, path: Path) -> str:
    """One line naming the file a write failed on and why. torch.save reports a full disk only as
    "unexpected pos N vs M", so an almost empty filesystem is named as the likely cause."""
    path = Path(getattr(exc, "filename", None) or path)
    text = (str(exc).strip().splitlines() or [""])[0]
    if isinstance(exc, OSError) and exc.strerror:
        why = exc.strerror
    elif "No space left" in text or "os error 28" in text:
        why = "No space left on device"
    else:
        try:
            free = shutil.disk_usage(path.parent if path.parent.exists() else path.parent.parent).free
        except OSError:
            free = None
        why = f"No space left on device ({free} bytes free there)" if free is not None and free < 2**20 \
            else f"{type(exc).__name__}: {text[:160]}"
    return f"{path}: could not write it ({why})"


def _write_errors():
    from safetensors import SafetensorError

    return OSError, RuntimeError, SafetensorError


def _recorded_writes(engine, failures: List[str]):
    """Turns a failed write inside DeepSpeed's ``save_checkpoint`` into a recorded message, so the
    failing rank still reaches DeepSpeed's closing barrier (raising would leave its peers waiting
    there until the watchdog called it dead) and later writes on that rank are skipped."""
    from megallama.train.deepspeed_patches import wrapped_checkpoint_writes

    def wrap_save(real_save):
        def save(state_dict, path, *args, **kwargs):
            if failures:
                return None
            try:
                return real_save(state_dict, path, *args, **kwargs)
            except _write_errors() as exc:
                failures.append(_write_failure(exc, Path(path)))
        return save

    def wrap_copy(real_copy):
        def copy_recovery_script(save_path):
            if not failures:
                try:
                    real_copy(save_path)
                except OSError as exc:
                    failures.append(_write_failure(exc, Path(save_path)))
        return copy_recovery_script

    return wrapped_checkpoint_writes(engine, wrap_save, wrap_copy)


def _abandon(ckpt_dir: Path, tag_dir: Path, step: int, problems: List[Optional[str]]) -> None:
    """Every rank: stop with the first failure, named; rank 0 removes the partial checkpoint
    (space back, no debris) and ``latest`` stays on the last complete one."""
    rank, first = next((r, p) for r, p in enumerate(problems) if p)
    if dist.get_rank() == 0:
        shutil.rmtree(tag_dir, ignore_errors=True)
    dist.barrier()  # all stop together, after the clean-up: a launcher kills the rest when one exits
    try:
        kept = (ckpt_dir / LATEST).read_text().strip()
    except OSError:
        kept = None
    raise UserError(f"checkpoint of step {step} not saved: rank {rank}: {first}; "
                    + (f"{ckpt_dir / LATEST} still names {kept}" if kept else "no earlier checkpoint to keep"))


def _gather(problem: Optional[str]) -> List[Optional[str]]:
    every = [None] * dist.get_world_size()
    dist.all_gather_object(every, problem)
    return every


def save(engine, module, state, ckpt_dir: Path, step: int, client_state: Dict, keep: int, meta: Dict,
         hooks: Hooks = NO_HOOKS) -> Path:
    """Collective: every rank must call. Returns the checkpoint directory. A failed write (a full
    disk) on any rank stops every rank within seconds with one line naming the file."""
    from megallama.train.universal import save_universal

    tag = tag_for(step)
    tag_dir = ckpt_dir / tag
    rank = dist.get_rank()
    failures: List[str] = []
    if rank == 0:  # an abandoned attempt at this step: start clean
        try:
            shutil.rmtree(tag_dir, ignore_errors=True)
            tag_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            failures.append(_write_failure(exc, tag_dir))
    problems = _gather(failures[0] if failures else None)  # doubles as the barrier before writing
    if any(problems):
        _abandon(ckpt_dir, tag_dir, step, problems)
    with _recorded_writes(engine, failures):
        engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state=client_state, save_latest=False)
    try:  # collectives first, then this rank's writes: every rank calls it even after a failure
        save_universal(engine, module, state, tag_dir / "universal", meta)
    except _write_errors() as exc:
        failures.append(_write_failure(exc, tag_dir / "universal"))
    rng_path = tag_dir / f"rng_rank{rank:05d}.pt"
    if not failures:
        try:
            torch.save(rng_state(state.rng), rng_path)
        except _write_errors() as exc:
            failures.append(_write_failure(exc, rng_path))
    hooks.before_commit(step)
    problems = _gather(failures[0] if failures else None)
    if any(problems):
        _abandon(ckpt_dir, tag_dir, step, problems)
    failure = on_rank0_then_share(lambda: _commit(ckpt_dir, tag_dir, keep, {**meta, "step": step, **client_state}))
    if failure:
        _abandon(ckpt_dir, tag_dir, step, [failure])
    return tag_dir


def _commit(ckpt_dir: Path, tag_dir: Path, keep: int, meta: Dict) -> Optional[str]:
    """Rank 0, once every rank has written: ``meta.json``, the manifest, then ``latest``; returns
    the failed write, named (None when all went through)."""
    current = tag_dir / "meta.json"
    try:
        current.write_text(json.dumps(meta, indent=1))
        current = tag_dir / MANIFEST
        write_manifest(tag_dir)
        current = ckpt_dir / LATEST
        _atomic_write(current, tag_dir.name)
    except OSError as exc:
        return _write_failure(exc, current)
    prune(ckpt_dir, keep, tag_dir)
    log.info("checkpoint %s written (latest)", tag_dir)
    return None


def read_meta(tag_dir: Path) -> Dict:
    """``meta.json`` of a checkpoint, with the fields resuming reads checked (one line if not)."""
    from megallama.checkpoint.safe_read import read_json

    path = tag_dir / "meta.json"
    meta = read_json(path)
    if not isinstance(meta.get("model"), dict):
        raise UserError(f"{path}: 'model' must be an object (the model config)")
    for key in ("step", "consumed_samples"):
        if isinstance(meta.get(key), bool) or not isinstance(meta.get(key), int) or meta[key] < 0:
            raise UserError(f"{path}: '{key}' must be a non-negative integer, got {meta.get(key)!r}"[:300])
    return meta


def load_rng(tag_dir: Path, tracker) -> None:
    """This rank's saved streams back into the default generators and ``tracker``."""
    from megallama.checkpoint.safe_pickle import load_weights_only, refusal_reason

    path = tag_dir / f"rng_rank{dist.get_rank():05d}.pt"
    if path.is_file():
        try:
            state = load_weights_only(path)
        except Exception as exc:  # a refused pickle or a damaged file: one line naming it
            raise UserError(f"{path}: not a plain tensor file, refusing to load it ({refusal_reason(exc)})") from None
        restore_rng(state, tracker)
