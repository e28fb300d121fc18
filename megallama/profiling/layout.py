"""A training layout (TP x Ulysses x DP x PP, ZeRO, micro-batching, recompute, precision) and its topology.

Which layouts are valid is :mod:`megallama.config.layout_rules`'s to say, and rank order
:mod:`megallama.config.topology`'s (the one the run uses): a TP group stays inside a node when
``tp <= gpus_per_node``, then the Ulysses group, and a DP group spans nodes once
``tp*ulysses*dp > gpus_per_node``. Context (ring) parallelism, ``cp``, is costed only (the
trainer does not run it): its ranks take the Ulysses axis' place in the grid, as Megatron puts
CP next to TP, and the two are not combined. Interleaved 1F1B (``interleave``), FP8 (``dtype``)
and torchtitan's op-level recomputation (``recompute="op"``) are likewise costed only when
pinned, never proposed (:func:`trainer_notes` words what the trainer does instead).
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from functools import lru_cache
from typing import Any, Dict, List, Optional, Sequence, Tuple

from megallama.config import layout_rules as rules
from megallama.config.pipeline_split import PARTITIONS, explicit_problem, stage_layers
from megallama.config.topology import ParallelDims
from megallama.errors import UserError
from megallama.profiling.arch import ArchSpec
from megallama.profiling.flops import COSTED_RECOMPUTE_MODES, RECOMPUTE_MODES, stage_weights
from megallama.train.ds_settings import EngineTraits

# fp8 (costed only): Transformer Engine keeps bf16 weights, grads and activations and casts GEMM
# operands to fp8, so everything but the GEMMs' speed is bf16's
DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4, "fp8": 2}
FP8_WEIGHT_COPY_BYTES = 2   # per GEMM weight: TE's cached fp8 copy and its transpose (Hopper GEMMs are TN)
# sane ranges for what-if arithmetic: beyond these the figures are nonsense, not estimates
MAX_GPUS = 2 ** 20          # a million GPUs, any one degree or the whole world
MAX_SEQ = 2 ** 24           # 16M tokens, past the longest context any LLaMA-family model runs
MAX_MICRO_TOKENS = 2 ** 31 - 1   # tokens of one micro-batch (mbs x seq)
MAX_ACCUM = 2 ** 24


@dataclass(frozen=True)
class Layout:
    """One way to run a step. ``grad_accum`` is the number of micro-batches per replica per step
    (``m``); ``interleave`` the virtual pipeline chunks per rank (Megatron's interleaved 1F1B;
    DeepSpeed's pipeline engine runs plain 1F1B, i.e. 1). ``pipeline_layers`` gives the blocks of
    each stage; without it ``pipeline_partition`` splits them (:func:`split`). ``framework`` is
    whose sharded data parallelism issues ZeRO-3's collectives (:func:`megallama.profiling.comm.
    fsdp_collectives`): the trainer's DeepSpeed, or a published run's PyTorch FSDP, whose mixed
    precision may reduce-scatter gradients in ``reduce_dtype`` (fp32 under Composer's ``DEFAULT``
    and torchtitan's default, the model's dtype under ``PURE``)."""

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
    pipeline_layers: Optional[Tuple[int, ...]] = None
    pipeline_partition: str = "parameters"
    ulysses: int = 1   # DeepSpeed-Ulysses: ranks each sequence is split over for the whole block
    cp: int = 1        # context (ring-attention) parallelism, cost model only
    framework: str = "deepspeed"   # who issues ZeRO-3's calls: deepspeed (buckets) | fsdp | fsdp2 (per block)
    reduce_dtype: Optional[str] = None   # FSDP's gradient reduce-scatter dtype (None: ``dtype``)

    @property
    def world(self) -> int:
        return self.tp * self.pp * self.dp * self.ulysses * self.cp

    @property
    def seq_shards(self) -> int:
        """Ranks one sequence is split over outside TP (Ulysses or CP): each holds ``1/seq_shards``."""
        return self.ulysses * self.cp

    @property
    def zero_dp(self) -> int:
        """Ranks gradients are reduced and ZeRO states partitioned over: DP x Ulysses (DeepSpeed's
        sequence-data-parallel group), DP x CP (Megatron's)."""
        return self.dp * self.seq_shards

    @property
    def dtype_bytes(self) -> int:
        return DTYPE_BYTES[self.dtype]

    @property
    def state_dtype(self) -> str:
        """The precision of weights, grads and optimizer: fp8 runs are bf16 mixed precision."""
        return "bf16" if self.dtype == "fp8" else self.dtype

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
        return EngineTraits.predict(self.zero, self.state_dtype, self.zero_dp, self.pp)

    @property
    def effective_zero(self) -> int:
        """How DeepSpeed's optimizer shards: bf16 + pipeline at stage 0 runs ``BF16_Optimizer``,
        which shards like ZeRO-1 (``EngineTraits.effective_zero``)."""
        return self.traits.effective_zero

    def in_flight(self, stage: int) -> float:
        """Micro-batches whose activations stage ``stage`` holds at once under 1F1B. Interleaved
        (``v`` chunks of ``1/v`` of the stage's blocks), Megatron's schedule runs
        ``2 (pp - stage - 1) + (v - 1) pp`` warm-up chunk forwards and one more before the first
        backward, so stage 0 holds ``pp + (pp - 1)/v`` micro-batches' worth (Narayanan et al. 2021,
        sec. 2.2.2; Korthikanti et al. 2022, sec. 4.2.3: ``pp (1 + (pp - 1)/(pp v))``)."""
        v = self.interleave
        if v == 1:
            return min(self.pp - stage, self.grad_accum)
        return min(2 * (self.pp - stage - 1) + (v - 1) * self.pp + 1, self.grad_accum * v) / v

    def stage_layers(self, spec: ArchSpec) -> List[int]:
        """Blocks on each pipeline stage, by the rule training uses (:func:`split`)."""
        return split(spec, self.pp, self.pipeline_partition, self.pipeline_layers, self.interleave)

    def stage_groups(self, spec: ArchSpec) -> Dict[int, int]:
        """Stage -> how many stages it stands for. The first and last stages stand alone; of the
        middle stages holding equally many blocks the earliest stands for the rest, since their
        states and step times are equal and it holds the most micro-batches in flight."""
        counts = self.stage_layers(spec)
        groups: Dict[int, int] = {0: 1}
        first_with: Dict[int, int] = {}
        for s in range(1, self.pp - 1):
            rep = first_with.setdefault(counts[s], s)
            groups[rep] = groups.get(rep, 0) + 1
        groups[self.pp - 1] = groups.get(self.pp - 1, 0) + (1 if self.pp > 1 else 0)
        return groups

    def with_(self, **changes: Any) -> "Layout":
        return replace(self, **changes)

    def describe(self) -> str:
        sp = "+sp" if self.sp else ""
        off = "+offload" if self.offload else ""
        seq = (f" u{self.ulysses}" if self.ulysses > 1 else "") + (f" cp{self.cp}" if self.cp > 1 else "")
        v = f"v{self.interleave}" if self.interleave > 1 else ""
        return (f"tp{self.tp}{sp}{seq} pp{self.pp}{v} dp{self.dp} zero{self.zero}{off} mbs{self.mbs} "
                f"x{self.grad_accum} rc={self.recompute} {self.dtype}")

    def as_dict(self) -> Dict[str, Any]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}

    def check(self, spec: ArchSpec, seq: int) -> None:
        """Reject layouts the harness cannot run, with one line naming the reason."""
        if seq < 1:
            raise UserError(f"--seq: expected a positive integer, got {seq}")
        if seq > MAX_SEQ:
            raise UserError(f"--seq: expected at most {MAX_SEQ:,} tokens, got {seq}")
        for name in ("tp", "pp", "dp", "ulysses", "cp", "mbs", "grad_accum", "interleave", "gpus_per_node"):
            _refuse(rules.positive_problem(name, getattr(self, name), rules.FLAGS))
        for name, top in (("tp", MAX_GPUS), ("pp", MAX_GPUS), ("dp", MAX_GPUS), ("ulysses", MAX_GPUS),
                          ("cp", MAX_GPUS), ("gpus_per_node", MAX_GPUS), ("grad_accum", MAX_ACCUM),
                          ("interleave", MAX_GPUS)):
            if getattr(self, name) > top:
                raise UserError(f"--{name.replace('_', '-')}: expected at most {top:,}, got {getattr(self, name)}")
        if self.world > MAX_GPUS:
            raise UserError(f"--tp x --pp x --dp x --ulysses x --cp: {self.world:,} GPUs; expected at most {MAX_GPUS:,}")
        if self.mbs * seq > MAX_MICRO_TOKENS:
            raise UserError(f"--mbs: {self.mbs} sequences of {seq} tokens per micro-batch; expected at most "
                            f"{MAX_MICRO_TOKENS:,} tokens")
        if self.zero not in (0, 1, 2, 3):
            raise UserError(f"--zero: expected 0, 1, 2 or 3, got {self.zero}")
        if self.recompute not in COSTED_RECOMPUTE_MODES:
            raise UserError(f"--recompute: expected one of {', '.join(COSTED_RECOMPUTE_MODES)}, "
                            f"got '{self.recompute}'")
        _refuse(op_recompute_problem(spec, self.recompute, self.ulysses))
        if self.pipeline_partition not in PARTITIONS:
            raise UserError(f"--pipeline-partition: expected one of {', '.join(PARTITIONS)}, "
                            f"got '{self.pipeline_partition}'")
        if self.interleave > 1 and self.pp == 1:
            raise UserError(f"--interleave {self.interleave}: interleaves pipeline stages; expected --pp > 1")
        if self.dtype not in DTYPE_BYTES:
            raise UserError(f"--dtype: expected one of {', '.join(DTYPE_BYTES)}, got '{self.dtype}'")
        chunked = self.interleave if self.pipeline_layers is None else 1   # a list: its own chunk rule
        _refuse(rules.layout_problem(spec.shape, self.tp, self.pp, self.sp, seq, self.zero, self.offload,
                                     chunked, rules.FLAGS, ulysses=self.ulysses)
                or cp_problem(spec, self.tp, self.sp, seq, self.cp, self.ulysses)
                or (rules.positions_problem(seq, spec.max_seq_len, rules.FLAGS) if spec.learned_positions else None))
        _refuse(pipeline_layers_problem(self.pipeline_layers, spec.n_layers, self.pp, self.interleave))


def trainer_notes(layout: Layout, impl: str = "megallama") -> List[str]:
    """One line for each pinned choice the trainer does not run: the figures are costed, not
    promised (``impl``: whose implementation the activations and exchanges are counted for)."""
    from megallama.profiling.sequence_comm import TRAINER_NOTE

    notes = [TRAINER_NOTE] if layout.cp > 1 else []
    if layout.interleave > 1:
        notes.append(f"interleaved 1F1B (--interleave {layout.interleave}) is costed only: the trainer runs "
                     "DeepSpeed's plain 1F1B")
    if layout.dtype == "fp8":
        notes.append("FP8 (--dtype fp8) is costed only: the trainer runs bf16/fp16/fp32; linear GEMMs at the "
                     "profile's FP8 peak (attention at BF16), weights, grads and optimizer as bf16 mixed precision "
                     "plus fp8 weight copies; MFU against the FP8 peak")
    if layout.recompute == "op":
        notes.append("op-level recomputation (--recompute op, torchtitan's policy) is costed only: the trainer "
                     f"recomputes {', '.join(RECOMPUTE_MODES)}")
    if impl == "megatron":
        notes.append("--impl megatron costs Megatron-LM's implementation (eager attention, SP inputs re-gathered "
                     "in backward, scatter-gather pipeline exchange), not megallama's")
    return notes


def op_recompute_problem(spec: ArchSpec, recompute: str, ulysses: int) -> Optional[str]:
    """torchtitan's op-level policy is written for its decoder block; Ulysses' all-to-alls are not in it."""
    if recompute == "op" and (spec.arch != "decoder" or ulysses > 1):
        return "--recompute op: torchtitan's op-level policy is costed for decoder-only blocks without --ulysses"
    return None


def dtype_problem(dtype: str, peaks: Dict[str, float], gpu: str) -> Optional[str]:
    """FP8 is costed only on a profile with an FP8 peak (Hopper and later; not A100)."""
    if dtype in peaks:
        return None
    return f"--dtype {dtype}: GPU profile '{gpu}' has no {dtype} peak (expected a profile with '{dtype}' in peak_flops)"


def cp_problem(spec: ArchSpec, tp: int, sp: bool, seq: int, cp: int, ulysses: int = 1) -> Optional[str]:
    """Ring attention as Llama 3 and Megatron balance it: each sequence cut in ``2 cp`` chunks,
    rank ``i`` holding chunks ``i`` and ``2cp-1-i`` (equal causal work), so ``2 cp`` (x TP under
    SP) divides the sequence. Costed only; not combined with Ulysses (one sequence axis)."""
    if cp == 1:
        return None
    if ulysses > 1:
        return "--cp: not combined with --ulysses (one sequence-sharding axis); set one of them to 1"
    if spec.arch != "decoder":
        return f"--cp: shards decoder-only sequences (model arch '{spec.arch}')"
    shards = 2 * cp * (tp if sp else 1)
    if seq % shards:
        return f"--seq {seq}: not divisible by 2 x cp={cp}{f' x tp={tp} (sequence parallelism)' if sp else ''}"
    return None


def split(spec: ArchSpec, pp: int, partition: str = "parameters", explicit: Optional[Sequence[int]] = None,
          interleave: int = 1) -> List[int]:
    """Blocks per stage: :func:`megallama.config.pipeline_split.stage_layers` with this model's
    parameter counts (:func:`megallama.profiling.flops.stage_weights`); interleaved chunks are
    equal (the layout rules require it; a given list by :func:`pipeline_layers_problem`'s rule)."""
    if pp == 1 and explicit is None:   # nothing to balance (what-if models may have 10**9 layers)
        return [spec.n_layers]
    return list(_split(spec, pp, "uniform" if interleave > 1 else partition,
                       None if explicit is None else tuple(explicit)))


@lru_cache(maxsize=4096)   # the planner asks for the same few splits for thousands of layouts
def _split(spec: ArchSpec, pp: int, method: str, explicit: Optional[Tuple[int, ...]]) -> Tuple[int, ...]:
    return tuple(stage_layers(spec.n_layers, pp, method, explicit, stage_weights(spec)))


def pipeline_layers_problem(counts: Optional[Sequence[int]], n_layers: int, pp: int, interleave: int = 1,
                            field: str = "--pipeline-layers") -> Optional[str]:
    """A given per-stage list must fit the model and ``--pp``. Interleaved, each stage's blocks split
    into ``interleave`` equal chunks, where the first stage may count the embedding and the last the
    head as one more layer (Megatron-LM's ``account_for_embedding_in_pipeline_split`` and
    ``..._loss_...``, megatron/core/transformer/transformer_config.py; Llama Team 2024, sec. 3.3.2:
    "the first model chunk on the first stage has only the embedding, and the last model chunk
    on the last stage has only output projection and loss calculation")."""
    if counts is None:
        return None
    problem = explicit_problem(list(counts), n_layers, pp, field)
    if problem or interleave == 1:
        return problem
    for stage, count in enumerate(counts):
        edge = (stage == 0) + (stage == pp - 1)   # the embedding, the head
        if count % interleave and (count + edge) % interleave:
            return (f"{field}: stage {stage}'s {count} layers do not split into --interleave {interleave} equal "
                    f"chunks (the first and last stage may count the embedding / the head as one layer)")
    return None


def parse_pipeline_layers(text: Optional[str]) -> Optional[Tuple[int, ...]]:
    """``--pipeline-layers 7,8,8,7`` -> (7, 8, 8, 7); the sums are :func:`pipeline_layers_problem`'s."""
    if text is None:
        return None
    try:
        return tuple(int(x) for x in text.split(","))
    except ValueError:
        raise UserError(f"--pipeline-layers: expected comma-separated layer counts, one per stage "
                        f"(e.g. 7,8,8,7), got '{text}'") from None


def _refuse(problem: Optional[str]) -> None:
    if problem:
        raise UserError(problem)


# ------------------------------------------------------------------------------- topology
# the grid axes each group spans: gradients go over DP x the sequence shards (``Layout.zero_dp``)
GROUP_AXES = {"tp": ("tp",), "pp": ("pp",), "dp": ("dp", "ulysses"), "ulysses": ("ulysses",), "cp": ("ulysses",)}


def group_ranks(layout: Layout, kind: str) -> List[int]:
    """The ranks of the ``tp``/``dp``/``pp``/``ulysses``/``cp`` group that contains rank 0."""
    dims = ParallelDims(tp=layout.tp, pp=layout.pp, dp=layout.dp, ulysses=layout.seq_shards)
    return dims.group(0, *GROUP_AXES[kind])


def members_per_node(layout: Layout, kind: str) -> int:
    """How many members of one group share a node (== group size when it fits in one node)."""
    return max(_per_node(layout.tp, layout.pp, layout.dp, layout.seq_shards, layout.gpus_per_node, kind))


def spans_nodes(layout: Layout, kind: str) -> bool:
    return len(_per_node(layout.tp, layout.pp, layout.dp, layout.seq_shards, layout.gpus_per_node, kind)) > 1


@lru_cache(maxsize=4096)
def _per_node(tp: int, pp: int, dp: int, shards: int, gpus_per_node: int, kind: str) -> Tuple[int, ...]:
    """Members of rank 0's ``kind`` group on each node it touches; cached: the planner's inner
    loop asks it for every collective of every candidate layout."""
    nodes: Dict[int, int] = {}
    for r in ParallelDims(tp=tp, pp=pp, dp=dp, ulysses=shards).group(0, *GROUP_AXES[kind]):
        nodes[r // gpus_per_node] = nodes.get(r // gpus_per_node, 0) + 1
    return tuple(nodes.values())


def divisors(n: int) -> List[int]:
    return [d for d in range(1, n + 1) if n % d == 0]
