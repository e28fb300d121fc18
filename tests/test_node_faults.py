"""Node-level faults on the virtual cluster: every process of a node killed, and separately its link
cut, mid-run. The other node's ranks exit within the heartbeat timeout plus a margin, naming the
lost node and its ranks; relaunching resumes from the last verified checkpoint and the per-step
losses are those of an uninterrupted run. The sequence is tests/node_faults.py; the recorded
times are in benchmarks/results/node_loss.json (benchmarks/node_loss.py)."""

import pytest

from tests.cluster import VirtualCluster
from tests.cluster.fixtures import skip_unless_cluster, warm_comm_op
from tests.layout_design import rel_diff
from tests.node_faults import HEARTBEAT_S, REFERENCE, STEPS, node_loss_sequence
from tests.train_utils import run_train, tiny_run_config

MARGIN_S = 8  # a poll interval, the judge's wait for the others to read its verdict, process exit; 2 busy cores
LOST = "node vnode2 (ranks 2-3) lost: no heartbeat for "


@pytest.fixture(scope="module")
def cluster():
    skip_unless_cluster()
    warm_comm_op()
    with VirtualCluster(n=2) as c:
        yield c


def test_a_lost_node_is_named_within_the_bound_and_the_run_resumes_exactly(cluster, data_cache, tmp_path):
    cfg = tiny_run_config(tmp_path, data_cache)
    reference = run_train(cfg, REFERENCE + [f"run_dir={tmp_path / 'ref'}"])["losses"]
    got = node_loss_sequence(cluster, cfg, tmp_path / "cluster")
    for fault in ("kill_node", "link_down"):
        seen = got[fault]
        assert all(c not in (0, None) for c in seen["exit_codes"]), seen
        assert all(LOST in line for line in seen["lines"]), seen
        assert all(t is not None and t <= HEARTBEAT_S + MARGIN_S for t in seen["time_to_exit_s"]), seen
    assert sorted(got["losses"]) == list(range(1, STEPS + 1)), got["losses"]
    assert rel_diff([got["losses"][s] for s in range(1, STEPS + 1)], reference) <= 1e-6, (got["losses"], reference)
