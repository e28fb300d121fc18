"""Mixed precision, loss-scaler skips, the recipe's schedule, and bad input to `megallama train`."""
import json
import subprocess
import sys

import pytest

from megallama.config import TrainConfig
from megallama.train.optim import lr_lambda
from tests.train_utils import ROOT, cli_in_process, env, run_train, tiny_run_config


@pytest.fixture(scope="module")
def cfg(tmp_path_factory, data_cache):
    return tiny_run_config(tmp_path_factory.mktemp("misc"), data_cache)


FP16_ON_CPU = """
import sys
from deepspeed.accelerator import get_accelerator
if get_accelerator().device_name() == "cpu":
    # DeepSpeed's CPU accelerator declares fp16 unsupported (slow, not wrong); lift the flag so
    # its loss scaler can be exercised here. Nothing of megallama's is patched.
    type(get_accelerator()).is_fp16_supported = lambda self: True
from tests.fault_injection import main
sys.exit(main(sys.argv[1:]))
"""


def test_fp16_overflow_is_skipped_and_run_goes_on(cfg, tmp_path):
    run_dir = tmp_path / "run"
    overrides = [f"deepspeed={ROOT}/ds_configs/fp16_zero1.json", "deepspeed.fp16.hysteresis=1", "train.steps=5",
                 f"run_dir={run_dir}"]
    proc = subprocess.run([sys.executable, "-c", FP16_ON_CPU, "--nonfinite-steps", "3", "train", str(cfg)]
                          + [x for o in overrides for x in ("--set", o)], capture_output=True, text=True, env=env(),
                          cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "step 3: optimizer step skipped: non-finite gradients (loss scaler overflow" in proc.stderr
    report = json.loads((run_dir / "report.json").read_text())
    assert report["skipped_steps"] == 1 and report["precision"] == "fp16"
    records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["loss_scale"] < records[0]["loss_scale"]  # the scaler backed off
    assert all(v == v and v != float("inf") for v in report["losses"][3:])  # finite again after the skip
    assert report["losses"][-1] < report["losses"][0]


def test_bf16_runs_on_cpu(cfg, tmp_path):
    report = run_train(cfg, [f"deepspeed={ROOT}/ds_configs/bf16_zero1.json", f"run_dir={tmp_path / 'run'}"])
    assert report["precision"] == "bf16"
    assert report["losses"][-1] < report["losses"][0]
    assert "ZeRO stage 1 with one data-parallel rank partitions nothing" in report["stderr"]  # a hint, once
    assert report["stderr"].count("partitions nothing") == 1


def test_train_compile_follows_the_eager_run(cfg, tmp_path):
    """``train.compile`` compiles the blocks inside the DeepSpeed engine; the losses stay the eager ones."""
    eager = run_train(cfg, ["train.steps=3", f"run_dir={tmp_path / 'eager'}"])
    compiled = run_train(cfg, ["train.steps=3", "train.compile=true", f"run_dir={tmp_path / 'compiled'}"])
    assert "torch.compile: 4 transformer blocks" in compiled["stderr"]
    assert compiled["losses"] == pytest.approx(eager["losses"], rel=1e-4)


def test_metrics_jsonl_has_the_promised_fields(cfg, tmp_path):
    report = run_train(cfg, ["train.steps=2", f"run_dir={tmp_path / 'run'}"])
    assert "partitions nothing" not in report["stderr"]  # ZeRO-0: no hint
    rec = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    for key in ("step", "loss", "lr", "grad_norm", "tokens_per_s", "tflops_per_rank", "mfu", "mem_bytes"):
        assert rec[key] is not None, key
    assert rec["grad_norm"] > 0 and 0 < rec["mfu"] < 1
    plot = subprocess.run([sys.executable, str(ROOT / "tools" / "plot_metrics.py"), str(tmp_path / "run")],
                          capture_output=True, text=True)
    assert plot.returncode == 0 and (tmp_path / "run" / "metrics.png").stat().st_size > 1000


def test_llama_schedule_warmup_then_cosine_to_ten_percent():
    f = lr_lambda(TrainConfig(steps=100, warmup_steps=10, min_lr_ratio=0.1))
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(10) == pytest.approx(1.0) and f(55) == pytest.approx(0.55)
    assert f(100) == pytest.approx(0.1) and f(1000) == pytest.approx(0.1)


@pytest.mark.parametrize("overrides,world,needle", [
    (["parallel.tp=3"], 1, "parallel.tp=3"),
    (["parallel.tp=2"], 1, "world size 1 is not a multiple of tp x pp"),
    (["train.global_batch_size=10"], 2, "train.global_batch_size: 10 is not divisible"),
    (["deepspeed=nope.json"], 1, "deepspeed: file 'nope.json' not found"),
    (["deepspeed.train_micro_batch_size_per_gpu=3"], 1, "contradicts train.micro_batch_size"),
    (["parallel.pp=2", "deepspeed.zero_optimization.stage=2"], 2, "pipeline engine supports ZeRO stage 0 or 1"),
    (["deepspeed.zero_optimisation.stage=2"], 1, "did you mean 'zero_optimization'"),
    pytest.param([f"deepspeed={ROOT}/ds_configs/fp16_zero1.json"], 1, "deepspeed.fp16: not supported",
                 marks=pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="CPU-only check")),
])
def test_bad_train_input_is_one_line_and_starts_nothing(cfg, tmp_path, overrides, world, needle, monkeypatch,
                                                        capsys):
    """In this process (tests/train_utils.py cli_in_process); two cases again as a process."""
    run_dir = tmp_path / "run"
    args = ["train", str(cfg)] + [x for o in overrides + [f"run_dir={run_dir}"] for x in ("--set", o)]
    launcher = dict(RANK="0", WORLD_SIZE=str(world), LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT="1")
    if overrides in (["parallel.tp=2"], ["deepspeed.zero_optimisation.stage=2"]):
        proc = subprocess.run([sys.executable, "-m", "megallama"] + args, capture_output=True, text=True,
                              env={**env(), **launcher}, cwd=ROOT, timeout=120)
        rc, err = proc.returncode, proc.stderr
    else:
        rc, _, err = cli_in_process(args, monkeypatch, capsys, launcher)
    assert rc == 2, err[-2000:]
    lines = [ln for ln in err.splitlines() if "megallama train: error" in ln]
    assert len(lines) == 1 and needle in lines[0], err[-2000:]
    assert "Traceback" not in err
    assert not run_dir.exists()
