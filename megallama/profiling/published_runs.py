"""Published FSDP-style runs on A100 and H100, as data, each costed with its layout as published.

* MosaicML's MPT benchmarks (mosaicml/llm-foundry, ``scripts/train/benchmarking/README.md``,
  tables "H100 80GB BF16", "H100 80GB BF16 (Large Scale, >= 128 GPUs)", "A100 80GB with 1600
  Gbps node-node interconnect (RoCE)" and "A100 40GB ..."; FP8 rows left out): PyTorch FSDP
  (``FULL_SHARD`` = ZeRO-3, ``SHARD_GRAD_OP`` = ZeRO-2) over all GPUs, flash attention,
  activation checkpointing of every block or none. Model shapes from ``scripts/train/yamls/
  pretrain/mpt-*.yaml`` (``d_model``, ``n_heads``, ``n_layers``; 4h GeLU MLP, vocabulary 50,368);
  LayerNorm and linear biases, learned positions, tied embedding: their NumParams column is
  reproduced exactly by our ``gpt`` family (7B at 2,048: 6,658,859,008).
* torchtitan (pytorch/torchtitan): ``docs/performance.md`` as of commit 3faaa1a0d (Llama 2/3
  on 64 A100-80GB, FSDP2, sequence 4,096 / 8,192; Llama 3.1 405B on 128 H100 with FSDP 16 x TP
  8) and ``benchmarks/llama3_h100_202412_torchtitan.md`` (Llama 3.1 8B, FSDP, no compile, no
  Float8). Its H100s are 96 GB HBM2e at 2.4 TB/s and a 500 W cap (:func:`hardware`).
  "Selective op" checkpointing is costed as ``recompute="op"``.

FSDP's traffic is costed as FSDP issues it (``framework``: per wrapped block, not in DeepSpeed's
buckets) and its gradient reduce-scatter in the run's mixed precision (``reduce_dtype``).

Compared on tokens/s per GPU (the figure all three tables publish). The fit of the step-time
constants on a stated subset of these rows is :mod:`megallama.profiling.calibration`'s.
"""
from __future__ import annotations

import dataclasses
import statistics
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

from megallama.profiling.activations import ActivationImpl
from megallama.profiling.arch import ArchSpec, as_spec
from megallama.profiling.hardware import HardwareProfile, load_hardware
from megallama.profiling.layout import Layout
from megallama.profiling.published_mpt_earlier import A100_80_ROWS_2023_07
from megallama.profiling.steptime import Efficiency, StepPrediction, predict

IMPL = ActivationImpl(attention="flash")   # FSDP runs: eager PyTorch around a flash kernel

# d_model, n_heads, n_layers (llm-foundry scripts/train/yamls/pretrain/mpt-<size>.yaml)
MPT_SHAPES = {"125m": (768, 12, 12), "350m": (1024, 16, 24), "760m": (1536, 12, 24), "1b": (2048, 16, 24),
              "3b": (2560, 20, 32), "7b": (4096, 32, 32), "13b": (5120, 40, 40), "30b": (7168, 56, 48),
              "70b": (8192, 64, 80)}


