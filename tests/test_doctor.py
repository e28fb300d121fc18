"""``megallama doctor``: each check seen failing on a broken set-up and passing on a good one,
with a fake machine and network (the virtual-cluster test, tests/test_cluster_doctor.py, runs
it for real); the probe script run by a real shell; bad hostfiles refused with file:line."""
from __future__ import annotations

import contextlib
import json
import os
import socket
import sys
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import pytest

from megallama.doctor.checks import check_interface
from megallama.doctor.diagnose import diagnose
from megallama.doctor.hostfile import parse_hostfile
from megallama.doctor.model import Host, Setup
from megallama.doctor.probe import MARK, parse_probe, remote_script, ssh_argv
from megallama.doctor.system import System
from megallama.errors import UserError
from tests.conftest_data import assert_one_line_error, cli

ADDR = {"node0": "10.0.0.1", "node1": "10.0.0.2", "node2": "10.0.0.3"}


@dataclass
class Node:
    """How a fake remote host answers the probe."""

    ssh: str = ""  # "": answers; else ssh's error line
    python: bool = True
    gpus: str = "cpu"
    shared: bool = True
    port_open: bool = True
    ifaces: str = "lo eth0"
    hostaddr: str = "10.0.0.9"
    delay: float = 0.0


@dataclass
class FakeSystem(System):
    """This host is node0 (10.0.0.1 on eth0); every other contact is answered from ``nodes``."""

    nodes: Dict[str, Node] = field(default_factory=dict)
    names: Dict[str, List[str]] = field(default_factory=lambda: dict(ADDR, localhost=["127.0.0.1"]))
    busy: Optional[str] = None
    tools: tuple = ("ssh", "pdsh")
    own_name_addr: str = "10.0.0.1"
    calls: List[List[str]] = field(default_factory=list)
    listened: List[int] = field(default_factory=list)
    writable: bool = True

    def run(self, argv, timeout):
        self.calls.append(argv)
        assert argv[0] == "ssh" and timeout <= 60, argv
        host, node = argv[-2], self.nodes[argv[-2]]
        time.sleep(node.delay)
        if node.ssh:
            return 255, "", f"ssh: connect to host {host}: {node.ssh}\n"
        script = argv[-1]
        out = [MARK, f"python={int(node.python)}", "cwd=1", f"gpus={node.gpus}", f"ifaces={node.ifaces}",
               f"hostaddr={node.hostaddr}"]
        if "test -f" in script:
            out.append(f"shared={int(node.shared)}")
        if "create_connection" in script:
            out.append(f"port={int(node.port_open)}")
        return 0, "\n".join(out) + "\n", ""

    def which(self, tool):
        return f"/usr/bin/{tool}" if tool in self.tools else None

    def resolve(self, name):
        v = self.own_name_addr if name == "me" else self.names.get(name, [])
        return [v] if isinstance(v, str) else v

    def hostname(self):
        return "me"

    def interfaces(self):
        return {"lo": ["127.0.0.1"], "eth0": ["10.0.0.1"]}

    def route_source(self, addr):
        return "127.0.0.1" if addr.startswith("127.") else "10.0.0.1"

    def port_problem(self, port):
        return self.busy

    @contextlib.contextmanager
    def listening(self, port):
        self.listened.append(port)
        yield True

    def local_gpus(self):
        return "cpu"

    def write_token(self, directory):
        return super().write_token(directory) if self.writable else None


def _setup(tmp_path, hosts=("node0", "node1"), slots=1, **kw) -> Setup:
    base = dict(hostfile="hf", hosts=[Host(h, slots, i + 1) for i, h in enumerate(hosts)], master_addr=hosts[0],
                master_from="the hostfile's first host", master_port=29511, run_dir=str(tmp_path), env={})
    base.update(kw)
    return Setup(**base)


def _fake(**nodes) -> FakeSystem:
    return FakeSystem(nodes={"node0": Node(hostaddr="10.0.0.1"), "node1": Node(hostaddr="10.0.0.2"),
                             "node2": Node(hostaddr="10.0.0.3"), **nodes})


def _problems(results, check=None) -> List[str]:
    return [p.line() for r in results for p in r.problems if check in (None, r.check)]


