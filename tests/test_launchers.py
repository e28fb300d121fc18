"""The same short run under every launcher a cluster user reaches for."""
import subprocess
import sys

import pytest

from megallama.train.distributed import _first_slurm_host, detect_launcher
from tests.dist_utils import free_port
from tests.train_utils import ROOT, env, run_train, tiny_run_config

STEPS = ["train.steps=3", "deepspeed.zero_optimization.stage=2"]


@pytest.fixture(scope="module")
def cfg(tmp_path_factory, data_cache):
    return tiny_run_config(tmp_path_factory.mktemp("launch"), data_cache)


@pytest.mark.parametrize("launcher", ["deepspeed", "mpiexec"])
def test_two_ranks_under_launcher(launcher, cfg, tmp_path):
    report = run_train(cfg, STEPS + [f"run_dir={tmp_path / 'run'}"], world=2, launcher=launcher)
    assert report["world_size"] == 2 and report["dp"] == 2
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
    assert _first_slurm_host("node[03-05,07],other") == "node03"
    assert _first_slurm_host("single") == "single"
