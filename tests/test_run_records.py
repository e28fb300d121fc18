"""Run records tell the truth: the LR each step used, one record per step across resumes, the step
a run really stopped at, a comparable MFU peak, a schedule a resume cannot silently re-stretch, and
none of the warnings our own code used to cause."""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from megallama.config import TrainConfig
from megallama.errors import UserError
from megallama.train.checkpoint import tag_for
from megallama.train.optim import lr_lambda
from tests.train_utils import ROOT, env, launch_cmd, run_train, tiny_run_config

BASE = ["train.steps=6", "checkpoint.every=2"]
OVERRIDDEN = "has been overridden after learning rate scheduler"
STEP_BEFORE = "lr_scheduler.step()` before `optimizer.step()`"


def _records(run_dir: Path):
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _expected_lr(step: int) -> float:
    t = TrainConfig(steps=6, warmup_steps=1, lr=2e-3)
    return t.lr * lr_lambda(t)(step - 1)  # step N runs after N-1 scheduler steps


@pytest.fixture(scope="module")
def flow(tmp_path_factory, data_cache):
    """Stop at step 4 of 6 (ZeRO-0), rewind ``latest`` to step 2, resume at another layout."""
    tmp = tmp_path_factory.mktemp("records")
    cfg, run_dir, cache = tiny_run_config(tmp, data_cache), tmp / "run", tmp / "peak-cache"
    os.environ["MEGALLAMA_CACHE_DIR"] = str(cache)
    try:
        first = run_train(cfg, BASE + ["train.exit_at_step=4", f"run_dir={run_dir}"])
        logged_first = _records(run_dir)
        ckpt = run_dir / "checkpoints"
        (ckpt / "latest").write_text(tag_for(2))  # as if the run had died after logging step 4
        refused = subprocess.run(launch_cmd("none", 1) + ["train", str(cfg), "--set", "train.steps=8", "--set",
                                                          "checkpoint.every=2", "--set", f"run_dir={run_dir}"],
                                 capture_output=True, text=True, env=env(), cwd=ROOT, timeout=300)
        second = run_train(cfg, BASE + ["deepspeed.zero_optimization.stage=1", f"run_dir={run_dir}"])
    finally:
        del os.environ["MEGALLAMA_CACHE_DIR"]
    return dict(cfg=cfg, tmp=tmp, run_dir=run_dir, first=first, logged_first=logged_first, refused=refused,
                second=second, cache=cache)


def test_logged_lr_is_the_lr_the_step_used(flow):
    for r in flow["logged_first"] + _records(flow["run_dir"]):
        assert r["lr"] == pytest.approx(_expected_lr(r["step"]), rel=1e-9), r
    assert _expected_lr(2) != _expected_lr(3)  # the check can tell a neighbour's LR


def test_resume_from_an_older_checkpoint_replaces_records_past_it(flow):
    assert [r["step"] for r in flow["logged_first"]] == [1, 2, 3, 4]
    assert flow["second"]["start_step"] == 2
    assert [r["step"] for r in _records(flow["run_dir"])] == [1, 2, 3, 4, 5, 6]
    assert "dropped 2 records past step 2" in flow["second"]["stderr"]


def test_last_line_says_where_the_run_stopped(flow):
    assert flow["first"]["stdout"].strip().splitlines()[-1].startswith(
        "stopped at step 4 of 6 (train.exit_at_step=4), loss")
    assert flow["second"]["stdout"].strip().splitlines()[-1].startswith("done: step 6 of 6, loss")


def test_changed_schedule_on_resume_is_refused_in_one_line(flow):
    r = flow["refused"]
    assert r.returncode == 2 and "Traceback" not in r.stderr
    lines = [x for x in r.stderr.splitlines() if "error:" in x]
    assert len(lines) == 1 and "train.steps: 8 differs from 6 in checkpoint" in lines[0], r.stderr[-2000:]
    assert "train.allow_schedule_change=true" in lines[0]


