"""Perplexity over a dataset, split across data-parallel ranks, at any TP layout."""
from __future__ import annotations

import math
from typing import Dict, Optional

import numpy as np
import torch
import torch.distributed as dist

from megallama.train.step import DecoderLoss, LossFn


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
    """Mean loss of ``batches`` pipeline eval batches (DeepSpeed's ``eval_batch``: the mean of
    micro-batch means); ``loss_fn`` turns rows into the pipeline's inputs."""
    per_batch = micro_batch * accum * state.dp
    usable = min(batches, len(dataset) // per_batch)
    if usable == 0:
        return {"loss": float("nan"), "perplexity": float("nan"), "tokens": 0, "samples": 0}

    def micro_batches():
        for b in range(usable):
            for m in range(accum):
                start = b * per_batch + (m * state.dp + state.dp_rank) * micro_batch
                t = torch.stack([torch.as_tensor(dataset[i]) for i in range(start, start + micro_batch)]).to(device)
                yield loss_fn.pipeline_inputs(t)

    it = micro_batches()
    # the count said outright: under train.rampup_batch_size the engine's own is the ramp's of the moment
    losses = [engine.eval_batch(it, num_micro_batches=accum).item() for _ in range(usable)]
    loss = sum(losses) / len(losses)
    seq = np.shape(dataset[0])[-1] - 1
    return {"loss": loss, "perplexity": math.exp(min(loss, 700.0)), "tokens": usable * per_batch * seq,
            "samples": usable * per_batch}
