"""Every contact the doctor has with this machine and the network, each bounded in time. Tests
replace :class:`System` with a fake; nothing here decides what is a problem."""
from __future__ import annotations

import contextlib
import ipaddress
import os
import shutil
import socket
import subprocess
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple, TypeVar

T = TypeVar("T")
R = TypeVar("R")

RESOLVE_TIMEOUT_S = 5.0


def per_host(fn: Callable[[T], R], items: Sequence[T], workers: int = 64) -> List[R]:
    """``fn`` over ``items`` in threads: 64 hosts cost about one host's time, not 64 times it."""
    if len(items) <= 1:
        return [fn(x) for x in items]
    with ThreadPoolExecutor(max_workers=min(workers, len(items))) as pool:
        return list(pool.map(fn, items))


def is_loopback(addr: str) -> bool:
    try:
        return ipaddress.ip_address(addr.split("%", 1)[0]).is_loopback
    except ValueError:
        return False


class System:
    """The real machine."""

    def run(self, argv: List[str], timeout: float) -> Tuple[int, str, str]:
        """Run ``argv`` (no shell); a timeout is rc 124, as coreutils' ``timeout`` reports it."""
        try:
            p = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL,
                               errors="replace")
        except subprocess.TimeoutExpired:
            return 124, "", f"no answer within {timeout:g} s"
        except OSError as exc:
            return 127, "", f"{argv[0]}: {exc.strerror or exc}"
        return p.returncode, p.stdout, p.stderr

    def which(self, tool: str) -> Optional[str]:
        return shutil.which(tool)

    def resolve(self, name: str) -> Optional[List[str]]:
        """The addresses ``name`` resolves to, [] if it does not, None if the resolver did not
        answer in time (getaddrinfo has no timeout of its own: it runs in a daemon thread)."""
        box: Dict[str, List[str]] = {}

        def work():
            try:
                infos = socket.getaddrinfo(name, None, proto=socket.IPPROTO_TCP)
                box["a"] = list(dict.fromkeys(i[4][0] for i in infos))
            except (OSError, UnicodeError, ValueError):
                box["a"] = []

        t = threading.Thread(target=work, daemon=True)
        t.start()
        t.join(RESOLVE_TIMEOUT_S)
        return box.get("a")

    def hostname(self) -> str:
        return socket.gethostname()

    def interfaces(self) -> Dict[str, List[str]]:
        """Interface name -> its addresses (``ip -o addr``); names alone where ``ip`` is missing."""
        names = {name: [] for _, name in socket.if_nameindex()}
        rc, out, _ = self.run(["ip", "-o", "addr", "show"], timeout=5)
        if rc == 0:
            for line in out.splitlines():
                parts = line.split()
                if len(parts) > 3 and parts[2] in ("inet", "inet6"):
                    names.setdefault(parts[1].split("@")[0], []).append(parts[3].split("/")[0])
        return names

    def route_source(self, addr: str) -> Optional[str]:
        """The source address this host uses to reach ``addr``: a UDP connect sends nothing but
        makes the kernel pick the route."""
        family = socket.AF_INET6 if ":" in addr else socket.AF_INET
        try:
            with socket.socket(family, socket.SOCK_DGRAM) as s:
                s.connect((addr, 9))
                return s.getsockname()[0]
        except OSError:
            return None

    def port_problem(self, port: int) -> Optional[str]:
        """Why ``port`` cannot be listened on here, or None. SO_REUSEADDR as the c10d store sets
        it, so a port in TIME_WAIT is not reported busy."""
        try:
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                s.bind(("", port))
                s.listen(1)
        except OSError as exc:
            return exc.strerror or str(exc)
        return None

    @contextlib.contextmanager
    def listening(self, port: int) -> Iterator[bool]:
        """Listen on ``port`` meanwhile so other hosts can test reaching it; False if it cannot."""
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(("", port))
            s.listen(64)
        except OSError:
            s.close()
            yield False
            return
        stop = threading.Event()

        def accept():
            s.settimeout(0.2)
            while not stop.is_set():
                with contextlib.suppress(OSError):
                    conn, _ = s.accept()
                    conn.close()

        t = threading.Thread(target=accept, daemon=True)
        t.start()
        try:
            yield True
        finally:
            stop.set()
            t.join(1)
            s.close()

    def local_gpus(self) -> str:
        if not self.which("nvidia-smi"):
            return "cpu"
        rc, out, _ = self.run(["nvidia-smi", "-L"], timeout=15)
        return str(sum(line.startswith("GPU ") for line in out.splitlines())) if rc == 0 else "error"

    def write_token(self, directory: str) -> Optional[str]:
        """A fresh file in ``directory``, its path; None if it cannot be written."""
        path = os.path.join(directory, f".megallama-doctor-{os.getpid()}-{os.urandom(4).hex()}")
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            os.close(fd)
        except OSError:
            return None
        return path

    def remove(self, path: str) -> None:
        with contextlib.suppress(OSError):
            os.unlink(path)
