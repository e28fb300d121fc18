"""DeepSpeed's universal checkpoint both ways: our checkpoints carry the ``universal_checkpoint_info``
DeepSpeed's ``ds_to_universal`` merges them by (checked against its own merge code for every
kind of parameter), and a directory it writes resumes here at another layout, with weights and
Adam moments equal to the ones saved and the loss of an uninterrupted run."""
import os
import shutil
import subprocess
import sys
from argparse import Namespace

import pytest
import torch

from megallama.checkpoint.ds_universal import DsUniversalReader, convert, open_ds_universal
from megallama.checkpoint.ds_universal_info import build_info
from megallama.config import ModelConfig
from megallama.errors import UserError
from megallama.parallel.layers import split_for_rank
from megallama.train.universal import MOMENTS, UniversalReader, _expected
from tests.train_utils import ROOT, env, run_train, tiny_run_config

STATES = {"fp32": None, "exp_avg": "exp_avg", "exp_avg_sq": "exp_avg_sq"}


def _merge_with_deepspeed(cfg: ModelConfig, tp: int, info, tmp, only=None):
    """Each parameter cut into TP shards as our layers hold them, written as ZeRO fragments, then
    merged by DeepSpeed's own ``merge_tp_slices``: ``(full tensors, merged, unused patterns)``."""
    from deepspeed.checkpoint.ds_to_universal import merge_tp_slices

    shapes, splits = _expected(cfg)
    gen = torch.Generator().manual_seed(0)
    full = {n: torch.randn(s, generator=gen) for n, s in shapes.items() if only in (None, n)}
    unused = None
    for name, t in full.items():
        s = splits[name]
        shards = [t if s["split_dim"] is None else
                  split_for_rank(t, s["split_dim"], s["fused_sizes"], tp, r, fused_heads=s["fused_heads"],
                                 pad_multiple=s.get("pad_multiple")) for r in range(tp)]
        for r, shard in enumerate(shards):
            (tmp / "slices" / name / str(r)).mkdir(parents=True)
            for i, state in enumerate(STATES):  # distinct (and exactly invertible) values per state
                torch.save((shard * 2 ** i).flatten().clone(), tmp / "slices" / name / str(r) / f"{state}.00")
        left = set(merge_tp_slices(info, str(tmp / "zero"), str(tmp / "slices"), tp,
                                   (name, [tuple(x.shape) for x in shards])))
        unused = left if unused is None else unused & left
    merged = {n: torch.load(tmp / "zero" / n / "fp32.pt", weights_only=False)["param"] for n in full}
    for n in full:
        assert torch.equal(torch.load(tmp / "zero" / n / "exp_avg.pt", weights_only=False)["param"], 2 * merged[n])
    shutil.rmtree(tmp)
    return full, merged, unused


@pytest.mark.parametrize("preset,overrides,tp", [
    ("tiny", {}, 2), ("tiny-gqa", {}, 4), ("tiny", {"vocab_size": 2049, "pad_vocab_to_multiple_of": 8}, 2),
    ("tiny", {"vocab_size": 2049, "pad_vocab_to_multiple_of": 8, "tie_embeddings": True}, 4)])
def test_info_lets_deepspeed_merge_every_kind_of_parameter(preset, overrides, tp, tmp_path):
    cfg = ModelConfig.preset(preset, n_layers=1, **overrides)
    shapes, splits = _expected(cfg)
    info = build_info([(n, splits[n], shapes[n]) for n in shapes], tp, {"model": cfg.model_dump()})
    full, merged, unused = _merge_with_deepspeed(cfg, tp, info, tmp_path / "a")
    assert not unused, unused  # ds_to_universal's strict check: every pattern used
    for name in full:
        assert torch.equal(merged[name], full[name]), name
    # the fused Q|K|V and W1|W3 layout is what the sub-parameter entries describe: without them
    # DeepSpeed joins the shards as one block, and the test sees it
    info["parameter_with_sub_params"] = []
    name = "layers.0.attention.wqkv.weight"
    full, merged, _ = _merge_with_deepspeed(cfg, tp, info, tmp_path / "b", only=name)
    assert not torch.equal(merged[name], full[name])


def test_heads_replicated_over_ranks_are_refused_by_name():
    from deepspeed.checkpoint.ds_to_universal import _validate_autotp_conversion_support

    cfg = ModelConfig.preset("tiny", n_kv_heads=1)
    shapes, splits = _expected(cfg)
    info = build_info([(n, splits[n], shapes[n]) for n in shapes], 2, {})
    with pytest.raises(ValueError, match="replicated over TP ranks") as err:
        _validate_autotp_conversion_support(info)
    assert "attention" in str(err.value) and len(info["autotp_unsupported_parameter_patterns"]) == 1


BASE = ["deepspeed.zero_optimization.stage=1", "train.steps=6", "checkpoint.every=3", "checkpoint.keep=2"]