def test_good_setup_passes_every_check(tmp_path):
    fake = _fake()
    results = diagnose(_setup(tmp_path, ("node0", "node1", "node2")), fake)
    assert _problems(results) == [] and all(r.lines()[0].startswith("ok   ") for r in results)
    assert fake.listened == [29511]  # the other hosts connected to a listener on the master port
    assert os.listdir(tmp_path) == []  # the sharing token is removed
    for argv in fake.calls:
        assert argv[:5] == ["ssh", "-o", "BatchMode=yes", "-o", "ConnectTimeout=5"]


@pytest.mark.parametrize("broken,check,needles", [
    (dict(names=dict(ADDR, node1=[])), "resolve", ["[node1]", "does not resolve", "hostfile line 2"]),
    (dict(node1=Node(ssh="Permission denied (publickey).")), "ssh", ["[node1]", "password-less", "ssh-copy-id node1"]),
    (dict(node1=Node(ssh="Connection timed out")), "ssh", ["[node1]", "unreachable"]),
    (dict(node1=Node(ssh="Connection refused")), "ssh", ["[node1]", "start sshd"]),
    (dict(tools=("ssh",)), "tools", ["pdsh is not on PATH", "apt-get install pdsh"]),
    (dict(node1=Node(python=False)), "environment", ["[node1]", sys.executable, "same path"]),
    (dict(busy="Address already in use"), "port", ["29511 cannot be bound", "Address already in use"]),
    (dict(node1=Node(port_open=False)), "port", ["[node1]", "cannot connect to node0:29511"]),
    (dict(node1=Node(gpus="4")), "devices", ["[node1]", "4 GPU(s) but slots=8", "set slots=4"]),
    (dict(node1=Node(gpus="error")), "devices", ["[node1]", "nvidia-smi -L failed"]),
    (dict(node1=Node(shared=False)), "run-dir", ["[node1]", "not shared", "checkpoint.storage: node_local"]),
    (dict(node1=Node(hostaddr="127.0.1.1")), "interface", ["[node1]", "127.0.1.1", "GLOO_SOCKET_IFNAME=eth0"]),
    (dict(own_name_addr="127.0.1.1"), "interface", ["[me (here)]", "127.0.1.1"]),
])
def test_each_broken_setup_is_one_line_naming_the_fix(tmp_path, broken, check, needles):
    broken = dict(broken)
    slots = 8 if check == "devices" else 1
    fake = _fake(**{k: broken.pop(k) for k in list(broken) if isinstance(broken[k], Node)})
    if slots == 8:
        fake.nodes["node0"].gpus = "8"
    for k, v in broken.items():
        setattr(fake, k, v)
    results = diagnose(_setup(tmp_path, slots=slots), fake)
    lines = _problems(results)
    assert len(lines) == 1, lines  # just this one problem, in one line
    assert lines[0].startswith(f"FAIL {check}") and "; fix: " in lines[0] and "\n" not in lines[0]
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    good = _fake()
    if slots == 8:
        good.nodes["node0"].gpus = good.nodes["node1"].gpus = "8"
    assert _problems(diagnose(_setup(tmp_path, slots=slots), good)) == []  # the same set-up, repaired


def test_master_address_loopback_across_hosts(tmp_path):
    fake = _fake()
    lines = _problems(diagnose(_setup(tmp_path, master_addr="localhost", master_from="MASTER_ADDR"), fake), "master")
    assert len(lines) == 1 and "localhost (MASTER_ADDR) is loopback (127.0.0.1)" in lines[0] and "2 machines" in lines[0]
    # on one node loopback is right
    one = diagnose(_setup(tmp_path, ("node0",), master_addr="localhost", master_from="MASTER_ADDR"), fake)
    assert _problems(one) == []


def test_socket_ifname_variables_must_name_interfaces_every_host_has(tmp_path):
    fake = _fake(node1=Node(ifaces="lo ens5"))
    env = {"GLOO_SOCKET_IFNAME": "eth0", "NCCL_SOCKET_IFNAME": "^docker,lo"}
    lines = _problems(diagnose(_setup(tmp_path, env=env), fake))
    assert len(lines) == 1 and "[node1]" in lines[0] and "GLOO_SOCKET_IFNAME=eth0: no interface named 'eth0'" in lines[0]
    lines = _problems(diagnose(_setup(tmp_path, env={"NCCL_SOCKET_IFNAME": "eth", "GLOO_SOCKET_IFNAME": "lo"}), fake))
    assert any("[node1]" in x and "NCCL_SOCKET_IFNAME=eth: no interface starting 'eth'" in x for x in lines), lines
    assert any("GLOO_SOCKET_IFNAME=lo is loopback" in x and "set GLOO_SOCKET_IFNAME=eth0" in x for x in lines), lines
    assert _problems(diagnose(_setup(tmp_path, env={"NCCL_SOCKET_IFNAME": "e"}), _fake(node1=Node(ifaces="eth1")))) == []


