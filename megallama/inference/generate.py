"""Autoregressive generation: greedy, temperature and nucleus (top-p) sampling, with a KV cache.

Prompts of different lengths share one batch without padding masks (Meta's scheme): decoding
starts at the shortest prompt's end, and positions still inside a longer prompt take the
prompt's token instead of the sampled one. Under tensor parallelism every rank computes the
same gathered logits, but only TP rank 0 samples; the chosen tokens are broadcast so all ranks
feed identical inputs to the next step whatever their floating-point noise.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence

import torch
import torch.nn.functional as F

from megallama.inference.kv_cache import make_kv_caches


@dataclass
class GenerationResult:
    tokens: List[List[int]]  # new tokens per prompt (an end-of-sequence token is not included)
    finish: List[str]  # per prompt: 'eos' or 'length'
    logits: Optional[List[torch.Tensor]] = None  # per prompt [new tokens, vocab] (float32, CPU)


def sample_next(logits: torch.Tensor, temperature: float = 0.0, top_p: float = 1.0,
                generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Next token ids ``[b]`` from ``[b, vocab]`` logits: argmax at temperature 0, else a draw
    from the softmax at ``temperature`` restricted to the smallest set with mass >= top_p."""
    if temperature <= 0:
        return logits.argmax(dim=-1)
    probs = F.softmax(logits.float() / temperature, dim=-1)
    if top_p >= 1.0:
        return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    outside = sorted_probs.cumsum(dim=-1) - sorted_probs > top_p  # mass before this token already enough
    sorted_probs = sorted_probs.masked_fill(outside, 0.0)
    choice = torch.multinomial(sorted_probs / sorted_probs.sum(-1, keepdim=True), 1, generator=generator)
    return order.gather(-1, choice).squeeze(-1)


def _agree_across_tp(tokens: torch.Tensor, state) -> torch.Tensor:
    """TP rank 0's choice, on every rank of the TP group of ``state`` (the model's layout)."""
    if state.tp > 1:
        import torch.distributed as dist

        dist.broadcast(tokens, src=state.tp_ranks[0], group=state.tp_group)
    return tokens


@torch.no_grad()
def generate(model: torch.nn.Module, prompts: Sequence[Sequence[int]], max_new_tokens: int,
             temperature: float = 0.0, top_p: float = 1.0, seed: int = 0, eos_id: Optional[int] = None,
             use_cache: bool = True, return_logits: bool = False) -> GenerationResult:
    """Continue each prompt (token ids) by up to ``max_new_tokens`` tokens.

    ``seed`` fixes the sampling stream, so a (checkpoint, prompts, settings) triple always gives
    the same tokens, at any TP degree. ``use_cache=False`` reruns the whole prefix every step
    (the reference the cache is tested against).
    """
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token (e.g. the BOS token)")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    lens = [len(p) for p in prompts]
    if max_new_tokens == 0:
        return GenerationResult([[] for _ in prompts], ["length"] * len(prompts),
                                [torch.empty(0) for _ in prompts] if return_logits else None)
    total = max(lens) + max_new_tokens
    limit = model.config.max_seq_len
    if total > limit:
        raise ValueError(f"longest prompt ({max(lens)} tokens) + max_new_tokens ({max_new_tokens}) = {total} "
                         f"exceeds the model's max_seq_len={limit}")
    device = next(model.parameters()).device
    bsz = len(prompts)
    tokens = torch.zeros(bsz, total, dtype=torch.long, device=device)
    for i, p in enumerate(prompts):
        tokens[i, :len(p)] = torch.as_tensor(list(p), dtype=torch.long, device=device)
    lens_t = torch.tensor(lens, device=device)
    in_prompt = torch.arange(total, device=device)[None, :] < lens_t[:, None]
    caches = make_kv_caches(model, bsz, total) if use_cache else None
    gen = torch.Generator(device=device).manual_seed(seed)
    done = torch.zeros(bsz, dtype=torch.bool, device=device)
    eos_hit = torch.zeros(bsz, dtype=torch.bool, device=device)
    kept: List[List[torch.Tensor]] = [[] for _ in prompts]
    was_training = model.training
    model.eval()
    try:
        prev = 0
        for cur in range(min(lens), total):
            if use_cache:
                logits = model(tokens[:, prev:cur], start_pos=prev, kv_caches=caches)[:, -1]
            else:
                logits = model(tokens[:, :cur])[:, -1]
            nxt = _agree_across_tp(sample_next(logits, temperature, top_p, gen).contiguous(), model.parallel_state)
            generated = ~in_prompt[:, cur]
            tokens[:, cur] = torch.where(generated, nxt, tokens[:, cur])
            if return_logits:
                for i in torch.nonzero(generated & ~done).flatten().tolist():
                    kept[i].append(logits[i].float().cpu())
            if eos_id is not None:
                eos_hit |= generated & ~done & (nxt == eos_id)
            done |= eos_hit | (cur + 1 - lens_t >= max_new_tokens)
            prev = cur
            if bool(done.all()):
                break
    finally:
        model.train(was_training)
    out, finish = [], []
    for i, n in enumerate(lens):
        new = tokens[i, n:n + max_new_tokens].tolist()
        if eos_hit[i] and eos_id in new:
            new = new[:new.index(eos_id)]
        out.append(new)
        finish.append("eos" if eos_hit[i] else "length")
    logits_out = None
    if return_logits:
        logits_out = [torch.stack(k[:len(out[i]) + int(bool(eos_hit[i]))]) if k else torch.empty(0)
                      for i, k in enumerate(kept)]
    return GenerationResult(out, finish, logits_out)
