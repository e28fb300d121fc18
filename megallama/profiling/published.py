"""Published runs the planner is checked against: Table 1 of Narayanan et al. 2021,
"Efficient Large-Scale Language Model Training on GPU Clusters Using Megatron-LM" (SC21), and,
at long sequences (end of the module), DeepSpeed-Ulysses' figures against Megatron-LM sequence
parallelism and Llama 3 405B's context-parallel stage (benchmarks/README_ulysses.md).

GPT models, vocabulary 51,200, sequence 2,048, on Selene (DGX A100 80GB, 8 GPUs and 8 HDR
200 Gb/s NICs per node), mixed precision, full activation recomputation, Megatron's pipeline
scatter/gather optimisation. Their TFLOP/s count ``96 B s l h^2 (1 + s/6h + V/16lh)`` per step,
i.e. model + recomputed FLOPs, so predictions are compared on *hardware* TFLOP/s per GPU.
Micro-batch sizes are not in the table: the planner picks the best one for each row's layout.
Rows transcribed from the paper; cross-checks: parameter counts from the shapes round to its
first column, and TFLOP/s x GPUs gives its aggregate PFLOP/s column (4.4 ... 502.0).
The paper ran the interleaved 1F1B schedule; its chunk count per row is not given, so rows are
costed with plain 1F1B (DeepSpeed's schedule), which over-states the bubble by up to (pp-1)/2m.
"""
from __future__ import annotations

import statistics
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

from megallama.profiling.activations import ActivationImpl
from megallama.profiling.arch import ArchSpec
from megallama.profiling.hardware import load_hardware
from megallama.profiling.layout import Layout
from megallama.profiling.steptime import Efficiency, StepPrediction, predict


@dataclass(frozen=True)
class MegatronRow:
    params_b: float
    heads: int
    hidden: int
    layers: int
    tp: int
    pp: int
    gpus: int
    batch: int
    tflops_per_gpu: float     # achieved, per GPU (incl. recompute)

    @property
    def dp(self) -> int:
        return self.gpus // (self.tp * self.pp)

    def spec(self) -> ArchSpec:
        return ArchSpec(name=f"gpt-{self.params_b:g}b", family="gpt", arch="decoder", dim=self.hidden,
                        n_layers=self.layers, n_encoder_layers=0, n_heads=self.heads, kv_heads=self.heads,
                        ffn_hidden=4 * self.hidden, vocab_size=51200, max_seq_len=2048, dropout=0.1, bias=True,
                        tied_embeddings=True)


# Table 1 (weak scaling): parameters (billion), attention heads, hidden size, layers, tensor- and
# pipeline-parallel size, GPUs, batch size, achieved teraFLOP/s per GPU.
MEGATRON_TABLE1: List[MegatronRow] = [
    MegatronRow(1.7, 24, 2304, 24, 1, 1, 32, 512, 137),
    MegatronRow(3.6, 32, 3072, 30, 2, 1, 64, 512, 138),
    MegatronRow(7.5, 32, 4096, 36, 4, 1, 128, 512, 142),
    MegatronRow(18.4, 48, 6144, 40, 8, 1, 256, 1024, 135),
    MegatronRow(39.1, 64, 8192, 48, 8, 2, 512, 1536, 138),
    MegatronRow(76.1, 80, 10240, 60, 8, 4, 1024, 1792, 140),
    MegatronRow(145.6, 96, 12288, 80, 8, 8, 1536, 2304, 148),
    MegatronRow(310.1, 128, 16384, 96, 8, 16, 1920, 2160, 155),
    MegatronRow(529.6, 128, 20480, 105, 8, 35, 2520, 2520, 163),
    MegatronRow(1008.0, 160, 25600, 128, 8, 64, 3072, 3072, 163),
]
CALIBRATION_ROWS = (1.7, 18.4, 310.1)   # in the fit (calibration.calibrate); the rest held out
MEGATRON_IMPL = ActivationImpl.named("megatron")
# Megatron-core with Transformer Engine's attention: TE's get_qkv_layout
# (NVIDIA/TransformerEngine transformer_engine/pytorch/attention/dot_product_attention/utils.py)
# finds no supported layout for the RoPE'd q, k and the V view of the fused QKV output and makes
# all three contiguous, so the kernel saves a copy of V and the fused output is freed.
MEGATRON_FLASH = ActivationImpl(attention="flash", sp_saves_gathered_input=False, fused_swiglu=True,
                                fused_qkv_views=False)
SEQ = 2048


