"""The cost model's pipeline stages of any size, and Llama 3 (128k vocabulary, tied embeddings,
fewer KV heads than TP ranks): per-stage blocks from the one split rule, the worst stage's
memory, the slowest stage's time."""
import json
from dataclasses import replace

import pytest

from megallama.config import ModelConfig
from megallama.config.pipeline_split import stage_layers
from megallama.profiling import layout as layout_mod
from megallama.profiling.arch import as_spec, load_arch_file
from megallama.profiling.comm import collectives
from megallama.profiling.flops import layer_params, parameter_count, stage_weights
from megallama.profiling.hardware import load_hardware
from megallama.profiling.layout import Layout
from megallama.profiling.memory import layer_params_per_rank, memory_breakdown, stage_params
from megallama.profiling.planner import plan
from megallama.profiling.steptime import predict

H100 = load_hardware("h100-sxm")
L405 = Layout(tp=8, pp=16, dp=8, zero=1, mbs=1, grad_accum=16, recompute="full", sp=True)


@pytest.mark.parametrize("preset, pp", [("llama3-405b", 16), ("tiny", 3), ("llama3.2-1b", 3), ("llama-7b", 4),
                                        ("llama3-70b", 7)])
def test_the_cost_model_splits_as_training_does(preset, pp):
    """One rule: the ArchSpec's own parameter counting gives ModelConfig's weights, so the split too."""
    cfg = ModelConfig.preset(preset)
    assert stage_weights(as_spec(preset)) == cfg.pipeline_weights()
    expected = stage_layers(cfg.n_layers, pp, "parameters", None, cfg.pipeline_weights())
    assert Layout(pp=pp).stage_layers(as_spec(preset)) == expected


def test_llama3_405b_on_16_stages_is_7_8x14_7_and_the_middle_stage_is_the_worst():
    spec = as_spec("llama3-405b")
    assert L405.stage_layers(spec) == [7] + [8] * 14 + [7]
    # a middle stage holds one block more than the ends and, under 1F1B, nearly as many micro-batches
    mem = memory_breakdown(spec, L405, 8192)
    assert mem.stage == 1
    block = layer_params_per_rank(spec, 8, "decoder")
    assert stage_params(spec, 8, 16, 1) - stage_params(spec, 8, 16, 0) == pytest.approx(block - 128256 * 16384 / 8)


@pytest.mark.parametrize("preset, layout", [
    ("llama3-405b", L405),
    ("llama3-405b", L405.with_(zero=3, recompute="selective", pipeline_layers=(9,) + (8,) * 13 + (7, 6))),
    ("tiny", Layout(pp=3, dp=2, zero=2, grad_accum=5)),
    ("llama-7b", Layout(tp=2, pp=4, dp=2, grad_accum=8, pipeline_layers=(5, 9, 9, 9))),
])
def test_the_stages_standing_for_others_give_what_every_stage_would(preset, layout, monkeypatch):
    """Memory and time are evaluated on one stage per distinct block count (``stage_groups``);
    evaluating every stage must give the same worst stage, peak and step time."""
    spec, seq = as_spec(preset), min(2048, as_spec(preset).max_seq_len)
    grouped = predict(spec, layout, seq, H100)
    assert sum(layout.stage_groups(spec).values()) == layout.pp
    monkeypatch.setattr(Layout, "stage_groups", lambda self, spec: {s: 1 for s in range(self.pp)})
    every = predict(spec, layout, seq, H100)
    assert grouped.memory.total == every.memory.total and grouped.memory.stage == every.memory.stage
    assert grouped.step_time_s == pytest.approx(every.step_time_s, rel=1e-12)
    assert grouped.slowest_stage == every.slowest_stage


def test_the_slowest_stage_sets_the_pipeline_and_the_worst_stage_the_memory():
    spec = as_spec("llama-7b")
    even = Layout(tp=1, pp=4, dp=1, grad_accum=32)
    assert even.stage_layers(spec) == [8, 8, 8, 8]
    explicit_even = predict(spec, even.with_(pipeline_layers=(8, 8, 8, 8)), 2048, H100)
    base = predict(spec, even, 2048, H100)
    assert explicit_even.step_time_s == base.step_time_s and explicit_even.memory.total == base.memory.total
    skew = predict(spec, even.with_(pipeline_layers=(5, 9, 9, 9)), 2048, H100)
    assert skew.slowest_stage == 3 and base.slowest_stage == 3          # the head rides on the last stage
    # steady state: m micro-batches of the slowest stage, which now holds 9 blocks instead of 8
    assert skew.time["compute"] / base.time["compute"] == pytest.approx(9 / 8, rel=0.03)
    assert skew.step_time_s > base.step_time_s
    heavy_first = predict(spec, even.with_(pipeline_layers=(11, 7, 7, 7)), 2048, H100)
    assert heavy_first.memory.stage == 0 and heavy_first.memory.total > base.memory.total


