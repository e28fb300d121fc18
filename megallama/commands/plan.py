"""``megallama plan``: rank layouts of a GPU cluster by predicted tokens/s, or evaluate one."""
from __future__ import annotations

import argparse
import json

NAME = "plan"
HELP = "Choose TP/Ulysses/PP/DP/ZeRO/micro-batch/recompute for N GPUs: predicted tokens/s, MFU, memory."

GiB = 2 ** 30
MAX_TOP = 1000


def add_arguments(p: argparse.ArgumentParser) -> None:
    src = p.add_mutually_exclusive_group()
    src.add_argument("--model", help="model preset (llama-7b, ..., llama-65b)")
    src.add_argument("--config", help="run config YAML, or an architecture YAML with 'arch_family:'")
    p.add_argument("--gpus", type=int, required=True, help="number of GPUs")
    p.add_argument("--gpu", required=True,
                   help="hardware profile: a name (h100-sxm, h100-pcie, b200, mi300x, ..., cpu) "
                        "or a file (examples/gpu-custom.yaml)")
    p.add_argument("--seq", type=int, default=None, help="sequence length (default: the model's max)")
    p.add_argument("--global-batch-tokens", type=int, default=None, help="tokens per step (default 4M)")
    p.add_argument("--gpus-per-node", type=int, default=None, help="default: the profile's (8)")
    p.add_argument("--tp", type=int, default=None)
    p.add_argument("--pp", type=int, default=None)
    p.add_argument("--dp", type=int, default=None)
    p.add_argument("--ulysses", type=int, default=None,
                   help="pin the DeepSpeed-Ulysses degree (ranks each sequence is split over; default: searched)")
    p.add_argument("--cp", type=int, default=None,
                   help="context (ring-attention) parallel degree, costed only: the trainer does not run it")
    p.add_argument("--pipeline-layers", default=None, metavar="N,N,...",
                   help="pin the blocks on each pipeline stage (and pp to their count)")
    p.add_argument("--pipeline-partition", choices=["parameters", "uniform", "embeddings"], default="parameters",
                   help="how blocks are split over stages: balance parameters (as training does), equal counts, "
                        "or the embedding and head counted as one block each (Megatron-DeepSpeed, BLOOM)")
    p.add_argument("--interleave", type=int, default=1, metavar="V",
                   help="virtual pipeline chunks per stage (interleaved 1F1B), costed only: never searched, "
                        "the trainer runs plain 1F1B")
    p.add_argument("--zero", type=int, default=None)
    p.add_argument("--mbs", type=int, default=None)
    p.add_argument("--recompute", choices=["none", "selective", "full", "op"], default=None,
                   help="op: torchtitan's op-level selective recomputation, costed only (never searched)")
    p.add_argument("--sp", choices=["on", "off"], default=None, help="pin sequence parallelism")
    p.add_argument("--offload", action="store_true", default=None, help="offload the optimizer (ZeRO >= 1)")
    p.add_argument("--dtype", choices=["bf16", "fp16", "fp32", "fp8"], default="bf16",
                   help="fp8: costed only (GEMMs at the profile's FP8 peak), on profiles that have one")
    p.add_argument("--impl", choices=["megallama", "megatron"], default="megallama",
                   help="whose implementation to cost: megallama's, or Megatron-LM's (eager attention, SP inputs "
                        "re-gathered in backward, scatter-gather pipeline exchange)")
    p.add_argument("--top", type=int, default=10, help="candidates to list")
    p.add_argument("--json", action="store_true", help="machine-readable output")