def test_interface_names_the_route_to_the_master(tmp_path):
    r = check_interface(_setup(tmp_path), _findings_of(tmp_path))
    assert r.ok and r.summary == "node0 is reached via eth0 (10.0.0.1)"


def _findings_of(tmp_path):
    from megallama.doctor.checks import Findings

    return Findings(resolved={"node0": ["10.0.0.1"]}, facts={}, tools={}, local_ifaces=FakeSystem().interfaces(),
                    local_hostname="me", local_hostname_addr="10.0.0.1", master_local=True, port_busy=None,
                    route_source="10.0.0.1")


def test_node_local_storage_makes_an_unshared_run_dir_fine_and_an_unwritable_one_is_named(tmp_path):
    fake = _fake(node1=Node(shared=False))
    r = [x for x in diagnose(_setup(tmp_path, node_local_ok=True), fake) if x.check == "run-dir"][0]
    assert r.ok and "checkpoint.storage: node_local" in r.summary
    fake.writable = False
    assert "cannot write a test file" in _problems(diagnose(_setup(tmp_path), fake), "run-dir")[0]


def test_layout_that_does_not_fit_the_slots(tmp_path):
    lines = _problems(diagnose(_setup(tmp_path, config="c.yaml", config_world_problem="world size 3 is not ..."),
                               _fake()), "layout")
    assert lines == ["FAIL layout: world size 3 is not ...; fix: change parallel.tp/pp or the hostfile's slots"]


def test_hosts_are_probed_in_parallel(tmp_path):
    hosts = [f"n{i}" for i in range(64)]
    fake = FakeSystem(nodes={h: Node(delay=0.2) for h in hosts}, names={h: ["10.1.0.%d" % i] for i, h in enumerate(hosts)})
    start = time.perf_counter()
    results = diagnose(_setup(tmp_path, hosts, master_addr="n0"), fake)
    assert time.perf_counter() - start < 3.0  # 64 x 0.2 s one after another would be 12.8 s
    assert len(fake.calls) == 64 and not _problems(results, "ssh")


def test_ssh_is_batch_mode_with_a_connect_timeout_and_pdsh_args():
    argv = ssh_argv("node1", "true", {"PDSH_SSH_ARGS_APPEND": "-p 2222 -o StrictHostKeyChecking=no"})
    assert argv == ["ssh", "-o", "BatchMode=yes", "-o", "ConnectTimeout=5", "-p", "2222", "-o",
                    "StrictHostKeyChecking=no", "node1", "true"]


def test_the_probe_script_runs_in_a_real_shell(tmp_path):
    """The script a remote host runs, run here by sh: every fact comes back, the token is seen,
    the port test connects to a real listener."""
    system = System()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    token = system.write_token(str(tmp_path))
    setup = _setup(tmp_path, master_addr="127.0.0.1", master_port=port)
    with system.listening(port) as ok:
        assert ok
        rc, out, err = system.run(["sh", "-c", remote_script(setup, token, True)], timeout=30)
    facts = parse_probe(rc, out, err)
    assert facts.reached and facts.python and facts.cwd and facts.shared and facts.port_open, (out, err)
    assert facts.gpus == system.local_gpus() and "lo" in facts.interfaces
    system.remove(token)
    rc, out, err = system.run(["sh", "-c", remote_script(setup, token, True)], timeout=30)
    facts = parse_probe(rc, out, err)
    assert facts.shared is False and facts.port_open is False
    assert parse_probe(255, "", "x\nssh: connect to host n: No route to host\n").error.endswith("No route to host")


def test_real_system_bounds_and_busy_port():
    system = System()
    start = time.perf_counter()
    assert system.run([sys.executable, "-c", "import time; time.sleep(30)"], timeout=0.5)[0] == 124
    assert time.perf_counter() - start < 10
    assert system.run(["/nonexistent/tool"], timeout=1)[0] == 127
    with socket.socket() as s:
        s.bind(("", 0))
        s.listen(1)
        assert "in use" in system.port_problem(s.getsockname()[1]).lower()
    assert system.resolve("localhost") and system.resolve("no-such-host.invalid") == []


