"""``megallama estimate``: the analytic memory/FLOP/communication breakdown of one layout."""
from __future__ import annotations

import argparse
import json
from dataclasses import replace

NAME = "estimate"
HELP = "Print parameters, FLOPs, per-GPU memory and communication of one layout (analytic)."

GiB = 2 ** 30


def add_arguments(p: argparse.ArgumentParser) -> None:
    src = p.add_mutually_exclusive_group()
    src.add_argument("--model", help="model preset (llama-7b, ...)")
    src.add_argument("--config", help="run config YAML, or an architecture YAML with 'arch_family:'")
    p.add_argument("--tp", type=int, default=None)
    p.add_argument("--pp", type=int, default=None)
    p.add_argument("--dp", type=int, default=None)
    p.add_argument("--ulysses", type=int, default=None,
                   help="DeepSpeed-Ulysses degree: ranks each sequence is split over for the whole block")
    p.add_argument("--cp", type=int, default=None,
                   help="context (ring-attention) parallel degree, costed only: the trainer does not run it")
    p.add_argument("--pipeline-layers", default=None, metavar="N,N,...",
                   help="blocks on each pipeline stage (default: balanced by parameters, as training does)")
    p.add_argument("--pipeline-partition", choices=["parameters", "uniform", "embeddings"], default=None,
                   help="how blocks are split over stages (embeddings: the embedding and head counted as one "
                        "block each, as Megatron-DeepSpeed's type:transformer|embedding)")
    p.add_argument("--interleave", type=int, default=1, metavar="V",
                   help="virtual pipeline chunks per stage (interleaved 1F1B), costed only: the trainer runs "
                        "plain 1F1B")
    p.add_argument("--zero", type=int, default=None, help="ZeRO stage 0-3")
    p.add_argument("--mbs", type=int, default=None, help="micro-batch size (sequences)")
    p.add_argument("--grad-accum", type=int, default=None,
                   help="micro-batches per step (default: pp, which fills the pipeline)")
    p.add_argument("--seq", type=int, default=None, help="sequence length (default: the model's max)")
    p.add_argument("--recompute", choices=["none", "selective", "full", "op"], default=None,
                   help="op: torchtitan's op-level selective recomputation, costed only")
    p.add_argument("--sp", action="store_true", default=None, help="sequence parallelism")
    p.add_argument("--offload", action="store_true", default=None, help="ZeRO optimizer offload to CPU")
    p.add_argument("--dtype", choices=["bf16", "fp16", "fp32", "fp8"], default=None,
                   help="fp8: costed only (GEMMs at the profile's FP8 peak)")
    p.add_argument("--impl", choices=["megallama", "megatron"], default="megallama",
                   help="whose implementation to cost: megallama's, or Megatron-LM's (eager attention, SP inputs "
                        "re-gathered in backward, scatter-gather pipeline exchange)")
    p.add_argument("--attention", choices=["flash", "eager"], default=None,
                   help="attention implementation whose saved tensors are counted (default: the --impl's)")
    p.add_argument("--gpu", default=None,
                   help="hardware profile name or file (examples/gpu-custom.yaml): "
                        "also predict step time and check the fit")
    p.add_argument("--gpus-per-node", type=int, default=None)
    p.add_argument("--json", action="store_true", help="machine-readable output")


def _pick(args, defaults, name, fallback):
    value = getattr(args, name)
    return value if value is not None else defaults.get(name, fallback)


