"""What published runs use, expressible from the CLI and costed when pinned (issue 17 parts 3 and 5):
interleaved 1F1B, FP8, Megatron's
implementation, torchtitan's op-level recomputation, fewer KV heads than TP ranks; and no
silent reinterpretation of the batch asked for. (The embeddings-counted pipeline partition, BLOOM's,
is in tests/test_profiling_stages.py.)"""
import json

import pytest

from megallama.cli import main
from megallama.profiling import activations as act
from megallama.profiling.arch import as_spec
from megallama.profiling.efficiency import seconds_per_flop
from megallama.profiling.flops import block_matmuls, flops_per_token, op_sac_recomputed
from megallama.profiling.hardware import load_hardware
from megallama.profiling.layout import Layout
from megallama.profiling.memory import layer_params_per_rank, memory_breakdown, stage_activation_bytes
from megallama.profiling.planner import plan
from megallama.profiling.published import MEGATRON_IMPL, MEGATRON_TABLE1, predict_row
from megallama.profiling.steptime import predict

H100, A100 = load_hardware("h100-sxm"), load_hardware("a100-80gb")


def _cli(capsys, *argv):
    rc = main(list(argv))
    out = capsys.readouterr()
    return rc, out.out, [ln for ln in out.err.splitlines() if ln.strip() and "[WARNING]" not in ln]