def test_the_planner_tries_stage_counts_that_do_not_divide_the_layers():
    spec = as_spec("llama3-405b")
    assert 126 % 16
    pinned = plan(spec, 1024, H100, seq=8192, batch_tokens=2 ** 24, tp=8, pp=16, zero=1, mbs=1,
                  recompute="full", sp=True)
    assert pinned.best.stage_layers == [7] + [8] * 14 + [7]
    assert pinned.best.as_dict()["pipeline_split"] == "7/8x14/7"
    free = plan(spec, 1024, H100, seq=8192, batch_tokens=2 ** 24, tp=8, zero=1, mbs=1, recompute="full", sp=True)
    assert {c.layout.pp for c in free.candidates} >= {16, 32}     # neither divides 126
    given = plan(spec, 1024, H100, seq=8192, batch_tokens=2 ** 24, tp=8, zero=1, mbs=1, recompute="full", sp=True,
                 pipeline_layers=[8] * 15 + [6])
    assert given.best.layout.pp == 16 and given.best.stage_layers == [8] * 15 + [6]


@pytest.mark.parametrize("args, needle", [
    (["estimate", "--model", "tiny", "--pp", "3", "--pipeline-layers", "2,1"],
     "--pipeline-layers: lists 2 stages, expected parallel.pp=3"),
    (["estimate", "--model", "tiny", "--pp", "2", "--pipeline-layers", "2,1"],
     "--pipeline-layers: adds up to 3 layers, expected model.n_layers=4"),
    (["estimate", "--model", "tiny", "--pipeline-layers", "2,x"], "--pipeline-layers: expected comma-separated"),
    (["estimate", "--model", "tiny", "--pipeline-layers", "4,0"], "every stage needs at least one layer"),
    (["plan", "--model", "tiny", "--gpus", "2", "--gpu", "h100", "--pipeline-layers", "3,3"],
     "--pipeline-layers: adds up to 6 layers"),
])
def test_bad_pipeline_layer_lists_are_one_line(args, needle, capsys):
    from megallama.cli import main

    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0], err


def test_estimate_and_plan_print_the_split_and_the_worst_stage(capsys):
    from megallama.cli import main

    assert main(["estimate", "--model", "llama3-405b", "--tp", "8", "--pp", "16", "--dp", "8", "--zero", "1",
                 "--seq", "8192", "--recompute", "full", "--sp", "--gpu", "h100-sxm", "--grad-accum", "16"]) == 0
    out = capsys.readouterr().out
    assert "16 stages of 7/8x14/7 layers; the most memory on stage 1" in out
    assert "stage 1 (8 layers, micro-batches in flight: 15, like 13 more)" in out
    assert main(["estimate", "--model", "tiny", "--pp", "3", "--pipeline-layers", "1,2,1", "--json"]) == 0
    est = json.loads(capsys.readouterr().out)
    assert est["pipeline_layers"] == [1, 2, 1] and est["layout"]["pipeline_layers"] == [1, 2, 1]
    assert str(est["worst_memory_stage"]) == max(est["stages"], key=lambda s: est["stages"][s]["total_bytes"])
    assert [est["stages"][s]["layers"] for s in ("0", "1", "2")] == [1, 2, 1]
    assert main(["plan", "--model", "llama3-405b", "--gpus", "1024", "--gpu", "h100-sxm", "--seq", "8192",
                 "--tp", "8", "--pp", "16", "--global-batch-tokens", str(2 ** 24), "--top", "2"]) == 0
    out = capsys.readouterr().out
    assert "7/8x14/7" in out and "best pipeline: 16 stages of 7/8x14/7 layers" in out


# ------------------------------------------------------------------------------------ Llama 3
@pytest.mark.parametrize("preset, params", [   # Meta's and Hugging Face's parameter counts
    ("llama3-8b", 8_030_261_248), ("llama3-70b", 70_553_706_496), ("llama3.2-1b", 1_235_814_400),
    ("llama3.2-3b", 3_212_749_824)])
def test_llama3_parameter_counts(preset, params):
    assert parameter_count(preset) == params


