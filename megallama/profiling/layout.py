"""A training layout (TP x PP x DP, ZeRO, micro-batching, recompute, precision) and its topology.

Rank order matches ``megallama.parallel.state``: TP innermost, then DP, then PP
(``rank = pp_rank*dp*tp + dp_rank*tp + tp_rank``), so a TP group stays inside a node when
``tp <= gpus_per_node`` and a DP group spans nodes once ``tp*dp > gpus_per_node``.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Dict, List

from megallama.errors import UserError
from megallama.profiling.arch import ArchSpec
from megallama.profiling.flops import RECOMPUTE_MODES
from megallama.train.ds_settings import EngineTraits

DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}
# sane ranges for what-if arithmetic: beyond these the figures are nonsense, not estimates
MAX_GPUS = 2 ** 20          # a million GPUs, any one degree or the whole world
MAX_SEQ = 2 ** 24           # 16M tokens, past the longest context any LLaMA-family model runs
MAX_MICRO_TOKENS = 2 ** 31 - 1   # tokens of one micro-batch (mbs x seq)
MAX_ACCUM = 2 ** 24


@dataclass(frozen=True)
class Layout:
    """One way to run a step. ``grad_accum`` is the number of micro-batches per replica per step
    (``m``); ``interleave`` the virtual pipeline chunks per rank (Megatron's interleaved 1F1B;
    DeepSpeed's pipeline engine runs plain 1F1B, i.e. 1)."""

    tp: int = 1
    pp: int = 1
    dp: int = 1
    zero: int = 0
    mbs: int = 1
    grad_accum: int = 1
    recompute: str = "none"
    sp: bool = False
    offload: bool = False
    dtype: str = "bf16"
    interleave: int = 1
    gpus_per_node: int = 8

    @property
    def world(self) -> int:
        return self.tp * self.pp * self.dp

    @property
    def dtype_bytes(self) -> int:
        return DTYPE_BYTES[self.dtype]

    @property
    def mixed(self) -> bool:
        return self.dtype != "fp32"

    @property
    def global_batch(self) -> int:
        """Sequences per optimizer step."""
        return self.mbs * self.grad_accum * self.dp

    @property
    def traits(self) -> EngineTraits:
        """The engine ``build_engine`` makes of this layout: DeepSpeed's optimizer, megallama's patches."""
        return EngineTraits.predict(self.zero, self.dtype, self.dp, self.pp)

    @property
    def effective_zero(self) -> int:
        """How DeepSpeed's optimizer shards: bf16 + pipeline at stage 0 runs ``BF16_Optimizer``,
        which shards like ZeRO-1 (``EngineTraits.effective_zero``)."""
        return self.traits.effective_zero

    def in_flight(self, stage: int) -> int:
        """Micro-batches whose activations stage ``stage`` holds at once under 1F1B."""
        return min(self.pp - stage, self.grad_accum)

    def with_(self, **changes: Any) -> "Layout":
        return replace(self, **changes)

    def describe(self) -> str:
        sp = "+sp" if self.sp else ""
        off = "+offload" if self.offload else ""
        return (f"tp{self.tp}{sp} pp{self.pp} dp{self.dp} zero{self.zero}{off} mbs{self.mbs} "
                f"x{self.grad_accum} rc={self.recompute} {self.dtype}")

    def as_dict(self) -> Dict[str, Any]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}

    def check(self, spec: ArchSpec, seq: int) -> None:
        """Reject layouts the harness cannot run, with one line naming the reason."""
        if seq < 1:
            raise UserError(f"--seq: expected a positive integer, got {seq}")
        if seq > MAX_SEQ:
            raise UserError(f"--seq: expected at most {MAX_SEQ:,} tokens, got {seq}")
        for name in ("tp", "pp", "dp", "mbs", "grad_accum", "interleave", "gpus_per_node"):
            if getattr(self, name) < 1:
                raise UserError(f"--{name.replace('_', '-')}: expected a positive integer, got {getattr(self, name)}")
        for name, top in (("tp", MAX_GPUS), ("pp", MAX_GPUS), ("dp", MAX_GPUS), ("gpus_per_node", MAX_GPUS),
                          ("grad_accum", MAX_ACCUM), ("interleave", MAX_GPUS)):
            if getattr(self, name) > top:
                raise UserError(f"--{name.replace('_', '-')}: expected at most {top:,}, got {getattr(self, name)}")
        if self.world > MAX_GPUS:
            raise UserError(f"--tp x --pp x --dp: {self.world:,} GPUs; expected at most {MAX_GPUS:,}")
        if self.mbs * seq > MAX_MICRO_TOKENS:
            raise UserError(f"--mbs: {self.mbs} sequences of {seq} tokens per micro-batch; expected at most "
                            f"{MAX_MICRO_TOKENS:,} tokens")
        if self.zero not in (0, 1, 2, 3):
            raise UserError(f"--zero: expected 0, 1, 2 or 3, got {self.zero}")
        if self.recompute not in RECOMPUTE_MODES:
            raise UserError(f"--recompute: expected one of {', '.join(RECOMPUTE_MODES)}, got '{self.recompute}'")
        if self.dtype not in DTYPE_BYTES:
            raise UserError(f"--dtype: expected one of {', '.join(DTYPE_BYTES)}, got '{self.dtype}'")
        for what, value in (("n_heads", spec.n_heads), ("n_kv_heads", spec.kv_heads),
                            ("ffn_hidden_size", spec.ffn_hidden), ("vocab_size", spec.vocab_size)):
            if value % self.tp:
                raise UserError(f"--tp {self.tp}: model {what}={value} is not divisible by tp")
        if spec.n_layers % (self.pp * self.interleave):
            raise UserError(f"--pp {self.pp}: model n_layers={spec.n_layers} is not divisible by pp"
                            + (f" x interleave {self.interleave}" if self.interleave > 1 else ""))
        if self.pp > 1 and spec.arch != "decoder":
            raise UserError("--pp: pipeline parallelism supports decoder-only models (use --pp 1)")
        if self.sp and self.tp == 1:
            raise UserError("--sp: sequence parallelism needs --tp > 1")
        if self.sp and seq % self.tp:
            raise UserError(f"--seq {seq}: not divisible by tp={self.tp} (required with sequence parallelism)")
        if self.offload and self.zero == 0:
            raise UserError("--offload: DeepSpeed offloads the optimizer only with ZeRO stage 1, 2 or 3")
        if seq > spec.max_seq_len and spec.learned_positions:
            raise UserError(f"--seq {seq}: exceeds the model's {spec.max_seq_len} learned positions")


# ------------------------------------------------------------------------------- topology
def group_ranks(layout: Layout, kind: str) -> List[int]:
    """The ranks of the ``tp``/``dp``/``pp`` group that contains rank 0."""
    tp, dp, pp = layout.tp, layout.dp, layout.pp
    if kind == "tp":
        return list(range(tp))
    if kind == "dp":
        return [d * tp for d in range(dp)]
    if kind == "pp":
        return [p * dp * tp for p in range(pp)]
    raise ValueError(f"unknown group kind {kind!r}")


def members_per_node(layout: Layout, kind: str) -> int:
    """How many members of one group share a node (== group size when it fits in one node)."""
    ranks = group_ranks(layout, kind)
    nodes: Dict[int, int] = {}
    for r in ranks:
        nodes[r // layout.gpus_per_node] = nodes.get(r // layout.gpus_per_node, 0) + 1
    return max(nodes.values())


def spans_nodes(layout: Layout, kind: str) -> bool:
    ranks = group_ranks(layout, kind)
    return len({r // layout.gpus_per_node for r in ranks}) > 1


def divisors(n: int) -> List[int]:
    return [d for d in range(1, n + 1) if n % d == 0]
