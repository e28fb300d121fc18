"""Collective counts and bytes per step, and where groups sit in the cluster, by hand."""
import pytest

from megallama.profiling.comm import collective_bytes_per_step, collective_time, collectives, link
from megallama.profiling.efficiency import MESSAGE_HALF
from megallama.profiling.hardware import load_hardware
from megallama.profiling.layout import Layout, members_per_node, spans_nodes
from megallama.profiling.memory import params_per_rank

SEQ, MBS = 64, 2
ACT = SEQ * MBS * 128 * 4     # tiny: N x h activation in fp32


def test_tp_without_sp_by_hand():
    """tiny (4 blocks), tp=2, one micro-batch: 2 all-reduces forward + 2 backward per block, the
    embedding's forward reduction, the head input's backward reduction, 3 loss all-reduces of N
    fp32 values. (The same counts a gloo TP=2 run of megallama.model issues.)"""
    layout = Layout(tp=2, mbs=MBS, dtype="fp32")
    tp = collective_bytes_per_step("tiny", layout, SEQ)["tp"]
    assert tp["calls"] == 4 * 4 + 1 + 1 + 3
    assert tp["payload_bytes"] == (4 * 4 + 2) * ACT + 3 * SEQ * MBS * 4
    full = collective_bytes_per_step("tiny", layout.with_(recompute="full"), SEQ)["tp"]
    assert full["calls"] - tp["calls"] == 2 * 4                       # the recomputed forward's two per block


def test_tp_with_sp_by_hand():
    layout = Layout(tp=2, mbs=MBS, dtype="fp32", sp=True, grad_accum=3)
    cs = collectives("tiny", layout, SEQ)
    ag = sum(c.calls for c in cs if c.op == "all_gather")
    rs = sum(c.calls for c in cs if c.op == "reduce_scatter")
    assert ag == rs == 3 * (4 * 4 + 2)
    norms = [c for c in cs if "norm" in c.what][0]
    assert norms.calls == 3 * (2 * 4 + 1) and norms.payload_bytes == 128 * 4


# As DeepSpeed 0.19 measured (tests/test_profiling_measured.py): ZeRO-1/2 reduce gradients with
# an all-reduce, and ZeRO-3 re-gathers all but the parameters it keeps live between passes.
@pytest.mark.parametrize("zero, expected", [
    (0, {"all_reduce": 1}),
    (1, {"all_reduce": 1, "all_gather": 1}),
    (2, {"all_reduce": 4, "all_gather": 1}),
    (3, {"all_gather": pytest.approx(7.68, abs=0.01), "reduce_scatter": 4}),
])
def test_dp_payload_per_zero_stage(zero, expected):
    """Unsharded payload per step in units of this rank's gradient/parameter bytes (m = 4)."""
    layout = Layout(tp=1, pp=1, dp=4, zero=zero, mbs=1, grad_accum=4, dtype="bf16")
    size = params_per_rank("llama-7b", 1, 1) * 2
    got = {}
    for c in collectives("llama-7b", layout, 2048):
        if c.group == "dp":
            got[c.op] = got.get(c.op, 0) + c.calls * c.payload_bytes / size
    assert got == pytest.approx(expected)


def test_pipeline_sends_and_scatter_gather():
    layout = Layout(tp=4, pp=4, dp=1, mbs=1, grad_accum=8, dtype="bf16")
    act = 2048 * 4096 * 2
    mid = collective_bytes_per_step("llama-7b", layout, 2048, stage=1)["pp"]
    assert mid["calls"] == 4 * 8 and mid["payload_bytes"] == 4 * 8 * act        # send+recv, fwd+bwd
    first = collective_bytes_per_step("llama-7b", layout, 2048, stage=0, scatter_gather=True)["pp"]
    assert first["payload_bytes"] == 2 * 8 * act / 4                            # Megatron sends 1/t


def test_topology_follows_tp_then_dp_then_pp():
    layout = Layout(tp=8, pp=4, dp=4, gpus_per_node=8)
    assert not spans_nodes(layout, "tp") and spans_nodes(layout, "dp") and spans_nodes(layout, "pp")
    assert members_per_node(layout, "dp") == 1
    small = Layout(tp=2, dp=4, gpus_per_node=8)
    assert not spans_nodes(small, "dp") and members_per_node(small, "dp") == 4
    hw = load_hardware("a100-80gb")
    assert link(small, hw, "dp")[0] == hw.intra_node_bandwidth                  # NVLink
    wide = Layout(tp=2, dp=16, gpus_per_node=8)
    assert link(wide, hw, "dp")[0] == 4 * hw.inter_node_bandwidth               # 4 NICs per node
    assert link(layout, hw, "dp")[0] == hw.inter_node_bandwidth


def test_ring_time():
    hw = load_hardware("a100-80gb")
    layout = Layout(tp=8, mbs=1, dtype="bf16")
    c = [c for c in collectives("llama-7b", layout, 2048) if c.what == "blocks"][0]
    busbw = hw.intra_node_bandwidth * 0.8 * c.payload_bytes / (c.payload_bytes + MESSAGE_HALF)   # small calls: slower
    one = c.payload_bytes * 2 * 7 / 8 / busbw + 6 * hw.intra_node_latency_s
    assert collective_time(c, layout, hw, 0.8) == pytest.approx(c.calls * one)


def test_one_costing_pass_gives_zero3s_exchange_at_the_cross_node_share_and_the_rest_at_nominal():
    """``comm_time_by_phase`` costs each collective once: ZeRO-3's prefetched calls under
    ``zero3.*`` at ``cross_node`` of the NICs (what :func:`zero3_exchange` gives), and calls inside
    one node (here TP's) at NVLink's, whatever ``cross_node`` is."""
    from megallama.profiling.comm import comm_time_by_phase, zero3_exchange, zero3_part
    hw = load_hardware("a100-80gb")
    lay = Layout(tp=2, dp=32, zero=3, mbs=1, grad_accum=2, recompute="full", gpus_per_node=8)
    full, shared = (comm_time_by_phase("llama2-70b", lay, 4096, hw, 0, 0.8, cross_node=x) for x in (1.0, 0.3))
    assert zero3_part(shared) == zero3_exchange("llama2-70b", lay, hw, 0, 0.8, 0.3)
    assert zero3_part(shared)["gather"] > 2 * zero3_part(full)["gather"] > 0
    assert {k: v for k, v in shared.items() if not k.startswith("zero3.")} == \
        {k: v for k, v in full.items() if not k.startswith("zero3.")} and shared["tp.microbatch"] > 0
    assert not any(k.endswith(".overlap") for k in shared)   # nothing costed twice


def test_a_clusters_share_slows_every_ring_between_nodes_and_none_inside():
    """A measured ``cross_node_share`` is the cluster's links, not ZeRO-3's alone: ZeRO-1's
    gradient all-reduce over 4 nodes slows with it; over one node it does not."""
    from megallama.profiling.comm import comm_time_by_phase
    hw = load_hardware("h100-sxm")
    for gpus, slower in ((32, True), (8, False)):
        lay = Layout(dp=gpus, zero=1, mbs=1, grad_accum=1, recompute="full", gpus_per_node=8)
        full, shared = (comm_time_by_phase("llama2-7b", lay, 4096, hw, 0, 0.8, cross_node=x)["dp.step"]
                        for x in (1.0, 0.3))
        assert (shared > 2 * full) if slower else (shared == full), (gpus, full, shared)