def test_a_tied_embedding_is_one_weight_and_its_grad_crosses_the_pipeline():
    tied, untied = as_spec("llama3.2-1b"), replace(as_spec("llama3.2-1b"), tied_embeddings=False)
    assert tied.tied_embeddings
    v, d = tied.vocab_size, tied.dim
    assert parameter_count(untied) - parameter_count(tied) == v * d
    assert stage_params(untied, 2, 1, 0) - stage_params(tied, 2, 1, 0) == v * d / 2     # counted once at pp 1
    assert stage_params(tied, 2, 2, 1) == stage_params(untied, 2, 2, 1)                 # the last stage's copy
    lay = Layout(tp=2, pp=2, dp=1, grad_accum=4)
    for stage in (0, 1):
        emb = [c for c in collectives(tied, lay, 256, stage) if c.group == "embedding"]
        assert len(emb) == 1 and emb[0].payload_bytes == v * d / 2 * 2 and emb[0].calls == 1
        assert not [c for c in collectives(untied, lay, 256, stage) if c.group == "embedding"]
    assert not [c for c in collectives(tied, lay.with_(pp=1), 256, 0) if c.group == "embedding"]


def test_fewer_kv_heads_than_tp_ranks_replicate_one_head_per_rank():
    spec = as_spec("llama3-405b")           # 8 KV heads of 128
    d, f, hd = spec.dim, spec.ffn_hidden, spec.head_dim
    norms = 2 * spec.norm_params
    for tp, kv_per_rank in ((8, 1), (16, 1), (4, 2)):
        expected = (2 * d * d + 3 * d * f) / tp + 2 * d * hd * kv_per_rank + norms
        assert layer_params_per_rank(spec, tp, "decoder") == pytest.approx(expected)
    assert spec.tp_view(8) is spec and spec.tp_view(16).kv_heads == 16
    assert layer_params(spec) == layer_params(spec.tp_view(4))
    from megallama.profiling.activations import layer_saved_tensors

    k = {t.name: t for t in layer_saved_tensors(spec, 1024, 1, 16)}["attn.k_rope"]
    assert k.numel == 1024 * hd                 # one whole head per rank, not half of one
    lay = Layout(tp=16, pp=1, dp=1)
    kv = {c.op: c for c in collectives(spec, lay, 1024, 0) if c.group == "kv"}  # per block and micro-batch
    assert set(kv) == {"broadcast", "reduce"} and kv["reduce"].members == 2
    assert kv["reduce"].payload_bytes == 2 * hd * d * 2 and kv["reduce"].calls == 126 * lay.grad_accum
    assert not [c for c in collectives(spec, lay.with_(tp=8), 1024, 0) if c.group == "kv"]
    # per rank the same states and FLOPs as a 16-KV-head model; but fewer of them are model FLOPs, and
    # the copies' gradients are summed
    replicated, sharded = predict(spec, lay, 1024, H100), predict(spec.with_(kv_heads=16), lay, 1024, H100)
    assert replicated.memory.total == pytest.approx(sharded.memory.total)
    assert replicated.step_time_s > sharded.step_time_s and replicated.mfu < sharded.mfu


def test_the_split_is_cached_but_not_shared():
    spec = as_spec("tiny")
    a = layout_mod.split(spec, 3)
    a.append(99)
    assert layout_mod.split(spec, 3) == [1, 2, 1]


