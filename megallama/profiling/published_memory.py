"""Published runs that fit and runs that ran out of memory, with the layouts as published.

Why: a planner that proposes a layout which dies of OOM, or refuses one a team trained on, is
wrong where it matters most. Each case pins what the source states (model, GPU, TP/PP/DP,
micro-batch, recomputation, sharding, precision, the implementation's saved tensors) and
whether it ran; :func:`check` gives our verdict and its margin. Figures carry their source.

Frameworks differ from the engine :mod:`megallama.profiling.memory` counts (DeepSpeed 0.19) in
their model states: Megatron-LM keeps fp16/bf16 parameters, fp32 main gradients it reduces in
place and an fp32 master with Adam's moments (18 bytes per parameter; the last 12 over DP with
its distributed optimizer), where DeepSpeed's ZeRO-0 keeps 16-bit gradients, flat reduction
buckets and a transient fp32 copy at the step. ``megatron`` cases count Megatron's states.
FSDP (MPT, torchtitan) keeps fp32 sharded parameters and gradients (16 bytes per parameter over
the shards) and updates them in place; its layouts say so (``Layout.framework``), and
:func:`megallama.profiling.memory.fsdp_state_bytes` counts them. ``fsdp-grad-op`` is FSDP that does not
reshard the parameters after forward (ZeRO-2): 16-bit parameters whole, fp32 gradients, master
and moments sharded (16 bytes per parameter over the shards), plus one block's unsharded fp32
gradient on its way to the reduce-scatter.

Left out because the source does not pin them or our recompute modes cannot express them:
torchtitan's every-other-layer selective checkpointing (its op-level policy is ``op``, and its
runs and OOM with it are cases here), and Llama 3 405B's long-context stage, whose
recomputation is not published.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Tuple

from megallama.profiling.activations import ActivationImpl
from megallama.profiling.arch import ArchSpec, as_spec
from megallama.profiling.hardware import load_hardware
from megallama.profiling.layout import Layout
from megallama.profiling.memory import MemoryBreakdown, layer_params_per_rank, memory_breakdown, params_per_rank
from megallama.profiling.overheads import MemoryVerdict, verdict
from megallama.profiling.published import (LLAMA3_405B_STAGES, LLAMA3_INTERLEAVE, MEGATRON_FLASH, MEGATRON_IMPL,
                                           MEGATRON_TABLE1)

FLASH = ActivationImpl(attention="flash")


@dataclass(frozen=True)
class MemoryCase:
    name: str
    source: str
    spec: ArchSpec
    layout: Layout
    seq: int
    gpu: str
    ran: bool                      # True: trained (fits); False: out of memory
    impl: ActivationImpl = FLASH
    framework: str = "deepspeed"   # megatron | deepspeed | fsdp | fsdp-grad-op
    known_miss: str = ""           # why our verdict disagrees, when it does (reported, not hidden)

    def stage_memory(self, stage: int) -> MemoryBreakdown:
        """The counted tensors of one stage, with Megatron's model states for ``megatron`` runs."""
        mem = memory_breakdown(self.spec, self.layout, self.seq, stage, self.impl)
        if self.framework == "megatron":
            lay = self.layout
            p = params_per_rank(self.spec, lay.tp, lay.pp, stage, lay.stage_layers(self.spec))
            shards = lay.zero_dp if lay.zero >= 1 else 1
            mem.components.update(params=lay.dtype_bytes * p, grads=4.0 * p, optimizer=12.0 * p / shards,
                                  buffers=0.0, step_buffers=0.0)
        elif self.framework == "fsdp-grad-op":
            lay = self.layout
            p = params_per_rank(self.spec, lay.tp, lay.pp, stage, lay.stage_layers(self.spec))
            block = layer_params_per_rank(self.spec, lay.tp, "decoder")
            mem.components.update(params=lay.dtype_bytes * p, grads=4.0 * p / lay.zero_dp,
                                  optimizer=12.0 * p / lay.zero_dp, buffers=4.0 * block, step_buffers=0.0)
        return mem


def stage_verdicts(case: MemoryCase, fragmentation: Optional[float] = None) -> List[MemoryVerdict]:
    hw = load_hardware(case.gpu)
    return [verdict(case.spec, case.layout, case.seq, hw, case.stage_memory(s), case.impl, fragmentation)
            for s in case.layout.stage_groups(case.spec)]


def check(case: MemoryCase, fragmentation: Optional[float] = None) -> MemoryVerdict:
    """Our verdict for the case's most loaded stage (counted tensors and overheads) on its GPU."""
    return max(stage_verdicts(case, fragmentation), key=lambda v: v.needed_bytes)