@dataclass(frozen=True)
class PublishedRun:
    source: str                  # "mpt" | "mpt-2023-07" (the table's earlier measurements) | "torchtitan" | "llama3"
    gpu: str                     # hardware profile (torchtitan's H100s: see :func:`hardware`)
    model: str                   # MPT size or one of our presets
    seq: int
    gpus: int
    mbs: int
    accum: int
    recompute: str               # none | selective | full
    tokens_per_s_per_gpu: float
    zero: int = 3
    tp: int = 1
    pp: int = 1
    interleave: int = 1                         # interleaved 1F1B chunks per stage
    pipeline_layers: Optional[tuple] = None     # blocks per stage as run (None: the planner's split)
    impl: ActivationImpl = IMPL                 # what the run's kernels save and fuse
    framework: str = "fsdp"                     # who issues ZeRO-3's calls (Layout.framework): MPT's FSDP1
    reduce_dtype: str = "fp32"                  # FSDP's gradient reduce-scatter (Layout.reduce_dtype)

    @property
    def generation(self) -> str:
        return self.gpu.split("-")[0]

    @property
    def name(self) -> str:
        lay = f"tp{self.tp} " if self.tp > 1 else ""
        lay += f"pp{self.pp}v{self.interleave} " if self.pp > 1 else ""
        return (f"{self.source} {self.model} s{self.seq} {self.gpus}x{self.gpu} {lay}zero{self.zero} "
                f"mbs{self.mbs}x{self.accum} rc={self.recompute}")

    def spec(self) -> ArchSpec:
        if not self.source.startswith("mpt"):
            return as_spec(self.model)
        d, heads, layers = MPT_SHAPES[self.model]
        return ArchSpec(name=f"mpt-{self.model}", family="gpt", arch="decoder", dim=d, n_layers=layers,
                        n_encoder_layers=0, n_heads=heads, kv_heads=heads, ffn_hidden=4 * d, vocab_size=50368,
                        max_seq_len=self.seq, bias=True, tied_embeddings=True)

    def layout(self, hw: HardwareProfile) -> Layout:
        return Layout(tp=self.tp, pp=self.pp, dp=self.gpus // (self.tp * self.pp), zero=self.zero, mbs=self.mbs,
                      grad_accum=self.accum, recompute=self.recompute, sp=self.tp > 1, dtype="bf16",
                      gpus_per_node=hw.gpus_per_node, interleave=self.interleave, pipeline_layers=self.pipeline_layers,
                      framework=self.framework, reduce_dtype=self.reduce_dtype)


def _mpt(gpu: str, rows: str, zero: int = 3, reduce: str = "fp32", source: str = "mpt") -> List[PublishedRun]:
    """``size seq gpus mbs accum ckpt tokens/s/GPU`` per line, as the README's columns give them;
    ``reduce``: the gradient reduce-scatter's dtype by the table's "MP Mode" (Composer FSDP mixed
    precision: ``DEFAULT`` reduces in fp32, ``PURE`` in the model's bf16)."""
    out = []
    for line in rows.strip().splitlines():
        size, seq, gpus, mbs, accum, ckpt, tps = line.split()
        out.append(PublishedRun(source, gpu, size, int(seq), int(gpus), int(mbs), int(accum),
                                "full" if ckpt == "T" else "none", float(tps), zero, reduce_dtype=reduce))
    return out


# llm-foundry scripts/train/benchmarking/README.md, "H100 80GB BF16" (amp_bf16, DEFAULT, FULL_SHARD)
MPT_H100 = _mpt("h100-sxm", """
70b 2048 64 8 4 T 1039
70b 2048 32 2 16 T 882
30b 8192 8 1 21 T 1384
30b 4096 8 1 21 T 1802
30b 2048 32 14 3 T 2308
30b 2048 16 10 3 T 2263
30b 2048 8 3 21 T 2002
30b 1024 8 6 21 T 2084
13b 32768 8 1 3 T 1976
13b 16384 8 3 3 T 2985
13b 4096 8 10 3 T 4717
13b 2048 64 2 1 F 4800
13b 2048 32 2 1 F 4811
13b 2048 16 2 1 F 4767
13b 2048 8 2 1 F 4792
13b 1024 8 40 3 T 5502
7b 65536 8 1 2 T 1956
7b 32768 8 2 2 T 3318
7b 8192 8 8 2 T 6935
7b 4096 8 16 2 T 8611
7b 2048 8 6 1 F 10643
7b 1024 8 64 2 T 10203
3b 65536 8 1 2 T 3262
3b 32768 8 3 6 T 5873
3b 16384 8 1 6 F 11152
3b 8192 8 3 6 F 16578
3b 4096 8 5 6 F 20964
3b 2048 64 6 3 F 22525
3b 2048 32 6 3 F 23021
3b 2048 16 10 3 F 24142
3b 1024 8 20 6 F 27046
3b 512 8 40 6 F 27965
1b 65536 8 1 2 T 5506
1b 32768 8 1 4 F 12025
1b 16384 8 2 4 F 19649
1b 8192 8 3 4 F 29157
1b 4096 8 7 4 F 38535
1b 2048 64 20 1 F 44402
1b 2048 32 20 1 F 45130
1b 2048 16 20 1 F 46037
1b 2048 8 14 1 F 45455
1b 1024 8 18 4 F 48910
1b 512 8 56 4 F 52275
760m 32768 8 1 2 F 16291
760m 16384 8 3 2 F 27815
760m 8192 8 6 2 F 41825
760m 4096 8 12 2 F 55459
760m 2048 32 24 1 F 67971
760m 2048 16 24 1 F 68551
760m 2048 8 24 2 F 63147
760m 1024 8 48 2 F 78581
760m 512 8 96 2 F 83749
""") + _mpt("h100-sxm", """
70b 2048 512 8 1 T 1007
70b 2048 128 8 1 T 1058
30b 2048 512 8 1 T 2115
30b 2048 128 8 1 T 2199
13b 2048 512 16 1 T 4952
13b 2048 128 16 1 T 5080
7b 2048 512 6 1 F 9670
7b 2048 128 6 1 F 10475
""") + _mpt("h100-sxm", """
3b 2048 512 8 1 F 21664
3b 2048 128 8 1 F 23422
1b 2048 512 12 1 F 39837
1b 2048 128 12 1 F 44123
""", zero=2)   # "H100 80GB BF16 (Large Scale, >= 128 GPUs)": 512 and 128 GPUs (256 left out); SHARD_GRAD_OP

