"""A model or batch that cannot fit this machine is refused before anything is allocated, and the
what-if commands refuse arguments past any sane range, each in one line.

``train.micro_batch_size: 1000000000`` used to allocate 5 GB and die in a traceback after 51 s,
``model.dim: 1048576`` died in the allocator, and ``plan --top 10**9``, ``estimate --seq 10**18``
and ``--mbs 10**30`` exited 0 with nonsense.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from megallama.config import load_run_config
from megallama.errors import UserError
from megallama.train import fits

ROOT = Path(__file__).resolve().parents[1]
TINY = {"model": {"preset": "tiny", "max_seq_len": 64}, "train": {"seq_len": 64, "micro_batch_size": 2}}


def _cli(capsys, *argv):
    from megallama.cli import main

    capsys.readouterr()
    rc = main([str(a) for a in argv])
    out = capsys.readouterr()
    return rc, out.out, out.err


def _one_line_error(rc, out, err, command, needle):
    assert rc == 2 and not out, (rc, out, err)
    assert err.startswith(f"megallama {command}: error: ") and err.count("\n") == 1, err
    assert needle in err, err


# ------------------------------------------------------------------------------ the check
def _predicted(cfg, world: int) -> float:
    """The memory model's peak for ``cfg`` on CPU at ``world`` ranks, asked independently."""
    from types import SimpleNamespace

    from megallama.profiling.arch import ArchSpec
    from megallama.profiling.compare import impl_of, layout_of
    from megallama.profiling.memory import memory_breakdown
    from megallama.train.ds_config import build_ds_config
    from megallama.train.ds_settings import DeepSpeedSettings

    ds = build_ds_config(cfg, world)
    groups = SimpleNamespace(tp=1, pp=1, dp=world, world_size=world, sequence_parallel=False)
    return memory_breakdown(ArchSpec.from_model_config(cfg.model), layout_of(cfg, groups, ds), cfg.train.seq_len,
                            impl=impl_of(cfg, "cpu"), buckets=DeepSpeedSettings.of(ds).buckets).total


