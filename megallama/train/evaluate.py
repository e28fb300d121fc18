"""Perplexity over a dataset, split across data-parallel ranks, at any TP layout."""
from __future__ import annotations

import math
from typing import Dict, Optional

import numpy as np
import torch
import torch.distributed as dist

from megallama.train.step import DecoderLoss, LossFn, token_weighting


def _batches(indices, size):
    for i in range(0, len(indices), size):
        yield indices[i:i + size]


@torch.no_grad()
def perplexity(model, dataset, micro_batch: int, device, state, max_samples: Optional[int] = None,
               loss_fn: LossFn = DecoderLoss()) -> Dict:
    """Token-weighted mean loss and its exponential. Each DP rank takes every dp-th sample, so
    the result is the same at any layout (up to float summation order)."""
    n = len(dataset) if max_samples is None else min(len(dataset), max_samples)
    n -= n % state.dp  # equal work per rank: ZeRO-3 gathers are collective
    if n == 0:
        return {"loss": float("nan"), "perplexity": float("nan"), "tokens": 0, "samples": 0}
    was_training = model.training
    model.eval()
    sums = torch.zeros(2, dtype=torch.float64)
    for chunk in _batches(list(range(state.dp_rank, n, state.dp)), micro_batch):
        tokens = torch.stack([torch.as_tensor(dataset[i]) for i in chunk]).to(device)
        loss, count = loss_fn(model, tokens)
        count = int(count)
        sums += torch.tensor([loss.double().item() * count, count], dtype=torch.float64)
    if dist.is_initialized() and state.dp > 1:
        dist.all_reduce(sums, group=state.dp_group)
    model.train(was_training)
    loss = (sums[0] / sums[1]).item()
    return {"loss": loss, "perplexity": math.exp(min(loss, 700.0)), "tokens": int(sums[1].item()), "samples": n}


@torch.no_grad()
def pipeline_loss(engine, dataset, micro_batch: int, accum: int, state, device, batches: int,
                  loss_fn: DecoderLoss = DecoderLoss()) -> Dict:
    """Token-weighted mean loss of ``batches`` pipeline eval batches, as :func:`perplexity` gives
    it: DeepSpeed's ``eval_batch`` averages micro-batch means, so where label counts differ
    (document boundaries) the last stage's loss weights each micro-batch as the training step does
    (:func:`token_weighting`), and batches are weighted by their counts."""
    per_batch = micro_batch * accum * state.dp
    usable = min(batches, len(dataset) // per_batch)
    if usable == 0:
        return {"loss": float("nan"), "perplexity": float("nan"), "tokens": 0, "samples": 0}
    seq = np.shape(dataset[0])[-1] - 1
    head = engine.module.loss_fn  # the last stage's PipelineLoss
    weighted, tokens = 0.0, 0.0
    for b in range(usable):
        rows = []
        for m in range(accum):
            start = b * per_batch + (m * state.dp + state.dp_rank) * micro_batch
            rows.append(torch.stack([torch.as_tensor(dataset[i]) for i in range(start, start + micro_batch)]).to(device))
        weighting = token_weighting(loss_fn, state, rows)  # every stage: each learns the batch's count
        head.scale = weighting[1] if weighting is not None else None
        try:
            # the count said outright: under train.rampup_batch_size the engine's own is the ramp's of the moment
            loss = engine.eval_batch(iter([loss_fn.pipeline_inputs(r) for r in rows]), num_micro_batches=accum).item()
        finally:
            head.scale = None
        count = state.dp * accum / weighting[1].item() if weighting is not None else per_batch * seq
        weighted, tokens = weighted + loss * count, tokens + count
    loss = weighted / max(tokens, 1.0)
    return {"loss": loss, "perplexity": math.exp(min(loss, 700.0)), "tokens": int(round(tokens)),
            "samples": usable * per_batch}