def gpt(name: str, hidden: int, layers: int, heads: int, vocab: int = 51200, seq: int = 2048,
        dropout: float = 0.1, bias: bool = True) -> ArchSpec:
    return ArchSpec(name=name, family="gpt", arch="decoder", dim=hidden, n_layers=layers, n_encoder_layers=0,
                    n_heads=heads, kv_heads=heads, ffn_hidden=4 * hidden, vocab_size=vocab, max_seq_len=seq,
                    dropout=dropout, bias=bias, tied_embeddings=True)


# ------------------------------------------------------------------ Korthikanti et al. 2022
# "Reducing Activation Recomputation in Large Transformer Models" (arXiv 2205.05198), Table 3:
# GPT, sequence 2048, vocabulary 51200, A100 80GB, DP 1 (GPUs = TP x PP); (heads, hidden,
# layers, TP, PP, global batch, micro-batch). Figure 1: without recomputation (TP only, the
# baseline) every model needs more than the 80 GB of an A100; with sequence parallelism and
# selective recomputation ("present work") all four fit. Table 5: full recomputation and the
# present work both ran end to end. Megatron-LM, fp16, eager attention (the s^2 term of its
# formulas), dropout on.
KORTHIKANTI_TABLE3 = {"22b": (64, 6144, 48, 8, 1, 4, 4), "175b": (96, 12288, 96, 8, 8, 64, 1),
                      "530b": (128, 20480, 105, 8, 35, 280, 1), "1t": (160, 25600, 128, 8, 64, 512, 1)}
KORTHIKANTI_RUNS = (("none", False, False, "Figure 1 (baseline over 80 GB)"),
                    ("full", False, True, "Table 5 (full recompute)"),
                    ("selective", True, True, "Table 5 and Figure 1 (present work)"))


def korthikanti_cases() -> List[MemoryCase]:
    out = []
    for model, (heads, hidden, layers, tp, pp, batch, mbs) in KORTHIKANTI_TABLE3.items():
        for rc, sp, ran, where in KORTHIKANTI_RUNS:
            layout = Layout(tp=tp, pp=pp, dp=1, zero=0, mbs=mbs, grad_accum=batch // mbs, recompute=rc, sp=sp,
                            dtype="fp16")
            out.append(MemoryCase(f"korthikanti-{model} rc={rc}{' +sp' if sp else ''}",
                                  f"Korthikanti et al. 2022, {where}", gpt(f"gpt-{model}", hidden, layers, heads),
                                  layout, 2048, "a100-80gb", ran, MEGATRON_IMPL, "megatron"))
    return out


def megatron_table1_cases() -> List[MemoryCase]:
    """Narayanan et al. 2021, Table 1 (profiling/published.py): every row ran, full recompute,
    fp16, micro-batch not published (1, the least memory, is what any run needs at most)."""
    out = []
    for r in MEGATRON_TABLE1:
        layout = Layout(tp=r.tp, pp=r.pp, dp=r.dp, zero=0, mbs=1, grad_accum=r.batch // r.dp, recompute="full",
                        dtype="fp16")
        out.append(MemoryCase(f"megatron-table1-{r.params_b:g}b", "Narayanan et al. 2021, Table 1", r.spec(),
                              layout, 2048, "a100-80gb", True, MEGATRON_IMPL, "megatron"))
    return out


# ------------------------------------------------------------------------ Llama 3 405B
# Llama Team 2024, "The Llama 3 Herd of Models" (arXiv 2407.21783), Table 4: 16,384 H100 80GB,
# TP 8, CP 1, PP 16, DP 128, sequence 8192, 16M tokens per batch (16 sequences per DP rank).
# Sec. 3.3.2: 126 layers, one fewer on the first and last stage, "the first model chunk on the
# first stage has only the embedding, and the last model chunk on the last stage has only output
# projection and loss calculation", an interleaved schedule with V chunks per rank (V is not
# published: 16 stages x V chunks with one block each, less the two, is 126 blocks only for V = 8,
# and only one-block chunks leave the first chunk the embedding alone); "we could pre-train
# Llama 3 on sequences of 8K tokens without activation checkpointing"; "Our use of FSDP for
# Llama 3 shards optimizer states and gradients, but for model shards we do not reshard after
# forward computation" and FP32 gradient accumulation and reduce-scatter (``fsdp-grad-op``).
# BF16, sequence parallelism and Megatron-LM's block as a stand-in for Meta's unpublished one:
# Transformer Engine's flash attention, SP inputs re-gathered in backward, the fused SwiGLU that
# saves only its input (``MEGATRON_FLASH``). Sec. 3.3.2 also "proactively deallocate[s] ... the
# input and output tensors of each pipeline stage": Megatron frees each stage's sent output
# (megatron/core/pipeline_parallel/schedules.py, deallocate_output_tensor, on by default from
# megatron/training/argument_utils.py), which is why no stage output is counted; a stage's input
# is the first norm's saved input and stays. With 16 micro-batches on 16 ranks every chunk
# forward runs before the first backward (schedules.py: num_warmup_microbatches >=
# total_num_microbatches), so stage 1 holds 16 micro-batches of its 8 blocks. The margin is
# thin (benchmarks/README_memory.md gives what it rests on).
# Table 4's other 8K row, 8,192 GPUs at DP 64, runs 32 micro-batches per DP rank. Megatron's
# interleaved warm-up is then ``2 (pp - stage - 1) + (v - 1) N`` chunk forwards with N, its
# ``microbatch_group_size_per_vp_stage``, defaulting to pp: 140 one-block chunks on stage 1
# against 128 at 16 micro-batches, 6.3 GiB over. Sec. 3.3.2 says Meta's schedule sets N
# "flexibly" to trade memory for hiding point-to-point traffic, and does not give it: with
# N <= 14 the same count fits. N is not modelled (Megatron's default is costed), so this row is
# the one verdict that disagrees.
LLAMA3_8K_MISS = ("32 micro-batches per DP rank: Megatron's default interleaved warm-up (group N = pp) holds 140 "
                  "one-block chunks on stage 1; Meta tunes N (sec. 3.3.2) and does not publish it, N <= 14 fits")


