"""The layout rule book (megallama/config/layout_rules.py): each rule accepts and refuses, in both
vocabularies; the SwiGLU width and the rank order are written once; and `validate`,
`profiling.Layout` and the planner refuse the same layouts, so their copies cannot drift."""
import pytest

from megallama.config import layout_rules as rules
from megallama.config.layout_rules import CONFIG, FLAGS, ModelShape
from megallama.config.swiglu import swiglu_hidden
from megallama.config.topology import ParallelDims
from megallama.errors import UserError

TINY = ModelShape(n_heads=4, n_kv_heads=4, vocab_size=2048, ffn_hidden_size=352, n_layers=4)
GQA = ModelShape(n_heads=8, n_kv_heads=2, vocab_size=2048, ffn_hidden_size=352, n_layers=4)
ENCDEC = ModelShape(n_heads=4, n_kv_heads=4, vocab_size=2048, ffn_hidden_size=352, n_layers=2,
                    arch="encoder_decoder")


def test_both_vocabularies_word_every_rule():
    assert set(CONFIG) == set(FLAGS)


def test_positive():
    assert rules.positive_problem("tp", 1) is None
    assert rules.positive_problem("tp", 0) == "parallel.tp: expected a positive integer, got 0"
    assert rules.positive_problem("grad_accum", -1, FLAGS) == "--grad-accum: expected a positive integer, got -1"


def test_tp_divides_every_split_dimension():
    assert rules.tp_problem(TINY, 4) is None
    assert rules.tp_problem(TINY, 3) == "model.n_heads: 4 is not divisible by parallel.tp=3"
    assert rules.tp_problem(GQA, 2) is None and rules.tp_problem(GQA, 8) is None  # 2 KV heads, 4 copies each
    odd_kv = ModelShape(n_heads=12, n_kv_heads=4, vocab_size=2048, ffn_hidden_size=352, n_layers=4)
    assert rules.tp_problem(odd_kv, 3, FLAGS) == "--tp 3: model n_kv_heads=4 is not divisible by tp"
    assert rules.tp_problem(odd_kv, 6) == ("model.n_kv_heads: 4 neither divides nor is divisible by parallel.tp=6 "
                                           "(fewer KV heads than ranks are each shared by an equal group of ranks)")
    assert rules.tp_problem(odd_kv, 6, FLAGS) == "--tp 6: model n_kv_heads=4 neither divides nor is divisible by tp"
    wide_vocab = ModelShape(n_heads=4, n_kv_heads=4, vocab_size=2049, ffn_hidden_size=352, n_layers=4)
    assert rules.tp_problem(wide_vocab, 2).startswith("model.vocab_size: 2049 is not divisible by parallel.tp=2 (set "
                                                      "model.pad_vocab_to_multiple_of")
    padded = ModelShape(n_heads=4, n_kv_heads=4, vocab_size=2050, ffn_hidden_size=352, n_layers=4,
                        pad_vocab_to_multiple_of=1)
    assert rules.tp_problem(padded, 4) is None
    assert [rules.padded_vocab(2050, tp, m) for tp, m in ((4, 1), (4, 128), (1, 128), (4, None))] == [
        2052, 2560, 2176, 2050]
    odd_ffn = ModelShape(n_heads=4, n_kv_heads=4, vocab_size=2048, ffn_hidden_size=350, n_layers=4)
    assert rules.tp_problem(odd_ffn, 4) == "model.ffn_hidden_size: 350 is not divisible by parallel.tp=4"


def test_kv_replicas_counts_the_ranks_sharing_a_head():
    assert [rules.kv_replicas(h, 8) for h in (16, 8, 4, 2, 1)] == [1, 1, 2, 4, 8]
    with pytest.raises(ValueError):
        rules.kv_replicas(4, 6)


def test_pp_gives_every_stage_a_layer_and_stages_only_the_decoder():
    assert rules.pp_problem(TINY, 4) is None and rules.pp_problem(ENCDEC, 1) is None
    assert rules.pp_problem(TINY, 3) is None  # uneven stages (pipeline_split)
    assert rules.pp_problem(TINY, 5) == "parallel.pp: 5 stages need at least one layer each, model.n_layers is 4"
    assert rules.pp_problem(TINY, 2, interleave=4, words=FLAGS) == \
        "--pp 2: model n_layers=4 is not divisible by pp x interleave 4"
    assert rules.pp_problem(ENCDEC, 2) == ("parallel.pp: pipeline parallelism supports arch 'decoder' only, got "
                                           "'encoder_decoder' (use pp: 1)")
    assert rules.pp_problem(ENCDEC, 2, words=FLAGS).startswith("--pp: pipeline parallelism supports decoder-only")


