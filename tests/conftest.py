"""Shared fixtures: one embedded-corpus cache for every training test in the session.

Property-based tests run derandomized by default, so CI is a fixed gate; set
``HYPOTHESIS_PROFILE=explore`` to draw fresh examples each run (do it before changing a parser).
"""
import os

import pytest
from hypothesis import settings

settings.register_profile("ci", derandomize=True)
settings.register_profile("explore", derandomize=False)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


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
