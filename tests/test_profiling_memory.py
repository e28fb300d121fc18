"""Model-state bytes (ZeRO 0-3, offload, precision) and pipeline in-flight activations, by hand."""
import pytest

from megallama.profiling.activations import ActivationImpl, activation_bytes_per_layer
from megallama.profiling.hardware import cpu_profile
from megallama.profiling.layout import Layout
from megallama.profiling.memory import (memory_breakdown, model_state_bytes, params_per_rank,
                                        stage_activation_bytes)
from megallama.profiling.overheads import verdict
from megallama.profiling.published_memory import korthikanti_cases
from megallama.profiling.steptime import predict

PSI_7B = 6_738_415_616
GiB = 2 ** 30


@pytest.mark.parametrize("zero, params, grads, optimizer", [
    (0, 2, 2, 12),          # bf16 weights + grads, fp32 master + Adam m, v (ZeRO paper's 2 + 2 + 12)
    (1, 2, 2, 12 / 8),
    (2, 2, 2 / 8, 12 / 8),
    (3, 2 / 8, 2 / 8, 12 / 8),
])
def test_model_states_bf16_llama_7b_dp8(zero, params, grads, optimizer):
    got = model_state_bytes("llama-7b", tp=1, pp=1, dp=8, zero=zero, dtype="bf16")
    assert got["params"] == pytest.approx(params * PSI_7B)
    assert got["grads"] == pytest.approx(grads * PSI_7B)
    assert got["optimizer"] == pytest.approx(optimizer * PSI_7B)
    assert got["host"] == 0


def test_model_states_fp32():
    z0 = model_state_bytes("llama-7b", dp=4, zero=0, dtype="fp32")
    assert (z0["params"], z0["grads"], z0["optimizer"]) == (4 * PSI_7B, 4 * PSI_7B, 8 * PSI_7B)  # no master copy
    z1 = model_state_bytes("llama-7b", dp=4, zero=1, dtype="fp32")
    assert z1["optimizer"] == pytest.approx(12 * PSI_7B / 4)   # ZeRO-1/2 clone an fp32 master partition
    z3 = model_state_bytes("llama-7b", dp=4, zero=3, dtype="fp32")
    # measured (tests/test_profiling_measured.py): ZeRO-3 keeps its own fp32 master partition too
    assert z3["optimizer"] == pytest.approx(12 * PSI_7B / 4)
    assert z3["params"] == pytest.approx(PSI_7B)


def test_tp_pp_split_by_hand():
    # llama-7b at tp=2, pp=2: 16 blocks per stage, matrices halved, norms replicated
    layer = (4 * 4096 * 4096 + 3 * 4096 * 11008) // 2 + 2 * 4096
    first = 16 * layer + 32000 * 4096 // 2                   # + half the embedding
    last = 16 * layer + 4096 + 32000 * 4096 // 2             # + final norm + half the head
    assert params_per_rank("llama-7b", 2, 2, stage=0) == first
    assert params_per_rank("llama-7b", 2, 2, stage=1) == last
    assert params_per_rank("llama-7b", 2, 2) == last
    got = model_state_bytes("llama-7b", tp=2, pp=2, dp=4, zero=2, dtype="bf16")
    assert got["params"] == 2 * last and got["grads"] == 2 * last / 4 and got["optimizer"] == 12 * last / 4
    assert got["step_buffers"] == 4 * last / 4   # fp32 gradient partition materialised for the step


def test_offload_moves_optimizer_and_fp32_grads_to_host():
    got = model_state_bytes("llama-7b", dp=8, zero=2, dtype="bf16", offload=True)
    assert got["optimizer"] == 0 and got["grads"] == 0
    assert got["host"] == pytest.approx((12 + 4) * PSI_7B / 8)
    assert got["params"] == 2 * PSI_7B


def test_bf16_pipeline_at_zero0_shards_like_zero1():
    # DeepSpeed runs bf16 + pipeline with BF16_Optimizer, which partitions the fp32 states over DP
    got = model_state_bytes("llama-7b", tp=1, pp=2, dp=4, zero=0, dtype="bf16")
    assert got["optimizer"] == pytest.approx(12 * params_per_rank("llama-7b", 1, 2) / 4)


def test_first_stage_holds_pp_microbatches_under_1f1b():
    per_layer = activation_bytes_per_layer("llama-7b", 2048, 1, tp=2, sp=True)
    layout = Layout(tp=2, pp=4, dp=1, mbs=1, grad_accum=8, sp=True)
    for stage, in_flight in ((0, 4), (1, 3), (3, 1)):
        got = stage_activation_bytes("llama-7b", layout, 2048, stage)["blocks"]
        assert got == pytest.approx(in_flight * 8 * per_layer)
    few = layout.with_(grad_accum=2)       # fewer micro-batches than stages: all of them
    assert stage_activation_bytes("llama-7b", few, 2048, 0)["blocks"] == pytest.approx(2 * 8 * per_layer)
    last = stage_activation_bytes("llama-7b", layout, 2048, 3)
    assert last["head_and_loss"] > 0 and stage_activation_bytes("llama-7b", layout, 2048, 0)["head_and_loss"] == 0


def test_breakdown_peak_takes_the_larger_of_activations_and_step_buffers():
    layout = Layout(tp=1, pp=1, dp=8, zero=1, mbs=1, grad_accum=4, recompute="full")
    m = memory_breakdown("llama-7b", layout, 2048)
    c = m.components
    states = c["params"] + c["grads"] + c["optimizer"] + c["buffers"]
    assert m.total == pytest.approx(states + max(m.activations, c["step_buffers"]))
    assert 20 * GiB < m.total < 40 * GiB


def test_megatron_cases_count_18_bytes_per_parameter():
    """Megatron-LM: 16-bit params, fp32 main grads, fp32 master + Adam (2 + 4 + 12), no buckets."""
    case = next(c for c in korthikanti_cases() if c.name == "korthikanti-175b rc=full")
    mem = case.stage_memory(0)
    p = params_per_rank(case.spec, 8, 8, 0)
    c = mem.components
    assert (c["params"], c["grads"], c["optimizer"], c["buffers"], c["step_buffers"]) == (2 * p, 4 * p, 12 * p, 0, 0)


def test_cpu_profile_pays_no_gpu_overheads():
    hw = cpu_profile()
    layout = Layout(tp=2, dp=2, zero=1, mbs=2, grad_accum=2)
    mem = memory_breakdown("tiny", layout, 64, impl=ActivationImpl.for_device("cpu"))
    v = verdict("tiny", layout, 64, hw, mem, ActivationImpl(attention="eager"))
    assert v.overheads == {} and v.needed_bytes == mem.total and v.usable_bytes == hw.memory_bytes
    p = predict("tiny", layout, 64, hw, memory=mem)
    assert p.memory_capacity_bytes == hw.memory_bytes and p.fits
