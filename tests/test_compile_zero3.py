"""``train.compile`` under ZeRO-3 at two ranks: the compiled blocks run as whole graphs (no break at
DeepSpeed's parameter hooks) and give the eager run's losses and gradient norms."""
import json
from pathlib import Path

import pytest

from tests.train_utils import run_train, tiny_run_config


def _metrics(run_dir: Path, key: str) -> list:
    return [json.loads(x)[key] for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_compile_with_zero3_follows_the_eager_run(tmp_path, data_cache, monkeypatch):
    cfg = tiny_run_config(tmp_path, data_cache, steps=3)
    common = ["deepspeed.zero_optimization.stage=3", "model.n_layers=2"]
    eager = run_train(cfg, common + [f"run_dir={tmp_path / 'eager'}"], world=2)
    monkeypatch.setenv("TORCH_LOGS", "graph_breaks")  # each break is logged to stderr
    compiled = run_train(cfg, common + ["train.compile=true", f"run_dir={tmp_path / 'compiled'}"], world=2)
    assert "torch.compile: 2 transformer blocks" in compiled["stderr"]
    assert "Graph break" not in compiled["stderr"], compiled["stderr"][-3000:]
    assert compiled["losses"] == pytest.approx(eager["losses"], rel=1e-5)
    assert _metrics(tmp_path / "compiled", "grad_norm") == pytest.approx(_metrics(tmp_path / "eager", "grad_norm"),
                                                                         rel=1e-5)
