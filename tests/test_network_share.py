"""``megallama network``: a cluster's measured share of its NICs, written into a profile the
planner then costs with. Ranks are put on two "nodes" by ``MEGALLAMA_HOSTNAME``."""
import dataclasses
import os
from pathlib import Path

import pytest
import yaml

from megallama.profiling.comm import Collective, collective_time
from megallama.profiling.hardware import load_hardware, load_profile_file
from megallama.profiling.layout import Layout
from megallama.profiling.measure_network import node_groups, share_of
from megallama.errors import UserError
from tests.dist_utils import run_distributed
from tests.train_utils import ROOT, cli_in_process

H100 = load_hardware("h100-sxm")


@pytest.mark.parametrize("gpus, share", [(16, 0.4), (16, 1.0), (64, 0.25)])
def test_the_share_is_what_makes_the_planners_time_the_measured_one(gpus, share):
    """A ZeRO-3 gather over ``gpus`` (8 per node) that took what the planner costs at ``share``
    of the NICs measures as ``share``: the measurement inverts the planner's own costing."""
    lay = Layout(dp=gpus, zero=3, mbs=1, grad_accum=1, recompute="full", gpus_per_node=8)
    payload = 512 << 20
    call = Collective("dp", "all_gather", payload, 1, "overlap", "params, forward")
    slower = dataclasses.replace(H100, inter_node_bandwidth=H100.inter_node_bandwidth * share)
    took = collective_time(call, lay, slower, 0.8)
    assert share_of(H100, gpus, 8, payload, took, 0.8) == pytest.approx(share, rel=1e-9)
    nominal = collective_time(call, lay, H100, 0.8)
    assert share_of(H100, gpus, 8, payload, nominal / 2, 0.8) == 1.0   # faster than nominal: costed at it


def test_ranks_are_grouped_by_node_and_one_node_is_refused():
    assert node_groups(["a", "a", "b", "b"]) == [[0, 1], [2, 3]]
    with pytest.raises(UserError, match=r"all 2 ranks are on one node \(a\)"):
        node_groups(["a", "a"])
    with pytest.raises(UserError, match=r"different numbers of ranks \(1, 2\)"):
        node_groups(["a", "a", "b"])


def lab_profile(tmp: Path) -> Path:
    """A GPU profile whose NICs (10 GB/s) loopback gloo on a small machine falls well short of."""
    data = yaml.safe_load((ROOT / "examples" / "gpu-custom.yaml").read_text())
    data.update(name="h100-lab", nics_per_node=1, nic_bandwidth=1.0e10, intra_node_bandwidth=1.0e11)
    path = tmp / "lab.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _network(rank, world, argv):
    from megallama.cli import main

    os.environ["MEGALLAMA_HOSTNAME"] = f"node{rank // 2}"
    return main(argv)


def test_network_writes_a_profile_with_the_measured_share(tmp_path):
    gpu, out = lab_profile(tmp_path), tmp_path / "cluster.yaml"
    rc = run_distributed(_network, 4, ["network", "--gpu", str(gpu), "--out", str(out), "--mib", "1", "--reps", "3"])
    assert rc == 0
    text = out.read_text()
    assert "world (4, 2) all_gather" in text and "rail (2, 1) reduce_scatter" in text
    hw = load_profile_file(out)
    assert hw.name == "h100-lab-cluster" and 0 < hw.cross_node_share < 1
    shares = [float(line.rsplit(", ", 1)[1]) for line in text.splitlines() if line.startswith("#   ")]
    assert len(shares) == 4 and hw.cross_node_share == round(min(shares), 3)   # the slowest ring
    assert dataclasses.replace(hw, name="h100-lab", cross_node_share=None) == load_profile_file(gpu)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]   # no temporary left


def test_network_refuses_an_existing_out_and_one_node(tmp_path, monkeypatch, capsys):
    gpu, out = lab_profile(tmp_path), tmp_path / "taken.yaml"
    out.write_text("mine\n")
    rc, _, err = cli_in_process(["network", "--gpu", gpu, "--out", out], monkeypatch, capsys)
    assert rc == 2 and err.count("\n") == 1 and f"--out {out}: exists" in err
    assert out.read_text() == "mine\n"
    rc, _, err = cli_in_process(["network", "--gpu", gpu, "--out", tmp_path / "new.yaml"], monkeypatch, capsys)
    assert rc == 2 and "all 1 ranks are on one node" in err and not (tmp_path / "new.yaml").exists()
    rc, _, err = cli_in_process(["network", "--gpu", "cpu", "--out", tmp_path / "c.yaml"], monkeypatch, capsys)
    assert rc == 2 and "--gpu cpu" in err
