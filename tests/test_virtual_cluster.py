"""The virtual cluster itself: distinct hosts that talk over their own network, node-local
directories the other nodes cannot see, faults on demand, ssh/pdsh between nodes, and nothing left
behind (also after a crashed run)."""
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from tests.cluster import netns
from tests.cluster.fixtures import skip_unless_cluster, virtual_cluster  # noqa: F401 (fixture)
from tests.train_utils import ROOT, env

ECHO_SERVER = textwrap.dedent("""
    import socket, sys
    s = socket.create_server(("0.0.0.0", 7000))
    print("ready", flush=True)
    conn, addr = s.accept()
    conn.sendall(conn.recv(100).upper())
    print(addr[0], flush=True)
""")
ECHO_CLIENT = textwrap.dedent("""
    import socket, sys
    with socket.create_connection((sys.argv[1], 7000), timeout=float(sys.argv[2])) as s:
        s.sendall(b"ping")
        print(s.recv(100).decode())
""")
WHOAMI = textwrap.dedent("""
    import json, os, socket, sys
    local = sys.argv[1]
    open(os.path.join(local, socket.gethostname()), "w").write("x")
    print(json.dumps({"host": socket.gethostname(), "ip": socket.gethostbyname(socket.gethostname()),
                      "peer": socket.gethostbyname(sys.argv[2]), "local": sorted(os.listdir(local))}))
""")


def _running(pid) -> bool:
    """Alive and not a zombie (a killed orphan waits for pid 1 to reap it)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _echo(c, server: int, client: int, timeout: float = 5.0) -> subprocess.CompletedProcess:
    srv = c.popen(server, [sys.executable, "-c", ECHO_SERVER], stdout=subprocess.PIPE, text=True)
    assert srv.stdout.readline().strip() == "ready"
    out = c.run(client, [sys.executable, "-c", ECHO_CLIENT, c.nodes[server].name, str(timeout)],
                check=False, timeout=timeout + 30)
    if out.returncode == 0:
        assert srv.wait(timeout=10) == 0 and srv.stdout.read().strip() == c.nodes[client].ip
    else:
        srv.kill()
        srv.wait()
    return out


def test_nodes_are_distinct_hosts_on_their_own_network(virtual_cluster, tmp_path):
    host_hosts, host_name = Path("/etc/hosts").read_text(), socket.gethostname()
    c = virtual_cluster(n=2, local_dir=tmp_path / "local")
    assert len({n.ip for n in c.nodes}) == 2 and all(n.ip.startswith("10.213.") for n in c.nodes)
    assert _echo(c, server=1, client=0).stdout.strip() == "PING"
    seen = [json.loads(c.run(i, [sys.executable, "-c", WHOAMI, str(tmp_path / "local"), c.nodes[1 - i].name]).stdout)
            for i in range(2)]
    for i, info in enumerate(seen):
        assert info["host"] == c.nodes[i].name and info["ip"] == c.nodes[i].ip
        assert info["peer"] == c.nodes[1 - i].ip
        assert info["local"] == [c.nodes[i].name], "a node sees another node's local directory"
        assert (c.node_local(i) / c.nodes[i].name).exists()
    assert os.listdir(tmp_path / "local") == []  # the host's own view of that path is untouched
    (c.shared_dir / "from_host").write_text("x")
    assert c.run(1, ["cat", str(c.shared_dir / "from_host")]).stdout == "x"
    assert Path("/etc/hosts").read_text() == host_hosts and socket.gethostname() == host_name
    ifaces = c.run(0, ["ip", "-o", "link"]).stdout
    assert " eth0@" in ifaces and all(name not in ifaces for name in ("docker", "ens", "enp"))


def test_link_down_cuts_a_node_off_and_kill_node_stops_all_of_its_processes(virtual_cluster):
    c = virtual_cluster(n=2)
    c.link_down(1)
    assert _echo(c, server=1, client=0, timeout=1.5).returncode != 0
    c.link_up(1)
    assert _echo(c, server=1, client=0).stdout.strip() == "PING"
    sleepers = [c.popen(1, ["sleep", "300"]), c.popen(1, ["sh", "-c", "sleep 300 & sleep 300"])]
    survivor = c.popen(0, ["sleep", "300"])
    time.sleep(0.3)
    assert len(c.pids(1)) >= 3
    c.kill_node(1)
    assert c.pids(1) == [] and all(p.wait(timeout=5) == -signal.SIGKILL for p in sleepers)
    assert survivor.poll() is None


def test_ssh_and_pdsh_between_nodes_use_the_cluster_keys_only(virtual_cluster):
    had_ssh_dir = Path("~/.ssh").expanduser().exists()
    c = virtual_cluster(n=2, sshd=True)
    e = {**env(), **c.ssh_env()}
    out = c.run(0, ["pdsh", "-w", ",".join(n.name for n in c.nodes), "hostname"], env=e).stdout
    assert sorted(out.split("\n")[:-1]) == ["vnode1: vnode1", "vnode2: vnode2"]
    assert c.run(1, c.ssh.ssh_argv("vnode1", "cat", "/proc/sys/kernel/hostname")).stdout.strip() == "vnode1"
    assert Path("~/.ssh").expanduser().exists() == had_ssh_dir


def test_teardown_leaves_nothing_even_after_a_crash(tmp_path):
    """A process that dies holding a cluster leaves it behind; the next cluster removes it."""
    skip_unless_cluster()
    crashed = subprocess.Popen(
        [sys.executable, "-c", "from tests.cluster import VirtualCluster; import sys, time\n"
         "c = VirtualCluster(n=2, local_dir=sys.argv[1]).start(); p = c.popen(0, ['sleep', '300'])\n"
         "time.sleep(0.3); print(c._subnet, c.tmp, p.pid, flush=True); time.sleep(300)", str(tmp_path / "local")],
        stdout=subprocess.PIPE, text=True, cwd=ROOT, env=env())
    subnet, tmp, sleeper = crashed.stdout.readline().split()
    os.kill(crashed.pid, signal.SIGKILL)
    crashed.wait()
    debris = [ns for ns in netns.namespaces() if ns.startswith(f"{netns.PREFIX}{subnet}-")]
    assert len(debris) == 3 and Path(tmp).exists() and _running(sleeper)  # as a crash leaves it
    from tests.cluster import VirtualCluster

    with VirtualCluster(n=2) as c:
        assert not Path(tmp).exists() and not _running(sleeper)
        assert not (set(debris) - {c._net.hub, *c._net.nodes}) & set(netns.namespaces())
        ours = [c._net.hub, *c._net.nodes]
        ours_sleeper = c.popen(1, ["sleep", "300"])
    assert not set(ours) & set(netns.namespaces()) and not c.tmp.exists()
    assert ours_sleeper.poll() is not None
