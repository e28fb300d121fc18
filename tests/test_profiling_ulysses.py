"""Ulysses and ring attention in the cost model: activations, all-to-all and ring bytes, ZeRO over
DP x Ulysses, the planner's choice, the published long-sequence figures (pure arithmetic)."""
from types import SimpleNamespace

import pytest

from megallama.config.topology import ParallelDims
from megallama.errors import UserError
from megallama.profiling import activations as act
from megallama.profiling import published as pub
from megallama.profiling.arch import ArchSpec, as_spec
from megallama.profiling.comm import collective_bytes_per_step, collective_time, collectives
from megallama.profiling.compare import layout_of
from megallama.profiling.hardware import load_hardware
from megallama.profiling.layout import Layout
from megallama.profiling.memory import memory_breakdown, model_state_bytes
from megallama.profiling.planner import plan
from megallama.profiling.sequence_comm import ring_exposed
from megallama.profiling.steptime import predict

H100 = load_hardware("h100")
GQA = ArchSpec(name="t", family="llama", arch="decoder", dim=64, n_layers=4, n_encoder_layers=0, n_heads=8,
               kv_heads=2, ffn_hidden=160, vocab_size=256, max_seq_len=4096)
FUSED = act.ActivationImpl()


def test_ulysses_saved_tensors_by_hand():
    """u=4, t=1, bf16, fused norms, flash: every tensor written out from the trainer's shapes."""
    s, b, u, p, h, hd, f = 64, 2, 4, 2, 64, 8, 160
    n = s * b // u                       # this rank's tokens
    kv = u * hd                          # 2 KV heads repeated to 4, one per rank, whole sequence
    expected = (n * h * p + n * 4        # attention norm input + fp32 rstd
                + n * h * p              # QKV input
                + n * hd * p             # gathered cos, sin rows at the shard's positions
                + s * b * (h + 2 * kv) // u * p   # all-to-all output: q, k, v of 2 heads, whole sequence
                + s * b * h // u * p + s * b * 8 // u * 4   # SDPA output, logsumexp of 2 heads
                + n * h * p              # Wo input (the second all-to-all's output)
                + n * h * p + n * 4 + n * h * p      # MLP norm input, rstd, MLP input
                + 2 * n * f * p + n * f * p + n * f * p)   # W1|W3 output, SiLU output, W2 input
    assert act.activation_bytes_per_layer(GQA, s, b, ulysses=u) == expected


def test_activations_fall_about_one_over_the_degree():
    spec = as_spec("llama3-8b")
    one = act.activation_bytes_per_layer(spec, 32768, 1)
    for u in (2, 4, 8):
        got = act.activation_bytes_per_layer(spec, 32768, 1, ulysses=u)
        assert 0.9 * one / u < got < 1.1 * one / u   # ~1/u: the core keeps other copies, not more
        assert act.activation_bytes_per_layer(spec, 32768, 1, recompute="full", ulysses=u) == pytest.approx(
            act.activation_bytes_per_layer(spec, 32768, 1, recompute="full") / u)
        mlp = [x.bytes for x in act.layer_saved_tensors(spec, 32768, 1, ulysses=u) if x.name.startswith("mlp")]
        assert sum(mlp) * u == sum(x.bytes for x in act.layer_saved_tensors(spec, 32768, 1) if x.name.startswith("mlp"))


def test_selective_working_set_is_the_dropped_core_tensors():
    full = act.activation_bytes_per_layer(GQA, 64, 2, ulysses=2)
    kept = act.activation_bytes_per_layer(GQA, 64, 2, recompute="selective", ulysses=2)
    assert full - kept == 64 * 2 * 64 // 2 * 2 + 64 * 2 * 8 // 2 * 4     # SDPA output + logsumexp
    assert act.recompute_working_bytes(GQA, 64, 2, recompute="selective", ulysses=2) == full - kept


