"""One job per run directory; directories that cannot be written are refused at start in one line;
a full disk during a save is named in one line on every rank within seconds, `latest` intact."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import pytest

from megallama.errors import UserError
from megallama.train.checkpoint import find_resumable, verify
from megallama.train.run_lock import RunLock, ensure_dir
from tests.train_utils import ROOT, env, launch_cmd, tiny_run_config


@contextmanager
def tmpfs(where: Path, options: str):
    """A real small or read-only filesystem (root only); skips where mounting is not allowed."""
    where.mkdir(parents=True, exist_ok=True)
    if shutil.which("mount") is None or os.geteuid() != 0 or \
            subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)],
                           capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], capture_output=True)


def _train(cfg, overrides, world=1, **kw):
    args = ["train", str(cfg)] + [x for o in overrides for x in ("--set", o)]
    return subprocess.run(launch_cmd("none" if world == 1 else "torchrun", world) + args, capture_output=True,
                          text=True, env=env(), cwd=ROOT, timeout=kw.get("timeout", 300))


def _one_error(r, command="train"):
    lines = [x for x in r.stderr.splitlines() if x.startswith(f"megallama {command}: error:")]
    assert r.returncode != 0 and len(lines) == 1 and "Traceback" not in r.stderr, r.stderr[-3000:]
    return lines[0]


def test_bad_directories_are_one_line_errors(tmp_path):
    with pytest.raises(UserError, match=r"^run_dir: empty; expected a directory path"):
        ensure_dir("", "run_dir")
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match=f"^checkpoint.dir: {tmp_path}/file/ck: {tmp_path}/file is a file"):
        ensure_dir(tmp_path / "file" / "ck", "checkpoint.dir")
    with pytest.raises(UserError, match=f"^run_dir: {tmp_path}/file: {tmp_path}/file is a file"):
        ensure_dir(tmp_path / "file", "run_dir")
    with tmpfs(tmp_path / "ro", "size=1m,ro") as ro:
        with pytest.raises(UserError, match=f"^run_dir: {ro}: not writable \\(Read-only file system\\)"):
            ensure_dir(ro, "run_dir")
        with pytest.raises(UserError, match=f"^checkpoint.dir: {ro}/ck: cannot create it \\(Read-only file system\\)"):
            ensure_dir(ro / "ck", "checkpoint.dir")


def test_second_holder_is_refused_and_a_dead_holder_is_taken_over(tmp_path, caplog):
    first = RunLock(tmp_path, created_dir=False).acquire()
    with pytest.raises(UserError, match=f"run_dir: {tmp_path} is in use by another run \\(pid {os.getpid()} on "):
        RunLock(tmp_path, created_dir=False).acquire()
    first.release()
    assert not (tmp_path / ".lock").exists()
    RunLock(tmp_path, created_dir=False).acquire().release()
    # a holder killed outright leaves the file (and its name in it) but not the lock
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from pathlib import Path; "
                               "from megallama.train.run_lock import RunLock; "
                               f"RunLock(Path({str(tmp_path)!r}), False).acquire(); print('held', flush=True); "
                               "time.sleep(600)"], env=env(), cwd=ROOT, stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(UserError, match=f"pid {holder.pid} on "):
        RunLock(tmp_path, created_dir=False).acquire()
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    caplog.set_level("INFO")
    RunLock(tmp_path, created_dir=False).acquire().release()
    assert f"taking over the lock left by a run that no longer runs (pid {holder.pid} on" in caplog.text


def test_same_command_twice_on_one_run_dir_refuses_the_second(tmp_path, data_cache):
    cfg = tiny_run_config(tmp_path, data_cache)
    run_dir = tmp_path / "run"
    overrides = ["train.steps=100000", f"run_dir={run_dir}"]
    first = subprocess.Popen(launch_cmd("none", 1) + ["train", str(cfg)] + [x for o in overrides for x in ("--set", o)],
                             env=env(), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                             start_new_session=True)
    try:
        deadline = time.time() + 240
        while not (run_dir / "metrics.jsonl").exists():
            assert first.poll() is None and time.time() < deadline, first.stderr.read()[-3000:]
            time.sleep(0.2)
        line = _one_error(_train(cfg, overrides))
        assert f"run_dir: {run_dir} is in use by another run (pid {first.pid} on " in line, line
        assert first.poll() is None and json.loads((run_dir / "config.json").read_text())["train"]["steps"] == 100000
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()


def test_start_refuses_unwritable_places_and_leaves_no_debris(tmp_path, data_cache):
    cfg = tiny_run_config(tmp_path, data_cache)
    assert "run_dir: empty; expected a directory path" in _one_error(_train(cfg, ["run_dir="]))
    (tmp_path / "file").write_text("x")
    line = _one_error(_train(cfg, [f"run_dir={tmp_path / 'r1'}", "checkpoint.every=2",
                                   f"checkpoint.dir={tmp_path / 'file' / 'ck'}"]))
    assert f"checkpoint.dir: {tmp_path}/file/ck: {tmp_path}/file is a file, not a directory" in line
    assert not (tmp_path / "r1").exists()
    # data preparation failing (a tokenizer that is not one) leaves no config.json (nor run directory) behind
    line = _one_error(_train(cfg, [f"run_dir={tmp_path / 'r2'}", f"data.prefixes=[{tmp_path / 'nothing'}]",
                                   f"data.tokenizer={cfg}"]))
    assert str(cfg) in line and not (tmp_path / "r2").exists()


def test_full_disk_during_a_save_is_named_on_every_rank_within_seconds(tmp_path, data_cache):
    """A real full disk: a 48 MiB tmpfs holds one tiny checkpoint (~36 MB) but not a second."""
    cfg = tiny_run_config(tmp_path, data_cache)
    with tmpfs(tmp_path / "disk", "size=48m") as disk:
        ckpt = disk / "ck"
        proc = subprocess.Popen(launch_cmd("torchrun", 2) + ["train", str(cfg)] + [
            x for o in ["train.steps=6", "checkpoint.every=2", f"checkpoint.dir={ckpt}", "train.log_every=1",
                        "deepspeed.zero_optimization.stage=1", f"run_dir={tmp_path / 'run'}"] for x in ("--set", o)],
            env=env(), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        out, err = proc.communicate(timeout=300)
        assert proc.returncode != 0, err[-3000:]
        lines = [x for x in err.splitlines() if x.startswith("megallama train: error:")]
        assert len(lines) == 2, err[-4000:]  # each rank says it, and says the same
        assert lines[0] == lines[1] and lines[0].startswith("megallama train: error: checkpoint of step 4 not saved:")
        assert f"{ckpt}/step00000004/" in lines[0] and "No space left on device" in lines[0], lines[0]
        assert lines[0].endswith(f"{ckpt}/latest still names step00000002")
        assert "stopped responding" not in err and "died" not in err and "Traceback (most recent call last)" \
            not in err.split("megallama train: error:")[0]
        # within seconds of the failed save: step 4 was the last step logged, the failure follows it at once
        records = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
        assert records[-1]["step"] == 4 and time.time() - records[-1]["time"] < 30
        assert find_resumable(ckpt).name == "step00000002" and verify(ckpt / "step00000002") is None
        assert not (ckpt / "step00000004").exists()  # the partial save is gone, its space back
