"""The pytest face of the virtual cluster: import ``virtual_cluster`` into a test module."""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterator, List, Optional

import pytest

from tests.cluster.cluster import VirtualCluster, unavailable_reason


def warm_comm_op() -> None:
    """Build DeepSpeed's comm op once, here, before ranks on several nodes race to build it."""
    import subprocess
    import sys

    from tests.train_utils import ROOT, env

    warm = subprocess.run([sys.executable, "-m", "megallama.train.warmup_ops"], env=env(), cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert warm.returncode == 0, warm.stderr[-2000:]


def skip_unless_cluster(ssh: bool = False) -> None:
    """Skip the calling test, with the one-line reason, where no virtual cluster can be made."""
    reason = unavailable_reason(ssh=ssh)
    if reason:
        pytest.skip(reason)


@pytest.fixture
def virtual_cluster() -> Iterator[Callable[..., VirtualCluster]]:
    """``c = virtual_cluster(n=2, local_dir=None, sshd=False)``: torn down after the test, pass or fail."""
    made: List[VirtualCluster] = []

    def make(n: int = 2, local_dir: Optional[Path] = None, sshd: bool = False) -> VirtualCluster:
        skip_unless_cluster(ssh=sshd)
        cluster = VirtualCluster(n=n, local_dir=local_dir)
        made.append(cluster)
        cluster.start()
        if sshd:
            cluster.start_sshd()
        return cluster

    try:
        yield make
    finally:
        for cluster in made:
            cluster.close()
