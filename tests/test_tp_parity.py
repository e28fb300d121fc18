"""TP=2 and TP=4 (with and without sequence parallelism) against TP=1: same logits, loss and
full gradients, for the decoder and the encoder-decoder, fp32."""
import pytest
import torch

from tests.dist_utils import run_distributed

SEQ, BATCH = 16, 2
CASES = [("tiny-gqa", False), ("tiny-gqa", True), ("tiny-encdec", False), ("tiny-encdec", True)]


def _forward_backward(model, cfg, tokens, labels):
    if cfg.arch == "encoder_decoder":
        src = tokens.flip(1)
        logits = model(src, tokens)
        loss = model(src, tokens, labels=labels)
    else:
        logits = model(tokens)
        loss = model(tokens, labels=labels)
    loss.backward()
    return logits.detach(), loss.detach()


def _full_grads(model):
    from megallama.parallel.layers import gather_tp_tensor

    tp = model.parallel_state.tensor_parallel
    return {n: gather_tp_tensor(p.grad, p, tp).clone() for n, p in model.named_parameters()}


def _parity(rank, world, perturb):
    from megallama.config import ModelConfig
    from megallama.model import build_model
    from dataclasses import replace

    from megallama.parallel import ParallelState, initialize

    state = initialize(tp=world)
    torch.manual_seed(0)
    out = []
    for preset, sp in CASES:
        cfg = ModelConfig.preset(preset)
        gen = torch.Generator().manual_seed(1)
        tokens = torch.randint(0, cfg.vocab_size, (BATCH, SEQ), generator=gen)
        labels = torch.randint(0, cfg.vocab_size, (BATCH, SEQ), generator=gen)
        labels[0, :3] = -100
        model = build_model(cfg, replace(state, sequence_parallel=sp), seed=7)
        if perturb and rank == 1:  # a broken shard must be caught
            with torch.no_grad():
                model.layers[0].feed_forward.w2.weight.mul_(1.01)
        logits, loss = _forward_backward(model, cfg, tokens, labels)
        grads = _full_grads(model)
        if rank == 0:
            ref = build_model(cfg, ParallelState(), seed=7)
            ref_logits, ref_loss = _forward_backward(ref, cfg, tokens, labels)
            ref_grads = {n: p.grad for n, p in ref.named_parameters()}
            worst = max((grads[n] - ref_grads[n]).abs().max().item() / (ref_grads[n].abs().max().item() + 1e-12)
                        for n in ref_grads)
            out.append(dict(case=(preset, sp), logit_err=(logits - ref_logits).abs().max().item(),
                            loss_err=abs(loss.item() - ref_loss.item()), grad_rel_err=worst,
                            same_names=set(grads) == set(ref_grads)))
    return out


@pytest.mark.parametrize("world", [2, 4])
def test_tp_matches_single_process(world):
    for r in run_distributed(_parity, world, False):
        assert r["same_names"], r
        assert r["logit_err"] < 1e-5, r
        assert r["loss_err"] < 1e-5, r
        assert r["grad_rel_err"] < 1e-4, r


def test_parity_check_catches_a_broken_shard():
    results = run_distributed(_parity, 2, True)
    assert all(r["logit_err"] > 1e-4 or r["grad_rel_err"] > 1e-3 for r in results), results