# "A100 80GB with 1600 Gbps node-node interconnect (RoCE)": the 70B rows bf16 PURE, the rest amp_bf16 DEFAULT
MPT_A100_80 = _mpt("a100-80gb", """
70b 2048 64 8 4 T 410
70b 2048 32 2 16 T 373
""", reduce="bf16") + _mpt("a100-80gb", """
30b 8192 8 1 21 T 574
30b 4096 8 1 21 T 814
30b 2048 8 3 21 T 916
30b 1024 8 6 21 T 946
30b 512 8 12 21 T 967
13b 32768 8 1 3 T 1016
13b 16384 8 3 3 T 1431
13b 8192 8 5 3 T 1795
13b 4096 8 10 3 T 2060
13b 2048 8 2 3 F 2262
13b 1024 8 40 3 T 2330
7b 65536 8 1 2 T 1013
7b 32768 8 2 2 T 1672
7b 16384 8 4 2 T 2453
7b 8192 8 8 2 T 3206
7b 4096 8 16 2 T 3684
7b 2048 8 6 2 F 4641
7b 1024 8 64 2 T 4357
3b 65536 8 1 2 T 1767
3b 32768 8 3 6 T 3029
3b 16384 8 1 6 F 5529
3b 8192 8 3 6 F 7695
3b 4096 8 5 6 F 9457
3b 2048 8 10 2 F 10811
3b 1024 8 20 6 F 11580
3b 512 8 40 6 F 12127
1b 65536 8 1 2 T 3044
1b 32768 8 1 4 F 6275
1b 16384 8 2 4 F 9956
1b 8192 8 3 4 F 13814
1b 4096 8 7 4 F 17807
1b 2048 8 14 4 F 20513
1b 1024 8 18 4 F 22112
1b 512 8 56 4 F 23148
760m 65536 8 1 2 T 4143
760m 32768 8 1 2 F 8802
760m 16384 8 3 2 F 14274
760m 8192 8 6 2 F 20933
760m 4096 8 12 2 F 27351
760m 2048 8 24 2 F 32434
760m 1024 8 48 2 F 29765
760m 512 8 96 2 F 29446
350m 65536 8 1 2 F 7524
350m 32768 8 2 2 F 13652
350m 16384 8 4 2 F 23559
350m 8192 8 8 2 F 36569
350m 4096 8 16 2 F 49555
350m 2048 8 32 2 F 58782
350m 1024 8 64 2 F 64813
350m 512 8 128 2 F 69330
125m 65536 8 1 2 F 20368
125m 32768 8 2 2 F 36407
125m 16384 8 4 2 F 60040
125m 8192 8 8 2 F 90392
125m 4096 8 16 2 F 118396
125m 2048 8 40 2 F 142830
125m 1024 8 64 2 F 156468
125m 512 8 128 2 F 165681
""")

# The A100 80GB table's earlier measurements (published_mpt_earlier.py): held out.
EARLIER_A100_80 = "mpt-2023-07"   # its source name
MPT_A100_80_2023_07 = _mpt("a100-80gb", A100_80_ROWS_2023_07, reduce="bf16", source=EARLIER_A100_80)

