"""Cross entropy over logits split along the vocabulary, without gathering them.

Each rank holds ``[..., V/tp]`` logits; three small all-reduces (max, target logit, sum of exp)
give the exact loss. The softmax is computed in fp32 once and kept for backward, so fp32 logits
are never materialised twice. With one TP rank the whole vocabulary is local: one fused
``log_softmax`` kernel (fp32 output straight from bf16 logits, each row handled while in
cache) gives the loss, and an in-place ``exp_`` turns it into the saved softmax. Backward
writes the scaled gradient straight into the logits' dtype.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from megallama.parallel.state import get_state


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


class _VocabParallelCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: torch.Tensor, target: torch.Tensor, ignore_index: int):
        state = get_state()
        local_v = logits.size(-1)
        start = state.tp_rank * local_v
        valid = target != ignore_index
        inside = valid & (target >= start) & (target < start + local_v)
        local_t = torch.where(inside, target - start, torch.zeros_like(target))
        if state.tp > 1:
            softmax, loss = _softmax_and_loss_tp(logits, local_t, inside, valid, state.tp_group)
        else:
            softmax = torch.log_softmax(logits, dim=-1, dtype=torch.float32)  # a new buffer
            loss = -softmax.gather(-1, local_t.unsqueeze(-1)).squeeze(-1) * valid
            softmax.exp_()
        ctx.save_for_backward(softmax, local_t, inside, valid)
        ctx.logits_dtype = logits.dtype
        return loss

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        softmax, local_t, inside, valid = ctx.saved_tensors
        flat = softmax.view(-1, softmax.size(-1))
        rows = torch.arange(flat.size(0), device=softmax.device)
        flat[rows, local_t.view(-1)] -= inside.view(-1).to(softmax.dtype)
        scale = (grad_loss * valid).unsqueeze(-1).to(softmax.dtype)
        if ctx.logits_dtype == softmax.dtype:  # the softmax buffer becomes the gradient
            return softmax.mul_(scale), None, None
        grad = torch.empty(softmax.shape, dtype=ctx.logits_dtype, device=softmax.device)
        return torch.mul(softmax, scale, out=grad), None, None  # fp32 math, one write in the logits' dtype


def vocab_parallel_cross_entropy(logits: torch.Tensor, target: torch.Tensor,
                                 ignore_index: int = -100) -> torch.Tensor:
    """Per-token loss (0 where ``target == ignore_index``); logits are this rank's vocab slice."""
    return _VocabParallelCrossEntropy.apply(logits, target, ignore_index)
