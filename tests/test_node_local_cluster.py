"""Node-local checkpoint directories on the virtual cluster: 2 nodes x 1 rank (torchrun, c10d
rendezvous), the checkpoint directory on each node's own disk that the other cannot see. With
``checkpoint.storage=node_local`` a save leaves each node its own ranks' files and a full copy of
the layout-free part, and a relaunch resumes from it; with ``shared`` the start is refused in one
line naming the setting."""
import json
import subprocess
import sys

import pytest

from tests.cluster.fixtures import skip_unless_cluster, virtual_cluster, warm_comm_op  # noqa: F401 (fixture)
from tests.train_utils import ROOT, env, tiny_run_config

NODES = 2
BASE = ["train.steps=4", "checkpoint.every=2", "train.seq_len=32", "deepspeed.zero_optimization.stage=1"]
TIMEOUT = 480  # a DeepSpeed op rebuilt by another environment sharing ~/.cache costs minutes


def _launch(c, tmp, cfg, overrides, tag):
    """torchrun on every node; ``(return codes, logs)``."""
    endpoint = f"{c.nodes[0].ip}:29400"
    procs = []
    for i in range(NODES):
        log = tmp / f"{tag}-node{i}.log"
        argv = [sys.executable, "-m", "torch.distributed.run", "--nnodes", str(NODES), "--nproc_per_node", "1",
                "--rdzv_backend", "c10d", "--rdzv_endpoint", endpoint, "--rdzv_id", tag, "-m", "megallama",
                "train", str(cfg)] + [x for o in overrides for x in ("--set", o)]
        with open(log, "w") as fh:
            procs.append((c.popen(i, argv, env={**env(), "GLOO_SOCKET_IFNAME": "eth0"}, cwd=ROOT, stdout=fh,
                                  stderr=subprocess.STDOUT), log))
    codes = []
    for p, _ in procs:
        try:
            codes.append(p.wait(timeout=TIMEOUT))
        except subprocess.TimeoutExpired:
            p.kill()
            codes.append(p.wait())
    return codes, [log.read_text() for _, log in procs]


@pytest.fixture(scope="module")
def warm_ops():
    skip_unless_cluster()
    warm_comm_op()


def test_node_local_checkpoints_on_two_nodes(warm_ops, virtual_cluster, tmp_path, data_cache):
    local = tmp_path / "local"
    c = virtual_cluster(n=NODES, local_dir=local)
    cfg = tiny_run_config(tmp_path, data_cache)
    ckpt = [f"checkpoint.dir={local / 'ckpt'}", f"run_dir={tmp_path / 'run'}"]

    codes, logs = _launch(c, tmp_path, cfg, BASE + ckpt + ["checkpoint.storage=shared"], "refused")
    assert all(code != 0 for code in codes), codes
    lines = [x for x in logs[0].splitlines() if "megallama train: error" in x]
    assert len(lines) == 1 and "is not shared across nodes" in lines[0] and "checkpoint.storage=node_local" in lines[0]
    assert str(ROOT / "megallama") not in logs[0], logs[0][-3000:]  # no traceback of ours (torchrun prints its own)

    node_local = ckpt + ["checkpoint.storage=node_local"]
    codes, logs = _launch(c, tmp_path, cfg, BASE + node_local + ["train.exit_at_step=2"], "first")
    assert codes == [0, 0], logs[0][-4000:] + logs[1][-4000:]
    for i in range(NODES):
        tag = c.node_local(i) / "ckpt" / "step00000002"
        files = json.loads((tag / "manifest.json").read_text())["files"]
        assert (c.node_local(i) / "ckpt" / "latest").read_text() == "step00000002"
        assert files[f"rng_rank{i:05d}.pt"]["host"] == c.nodes[i].name
        assert (tag / f"rng_rank{i:05d}.pt").is_file() and not (tag / f"rng_rank{1 - i:05d}.pt").exists()
        assert (tag / "universal" / "pp00-tp00.safetensors").is_file() and (tag / "meta.json").is_file()

    codes, logs = _launch(c, tmp_path, cfg, BASE + node_local, "resumed")
    assert codes == [0, 0], logs[0][-4000:] + logs[1][-4000:]
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["start_step"] == 2 and report["end_step"] == 4
    assert (c.node_local(1) / "ckpt" / "latest").read_text() == "step00000004"
