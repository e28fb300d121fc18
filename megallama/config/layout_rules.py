"""The layout rules: which TP x PP x DP, sequence-parallel, ZeRO and architecture combinations run.

Written once over plain values, so the config (``RunConfig.check_layout``: ``validate`` and
``train``), the DeepSpeed section (``train/ds_config.py``), ``profiling.Layout`` (``estimate``),
the planner and ``describe`` refuse the same layouts. A rule returns its problem as one line, or
None; the caller raises its own error type. The line names what the user set: a config field
(:data:`CONFIG`) or a command-line flag (:data:`FLAGS`), two vocabularies of one rule book.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping, Optional

Words = Mapping[str, str]

CONFIG: Words = {
    "positive": "parallel.{name}: expected a positive integer, got {value}",
    "tp_divides": "model.{field}: {value} is not divisible by parallel.tp={tp}",
    "kv_shared": ("model.n_kv_heads: {value} neither divides nor is divisible by parallel.tp={tp} (fewer KV heads "
                  "than ranks are each shared by an equal group of ranks)"),
    "vocab_divides": ("model.vocab_size: {value} is not divisible by parallel.tp={tp} (set "
                      "model.pad_vocab_to_multiple_of, e.g. 128, to pad it as Megatron does)"),
    "pp_divides": "model.n_layers: {n_layers} is not divisible by parallel.pp={pp}{interleave}",
    "pp_fills": "parallel.pp: {pp} stages need at least one layer each, model.n_layers is {n_layers}",
    "pipeline_arch": "parallel.pp: pipeline parallelism supports arch 'decoder' only, got '{arch}' (use pp: 1)",
    "sp_needs_tp": ("parallel.sequence_parallel: needs parallel.tp > 1 (it shards activations over the "
                    "tensor-parallel group; with tp: 1 set it to false)"),
    "sp_seq": "train.seq_len: {seq} is not divisible by parallel.tp={tp} (required with sequence_parallel)",
    "pipeline_zero": ("deepspeed.zero_optimization.stage: DeepSpeed's pipeline engine supports ZeRO stage 0 or 1, "
                      "got {zero} with parallel.pp={pp}"),
    "offload_zero": "deepspeed.zero_optimization.offload_optimizer: needs ZeRO stage 1, 2 or 3",
    "positions": "train.seq_len: {seq} exceeds model.max_seq_len={max_seq_len}",
    "ulysses_pipeline": ("parallel.ulysses: not combined with pipeline parallelism (parallel.pp={pp}); set one "
                         "of them to 1"),
    "ulysses_arch": "parallel.ulysses: shards decoder-only sequences, got model.arch '{arch}' (use ulysses: 1)",
    "ulysses_heads": ("model.{field}: {value} over parallel.tp={tp} leaves {local} per rank, not divisible by "
                      "parallel.ulysses={u}{kv}"),
    "ulysses_seq": "train.seq_len: {seq} is not divisible by parallel.ulysses={u}{sp} (each rank holds an equal shard)",
    "world_positive": "parallel: world size must be a positive integer, got {world}",
    "world_divides": "parallel: world size {world} is not a multiple of {names} = {sizes}",
    "world_exact": "parallel: world size {world} is not {names} = {sizes}",
}
FLAGS: Words = {
    "positive": "--{flag}: expected a positive integer, got {value}",
    "tp_divides": "--tp {tp}: model {field}={value} is not divisible by tp",
    "kv_shared": "--tp {tp}: model n_kv_heads={value} neither divides nor is divisible by tp",
    "vocab_divides": ("--tp {tp}: model vocab_size={value} is not divisible by tp "
                      "(model.pad_vocab_to_multiple_of would pad it)"),
    "pp_divides": "--pp {pp}: model n_layers={n_layers} is not divisible by pp{interleave}",
    "pp_fills": "--pp {pp}: more stages than the model's {n_layers} layers",
    "pipeline_arch": "--pp: pipeline parallelism supports decoder-only models (use --pp 1)",
    "sp_needs_tp": "--sp: sequence parallelism needs --tp > 1",
    "sp_seq": "--seq {seq}: not divisible by tp={tp} (required with sequence parallelism)",
    "pipeline_zero": "--zero {zero}: DeepSpeed's pipeline engine supports ZeRO stage 0 or 1 with --pp > 1",
    "offload_zero": "--offload: DeepSpeed offloads the optimizer only with ZeRO stage 1, 2 or 3",
    "positions": "--seq {seq}: exceeds the model's {max_seq_len} learned positions",
    "ulysses_pipeline": "--ulysses: not combined with pipeline parallelism (--pp {pp}); set one of them to 1",
    "ulysses_arch": "--ulysses: shards decoder-only sequences (model arch '{arch}')",
    "ulysses_heads": "--ulysses {u}: model {field}={value} over tp={tp} leaves {local} per rank, not divisible{kv}",
    "ulysses_seq": "--seq {seq}: not divisible by ulysses={u}{sp}",
    "world_positive": "--gpus: expected a positive integer, got {world}",
    "world_divides": "{flags} = {product} does not divide --gpus {world}",
    "world_exact": "{flags} = {product}, not --gpus {world}",
}


@dataclass(frozen=True)
class ModelShape:
    """The model dimensions the rules read (``ModelConfig.shape``, ``ArchSpec.shape``)."""

    n_heads: int
    n_kv_heads: int
    vocab_size: int
    ffn_hidden_size: int
    n_layers: int
    arch: str = "decoder"
    pad_vocab_to_multiple_of: Optional[int] = None  # set: the vocabulary is padded, never refused


TP_SPLIT = ("n_heads", "n_kv_heads", "vocab_size", "ffn_hidden_size")   # what TP shards, in the order checked


def positive_problem(name: str, value: int, words: Words = CONFIG) -> Optional[str]:
    if value < 1:
        return words["positive"].format(name=name, flag=name.replace("_", "-"), value=value)
    return None


def tp_problem(shape: ModelShape, tp: int, words: Words = CONFIG) -> Optional[str]:
    """Heads, KV heads, the vocabulary and the FFN width are split evenly over the TP ranks; KV
    heads fewer than the ranks are replicated instead, each on ``tp / n_kv_heads`` of them
    (:func:`kv_replicas`); a vocabulary with ``pad_vocab_to_multiple_of`` set is padded to fit
    (:func:`padded_vocab`)."""
    for field in TP_SPLIT:
        value = getattr(shape, field)
        if field == "vocab_size" and shape.pad_vocab_to_multiple_of:
            continue
        if field == "n_kv_heads" and value < tp:
            if tp % value:
                return words["kv_shared"].format(value=value, tp=tp)
        elif value % tp:
            key = "vocab_divides" if field == "vocab_size" else "tp_divides"
            return words[key].format(field=field, value=value, tp=tp)
    return None


def kv_replicas(heads: int, tp: int) -> int:
    """How many TP ranks hold a copy of each of ``heads`` heads: 1 when the ranks split them, else
    ``tp / heads`` consecutive ranks share one (those whose query heads read it)."""
    if heads >= tp:
        return 1
    if tp % heads:
        raise ValueError(f"{heads} heads cannot be shared evenly by tensor-parallel size {tp}")
    return tp // heads


def padded_vocab(vocab_size: int, tp: int, multiple: Optional[int]) -> int:
    """Megatron's ``make-vocab-size-divisible-by``: the next multiple of ``multiple x tp`` (the
    vocabulary itself when ``multiple`` is unset). Padded rows are zero and their logits masked,
    so they change neither the loss nor sampling; layout-free checkpoints and exports omit them."""
    if not multiple:
        return vocab_size
    step = multiple * tp
    return -(-vocab_size // step) * step


def pp_problem(shape: ModelShape, pp: int, interleave: int = 1, words: Words = CONFIG) -> Optional[str]:
    """Every stage holds at least one layer (stages may differ: ``pipeline_split``); interleaved
    virtual chunks hold as many layers each; only the decoder-only model is staged."""
    if shape.n_layers < pp:
        return words["pp_fills"].format(n_layers=shape.n_layers, pp=pp)
    if interleave > 1 and shape.n_layers % (pp * interleave):
        return words["pp_divides"].format(n_layers=shape.n_layers, pp=pp,
                                          interleave=f" x interleave {interleave}" if interleave > 1 else "")
    if pp > 1 and shape.arch != "decoder":
        return words["pipeline_arch"].format(arch=shape.arch)
    return None


def sp_problem(tp: int, sp: bool, seq: int, words: Words = CONFIG) -> Optional[str]:
    """Sequence parallelism splits each sequence over the TP ranks: it needs some, evenly."""
    if sp and tp == 1:
        return words["sp_needs_tp"]
    if sp and seq % tp:
        return words["sp_seq"].format(seq=seq, tp=tp)
    return None


def ulysses_problem(shape: ModelShape, tp: int, pp: int, sp: bool, seq: int, ulysses: int,
                    words: Words = CONFIG) -> Optional[str]:
    """Ulysses splits each sequence evenly over its ranks and, around attention, each TP rank's
    query heads; KV heads fewer than its degree are replicated (:func:`kv_replicas`), so either
    count divides the other. The pipeline engine passes one activation shape between stages,
    which these shards do not change, but it is not combined here: a refusal beats an untested path."""
    if ulysses == 1:
        return None
    if pp > 1:
        return words["ulysses_pipeline"].format(pp=pp)
    if shape.arch != "decoder":
        return words["ulysses_arch"].format(arch=shape.arch)
    q_local = shape.n_heads // tp
    kv_local = max(shape.n_kv_heads // tp, 1)
    if q_local % ulysses:
        return words["ulysses_heads"].format(field="n_heads", value=shape.n_heads, tp=tp, local=q_local, u=ulysses,
                                             kv="")
    if kv_local % ulysses and ulysses % kv_local:
        return words["ulysses_heads"].format(field="n_kv_heads", value=shape.n_kv_heads, tp=tp, local=kv_local,
                                             u=ulysses, kv=" (nor a divisor of it: fewer KV heads are replicated)")
    shards = ulysses * (tp if sp else 1)
    if seq % shards:
        return words["ulysses_seq"].format(seq=seq, u=ulysses, sp=f" x tp={tp} (sequence_parallel)" if sp else "")
    return None


def pipeline_zero_problem(pp: int, zero: int, words: Words = CONFIG) -> Optional[str]:
    """DeepSpeed's pipeline engine runs ZeRO stage 0 or 1 only."""
    if pp > 1 and zero >= 2:
        return words["pipeline_zero"].format(zero=zero, pp=pp)
    return None


