"""Crash-safe checkpoints: DeepSpeed's native files, the layout-free form, RNG and data position.

A save writes into ``CKPT_DIR/TAG/``: DeepSpeed's engine checkpoint (model, optimizer, LR
schedule, loss scaler; with the ``universal_checkpoint_info`` its ``ds_to_universal`` tool needs,
:mod:`megallama.checkpoint.ds_universal_info`), ``universal/`` (layout-free weights and Adam moments), one RNG file per
rank, and ``meta.json``. Every rank records the paths its own writes went through, then hashes and
fsyncs exactly those, in parallel (:mod:`megallama.train.manifest`); rank 0 assembles
``manifest.json`` from the gathered digests (a file no rank claims fails the save, named) and only
then atomically replaces the ``latest`` pointer. A kill at any moment therefore leaves ``latest``
on a complete checkpoint. A write that fails on any rank (a full disk) stops every rank within
seconds with one line naming the file; the partial checkpoint is removed and ``latest`` is left
as it was. Loading verifies the manifest with every rank reading a share
(:mod:`megallama.train.verify_dist`) and falls back to the newest older checkpoint that verifies.
Where the files live over nodes (one shared directory, or node-local disks) is
:mod:`megallama.train.storage`.
"""
from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch
import torch.distributed as dist

from megallama.errors import UserError
from megallama.train.ckpt_writes import recorded_writes, write_errors, write_failure
from megallama.train.distributed import on_rank0_then_share
from megallama.train.hooks import NO_HOOKS, Hooks
from megallama.train.manifest import MANIFEST, atomic_write, coverage_problem, digest, fsync_dir, held_on, merge, \
    text_entry
from megallama.train.manifest import EVERY_NODE, assemble, verify, write_manifest  # noqa: F401 - the API tools use
from megallama.train.storage import Storage, host_id, replicate_layout_free
from megallama.train.verify_dist import verify_all

log = logging.getLogger(__name__)

LATEST = "latest"


def tag_for(step: int) -> str:
    return f"step{step:08d}"


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


def list_tags(ckpt_dir: Path) -> List[Path]:
    return sorted((p for p in ckpt_dir.glob("step*") if p.is_dir()), key=lambda p: p.name, reverse=True)


def _candidates(ckpt_dir: Path) -> Optional[Tuple[str, List[str], bool]]:
    """The tag ``latest`` names, the older tags (newest first) and whether the named one exists
    (None: no ``latest``)."""
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
    return name, [t.name for t in list_tags(ckpt_dir) if t.name < name], (ckpt_dir / name).is_dir()


def find_resumable(ckpt_dir: Path, storage: Optional[Storage] = None) -> Optional[Path]:
    """The checkpoint ``latest`` names if it verifies, else the newest older one that does.
    Collective when a process group spans ranks (each verifies a share); the same on every rank."""
    found = on_rank0_then_share(lambda: _candidates(ckpt_dir))
    if found is None:
        return None
    named = ckpt_dir / found[0]
    problem = verify_all(named, storage) if found[2] else f"{named}: missing (named by {ckpt_dir / LATEST})"
    if problem is None:
        return named
    for tag in found[1]:
        if verify_all(ckpt_dir / tag, storage) is None:
            log.warning("%s; falling back to %s", problem, ckpt_dir / tag)
            return ckpt_dir / tag
    err = UserError(f"checkpoint: {problem}; no earlier complete checkpoint to fall back to")
    err.same_on_every_rank = True
    raise err


def prune(ckpt_dir: Path, keep: int, current: Path) -> None:
    """Keep the newest ``keep`` complete checkpoints; drop older and abandoned ones."""
    complete = [t for t in list_tags(ckpt_dir) if (t / MANIFEST).is_file()]
    for tag in complete[keep:]:
        shutil.rmtree(tag, ignore_errors=True)
    for tag in list_tags(ckpt_dir):
        if not (tag / MANIFEST).is_file() and tag.name < current.name:
            shutil.rmtree(tag, ignore_errors=True)


def _abandon(ckpt_dir: Path, tag_dir: Path, step: int, problems: List[Optional[str]],
             storage: Storage = Storage()) -> None:
    """Every rank: stop with the first failure, named; the leaders remove the partial checkpoint
    (space back, no debris) and ``latest`` stays on the last complete one."""
    rank, first = next((r, p) for r, p in enumerate(problems) if p)
    if storage.is_leader(dist.get_rank()):
        shutil.rmtree(tag_dir, ignore_errors=True)
    dist.barrier()  # all stop together, after the clean-up: a launcher kills the rest when one exits
    try:
        kept = (ckpt_dir / LATEST).read_text().strip()
    except OSError:
        kept = None
    raise UserError(f"checkpoint of step {step} not saved: rank {rank}: {first}; "
                    + (f"{ckpt_dir / LATEST} still names {kept}" if kept else "no earlier checkpoint to keep"))


def _gather(value):
    every = [None] * dist.get_world_size()
    dist.all_gather_object(every, value)
    return every


def _first(failures: List[str]) -> Optional[str]:
    return failures[0] if failures else None