@pytest.mark.parametrize("text,needle", [
    ("node1 slots=2\nnode2 slots=two\n", ":2: slots must be a positive integer, got 'two'"),
    ("# nodes\n\nnode1 slots=0\n", ":3: slots must be a positive integer, got '0'"),
    ("node1 slots=2\nnode1 slots=2\n", ":2: host node1 is listed again (first at line 1)"),
    ("node1\n", ":1: expected 'host slots=N', got 'node1'"),
    ("node1 gpus=8\n", ":1: expected 'host slots=N'"),
    ("# only a comment\n", "no 'host slots=N' lines"),
    (b"\xff\xfe\x00", "not UTF-8 text"),
])
def test_bad_hostfile_is_exit_2_with_file_and_line(tmp_path, capsys, text, needle):
    path = tmp_path / "hostfile"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    rc, out, err = cli(capsys, "doctor", "--hostfile", path)
    assert rc == 2 and out == ""
    assert_one_line_error(rc, err, "megallama doctor: error: ", str(path), needle)


def test_hostfile_comments_and_blank_lines(tmp_path):
    (tmp_path / "h").write_text("# cluster\nnode1 slots=8  # first\n\n   node2   slots=4\n")
    assert parse_hostfile(str(tmp_path / "h")) == [Host("node1", 8, 2), Host("node2", 4, 4)]
    with pytest.raises(UserError, match="cannot read"):
        parse_hostfile(str(tmp_path / "missing"))


@pytest.mark.parametrize("argv,needle", [
    (["--master-port", "0"], "--master-port: expected a port number 1-65535, got '0'"),
    (["--master-port", "70000"], "--master-port: expected a port number"),
    (["--master-addr", "a b"], "--master-addr: expected a host name or address"),
])
def test_bad_arguments_are_exit_2(capsys, argv, needle):
    rc, out, err = cli(capsys, "doctor", *argv)
    assert rc == 2
    assert_one_line_error(rc, err, needle)


def test_cli_prints_problems_on_stdout_and_one_error_line(tmp_path, capsys, monkeypatch):
    hf = tmp_path / "hostfile"
    hf.write_text("node0 slots=1\nnode1 slots=1\n")
    fake = _fake(node1=Node(ssh="Permission denied (publickey)."))
    monkeypatch.setattr("megallama.doctor.system.System", lambda: fake)
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    rc, out, err = cli(capsys, "doctor", "--hostfile", hf, "--run-dir", tmp_path / "run", "--master-port", "29533")
    assert rc == 1 and err == "megallama doctor: error: 1 problem(s) would break this launch (listed above)\n"
    assert [x for x in out.splitlines() if x.startswith("FAIL")] == [
        "FAIL ssh [node1]: ssh refuses password-less login; fix: add this user's public key to "
        "node1:~/.ssh/authorized_keys (ssh-copy-id node1)"]
    assert sum(x.startswith("ok   ") for x in out.splitlines()) == 10
    rc, out, _ = cli(capsys, "doctor", "--hostfile", hf, "--json", "--master-port", "29533")
    report = json.loads(out)
    assert rc == 1 and report["ok"] is False and report["problems"] == 1
    assert [c["problems"][0]["host"] for c in report["checks"] if not c["ok"]] == ["node1"]
    fake.nodes["node1"] = Node()
    assert cli(capsys, "doctor", "--hostfile", hf, "--master-port", "29533")[0] == 0


def test_one_node_here_passes(capsys, tmp_path):
    with socket.socket() as s:
        s.bind(("", 0))
        port = s.getsockname()[1]
    rc, out, err = cli(capsys, "doctor", "--master-port", port, "--run-dir", tmp_path)
    assert rc == 0 and err == "" and all(x.startswith("ok   ") for x in out.splitlines()), out


def test_master_on_another_host_is_not_port_tested_here_and_an_unresolvable_master_is_one_line(tmp_path):
    fake = _fake()
    results = diagnose(_setup(tmp_path, master_addr="node1", master_from="MASTER_ADDR"), fake)
    port = next(r for r in results if r.check == "port")
    assert _problems(results) == [] and "the master is another host" in port.summary and fake.listened == []
    fake.names["node0"] = []  # the first host, hence the master, does not resolve: named once, by resolve
    assert [x.split(":")[0] for x in _problems(diagnose(_setup(tmp_path), fake))] == ["FAIL resolve [node0]"]
