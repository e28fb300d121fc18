"""Checkpoints move between layouts: TP=2 x PP=2 -> TP=1 x PP=1 and TP=1 x PP=2 give identical
logits, and training resumes at the new layout continuing the loss."""
import subprocess
import sys

import pytest
import torch

from megallama.checkpoint.reshard import consolidate_training_checkpoint
from megallama.model import build_model
from megallama.parallel import ParallelState
from tests.train_utils import ROOT, env, run_train, tiny_run_config

BASE = ["deepspeed.zero_optimization.stage=1", "train.steps=6", "checkpoint.every=3"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, data_cache):
    tmp = tmp_path_factory.mktemp("reshard")
    cfg = tiny_run_config(tmp, data_cache)
    ref = run_train(cfg, BASE + [f"run_dir={tmp / 'ref'}", "checkpoint.every=0"])["losses"]
    run_train(cfg, BASE + ["parallel.tp=2", "parallel.pp=2", "train.exit_at_step=3", f"run_dir={tmp / 'src'}"],
              world=4)
    return cfg, tmp, ref


def _convert(src, out, *extra):
    return subprocess.run([sys.executable, "-m", "megallama", "convert", "--input", str(src), "--output", str(out),
                           *extra], capture_output=True, text=True, env=env(), cwd=ROOT)


def _logits(state, mcfg, tokens):
    model = build_model(mcfg, ParallelState(), seed=None)
    model.load_state_dict(state)
    return model.eval()(tokens)


def test_convert_between_layouts_gives_identical_logits(trained):
    _, tmp, _ = trained
    mcfg, src_state = consolidate_training_checkpoint(tmp / "src" / "checkpoints")
    tokens = torch.randint(0, mcfg.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    ref = _logits(src_state, mcfg, tokens)
    for tp, pp in ((1, 1), (1, 2), (2, 1)):
        out = tmp / f"tp{tp}pp{pp}"
        r = _convert(tmp / "src" / "checkpoints", out, "--tp", str(tp), "--pp", str(pp))
        assert r.returncode == 0, r.stderr
        _, state = consolidate_training_checkpoint(out)
        assert torch.equal(_logits(state, mcfg, tokens), ref)


def test_resume_at_converted_layout_continues_the_loss(trained):
    cfg, tmp, ref = trained
    out = tmp / "for_pp2"
    assert _convert(tmp / "src" / "checkpoints", out, "--tp", "1", "--pp", "2").returncode == 0
    got = run_train(cfg, BASE + ["parallel.pp=2", f"checkpoint.load={out}", f"run_dir={tmp / 'resumed'}"], world=2)
    assert got["start_step"] == 3
    for a, b in zip(got["losses"], ref[3:]):
        assert abs(a - b) < 2e-4 * b, (got["losses"], ref)


def test_convert_rejects_impossible_layout_and_existing_output(trained):
    _, tmp, _ = trained
    r = _convert(tmp / "src" / "checkpoints", tmp / "bad", "--tp", "3")
    assert r.returncode == 2 and "not divisible by parallel.tp=3" in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    (tmp / "exists").mkdir()
    r = _convert(tmp / "src" / "checkpoints", tmp / "exists", "--tp", "2")
    assert r.returncode == 2 and "already exists" in r.stderr


def test_damaged_meta_is_one_line(trained, tmp_path):
    """A meta.json of the wrong shape stops a reshard in one line naming it (it used to be a traceback)."""
    import shutil

    _, tmp, _ = trained
    src = tmp_path / "src"
    shutil.copytree(tmp / "src" / "checkpoints", src)
    tag = src / (src / "latest").read_text().strip()
    (tag / "meta.json").write_text('{"model": [], "step": 3}')
    from megallama.train import checkpoint as ckpt

    ckpt.write_manifest(tag)  # a consistent manifest: the meta itself is what is wrong
    proc = _convert(src, tmp_path / "out", "--tp", "1", "--pp", "2")
    assert proc.returncode == 2, proc.stderr
    assert "meta.json" in proc.stderr and "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()