@pytest.fixture(scope="module")
def universal(tmp_path_factory, data_cache):
    """TP=2 ZeRO-1 for 6 steps (saved at 3 and 6), and DeepSpeed's tool run on the step-3 save."""
    from deepspeed.checkpoint.ds_to_universal import main

    tmp = tmp_path_factory.mktemp("ds_universal")
    cfg = tiny_run_config(tmp, data_cache)
    losses = run_train(cfg, BASE + ["parallel.tp=2", f"run_dir={tmp / 'src'}"], world=2)["losses"]
    saved = tmp / "src" / "checkpoints" / "step00000003"
    main(Namespace(input_folder=str(saved), output_folder=str(tmp / "uni" / "step3"), num_extract_workers=1,
                   num_merge_workers=1, keep_temp_folder=False, strict=True, inject_missing_state=False))
    return cfg, tmp, saved, tmp / "uni" / "step3", losses


def _same_state(a, b, names):
    return [(n, k) for n in names for k in (None,) + MOMENTS if not torch.equal(a.full(n, k), b.full(n, k))]


def test_resume_from_deepspeed_universal_continues_exactly(universal):
    cfg, tmp, saved, uni, losses = universal
    ours, theirs = UniversalReader(saved / "universal"), DsUniversalReader(uni)
    assert sorted(theirs.names()) == sorted(ours.names())
    assert not _same_state(ours, theirs, ours.names())  # fp32 weights and both Adam moments, bit for bit
    assert (theirs.meta["step"], theirs.meta["consumed_samples"]) == (3, 24)
    got = run_train(cfg, BASE + ["deepspeed.zero_optimization.stage=2", f"checkpoint.load={uni}",
                                 f"run_dir={tmp / 'resumed'}"], world=2)  # TP=1 x DP=2, ZeRO-2
    assert got["start_step"] == 3 and "DeepSpeed universal checkpoint" in got["stderr"]
    assert len(got["losses"]) == 3
    for a, b in zip(got["losses"], losses[3:]):
        assert abs(a - b) < 2e-4 * b, (got["losses"], losses)


def test_convert_writes_our_training_checkpoint(universal, tmp_path):
    _, _, saved, uni, _ = universal
    proc = subprocess.run([sys.executable, "-m", "megallama", "convert", "--from", "ds-universal", "--input",
                           str(uni.parent), "--output", str(tmp_path / "out")],  # the dir its latest_universal names
                          capture_output=True, text=True, env=env(), cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    tag = tmp_path / "out" / "step00000003"
    ours, converted = UniversalReader(saved / "universal"), UniversalReader(tag / "universal")
    assert not _same_state(ours, converted, ours.names())
    from megallama.train import checkpoint as ckpt

    assert ckpt.verify(tag) is None and ckpt.read_meta(tag)["consumed_samples"] == 24
    cfg, lazy = open_ds_universal(uni)  # the --to hf path reads the weights lazily
    assert torch.equal(lazy["output.weight"].load(), ours.full("output.weight"))


def _broken_copy(uni, tmp_path, damage):
    bad = tmp_path / "bad"
    shutil.copytree(uni, bad)
    damage(bad)
    return bad


def test_bad_directories_are_one_line_and_leave_nothing(universal, tmp_path):
    _, _, _, uni, _ = universal
    marker = tmp_path / "ran"

    class Hostile:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    name = "layers.1.attention.wqkv.weight"
    cases = {
        "refusing to unpickle": lambda d: torch.save({"param": Hostile()}, d / "zero" / name / "fp32.pt"),
        "exp_avg_sq.pt: not found": lambda d: (d / "zero" / name / "exp_avg_sq.pt").unlink(),
        "expected a float tensor of shape (384, 128)":
            lambda d: torch.save({"param": torch.zeros(128, 384)}, d / "zero" / name / "exp_avg.pt"),
        "missing (parameter 'norm.weight'": lambda d: shutil.rmtree(d / "zero" / "norm.weight"),
        "no megallama run record": lambda d: torch.save({"step": 3}, d / "mp_rank_00_model_states.pt"),
    }
    for expected, damage in cases.items():
        bad = _broken_copy(uni, tmp_path, damage)
        with pytest.raises(UserError, match=None) as err:
            convert(bad, tmp_path / "out")
        assert expected in str(err.value) and "\n" not in str(err.value), str(err.value)
        assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.tmp-*"))
        shutil.rmtree(bad)
    assert not marker.exists()
    proc = subprocess.run([sys.executable, "-m", "megallama", "convert", "--from", "ds-universal", "--input",
                           str(tmp_path), "--output", str(tmp_path / "out")], capture_output=True, text=True,
                          env=env(), cwd=ROOT)
    assert proc.returncode == 2 and "not a DeepSpeed universal checkpoint" in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and not (tmp_path / "out").exists()
