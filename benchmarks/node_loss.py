"""Time from losing a node to the exit of the other node's ranks, on the virtual cluster.

2 nodes x 2 ranks (TP2 x DP2, tiny, fp32, ``train.heartbeat_timeout_s=5``), started as srun starts
them: every process of node 2 killed mid-run, then (after a resume) node 2's link cut; a last
launch resumes and finishes, and its per-step losses are compared with one uninterrupted
single-process run. The sequence is ``tests/node_faults.py`` (what ``tests/test_node_faults.py``
asserts). Needs root and network namespaces.

    python benchmarks/node_loss.py                  # ~2 min on 2 cores
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.cluster import VirtualCluster, unavailable_reason  # noqa: E402
from tests.layout_design import rel_diff  # noqa: E402
from tests.node_faults import REFERENCE, STEPS, node_loss_sequence  # noqa: E402
from tests.train_utils import env, run_train, tiny_run_config  # noqa: E402


def main() -> None:
    reason = unavailable_reason()
    if reason:
        sys.exit(f"node_loss: {reason}")
    subprocess.run([sys.executable, "-m", "megallama.train.warmup_ops"], env=env(), cwd=ROOT, check=True,
                   capture_output=True)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "data").mkdir()
        cfg = tiny_run_config(tmp, tmp / "data")
        reference = run_train(cfg, REFERENCE + [f"run_dir={tmp / 'ref'}"])["losses"]
        with VirtualCluster(n=2) as cluster:
            got = node_loss_sequence(cluster, cfg, tmp / "cluster")
    losses = [got["losses"].get(s) for s in range(1, STEPS + 1)]
    got["uninterrupted_losses"] = reference
    got["max_rel_diff_vs_uninterrupted"] = rel_diff(losses, reference)
    got["losses"] = losses
    got["command"] = "python benchmarks/node_loss.py"
    got["load_average"] = os.getloadavg()
    out = ROOT / "benchmarks" / "results" / "node_loss.json"
    out.write_text(json.dumps(got, indent=1) + "\n")
    for fault in ("kill_node", "link_down"):
        print(f"{fault}: survivors exited after {got[fault]['time_to_exit_s']} s "
              f"(heartbeat timeout {got['heartbeat_timeout_s']} s): {got[fault]['lines'][0]}")
    print(f"resumed from step {got['final']['resumed_from']}; max relative loss difference vs the uninterrupted run "
          f"{got['max_rel_diff_vs_uninterrupted']:.2e}; wrote {out}")


if __name__ == "__main__":
    main()