def run(args: argparse.Namespace) -> int:
    from megallama.config.pipeline_split import describe_split
    from megallama.profiling import activations as act
    from megallama.profiling.arch import resolve_model
    from megallama.profiling.comm import collective_bytes_per_step
    from megallama.profiling.flops import flops_per_token, parameter_breakdown, parameter_count
    from megallama.profiling.hardware import load_hardware
    from megallama.errors import UserError
    from megallama.profiling.layout import Layout, dtype_problem, parse_pipeline_layers, trainer_notes
    from megallama.profiling.memory import memory_breakdown, params_per_rank
    from megallama.profiling.steptime import predict

    spec, d = resolve_model(args.model, args.config)
    hw = load_hardware(args.gpu) if args.gpu else None
    layers = parse_pipeline_layers(args.pipeline_layers)
    pp = _pick(args, d, "pp", len(layers) if layers else 1)
    if layers is None and d.get("pipeline_layers") and pp == d.get("pp"):
        layers = tuple(d["pipeline_layers"])   # the run config's own split, for its own pp
    accum = args.grad_accum if args.grad_accum is not None else pp
    accum_source = "--grad-accum" if args.grad_accum is not None else "default: pp, which fills the pipeline"
    layout = Layout(tp=_pick(args, d, "tp", 1), pp=pp, dp=_pick(args, d, "dp", 1), zero=_pick(args, d, "zero", 0),
                    mbs=_pick(args, d, "mbs", 1), grad_accum=accum, interleave=args.interleave,
                    recompute=_pick(args, d, "recompute", "none"), sp=bool(_pick(args, d, "sp", False)),
                    offload=bool(_pick(args, d, "offload", False)), dtype=_pick(args, d, "dtype", "bf16"),
                    gpus_per_node=args.gpus_per_node if args.gpus_per_node is not None else
                    (hw.gpus_per_node if hw else 8), pipeline_layers=layers,
                    pipeline_partition=args.pipeline_partition or d.get("pipeline_partition", "parameters"),
                    ulysses=_pick(args, d, "ulysses", 1), cp=args.cp if args.cp is not None else 1)
    seq = _pick(args, d, "seq", spec.max_seq_len)
    layout.check(spec, seq)
    if hw is not None and dtype_problem(layout.dtype, hw.peak_flops, hw.name):
        raise UserError(dtype_problem(layout.dtype, hw.peak_flops, hw.name))
    impl = act.ActivationImpl.named(args.impl, "cpu" if hw is not None and hw.measured else "cuda",
                                    d.get("masked", False), d.get("partition_activations", False))
    if args.attention is not None:
        impl = replace(impl, attention=args.attention)
    scatter_gather = args.impl == "megatron"
    flops = flops_per_token(spec, seq, layout.recompute)
    kind = "cross" if spec.arch == "encoder_decoder" else "decoder"
    saved = act.layer_saved_tensors(spec, seq, layout.mbs, layout.tp, layout.sp, layout.recompute,
                                    layout.dtype_bytes, impl, kind, layout.ulysses, layout.cp)
    counts = layout.stage_layers(spec)
    groups = layout.stage_groups(spec)
    per_stage = {s: memory_breakdown(spec, layout, seq, s, impl) for s in groups}
    worst = max(per_stage, key=lambda s: per_stage[s].total)
    out = {
        "model": spec.name, "layout": layout.as_dict(), "seq": seq, "impl": args.impl,
        "grad_accum": layout.grad_accum, "grad_accum_source": accum_source,
        "parameters": parameter_count(spec), "parameter_breakdown": parameter_breakdown(spec),
        "parameters_per_gpu": params_per_rank(spec, layout.tp, layout.pp, split=counts),
        "pipeline_layers": counts, "pipeline_split": describe_split(counts), "worst_memory_stage": worst,
        "flops_per_token": {"model": flops.model, "hardware": flops.hardware, "forward": flops.forward},
        "activation_bytes_per_layer": sum(x.bytes for x in saved),
        "saved_tensors_per_layer": [{"name": x.name, "bytes": x.bytes} for x in saved],
        "memory_per_gpu_bytes": per_stage[worst].total,
        "stages": {str(s): {"layers": counts[s], "in_flight": layout.in_flight(s), "stands_for": groups[s],
                            "total_bytes": m.total, "host_bytes": m.host_bytes, **m.components}
                   for s, m in per_stage.items()},
        "communication_per_step": collective_bytes_per_step(spec, layout, seq, 0, impl, scatter_gather),
        "notes": trainer_notes(layout, args.impl),
    }
    if hw is not None:
        pred = predict(spec, layout, seq, hw, impl=impl, scatter_gather=scatter_gather)
        out["prediction"] = {k: v for k, v in pred.as_dict().items() if k != "memory_breakdown_bytes"}
    if args.json:
        print(json.dumps(out, indent=2))
        return 0
    _print_text(out, layout)
    return 0


def _print_text(out, layout) -> None:
    print(f"{out['model']}: {out['parameters'] / 1e9:.3f}B parameters, seq {out['seq']}, {layout.describe()}")
    print(f"  micro-batches per step  {out['grad_accum']:10d} ({out['grad_accum_source']})")
    for note in out["notes"]:
        print(f"  note: {note}")
    print(f"  parameters per GPU      {out['parameters_per_gpu'] / 1e9:10.3f} B")
    f = out["flops_per_token"]
    print(f"  FLOPs per token         model {f['model'] / 1e9:.2f} G (MFU), hardware {f['hardware'] / 1e9:.2f} G (HFU)")
    print(f"  activations per layer   {out['activation_bytes_per_layer'] / GiB:10.3f} GiB per micro-batch")
    if layout.pp > 1:
        print(f"  pipeline: {layout.pp} stages of {out['pipeline_split']} layers; the most memory on stage "
              f"{out['worst_memory_stage']}")
    for s, st in out["stages"].items():
        like = f", like {st['stands_for'] - 1} more" if st["stands_for"] > 1 else ""
        print(f"  stage {s} ({st['layers']} layers, micro-batches in flight: {st['in_flight']:g}{like}): "
              f"total {st['total_bytes'] / GiB:.2f} GiB per GPU"
              + (f" (+{st['host_bytes'] / GiB:.2f} GiB on host)" if st["host_bytes"] else ""))
        for k, v in st.items():
            if k not in ("total_bytes", "host_bytes", "layers", "in_flight", "stands_for") and v:
                print(f"      {k:32s} {v / GiB:9.3f} GiB")
    comm = {g: row for g, row in out["communication_per_step"].items() if row["calls"]}
    print("  communication per step (payload per GPU):" + ("" if comm else " none (one GPU)"))
    for g, row in comm.items():
        print(f"      {g:10s} {row['calls']:8.0f} calls  {row['payload_bytes'] / GiB:10.3f} GiB")
    if "prediction" in out:
        p = out["prediction"]
        print(f"  on {layout.world} GPUs: step {p['step_time_s']:.3f} s, {p['tokens_per_s_per_gpu']:.0f} tokens/s/GPU, "
              f"{p['tflops_per_gpu']:.1f} TFLOP/s/GPU, MFU {p['mfu']:.1%}"
              + (f"; slowest stage {p['pipeline_slowest_stage']}" if layout.pp > 1 else ""))
        over = ", ".join(f"{k.replace('_', ' ')} {v / GiB:.2f}" for k, v in p["memory_overhead_bytes"].items() if v)
        print(f"  memory per GPU: {p['memory_verdict']} (counted {p['memory_per_gpu_bytes'] / GiB:.1f} GiB"
              + (f" + {over} GiB" if over else "") + ")")