# "A100 40GB with 1600 Gbps node-node interconnect (RoCE)" (bf16 PURE, FULL_SHARD)
MPT_A100_40 = _mpt("a100-40gb", """
70b 2048 128 4 1 T 376
70b 2048 64 2 1 T 276
30b 2048 128 6 1 T 865
30b 2048 32 4 1 T 857
13b 8192 8 1 16 T 1407
13b 4096 8 2 16 T 1603
13b 2048 128 16 1 T 1972
13b 2048 32 14 1 T 1998
13b 2048 8 4 16 T 1668
13b 512 8 16 16 T 1763
7b 16384 8 1 4 T 2249
7b 8192 8 3 4 T 2887
7b 4096 8 6 4 T 3366
7b 2048 128 18 1 T 3623
7b 2048 32 18 1 T 3725
7b 2048 8 12 4 T 3679
7b 512 8 48 4 T 3895
3b 32768 8 1 4 T 2955
3b 16384 8 2 8 T 4465
3b 8192 8 1 8 F 7149
3b 4096 8 2 8 F 8777
3b 2048 128 6 1 F 9538
3b 2048 32 6 1 F 9914
3b 2048 8 5 8 F 10065
3b 512 8 20 8 F 11324
1b 32768 8 1 4 T 5095
1b 16384 8 1 8 F 9715
1b 8192 8 2 8 F 13474
1b 4096 8 4 8 F 16856
1b 2048 128 10 1 F 18647
1b 2048 8 8 8 F 19271
1b 512 8 32 8 F 21782
760m 32768 8 1 4 T 7183
760m 16384 8 1 4 F 13914
760m 2048 128 12 1 F 28940
760m 2048 8 12 4 F 30173
350m 32768 8 1 4 F 13416
350m 2048 128 18 1 F 51934
350m 2048 8 16 4 F 55995
125m 32768 8 1 4 F 32651
125m 2048 128 26 1 F 123936
125m 2048 8 26 3 F 136334
""", reduce="bf16")

# FSDP2, each block wrapped, reducing in fp32 (config_manager.py @3faaa1a0d: mixed_precision_reduce
# "float32", its only choice)
TORCHTITAN = [dataclasses.replace(r, framework="fsdp2") for r in [
    # docs/performance.md @3faaa1a0d, "Llama 3 performance numbers": 64 A100-80GB, FSDP2, local batch 1
    PublishedRun("torchtitan", "a100-80gb", "llama3-8b", 8192, 64, 1, 1, "op", 2973),
    PublishedRun("torchtitan", "a100-80gb", "llama3-70b", 8192, 64, 1, 1, "full", 331),
    # same page, "Llama 2 performance numbers": sequence 4,096, local batch 2 (70B: 1 with selective op)
    PublishedRun("torchtitan", "a100-80gb", "llama2-13b", 4096, 64, 2, 1, "none", 2162),
    PublishedRun("torchtitan", "a100-80gb", "llama2-13b", 4096, 64, 2, 1, "op", 1904),
    PublishedRun("torchtitan", "a100-80gb", "llama2-70b", 4096, 64, 1, 1, "op", 355),
    PublishedRun("torchtitan", "a100-80gb", "llama2-70b", 4096, 64, 2, 1, "full", 353),
    # same page, "Llama 3.1 performance numbers": 128 H100 (HBM2e), FSDP 16 x TP 8, local batch 2, no Float8
    PublishedRun("torchtitan", "h100-sxm", "llama3-405b", 8192, 128, 2, 1, "full", 109, tp=8),
    # benchmarks/llama3_h100_202412_torchtitan.md, Tables 1 and 3, "FSDP" (no compile, no Float8),
    # "selective activation checkpointing": train_configs/llama3_8b.toml of the time sets
    # selective_ac_option = 'op' (torchtitan's op-level policy, our "op"; the A100 page names it)
    PublishedRun("torchtitan", "h100-sxm", "llama3-8b", 8192, 8, 2, 1, "op", 5762),
    PublishedRun("torchtitan", "h100-sxm", "llama3-8b", 8192, 128, 2, 1, "op", 5605),
]]

