"""A checkpoint's manifest: every file's size and SHA-256, and which rank wrote it on which host.

Hashing a checkpoint is the slow part of a save (LLaMA-65B with Adam is ~1.7 TB of files), so no
rank hashes more than its own share: during a save each rank hashes (and fsyncs) exactly the files
its own writes went through (:func:`digest`), and rank 0 only assembles the gathered digests
(:func:`assemble`), failing loud on any file in the directory no rank claims. Verifying splits the
entries over ranks by bytes (:func:`share`). Everything here works on files alone, in one process:
tools that check a checkpoint offline call :func:`verify` and :func:`write_manifest` directly.

An entry is ``{"bytes", "sha256", "rank", "host"}``; ``"copies": "every_node"`` marks a file that
every node holds (node-local storage, :mod:`megallama.train.storage`). Manifests written before
ranks were recorded (no ``rank``/``host``) still verify.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Tuple, Union

from megallama.errors import UserError

MANIFEST = "manifest.json"
EVERY_NODE = "every_node"
Entry = Dict[str, object]


def sha256_file(path: Path, fsync: bool = True) -> str:
    """The file's SHA-256; ``fsync``: its data is on disk before the manifest can name it."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
        if fsync:
            os.fsync(f.fileno())
    return h.hexdigest()


def fsync_dir(path: Path) -> None:
    dfd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def atomic_write(path: Path, text: str) -> None:
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
    fsync_dir(path.parent)


def relative(tag_dir: Path, path: Path) -> str:
    return str(Path(os.path.abspath(path)).relative_to(os.path.abspath(tag_dir)))


def digest(tag_dir: Path, paths: Iterable[Path], rank: int, host: str) -> Dict[str, Entry]:
    """Entries for the files one rank wrote (each hashed and fsynced once, however often named)."""
    out = {}
    for p in paths:
        rel = relative(tag_dir, Path(p))
        if rel not in out:
            out[rel] = {"bytes": Path(p).stat().st_size, "sha256": sha256_file(Path(p)), "rank": rank, "host": host}
    return out


def text_entry(text: str) -> Entry:
    """The entry of a file about to be written with ``text`` (the same bytes on every node)."""
    data = text.encode()
    return {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def on_disk(tag_dir: Path) -> List[str]:
    """Every file under ``tag_dir`` but the manifest (and our own temporary files)."""
    return sorted(relative(tag_dir, p) for p in tag_dir.rglob("*")
                  if p.is_file() and p.name != MANIFEST and not p.name.startswith(f".{MANIFEST}.tmp"))


def merge(parts: Sequence[Dict[str, Entry]]) -> Dict[str, Entry]:
    """One entry per file out of every rank's digests; a file two ranks claim is a bug, named."""
    files: Dict[str, Entry] = {}
    for part in parts:
        for rel, entry in part.items():
            if rel in files:
                raise RuntimeError(f"checkpoint file {rel} claimed by rank {files[rel]['rank']} and rank "
                                   f"{entry['rank']}: two writers of one file")
            files[rel] = entry
    return files


def coverage_problem(tag_dir: Path, files: Dict[str, Entry], expected: Optional[Iterable[str]] = None) -> Optional[str]:
    """One line when the files here and the claimed ones differ (``expected``: the entries this
    directory must hold, default all of them); None when they match."""
    here = set(on_disk(tag_dir))
    want = set(files if expected is None else expected)
    stray = sorted(here - want)
    if stray:
        return f"{tag_dir / stray[0]}: written by no rank's recorded writes (not in the manifest); a bug"
    lost = sorted(want - here)
    if lost:
        return f"{tag_dir / lost[0]}: claimed by rank {files[lost[0]].get('rank')} but not on disk"
    return None


def assemble(tag_dir: Path, files: Dict[str, Entry], storage: str = "shared") -> Dict:
    return {"tag": tag_dir.name, "storage": storage, "files": dict(sorted(files.items())), "time": time.time()}


def write_manifest(tag_dir: Path, files: Optional[Dict[str, Entry]] = None) -> Dict:
    """Write ``manifest.json``: from gathered digests, or (``files`` None: one process, for tools
    and tests) by hashing every file here itself."""
    if files is None:
        files = digest(tag_dir, (tag_dir / rel for rel in on_disk(tag_dir)), 0, "")
        for entry in files.values():
            del entry["rank"], entry["host"]
    manifest = assemble(tag_dir, files)
    atomic_write(tag_dir / MANIFEST, json.dumps(manifest, indent=1))
    return manifest


def read_entries(mf: Path) -> Union[str, List[Tuple[str, Entry]]]:
    """``(relative path, entry)`` of each file a manifest lists, or a one-line reason."""
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
        out.append((rel, entry))
    return out


def held_on(entries: List[Tuple[str, Entry]], host: Optional[str]) -> List[Tuple[str, Entry]]:
    """The entries a node with node-local storage holds (``host`` None: every entry). An entry
    with no host (written by a tool) is held everywhere."""
    if host is None:
        return entries
    return [(rel, e) for rel, e in entries
            if e.get("copies") == EVERY_NODE or not e.get("host") or e.get("host") == host]


def check(tag_dir: Path, entries: Iterable[Tuple[str, Entry]], checksums: bool = True) -> Optional[str]:
    """The first entry whose file is missing, of another size or (``checksums``) corrupted."""
    for rel, entry in entries:
        path = tag_dir / rel
        if not path.is_file():
            return f"{path}: missing shard listed in the manifest"
        if path.stat().st_size != entry["bytes"]:
            return f"{path}: size {path.stat().st_size} differs from the manifest's {entry['bytes']}"
        if checksums and sha256_file(path, fsync=False) != entry["sha256"]:
            return f"{path}: checksum mismatch (corrupted)"
    return None


def verify(tag_dir: Path, checksums: bool = True, host: Optional[str] = None) -> Optional[str]:
    """None when ``tag_dir`` is complete and intact, else a one-line reason naming the file; in one
    process (``host``: only what that node holds under node-local storage)."""
    mf = tag_dir / MANIFEST
    if not mf.is_file():
        return f"{mf}: missing (checkpoint incomplete)"
    entries = read_entries(mf)
    if isinstance(entries, str):
        return entries
    return check(tag_dir, held_on(entries, host), checksums)


def share(entries: Sequence[Tuple[str, Entry]], n: int) -> List[List[Tuple[str, Entry]]]:
    """``entries`` split over ``n`` ranks, disjoint and balanced by bytes (largest first onto the
    least loaded; ties by path), the same on every rank."""
    shares: List[List[Tuple[str, Entry]]] = [[] for _ in range(n)]
    load = [0] * n
    for rel, entry in sorted(entries, key=lambda x: (-x[1]["bytes"], x[0])):
        i = min(range(n), key=lambda r: (load[r], r))
        shares[i].append((rel, entry))
        load[i] += entry["bytes"]
    return shares