def test_context_parallel_activations_are_the_plain_list_at_a_chunk():
    spec = as_spec("llama3-70b")
    assert act.activation_bytes_per_layer(spec, 131072, 1, tp=8, sp=True, cp=16) == pytest.approx(
        act.activation_bytes_per_layer(spec, 131072 // 16, 1, tp=8, sp=True))


def test_all_to_all_bytes_per_step():
    lay = Layout(ulysses=4, dp=2, zero=1, mbs=2, grad_accum=3, dtype="bf16")
    s, b, u, hd = 64, 2, 4, 8
    qkv = s * b // u * (64 + 2 * u * hd) * 2       # KV heads repeated to u before the exchange
    out = s * b // u * 64 * 2
    row = collective_bytes_per_step(GQA, lay, s)["ulysses"]
    calls = 3 * GQA.n_layers * 2                   # per micro-batch and block: forward and backward
    assert row["payload_bytes"] == calls * (qkv + out) + 2 * 3 * 4       # + the loss' two fp32 scalars
    assert row["wire_bytes"] == pytest.approx((u - 1) / u * (calls * (qkv + out) + 2 * 2 * 3 * 4))   # all-reduce: 2x
    full = collective_bytes_per_step(GQA, lay.with_(recompute="full"), s)["ulysses"]
    assert full["calls"] == 3 * GQA.n_layers * 2 * 3 + 2 * 3          # the recompute repeats the forward's


def test_ulysses_spanning_nodes_is_costed_on_the_nic():
    spec = as_spec("llama3-8b")
    inside = Layout(ulysses=8, gpus_per_node=8)
    across = Layout(ulysses=8, gpus_per_node=2)
    a2a = [c for c in collectives(spec, inside, 32768) if c.op == "all_to_all"][0]
    t_in, t_out = collective_time(a2a, inside, H100), collective_time(a2a, across, H100)
    wire = a2a.payload_bytes * a2a.calls * 6 / 8 / (H100.inter_node_bandwidth * 0.8)   # 6 of 8 peers off-node
    assert t_out == pytest.approx(wire + a2a.calls * 7 * H100.inter_node_latency_s)
    assert t_out > 5 * t_in


def test_zero_partitions_over_dp_times_ulysses():
    spec = as_spec("llama3-8b")
    lay = Layout(ulysses=4, dp=2, zero=3)
    mem = memory_breakdown(spec, lay, 8192)
    assert mem.components["params"] == model_state_bytes(spec, dp=8, zero=3)["params"]
    dp = {c.what: c for c in collectives(spec, lay, 8192) if c.group == "dp"}
    assert dp and all(collective_bytes_per_step(spec, lay, 8192)["dp"]["wire_bytes"] > 0 for _ in dp)
    assert Layout(ulysses=8, zero=1).traits.dp == 8      # gradients still reduced over the Ulysses ranks


def test_layout_of_passes_the_runs_ulysses():
    cfg = SimpleNamespace(train=SimpleNamespace(micro_batch_size=1, batch_layout=lambda dp: SimpleNamespace(accum=2),
                                                activation_checkpointing=SimpleNamespace(mode="none")),
                          stage_layers=lambda: [4])
    lay = layout_of(cfg, ParallelDims(tp=2, dp=2, ulysses=2), {"zero_optimization": {"stage": 2}, "bf16": {"enabled": True}})
    assert (lay.ulysses, lay.zero_dp, lay.world) == (2, 4, 8)


def test_planner_proposes_ulysses_only_for_long_sequences():
    spec = as_spec("llama3-8b")
    assert plan(spec, 8, H100, seq=131072).best.layout.ulysses > 1
    assert plan(spec, 8, H100, seq=4096).best.layout.ulysses == 1


def test_ring_attention_hides_behind_the_core():
    assert ring_exposed(1.0, 3.0) == 0.0 and ring_exposed(3.0, 1.0) == 2.0
    spec = as_spec("llama3-8b")
    base = Layout(cp=8, zero=1, recompute="full")
    short = predict(spec, base, 8192, H100)
    slow_net = predict(spec, base.with_(gpus_per_node=1), 8192, H100)   # every ring step on a NIC
    assert slow_net.time["tp_and_pp_comm"] > short.time["tp_and_pp_comm"] == 0.0


@pytest.mark.parametrize("kw, seq, words", [
    (dict(ulysses=3), 4096, "--ulysses 3: model n_heads=32"),
    (dict(ulysses=8), 4100, "--seq 4100: not divisible by ulysses=8"),
    (dict(cp=2, ulysses=2), 4096, "--cp: not combined with --ulysses"),
    (dict(cp=3), 4096, "--seq 4096: not divisible by 2 x cp=3"),
    (dict(ulysses=2, pp=2), 4096, "--ulysses: not combined with pipeline"),
])
def test_bad_sequence_layouts_are_one_line(kw, seq, words):
    with pytest.raises(UserError, match=words.replace("(", r"\(")) as err:
        Layout(**kw).check(as_spec("llama3-8b"), seq)
    assert "\n" not in str(err.value)


def test_cli_says_the_trainer_does_not_run_cp(capsys):
    from megallama.cli import main
    assert main(["estimate", "--model", "llama3-8b", "--seq", "65536", "--cp", "4", "--gpu", "h100"]) in (0, None)
    assert "the trainer does not run ring attention" in capsys.readouterr().out
    assert main(["plan", "--model", "llama3-8b", "--gpus", "8", "--gpu", "h100", "--seq", "65536",
                 "--ulysses", "4", "--top", "1"]) in (0, None)
    assert " u4 " in capsys.readouterr().out


def test_published_long_sequence_figures_are_kept():
    rows = {(r.model, r.system, r.seq): r.tflops_per_gpu for r in pub.ULYSSES_FIGURES}
    assert len(rows) == 22
    assert rows[("gpt-7b", "ulysses", 8192)] == 159 and rows[("gpt-7b", "megatron-sp", 131072)] == 158
    assert rows[("gpt-30b", "ulysses", 262144)] == 134 and rows[("gpt-30b", "megatron-sp", 8192)] == 45
    assert rows[("gpt-7b", "megatron-sp", 262144)] is None and rows[("gpt-30b", "megatron-sp", 131072)] is None
    assert pub.LLAMA3_CP_ROW == dict(gpus=16384, tp=8, cp=16, pp=16, dp=8, seq=131072, batch_tokens=16 * 2 ** 20,
                                     tflops_per_gpu=380.0, mfu=0.38)
    assert sum(pub.LLAMA3_405B_STAGES) == as_spec("llama3-405b").n_layers


def test_published_comparison_within_recorded_bounds():
    """benchmarks/README_ulysses.md records these errors; the model must not drift past them."""
    for r in pub.ULYSSES_FIGURES:
        p = pub.predict_long_row(r)
        if r.tflops_per_gpu is None:
            continue
        assert p is not None, r
        err = p.hardware_tflops_per_gpu / r.tflops_per_gpu - 1
        assert -0.1 < err < (0.6 if r.system == "ulysses" else 1.5), (r, err)
    ulysses = {r.seq: pub.predict_long_row(r) for r in pub.ULYSSES_FIGURES if r.model == "gpt-30b" and r.system == "ulysses"}
    megatron = {r.seq: pub.predict_long_row(r) for r in pub.ULYSSES_FIGURES
                if r.model == "gpt-30b" and r.system == "megatron-sp" and r.tflops_per_gpu}
    assert all(ulysses[s].hardware_tflops_per_gpu > megatron[s].hardware_tflops_per_gpu for s in megatron)