def test_sequence_parallel_needs_tp_and_a_divisible_sequence():
    assert rules.sp_problem(2, True, 256) is None and rules.sp_problem(1, False, 255) is None
    assert rules.sp_problem(1, True, 256).startswith("parallel.sequence_parallel: needs parallel.tp > 1")
    assert rules.sp_problem(1, True, 256, FLAGS) == "--sp: sequence parallelism needs --tp > 1"
    assert rules.sp_problem(2, True, 255) == ("train.seq_len: 255 is not divisible by parallel.tp=2 "
                                              "(required with sequence_parallel)")


def test_zero_rules():
    assert rules.pipeline_zero_problem(2, 1) is None and rules.pipeline_zero_problem(1, 3) is None
    assert "pipeline engine supports ZeRO stage 0 or 1, got 2 with parallel.pp=2" in rules.pipeline_zero_problem(2, 2)
    assert rules.pipeline_zero_problem(4, 3, FLAGS).startswith("--zero 3: DeepSpeed's pipeline engine")
    assert rules.offload_problem(1, True) is None and rules.offload_problem(0, False) is None
    assert rules.offload_problem(0, True) == "deepspeed.zero_optimization.offload_optimizer: needs ZeRO stage 1, 2 or 3"


def test_partition_activations():
    assert rules.partition_problem("decoder", 2, True, full_recompute=False, partition=True) is None
    assert rules.partition_problem("decoder", 2, False, full_recompute=True, partition=True) is None
    assert "sequence_parallel" in rules.partition_problem("decoder", 2, True, full_recompute=True, partition=True)
    assert "encoder_decoder" in rules.partition_problem("encoder_decoder", 1, False, full_recompute=True,
                                                        partition=True)


def test_positions():
    assert rules.positions_problem(512, 512) is None
    assert rules.positions_problem(513, 512) == "train.seq_len: 513 exceeds model.max_seq_len=512"
    assert rules.positions_problem(4096, 2048, FLAGS) == "--seq 4096: exceeds the model's 2048 learned positions"


def test_world():
    assert rules.world_problem(8, {"tp": 2, "pp": 2}) is None
    assert rules.world_problem(0, {"tp": 1, "pp": 1}) == "parallel: world size must be a positive integer, got 0"
    assert rules.world_problem(6, {"tp": 2, "pp": 2}) == "parallel: world size 6 is not a multiple of tp x pp = 2 x 2"
    assert rules.world_problem(8, {"tp": 3}, FLAGS) == "--tp 3 = 3 does not divide --gpus 8"
    assert rules.world_problem(16, {"tp": 2, "pp": 2, "dp": 2}, FLAGS) == "--tp 2 x --pp 2 x --dp 2 = 8, not --gpus 16"


def test_layout_problem_checks_zero_only_when_known():
    assert rules.layout_problem(TINY, 1, 2, zero=None) is None
    assert rules.layout_problem(TINY, 1, 2, zero=2) is not None
    assert rules.layout_problem(TINY, 2, 2, True, 256, zero=1) is None


def test_tp_shard():
    assert rules.tp_shard(352, 4, "out_features") == 88
    with pytest.raises(ValueError, match="out_features=352 is not divisible by tensor-parallel size 3"):
        rules.tp_shard(352, 3, "out_features")


# ---------------------------------------------------------------------- written once
@pytest.mark.parametrize("dim, multiple_of, mult, width", [
    (4096, 256, None, 11008), (8192, 4096, 1.3, 28672), (128, 32, None, 352)])
def test_swiglu_width_is_one_rule(dim, multiple_of, mult, width):
    from megallama.config import ModelConfig
    from megallama.profiling.arch import ArchFile

    assert swiglu_hidden(dim, multiple_of, mult) == width
    assert ModelConfig(dim=dim, n_heads=32, multiple_of=multiple_of, ffn_dim_multiplier=mult).ffn_hidden_size == width
    arch = ArchFile(arch_family="llama", dim=dim, n_layers=2, n_heads=32, vocab_size=32000, multiple_of=multiple_of,
                    ffn_dim_multiplier=mult)
    assert arch.to_spec("x").ffn_hidden == width


