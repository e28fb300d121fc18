"""Short form of benchmarks/soak.py: 4 ranks, ZeRO-3, TP=2, activation checkpointing; memory
and file descriptors do not grow after warm-up (the 300-step run is recorded in benchmarks/)."""
import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _soak():
    spec = importlib.util.spec_from_file_location("soak", ROOT / "benchmarks" / "soak.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_short_soak_has_no_growth(tmp_path, data_cache):
    soak = _soak()
    records = soak.run(steps=30, ranks=4, run_dir=tmp_path / "run", log_every=2)
    result = soak.analyse(records, warmup_frac=0.3)
    assert result["fd_growth"] <= 0, result
    assert result["rss_growth"] < 0.05, result  # the 300-step benchmark holds the 3% target
    assert len(records) >= 14
