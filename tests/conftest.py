"""Shared fixtures: one embedded-corpus cache for every training test in the session."""
import pytest


@pytest.fixture(scope="session")
def data_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("data_cache")
