"""``megallama doctor`` on the virtual cluster: run on node 0 against a hostfile of the nodes, a
good set-up passes and each deliberately broken one (a wrong host name, a node whose link is
down, ssh refusing a node's key, a loopback master address, a busy master port, a run directory
only one node sees) produces its own one FAIL line and nothing else. One cluster, ~30 s."""
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from tests.cluster.fixtures import virtual_cluster  # noqa: F401 (fixture)
from tests.train_utils import env

HOLD_PORT = textwrap.dedent("""
    import socket, sys, time
    s = socket.create_server(("0.0.0.0", int(sys.argv[1])))
    print("ready", flush=True)
    time.sleep(120)
""")


def _doctor(c, hostfile, *extra, env_extra=None, ssh_config=None):
    e = {**env(), **c.ssh_env(), **(env_extra or {})}
    e.pop("MASTER_ADDR", None)
    if ssh_config:
        e["PDSH_SSH_ARGS_APPEND"] = f"-F {ssh_config}"
    e.update(env_extra or {})
    out = c.run(0, [sys.executable, "-m", "megallama", "doctor", "--hostfile", str(hostfile), *map(str, extra)],
                env=e, timeout=60, check=False)
    fails = [x for x in out.stdout.splitlines() if x.startswith("FAIL")]
    assert "Traceback" not in out.stderr, out.stderr
    return out.returncode, fails, out


def _refusing_config(c, node: str) -> Path:
    """The cluster's ssh config, but ``node`` is offered only a key its sshd never authorized."""
    bad = c.tmp / "ssh" / "unauthorized_ed25519"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(bad)], check=True, timeout=30)
    good = c.ssh.client_key
    text = c.ssh.config.read_text().replace(f"  IdentityFile {good}\n", "")
    path = c.tmp / "ssh" / "ssh_config_refusing"
    path.write_text(f"Host {node}\n  IdentityFile {bad}\nHost * !{node}\n  IdentityFile {good}\n{text}")
    return path


def test_doctor_on_the_virtual_cluster(virtual_cluster, tmp_path):  # noqa: F811
    start = time.monotonic()
    local = tmp_path / "local"
    c = virtual_cluster(n=2, local_dir=local, sshd=True)
    hostfile = c.hostfile(slots=2)
    port = 29400 + c._subnet % 500
    good = ("--run-dir", c.shared_dir / "run", "--master-port", port)

    rc, fails, out = _doctor(c, hostfile, *good)
    assert rc == 0 and fails == [] and out.stderr == "", out.stdout + out.stderr
    assert "ok   interface: vnode1 is reached via eth0" in out.stdout, out.stdout
    assert sum(x.startswith("ok   ") for x in out.stdout.splitlines()) == 11

    wrong = c.tmp / "hostfile_wrong"
    wrong.write_text("vnode1 slots=2\nvnode9 slots=2\n")
    rc, fails, _ = _doctor(c, wrong, *good)
    assert rc == 1 and len(fails) == 1 and fails[0].startswith("FAIL resolve [vnode9]: host name does not resolve"), fails

    c.link_down(1)
    try:
        t0 = time.monotonic()
        rc, fails, _ = _doctor(c, hostfile, *good)
        took = time.monotonic() - t0
    finally:
        c.link_up(1)
    assert rc == 1 and len(fails) == 1 and fails[0].startswith("FAIL ssh [vnode2]: unreachable"), fails
    assert took < 20, took  # ssh's ConnectTimeout, not a hang

    rc, fails, _ = _doctor(c, hostfile, *good, ssh_config=_refusing_config(c, "vnode2"))
    assert rc == 1 and fails == ["FAIL ssh [vnode2]: ssh refuses password-less login; fix: add this user's public "
                                 "key to vnode2:~/.ssh/authorized_keys (ssh-copy-id vnode2)"], fails

    rc, fails, _ = _doctor(c, hostfile, *good, "--master-addr", "127.0.0.1")
    assert rc == 1 and len(fails) == 1 and fails[0].startswith(
        "FAIL master: master address 127.0.0.1 (--master-addr) is loopback (127.0.0.1) but the hosts span 2"), fails

    holder = c.popen(0, [sys.executable, "-c", HOLD_PORT, str(port)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "ready"
        rc, fails, _ = _doctor(c, hostfile, *good)
    finally:
        holder.kill()
        holder.wait()
    assert rc == 1 and len(fails) == 1 and fails[0].startswith(f"FAIL port: master port {port} cannot be bound"), fails

    rc, fails, _ = _doctor(c, hostfile, "--run-dir", local / "run", "--master-port", port)
    assert rc == 1 and len(fails) == 1 and fails[0].startswith(f"FAIL run-dir [vnode2]: {local / 'run'} is not shared"), fails
    assert "checkpoint.storage: node_local" in fails[0]
    assert list(c.node_local(0).iterdir()) == []  # the token written to test sharing is gone
    assert time.monotonic() - start < 60