def test_estimate_costs_a_run_config_with_its_own_split(tmp_path, capsys):
    from megallama.cli import main

    path = tmp_path / "run.yaml"
    path.write_text(f"model: tiny\nrun_dir: {tmp_path / 'run'}\nparallel: {{pp: 3, pipeline_layers: [2, 1, 1]}}\n")
    assert main(["estimate", "--config", str(path), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["pipeline_layers"] == [2, 1, 1]
    assert main(["estimate", "--config", str(path), "--pp", "2", "--json"]) == 0   # another pp: the rule's split
    assert json.loads(capsys.readouterr().out)["pipeline_layers"] == [2, 2]


def _reference_balanced_split(n_layers, pp, w):
    """The first version of ``balanced_split``: every candidate bound listed and bisected."""
    extras = [w.first if i == 0 else 0.0 for i in range(pp)]
    extras[-1] += w.last

    def caps(bound):
        return [int((bound - e) // w.block + 1e-9) for e in extras]

    candidates = sorted({c * w.block + e for e in set(extras) for c in range(1, n_layers + 1)})
    lo, hi = 0, len(candidates) - 1
    while lo < hi:
        mid = (lo + hi) // 2
        cap = caps(candidates[mid])
        if min(cap) >= 1 and sum(cap) >= n_layers:
            hi = mid
        else:
            lo = mid + 1
    counts = caps(candidates[lo])
    surplus = sum(counts) - n_layers
    while surplus > 0:
        order = sorted((i for i in range(pp) if counts[i] > 1),
                       key=lambda i: (-(counts[i] * w.block + extras[i]), -min(i, pp - 1 - i), i))
        counts[order[0]] -= 1
        surplus -= 1
    return counts


def test_the_split_bisects_per_stage_extra_as_the_listed_candidates_did():
    """Same answers as listing every candidate bound, without a list as long as the model."""
    import random
    import time

    from megallama.config.pipeline_split import StageWeights, balanced_split

    rng = random.Random(15)
    for _ in range(400):
        n = rng.randint(1, 60)
        pp = rng.randint(1, n)
        w = StageWeights(block=rng.choice([1.0, 3.0, rng.uniform(0.1, 5)]), first=rng.choice([0.0, rng.uniform(0, 12)]),
                         last=rng.choice([0.0, rng.uniform(0, 12)]))
        assert balanced_split(n, pp, w) == _reference_balanced_split(n, pp, w), (n, pp, w)
    start = time.perf_counter()
    assert balanced_split(10 ** 9, 2, StageWeights(block=1.0, first=0.5, last=0.5)) == [5 * 10 ** 8] * 2
    assert time.perf_counter() - start < 1.0


def test_a_padded_vocabulary_is_costed_as_the_trainer_pads_it():
    from megallama.profiling.arch import ArchSpec
    from megallama.profiling.memory import params_per_rank

    odd = ModelConfig.preset("tiny", vocab_size=2049)
    with pytest.raises(Exception, match="pad_vocab_to_multiple_of"):
        Layout(tp=2, pp=1, dp=1).check(ArchSpec.from_model_config(odd), 64)
    spec = ArchSpec.from_model_config(ModelConfig.preset("tiny", vocab_size=2049, pad_vocab_to_multiple_of=8))
    Layout(tp=2, pp=1, dp=1).check(spec, 64)                   # 2049 rows padded to 2064 over 2 ranks
    assert spec.tp_view(2).vocab_size == 2064 and spec.tp_view(1).vocab_size == 2056
    unpadded = spec.with_(pad_vocab_to_multiple_of=None, vocab_size=2064)
    assert params_per_rank(spec, 2, 1) == params_per_rank(unpadded, 2, 1)


# --------------------------------------------------------------- embeddings counted as layers
# BLOOM-176B (bigscience-workshop/bigscience, train/tr11-176B-ml/README.md, "Architecture"):
# 70 layers, hidden 14336, 112 heads, 250k vocabulary, TP 4 x PP 12 x DP 8 on 384 A100-80GB
BLOOM = ("arch_family: gpt\nname: bloom-176b\ndim: 14336\nn_layers: 70\nn_heads: 112\n"
         "vocab_size: 250880\nmax_seq_len: 2048\n")


def _main(capsys, *argv):
    from megallama.cli import main

    rc = main(list(argv))
    return rc, capsys.readouterr().out


def test_bloom_splits_5_6x10_5_with_the_embedding_and_head_counted(tmp_path, capsys):
    path = tmp_path / "bloom.yaml"
    path.write_text(BLOOM)
    spec = load_arch_file(path)
    assert Layout(pp=12, pipeline_partition="embeddings").stage_layers(spec) == [5] + [6] * 10 + [5]
    # Llama 3 8B's 128k vocabulary weighs more than a block: balancing parameters splits otherwise
    llama3 = as_spec("llama3-8b")
    assert Layout(pp=4).stage_layers(llama3) == [7, 9, 9, 7]
    assert Layout(pp=4, pipeline_partition="embeddings").stage_layers(llama3) == [8, 8, 8, 8]
    rc, out = _main(capsys, "estimate", "--model", "llama3-8b", "--pp", "4", "--pipeline-partition", "embeddings")
    assert rc == 0 and "pipeline: 4 stages of 8x4 layers" in out
    rc, out = _main(capsys, "plan", "--config", str(path), "--gpus", "384", "--gpu", "a100-80gb", "--tp", "4",
                   "--pp", "12", "--zero", "1", "--mbs", "2", "--recompute", "full",
                   "--pipeline-partition", "embeddings", "--global-batch-tokens", str(2048 * 2048))
    assert rc == 0 and "best pipeline: 12 stages of 5/6x10/5 layers" in out
    assert "costed only" not in out   # the trainer takes parallel.pipeline_partition: embeddings too


@pytest.mark.parametrize("n_layers, pp", [(70, 12), (126, 16), (30, 4), (31, 4), (24, 5), (9, 8)])
def test_embeddings_partition_is_as_balanced_as_deepspeeds_type_regex(n_layers, pp):
    """DeepSpeed's ``type:`` partition balances binary weights (blocks and the two embeddings) with
    ``partition_balanced``; ours must reach the same heaviest stage."""
    from deepspeed.runtime.utils import partition_balanced

    bounds = partition_balanced([1] * (n_layers + 2), pp)
    theirs = max(b - a for a, b in zip(bounds, bounds[1:]))
    counts = stage_layers(n_layers, pp, "embeddings")
    loads = [c + (i == 0) + (i == pp - 1) for i, c in enumerate(counts)]
    assert sum(counts) == n_layers and min(counts) >= 1 and max(loads) == theirs
