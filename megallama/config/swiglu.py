"""Meta's SwiGLU width rule, the one copy the config, the cost models and the HF converter read.

LLaMA's feed-forward width is not a config field but a function of ``dim``: two thirds of 4d,
scaled by ``ffn_dim_multiplier``, rounded up to ``multiple_of``. Hugging Face stores the width
itself (``intermediate_size``), so the converter searches for fields this rule maps onto it.
"""
from __future__ import annotations

import math
from typing import Optional


def swiglu_base(dim: int) -> int:
    """2/3 of 4d: the width that keeps SwiGLU's three matrices at the FLOPs of a 4d GeLU MLP."""
    return int(2 * 4 * dim / 3)


def swiglu_hidden(dim: int, multiple_of: int, ffn_dim_multiplier: Optional[float] = None) -> int:
    """The SwiGLU width: the base, scaled, rounded up to ``multiple_of``."""
    hidden = swiglu_base(dim)
    if ffn_dim_multiplier is not None:
        hidden = int(ffn_dim_multiplier * hidden)
    return multiple_of * math.ceil(hidden / multiple_of)
