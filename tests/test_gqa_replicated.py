"""Fewer KV heads than TP ranks: each KV head is replicated on the ranks whose query heads read it.

TP=4 with 2 KV heads, MQA at TP=4 (also with sequence parallelism) and an encoder-decoder's
replicated cross-attention K/V give TP=1's logits, loss and full gradients (fp32), each head's
gradient on one rank only; and the same ranks, each using and training its own copy (no
gradient sum), do not: the check can fail.
"""
import torch

from tests.dist_utils import run_distributed
from tests.test_tp_parity import _forward_backward, _full_grads

SEQ, BATCH = 16, 2
CASES = [("tiny-gqa", 2, False), ("tiny-gqa", 1, True), ("tiny-encdec", 1, False)]


def _errors(cfg, state, tokens, labels, rank):
    from megallama.model import build_model
    from megallama.parallel import ParallelState

    model = build_model(cfg, state, seed=7)
    logits, loss = _forward_backward(model, cfg, tokens, labels)
    grads = _full_grads(model)
    copies = _kv_copies(model, cfg, state)
    if rank:
        return None
    ref = build_model(cfg, ParallelState(), seed=7)
    ref_logits, ref_loss = _forward_backward(ref, cfg, tokens, labels)
    worst = max((grads[n] - p.grad).abs().max().item() / (p.grad.abs().max().item() + 1e-12)
                for n, p in ref.named_parameters())
    return dict(logit_err=(logits - ref_logits).abs().max().item(), loss_err=abs(loss.item() - ref_loss.item()),
                grad_rel_err=worst, kv_local=model.layers[0].attention.n_local_kv_heads,
                copies_with_grad=[r for r, g in enumerate(copies) if g.abs().max() > 0])


def _kv_copies(model, cfg, state):
    """Every TP rank's gradient of its K/V rows in the first layer's fused projection."""
    import torch.distributed as dist

    attn = model.layers[0].attention
    lin = attn.wkv if attn.cross else attn.wqkv
    kv = lin.weight.grad[sum(lin.local_sizes) - 2 * cfg.head_dim:].contiguous()
    every = [torch.empty_like(kv) for _ in range(state.tp)]
    dist.all_gather(every, kv, group=state.tp_group)
    return every


def _parity(rank, world):
    from dataclasses import replace

    from megallama.config import ModelConfig
    from megallama.parallel import initialize, mappings

    state = initialize(tp=world)
    out = []
    for preset, kv, sp in CASES:
        cfg = ModelConfig.preset(preset, n_kv_heads=kv)
        gen = torch.Generator().manual_seed(1)
        tokens = torch.randint(0, cfg.vocab_size, (BATCH, SEQ), generator=gen)
        labels = torch.randint(0, cfg.vocab_size, (BATCH, SEQ), generator=gen)
        labels[0, :3] = -100
        run = replace(state, sequence_parallel=sp)
        summed = _errors(cfg, run, tokens, labels, rank)
        owned = mappings.from_first_rank
        mappings.from_first_rank = lambda x, tp: x  # each rank uses and trains its own copy
        try:
            unsummed = _errors(cfg, run, tokens, labels, rank)
        finally:
            mappings.from_first_rank = owned
        out.append(dict(case=(preset, kv, sp), summed=summed, unsummed=unsummed))
    return out


def test_replicated_kv_heads_match_single_process_and_need_the_gradient_sum():
    for r in run_distributed(_parity, 4):
        ok, broken = r["summed"], r["unsummed"]
        assert ok["kv_local"] == 1, r
        assert ok["logit_err"] < 1e-5 and ok["loss_err"] < 1e-5 and ok["grad_rel_err"] < 1e-4, r
        # the first rank holding a head owns its whole gradient; the others' copies get none
        assert ok["copies_with_grad"] == list(range(0, 4, 4 // r["case"][1])), r
        assert broken["logit_err"] < 1e-5 and broken["grad_rel_err"] > 1e-2, r


def test_split_and_merge_round_trip_with_replicated_heads():
    from megallama.parallel.layers import merge_tp_shards, split_for_rank

    hd, heads = 4, [8, 2, 2]  # Q, K, V of 8 query heads over 2 KV heads
    sizes = [h * hd for h in heads]
    full = torch.randn(sum(sizes), 3)
    for tp in (1, 2, 4, 8):
        held = [split_for_rank(full, 0, sizes, tp, r, fused_heads=heads) for r in range(tp)]
        assert all(h.shape[0] == (8 // tp + 2 * max(2 // tp, 1)) * hd for h in held)
        assert torch.equal(merge_tp_shards(held, 0, sizes, fused_heads=heads), full)
        stored = [split_for_rank(full, 0, sizes, tp, r, fused_heads=heads, owned=True) for r in range(tp)]
        assert sum(s.shape[0] for s in stored) == full.shape[0]  # each head once
        assert torch.equal(merge_tp_shards(stored, 0, sizes, fused_heads=heads, owned=True), full)
    kv = torch.randn(2 * 2 * hd, 3)  # a cross-attention K/V pair alone: ranks 1 and 3 store nothing
    stored = [split_for_rank(kv, 0, [2 * hd] * 2, 4, r, fused_heads=[2, 2], owned=True) for r in range(4)]
    assert [s.shape[0] for s in stored] == [2 * hd, 0, 2 * hd, 0]
    assert torch.equal(merge_tp_shards(stored, 0, [2 * hd] * 2, fused_heads=[2, 2], owned=True), kv)
    # rank 3 of 4 holds query heads 6-7 and their KV head, 1
    k_rows = full[sizes[0]:sizes[0] + sizes[1]]
    assert torch.equal(split_for_rank(full, 0, sizes, 4, 3, fused_heads=heads)[2 * hd:3 * hd], k_rows[hd:])
