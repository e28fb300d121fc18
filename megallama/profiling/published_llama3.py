"""Llama 3 405B's Table 4 rows in the throughput audit (:func:`published_runs.validate_runs`): a
pipelined run, costed with the implementation and the schedule it assumes."""
from __future__ import annotations

from typing import List

from megallama.profiling.arch import as_spec
from megallama.profiling.flops import flops_per_token
from megallama.profiling.published import LLAMA3_405B_STAGES, LLAMA3_INTERLEAVE, MEGATRON_FLASH
from megallama.profiling.published_runs import PublishedRun

# Llama Team 2024, "The Llama 3 Herd of Models" (arXiv 2407.21783), Table 4, the 8K rows (GPUs,
# DP, sequences per DP rank, TFLOP/s per GPU; BF16 MFU 43% and 41%): H100 80GB, TP 8, CP 1, PP 16,
# 16M tokens per batch. Sec. 3.3.2: 126 blocks, one fewer on the first and last stage, interleaved
# (V assumed 8: the only chunk count that leaves the first chunk the embedding alone,
# published.LLAMA3_INTERLEAVE), no activation checkpointing, FSDP over DP (gradients and optimizer
# states sharded: ZeRO-1 is the closest engine pipelines run). Micro-batch 1 sequence (assumed:
# not published; 16 or 32 micro-batches of one sequence per DP rank). TFLOP/s become tokens/s
# through our model FLOPs per token (the same conversion the prediction's TFLOP/s uses).
LLAMA3_TABLE4 = ((8192, 64, 32, 430.0), (16384, 128, 16, 400.0))


def llama3_table4_runs() -> List[PublishedRun]:
    per_token = flops_per_token(as_spec("llama3-405b"), 8192, "none").model
    return [PublishedRun("llama3", "h100-sxm", "llama3-405b", 8192, gpus, 1, per_dp, "none",
                         tflops * 1e12 / per_token, zero=1, tp=8, pp=16, interleave=LLAMA3_INTERLEAVE,
                         pipeline_layers=LLAMA3_405B_STAGES, impl=MEGATRON_FLASH, framework="deepspeed")
            for gpus, _dp, per_dp, tflops in LLAMA3_TABLE4]