def llama3_cases() -> List[MemoryCase]:
    """Table 4's two 8K rows: 16,384 GPUs (DP 128, 16 sequences per DP rank) and 8,192 (DP 64, 32)."""
    out = []
    for gpus, dp, per_dp, miss in ((16384, 128, 16, ""), (8192, 64, 32, LLAMA3_8K_MISS)):
        layout = Layout(tp=8, pp=16, dp=dp, zero=1, mbs=1, grad_accum=per_dp, recompute="none", sp=True,
                        interleave=LLAMA3_INTERLEAVE, pipeline_layers=LLAMA3_405B_STAGES)
        out.append(MemoryCase(f"llama3-405b 8k pretraining on {gpus}", "Llama Team 2024, Table 4 and sec. 3.3.2",
                              as_spec("llama3-405b"), layout, 8192, "h100-sxm", True, MEGATRON_FLASH, "fsdp-grad-op",
                              known_miss=miss))
    return out


# ------------------------------------------------------------------------------ BLOOM
# BigScience 2022, "BLOOM" (arXiv 2211.05100), sec. 3.4: 384 A100 80GB, TP 4, PP 12, DP 8,
# ZeRO stage 1, BF16, micro-batch 2, global batch 2048, sequence 2048; 70 layers, hidden
# 14336, 112 heads, vocabulary 250,880 (tied). Megatron-DeepSpeed's "type:transformer|embedding"
# split counts each embedding as a layer: 5 blocks on the first and last stage, 6 elsewhere.
# Full recomputation (the run's --checkpoint-activations). DeepSpeed's BF16 engine: our engine.
def bloom_cases() -> List[MemoryCase]:
    layout = Layout(tp=4, pp=12, dp=8, zero=1, mbs=2, grad_accum=2048 // (2 * 8), recompute="full", dtype="bf16",
                    pipeline_layers=(5,) + (6,) * 10 + (5,))
    spec = gpt("bloom-176b", 14336, 70, 112, vocab=250880, dropout=0.0)
    return [MemoryCase("bloom-176b", "BigScience 2022, sec. 3.4", spec, layout, 2048, "a100-80gb", True,
                       MEGATRON_IMPL, "deepspeed")]


# -------------------------------------------------------------------------- MPT (FSDP)
# mosaicml/llm-foundry scripts/train/benchmarking/README.md, "H100 80GB BF16" table: FSDP
# FULL_SHARD over all GPUs, amp_bf16, flash attention, activation checkpointing True/False
# (full blocks), learned positions (NumParams grows by seq x d_model), no biases, vocabulary
# 50368. (model, seq, GPUs, micro-batch, grad accum, checkpointing, NumParams as printed).
MPT_SHAPES = {"760m": (1536, 24, 12), "1b": (2048, 24, 16), "3b": (2560, 32, 20), "7b": (4096, 32, 32),
              "13b": (5120, 40, 40), "30b": (7168, 48, 64), "70b": (8192, 80, 64)}   # d_model, layers, heads
