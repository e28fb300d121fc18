"""This rank's writes during a checkpoint save: which files it wrote (it hashes exactly those, so
each file is hashed once, by its writer) and the first write that failed, named in one line."""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import List


def write_failure(exc: BaseException, path: Path) -> str:
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


def write_errors():
    from safetensors import SafetensorError

    return OSError, RuntimeError, SafetensorError


def recorded_writes(engine, failures: List[str], written: List[Path]):
    """Records in ``written`` every file DeepSpeed's ``save_checkpoint`` writes on this rank (this
    rank hashes exactly those), and turns a failed write into a recorded message, so the failing
    rank still reaches DeepSpeed's closing barrier (raising would leave its peers waiting there
    until the watchdog called it dead) and later writes on that rank are skipped."""
    from megallama.train.deepspeed_patches import wrapped_checkpoint_writes

    def wrap_save(real_save):
        def save(state_dict, path, *args, **kwargs):
            if failures:
                return None
            try:
                written.append(Path(path))
                return real_save(state_dict, path, *args, **kwargs)
            except write_errors() as exc:
                failures.append(write_failure(exc, Path(path)))
        return save

    def wrap_copy(real_copy):
        def copy_recovery_script(save_path):
            if not failures:
                try:
                    real_copy(save_path)  # into the checkpoint directory, beside the tags: no tag file
                except OSError as exc:
                    failures.append(write_failure(exc, Path(save_path)))
        return copy_recovery_script

    return wrapped_checkpoint_writes(engine, wrap_save, wrap_copy)
