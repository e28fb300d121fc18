"""The typed objects the doctor passes around: what was asked, what was found, what is wrong."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional


@dataclass(frozen=True)
class Problem:
    """One thing that would break the launch, and what to do about it."""

    check: str
    host: Optional[str]
    message: str
    fix: str

    def line(self) -> str:
        where = f" [{self.host}]" if self.host else ""
        return f"FAIL {self.check}{where}: {self.message}; fix: {self.fix}"


@dataclass
class CheckResult:
    check: str
    summary: str  # the ok line's text, or what was checked
    problems: List[Problem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def lines(self) -> List[str]:
        return [f"ok   {self.check}: {self.summary}"] if self.ok else [p.line() for p in self.problems]

    def as_dict(self) -> dict:
        return {"check": self.check, "ok": self.ok, "summary": self.summary,
                "problems": [asdict(p) for p in self.problems]}


@dataclass(frozen=True)
class Host:
    name: str
    slots: int
    line: int  # in the hostfile, for messages


@dataclass
class Facts:
    """What one host reported (over ssh, or read here for this host). ``None``: not learnt."""

    reached: bool = False
    error: str = ""  # why not reached: ssh's own last line, or a timeout
    python: Optional[bool] = None  # the launching interpreter exists at the same path
    cwd: Optional[bool] = None  # the launch directory exists (pdsh cds into it)
    gpus: Optional[str] = None  # a count, or "cpu"
    shared: Optional[bool] = None  # sees the token file written here
    port_open: Optional[bool] = None  # reaches the master port
    interfaces: Optional[List[str]] = None
    hostname_addr: Optional[str] = None  # what the host's own name resolves to there (gloo binds it)


@dataclass
class Setup:
    """The launch being checked."""

    hostfile: Optional[str]
    hosts: List[Host]
    master_addr: str
    master_from: str  # where master_addr came from, for messages
    master_port: int
    run_dir: Optional[str]  # absolute; the directory checkpoints are written under
    node_local_ok: bool = False  # checkpoint.storage: node_local
    env: Dict[str, str] = field(default_factory=dict)
    config: Optional[str] = None  # the run config read, if any
    config_world_problem: Optional[str] = None

    @property
    def multi_node(self) -> bool:
        return len(self.hosts) > 1