def run(args: argparse.Namespace) -> int:
    from megallama.errors import UserError
    from megallama.profiling.activations import ActivationImpl
    from megallama.profiling.arch import resolve_model
    from megallama.config.pipeline_split import describe_split
    from megallama.profiling.hardware import load_hardware
    from megallama.profiling.efficiency import cross_node_statement
    from megallama.profiling.layout import parse_pipeline_layers, trainer_notes
    from megallama.profiling.planner import plan

    if not 1 <= args.top <= MAX_TOP:
        raise UserError(f"--top: expected 1 to {MAX_TOP}, got {args.top}")
    spec, run = resolve_model(args.model, args.config)   # a run config: its mask and partitioning
    hw = load_hardware(args.gpu)
    fixed = {"tp": args.tp, "ulysses": args.ulysses, "cp": args.cp, "pp": args.pp, "dp": args.dp,
             "zero": args.zero, "mbs": args.mbs,
             "recompute": args.recompute, "sp": None if args.sp is None else args.sp == "on",
             "offload": args.offload, "pipeline_layers": parse_pipeline_layers(args.pipeline_layers)}
    impl = ActivationImpl.named(args.impl, "cpu" if hw.measured else "cuda", run.get("masked", False),
                                run.get("partition_activations", False))
    result = plan(spec, args.gpus, hw, seq=args.seq, batch_tokens=args.global_batch_tokens,
                  gpus_per_node=args.gpus_per_node, dtype=args.dtype, impl=impl,
                  scatter_gather=args.impl == "megatron", interleave=args.interleave,
                  pipeline_partition=args.pipeline_partition, **fixed)
    notes = trainer_notes(result.best.layout, args.impl)
    if args.json:
        print(json.dumps({**result.as_dict(top=args.top), "impl": args.impl, "notes": notes}, indent=2))
        return 0
    for note in notes:
        print(f"note: {note}")
    best = result.best
    fit = sum(c.fits for c in result.candidates)
    print(f"{spec.name} on {args.gpus} x {hw.name}, seq {result.seq}, {result.batch_tokens:,} tokens per step: "
          f"{fit} of {result.evaluated} layouts fit")
    print(f"{'#':>3} {'layout':58s} {'tok/s/GPU':>9} {'TFLOP/s':>7} {'MFU':>6} {'GiB/GPU':>7} {'margin':>7} "
          f"{'step s':>7}  layers per stage")
    for i, c in enumerate(result.candidates[:args.top], 1):
        flag = "" if c.fits else f"  (does not fit: {-c.memory_verdict.margin_bytes / GiB:.1f} GiB over)"
        print(f"{i:>3} {c.layout.describe():58s} {c.tokens_per_s_per_gpu:9.0f} {c.tflops_per_gpu:7.1f} "
              f"{c.mfu:6.1%} {c.memory_verdict.needed_bytes / GiB:7.1f} "
              f"{c.memory_verdict.margin_bytes / GiB:+7.1f} {c.step_time_s:7.2f}  "
              f"{describe_split(c.stage_layers)}{flag}")
    t = best.time
    print(f"best: compute {t['compute']:.2f} s, TP/PP comm {t['tp_and_pp_comm']:.2f} s, bubble "
          f"{t['pipeline_bubble']:.2f} s, DP comm {t['dp_comm_exposed']:.2f} s, optimizer {t['optimizer']:.3f} s; "
          f"HFU {best.hfu:.1%}")
    print(f"best memory per GPU: {best.memory_verdict.describe()} (needed: tensors + workspaces, NCCL buffers, "
          f"fragmentation)")
    if not hw.measured and best.layout.world > best.layout.gpus_per_node:
        print(f"best spans nodes: {cross_node_statement(hw)}")
    if best.layout.pp > 1:
        print(f"best pipeline: {best.layout.pp} stages of {describe_split(best.stage_layers)} layers; most memory "
              f"on stage {best.memory.stage}, slowest stage {best.slowest_stage}")
    if best.tokens_per_step != result.batch_tokens:
        b = best.layout
        print(f"best runs {b.grad_accum} micro-batches x mbs {b.mbs} x dp {b.dp} x seq {result.seq} = "
              f"{best.tokens_per_step:,.0f} tokens per step ({best.tokens_per_step / result.batch_tokens - 1:+.1%} "
              f"of the {result.batch_tokens:,} asked)")
    return 0