@dataclass
class RowResult:
    row: MegatronRow
    prediction: StepPrediction
    calibration: bool

    @property
    def predicted(self) -> float:
        return self.prediction.hardware_tflops_per_gpu

    @property
    def error(self) -> float:
        return self.predicted / self.row.tflops_per_gpu - 1.0


def predict_row(row: MegatronRow, eff: Efficiency = Efficiency(), gpu: str = "a100-80gb") -> StepPrediction:
    """Best micro-batch size for the row's own TP/PP/DP, fp16, full recompute, no ZeRO."""
    hw = load_hardware(gpu)
    best: Optional[StepPrediction] = None
    per_replica = row.batch // row.dp
    for mbs in (1, 2, 4, 8):
        if per_replica % mbs:
            continue
        layout = Layout(tp=row.tp, pp=row.pp, dp=row.dp, zero=0, mbs=mbs, grad_accum=per_replica // mbs,
                        recompute="full", dtype="fp16", gpus_per_node=hw.gpus_per_node)
        p = predict(row.spec(), layout, SEQ, hw, eff, MEGATRON_IMPL, scatter_gather=True)
        if p.fits and (best is None or p.tokens_per_s_per_gpu > best.tokens_per_s_per_gpu):
            best = p
    if best is None:
        raise RuntimeError(f"no micro-batch size fits row {row}")
    return best


def validate(eff: Efficiency = Efficiency(), rows: Sequence[MegatronRow] = MEGATRON_TABLE1) -> List[RowResult]:
    return [RowResult(r, predict_row(r, eff), r.params_b in CALIBRATION_ROWS) for r in rows]


def summary(results: Sequence[RowResult]) -> Dict[str, float]:
    errs = [abs(r.error) for r in results]
    held = [abs(r.error) for r in results if not r.calibration]
    return {"median_abs_error": statistics.median(errs), "max_abs_error": max(errs),
            "median_abs_error_held_out": statistics.median(held), "max_abs_error_held_out": max(held)}



# ---------------------------------------------------------------------- long sequences
# DeepSpeed-Ulysses (Jacobs et al. 2023, arXiv 2309.14509; DeepSpeed blog blogs/deepspeed-ulysses,
# figures 3 and 4): dense-attention GPT on A100-40GB, TFLOP/s per GPU of Ulysses (ZeRO-3 over
# all GPUs) and of Megatron-LM sequence parallelism, each at the degree and micro-batch size that
# ran fastest. Only the bars are published: values read off the charts (+-2 TFLOP/s); the 128K
# bars are hidden behind the legend and left out; ``None``: the run did not fit (OOM).
@dataclass(frozen=True)
class LongSeqRow:
    model: str                   # "gpt-7b" (32 GPUs) or "gpt-30b" (64 GPUs)
    system: str                  # "ulysses" | "megatron-sp"
    seq: int
    tflops_per_gpu: Optional[float]

    @property
    def gpus(self) -> int:
        return ULYSSES_GPUS[self.model]


ULYSSES_GPUS = {"gpt-7b": 32, "gpt-30b": 64}
# shapes are not in the paper: GPT-3's 6.7B, and a 64-layer 6144-wide 29B (heads divide 64 ranks)
ULYSSES_SHAPES = {"gpt-7b": (4096, 32, 32), "gpt-30b": (6144, 64, 64)}   # hidden, layers, heads
K = 1024
ULYSSES_FIGURES: List[LongSeqRow] = [
    *(LongSeqRow("gpt-7b", "ulysses", s * K, v) for s, v in ((8, 159), (16, 175.5), (32, 178), (64, 181), (256, 174.5))),
    *(LongSeqRow("gpt-7b", "megatron-sp", s * K, v) for s, v in ((8, 106), (16, 143), (32, 164.5), (64, 165),
                                                                  (128, 158), (256, None))),
    *(LongSeqRow("gpt-30b", "ulysses", s * K, v) for s, v in ((8, 165.5), (16, 157), (32, 152), (64, 147), (256, 134))),
    *(LongSeqRow("gpt-30b", "megatron-sp", s * K, v) for s, v in ((8, 45), (16, 67.5), (32, 85.5), (64, 104.5),
                                                                   (128, None), (256, None))),
]
LONG_IMPL = ActivationImpl(attention="flash")   # FlashAttention; Megatron re-gathers SP inputs:
MEGATRON_LONG_IMPL = ActivationImpl(attention="flash", sp_saves_gathered_input=False)