MPT_H100_ROWS: List[Tuple[str, int, int, int, int, bool, int]] = [
    ("70b", 2048, 64, 8, 4, True, 64862437376),
    ("30b", 8192, 8, 1, 21, True, 30019254272),
    ("13b", 32768, 8, 1, 3, True, 13011240960),
    ("13b", 2048, 8, 2, 1, False, 12853954560),
    ("7b", 65536, 8, 1, 2, True, 6918905856),
    ("7b", 2048, 8, 6, 1, False, 6658859008),
    ("3b", 16384, 8, 1, 6, False, 2688537600),
    ("1b", 32768, 8, 1, 4, False, 1378865152),
    ("760m", 2048, 8, 24, 2, False, 760470528),
]


def mpt_spec(model: str, seq: int) -> ArchSpec:
    d, layers, heads = MPT_SHAPES[model]
    return gpt(f"mpt-{model}", d, layers, heads, vocab=50368, seq=seq, dropout=0.0, bias=False)


def mpt_cases() -> List[MemoryCase]:
    out = []
    for model, seq, gpus, mbs, accum, ckpt, _ in MPT_H100_ROWS:
        layout = Layout(dp=gpus, zero=3, mbs=mbs, grad_accum=accum, recompute="full" if ckpt else "none",
                        framework="fsdp", reduce_dtype="fp32")   # the H100 table's "DEFAULT" rows
        out.append(MemoryCase(f"mpt-{model} seq {seq} mbs {mbs} on {gpus}", "llm-foundry benchmarking README, H100 BF16",
                              mpt_spec(model, seq), layout, seq, "h100-sxm", True, FLASH, "fsdp"))
    return out


# ------------------------------------------------------------------- torchtitan (FSDP2)
# pytorch/torchtitan docs/performance.md (@3faaa1a0d): FSDP2 over 64 A100 80GB, local batch as
# listed (Llama 3: sequence 8192; Llama 2: 4096); "selective op" checkpointing is our "op".
# All ran but one: footnote 3, "the 70B training with local batch size 2 will cause an OOM error
# when selective activation checkpointing is used" (so the table gives local batch 1).
TORCHTITAN_ROWS = (("llama3-70b", 8192, 1, "full", True), ("llama3-8b", 8192, 1, "op", True),
                   ("llama2-13b", 4096, 2, "none", True), ("llama2-13b", 4096, 2, "op", True),
                   ("llama2-70b", 4096, 2, "full", True), ("llama2-70b", 4096, 1, "op", True),
                   ("llama2-70b", 4096, 2, "op", False))


def torchtitan_cases() -> List[MemoryCase]:
    return [MemoryCase(f"torchtitan {m} local batch {b} rc={rc}", "torchtitan docs/performance.md", as_spec(m),
                       Layout(dp=64, zero=3, mbs=b, grad_accum=1, recompute=rc, framework="fsdp2", reduce_dtype="fp32"),
                       seq, "a100-80gb", ran, FLASH, "fsdp")
            for m, seq, b, rc, ran in TORCHTITAN_ROWS]


def all_cases() -> List[MemoryCase]:
    return korthikanti_cases() + megatron_table1_cases() + llama3_cases() + bloom_cases() + mpt_cases() \
        + torchtitan_cases()


def fragmentation_interval(cases: Optional[List[MemoryCase]] = None) -> Tuple[float, float]:
    """The allocator fractions ``f`` for which every verdict not marked ``known_miss`` agrees, as
    (lowest, highest); (nan, nan): none. A stage needs ``a + f b`` (``b``: the activations and
    attention workspace the fraction applies to): each run that ran caps ``f``, each OOM floors it."""
    low, high = 0.0, float("inf")
    for case in (all_cases() if cases is None else cases):
        if case.known_miss:
            continue
        hw, bounds = load_hardware(case.gpu), []
        for s in case.layout.stage_groups(case.spec):
            mem = case.stage_memory(s)
            v = verdict(case.spec, case.layout, case.seq, hw, mem, case.impl, 0.0)
            churn = mem.activations + v.overheads.get("attention_workspace", 0.0)
            bounds.append(v.margin_bytes / churn if churn else (float("inf") if v.fits else -float("inf")))
        if case.ran:
            high = min(high, min(bounds))
        else:
            low = max(low, min(bounds))
    return (low, high) if low <= high else (float("nan"), float("nan"))


def report() -> List[str]:
    """One line per case: what ran, our verdict with its margin (``python -m`` this module)."""
    lines = []
    for c in all_cases():
        v = check(c)
        mark = "agrees" if v.fits == c.ran else "MISSES"
        lines.append(f"{mark}  {c.name:44s} {'ran' if c.ran else 'OOM':3s}  {v.describe()}  [{c.source}]"
                     + (f"  -- {c.known_miss}" if c.known_miss else ""))
    low, high = fragmentation_interval()
    lines.append(f"allocator fractions that keep every verdict: {low:.3f} to {high:.3f}")
    return lines


if __name__ == "__main__":
    print("\n".join(report()))
