"""Node-local checkpoint directories, simulated on one machine: two ranks that call themselves two
nodes (``MEGALLAMA_HOSTNAME``) each with its own checkpoint directory. ``node_local`` saves each
node's own files plus a full copy of the layout-free part and resumes from it (falling back past
a damaged copy on one node); ``shared`` and ``auto`` refuse to start in one line."""
import json

import pytest

from megallama.train import manifest as mf
from tests.dist_utils import run_distributed
from tests.train_utils import tiny_run_config

BASE = ["deepspeed.zero_optimization.stage=1", "train.steps=4", "checkpoint.every=2", "checkpoint.keep=2",
        "train.heartbeat_timeout_s=0"]


def _as_node(rank, world, config, overrides, ckpt_root, storage):
    """Rank ``rank`` as node ``node{rank}`` with its own checkpoint directory; every rank's result."""
    import os

    import torch.distributed as dist

    from megallama.config import load_run_config
    from megallama.errors import UserError
    from megallama.train.loop import train

    os.environ["MEGALLAMA_HOSTNAME"] = f"node{rank}"
    cfg = load_run_config(config, overrides + [f"checkpoint.dir={ckpt_root}/node{rank}",
                                               f"checkpoint.storage={storage}"])
    try:
        report = train(cfg)
        result = {"start_step": report["start_step"], "losses": report["losses"]}
    except UserError as exc:
        result = {"error": str(exc)}
    every = [None] * world
    dist.all_gather_object(every, result)
    return every


@pytest.fixture(scope="module")
def config(tmp_path_factory, data_cache):
    tmp = tmp_path_factory.mktemp("nodelocal")
    return tmp, tiny_run_config(tmp, data_cache)


def test_node_local_saves_each_nodes_files_and_resumes(config):
    tmp, cfg = config
    ckpt = tmp / "ckpt"
    first = run_distributed(_as_node, 2, str(cfg), BASE + [f"run_dir={tmp / 'run'}"], str(ckpt), "node_local")
    assert all("error" not in r for r in first), first
    for node in ("node0", "node1"):
        tag = ckpt / node / "step00000004"
        assert (ckpt / node / "latest").read_text() == "step00000004"
        manifest = json.loads((tag / mf.MANIFEST).read_text())
        assert manifest["storage"] == "node_local"
        files = manifest["files"]
        held = {rel for rel, _ in mf.held_on(list(files.items()), node)}
        assert set(mf.on_disk(tag)) == held  # this node's files and the layout-free copy, nothing else
        assert mf.verify(tag, host=node) is None
    files = json.loads((ckpt / "node1" / "step00000004" / mf.MANIFEST).read_text())["files"]
    assert files["rng_rank00001.pt"]["host"] == "node1" and files["rng_rank00000.pt"]["host"] == "node0"
    assert files["universal/pp00-tp00.safetensors"]["copies"] == "every_node"  # written by rank 0, on node0
    assert not (ckpt / "node1" / "step00000004" / "rng_rank00000.pt").exists()
    assert (ckpt / "node1" / "step00000004" / "universal" / "pp00-tp00.safetensors").is_file()

    # node1's copy of the newest checkpoint is damaged: both nodes fall back to step 2 and continue
    copy = ckpt / "node1" / "step00000004" / "universal" / "pp00-tp00.safetensors"
    data = bytearray(copy.read_bytes())
    data[-50] ^= 1
    copy.write_bytes(bytes(data))
    second = run_distributed(_as_node, 2, str(cfg), BASE + [f"run_dir={tmp / 'run2'}"], str(ckpt), "node_local")
    assert all(r.get("start_step") == 2 for r in second), second
    for a, b in zip(second[0]["losses"], first[0]["losses"][2:]):
        assert abs(a - b) < 2e-4 * b, (second[0]["losses"], first[0]["losses"])


@pytest.mark.parametrize("storage", ["shared", "auto"])
def test_unshared_directory_is_refused_at_start(config, storage):
    tmp, cfg = config
    ckpt = tmp / f"refused-{storage}"
    results = run_distributed(_as_node, 2, str(cfg), BASE + [f"run_dir={tmp / ('run-' + storage)}"], str(ckpt),
                              storage)
    errors = [r.get("error") for r in results]
    assert all(errors) and "\n" not in errors[0], results
    # the same line on every rank (each simulated node names its own path for the one setting)
    assert len({e.replace(str(ckpt / f"node{r}"), "DIR") for r, e in enumerate(errors)}) == 1, errors
    assert "is not shared across nodes" in errors[0] and "checkpoint.storage=node_local" in errors[0]
    assert not list(ckpt.rglob("step*")) and not list(ckpt.rglob(".storage-probe*"))  # nothing written, no debris
