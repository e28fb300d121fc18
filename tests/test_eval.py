"""Perplexity is the same at every layout, from the CLI and during training."""
import json
import subprocess

import pytest

from tests.train_utils import ROOT, env, launch_cmd, run_train, tiny_run_config

SPLIT = "data.split=80,10,10"


@pytest.fixture(scope="module")
def trained(tmp_path_factory, data_cache):
    tmp = tmp_path_factory.mktemp("eval")
    cfg = tiny_run_config(tmp, data_cache)
    report = run_train(cfg, [SPLIT, "train.steps=4", "checkpoint.every=4", "train.eval_every=2", "train.eval_iters=2",
                             f"run_dir={tmp / 'run'}"])
    return cfg, tmp, report


def _eval(cfg, ckpt, world=1, *extra):
    cmd = launch_cmd("none" if world == 1 else "torchrun", world)
    r = subprocess.run(cmd + ["eval", "--checkpoint", str(ckpt), "--config", str(cfg), "--set", SPLIT, "--json",
                              "--max-samples", "40", *extra], capture_output=True, text=True, env=env(), cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_eval_same_at_every_layout(trained):
    cfg, tmp, _ = trained
    ckpt = tmp / "run" / "checkpoints"
    one = _eval(cfg, ckpt)
    assert one["samples"] == 40 and one["tokens"] == 40 * 64 and 1.0 < one["perplexity"] < 2048 * 2
    for world, extra in ((2, ["--tp", "2"]), (2, [])):
        other = _eval(cfg, ckpt, world, *extra)
        assert abs(other["loss"] - one["loss"]) < 1e-5, (one, other)


def test_in_training_eval_is_logged(trained):
    _, tmp, report = trained
    records = [json.loads(x) for x in (tmp / "run" / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if "eval_loss" in r]
    assert [r["step"] for r in evals] == [2, 4]
    assert evals[1]["eval_loss"] < evals[0]["eval_loss"]
    assert "eval at step 4" in report["stdout"]


def test_eval_of_empty_split_is_one_line(trained):
    cfg, tmp, _ = trained
    r = subprocess.run(launch_cmd("none", 1) + ["eval", "--checkpoint", str(tmp / "run" / "checkpoints"), "--config",
                                                str(cfg), "--set", "data.split=98,1,1", "--seq-len", "120"],
                       capture_output=True, text=True, env=env(), cwd=ROOT)
    assert r.returncode == 2 and "--split valid: no samples" in r.stderr and "Traceback" not in r.stderr
