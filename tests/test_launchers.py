"""The same short run under every launcher a cluster user reaches for."""
import os
import subprocess
import sys

import pytest

from megallama.errors import UserError
from megallama.train.comm_buffers import PREFIX, SHM_DIR
from megallama.train import launchers
from megallama.train.launchers import detect_launcher, first_slurm_host, master_addr_for, mpi_master_addr
from tests.dist_utils import free_port
from tests.train_utils import ROOT, env, run_train, tiny_run_config

STEPS = ["train.steps=3", "deepspeed.zero_optimization.stage=2"]


@pytest.fixture(scope="module")
def cfg(tmp_path_factory, data_cache):
    return tiny_run_config(tmp_path_factory.mktemp("launch"), data_cache)


@pytest.mark.parametrize("launcher", ["deepspeed", "mpiexec"])
def test_two_ranks_under_launcher(launcher, cfg, tmp_path):
    workspaces = f"{PREFIX}_{os.getuid()}_*"
    before = set(SHM_DIR.glob(workspaces))
    report = run_train(cfg, STEPS + [f"run_dir={tmp_path / 'run'}"], world=2, launcher=launcher)
    assert report["world_size"] == 2 and report["dp"] == 2
    assert set(SHM_DIR.glob(workspaces)) <= before, "the run left DeepSpeed's all-reduce workspaces in /dev/shm"
    assert report["launcher"] == ("mpi" if launcher == "mpiexec" else "deepspeed")


def test_torchrun_two_nodes_on_localhost(cfg, tmp_path):
    port = free_port()
    run_dir = tmp_path / "run"
    procs = [subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node_rank", str(node),
         "--nproc_per_node", "1", "--master_addr", "127.0.0.1", "--master_port", str(port), "-m", "megallama",
         "train", str(cfg)] + [x for o in STEPS + [f"run_dir={run_dir}"] for x in ("--set", o)],
        env=env(), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for node in (0, 1)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    assert "world=2" in outs[0][1] and "launcher=torchrun" in outs[0][1]


def test_srun_environment_two_tasks(cfg, tmp_path):
    """Two processes given only what ``srun`` sets (SLURM_PROCID, SLURM_NTASKS, ...)."""
    port = str(free_port())
    run_dir = tmp_path / "run"
    procs = []
    for rank in (0, 1):
        e = {k: v for k, v in env().items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR")}
        e.update(SLURM_PROCID=str(rank), SLURM_NTASKS="2", SLURM_LOCALID=str(rank),
                 SLURM_JOB_NODELIST="localhost", MASTER_PORT=port)
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "megallama", "train", str(cfg)]
            + [x for o in STEPS + [f"run_dir={run_dir}"] for x in ("--set", o)],
            env=e, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    assert "launcher=slurm world=2" in outs[0][1]


def test_launcher_detection_from_environment():
    e = {"SLURM_PROCID": "3", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1", "SLURM_JOB_NODELIST": "gpu[07-08]"}
    info = detect_launcher(e)
    assert (info.launcher, info.rank, info.world_size, info.local_rank) == ("slurm", 3, 8, 1)
    assert e["MASTER_ADDR"] == "gpu07"
    e = {"PMI_RANK": "1", "PMI_SIZE": "2", "MASTER_ADDR": "10.0.0.1"}
    assert detect_launcher(e).launcher == "mpi" and e["RANK"] == "1" and e["WORLD_SIZE"] == "2"
    e = {}
    info = detect_launcher(e)
    assert (info.launcher, info.world_size) == ("none", 1) and "MASTER_PORT" in e
    assert first_slurm_host("node[03-05,07],other") == "node03"
    assert first_slurm_host("single") == "single"


A, B = ("a", "boot1/net1"), ("b", "boot2/net1")


def test_master_address_is_loopback_on_one_host_and_refused_across_hosts():
    assert master_addr_for([A, A], "127.0.1.1") == "127.0.0.1"
    assert master_addr_for([A, A], "10.0.0.5") == "127.0.0.1"  # one host: always reachable
    assert master_addr_for([A, B], "10.0.0.5") == "10.0.0.5"
    assert master_addr_for([A, ("a", "boot1/net2")], "10.0.0.5") == "10.0.0.5"  # one name, two network namespaces
    for addr in ("127.0.1.1", None, "::1", "0.0.0.0"):
        with pytest.raises(UserError) as exc:
            master_addr_for([A, B, B], addr)
        text = str(exc.value)
        assert "\n" not in text and "ranks span 2 hosts (a, b)" in text and "MASTER_ADDR" in text
        assert "/etc/hosts" in text


class FakeComm:
    def __init__(self, rank, hosts):
        self.rank, self.hosts = rank, hosts

    def Get_rank(self):
        return self.rank

    def allgather(self, mine):
        return [mine if r == self.rank else h for r, h in enumerate(self.hosts)]

    def bcast(self, value, root=0):
        return value if self.rank == root else "10.0.0.9"


def test_mpi_master_address_from_gathered_hosts(monkeypatch):
    monkeypatch.setattr(launchers, "host_identity", lambda: A)
    peers = []
    monkeypatch.setattr(launchers, "own_address", lambda p: peers.append(p) or None)
    with pytest.raises(UserError) as exc:
        mpi_master_addr(FakeComm(0, [A, B]))
    assert exc.value.same_on_every_rank and peers == [["b"]]  # rank 0 looked for its route to b
    monkeypatch.setattr(launchers, "own_address", lambda p: "10.1.2.3")
    assert mpi_master_addr(FakeComm(0, [A, B])) == "10.1.2.3"
    assert mpi_master_addr(FakeComm(0, [A, A])) == "127.0.0.1"
    assert mpi_master_addr(FakeComm(1, [B, A])) == "10.0.0.9"


def test_own_address_skips_a_hostname_mapped_to_loopback(monkeypatch):
    """Debian maps the hostname to 127.0.1.1: the address on a route out is taken instead."""
    real = launchers.socket.getaddrinfo
    monkeypatch.setattr(launchers.socket, "getaddrinfo",
                        lambda host, *a, **k: [(2, 2, 17, "", ("127.0.1.1", 0))] if host == launchers.socket.gethostname()
                        else real(host, *a, **k))
    monkeypatch.setattr(launchers, "_routed_source", lambda target: "10.9.8.7")
    assert launchers.own_address([]) == "10.9.8.7"
    monkeypatch.setattr(launchers, "_routed_source", lambda target: "127.0.0.1")
    assert launchers.own_address([]) is None