def offload_problem(zero: int, offload: bool, words: Words = CONFIG) -> Optional[str]:
    """DeepSpeed offloads the optimizer from ZeRO's partitioned states, so only with a stage."""
    if offload and zero == 0:
        return words["offload_zero"]
    return None


def layout_problem(shape: ModelShape, tp: int = 1, pp: int = 1, sp: bool = False, seq: int = 1,
                   zero: Optional[int] = None, offload: bool = False, interleave: int = 1,
                   words: Words = CONFIG, ulysses: int = 1) -> Optional[str]:
    """The first rule a layout of positive degrees breaks; ZeRO rules only when ``zero`` is known
    (the config's stage is DeepSpeed's, checked where that section is read)."""
    problem = (tp_problem(shape, tp, words) or pp_problem(shape, pp, interleave, words)
               or sp_problem(tp, sp, seq, words) or ulysses_problem(shape, tp, pp, sp, seq, ulysses, words))
    if problem is None and zero is not None:
        problem = pipeline_zero_problem(pp, zero, words) or offload_problem(zero, offload, words)
    return problem


def partition_problem(arch: str, tp: int, sp: bool, full_recompute: bool, partition: bool) -> Optional[str]:
    """DeepSpeed's ``partition_activations`` (a config field only) assumes every TP rank checkpoints
    the same input, and that no other layer reads it."""
    if not (full_recompute and partition):
        return None
    if sp and tp > 1:
        # DeepSpeed keeps 1/tp of each checkpointed input per TP rank and all-gathers it for the
        # recompute, assuming TP ranks hold the same input; with sequence shards it mixes them
        return ("train.activation_checkpointing.partition_activations: not supported with "
                "parallel.sequence_parallel (TP ranks hold different sequence shards)")
    if arch == "encoder_decoder":
        # DeepSpeed replaces each checkpointed input's data by its partition in place; every
        # decoder layer reads the same encoder output, so the second layer finds it emptied
        return ("train.activation_checkpointing.partition_activations: not supported with "
                "model.arch=encoder_decoder (its decoder layers share the encoder output)")
    return None