@pytest.mark.parametrize("tp, dp, pp", [(1, 1, 1), (2, 3, 2), (4, 2, 1), (1, 2, 3)])
def test_rank_order_is_tp_then_dp_then_pp(tp, dp, pp):
    dims = ParallelDims(tp=tp, pp=pp, dp=dp)
    for r in range(dims.world_size):
        t, d, p = dims.coords(r)
        assert r == p * dp * tp + d * tp + t == dims.rank(t, d, p)
    assert dims.groups("tp") == [[p * dp * tp + d * tp + t for t in range(tp)] for p in range(pp) for d in range(dp)]
    assert dims.groups("dp") == [[p * dp * tp + d * tp + t for d in range(dp)] for p in range(pp) for t in range(tp)]
    assert dims.groups("pp") == [[p * dp * tp + d * tp + t for p in range(pp)] for d in range(dp) for t in range(tp)]
    with pytest.raises(ValueError):
        dims.groups("ep")


def test_profiling_topology_and_parallel_state_read_the_same_order():
    from megallama.parallel.state import ParallelState
    from megallama.profiling.layout import Layout, group_ranks

    layout = Layout(tp=2, dp=3, pp=2)
    dims = ParallelDims(tp=2, pp=2, dp=3)
    for kind in ("tp", "dp", "pp"):
        assert group_ranks(layout, kind) == dims.group(0, kind)
    for r in range(12):
        s = ParallelState(tp=2, pp=2, dp=3, rank=r)
        assert (s.tp_rank, s.dp_rank, s.pp_rank) == dims.coords(r)


# ----------------------------------------------------------- the copies agree
AGREEMENT = [  # preset, tp, pp, dp, sp, seq, zero, offload, accepted
    ("tiny", 2, 1, 2, False, 256, 1, False, True),
    ("tiny", 4, 1, 1, False, 256, 1, False, True),
    ("tiny", 2, 2, 1, True, 256, 1, False, True),
    ("tiny", 3, 1, 1, False, 256, 1, False, False),
    ("tiny", 1, 5, 1, False, 256, 0, False, False),
    ("tiny", 1, 3, 1, False, 256, 0, False, True),   # 4 layers on 3 stages: uneven, accepted
    ("tiny", 1, 1, 2, True, 256, 1, False, False),
    ("tiny", 2, 1, 1, True, 255, 1, False, False),
    ("tiny", 1, 2, 2, False, 256, 2, False, False),
    ("tiny", 1, 1, 2, False, 256, 0, True, False),
    ("tiny", 1, 1, 2, False, 256, 1, True, True),
    ("tiny-gqa", 8, 1, 1, False, 256, 1, False, True),   # 4 KV heads, each on 2 of the 8 ranks
    ("tiny-gqa", 16, 1, 1, False, 256, 1, False, False),  # more ranks than query heads
    ("tiny-encdec", 1, 2, 1, False, 256, 0, False, False),
]


def _validate(tmp_path, preset, tp, pp, dp, sp, seq, zero, offload) -> bool:
    from megallama.cli import main

    path = tmp_path / "run.yaml"
    path.write_text(f"model: {preset}\nrun_dir: {tmp_path / 'run'}\n")
    sets = [f"parallel.tp={tp}", f"parallel.pp={pp}", f"parallel.sequence_parallel={str(sp).lower()}",
            f"train.seq_len={seq}", f"deepspeed.zero_optimization.stage={zero}"]
    if offload:
        sets.append("deepspeed.zero_optimization.offload_optimizer.device=cpu")
    return main(["validate", str(path), "--world-size", str(tp * pp * dp)]
                + [x for s in sets for x in ("--set", s)]) == 0


def _refusal(check):
    try:
        check()
    except UserError as exc:
        return str(exc)
    return None


@pytest.mark.parametrize("case", AGREEMENT, ids=lambda c: "-".join(map(str, c[:-1])))
def test_validate_layout_and_planner_refuse_the_same_layouts(case, tmp_path, capsys):
    from megallama.config import ModelConfig
    from megallama.profiling.arch import ArchSpec
    from megallama.profiling.hardware import load_hardware
    from megallama.profiling.layout import Layout
    from megallama.profiling.planner import plan

    preset, tp, pp, dp, sp, seq, zero, offload, accepted = case
    spec = ArchSpec.from_model_config(ModelConfig.preset(preset))
    layout = Layout(tp=tp, pp=pp, dp=dp, zero=zero, sp=sp, offload=offload, dtype="fp32")
    hw = load_hardware("a100-80gb")
    validated = _validate(tmp_path, preset, tp, pp, dp, sp, seq, zero, offload)
    by_layout = _refusal(lambda: layout.check(spec, seq))
    by_planner = _refusal(lambda: plan(spec, tp * pp * dp, hw, seq=seq, dtype="fp32", tp=tp, pp=pp, dp=dp,
                                       zero=zero, mbs=1, recompute="none", sp=sp, offload=offload))
    assert (validated, by_layout is None, by_planner is None) == (accepted,) * 3, capsys.readouterr().err
    assert by_layout == by_planner   # the same rule, in the same words