def test_no_lr_scheduler_warnings_from_our_own_wrappers(flow):
    for run in (flow["first"], flow["second"]):  # ZeRO-0 fresh start; ZeRO-1 resume at a new layout
        assert OVERRIDDEN not in run["stderr"] and STEP_BEFORE not in run["stderr"], run["stderr"][-3000:]


def test_cpu_peak_is_measured_once_and_named_with_its_date(flow):
    table = json.loads((flow["cache"] / "peak_flops.json").read_text())
    (key, entry), = table.items()
    assert "fp32" in key and "1 threads" in key and entry["flops"] > 0
    assert "peak measured now" in flow["first"]["stderr"]
    assert f"peak measured {entry['date']}, cached in {flow['cache'] / 'peak_flops.json'}" in flow["second"]["stderr"]
    # the same peak under both runs: their MFU figures compare
    mfu = [r["mfu"] / r["tflops_per_rank"] for r in _records(flow["run_dir"])]
    assert max(mfu) == pytest.approx(min(mfu), rel=1e-9) == pytest.approx(1e12 / entry["flops"], rel=1e-9)


def test_plot_never_doubles_back(tmp_path):
    sys.path.insert(0, str(ROOT / "tools"))
    try:
        from plot_metrics import timeline
    finally:
        sys.path.pop(0)
    rows = [{"step": s, "loss": 1.0 / s} for s in (1, 2, 3, 4)] + [{"step": 3, "eval_loss": 2.0}] + \
        [{"step": s, "loss": 0.5 / s} for s in (3, 4, 5)]
    assert [(r["step"], r["loss"]) for r in timeline(rows, "loss")] == [(1, 1.0), (2, 0.5), (3, 0.5 / 3),
                                                                         (4, 0.125), (5, 0.1)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    r = subprocess.run([sys.executable, str(ROOT / "tools" / "plot_metrics.py"), str(tmp_path)], capture_output=True,
                       text=True, env=env(), cwd=ROOT, timeout=120)
    assert r.returncode == 0 and (tmp_path / "metrics.png").stat().st_size > 0, r.stderr[-2000:]


def test_stale_build_lock_is_named_not_waited_on_and_eval_needs_no_comm_op(flow, tmp_path):
    """A DeepSpeed op build killed mid-way leaves ``BUILD_DIR/lock``; torch waits on it forever."""
    ext = tmp_path / "torch_extensions"
    lock = ext / "deepspeed_shm_comm" / "lock"
    lock.parent.mkdir(parents=True)
    lock.touch()
    os.utime(lock, (time.time() - 3600, time.time() - 3600))
    e = {**env(), "TORCH_EXTENSIONS_DIR": str(ext)}
    start = time.time()
    r = subprocess.run(launch_cmd("none", 1) + ["train", str(flow["cfg"]), "--set", f"run_dir={tmp_path / 'run'}"],
                       capture_output=True, text=True, env=e, cwd=ROOT, timeout=120)
    assert r.returncode == 2 and time.time() - start < 60, r.stderr[-2000:]
    lines = [x for x in r.stderr.splitlines() if "error:" in x]
    assert len(lines) == 1 and f"{lock}: a DeepSpeed op build lock that no process" in lines[0], r.stderr[-2000:]
    assert lock.exists() and not (tmp_path / "run").exists()  # reported, not removed; no debris
    ev = subprocess.run(launch_cmd("none", 1) + ["eval", "--checkpoint", str(flow["run_dir"] / "checkpoints"),
                                                 "--config", str(flow["cfg"]), "--set", "data.split=80,10,10",
                                                 "--max-samples", "8", "--json"],
                        capture_output=True, text=True, env=e, cwd=ROOT, timeout=120)
    assert ev.returncode == 0, ev.stderr[-2000:]
    assert json.loads(ev.stdout.strip().splitlines()[-1])["samples"] == 8
    assert "shm_comm" not in ev.stdout + ev.stderr


def test_peer_failure_is_one_whole_sentence():
    from megallama.train.runtime import peer_failure as _peer_failure

    long = RuntimeError("[../third_party/gloo/gloo/transport/tcp/pair.cc:534] Read error [127.0.0.1]:4242: "
                        + "Connection reset by peer " * 10)
    msg = _peer_failure("rank 1 (pid 7 on h) died", 0, long)
    assert msg == "rank 1 (pid 7 on h) died; rank 0 stops because a collective with it failed (RuntimeError)"
    short = RuntimeError("[pair.cc:534] Connection closed by peer [127.0.0.1]:4242\nmore")
    assert _peer_failure("rank 1 died", 2, short).endswith(
        "failed (RuntimeError: Connection closed by peer [127.0.0.1]:4242)")


def test_warmup_not_below_steps_is_one_config_error_printed_once_under_torchrun(tmp_path, data_cache):
    cfg = tiny_run_config(tmp_path, data_cache)
    r = subprocess.run(launch_cmd("torchrun", 2) + ["train", str(cfg), "--set", "train.warmup_steps=5", "--set",
                                                    f"run_dir={tmp_path / 'run'}"],
                       capture_output=True, text=True, env=env(), cwd=ROOT, timeout=120)
    assert r.returncode != 0
    lines = [x for x in r.stderr.splitlines() if x.startswith("megallama train: error:")]
    assert lines == ["megallama train: error: train.warmup_steps: 5 is not fewer than train.steps=5 (the LR would "
                     "never reach its peak); lower warmup_steps or raise steps"], r.stderr[-3000:]


def test_build_lock_waits_for_a_live_build_only(tmp_path):
    import threading

    from megallama.train.warmup_ops import check_build_lock

    lock = tmp_path / "op" / "lock"
    lock.parent.mkdir()
    lock.touch()
    start = time.time()
    with pytest.raises(UserError, match=f"^{lock}: a DeepSpeed op build lock"):  # young, but nobody builds
        check_build_lock(lock, grace_s=1.0, say=lambda m: None)
    assert 1.0 <= time.time() - start < 10
    os.utime(lock, (time.time() - 3600, time.time() - 3600))
    said, outcome = [], []

    def wait():
        try:
            check_build_lock(lock, grace_s=3.0, say=said.append)
            outcome.append("returned")
        except UserError as exc:
            outcome.append(str(exc))

    builder = subprocess.Popen(["sleep", "60"], cwd=lock.parent)  # ninja and the compilers work in the build dir
    waiter = threading.Thread(target=wait)
    try:
        waiter.start()
        time.sleep(4)
        assert not outcome and said and f"(pid {builder.pid})" in said[0]  # an old lock, a live build: wait
    finally:
        builder.kill()
        builder.wait()
    (lock.parent / "op.so").write_bytes(b"x")  # the linker just finished; torch imports it, then unlocks
    time.sleep(1.5)
    assert not outcome  # fresh output: still a live build's last moment, not a stale lock
    lock.unlink()
    waiter.join(timeout=10)
    assert outcome == ["returned"]


def test_schedule_change_opt_in_refits_without_warnings(caplog):
    import warnings

    import torch

    from megallama.config import RunConfig
    from megallama.train.engine import set_schedule_position
    from megallama.train.resume import schedule_changed as _schedule_changed
    from megallama.train.optim import build_scheduler

    saved = {"step": 150, "schedule": {"steps": 150, "warmup_steps": 10, "lr": 3e-4, "min_lr_ratio": 0.1}}
    same = RunConfig(train={"steps": 150, "warmup_steps": 10, "lr": 3e-4})
    assert _schedule_changed(saved, same, Path("ck")) is False
    assert _schedule_changed({"step": 3}, same, Path("ck")) is False  # a checkpoint from before schedules were saved
    longer = RunConfig(train={"steps": 300, "warmup_steps": 10, "lr": 3e-4})
    with pytest.raises(UserError, match="^train.steps: 300 differs from 150 in checkpoint ck"):
        _schedule_changed(saved, longer, Path("ck"))
    longer.train.allow_schedule_change = True
    assert _schedule_changed(saved, longer, Path("ck")) is True and "re-fitting the LR schedule" in caplog.text
    p = torch.nn.Parameter(torch.ones(2))
    opt = torch.optim.AdamW([p], lr=1e-3)
    sched = build_scheduler(opt, longer.train)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torch's "lr_scheduler.step() before optimizer.step()" would raise
        set_schedule_position(sched, 150, base_lr=5e-4)
        assert opt.param_groups[0]["lr"] == pytest.approx(5e-4 * lr_lambda(longer.train)(150))
        p.grad = torch.ones(2)
        opt.step()
        sched.step()
    assert sched.get_last_lr()[0] == pytest.approx(5e-4 * lr_lambda(longer.train)(151))


def test_shared_errors_are_printed_by_local_rank_zero_only(monkeypatch):
    from megallama.cli import _prints_error
    from megallama.config.schema import ConfigError

    for key in ("WORLD_SIZE", "LOCAL_RANK", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "SLURM_NTASKS", "SLURM_LOCALID",
                "OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID", "PMI_LOCAL_RANK"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert _prints_error(ConfigError("x"))  # a stray LOCAL_RANK in one process silences nothing
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert not _prints_error(ConfigError("x")) and _prints_error(UserError("rank 1 died"))
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert _prints_error(ConfigError("x"))
    monkeypatch.delenv("WORLD_SIZE")
    monkeypatch.delenv("LOCAL_RANK")
    monkeypatch.setenv("SLURM_NTASKS", "2")
    monkeypatch.setenv("SLURM_LOCALID", "1")
    assert not _prints_error(ConfigError("x"))


def test_build_lock_held_open_by_a_live_process_is_waited_for(tmp_path):
    """torch's baton keeps the lock's descriptor open while it holds it: on a loaded machine a
    live holder may sit quiet for long, yet it is not stale."""
    import threading

    from megallama.train.warmup_ops import check_build_lock

    lock = tmp_path / "op" / "lock"
    lock.parent.mkdir()
    lock.touch()
    os.utime(lock, (time.time() - 3600, time.time() - 3600))
    holder = subprocess.Popen([sys.executable, "-c", f"import os, time; fd = os.open({str(lock)!r}, os.O_RDONLY); "
                               "print('ok', flush=True); time.sleep(60)"], stdout=subprocess.PIPE, text=True)
    said, outcome = [], []
    waiter = threading.Thread(target=lambda: outcome.append(check_build_lock(lock, grace_s=1.0, say=said.append)))
    try:
        assert holder.stdout.readline().strip() == "ok"
        waiter.start()
        time.sleep(3)
        assert not outcome and said and f"(pid {holder.pid})" in said[0]
    finally:
        holder.kill()
        holder.wait()
    lock.unlink()
    waiter.join(timeout=10)
    assert outcome == [None]


def test_build_lock_released_between_two_looks_is_not_stale(tmp_path, monkeypatch):
    """Ranks starting together take and release the lock in turn: one gone after it was seen is
    no stale lock (the old build files around it are no evidence)."""
    from megallama.train import warmup_ops

    lock = tmp_path / "op" / "lock"
    lock.parent.mkdir()
    (lock.parent / "op.so").write_bytes(b"x")
    os.utime(lock.parent / "op.so", (time.time() - 3600, time.time() - 3600))
    lock.touch()

    def released_meanwhile(build_dir):
        lock.unlink()
        return time.time() - 3600

    monkeypatch.setattr(warmup_ops, "_last_change", released_meanwhile)
    warmup_ops.check_build_lock(lock, grace_s=1.0, say=lambda m: None)  # returns: nothing to wait for


def test_the_comm_op_is_built_by_the_interpreters_own_ninja(monkeypatch):
    """A rank started over ssh has no venv on PATH; the system's ninja would take the venv ninja's
    build as out of date and rebuild the shared op (minutes), and back again on the next run."""
    from megallama.train.warmup_ops import use_this_interpreters_ninja

    here = Path(sys.executable).parent
    if not (here / "ninja").is_file():
        pytest.skip(f"no ninja beside {sys.executable}")
    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    use_this_interpreters_ninja()
    use_this_interpreters_ninja()
    assert os.environ["PATH"] == f"{here}{os.pathsep}/usr/bin:/bin"
