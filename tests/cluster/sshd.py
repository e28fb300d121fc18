"""Per-cluster ssh: a host key, a client key, an sshd per node and a client config in the
cluster's temp dir. Clients use ``ssh -F <config>`` (pdsh through PDSH_SSH_ARGS_APPEND, mpiexec
through a wrapper script), so ~/.ssh and /etc/ssh are never read or written."""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Dict, List, Optional, Sequence

SSHD = "/usr/sbin/sshd"


def unavailable_reason() -> Optional[str]:
    missing = [b for b in (SSHD, "ssh", "ssh-keygen", "pdsh") if not shutil.which(b)]
    if missing:
        return f"virtual cluster needs {', '.join(missing)} (openssh-server, pdsh: `make system-deps` as root)"
    return None


class SshSetup:
    """Keys and configs under ``root``; ``nodes`` are (hostname, ip) pairs."""

    def __init__(self, root: Path, nodes: Sequence[tuple]):
        self.root = root
        self.nodes = list(nodes)
        self.host_key = root / "host_ed25519"
        self.client_key = root / "id_ed25519"
        self.authorized = root / "authorized_keys"
        self.known_hosts = root / "known_hosts"
        self.sshd_config = root / "sshd_config"
        self.config = root / "ssh_config"
        self.wrapper = root / "ssh"

    def write(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        for key in (self.host_key, self.client_key):
            subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "megallama-vcluster", "-f", str(key)],
                           check=True, capture_output=True, timeout=30)
        self.authorized.write_text(Path(f"{self.client_key}.pub").read_text())
        host_pub = " ".join(Path(f"{self.host_key}.pub").read_text().split()[:2])
        self.known_hosts.write_text("".join(f"{name},{addr} {host_pub}\n" for name, addr in self.nodes))
        self.sshd_config.write_text("\n".join([
            "Port 22", "ListenAddress 0.0.0.0", f"HostKey {self.host_key}",
            f"AuthorizedKeysFile {self.authorized}", "PermitRootLogin prohibit-password",
            "PubkeyAuthentication yes", "PasswordAuthentication no", "KbdInteractiveAuthentication no",
            "UsePAM no", "StrictModes no", "PrintMotd no", "PermitUserEnvironment no",
            "PidFile none", "LogLevel ERROR", ""]))
        self.config.write_text("\n".join([
            "Host *", "  User root", f"  IdentityFile {self.client_key}", "  IdentitiesOnly yes",
            f"  UserKnownHostsFile {self.known_hosts}", "  GlobalKnownHostsFile /dev/null",
            "  StrictHostKeyChecking yes", "  PasswordAuthentication no", "  BatchMode yes",
            "  ConnectTimeout 5", "  LogLevel ERROR", ""]))
        self.wrapper.write_text(f'#!/bin/sh\nexec ssh -F {self.config} "$@"\n')
        self.wrapper.chmod(0o755)

    def sshd_argv(self) -> List[str]:
        return [SSHD, "-D", "-e", "-f", str(self.sshd_config)]

    def ssh_argv(self, host: str, *cmd: str) -> List[str]:
        return ["ssh", "-F", str(self.config), host, *cmd]

    def client_env(self) -> Dict[str, str]:
        """What pdsh (and DeepSpeed's pdsh runner) needs to use this cluster's keys."""
        return {"PDSH_RCMD_TYPE": "ssh", "PDSH_SSH_ARGS_APPEND": f"-F {self.config}"}

    def mpiexec_args(self) -> List[str]:
        return ["-launcher", "ssh", "-launcher-exec", str(self.wrapper)]
