"""Every launcher across two nodes of the virtual cluster: ``deepspeed --hostfile`` (its pdsh/ssh
runner), ``torchrun`` with c10d rendezvous, ``mpiexec`` with a hosts file over ssh, and a start
shaped like ``srun``'s. Each runs TP2 x DP2 on 2 nodes x 2 ranks and must reproduce the
single-process loss trajectory (fp32) with its ranks on both hostnames."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.cluster import VirtualCluster
from tests.cluster.fixtures import skip_unless_cluster, warm_comm_op
from tests.layout_design import TOLERANCE, rel_diff
from tests.train_utils import BIN, ROOT, env, reference_runs, tiny_run_config

NODES, PER_NODE = 2, 2
COMMON = ["train.steps=3", "train.seq_len=32", "train.global_batch_size=8"]
CLUSTER = COMMON + ["parallel.tp=2", "train.micro_batch_size=4"]  # 4 ranks: TP2 x DP2, one micro batch each
REFERENCE = COMMON + ["parallel.tp=1", "train.micro_batch_size=8"]  # one process, the whole batch at once
RANK_ENV = {"OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "eth0"}  # eth0: every node's one interface
TIMEOUT = 480  # generous: a DeepSpeed comm-op rebuild by another user of ~/.cache/torch_extensions costs minutes


@pytest.fixture(scope="module")
def cluster():
    skip_unless_cluster(ssh=True)
    # DeepSpeed's comm op built once here, not by four ranks at once (a rank killed mid-build leaves a lock)
    warm_comm_op()
    with VirtualCluster(n=NODES) as c:
        c.start_sshd()
        yield c


@pytest.fixture(scope="module")
def cfg(tmp_path_factory, data_cache):
    return tiny_run_config(tmp_path_factory.mktemp("cluster_launch"), data_cache)


@pytest.fixture(scope="module")
def reference(cfg, tmp_path_factory):
    """Shared with other files' like runs (tests/train_utils.py reference_runs)."""
    return reference_runs([(cfg, REFERENCE + [f"run_dir={tmp_path_factory.mktemp('ref') / 'run'}"])])[0]["losses"]


def _train_args(cfg: Path, run_dir: Path) -> list:
    return ["train", str(cfg)] + [x for o in CLUSTER + [f"run_dir={run_dir}"] for x in ("--set", o)]


def _rank_env(**extra) -> dict:
    return {**env(), **RANK_ENV, **extra}


def _start(cluster, tmp: Path, node: int, argv: list, env: dict, cwd: Path = ROOT) -> subprocess.Popen:
    """``argv`` on ``node``, its output in a log file (pipes read one by one could fill and stall it)."""
    log = tmp / f"node{node}-{len(list(tmp.glob('*.log')))}.log"
    with open(log, "w") as fh:
        proc = cluster.popen(node, argv, env=env, cwd=cwd, stdout=fh, stderr=subprocess.STDOUT)
    proc.log = log
    return proc


def _finish(procs, what: str) -> None:
    for p in procs:
        try:
            p.wait(timeout=TIMEOUT)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
    bad = [(p.returncode, p.log.read_text()[-5000:]) for p in procs if p.returncode != 0]
    assert not bad, f"{what} failed: {bad}"


def _check(run_dir: Path, reference: list, launcher: str) -> None:
    report = json.loads((run_dir / "report.json").read_text())
    assert (report["world_size"], report["tp"], report["dp"], report["launcher"]) == (4, 2, 2, launcher)
    assert sorted(report["hosts"]) == ["vnode1", "vnode1", "vnode2", "vnode2"], report["hosts"]
    assert rel_diff(report["losses"], reference) <= TOLERANCE["fp32"], (report["losses"], reference)


def test_deepspeed_hostfile_through_pdsh_and_ssh(cluster, cfg, reference, tmp_path):
    """The runner on vnode1 ssh-es (via pdsh) into both nodes; variables reach the ranks only through
    what it exports (PYTHON*) and .deepspeed_env in its working directory, as on a real cluster."""
    # PATH too: under sshd's default PATH a rank JIT-loading DeepSpeed's comm op finds the system ninja,
    # whose log hashes differ from the venv's, and rebuilds the op every ~/.cache user shares (minutes)
    ds_env = {**RANK_ENV, "PATH": env()["PATH"]}
    (tmp_path / ".deepspeed_env").write_text("".join(f"{k}={v}\n" for k, v in ds_env.items()))
    argv = [str(BIN / "deepspeed"), "--hostfile", str(cluster.hostfile(PER_NODE)), "--launcher", "pdsh",
            "--no_ssh_check", "--master_addr", cluster.nodes[0].ip, "--master_port", "29500",
            "--module", "megallama"] + _train_args(cfg, tmp_path / "run")
    proc = _start(cluster, tmp_path, 0, argv, {**env(), **cluster.ssh_env()}, cwd=tmp_path)
    _finish([proc], "deepspeed --hostfile")
    _check(tmp_path / "run", reference, "deepspeed")


