"""Pipeline stages of any size: an uneven PP=3 run places blocks as ``RunConfig.stage_layers()``
says and reproduces the single-process run; its checkpoint resumes under another split and
reshards to even layouts with identical weights. Three runs in all (one single-process, two at
PP=3), shared by every check here."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megallama.checkpoint.reshard import consolidate_training_checkpoint, reshard
from megallama.config import load_run_config
from megallama.config.pipeline_split import stage_of_block
from megallama.train.checkpoint import tag_for
from megallama.train.pipeline import stage_of_parameters
from tests.layout_design import TOLERANCE, rel_diff
from tests.train_utils import ROOT, env, run_train, tiny_run_config

STEPS, SAVE_AT = 4, 2
PP3 = ["parallel.pp=3", "train.micro_batch_size=4"]  # two micro-batches in flight per step


def _run(cfg, extra, world, run_dir):
    report = run_train(cfg, extra + [f"run_dir={run_dir}"], world=world)
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return report, [r["grad_norm"] for r in records if "loss" in r]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, data_cache):
    tmp = tmp_path_factory.mktemp("uneven")
    cfg = tiny_run_config(tmp, data_cache, steps=STEPS, seq_len=32, global_batch_size=8)
    every = [f"checkpoint.every={SAVE_AT}"]
    ref = _run(cfg, every + ["train.micro_batch_size=8"], 1, tmp / "ref")
    # the default split (parameters, embedding and head counted) of tiny's 4 layers on 3 stages
    uneven = _run(cfg, every + PP3 + [f"train.exit_at_step={SAVE_AT}"], 3, tmp / "uneven")
    # the same degree, an explicit other split, continuing the uneven run's checkpoint
    explicit = _run(cfg, PP3 + ["parallel.pipeline_layers=[2,1,1]", f"checkpoint.every={STEPS}",
                                f"checkpoint.load={tmp / 'uneven' / 'checkpoints'}"], 3, tmp / "explicit")
    return cfg, tmp, ref, uneven, explicit


def _close(got, ref, what):
    (losses, norms), (ref_losses, ref_norms) = got, ref
    d = max(rel_diff(losses, ref_losses), rel_diff(norms, ref_norms))
    assert d <= TOLERANCE["fp32"], f"{what}: relative difference {d:.2e}; {losses} {norms} vs {ref_losses} {ref_norms}"


def test_uneven_stages_match_the_single_process_run(runs):
    _, _, (ref, ref_norms), (uneven, norms), _ = runs
    assert ref["losses"][-1] < ref["losses"][0]
    _close((uneven["losses"], norms), (ref["losses"][:SAVE_AT], ref_norms[:SAVE_AT]), "pp3 [1,2,1]")
    assert "pipeline stages hold 1/2/1 of 4 layers" in uneven["stderr"]


def test_an_explicit_split_resumes_the_uneven_checkpoint_and_matches(runs):
    """Another split at the same degree cannot take DeepSpeed's per-stage files: layout-free."""
    _, _, (ref, ref_norms), _, (explicit, norms) = runs
    assert explicit["start_step"] == SAVE_AT and "new layout: layout-free state" in explicit["stderr"]
    assert "pipeline stages hold 2/1x2 of 4 layers" in explicit["stderr"]
    _close((explicit["losses"], norms), (ref["losses"][SAVE_AT:], ref_norms[SAVE_AT:]), "pp3 [2,1,1] resumed")


def _held(universal: Path):
    """Stage -> the canonical names its files hold (TP rank 0)."""
    return {int(f.name[2:4]): set(json.loads(f.read_text())) for f in universal.glob("pp*-tp00.index.json")}


def _stage_names(cfg, split):
    return {s: {n for n, t in stage_of_parameters(cfg, split).items() if t == s} for s in range(len(split))}


def test_blocks_sit_where_the_split_rule_puts_them(runs):
    cfg_path, tmp, *_ = runs
    cfg = load_run_config(cfg_path)
    cfg.parallel.pp = 3
    split = cfg.stage_layers()
    assert split == [1, 2, 1]
    tag = tmp / "uneven" / "checkpoints" / tag_for(SAVE_AT)
    assert json.loads((tag / "meta.json").read_text())["stage_layers"] == split
    held = _held(tag / "universal")
    assert held == _stage_names(cfg.model, split)
    blocks = {s: sorted(int(n.split(".")[1]) for n in names if n.startswith("layers.")) for s, names in held.items()}
    assert [stage_of_block(split)[b] for s in blocks for b in blocks[s]] == [s for s in blocks for _ in blocks[s]]
    assert "tok_embeddings.weight" in held[0] and "output.weight" in held[2]
    explicit = _held(tmp / "explicit" / "checkpoints" / tag_for(STEPS) / "universal")
    assert explicit == _stage_names(cfg.model, [2, 1, 1])


def test_uneven_checkpoint_reshards_to_even_layouts_with_equal_weights(runs):
    _, tmp, *_ = runs
    src = tmp / "uneven" / "checkpoints"
    mcfg, weights = consolidate_training_checkpoint(src)
    _, ref_weights = consolidate_training_checkpoint(tmp / "ref" / "checkpoints" / tag_for(SAVE_AT))
    for name, w in weights.items():  # the same training, summed in another order
        torch.testing.assert_close(w, ref_weights[name], rtol=1e-4, atol=1e-6, msg=name)
    for pp, split in ((2, [2, 2]), (1, [4])):
        out = reshard(src, tmp / f"pp{pp}", tp=1, pp=pp)
        _, got = consolidate_training_checkpoint(out)
        assert got.keys() == weights.keys() and all(torch.equal(got[n], weights[n]) for n in weights)
        assert _held(out / tag_for(SAVE_AT) / "universal") == _stage_names(mcfg, split)


def test_a_bad_stage_list_stops_train_in_one_line(tmp_path, data_cache):
    cfg = tiny_run_config(tmp_path, data_cache)
    proc = subprocess.run([sys.executable, "-m", "megallama", "train", str(cfg), "--set", "parallel.pipeline_layers=[3,2]",
                           "--set", f"run_dir={tmp_path / 'run'}"], capture_output=True, text=True, env=env(), cwd=ROOT)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip() == "megallama train: error: parallel.pipeline_layers: lists 2 stages, expected parallel.pp=1"
    assert not (tmp_path / "run").exists()
