"""The grad norm megallama reports and clips by is the norm of every trainable gradient, counted
once, whichever optimizer takes the step (megallama/train/grad_norm.py says why it sums in fp64)."""
from __future__ import annotations

import pytest
import torch

from megallama.train import grad_norm
from tests.dist_utils import run_distributed

CLIP = 1.0  # train.grad_clip's default: the tiny model's first steps' norms (2-10) are clipped


def test_square_sum_is_exact_across_chunks(monkeypatch):
    """4M elements, where torch's fp32 CPU norm is ~8e-5 off; split into chunks as a large
    gradient would be."""
    g = torch.randn(1 << 22, generator=torch.Generator().manual_seed(0))
    exact = float(g.double().square().sum())
    monkeypatch.setattr(grad_norm, "CHUNK", 1000)
    got = float(grad_norm.square_sum([g[:1 << 10], g[1 << 10:].view(-1, 1 << 10)], torch.device("cpu")))
    assert got == pytest.approx(exact, rel=1e-12)


def _norms(rank, world, stage, precision="fp32"):
    """Per step: (fp64 norm of the gradients autograd produced, the norm the engine reports, the
    fp64 norm of the gradients the inner optimizer is handed, i.e. after the clip)."""
    from megallama.config import load_run_config
    from megallama.parallel import initialize
    from megallama.train.ds_config import build_ds_config
    from megallama.train.engine import build_engine

    # a 16384 x 128 output layer: torch's fp32 CPU norm of its gradient is ~1e-4 off, ~1.5e-5 of the total
    ds = {"zero_optimization": {"stage": stage}, **({"bf16": {"enabled": True}} if precision == "bf16" else {})}
    cfg = load_run_config(data={"model": {"preset": "tiny", "arch": "encoder_decoder", "vocab_size": 16384},
                                "deepspeed": ds,
                                "train": {"seq_len": 32, "micro_batch_size": 8, "grad_clip": CLIP}})
    engine = build_engine(cfg, initialize(), build_ds_config(cfg, 1), torch.device("cpu")).engine
    produced = {}
    for name, p in engine.module.named_parameters():
        p.register_hook(lambda g, name=name: produced.__setitem__(name, g.detach().double()))
    inner = getattr(engine.optimizer, "optimizer", engine.optimizer)  # ZeRO and bf16 wrap torch's AdamW
    handed, real_step = [], inner.step

    def step(*args, **kwargs):  # ZeRO-1 steps each param group on its own: squares summed per step
        handed.extend(float(p.grad.double().square().sum()) for group in inner.param_groups
                      for p in group["params"] if p.grad is not None)
        return real_step(*args, **kwargs)

    inner.step = step
    gen, out = torch.Generator().manual_seed(0), []
    for _ in range(3):
        src, tgt = (torch.randint(0, cfg.model.vocab_size, (8, 33), generator=gen) for _ in range(2))
        engine.backward(engine(src[:, :-1], tgt[:, :-1], labels=tgt[:, 1:]))
        engine.step()
        true = float(torch.stack([g.norm() for g in produced.values()]).norm())
        out.append((true, float(engine.get_global_grad_norm()), sum(handed) ** 0.5))
        handed.clear()
    assert len(produced) == sum(1 for p in engine.module.parameters() if p.requires_grad)
    return out


@pytest.mark.parametrize("stage", [0, 1])
def test_encoder_decoder_norm_is_every_gradients(stage):
    """Before ZeRO-0 summed its squares in fp64 it reported, and clipped by, a norm 1.3e-5 to
    1.8e-5 below the true one here (2e-5 at step 3 of the layout matrix's encoder-decoder); ZeRO-1
    is DeepSpeed's own norm."""
    for true, reported, clipped in run_distributed(_norms, 1, stage):
        assert reported == pytest.approx(true, rel=1e-6)
        assert clipped == pytest.approx(true * min(1.0, CLIP / (true + 1e-6)), rel=1e-6)


def test_bf16_zero0_norm_is_every_gradients():
    """bf16 at ZeRO-0: DeepSpeed's FP16_UnfusedOptimizer norms the whole flattened gradient group
    in fp32, 1.5e-5 to 1.9e-5 below its fp64 norm here (deepspeed_patches.fp64_cpu_norms)."""
    for true, reported, clipped in run_distributed(_norms, 1, 0, "bf16"):
        assert reported == pytest.approx(true, rel=1e-6)
        assert clipped == pytest.approx(true * min(1.0, CLIP / (true + 1e-6)), rel=1e-6)


@pytest.mark.parametrize("module, name", [("deepspeed.runtime.bf16_optimizer", "get_global_norm_of_tensors"),
                                          ("deepspeed.runtime.fp16.unfused_optimizer", "get_weight_norm")])
def test_deepspeeds_mixed_precision_norms_are_taken_in_fp64_on_the_cpu(module, name):
    """On 16M elements torch's fp32 CPU norm is ~1e-4 off; patched, DeepSpeed's function as its
    optimizer calls it (the module's own name) is exact, and its filters still see the tensors'
    attributes (a pipeline-replicated copy is counted once)."""
    import importlib

    from megallama.train.deepspeed_patches import fp64_cpu_norms

    g = torch.randn(1 << 24, generator=torch.Generator().manual_seed(1))
    small = torch.randn(1000, generator=torch.Generator().manual_seed(2))
    exact = float(g.double().square().sum() + small.double().square().sum()) ** 0.5
    fp64_cpu_norms()
    fp64_cpu_norms()   # once, however often an engine is built
    fn = getattr(importlib.import_module(module), name)
    assert fn.megallama_fp64 and not getattr(fn.__wrapped__, "megallama_fp64", False)
    assert float(fn([g, small], 2)) == pytest.approx(exact, rel=1e-7)
    assert float(fn.__wrapped__([g, small], 2)) != pytest.approx(exact, rel=1e-5)   # what it replaced
    if name == "get_weight_norm":
        copy = small.clone()
        copy.ds_pipe_replicated = True
        assert float(fn([g, small, copy], 2)) == pytest.approx(exact, rel=1e-7)