def test_torchrun_c10d_rendezvous_across_nodes(cluster, cfg, reference, tmp_path):
    endpoint = f"{cluster.nodes[0].ip}:29400"
    procs = [_start(cluster, tmp_path, i, [sys.executable, "-m", "torch.distributed.run", "--nnodes", str(NODES),
                                           "--nproc_per_node", str(PER_NODE), "--rdzv_backend", "c10d",
                                           "--rdzv_endpoint", endpoint, "--rdzv_id", "vcluster", "-m", "megallama"]
                    + _train_args(cfg, tmp_path / "run"), _rank_env()) for i in range(NODES)]
    _finish(procs, "torchrun --nnodes 2")
    _check(tmp_path / "run", reference, "torchrun")


def test_mpiexec_hosts_file_over_ssh(cluster, cfg, reference, tmp_path):
    hosts = tmp_path / "hosts"
    hosts.write_text("".join(f"{n.name}:{PER_NODE}\n" for n in cluster.nodes))
    argv = [str(BIN / "mpiexec"), *cluster.ssh.mpiexec_args(), "-f", str(hosts), "-n", str(NODES * PER_NODE),
            "-ppn", str(PER_NODE), "-genvall", sys.executable, "-m", "megallama"] + _train_args(cfg, tmp_path / "run")
    proc = _start(cluster, tmp_path, 0, argv, _rank_env())
    _finish([proc], "mpiexec -f hosts")
    _check(tmp_path / "run", reference, "mpi")


def _srun_env(node: int, local: int, nodelist: str) -> dict:
    """What ``srun -N2 --ntasks-per-node=2`` gives task (node, local), and nothing more (no MASTER_*)."""
    rank = node * PER_NODE + local
    e = _rank_env(SLURM_PROCID=str(rank), SLURM_NTASKS=str(NODES * PER_NODE), SLURM_NPROCS=str(NODES * PER_NODE),
                  SLURM_LOCALID=str(local), SLURM_NODEID=str(node), SLURM_JOB_NODELIST=nodelist,
                  SLURM_NODELIST=nodelist, SLURM_STEP_NODELIST=nodelist, SLURM_JOB_NUM_NODES=str(NODES),
                  SLURM_NNODES=str(NODES), SLURM_NTASKS_PER_NODE=str(PER_NODE),
                  SLURM_TASKS_PER_NODE=f"{PER_NODE}(x{NODES})", SLURM_STEP_TASKS_PER_NODE=f"{PER_NODE}(x{NODES})",
                  SLURM_JOB_ID="4242", SLURM_STEP_ID="0", SLURMD_NODENAME=f"vnode{node + 1}",
                  SLURM_TOPOLOGY_ADDR=f"vnode{node + 1}", SLURM_CPUS_ON_NODE=str(PER_NODE))
    for k in ("MASTER_ADDR", "MASTER_PORT"):
        e.pop(k, None)
    return e


def test_slurm_shaped_start_per_node(cluster, cfg, reference, tmp_path):
    procs = [_start(cluster, tmp_path, node, [sys.executable, "-m", "megallama"] + _train_args(cfg, tmp_path / "run"),
                    _srun_env(node, local, cluster.slurm_nodelist))
             for node in range(NODES) for local in range(PER_NODE)]
    _finish(procs, f"srun-shaped start on {cluster.slurm_nodelist}")
    _check(tmp_path / "run", reference, "slurm")


def test_network_measures_between_the_two_nodes(cluster, tmp_path):
    """``megallama network`` under torchrun on both nodes: ranks grouped by their real hostnames,
    both rings timed over the veth link, the profile written on the first node."""
    from megallama.profiling.hardware import load_profile_file
    from tests.test_network_share import lab_profile

    gpu, out = lab_profile(tmp_path), tmp_path / "cluster.yaml"
    endpoint = f"{cluster.nodes[0].ip}:29401"
    procs = [_start(cluster, tmp_path, i, [sys.executable, "-m", "torch.distributed.run", "--nnodes", str(NODES),
                                           "--nproc_per_node", str(PER_NODE), "--rdzv_backend", "c10d",
                                           "--rdzv_endpoint", endpoint, "--rdzv_id", "vnetwork", "-m", "megallama",
                                           "network", "--gpu", str(gpu), "--out", str(out), "--mib", "4",
                                           "--reps", "3"], _rank_env()) for i in range(NODES)]
    _finish(procs, "megallama network over torchrun --nnodes 2")
    text = out.read_text()
    assert "2 nodes" in text and "world (4, 2) all_gather" in text and "rail (2, 1) reduce_scatter" in text
    assert 0 < load_profile_file(out).cross_node_share <= 1