def long_spec(model: str) -> ArchSpec:
    """GPT-shaped with rotary positions, as Megatron-DeepSpeed's long-sequence examples run it (our
    ``gpt`` family means learned positions: a 2**18 x h table would dwarf the blocks); the MLP as
    SwiGLU of ``8h/3``, equal in parameters and FLOPs to GPT's ``4h`` GeLU."""
    h, layers, heads = ULYSSES_SHAPES[model]
    return ArchSpec(name=model, family="llama", arch="decoder", dim=h, n_layers=layers, n_encoder_layers=0,
                    n_heads=heads, kv_heads=heads, ffn_hidden=8 * h // 3, vocab_size=51200, max_seq_len=2 ** 20,
                    tied_embeddings=True)


def long_layouts(row: LongSeqRow, gpn: int = 8) -> List[Layout]:
    """The layouts the row's system could have run: Ulysses at ZeRO-3 over all GPUs (degree 1 is
    plain ZeRO-3); Megatron SP as TP with whole optimizer states per DP rank (the paper credits
    ZeRO-3 for Ulysses' larger batches); any degree the shapes allow, full recompute
    (Megatron-DeepSpeed's TFLOP/s count recomputed FLOPs), one micro-batch per step."""
    spec, out = long_spec(row.model), []
    for d in (x for x in range(1, row.gpus + 1) if row.gpus % x == 0 and spec.n_heads % x == 0
              and row.seq % x == 0):
        for mbs in (1, 2, 4, 8):
            if row.system == "ulysses":
                out.append(Layout(ulysses=d, dp=row.gpus // d, zero=3, mbs=mbs, recompute="full", gpus_per_node=gpn))
            elif d > 1:
                out.append(Layout(tp=d, sp=True, dp=row.gpus // d, zero=0, mbs=mbs, recompute="full",
                                  gpus_per_node=gpn))
    return out


def predict_long_row(row: LongSeqRow, eff: Efficiency = Efficiency()) -> Optional[StepPrediction]:
    """The fastest fitting layout of :func:`long_layouts` (None: none fits) on A100-40GB."""
    hw, spec = load_hardware("a100-40gb"), long_spec(row.model)
    impl = LONG_IMPL if row.system == "ulysses" else MEGATRON_LONG_IMPL
    fitting = [p for p in (predict(spec, lay, row.seq, hw, eff, impl) for lay in long_layouts(row, hw.gpus_per_node))
               if p.fits]
    return max(fitting, key=lambda p: p.hardware_tflops_per_gpu, default=None)


# Llama 3 405B's long-context stage (Llama Team 2024, "The Llama 3 Herd of Models", table 4):
# 16,384 H100s, TP 8, CP 16, PP 16 (so DP 8), sequences of 131,072 tokens, 16M tokens per
# batch, 380 TFLOP/s per GPU (38% BF16 MFU). One block fewer on the first and last stages.
LLAMA3_CP_ROW = dict(gpus=16384, tp=8, cp=16, pp=16, dp=8, seq=131072, batch_tokens=16 * 2 ** 20,
                     tflops_per_gpu=380.0, mfu=0.38)
LLAMA3_405B_STAGES = (7,) + (8,) * 14 + (7,)
# Interleaved chunks per stage, assumed (the paper gives none): 16 stages x 8 one-block chunks, less
# the embedding-only first and head-only last chunk (sec. 3.3.2), hold the 126 blocks.
LLAMA3_INTERLEAVE = 8


def predict_llama3_cp(eff: Efficiency = Efficiency()) -> StepPrediction:
    """The fastest fitting recompute mode for the published layout (SP on, ZeRO-1, mbs 1), with
    the interleaving and the Megatron-core block assumed for Table 4's 8K rows
    (:func:`megallama.profiling.published_llama3.llama3_table4_runs`)."""
    from megallama.profiling.arch import as_spec

    r = LLAMA3_CP_ROW
    hw, spec = load_hardware("h100-sxm"), as_spec("llama3-405b")
    accum = r["batch_tokens"] // r["seq"] // r["dp"]
    preds = [predict(spec, Layout(tp=r["tp"], cp=r["cp"], pp=r["pp"], dp=r["dp"], zero=1, mbs=1, grad_accum=accum,
                                  recompute=rc, sp=True, gpus_per_node=hw.gpus_per_node,
                                  pipeline_layers=LLAMA3_405B_STAGES, interleave=LLAMA3_INTERLEAVE), r["seq"], hw, eff,
                     MEGATRON_FLASH)
             for rc in ("none", "selective", "full")]
    fitting = [p for p in preds if p.fits]
    return max(fitting or preds, key=lambda p: (p.fits, p.tflops_per_gpu))
