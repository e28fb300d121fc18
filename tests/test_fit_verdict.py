"""On a GPU the trainer's fit decisions are the verdict ``plan`` and ``estimate`` give
(profiling/overheads.py: the counted tensors plus CUDA context, cuBLAS workspaces, NCCL buffers
and fragmentation against the usable bytes), asked here of an H100 SXM profile as data (no GPU).

The layout under test is found, not written down: the first micro-batch the verdict refuses at
Ulysses 8 over 8 ranks, whose counted tensors alone still fit (the overheads, ~6 GiB, are wider
than a micro-batch's step, ~1.2 GiB). A rule that compares the tensors alone lets it through.
"""
from __future__ import annotations

import json

import pytest

from megallama.cli import main
from megallama.config import load_run_config
from megallama.errors import UserError
from megallama.profiling.arch import ArchSpec
from megallama.profiling.compare import impl_of
from megallama.profiling.hardware import load_hardware
from megallama.profiling.overheads import usable_bytes, verdict
from megallama.train import fits
from megallama.train.prediction import run_layout, stage_memory
from tests.train_utils import ROOT

LLAMA7B = ROOT / "examples" / "llama-7b.yaml"
SETS = ["train.activation_checkpointing.mode=selective", "parallel.ulysses=8"]
H100 = load_hardware("h100-sxm")


def _sets(mbs):
    return [*SETS, f"train.micro_batch_size={mbs}", f"train.global_batch_size={8 * mbs}"]


@pytest.fixture(scope="module")
def refused():
    """The smallest micro-batch the planner's verdict (asked of profiling/overheads.py) refuses."""
    for mbs in range(1, 65):
        cfg = load_run_config(str(LLAMA7B), _sets(mbs))
        layout, ds = run_layout(cfg, 8)
        mem = stage_memory(cfg, layout, ds, "cuda")
        if not verdict(ArchSpec.from_model_config(cfg.model), layout, 2048, H100, mem, impl_of(cfg, "cuda")).fits:
            assert mem.total <= usable_bytes(H100), "no micro-batch in the overheads' gap: the test shows nothing"
            assert mbs > 1
            return mbs
    pytest.fail("the verdict fits every micro-batch up to 64")


def _estimate(capsys, mbs):
    assert main(["estimate", "--config", str(LLAMA7B), "--gpu", "h100-sxm", "--tp", "1", "--pp", "1", "--dp", "1",
                 "--ulysses", "8", "--zero", "1", "--mbs", str(mbs), "--grad-accum", "8",
                 "--recompute", "selective", "--json"]) == 0
    return json.loads(capsys.readouterr().out)["prediction"]


def test_validate_gpu_refuses_what_estimate_calls_does_not_fit(refused, capsys):
    est = _estimate(capsys, refused)
    assert not est["fits"] and est["memory_verdict"].startswith("does not fit")
    rc = main(["validate", str(LLAMA7B), "--world-size", "8", "--gpu", "h100-sxm",
               *[a for s in _sets(refused) for a in ("--set", s)]])
    cap = capsys.readouterr()
    err = cap.err
    assert rc == 2 and err.count("\n") == 1 and "is predicted not to fit h100-sxm" in err, err
    assert "plus the device's overheads: " in cap.out and "nccl_buffers" in cap.out, cap.out   # they add up
    assert _estimate(capsys, refused - 1)["fits"]   # one fewer fits by both
    assert main(["validate", str(LLAMA7B), "--world-size", "8", "--gpu", "h100-sxm",
                 *[a for s in _sets(refused - 1) for a in ("--set", s)]]) == 0


def test_train_start_on_a_gpu_refuses_what_the_verdict_refuses(refused, monkeypatch):
    """``check_training_fits`` on a (pretended) H100: the verdict's refusal, in one line naming the
    device's overheads."""
    monkeypatch.setattr(fits.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(fits.torch.cuda, "device_count", lambda: 8)
    monkeypatch.setattr(fits, "local_gpu", lambda index: H100)
    counted = fits.check_training_fits(load_run_config(str(LLAMA7B), _sets(refused - 1)), 8, local_rank=3)
    assert 0 < counted < usable_bytes(H100)
    with pytest.raises(UserError) as e:
        fits.check_training_fits(load_run_config(str(LLAMA7B), _sets(refused)), 8, local_rank=3)
    msg = str(e.value)
    assert msg.startswith((f"train.micro_batch_size: {refused} sequences of 2048 tokens would need about ",
                           "model: dim=4096, n_layers=32, vocab_size=32000 would need about ")), msg
    assert ", device overheads " in msg and "but h100-sxm has " in msg and "\n" not in msg
