"""Shared fixtures: one embedded-corpus cache for every training test in the session.

Property-based tests run derandomized by default, so CI is a fixed gate; set
``HYPOTHESIS_PROFILE=explore`` to draw fresh examples each run (do it before changing a parser).
"""
import glob
import os
import time

import pytest
from hypothesis import settings

from megallama.train.comm_buffers import PREFIX, SHM_DIR
from megallama.train.warmup_ops import use_this_interpreters_ninja

# Every process the tests start (spawned ranks that call deepspeed.init_distributed directly, too)
# builds DeepSpeed's comm op with the venv's ninja, as `make`'s warm-up and megallama's own ranks
# do; a rank finding the system's ninja first would rebuild the shared op (tens of seconds, twice).
use_this_interpreters_ninja()

settings.register_profile("ci", derandomize=True, deadline=None)  # a gate on results, not on speed
settings.register_profile("explore", derandomize=False, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


_SESSION_START = time.time()
# A rank creates its buffer, then maps it: one just created and not yet mapped (another pytest
# session's run, under load) must not be taken for a dead rank's, or its peers wait for it forever.
SHM_SETTLE_S = 120


def _mapped_files() -> set:
    found = set()
    for maps in glob.glob("/proc/[0-9]*/maps"):
        try:
            with open(maps) as f:
                found.update(line.split(None, 5)[-1].strip() for line in f if "/dev/shm/" in line)
        except OSError:
            continue
    return found


@pytest.fixture(autouse=True, scope="module")
def no_leaked_shared_memory():
    """Ranks a test kills leave DeepSpeed's shared-memory all-reduce buffers in /dev/shm (tens of
    MB per rank, held in RAM); left to pile up over a session they shrink the RAM later tests'
    memory checks see. Remove those this session made that no live process maps."""
    yield
    mapped = _mapped_files()
    settled = time.time() - SHM_SETTLE_S
    for path in glob.glob(str(SHM_DIR / f"{PREFIX}_*")):
        try:
            if _SESSION_START <= os.stat(path).st_mtime <= settled and path not in mapped:
                os.unlink(path)
        except OSError:
            continue


@pytest.fixture(scope="session")
def data_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("data_cache")


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: hours-long; deselected unless selected with -m slow")


def pytest_collection_modifyitems(config, items):
    """Slow tests run only when a marker expression names them (``pytest -m slow``)."""
    if "slow" in (config.getoption("markexpr") or ""):
        return
    slow = [item for item in items if item.get_closest_marker("slow")]
    if slow:
        config.hook.pytest_deselected(items=slow)
        items[:] = [item for item in items if not item.get_closest_marker("slow")]
