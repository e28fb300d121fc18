"""Cross entropy over logits split along the vocabulary, without gathering them.

Each rank holds ``[..., V/tp]`` logits; three small all-reduces (max, target logit, sum of exp)
give the exact loss. The softmax is computed in fp32 once and kept for backward, so fp32 logits
are never materialised twice.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from megallama.parallel.state import get_state


class _VocabParallelCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: torch.Tensor, target: torch.Tensor, ignore_index: int):
        state = get_state()
        group, tp = state.tp_group, state.tp
        local_v = logits.size(-1)
        start = state.tp_rank * local_v

        x = logits.float()
        row_max = x.max(dim=-1, keepdim=True)[0]
        if tp > 1:
            dist.all_reduce(row_max, op=dist.ReduceOp.MAX, group=group)
        x = x.sub_(row_max) if x.data_ptr() != logits.data_ptr() else x - row_max

        valid = target != ignore_index
        inside = valid & (target >= start) & (target < start + local_v)
        local_t = torch.where(inside, target - start, torch.zeros_like(target))
        flat = x.view(-1, local_v)
        rows = torch.arange(flat.size(0), device=x.device)
        picked = flat[rows, local_t.view(-1)].view_as(target) * inside
        exp = x.exp_()
        sum_exp = exp.sum(dim=-1)
        if tp > 1:
            dist.all_reduce(picked, group=group)
            dist.all_reduce(sum_exp, group=group)
        loss = (torch.log(sum_exp) - picked) * valid
        exp.div_(sum_exp.unsqueeze(-1))
        ctx.save_for_backward(exp, local_t, inside, valid)
        ctx.logits_dtype = logits.dtype
        return loss

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        softmax, local_t, inside, valid = ctx.saved_tensors
        grad = softmax
        flat = grad.view(-1, grad.size(-1))
        rows = torch.arange(flat.size(0), device=grad.device)
        flat[rows, local_t.view(-1)] -= inside.view(-1).to(grad.dtype)
        grad.mul_((grad_loss * valid).unsqueeze(-1))
        return grad.to(ctx.logits_dtype), None, None


def vocab_parallel_cross_entropy(logits: torch.Tensor, target: torch.Tensor,
                                 ignore_index: int = -100) -> torch.Tensor:
    """Per-token loss (0 where ``target == ignore_index``); logits are this rank's vocab slice."""
    return _VocabParallelCrossEntropy.apply(logits, target, ignore_index)
