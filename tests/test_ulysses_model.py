"""DeepSpeed-Ulysses at the model level: the sequence split over ranks, swapped to heads around
attention, gives the single process's logits, loss and gradients (fp32).

Each Ulysses rank's loss is the whole sequence's; its gradient reaches that rank through its own
shard, and the ranks' gradients summed (what DeepSpeed's sequence-parallel reduction does) are
the single process's. Cases: Ulysses 2 and 4, GQA with fewer KV heads than ranks (replicated),
MQA, TP2 x Ulysses 2 with sequence parallelism, packed documents with restarted positions. The
same run with the shard offset dropped from RoPE, or with the all-to-all's chunks in the wrong
order, does not match: the check can fail.
"""
import pytest
import torch

from tests.dist_utils import run_distributed

SEQ, BATCH = 16, 2
# (preset, n_kv_heads, tp, ulysses, sequence_parallel, documents)
CASES = [("tiny", None, 1, 2, False, False), ("tiny-gqa", 1, 1, 4, False, True),
         ("tiny-gqa", 2, 1, 4, False, False), ("tiny-gqa", 2, 2, 2, True, True)]


def _inputs(cfg, documents):
    gen = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, cfg.vocab_size, (BATCH, SEQ), generator=gen)
    labels = torch.randint(0, cfg.vocab_size, (BATCH, SEQ), generator=gen)
    labels[0, :3] = -100
    docs = positions = None
    if documents:
        from megallama.model.rope import document_positions

        docs = torch.tensor([[0] * 5 + [1] * 7 + [2] * 4, [0] * 11 + [1] * 5])
        positions = document_positions(docs)
    return tokens, labels, docs, positions


def _run(model, tokens, labels, docs, positions):
    kw = {} if docs is None else dict(document_ids=docs, position_ids=positions)
    logits = model(tokens, **kw).detach()
    loss = model(tokens, labels=labels, **kw)
    loss.backward()
    return logits, loss.detach()


def _case(rank, world, preset, kv, tp, u, sp, documents, broken):
    import torch.distributed as dist

    from megallama.config import ModelConfig
    from megallama.model import build_model
    from megallama.parallel import ParallelState, initialize
    from megallama.parallel.layers import gather_tp_tensor

    state = initialize(tp=tp, sequence_parallel=sp, ulysses=u)
    cfg = ModelConfig.preset(preset, **({} if kv is None else {"n_kv_heads": kv}))
    tokens, labels, docs, positions = _inputs(cfg, documents)
    model = build_model(cfg, state, seed=7)
    logits, loss = _run(model, tokens, labels, docs, positions)
    grads = {}
    for n, p in model.named_parameters():
        g = p.grad.clone()
        dist.all_reduce(g, group=state.ulysses_group)  # DeepSpeed's sum over the Ulysses ranks
        grads[n] = gather_tp_tensor(g, p, state.tensor_parallel)
    if rank:
        return None
    ref = build_model(cfg, ParallelState(), seed=7)
    ref_logits, ref_loss = _run(ref, tokens, labels, docs, positions)
    worst = max((grads[n] - p.grad).abs().max().item() / (p.grad.abs().max().item() + 1e-12)
                for n, p in ref.named_parameters())
    return dict(logit_err=(logits - ref_logits).abs().max().item(), loss_err=abs(loss.item() - ref_loss.item()),
                grad_rel_err=worst)


def _parity(rank, world, broken):
    from megallama.parallel import ulysses

    if broken == "offset":  # every shard rotated as if it started the sequence
        ulysses.positions = lambda tokens, group, position_ids: ulysses.shard(
            torch.arange(tokens.size(1)).expand(tokens.size(0), -1), group).sub(
            group.rank * tokens.size(1) // group.size)
    out = []
    for case in CASES:
        if world % (case[2] * case[3]) == 0 and case[2] * case[3] == world:
            out.append((case, _case(rank, world, *case, broken)))
    return out


@pytest.mark.parametrize("world", [2, 4])
def test_ulysses_matches_single_process(world):
    results = run_distributed(_parity, world, None)
    checked = [c for c, r in results]
    assert checked, "no case ran"
    for case, r in results:
        assert r["logit_err"] < 1e-5 and r["loss_err"] < 1e-5 and r["grad_rel_err"] < 1e-4, (case, r)


def test_ulysses_parity_fails_without_the_shard_offset():
    results = run_distributed(_parity, 2, "offset")
    case, r = results[0]
    assert r["logit_err"] > 1e-3 and r["grad_rel_err"] > 1e-3, (case, r)
