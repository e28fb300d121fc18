"""``train.micro_batch_size: auto``: the largest micro-batch that divides the global batch's share
of a replica and that fits the device by the verdict ``plan`` and ``estimate`` give (counted
tensors plus CUDA context, cuBLAS workspaces, NCCL buffers and fragmentation); one line when none
does."""
from __future__ import annotations

import pytest

from megallama.config import load_run_config
from megallama.config.fields import ConfigError
from megallama.errors import UserError
from megallama.profiling.arch import ArchSpec
from megallama.profiling.compare import impl_of
from megallama.profiling.hardware import load_hardware
from megallama.profiling.overheads import verdict
from megallama.train.prediction import choose_micro_batch, run_layout, stage_memory, with_micro_batch
from tests.train_utils import ROOT

LLAMA7B = ROOT / "examples" / "llama-7b.yaml"


def _cfg(*sets):
    return load_run_config(str(LLAMA7B), ["train.micro_batch_size=auto", *sets])


def _verdict(cfg, mbs, world, hw):
    """The planner's verdict on ``cfg`` at ``mbs``, asked of profiling/overheads.py directly."""
    chosen = with_micro_batch(cfg, mbs)
    layout, ds = run_layout(chosen, world)
    return verdict(ArchSpec.from_model_config(cfg.model), layout, cfg.train.seq_len, hw,
                   stage_memory(chosen, layout, ds, "cuda"), impl_of(cfg, "cuda"))


@pytest.mark.parametrize("gpu,sets", [
    ("a100-80gb", []), ("h200", []),
    # per replica 720 (many divisors); Ulysses' all-to-all over 8 peers holds ~4.4 GiB of NCCL buffers
    # beyond 92% of the device: a rule that skips the overheads chooses 30, which does not fit
    ("h100-sxm", ["train.global_batch_size=5760", "parallel.ulysses=8"])])
def test_largest_divisor_the_verdict_fits_and_the_next_it_refuses(gpu, sets):
    hw = load_hardware(gpu)
    cfg = _cfg("train.activation_checkpointing.mode=selective", *sets)
    dp = 8 // cfg.parallel.model_ranks
    per = cfg.train.global_batch_size // dp
    chosen, line = choose_micro_batch(cfg, 8, hw)
    mbs = chosen.train.micro_batch_size
    assert per % mbs == 0 and _verdict(cfg, mbs, 8, hw).fits
    bigger = [m for m in range(mbs + 1, per + 1) if per % m == 0]
    if bigger:
        assert not _verdict(cfg, bigger[0], 8, hw).fits and f"; {bigger[0]} would not fit" in line
    b = chosen.train.batch_layout(dp)
    assert (b.micro, b.accum, b.global_) == (mbs, per // mbs, cfg.train.global_batch_size)
    assert line.startswith(f"train.micro_batch_size: auto chose {mbs} (x {per // mbs} accumulation x {dp} "
                           f"data-parallel = global batch {cfg.train.global_batch_size}): predicted peak ")
    assert f"per rank with the device's overheads; {gpu} has " in line and " usable (" in line
    assert cfg.train.micro_batch_size == "auto"   # the loaded config is left as it is


def test_more_memory_never_chooses_less():
    cfg = _cfg("train.activation_checkpointing.mode=none")
    small = choose_micro_batch(cfg, 8, load_hardware("a100-80gb"))[0].train.micro_batch_size
    big = choose_micro_batch(cfg, 8, load_hardware("h200"))[0].train.micro_batch_size
    assert big >= small >= 1 and big > 1


def test_grad_accum_given_leaves_one_candidate():
    cfg = _cfg("train.grad_accum_steps=128")
    chosen, line = choose_micro_batch(cfg, 8, load_hardware("h200"))
    assert chosen.train.micro_batch_size == 2 and "x 128 accumulation" in line


def test_number_left_alone():
    cfg = load_run_config(str(LLAMA7B), [])
    assert choose_micro_batch(cfg, 8, load_hardware("h200")) == (cfg, None)


def test_nothing_fits_is_one_line():
    cfg = _cfg("train.activation_checkpointing.mode=none")
    with pytest.raises(UserError) as e:
        choose_micro_batch(cfg, 8, load_hardware("a100-40gb"))
    msg = str(e.value)
    assert msg.startswith("train.micro_batch_size: auto: even 1 sequence(s) of 2048 tokens need about ")
    assert "with the device's overheads but a100-40gb has " in msg and "\n" not in msg


def test_needs_a_global_batch():
    cfg = load_run_config(str(ROOT / "examples" / "tiny.yaml"),
                          ["train.micro_batch_size=auto", "train.global_batch_size=null"])
    with pytest.raises(ConfigError, match="train.micro_batch_size: auto needs train.global_batch_size"):
        choose_micro_batch(cfg, 2)


def test_ramp_sizes_must_stay_divisible():
    # start 32 and increment 32 over dp 8: the micro-batch must divide 4
    cfg = _cfg("train.rampup_batch_size=[32,32,1000]")
    chosen, _ = choose_micro_batch(cfg, 8, load_hardware("h200"))
    assert 4 % chosen.train.micro_batch_size == 0
    chosen.train.batch_layout(8)   # the ramp's own divisibility rule accepts it


def test_other_commands_need_a_number():
    cfg = _cfg()
    with pytest.raises(ConfigError, match="train.micro_batch_size: auto is chosen for a world size"):
        cfg.train.batch_layout(8)


@pytest.mark.parametrize("value", ["big", True, 2.5, 2**40])
def test_bad_values_name_auto(value):
    from megallama.config.schema import TrainConfig

    with pytest.raises(Exception, match="valid integer up to .* or 'auto'"):
        TrainConfig(micro_batch_size=value)


def test_plan_and_estimate_of_an_auto_config_leave_the_micro_batch_to_themselves(tmp_path, capsys):
    from megallama.cli import main

    text = (ROOT / "examples" / "tiny.yaml").read_text().replace("micro_batch_size: 8", "micro_batch_size: auto")
    path = tmp_path / "auto.yaml"
    path.write_text(text.replace("../ds_configs", str(ROOT / "ds_configs")))
    assert main(["estimate", "--config", str(path)]) == 0
    assert main(["plan", "--config", str(path), "--gpus", "8", "--gpu", "h100-sxm"]) == 0
    assert "best:" in capsys.readouterr().out
