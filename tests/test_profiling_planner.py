"""The planner: only layouts that fit, pinned layouts, ranking, errors."""
import json

import pytest

from megallama.errors import UserError
from megallama.profiling.arch import as_spec
from megallama.profiling.hardware import load_hardware
from megallama.profiling.memory import memory_breakdown
from megallama.profiling.overheads import usable_bytes
from megallama.profiling.planner import plan


@pytest.mark.parametrize("model, gpus, gpu", [
    ("llama-7b", 8, "a100-40gb"), ("llama-13b", 64, "a100-80gb"), ("llama-65b", 512, "h100-sxm"),
    ("llama2-70b", 256, "h200"), ("tiny-encdec", 4, "a100-40gb"),
])
def test_never_proposes_a_layout_that_does_not_fit(model, gpus, gpu):
    hw = load_hardware(gpu)
    spec = as_spec(model)
    result = plan(spec, gpus, hw, seq=min(2048, spec.max_seq_len))
    assert result.candidates
    for c in result.candidates:
        assert c.fits and c.layout.world == gpus
        need = memory_breakdown(spec, c.layout, c.seq).total + sum(c.memory_verdict.overheads.values())
        assert need <= usable_bytes(hw) < hw.memory_bytes                     # re-derived independently
    tps = [c.tokens_per_s_per_gpu for c in result.candidates]
    assert tps == sorted(tps, reverse=True)
    best = result.best
    assert best.mfu == pytest.approx(best.tflops_per_gpu * 1e12 / hw.peak("bf16"))
    assert 0.05 < best.mfu < 0.7


def test_pinned_fields_are_respected_and_a_full_layout_is_evaluated_alone():
    hw = load_hardware("a100-80gb")
    partial = plan(as_spec("llama-13b"), 32, hw, tp=4, recompute="selective")
    assert {(c.layout.tp, c.layout.recompute) for c in partial.candidates} == {(4, "selective")}
    one = plan(as_spec("llama-65b"), 64, hw, tp=8, pp=8, zero=1, mbs=1, recompute="none", sp=True)
    assert len(one.candidates) == 1 and one.evaluated == 1
    too_big = plan(as_spec("llama-65b"), 8, load_hardware("a100-40gb"), tp=8, pp=1, zero=0, mbs=1, recompute="none")
    assert len(too_big.candidates) == 1 and not too_big.best.fits                # evaluated, flagged


def test_more_memory_never_hurts():
    a100_40 = plan(as_spec("llama-33b"), 64, load_hardware("a100-40gb"))
    a100_80 = plan(as_spec("llama-33b"), 64, load_hardware("a100-80gb"))
    assert a100_80.best.tokens_per_s_per_gpu >= a100_40.best.tokens_per_s_per_gpu
    assert len(a100_80.candidates) >= len(a100_40.candidates)


def test_errors_are_user_errors():
    hw = load_hardware("a100-40gb")
    with pytest.raises(UserError, match="does not divide --gpus 8"):
        plan(as_spec("llama-7b"), 8, hw, tp=3)
    with pytest.raises(UserError, match="n_heads=52 is not divisible"):
        plan(as_spec("llama-33b"), 16, hw, tp=8)
    with pytest.raises(UserError, match="fits llama-65b"):
        plan(as_spec("llama-65b"), 8, hw)


def test_json_has_the_promised_fields(capsys):
    from megallama.cli import main

    assert main(["plan", "--model", "llama-7b", "--gpus", "16", "--gpu", "a100-80gb", "--json", "--top", "3"]) == 0
    out = json.loads(capsys.readouterr().out)
    for key in ("tokens_per_s_per_gpu", "tflops_per_gpu", "mfu", "memory_per_gpu_bytes", "step_time_s", "layout"):
        assert key in out and key in out["candidates"][0]
    assert len(out["candidates"]) == 3 and out["gpus"] == 16
