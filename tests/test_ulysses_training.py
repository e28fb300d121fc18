"""DeepSpeed-Ulysses through ``megallama train``: every layout's losses and grad norms are the
single process's (fp32, 3 steps), and a checkpoint written at Ulysses 2 resumes at Ulysses 1
(layout-free) on the uninterrupted run's trajectory.

Six runs in all, shared by every check: two single-process references (the plain tiny model;
tiny-gqa with one KV head and packed documents with restarted positions), U2 x DP2 at ZeRO-3 with
full recompute and documents across DP (saving a checkpoint; the KV head replicated over the
Ulysses ranks), U4 at ZeRO-1 (plain causal attention), TP2 x U2 with sequence parallelism at
ZeRO-2 with two micro-batches of uneven label counts (the KV head replicated over TP, then
Ulysses), and the resume (resuming layout-free state at other layouts, TP among them, is
tests/test_checkpoint_resume.py's and tests/test_reshard.py's). The parity checks can fail: without ``sum_zero3_sequence_grads``
the ZeRO-3 run's grad norms are half the reference's (seen by hand; losses alone would not show
it), and tests/test_ulysses_model.py catches a wrong RoPE shard offset. Three steps, as the layout
matrix takes: Adam turns fp32 rounding in near-zero gradients into whole updates, and by step 4
the plain tiny model's grad norm drifts ~1e-5 at U4 (and ~8e-6 at plain DP4) though the model's
float64 gradients at U4 match to 1e-15.
"""
import json
import subprocess
import sys

import pytest

from megallama.train.checkpoint import tag_for
from tests.layout_design import TOLERANCE, rel_diff
from tests.train_utils import ROOT, env, reference_runs, run_train, tiny_run_config

STEPS, SAVE_AT = 3, 1
GQA_DOCUMENTS = ["model.preset=tiny-gqa", "model.n_kv_heads=1", "data.document_mask=true",
                 "data.reset_position_ids=true"]
LAYOUTS = {  # name: (overrides, world, reference)
    "u2-dp2-z3-full-gqa-docs": (GQA_DOCUMENTS + [f"deepspeed={ROOT / 'ds_configs' / 'zero3.json'}",
                                                 "parallel.ulysses=2", "train.micro_batch_size=4",
                                                 "train.activation_checkpointing.mode=full",
                                                 f"checkpoint.every={SAVE_AT}"], 4, "ref-gqa"),
    "u4-z1": (["parallel.ulysses=4", "deepspeed.zero_optimization.stage=1"], 4, "ref"),
    "tp2-u2-sp-z2-acc2-gqa-docs": (GQA_DOCUMENTS + ["parallel.tp=2", "parallel.ulysses=2",
                                                    "parallel.sequence_parallel=true", "train.micro_batch_size=4",
                                                    "deepspeed.zero_optimization.stage=2"], 4, "ref-gqa"),
}
RESUMES = {"u1": ([], 1)}


def _run(cfg, extra, world, run_dir):
    report = run_train(cfg, ["train.micro_batch_size=8"] + extra + [f"run_dir={run_dir}"], world=world)
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    report["grad_norms"] = [r["grad_norm"] for r in records if "loss" in r]
    return report


@pytest.fixture(scope="module")
def runs(tmp_path_factory, data_cache):
    tmp = tmp_path_factory.mktemp("ulysses")
    cfg = tiny_run_config(tmp, data_cache, steps=STEPS, seq_len=32, global_batch_size=8)
    refs = {"ref": [], "ref-gqa": GQA_DOCUMENTS}  # trained together (shared with other files' like runs)
    out = dict(zip(refs, reference_runs([(cfg, ["train.micro_batch_size=8"] + extra + [f"run_dir={tmp / name}"])
                                         for name, extra in refs.items()])))
    for name, (extra, world, _) in LAYOUTS.items():
        out[name] = _run(cfg, extra, world, tmp / name)
    saved = tmp / "u2-dp2-z3-full-gqa-docs" / "checkpoints" / tag_for(SAVE_AT)
    for name, (extra, world) in RESUMES.items():
        out["resume-" + name] = _run(cfg, GQA_DOCUMENTS + extra + [f"checkpoint.load={saved}"], world,
                                     tmp / ("resume-" + name))
    out["saved"] = saved
    return out


def _close(got, ref, what, first=0):
    d = max(rel_diff(got["losses"], ref["losses"][first:]), rel_diff(got["grad_norms"], ref["grad_norms"][first:]))
    assert d <= TOLERANCE["fp32"], (f"{what}: relative difference {d:.2e}; {got['losses']} {got['grad_norms']} vs "
                                    f"{ref['losses'][first:]} {ref['grad_norms'][first:]}")


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_ulysses_matches_the_single_process_run(runs, name):
    got, ref = runs[name], runs[LAYOUTS[name][2]]
    assert len(ref["losses"]) == STEPS and ref["losses"][-1] < ref["losses"][0]
    _close(got, ref, name)
    degree = int(next(o for o in LAYOUTS[name][0] if o.startswith("parallel.ulysses="))[-1])
    assert got["ulysses"] == degree and f" ulysses={degree} " in got["stderr"]


@pytest.mark.parametrize("name", list(RESUMES))
def test_a_ulysses_checkpoint_resumes_at_another_layout(runs, name):
    got = runs["resume-" + name]
    meta = json.loads((runs["saved"] / "meta.json").read_text())
    assert (meta["ulysses"], meta["dp"], meta["zero"]) == (2, 2, 3)
    assert got["start_step"] == SAVE_AT and got["ulysses"] == 1
    assert "new layout: layout-free state" in got["stderr"]
    _close(got, runs["ref-gqa"], f"U2 checkpoint resumed at {name}", first=SAVE_AT)


@pytest.mark.parametrize("overrides,message", [
    (["parallel.ulysses=2", "parallel.pp=2"],
     "parallel.ulysses: not combined with pipeline parallelism (parallel.pp=2); set one of them to 1"),
    (["parallel.ulysses=2", "train.seq_len=33"],
     "train.seq_len: 33 is not divisible by parallel.ulysses=2 (each rank holds an equal shard)"),
    (["parallel.ulysses=8"], "model.n_heads: 4 over parallel.tp=1 leaves 4 per rank, not divisible by "
                             "parallel.ulysses=8"),
], ids=["pipeline", "seq", "heads"])
def test_validate_refuses_a_bad_ulysses_layout_in_one_line(overrides, message, tmp_path, data_cache):
    cfg = tiny_run_config(tmp_path, data_cache)
    args = [x for o in overrides + [f"run_dir={tmp_path / 'run'}"] for x in ("--set", o)]
    proc = subprocess.run([sys.executable, "-m", "megallama", "validate", str(cfg), "--world-size", "8"] + args,
                          capture_output=True, text=True, env=env(), cwd=ROOT, timeout=60)
    assert proc.returncode == 2 and proc.stderr.strip() == f"megallama validate: error: {message}", proc.stderr
    assert not (tmp_path / "run").exists()
