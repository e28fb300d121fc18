"""Save/resume: exact continuation at the same layout, continuation at another layout, and a
kill in the middle of a save never leaves `latest` on an incomplete checkpoint."""
import os
import signal
import shutil
import subprocess
import time

import pytest

from megallama.train.checkpoint import verify
from tests.train_utils import ROOT, env, launch_cmd, run_train, tiny_run_config, train_together

BASE = ["deepspeed.zero_optimization.stage=1", "train.steps=6", "checkpoint.every=3"]


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory, data_cache):
    """The uninterrupted run and one stopped at step 3 (copied for each resume: a resume writes
    into its run dir), trained one after the other in one process."""
    tmp = tmp_path_factory.mktemp("ckpt")
    cfg = tiny_run_config(tmp, data_cache)
    ref, half = train_together([(cfg, BASE + [f"run_dir={tmp / 'ref'}"]),
                                (cfg, BASE + ["train.exit_at_step=3", f"run_dir={tmp / 'first_half'}"])])
    return cfg, ref, half


@pytest.fixture(scope="module")
def uninterrupted(two_runs):
    cfg, ref, _ = two_runs
    return cfg, ref["losses"]


@pytest.fixture(scope="module")
def first_half(two_runs):
    _, _, half = two_runs
    return half["run_dir"], half["losses"]


def _copy_of(first_half, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(first_half[0], run_dir)
    return run_dir


def test_resume_same_layout_is_exact(uninterrupted, first_half, tmp_path):
    cfg, ref = uninterrupted
    run_dir = _copy_of(first_half, tmp_path)
    second = run_train(cfg, BASE + [f"run_dir={run_dir}"])
    assert second["start_step"] == 3
    assert first_half[1] + second["losses"] == ref  # bit-exact in fp32 on CPU


@pytest.mark.parametrize("world,layout", [(2, ["deepspeed.zero_optimization.stage=2"]), (2, ["parallel.tp=2"]),
                                          (2, ["parallel.pp=2"])])
def test_resume_at_another_layout_continues(uninterrupted, first_half, tmp_path, world, layout):
    cfg, ref = uninterrupted
    run_dir = _copy_of(first_half, tmp_path)
    second = run_train(cfg, BASE + [f"run_dir={run_dir}"] + layout, world=world)
    assert second["start_step"] == 3
    for a, b in zip(second["losses"], ref[3:]):
        assert abs(a - b) < 2e-4 * b, (second["losses"], ref[3:])


def test_kill_mid_save_keeps_latest_complete_and_resume_reproduces(uninterrupted, tmp_path):
    cfg, ref = uninterrupted
    run_dir = tmp_path / "run"
    ckpt = run_dir / "checkpoints"
    e = env()
    slow_save = launch_cmd("none", 1, "tests.fault_injection") + ["--slow-save-s", "30"]
    args = ["train", str(cfg)] + [x for o in BASE + ["checkpoint.every=2", f"run_dir={run_dir}"] for x in ("--set", o)]
    proc = subprocess.Popen(slow_save + args, env=e, cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, start_new_session=True)
    deadline = time.time() + 180
    # the save of step 2 sleeps inside its window: kill there, before its manifest exists
    while not (ckpt / "step00000002" / "universal" / "layout.json").exists():
        assert proc.poll() is None and time.time() < deadline, proc.stderr.read().decode()[-3000:]
        time.sleep(0.2)
    time.sleep(1.0)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (ckpt / "latest").exists()  # nothing complete yet: no pointer at all
    assert verify(ckpt / "step00000002") is not None

    # a clean run to step 4 (latest = step 4), then a kill mid-save of step 6
    run_train(cfg, BASE + ["train.exit_at_step=4", "checkpoint.every=2", f"run_dir={run_dir}"])
    assert (ckpt / "latest").read_text() == "step00000004"
    proc = subprocess.Popen(slow_save + args, env=e, cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, start_new_session=True)
    while not (ckpt / "step00000006" / "universal" / "layout.json").exists():
        assert proc.poll() is None and time.time() < deadline + 180, proc.stderr.read().decode()[-3000:]
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert (ckpt / "latest").read_text() == "step00000004" and verify(ckpt / "step00000004") is None
    resumed = run_train(cfg, BASE + ["checkpoint.every=2", f"run_dir={run_dir}"])
    assert resumed["start_step"] == 4 and resumed["losses"] == ref[4:]


def test_corrupted_latest_falls_back_to_previous(uninterrupted, tmp_path):
    cfg, ref = uninterrupted
    run_dir = tmp_path / "run"
    run_train(cfg, BASE + ["train.exit_at_step=4", "checkpoint.every=2", f"run_dir={run_dir}"])
    shard = run_dir / "checkpoints" / "step00000004" / "mp_rank_00_model_states.pt"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    resumed = run_train(cfg, BASE + ["checkpoint.every=2", f"run_dir={run_dir}"])
    assert resumed["start_step"] == 2 and resumed["losses"] == ref[2:]
    assert "checksum mismatch" in resumed["stderr"] and "falling back" in resumed["stderr"]


def test_an_older_pipeline_checkpoint_resumes_layout_free(tmp_path, monkeypatch):
    """Pipeline stages name their parameters as the model does; DeepSpeed's per-layer files of a
    pipeline run from before that do not load as they are, so such a checkpoint is resumed from
    its layout-free state even at the same layout (a run without a pipeline is unaffected)."""
    import megallama.train.universal as universal
    from megallama.config import RunConfig
    from megallama.train import resume

    tag = tmp_path / "step_2"
    tag.mkdir()
    (tag / "mp_rank_00_model_states.pt").touch()
    layout = {"tp": 1, "pp": 2, "dp": 1, "ulysses": 1, "zero": 0, "precision": "fp32", "stage_names": "canonical",
              "stage_layers": [2, 2]}
    meta = {**{k: layout[k] for k in resume.LAYOUT}, "step": 2, "consumed_samples": 8, "model": {},
            "stage_layers": [2, 2]}
    monkeypatch.setattr(resume, "find_start", lambda cfg, ckpt_dir, storage: tag)
    monkeypatch.setattr(resume.ckpt, "read_meta", lambda path: dict(meta))
    monkeypatch.setattr(resume, "check_same_model", lambda *a: None)
    monkeypatch.setattr(resume, "schedule_changed", lambda *a: False)
    monkeypatch.setattr(universal, "UniversalReader", lambda src: ("layout-free", src))
    assert not resume.plan_resume(RunConfig(), tmp_path, layout, False).native
    meta["stage_names"] = "canonical"
    assert resume.plan_resume(RunConfig(), tmp_path, layout, False).native
    # the same degree split otherwise: DeepSpeed's per-stage optimizer files do not fit
    assert not resume.plan_resume(RunConfig(), tmp_path, dict(layout, stage_layers=[3, 1]), False).native
    del meta["stage_names"], meta["stage_layers"]
    meta["pp"] = 1
    assert resume.plan_resume(RunConfig(), tmp_path, dict(layout, pp=1), False).native
