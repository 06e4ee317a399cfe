"""Tests here that load the offline tiny model share one cache directory (built once per machine)."""

import pytest


@pytest.fixture(scope="module", autouse=True)
def _shared_tiny_cache():
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("POSTTRAIN_CACHE", "/tmp/ptcache")
        yield
