"""Generation from an encoder-decoder: encode the sources once, then decode step by step.

Sources of different lengths are right-padded and masked out of cross-attention. Every target
starts with the decoder-start token (BOS, as in training) at position 0, so all sequences decode
in lockstep. With the cache each step feeds one token: self-attention keys/values accumulate in
a :class:`KVCache` per layer and cross-attention keys/values are projected from the memory once
(:class:`CrossKVCache`). ``use_cache=False`` re-encodes the sources and reruns the whole target
prefix every step: the reference the cache is tested against.
"""
from __future__ import annotations

from typing import List, Optional, Sequence

import torch

from megallama.inference.generate import GenerationResult, _agree_across_tp, sample_next
from megallama.inference.kv_cache import make_cross_caches, make_kv_caches


def pad_sources(sources: Sequence[Sequence[int]], device):
    """(``[b, max_len]`` ids, key-padding mask or None when no source is padded)."""
    longest = max(len(s) for s in sources)
    src = torch.zeros(len(sources), longest, dtype=torch.long, device=device)
    mask = torch.zeros(len(sources), longest, dtype=torch.bool, device=device)
    for i, s in enumerate(sources):
        src[i, :len(s)] = torch.as_tensor(list(s), dtype=torch.long, device=device)
        mask[i, :len(s)] = True
    return src, (None if bool(mask.all()) else mask)


@torch.no_grad()
def generate_seq2seq(model: torch.nn.Module, sources: Sequence[Sequence[int]], max_new_tokens: int,
                     start_id: int, eos_id: Optional[int] = None, temperature: float = 0.0, top_p: float = 1.0,
                     seed: int = 0, use_cache: bool = True, return_logits: bool = False) -> GenerationResult:
    """Up to ``max_new_tokens`` target tokens per source (token ids); same contract as
    :func:`megallama.inference.generate` (seeded sampling, TP rank 0 chooses)."""
    if not sources or any(len(s) == 0 for s in sources):
        raise ValueError("every source needs at least one token")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    limit = model.config.max_seq_len
    if max(len(s) for s in sources) > limit or max_new_tokens + 1 > limit:
        raise ValueError(f"sources ({max(len(s) for s in sources)} tokens) and max_new_tokens + 1 "
                         f"({max_new_tokens + 1}) must each fit the model's max_seq_len={limit}")
    device = next(model.parameters()).device
    bsz = len(sources)
    src, src_mask = pad_sources(sources, device)
    tokens = torch.full((bsz, max_new_tokens + 1), start_id, dtype=torch.long, device=device)
    gen = torch.Generator(device=device).manual_seed(seed)
    done = torch.zeros(bsz, dtype=torch.bool, device=device)
    eos_hit = torch.zeros(bsz, dtype=torch.bool, device=device)
    kept: List[List[torch.Tensor]] = [[] for _ in sources]
    was_training = model.training
    model.eval()
    try:
        memory = model.encode(src, src_mask) if use_cache else None
        caches = make_kv_caches(model, bsz, max_new_tokens + 1) if use_cache else None
        cross = make_cross_caches(model) if use_cache else None
        for cur in range(max_new_tokens):
            if use_cache:
                logits = model.decode(tokens[:, cur:cur + 1], memory, src_mask, start_pos=cur, kv_caches=caches,
                                      cross_caches=cross)[:, -1]
                memory = None  # the cross caches hold what the decoder needs of it
            else:
                logits = model.decode(tokens[:, :cur + 1], model.encode(src, src_mask), src_mask)[:, -1]
            nxt = _agree_across_tp(sample_next(logits, temperature, top_p, gen).contiguous(), model.parallel_state)
            tokens[:, cur + 1] = torch.where(done, tokens[:, cur + 1], nxt)
            if return_logits:
                for i in torch.nonzero(~done).flatten().tolist():
                    kept[i].append(logits[i].float().cpu())
            if eos_id is not None:
                eos_hit |= ~done & (nxt == eos_id)
            done |= eos_hit
            if bool(done.all()):
                break
    finally:
        model.train(was_training)
    out, finish = [], []
    for i in range(bsz):
        new = tokens[i, 1:].tolist()
        if eos_hit[i]:
            new = new[:new.index(eos_id)]
        out.append(new)
        finish.append("eos" if eos_hit[i] else "length")
    logits_out = [torch.stack(k) if k else torch.empty(0) for k in kept] if return_logits else None
    return GenerationResult(out, finish, logits_out)
