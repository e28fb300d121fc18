"""A TP=4 run with 2 KV heads (each on two ranks) checkpoints each KV head once; converted to TP=2
and TP=1 it holds the same weights, and training resumes at TP=1 continuing TP=4's loss and
gradient norm (so clipping, which is on, acts alike)."""
import json

import pytest
import torch

from megallama.checkpoint.reshard import consolidate_training_checkpoint, reshard
from megallama.checkpoint.safe_read import safetensors_header
from tests.train_utils import run_train, tiny_run_config

BASE = ["model.preset=tiny-gqa", "model.n_kv_heads=2", "deepspeed.zero_optimization.stage=1", "train.steps=4",
        "train.global_batch_size=4", "checkpoint.every=2"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, data_cache):
    tmp = tmp_path_factory.mktemp("gqa_ckpt")
    cfg = tiny_run_config(tmp, data_cache)
    losses = run_train(cfg, BASE + ["parallel.tp=4", f"run_dir={tmp / 'src'}"], world=4)["losses"]
    for tp in (2, 1):  # what `megallama convert --tp T` writes
        reshard(tmp / "src" / "checkpoints" / "step00000002", tmp / f"tp{tp}", tp, 1)
    return cfg, tmp, losses


def test_each_kv_head_is_stored_once(trained):
    _, tmp, _ = trained
    universal = tmp / "src" / "checkpoints" / "step00000002" / "universal"
    name = "layers.0.attention.wqkv.weight"
    head_dim, q_local = 16, 2 * 16  # tiny-gqa: dim 128 over 8 heads, 2 query heads per rank
    rows = [safetensors_header(universal / f"pp00-tp{r:02d}.safetensors")[name][1][0] for r in range(4)]
    assert rows == [q_local + 2 * head_dim, q_local, q_local + 2 * head_dim, q_local]


def test_tp4_checkpoint_converts_to_tp2_and_tp1_with_equal_weights(trained):
    _, tmp, _ = trained
    src = tmp / "src" / "checkpoints" / "step00000002"
    _, ref = consolidate_training_checkpoint(src)
    for tp in (2, 1):
        _, got = consolidate_training_checkpoint(tmp / f"tp{tp}")
        assert got.keys() == ref.keys() and all(torch.equal(got[n], ref[n]) for n in ref)


def test_resume_at_tp1_continues_the_tp4_loss(trained):
    cfg, tmp, losses = trained
    got = run_train(cfg, BASE + [f"checkpoint.load={tmp / 'tp1'}", "checkpoint.every=0", f"run_dir={tmp / 'tp1'}"])
    assert got["start_step"] == 2
    assert len(got["losses"]) == 2
    for a, b in zip(got["losses"], losses[2:]):
        assert abs(a - b) < 2e-4 * b, (got["losses"], losses)
    # the clipped norm counts each replicated KV head once, as TP=1 does
    norms = [_grad_norms(tmp / d)[3] for d in ("src", "tp1")]
    assert abs(norms[0] - norms[1]) < 1e-4 * norms[1], norms


def _grad_norms(run_dir):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["grad_norm"] for r in rows if "grad_norm" in r}