PUBLISHED_RUNS: List[PublishedRun] = MPT_H100 + MPT_A100_80 + MPT_A100_80_2023_07 + MPT_A100_40 + TORCHTITAN
# The fit set (with Megatron Table 1's three calibration rows): MPT 7B on 8 GPUs at 2,048 and
# 32,768 tokens on each GPU type (A100-40GB: 16,384, its longest 7B row), and MPT 70B on 32
# A100-80GB and on 32 H100 at 2 sequences per GPU (the two tables' rows whose per-block ZeRO-3
# exchange across nodes is closest to the block's compute: the ones that fit ``cross_node``);
# all others held out.
CALIBRATION = {("a100-80gb", "7b", 2048, 8), ("a100-80gb", "7b", 32768, 8), ("a100-40gb", "7b", 2048, 8),
               ("a100-40gb", "7b", 16384, 8), ("h100-sxm", "7b", 2048, 8), ("h100-sxm", "7b", 32768, 8),
               ("a100-80gb", "70b", 2048, 32), ("h100-sxm", "70b", 2048, 32)}

def is_calibration(run: PublishedRun) -> bool:
    return run.source == "mpt" and (run.gpu, run.model, run.seq, run.gpus) in CALIBRATION


def hardware(run: PublishedRun) -> HardwareProfile:
    """The profile a run is costed on: torchtitan's H100s are HBM2e parts (96 GB, 2.4 TB/s) at
    500 W (benchmarks/llama3_h100_202412_torchtitan.md, "Hardware"); the SXM peak is kept (their
    footnote: the real one is between SXM and NVL, and unknown)."""
    hw = load_hardware(run.gpu)
    if run.source == "torchtitan" and run.generation == "h100":
        return dataclasses.replace(hw, memory_bytes=96 * 2 ** 30, memory_bandwidth=2.4e12,
                                   description="H100 HBM2e 96GB, 500 W (torchtitan)")
    return hw


@dataclass
class RunResult:
    run: PublishedRun
    prediction: StepPrediction
    calibration: bool

    @property
    def generation(self) -> str:
        return self.run.generation

    @property
    def error(self) -> float:
        return self.prediction.tokens_per_s_per_gpu / self.run.tokens_per_s_per_gpu - 1.0


def predict_published(run: PublishedRun, eff: Efficiency = Efficiency()) -> StepPrediction:
    hw = hardware(run)
    return predict(run.spec(), run.layout(hw), run.seq, hw, eff, run.impl)


def validate_runs(eff: Efficiency = Efficiency(), runs: Optional[Sequence[PublishedRun]] = None) -> List[RunResult]:
    """Every audited run (the FSDP tables and Llama 3's pipelined rows) unless ``runs`` names some."""
    from megallama.profiling.published_llama3 import llama3_table4_runs
    runs = PUBLISHED_RUNS + llama3_table4_runs() if runs is None else runs
    return [RunResult(r, predict_published(r, eff), is_calibration(r)) for r in runs]


def errors_by_generation(errors: Sequence[tuple]) -> Dict[str, Dict[str, float]]:
    """``(generation, calibration, error)`` triples -> per generation: fit and held-out median and
    max |error| and row counts."""
    out: Dict[str, Dict[str, float]] = {}
    for gen in sorted({g for g, _, _ in errors}):
        row: Dict[str, float] = {}
        for role, want in (("fit", True), ("held_out", False)):
            errs = [abs(e) for g, c, e in errors if g == gen and c == want]
            row[f"{role}_rows"] = len(errs)
            row[f"{role}_median"] = statistics.median(errs) if errs else float("nan")
            row[f"{role}_max"] = max(errs) if errs else float("nan")
        out[gen] = row
    return out


def by_generation(results: Sequence[RunResult], megatron: Optional[Sequence] = None) -> Dict[str, Dict[str, float]]:
    """Per GPU generation (Megatron Table 1's rows count as A100)."""
    triples = [(r.generation, r.calibration, r.error) for r in results]
    triples += [("a100", m.calibration, m.error) for m in (megatron or [])]
    return errors_by_generation(triples)



def remeasured(results: Sequence[RunResult]) -> List[tuple]:
    """``(later, earlier)`` results of the configurations (GPU, model, sequence, GPUs, micro-batch,
    accumulation, recomputation) MPT's A100 80GB table measured in both its versions: the spread
    between them is the source's own repeatability, the floor under any planner's error."""
    def key(r: PublishedRun) -> tuple:
        return r.gpu, r.model, r.seq, r.gpus, r.mbs, r.accum, r.recompute

    earlier = {key(r.run): r for r in results if r.run.source == EARLIER_A100_80}
    return [(r, earlier[key(r.run)]) for r in results if r.run.source == "mpt" and key(r.run) in earlier]
