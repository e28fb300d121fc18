"""Cross entropy over logits split along the vocabulary, without gathering them.

Each rank holds ``[..., V/tp]`` logits; three small all-reduces (max, target logit, sum of exp)
give the exact loss. The softmax is computed in fp32 once and kept for backward, so fp32 logits
are never materialised twice. With one TP rank the whole vocabulary is local: the upcast
copy is the only new buffer, torch's softmax kernel turns it into the softmax in place (each
row read once, while in cache) and the loss is read off the target's probability. Backward
turns the same buffer into the gradient in place and casts it once.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from megallama.parallel.state import TPGroup


def _softmax_and_loss_tp(logits: torch.Tensor, local_t: torch.Tensor, inside: torch.Tensor, valid: torch.Tensor,
                         group):
    """Softmax of this rank's slice under the global max and sum, and the loss (three all-reduces)."""
    x = logits.float()
    row_max = x.max(dim=-1, keepdim=True)[0]
    dist.all_reduce(row_max, op=dist.ReduceOp.MAX, group=group)
    x = x.sub_(row_max) if x.data_ptr() != logits.data_ptr() else x - row_max
    flat = x.view(-1, x.size(-1))
    rows = torch.arange(flat.size(0), device=x.device)
    picked = flat[rows, local_t.view(-1)].view_as(local_t) * inside
    exp = x.exp_()
    sum_exp = exp.sum(dim=-1)
    dist.all_reduce(picked, group=group)
    dist.all_reduce(sum_exp, group=group)
    loss = (torch.log(sum_exp) - picked) * valid
    return exp.div_(sum_exp.unsqueeze(-1)), loss


def _softmax_and_loss(logits: torch.Tensor, target: torch.Tensor, valid: torch.Tensor):
    """All of the vocabulary on this rank: the fp32 softmax and the per-token loss.

    On the CPU, where a step is bound by memory traffic and by faulting in fresh pages, the
    upcast copy is the only new buffer: torch's softmax kernel runs on it in place (each row
    read once, while in cache) and the loss is ``-log p[target]``; a row whose target
    probability is too small for fp32 (a logit gap above ~69) takes ``logsumexp`` instead.
    Elsewhere ``log_softmax`` gives the loss without that data-dependent check (no host sync)."""
    if logits.device.type != "cpu":
        logp = torch.log_softmax(logits, dim=-1, dtype=torch.float32)
        loss = -logp.gather(-1, target.unsqueeze(-1)).squeeze(-1)
        return logp.exp_(), torch.where(valid, loss, 0.0)
    probs = logits.to(torch.float32, copy=True)
    torch.ops.aten._softmax.out(probs, -1, False, out=probs)  # in place: row by row
    loss = -torch.log(probs.gather(-1, target.unsqueeze(-1)).squeeze(-1))
    tiny = (loss > 69.0) & valid
    if tiny.any():
        rows = logits[tiny].float()
        loss[tiny] = torch.logsumexp(rows, dim=-1) - rows.gather(-1, target[tiny].unsqueeze(-1)).squeeze(-1)
    return probs, torch.where(valid, loss, 0.0)


class _VocabParallelCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: torch.Tensor, target: torch.Tensor, tp: TPGroup, ignore_index: int):
        local_v = logits.size(-1)
        start = tp.rank * local_v
        valid = target != ignore_index
        inside = valid & (target >= start) & (target < start + local_v)
        local_t = torch.where(inside, target - start, torch.zeros_like(target))
        if tp.size > 1:
            softmax, loss = _softmax_and_loss_tp(logits, local_t, inside, valid, tp.group)
        else:
            softmax, loss = _softmax_and_loss(logits, local_t, valid)
        ctx.save_for_backward(softmax, local_t, inside, valid)
        ctx.logits_dtype = logits.dtype
        return loss

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        softmax, local_t, inside, valid = ctx.saved_tensors
        flat = softmax.view(-1, softmax.size(-1))
        rows = torch.arange(flat.size(0), device=softmax.device)
        flat[rows, local_t.view(-1)] -= inside.view(-1).to(softmax.dtype)
        # in place: the softmax buffer becomes the gradient (cast once for bf16/fp16 logits)
        softmax.mul_((grad_loss * valid).unsqueeze(-1).to(softmax.dtype))
        return softmax.to(ctx.logits_dtype), None, None, None


def vocab_parallel_cross_entropy(logits: torch.Tensor, target: torch.Tensor, tp: TPGroup,
                                 ignore_index: int = -100) -> torch.Tensor:
    """Per-token loss (0 where ``target == ignore_index``); logits are this rank's vocab slice of
    the TP group ``tp``."""
    return _VocabParallelCrossEntropy.apply(logits, target, tp, ignore_index)
