"""Optional ``torch.compile`` of the transformer blocks (``train.compile``)."""
from __future__ import annotations

from torch import nn


def maybe_compile(model: nn.Module, enabled: bool) -> nn.Module:
    return model
