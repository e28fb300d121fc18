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