def positions_problem(seq: int, max_seq_len: int, words: Words = CONFIG) -> Optional[str]:
    """A sequence longer than the model's positions (its RoPE table; GPT's learned embeddings)."""
    if seq > max_seq_len:
        return words["positions"].format(seq=seq, max_seq_len=max_seq_len)
    return None


def world_problem(world: int, degrees: Mapping[str, int], words: Words = CONFIG) -> Optional[str]:
    """The world is a whole number of model replicas: the given degrees divide it (and with all
    of tp, pp and dp given, make it up exactly)."""
    if world < 1:
        return words["world_positive"].format(world=world)
    product = math.prod(degrees.values())
    fields = dict(world=world, product=product, names=" x ".join(degrees),
                  sizes=" x ".join(str(v) for v in degrees.values()),
                  flags=" x ".join(f"--{k} {v}" for k, v in degrees.items()))
    if world % product:
        return words["world_divides"].format(**fields)
    if {"tp", "pp", "dp"} <= set(degrees) and product != world:
        return words["world_exact"].format(**fields)
    return None


def tp_shard(n: int, tp: int, what: str) -> int:
    """One TP rank's part of a size the layout rules made divisible (a broken promise is a bug)."""
    if n % tp:
        raise ValueError(f"{what}={n} is not divisible by tensor-parallel size {tp}")
    return n // tp
