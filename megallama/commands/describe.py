"""``megallama describe``: the weight matrices of one layer, full and per-rank, and the total."""
from __future__ import annotations

import json

NAME = "describe"
HELP = "show a model's weight shapes (full and per TP rank) and parameter count, without allocating"


def add_arguments(p) -> None:
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="preset name (e.g. llama-7b) or a run-config YAML")
    src.add_argument("--config", help="run-config YAML (as estimate --config takes it)")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel degree for per-rank shapes")
    p.add_argument("--json", action="store_true", help="print a JSON object")


def _model_config(name: str):
    from pathlib import Path

    from megallama.config import ModelConfig, load_run_config

    if name.endswith((".yaml", ".yml")) or Path(name).is_file():
        return load_run_config(name).model
    return ModelConfig.preset(name)


def run(args) -> int:
    from megallama.config import ConfigError, layout_rules, load_run_config

    name = args.model if args.config is None else args.config
    cfg = load_run_config(args.config).model if args.config is not None else _model_config(args.model)
    if args.tp < 1:
        raise ConfigError(f"--tp: expected a positive integer, got {args.tp}")
    cfg.check()
    problem = layout_rules.tp_problem(cfg.shape, args.tp)
    if problem:
        raise ConfigError(problem)
    from megallama.model.describe import describe

    info = describe(cfg, args.tp)
    info["model"] = name
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print(f"{name}: {info['parameters'] / 1e9:.2f}B parameters ({info['parameters']:,}); "
          f"{info['parameters_per_rank']:,} per rank at TP={args.tp}; FFN hidden {info['ffn_hidden_size']}")
    print(f"{'weight (one layer)':<34} {'full (in x out)':>18} {'per rank':>16}  parallel")
    for row in info["layer"] + info["other"]:
        full = " x ".join(map(str, row["full_shape"]))
        rank = " x ".join(map(str, row["rank_shape"]))
        fused = f" (fused in {row['fused_into']})" if row["fused_into"] else ""
        print(f"{row['name']:<34} {full:>18} {rank:>16}  {row['parallel']}{fused}")
    return 0