def save(engine, module, state, ckpt_dir: Path, step: int, client_state: Dict, keep: int, meta: Dict,
         hooks: Hooks = NO_HOOKS, storage: Storage = Storage()) -> Path:
    """Collective: every rank must call. Returns the checkpoint directory. A failed write (a full
    disk) on any rank stops every rank within seconds with one line naming the file."""
    from megallama.checkpoint.ds_universal_info import attach as attach_universal_info
    from megallama.train.universal import save_universal

    tag = tag_for(step)
    tag_dir = ckpt_dir / tag
    rank = dist.get_rank()
    failures: List[str] = []
    written: List[Path] = []
    if storage.is_leader(rank):  # an abandoned attempt at this step: start clean
        try:
            shutil.rmtree(tag_dir, ignore_errors=True)
            tag_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            failures.append(write_failure(exc, tag_dir))
    problems = _gather(_first(failures))  # doubles as the barrier before writing
    if any(problems):
        _abandon(ckpt_dir, tag_dir, step, problems, storage)
    attach_universal_info(engine, module, meta, state.tp)  # what DeepSpeed's ds_to_universal reads
    with recorded_writes(engine, failures, written):
        engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state=client_state, save_latest=False)
    try:  # collectives first, then this rank's writes: every rank calls it even after a failure
        written += save_universal(engine, module, state, tag_dir / "universal", meta)
    except write_errors() as exc:
        failures.append(write_failure(exc, tag_dir / "universal"))
    rng_path = tag_dir / f"rng_rank{rank:05d}.pt"
    if not failures:
        try:
            written.append(rng_path)
            torch.save(rng_state(state.rng), rng_path)
        except write_errors() as exc:
            failures.append(write_failure(exc, rng_path))
    hooks.before_commit(step)
    commit(ckpt_dir, tag_dir, step, written, failures, keep, {**meta, "step": step, **client_state}, storage)
    return tag_dir


def commit(ckpt_dir: Path, tag_dir: Path, step: int, written: List[Path], failures: List[str], keep: int,
           meta: Dict, storage: Storage = Storage()) -> None:
    """Collective, once every rank has written (``written``: this rank's files): each rank hashes
    its own files; the leaders (rank 0, or each node's first rank under node-local storage) build
    the manifest from the gathered digests and write ``meta.json``, the manifest and ``latest``. Any failure anywhere abandons the save on every rank."""
    rank = dist.get_rank()
    files = {}
    if not failures:  # this rank's files only: every rank hashes at once
        try:
            files = digest(tag_dir, written, rank, host_id())
        except OSError as exc:
            failures.append(f"{getattr(exc, 'filename', None) or tag_dir}: could not read it back to hash it "
                            f"({exc.strerror or exc})")
    gathered = _gather((_first(failures), files))
    if any(p for p, _ in gathered):
        _abandon(ckpt_dir, tag_dir, step, [p for p, _ in gathered], storage)
    files = merge([f for _, f in gathered])
    if storage.node_local:
        problems = _gather(replicate_layout_free(tag_dir, files, storage))
        if any(problems):
            _abandon(ckpt_dir, tag_dir, step, problems, storage)
    meta_text = json.dumps(meta, indent=1)
    files["meta.json"] = {**text_entry(meta_text), "rank": 0, "host": files_host(files, 0)}
    if storage.node_local:
        files["meta.json"]["copies"] = EVERY_NODE
    for publish in (_prepare, _publish):
        problems = _gather(publish(ckpt_dir, tag_dir, keep, meta_text, files, storage) if storage.is_leader(rank)
                           else None)
        if any(problems):
            _abandon(ckpt_dir, tag_dir, step, problems, storage)


def files_host(files: Dict, rank: int) -> str:
    return next((e["host"] for e in files.values() if e.get("rank") == rank), host_id())


def _prepare(ckpt_dir: Path, tag_dir: Path, keep: int, meta_text: str, files: Dict, storage: Storage) -> Optional[str]:
    """A leader, once every rank has written: ``meta.json``, then every file here matched with the
    gathered digests (one no rank claims fails the save: a write we did not record)."""
    current = tag_dir / "meta.json"
    try:
        atomic_write(current, meta_text)
        for d in (tag_dir, tag_dir / "universal"):
            if d.is_dir():
                fsync_dir(d)
    except OSError as exc:
        return write_failure(exc, current)
    expected = [rel for rel, _ in held_on(list(files.items()), storage.host(dist.get_rank()))]
    return coverage_problem(tag_dir, files, expected)


def _publish(ckpt_dir: Path, tag_dir: Path, keep: int, meta_text: str, files: Dict,
             storage: Storage) -> Optional[str]:
    """A leader: the manifest, then ``latest``; returns the failed write, named."""
    current = tag_dir / MANIFEST
    try:
        atomic_write(current, json.dumps(assemble(tag_dir, files, "node_local" if storage.node_local else "shared"),
                                         indent=1))
        current = ckpt_dir / LATEST
        atomic_write(current, tag_dir.name)
    except OSError as exc:
        return write_failure(exc, current)
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