def test_the_prediction_is_the_memory_models(monkeypatch):
    """Refused exactly when the memory model's peak exceeds the capacity, and the message quotes
    that prediction in bytes; the ranks of one node share its RAM."""
    monkeypatch.setattr(fits.torch.cuda, "is_available", lambda: False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    cfg = load_run_config(data=TINY)
    predicted = _predicted(cfg, 1)
    monkeypatch.setattr(fits, "available_ram", lambda: predicted)
    fits.check_training_fits(cfg, 1)                      # exactly enough: runs
    monkeypatch.setattr(fits, "available_ram", lambda: predicted - 1)
    with pytest.raises(UserError) as exc:
        fits.check_training_fits(cfg, 1)
    assert f"({predicted:,.0f} bytes predicted" in str(exc.value), exc.value
    two = load_run_config(data=TINY, overrides=["train.global_batch_size=4"])
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    monkeypatch.setattr(fits, "available_ram", lambda: 2 * _predicted(two, 2))
    fits.check_training_fits(two, 2)
    monkeypatch.setattr(fits, "available_ram", lambda: 2 * _predicted(two, 2) - 2)
    with pytest.raises(UserError, match="RAM available for 2 ranks"):
        fits.check_training_fits(two, 2)


def test_cpu_buckets_cost_only_the_gradients_they_hold(monkeypatch):
    """DeepSpeed's ZeRO-1/2 reduce bucket is reduce_bucket_size elements (5e8 by default), but on
    CPU pages it never writes are never committed: a tiny pipelined ZeRO-1 run needs megabytes,
    not the 3.7 GiB (two full fp32 buckets) it was refused for on a busy 24 GiB machine."""
    monkeypatch.setattr(fits.torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    cfg = load_run_config(data=TINY, overrides=["parallel.pp=2", "deepspeed.zero_optimization.stage=1",
                                                "train.global_batch_size=4"])
    monkeypatch.setattr(fits, "available_ram", lambda: 4 * 2 ** 30)   # 1 GiB per rank
    fits.check_training_fits(cfg, 4)
    monkeypatch.setattr(fits, "available_ram", lambda: 4 * 2 ** 20)   # a real shortage is still refused
    with pytest.raises(UserError, match="would need about"):
        fits.check_training_fits(cfg, 4)


@pytest.mark.parametrize("overrides,needle", [
    (["train.micro_batch_size=1000000000"], "train.micro_batch_size: 1000000000 sequences of 64 tokens would need "),
    (["model.dim=1048576", "model.n_heads=8"], "model: dim=1048576, n_layers=4, vocab_size=2048 would need about"),
    (["model.n_layers=1000000000", "deepspeed.zero_optimization.stage=3"],  # no per-layer walk of 10**9 layers
     "model: dim=128, n_layers=1000000000, vocab_size=2048 would need about"),
])
def test_impossible_runs_are_refused_in_one_line(capsys, tmp_path, overrides, needle):
    """validate --fits-here runs the same check as train's start-up; without it a config
    validates on any machine (a 7B config on a laptop)."""
    path = tmp_path / "run.yaml"
    path.write_text(json.dumps(TINY))
    sets = [a for o in overrides for a in ("--set", o)]
    rc, out, err = _cli(capsys, "validate", path, *sets)
    assert rc == 0 and out.startswith("ok: "), err
    start = time.perf_counter()
    rc, out, err = _cli(capsys, "validate", path, "--fits-here", *sets)
    _one_line_error(rc, out, err, "validate", needle)
    assert "bytes predicted" in err and time.perf_counter() - start < 30   # loose: a loaded CI box


def test_a_7b_config_validates_anywhere_but_needs_the_memory_to_run(capsys, tmp_path, monkeypatch):
    path = tmp_path / "run.yaml"
    path.write_text("model: llama-7b\n")
    rc, out, err = _cli(capsys, "validate", path)
    assert rc == 0, err
    monkeypatch.setattr(fits.torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(fits, "available_ram", lambda: 16 * 2 ** 30)   # a 16 GiB laptop
    rc, out, err = _cli(capsys, "validate", path, "--fits-here")
    _one_line_error(rc, out, err, "validate", "model: dim=4096, n_layers=32")
    assert "this machine has 16.0 GiB of RAM available" in err


def test_train_refuses_before_start_up_and_writes_nothing(tmp_path):
    """The real process: refused in seconds (it used to allocate for 51 s), nothing written."""
    cfg = {**TINY, "run_dir": str(tmp_path / "run")}
    path = tmp_path / "run.yaml"
    path.write_text(json.dumps(cfg))
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(key, None)
    proc = subprocess.run([sys.executable, "-m", "megallama", "train", str(path), "--set",
                           "train.micro_batch_size=1000000000"], capture_output=True, text=True, env=env,
                          timeout=120)
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip() and "[WARNING]" not in ln]
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert lines[0].startswith("megallama train: error: train.micro_batch_size: 1000000000 sequences"), lines
    assert not (tmp_path / "run").exists()


def test_inference_builds_are_checked(monkeypatch):
    from megallama.config import ModelConfig

    cfg = ModelConfig.preset("tiny")
    monkeypatch.setattr(fits.torch.cuda, "is_available", lambda: False)
    fits.check_inference_fits(cfg, 1, 4, 64, None, 1)
    with pytest.raises(UserError, match=r"^--prompt: 100000000 sequences of 512 tokens would need about"):
        fits.check_inference_fits(cfg, 1, 10 ** 8, 10 ** 6, None, 1, kv_cache=True, batch_flag="--prompt")
    with pytest.raises(UserError, match=r"^model: dim=1048576"):
        fits.check_inference_fits(ModelConfig.preset("tiny", dim=2 ** 20), 1, 1, 8, None, 1)


def test_inference_on_a_gpu_counts_the_verdicts_overheads(monkeypatch):
    """eval/generate on a GPU judge by the training verdict's rule: CUDA context off the capacity,
    cuBLAS and NCCL buffers and fragmentation on top (h100-sxm as data; no GPU needed)."""
    import dataclasses

    from megallama.config import ModelConfig
    from megallama.profiling.hardware import load_hardware
    from megallama.profiling.overheads import usable_bytes

    cfg = ModelConfig.preset("tiny")
    h100 = load_hardware("h100-sxm")
    need = fits.check_inference_fits(cfg, 2, 4, 64, None, 2, hardware=h100)
    monkeypatch.setattr(fits.torch.cuda, "is_available", lambda: False)
    bare = fits.check_inference_fits(cfg, 2, 4, 64, None, 2)   # CPU: the tensors alone
    assert need - bare > 0.5 * 2 ** 30   # two NCCL communicators (world, TP) and cuBLAS's workspace
    # a device with room for the tensors and less than the overheads refuses, naming them
    small = dataclasses.replace(h100, memory_bytes=h100.memory_bytes - usable_bytes(h100) + (need + bare) / 2)
    with pytest.raises(UserError, match=r"^--micro-batch-size: .*nccl buffers"):
        fits.check_inference_fits(cfg, 2, 4, 64, None, 2, hardware=small)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    import shutil

    from megallama import LlamaForCausalLM, ModelConfig
    from megallama.checkpoint import save_consolidated
    from megallama.parallel import ParallelState
    from tests.conftest_data import tokenizer_path

    root = tmp_path_factory.mktemp("fits")
    cfg = ModelConfig.preset("tiny", vocab_size=320, n_layers=1, max_seq_len=64)
    save_consolidated(LlamaForCausalLM(cfg, ParallelState(), seed=1).state_dict(), cfg, root / "cons")
    shutil.copyfile(tokenizer_path(320), root / "cons" / "tokenizer.model")
    return root / "cons"


def test_generate_and_eval_check_before_building(checkpoint, capsys, monkeypatch):
    """The commands call the check with their own batch before the model exists: on a machine
    of 64 KiB both refuse (the tiny model's weights alone are 1.1 MiB)."""
    import torch.distributed as dist

    def one_process_group(timeout_s=300, info=None):
        from megallama.train.distributed import detect_launcher

        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
        return info or detect_launcher()

    for key, value in dict(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0").items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr("megallama.train.distributed.init_distributed", one_process_group)
    monkeypatch.setattr(fits, "capacity", lambda world, local=0: (64 * 1024, "this test's machine has 64.0 KiB"))
    try:
        rc, out, err = _cli(capsys, "generate", "--checkpoint", checkpoint, "--prompt", "hello", "--max-new-tokens", 4)
        _one_line_error(rc, out, err, "generate", "model: dim=128, n_layers=1, vocab_size=320 would need about")
        rc, out, err = _cli(capsys, "eval", "--checkpoint", checkpoint, "--data", "unused", "--seq-len", 16)
        _one_line_error(rc, out, err, "eval", "but this test's machine has 64.0 KiB")
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


# ------------------------------------------------------------------------ what-if commands
PLAN = ["plan", "--model", "tiny", "--gpus", "8", "--gpu", "a100-80gb"]


@pytest.mark.parametrize("argv,needle", [
    (PLAN + ["--top", str(10 ** 9)], "--top: expected 1 to 1000, got 1000000000"),
    (PLAN + ["--top", "-5"], "--top: expected 1 to 1000, got -5"),
    (PLAN[:4] + [str(10 ** 8)] + PLAN[5:], "--gpus: expected 1 to 1,048,576, got 100000000"),
    (PLAN + ["--seq", str(10 ** 18)], "--seq: expected at most 16,777,216 tokens"),
    (PLAN + ["--global-batch-tokens", str(10 ** 15)], "--global-batch-tokens: expected at most"),
    (["estimate", "--model", "tiny", "--seq", str(10 ** 18)], "--seq: expected at most 16,777,216 tokens, got 10"),
    (["estimate", "--model", "tiny", "--mbs", str(10 ** 30)], "--mbs: 1000000000000000000000000000000 sequences of "
                                                               "512 tokens per micro-batch; expected at most"),
    (["estimate", "--model", "tiny", "--dp", str(10 ** 8)], "--dp: expected at most 1,048,576"),
    (["estimate", "--model", "tiny", "--grad-accum", str(10 ** 11)], "--grad-accum: expected at most"),
    (["estimate", "--model", "tiny", "--gpus-per-node", str(10 ** 11)], "--gpus-per-node: expected at most"),
])
def test_what_if_arguments_are_bounded(capsys, argv, needle):
    _one_line_error(*_cli(capsys, *argv), argv[0], needle)


def test_estimate_reads_offload_device_none_as_no_offload(capsys, tmp_path):
    def host_bytes(device):
        path = tmp_path / f"{device}.yaml"
        path.write_text(json.dumps({"model": "tiny", "deepspeed": {"zero_optimization": {
            "stage": 1, "offload_optimizer": {"device": device}}}}))
        rc, out, err = _cli(capsys, "estimate", "--config", path, "--json")
        assert rc == 0, err
        return json.loads(out)["stages"]["0"]["host_bytes"]

    assert host_bytes("none") == 0
    assert host_bytes("cpu") > 0


def test_describe_takes_a_run_config(capsys, tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("model: {preset: llama2-7b}\n")
    rc, out, err = _cli(capsys, "describe", "--config", path, "--json")
    assert rc == 0, err
    rc2, out2, _ = _cli(capsys, "describe", "--model", "llama2-7b", "--json")
    by_config, by_name = json.loads(out), json.loads(out2)
    assert by_config.pop("model") == str(path) and by_name.pop("model") == "llama2-7b"
    assert by_config == by_name and by_config["parameters"] == 6_738_415_616
    _one_line_error(*_cli(capsys, "describe", "--config", tmp_path / "missing.yaml"), "describe", "not found")


def test_tokenizer_vocabulary_is_bounded(capsys, tmp_path):
    (tmp_path / "in.txt").write_text("hello world\n")
    argv = ["preprocess", "--input", tmp_path / "in.txt", "--train-tokenizer", "--tokenizer", tmp_path / "t.model",
            "--vocab-size", 10 ** 12]
    _one_line_error(*_cli(capsys, *argv), "preprocess", "--vocab-size: expected at most 16,777,216")
    assert sorted(os.listdir(tmp_path)) == ["in.txt"]


@pytest.mark.parametrize("command", [["plan", "--gpus", "8", "--gpu", "a100-80gb"], ["estimate"]])
def test_what_if_configs_go_through_the_bounded_loader(capsys, tmp_path, command):
    path = tmp_path / "deep.yaml"
    path.write_text("model: tiny\nrun_dir: " + "[" * 50000 + "]" * 50000 + "\n")   # was a RecursionError
    _one_line_error(*_cli(capsys, command[0], "--config", path, *command[1:]), command[0],
                    f"config: {path} line 2: nested deeper than 32 levels")