def _arch(tmp_path, text, name="arch.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


# ---------------------------------------------------------------------------- interleaved 1F1B
def test_interleaving_divides_the_bubble_and_the_first_stage_holds_more_in_flight():
    spec = as_spec("llama-7b")
    plain = Layout(tp=2, pp=4, dp=1, grad_accum=16, pipeline_partition="uniform")
    inter = plain.with_(interleave=2)
    p1, p2 = predict(spec, plain, 2048, H100), predict(spec, inter, 2048, H100)
    # the bubble halves, but of a stage time that now carries v times the pipeline sends
    assert p2.time["pipeline_bubble"] == pytest.approx(p1.time["pipeline_bubble"] / 2, rel=0.01)
    assert p2.time["tp_and_pp_comm"] > p1.time["tp_and_pp_comm"]
    # Korthikanti et al. 2022, sec. 4.2.3: stage 0 holds pp (1 + (pp - 1)/(pp v)) micro-batches' worth
    assert inter.in_flight(0) == pytest.approx(4 * (1 + 3 / (4 * 2))) and plain.in_flight(0) == 4
    assert [inter.in_flight(s) for s in range(4)] == [5.5, 4.5, 3.5, 2.5]
    a1, a2 = (stage_activation_bytes(spec, lay, 2048, 0)["blocks"] for lay in (plain, inter))
    assert a2 == pytest.approx(a1 * 5.5 / 4)
    assert Layout(pp=4, grad_accum=2, interleave=2).in_flight(0) == 2   # all m x v chunk forwards first


def test_interleaving_multiplies_the_pipeline_messages_by_v():
    """Narayanan et al. 2021, sec. 2.2.2: v chunks per rank send v times as many messages of the
    same size; only the first rank's first chunk and the last rank's last chunk have no neighbour,
    so the first and last ranks also exchange with each other (one more communicator pair)."""
    from megallama.profiling.comm import collectives
    from megallama.profiling.overheads import communicators
    spec, m = as_spec("llama-7b"), 8
    plain = Layout(tp=2, pp=4, dp=1, grad_accum=m, sp=True, pipeline_partition="uniform")

    def sends(lay, stage):
        out = {}
        for c in collectives(spec, lay, 2048, stage, scatter_gather=True):
            if c.group == "pp" and c.op in ("send", "recv"):
                out[(c.op, c.what)] = (c.calls, c.payload_bytes)
        return out

    for v in (2, 4):
        inter = plain.with_(interleave=v)
        middle, first, last = sends(inter, 1), sends(inter, 0), sends(inter, 3)
        for key, (calls, size) in sends(plain, 1).items():
            assert middle[key] == (v * calls, size)
        assert first[("send", "activation to next stage")][0] == v * m
        assert first[("send", "gradient to previous stage")][0] == (v - 1) * m
        assert last[("send", "activation to next stage")][0] == (v - 1) * m
        assert last[("recv", "activation from previous stage")][0] == v * m
        assert sum(1 for g in communicators(inter, 0, False) if g[0] == "pp") == 2
    assert sum(1 for g in communicators(plain, 0, False) if g[0] == "pp") == 1
    # Megatron's scatter/gather without SP: the receiver all-gathers every message it gets, v times as many
    nosp = plain.with_(sp=False)
    gathers = [sum(c.calls for c in collectives(spec, lay, 2048, 1, scatter_gather=True)
                   if c.what == "partitioned pipeline exchange") for lay in (nosp, nosp.with_(interleave=2))]
    assert gathers[1] == 2 * gathers[0] > 0


def test_interleaving_is_costed_when_pinned_never_proposed(capsys):
    spec = as_spec("llama-7b")
    free = plan(spec, 16, H100, batch_tokens=2 ** 20, tp=2, zero=1, recompute="full", sp=False)
    assert all(c.layout.interleave == 1 for c in free.candidates)
    pinned = plan(spec, 16, H100, batch_tokens=2 ** 20, tp=2, zero=1, recompute="full", sp=False, interleave=2)
    assert pinned.candidates and all(c.layout.interleave == 2 and c.layout.pp > 1 for c in pinned.candidates)
    rc, out, _ = _cli(capsys, "plan", "--model", "llama-7b", "--gpus", "16", "--gpu", "h100", "--tp", "2", "--pp", "4",
                      "--zero", "1", "--mbs", "1", "--recompute", "full", "--interleave", "2",
                      "--global-batch-tokens", str(2 ** 20))
    assert rc == 0 and "note: interleaved 1F1B (--interleave 2) is costed only: the trainer runs" in out
    assert "pp4v2" in out
    rc, _, err = _cli(capsys, "estimate", "--model", "llama-7b", "--interleave", "2")
    assert rc == 2 and len(err) == 1 and "--interleave 2: interleaves pipeline stages; expected --pp > 1" in err[0]
    rc, _, err = _cli(capsys, "plan", "--model", "llama-7b", "--gpus", "24", "--gpu", "h100", "--pp", "3",
                      "--interleave", "2")
    assert rc == 2 and len(err) == 1 and "not divisible by pp x interleave 2" in err[0]


# ------------------------------------------------------------------------------------------- FP8
def test_fp8_runs_the_linear_gemms_at_the_fp8_peak_and_keeps_bf16_states():
    spec = as_spec("llama-7b")
    bf16 = Layout(tp=1, pp=2, dp=4, zero=1, mbs=2, grad_accum=8, recompute="selective")
    fp8 = bf16.with_(dtype="fp8")
    fc = flops_per_token(spec, 2048, "selective")
    rates = {d: seconds_per_flop(spec, 4096, 2048, 1, H100, d, 2, 0.7, "flash", 0.4) for d in ("bf16", "fp8")}
    assert rates["fp8"][0] < rates["bf16"][0] and rates["fp8"][2] < rates["bf16"][2]   # linears and head at FP8
    assert rates["fp8"][1] == rates["bf16"][1]                                          # attention core in BF16
    p16, p8 = predict(spec, bf16, 2048, H100), predict(spec, fp8, 2048, H100)
    assert p8.time["compute"] < p16.time["compute"] and p8.mfu == pytest.approx(
        p8.tokens_per_s_per_gpu * fc.model / H100.peak("fp8"))
    m16, m8 = memory_breakdown(spec, bf16, 2048, 0), memory_breakdown(spec, fp8, 2048, 0)
    for k in ("params", "grads", "optimizer", "buffers", "activations.blocks"):
        assert m8.components[k] == m16.components[k], k
    blocks = bf16.stage_layers(spec)[0]
    assert m8.components["fp8_weight_copies"] == 2 * blocks * layer_params_per_rank(spec, 1, "decoder")
    assert m8.total == pytest.approx(m16.total + m8.components["fp8_weight_copies"])


def test_fp8_is_refused_on_a_profile_without_an_fp8_peak_and_never_proposed(capsys):
    rc, _, err = _cli(capsys, "plan", "--model", "llama-7b", "--gpus", "8", "--gpu", "a100-80gb", "--dtype", "fp8")
    assert rc == 2 and len(err) == 1 and "--dtype fp8: GPU profile 'a100-80gb' has no fp8 peak" in err[0]
    rc, _, err = _cli(capsys, "estimate", "--model", "llama-7b", "--gpu", "a100-40gb", "--dtype", "fp8")
    assert rc == 2 and len(err) == 1 and "has no fp8 peak" in err[0]
    assert {c.layout.dtype for c in plan(as_spec("llama-7b"), 8, H100, tp=1, pp=1).candidates} == {"bf16"}
    rc, out, _ = _cli(capsys, "plan", "--model", "llama-7b", "--gpus", "8", "--gpu", "h200", "--dtype", "fp8",
                      "--json", "--top", "1")
    got = json.loads(out)
    assert rc == 0 and got["layout"]["dtype"] == "fp8" and any("FP8 (--dtype fp8) is costed only" in n
                                                               for n in got["notes"])


# ----------------------------------------------------------------------- Megatron's implementation
def test_a_table1_row_through_the_cli_equals_the_python_api(tmp_path, capsys):
    row = next(r for r in MEGATRON_TABLE1 if r.params_b == 39.1)   # TP 8 x PP 2: scatter-gather matters
    api = predict_row(row)
    path = _arch(tmp_path, f"arch_family: gpt\ndim: {row.hidden}\nn_layers: {row.layers}\nn_heads: {row.heads}\n"
                           "vocab_size: 51200\nmax_seq_len: 2048\ndropout: 0.1\n")
    argv = ["plan", "--config", str(path), "--gpus", str(row.gpus), "--gpu", "a100-80gb", "--tp", str(row.tp),
            "--pp", str(row.pp), "--zero", "0", "--mbs", str(api.layout.mbs), "--recompute", "full",
            "--dtype", "fp16", "--global-batch-tokens", str(row.batch * 2048), "--json"]
    rc, out, _ = _cli(capsys, *argv, "--impl", "megatron")
    cli = json.loads(out)
    assert rc == 0 and cli["layout"]["grad_accum"] == api.layout.grad_accum
    assert cli["hardware_tflops_per_gpu"] == pytest.approx(api.hardware_tflops_per_gpu, rel=1e-12)
    assert cli["memory_per_gpu_bytes"] == pytest.approx(api.memory.total, rel=1e-12)
    rc, out, _ = _cli(capsys, *argv)     # ours differs: the parity above can fail
    ours = json.loads(out)
    assert ours["hardware_tflops_per_gpu"] != pytest.approx(api.hardware_tflops_per_gpu, rel=1e-6)
    assert act.ActivationImpl.named("megatron") == MEGATRON_IMPL


# ------------------------------------------------------------------- torchtitan's op-level SAC
def test_op_sac_keeps_every_other_matmul_sdpa_and_reduce_scatters():
    spec = as_spec("llama-7b")
    assert [mm.name for mm in op_sac_recomputed(spec)] == ["wk", "wo", "w3"]   # the 2nd, 4th, 6th mm
    h, f, a, n = spec.dim, spec.ffn_hidden, spec.n_heads, 2048 * 2
    saved = {x.name: x.bytes for x in act.layer_saved_tensors(spec, 2048, 2, recompute="op")}
    assert saved == {"block.input (checkpoint)": 2 * n * h, "wq.output": 2 * n * h, "wv.output": 2 * n * h,
                     "w1.output": 2 * n * f, "w2.output": 2 * n * h, "sdpa.output": 2 * n * h,
                     "sdpa.logsumexp": 4 * n * a}
    tp = {x.name: x.bytes for x in act.layer_saved_tensors(spec, 2048, 2, tp=4, sp=True, recompute="op")}
    assert tp["w2.output"] == 2 * n * h and tp["w1.output"] == 2 * n * f / 4     # row-parallel: whole partial sum
    assert tp["reduce_scatter.outputs (attention, MLP)"] == 2 * 2 * n * h / 4
    sizes = {rc: act.activation_bytes_per_layer(spec, 2048, 2, recompute=rc) for rc in ("none", "selective", "op",
                                                                                        "full")}
    assert sizes["full"] < sizes["op"] < sizes["selective"] < sizes["none"]
    fc, none = flops_per_token(spec, 2048, "op"), flops_per_token(spec, 2048, "none")
    assert fc.model == none.model
    assert fc.recomputed == spec.n_layers * 2 * (h * spec.kv_dim + h * h + h * f)
    assert sum(2 * mm.k * mm.n for mm in block_matmuls(spec)) * spec.n_layers == pytest.approx(
        fc.terms["attn_proj"] + fc.terms["mlp"])


def test_op_recompute_is_costed_when_pinned_never_proposed(capsys):
    spec = as_spec("llama-7b")
    assert "op" not in {c.layout.recompute for c in plan(spec, 8, H100, tp=1, pp=1).candidates}
    rc, out, _ = _cli(capsys, "plan", "--model", "llama-7b", "--gpus", "8", "--gpu", "h100", "--recompute", "op",
                      "--json", "--top", "1")
    got = json.loads(out)
    assert rc == 0 and got["layout"]["recompute"] == "op" and got["hfu"] > got["mfu"]
    assert any("op-level recomputation (--recompute op" in n for n in got["notes"])
    rc, _, err = _cli(capsys, "estimate", "--model", "tiny", "--ulysses", "2", "--recompute", "op")
    assert rc == 2 and len(err) == 1 and "--recompute op:" in err[0]


# --------------------------------------------------------------- fewer KV heads than TP ranks
def test_replicated_kv_heads_are_accepted_by_plan_and_estimate(tmp_path, capsys):
    path = _arch(tmp_path, "arch_family: llama\ndim: 2048\nn_layers: 8\nn_heads: 16\nn_kv_heads: 2\n"
                           "vocab_size: 32000\nmax_seq_len: 2048\n")
    rc, out, _ = _cli(capsys, "estimate", "--config", str(path), "--tp", "8", "--mbs", "1", "--json")
    est = json.loads(out)
    saved = {x["name"]: x["bytes"] for x in est["saved_tensors_per_layer"]}
    hd = 2048 // 16
    assert rc == 0 and saved["attn.qkv.output (kept by V view)"] == 2048 * (2048 / 8 + 2 * hd) * 2   # one K, V head
    rc, out, _ = _cli(capsys, "plan", "--config", str(path), "--gpus", "16", "--gpu", "h100", "--tp", "8",
                      "--json", "--top", "1")
    got = json.loads(out)
    assert rc == 0 and got["layout"]["tp"] == 8 and got["fits"]


# -------------------------------------------------------------------- no silent reinterpretation
def test_a_pinned_layout_overshooting_the_batch_is_refused_in_one_line(capsys):
    pinned = ["plan", "--model", "llama-7b", "--gpus", "64", "--gpu", "h100", "--tp", "1", "--pp", "1", "--zero",
              "1", "--mbs", "4", "--recompute", "full", "--seq", "2048"]
    rc, _, err = _cli(capsys, *pinned, "--global-batch-tokens", "8192")
    assert rc == 2 and len(err) == 1
    assert "--global-batch-tokens 8,192: the pinned layout runs dp 64 x mbs 4 x seq 2048 = 524,288 tokens" in err[0]
    rc, out, _ = _cli(capsys, *pinned, "--global-batch-tokens", str(2 ** 20), "--json")
    assert rc == 0 and json.loads(out)["tokens_per_step"] == 2 ** 20
    rc, out, _ = _cli(capsys, *pinned[:-6], "--global-batch-tokens", "4000000")
    assert rc == 0 and "of the 4,000,000 asked)" in out


def test_estimate_states_its_default_gradient_accumulation(capsys):
    rc, out, _ = _cli(capsys, "estimate", "--model", "tiny", "--pp", "2")
    assert rc == 0 and "micro-batches per step           2 (default: pp, which fills the pipeline)" in out
    rc, out, _ = _cli(capsys, "estimate", "--model", "tiny", "--pp", "2", "--grad-accum", "6", "--json")
    got = json.loads(out)
    assert got["grad_accum"] == 6 and got["grad_accum_source"] == "--grad-accum"


def test_interleaving_takes_a_per_stage_list_whose_stages_split_into_equal_chunks():
    """Llama 3 405B (Llama Team 2024, sec. 3.3.2): 126 blocks as 7/8.../8/7 on 16 ranks, 8 chunks each,
    the first chunk only the embedding and the last only the head; a stage that splits into unequal
    chunks is refused in one line naming it."""
    from megallama.profiling.layout import pipeline_layers_problem
    llama3 = (7,) + (8,) * 14 + (7,)
    for v in (1, 2, 4, 8):
        assert pipeline_layers_problem(llama3, 126, 16, v) is None
    assert pipeline_layers_problem((8, 8, 8, 8), 32, 4, 2) is None
    problem = pipeline_layers_problem((7, 9, 8, 8), 32, 4, 2)
    assert problem == ("--pipeline-layers: stage 1's 9 layers do not split into --interleave 2 equal chunks "
                       "(the first and last stage may count the embedding / the head as one layer)")
    assert pipeline_layers_problem((6,) + (8,) * 14 + (8,), 126, 16, 8).startswith("--pipeline-layers: stage 0's 6")
    lay = Layout(tp=8, pp=16, dp=128, zero=1, grad_accum=16, sp=True, interleave=8, pipeline_layers=llama3)
    lay.check(as_spec("llama3-405b"), 8192)
    assert lay.stage_layers(as_spec("llama3-405b")) == list(llama3)
    pred = predict(as_spec("llama3-405b"), lay, 8192, H100, impl=act.ActivationImpl.named("megatron"),
                   scatter_gather=True)
    plain = predict(as_spec("llama3-405b"), lay.with_(interleave=1), 8192, H100,
                    impl=act.ActivationImpl.named("megatron"), scatter_gather=True)
    assert pred.time["pipeline_bubble"] < plain.time["pipeline_bubble"] / 4


def test_plan_costs_llama3_interleaved_on_its_uneven_split(capsys):
    rc, out, err = _cli(capsys, "plan", "--model", "llama3-405b", "--gpus", "16384", "--gpu", "h100-sxm",
                        "--seq", "8192", "--global-batch-tokens", str(16 * 2 ** 20), "--tp", "8", "--pp", "16",
                        "--sp", "on", "--zero", "1", "--mbs", "1", "--recompute", "none", "--interleave", "8",
                        "--pipeline-layers", ",".join(["7"] + ["8"] * 14 + ["7"]), "--impl", "megatron", "--top", "1")
    assert rc == 0 and not err and "note: interleaved 1F1B (--interleave 8) is costed only" in out
    rc, _, err = _cli(capsys, "plan", "--model", "llama3-405b", "--gpus", "16384", "--gpu", "h100-sxm",
                      "--tp", "8", "--pp", "16", "--interleave", "8",
                      "--pipeline-layers", ",".join(["6"] + ["8"] * 14 + ["8"]))
    assert rc == 2 and len(err) == 1 and "stage 0's 6 layers do not split into --interleave 8" in err[0]


def test_llama3_table4_rows_are_expressible_and_costed():
    """Llama Team 2024, Table 4's 8K rows: the pinned layout passes the checks, runs the published 16M
    tokens per step, and is predicted within the held-out bound (25%); without interleaving the
    bubble alone would put it far off."""
    from dataclasses import replace
    from megallama.profiling.published_llama3 import llama3_table4_runs
    from megallama.profiling.published_runs import hardware, predict_published
    runs = llama3_table4_runs()
    assert [r.gpus for r in runs] == [8192, 16384]
    for run in runs:
        lay = run.layout(hardware(run))
        lay.check(run.spec(), run.seq)
        assert lay.global_batch * run.seq == 16 * 2 ** 20 and lay.dp == run.gpus // 128
        error = predict_published(run).tokens_per_s_per_gpu / run.tokens_per_s_per_gpu - 1
        plain = predict_published(replace(run, interleave=1)).tokens_per_s_per_gpu / run.tokens_per_s_per_gpu - 1
        assert abs(error) < 0.25 and plain < error - 0.15, (run.name, error, plain)
