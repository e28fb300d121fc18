"""Recipes in real runs: a batch ramp-up that a resume mid-ramp continues exactly (and the pipeline
engine follows), a start from a checkpoint's weights alone (step 0, fresh optimizer), and one
record per logged step reaching JSONL, CSV and an offline Weights & Biases run alike."""
import csv
import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from megallama.train.checkpoint import tag_for
from tests.train_utils import run_train, tiny_run_config

RAMP = ["train.steps=6", "train.global_batch_size=12", "train.rampup_batch_size=[4,4,16]", "data.split=80,10,10"]
SIZES = [4, 4, 8, 12, 12, 12]  # 4 until 8 samples are consumed, 8 until 16, then 12
FILES_ONLY = "train.trackers=[jsonl,csv]"
WANDB_ENV = ("WANDB_MODE", "WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR")


def _jsonl(run_dir: Path):
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _csv(run_dir: Path):
    with open(run_dir / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


def wandb_history(run_dir: Path):
    """The history records of the one offline wandb run under ``run_dir``: its ``.wandb`` file is a
    LevelDB-style log (7-byte W&B header, 32 KiB blocks of chunks: crc32, length, type) of
    protobuf ``Record``s."""
    from wandb.proto import wandb_internal_pb2 as pb

    (path,) = (run_dir / "wandb").glob("offline-run-*/run-*.wandb")
    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, block, pending, out = 7, 32768, b"", []
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a chunk header is padding
            pos += block - pos % block
            continue
        length, kind = int.from_bytes(data[pos + 4:pos + 6], "little"), data[pos + 6]
        pending, pos = pending + data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind in (1, 4):  # a whole record, or the last chunk of one
            rec = pb.Record()
            rec.ParseFromString(pending)
            pending = b""
            if rec.WhichOneof("record_type") == "history":
                out.append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in rec.history.item})
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory, data_cache):
    """A: six ramped steps straight through (JSONL, CSV, offline wandb; evaluation at steps 3 and
    6). B: the same stopped at step 2 (mid-ramp, with a checkpoint), then resumed. C: step 0 again
    from B's checkpoint's weights alone, at LR 0 so its one step leaves them as they were."""
    tmp = tmp_path_factory.mktemp("recipes")
    cfg = tiny_run_config(tmp, data_cache)
    saved = {k: os.environ.get(k) for k in WANDB_ENV}
    os.environ.update(WANDB_MODE="offline", **{k: str(tmp / "wandb-home") for k in WANDB_ENV[1:]})
    try:
        a = run_train(cfg, RAMP + ["train.trackers=[jsonl,csv,wandb]", "train.eval_every=3", "train.eval_iters=1",
                                   f"run_dir={tmp / 'a'}"])
    finally:
        for k, v in saved.items():
            if v is None:
                del os.environ[k]
            else:
                os.environ[k] = v
    b1 = run_train(cfg, RAMP + [FILES_ONLY, "train.exit_at_step=2", "checkpoint.every=2", f"run_dir={tmp / 'b'}"])
    b2 = run_train(cfg, RAMP + [FILES_ONLY, f"run_dir={tmp / 'b'}"])
    c = run_train(cfg, [FILES_ONLY, "train.steps=1", "train.warmup_steps=0", "train.lr=0", "checkpoint.every=1",
                        f"checkpoint.load={tmp / 'b' / 'checkpoints'}", "checkpoint.load_weights_only=true",
                        f"run_dir={tmp / 'c'}"])
    return dict(tmp=tmp, cfg=cfg, a=a, b1=b1, b2=b2, c=c)


def test_batch_ramps_up_by_consumed_samples(runs):
    assert [r["global_batch_size"] for r in _jsonl(runs["tmp"] / "a")] == SIZES
    assert [r["tokens"] for r in _jsonl(runs["tmp"] / "a")] == [64 * sum(SIZES[:i + 1]) for i in range(6)]


def test_resume_mid_ramp_continues_exactly(runs):
    a, b1, b2 = runs["a"], runs["b1"], runs["b2"]
    assert b1["end_step"] == 2 and b2["start_step"] == 2
    assert b1["losses"] + b2["losses"] == a["losses"]  # bit for bit: same batches, same sizes
    assert [r["global_batch_size"] for r in _jsonl(runs["tmp"] / "b")] == SIZES


def test_pipeline_engine_follows_the_ramp(runs):
    """DeepSpeed's pipeline engine changes its micro-batch count with the ramp (stopped at step 4
    of A's 6, so the schedule is A's)."""
    r = run_train(runs["cfg"], RAMP + ["train.exit_at_step=4", "train.trackers=[jsonl]", "parallel.pp=2",
                                       f"run_dir={runs['tmp'] / 'pp'}"], world=2)
    assert [x["global_batch_size"] for x in _jsonl(runs["tmp"] / "pp")] == SIZES[:4]
    assert r["losses"] == pytest.approx(runs["a"]["losses"][:4], rel=1e-5)


