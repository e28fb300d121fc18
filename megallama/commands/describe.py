"""``megallama describe``: the weight matrices of one layer, full and per-rank, the total, and
with ``--pp`` the blocks and parameters of each pipeline stage (the split training uses)."""
from __future__ import annotations

import json

NAME = "describe"
HELP = "show a model's weight shapes (full and per TP rank) and parameter count, without allocating"


def add_arguments(p) -> None:
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="preset name (e.g. llama-7b) or a run-config YAML")
    src.add_argument("--config", help="run-config YAML (as estimate --config takes it)")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel degree for per-rank shapes")
    p.add_argument("--pp", type=int, default=None,
                   help="pipeline stages: layers and parameters per stage (default: the run config's parallel.pp)")
    p.add_argument("--json", action="store_true", help="print a JSON object")


def _run_config(name: str):
    """A run config (its model, and the pipeline split it asks for) from a YAML or a preset name."""
    from pathlib import Path

    from megallama.config import ModelConfig, RunConfig, load_run_config

    if name.endswith((".yaml", ".yml")) or Path(name).is_file():
        return load_run_config(name)
    return RunConfig(model=ModelConfig.preset(name))


def _stage_layers(run, pp):
    """Blocks per stage at ``pp`` (the config's when not given), by the config's partition rule."""
    from megallama.config import ConfigError, layout_rules
    from megallama.config.pipeline_split import explicit_problem

    words = layout_rules.CONFIG if pp is None else layout_rules.FLAGS
    if pp is not None:
        problem = layout_rules.positive_problem("pp", pp, words)
        if problem:
            raise ConfigError(problem)
        run.parallel.pp = pp
    problem = layout_rules.pp_problem(run.model.shape, run.parallel.pp, words=words)
    if problem is None and run.parallel.pipeline_layers is not None:
        problem = explicit_problem(run.parallel.pipeline_layers, run.model.n_layers, run.parallel.pp)
    if problem:
        raise ConfigError(problem)
    return run.stage_layers() if run.parallel.pp > 1 else None


def run(args) -> int:
    from megallama.config import ConfigError, layout_rules, load_run_config

    name = args.model if args.config is None else args.config
    run_cfg = load_run_config(args.config) if args.config is not None else _run_config(args.model)
    cfg = run_cfg.model
    if args.tp < 1:
        raise ConfigError(f"--tp: expected a positive integer, got {args.tp}")
    cfg.check()
    problem = layout_rules.tp_problem(cfg.shape, args.tp)
    if problem:
        raise ConfigError(problem)
    from megallama.model.describe import describe

    info = describe(cfg, args.tp, _stage_layers(run_cfg, args.pp))
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
    if "stages" in info:
        worst = info["heaviest_stage"]
        print(f"pipeline: {info['pp']} stages holding {info['stage_split']} of {info['n_layers']} layers "
              f"(first stage + embedding, last + head); heaviest stage {worst['stage']} "
              f"({worst['layers']} layers): {worst['parameters_per_rank']:,} parameters per rank")
        runs = []  # consecutive stages of the same size, one line each
        for s in info["stages"]:
            if runs and (runs[-1][-1]["layers"], runs[-1][-1]["parameters_per_rank"]) == \
                    (s["layers"], s["parameters_per_rank"]):
                runs[-1].append(s)
            else:
                runs.append([s])
        for run in runs:
            which = f"{run[0]['stage']}" if len(run) == 1 else f"{run[0]['stage']}-{run[-1]['stage']}"
            print(f"  stage {which:>7}: {run[0]['layers']:>3} layers, {run[0]['parameters_per_rank']:>16,} "
                  f"parameters per rank")
    return 0
