"""``train``'s start on CPU times the GEMM once, on every rank at once: the prediction costs with
that rate, and MFU divides by it when no earlier run's peak is cached for this CPU, dtype, threads
and ranks per node; with one cached, MFU keeps it (runs' MFU compare) and nothing else is timed."""
from __future__ import annotations

import json
import os
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist

from megallama.profiling import hardware
from megallama.train.prediction import measure_at_start
from tests.dist_utils import free_port

RATE = 3.25e10


@pytest.fixture
def start(tmp_path, monkeypatch):
    """One rank on CPU, the cache in ``tmp_path``, every GEMM timing recorded as its budget."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    dist.init_process_group("gloo", rank=0, world_size=1)
    timed = []

    def gemm(dtype, budget_s=0.5):
        timed.append(budget_s)
        return RATE

    gemm.__wrapped__ = gemm   # as lru_cache exposes it: the all-rank measurement calls this
    monkeypatch.setattr(hardware, "measure_cpu_gemm_peak", gemm)
    monkeypatch.setenv("MEGALLAMA_CACHE_DIR", str(tmp_path))
    rt = SimpleNamespace(ds={"train_micro_batch_size_per_gpu": 1}, device=SimpleNamespace(type="cpu"),
                         info=SimpleNamespace(world_size=1))
    yield rt, timed, tmp_path / "peak_flops.json"
    dist.destroy_process_group()


def test_one_gemm_timing_serves_the_prediction_and_mfu(start):
    rt, timed, cache = start
    rates, (peak, source) = measure_at_start(rt)
    assert len(timed) == 1 and rates["gemm_flops"] == peak == RATE
    assert "peak measured now on 1 ranks at once" in source and str(cache) in source
    (key, entry), = json.loads(cache.read_text()).items()
    assert key.endswith(f"| fp32 | {torch.get_num_threads()} threads | 1 ranks") and entry["flops"] == RATE


def test_a_cached_peak_is_kept_and_only_the_prediction_measures(start):
    rt, timed, cache = start
    measure_at_start(rt)
    entry = json.loads(cache.read_text())
    key = next(iter(entry))
    entry[key]["flops"] = 1e11   # an earlier run's peak
    cache.write_text(json.dumps(entry))
    first = timed.pop()
    rates, (peak, source) = measure_at_start(rt)
    assert len(timed) == 1 and timed[0] < first   # the prediction's shorter timing; the peak is not timed
    assert rates["gemm_flops"] == RATE and peak == 1e11
    assert f"peak measured {entry[key]['date']}, cached in {cache}" in source