def test_finetune_follows_the_ramp_as_train(runs, data_cache, tmp_path):
    """finetune steps through the same ramp (train's code path): its logged global batches and
    consumed samples are those train logged for the same train.* settings (run A)."""
    import random
    import subprocess

    from tests.train_utils import ROOT, env, launch_cmd

    rng, words = random.Random(0), (["def", "return", "class"], ["while", "for", "yield"])
    with open(tmp_path / "task.jsonl", "w") as f:
        for i in range(40):
            f.write(json.dumps({"text": " ".join(rng.choice(words[i % 2]) for _ in range(4)), "label": i % 2}) + "\n")
    args = ["finetune", str(runs["cfg"]), "--pretrained", str(runs["tmp"] / "b" / "checkpoints"),
            "--data", str(tmp_path / "task.jsonl"), "--tokenizer", str(next(data_cache.rglob("tokenizer.model")))]
    args += [x for o in RAMP + ["train.seq_len=16", f"run_dir={tmp_path / 'ft'}"] for x in ("--set", o)]
    r = subprocess.run(launch_cmd("none", 1) + args, capture_output=True, text=True, env=env(), cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    steps = [line.split(" | ") for line in r.stdout.splitlines() if line.startswith("finetune step")]
    logged = [(int(s[3].split()[-1]), int(s[4].split()[-1])) for s in steps]
    trained = _jsonl(runs["tmp"] / "a")
    assert [b for b, _ in logged] == [x["global_batch_size"] for x in trained] == SIZES
    assert [n * 64 for _, n in logged] == [x["tokens"] for x in trained]  # train's 64-token rows, counted alike
    assert json.loads(r.stdout.strip().splitlines()[-1])["consumed_samples"] == sum(SIZES)


def _universal(run_dir: Path, step: int):
    return load_file(str(run_dir / "checkpoints" / tag_for(step) / "universal" / "pp00-tp00.safetensors"))


def test_load_weights_only_starts_at_step_zero_with_a_fresh_optimizer(runs):
    c = runs["c"]
    assert (c["start_step"], c["end_step"]) == (0, 1)
    assert "at step 0: fresh optimizer, LR schedule and data position" in c["stderr"]
    loaded, after = _universal(runs["tmp"] / "b", 2), _universal(runs["tmp"] / "c", 1)
    weights = [k for k in after if "::" not in k]
    assert weights and all(torch.equal(after[k], loaded[k]) for k in weights)  # LR 0: still the checkpoint's
    b1, b2 = 0.9, 0.95  # one Adam step from zero moments: m = (1-b1) g, v = (1-b2) g^2, so v = m^2 (1-b2)/(1-b1)^2

    def fresh(state, k):
        m, v = state[f"{k}::exp_avg"].double(), state[f"{k}::exp_avg_sq"].double()
        return torch.allclose(v, m * m * (1 - b2) / (1 - b1) ** 2, rtol=1e-4, atol=1e-20)

    assert all(fresh(after, k) for k in weights)
    assert not all(fresh(loaded, k) for k in weights)  # two steps of moments do not pass as fresh


def test_one_record_reaches_jsonl_csv_and_wandb(runs):
    run_dir = runs["tmp"] / "a"
    records, rows, history = _jsonl(run_dir), _csv(run_dir), wandb_history(run_dir)
    assert [r["step"] for r in records] == [int(r["step"]) for r in rows] == [h["_step"] for h in history] == \
        [1, 2, 3, 4, 5, 6]
    for rec, row, hist in zip(records, rows, history):
        for key in ("loss", "lr", "grad_norm", "skipped_steps", "global_batch_size", "tokens_per_s", "mfu",
                    "mem_bytes", "mem_predicted_bytes"):
            assert rec[key] is not None and float(row[key]) == rec[key] == hist[key], (key, rec, row, hist)
        assert rec["loss_scale"] is None and row["loss_scale"] == "" and "loss_scale" not in hist  # fp32: none
        empty = {k for k, v in rec.items() if v is None}   # loss_scale (fp32), mem_error (CPU: no allocator peak)
        assert {"loss_scale", "mem_error"} <= empty and all(row[k] == "" for k in empty)
        assert rec.keys() == {k for k, v in row.items() if v != ""} | empty
        assert {k for k, v in rec.items() if v is not None} - {"step"} <= set(hist)
    evals = [r for r in records if "eval_loss" in r]
    assert [r["step"] for r in evals] == [3, 6] and all(r["loss"] is not None for r in evals)  # in the step's record
    assert [h.get("eval_loss") for h in history] == [None, None, evals[0]["eval_loss"], None, None,
                                                     evals[1]["eval_loss"]]
    assert all(r["mem_predicted_bytes"] > 0 and r["mem_bytes"] > 0 for r in records)  # predicted beside measured
