"""The DeepSpeed config a run hands to ``deepspeed.initialize``, derived from one place.

Batch sizes, clipping and precision come from the run config; the user's DeepSpeed dict may
repeat them, but a value that disagrees is an error rather than a silent override. Combinations
DeepSpeed would refuse deep inside ``initialize`` are refused here, in one line, before start-up.
"""
from __future__ import annotations

import copy
import json
import math
from typing import Any, Dict

from megallama.config import BatchLayout, ConfigError, RunConfig, layout_rules
from megallama.errors import did_you_mean
from megallama.train.ds_settings import DeepSpeedSettings

def _agree(ds: Dict[str, Any], key: str, value: Any, source: str) -> None:
    """``ds[key]`` is ours to fill; a value the user gave must be the same ("auto": fill it in)."""
    given = ds.get(key, "auto")
    if given != "auto" and (isinstance(given, bool) or not isinstance(given, (int, float)) or given != value):
        raise ConfigError(f"deepspeed.{key}: {given!r} contradicts {source} = {value}")
    ds[key] = value


def _check_types(ds: Dict[str, Any]) -> None:
    from megallama.train.deepspeed_patches import BOOL_KEYS, MAPPING_KEYS, NUMBER_KEYS, POSITIVE_INT_KEYS

    for key, value in ds.items():
        if key in MAPPING_KEYS and not isinstance(value, dict):
            raise ConfigError(f"deepspeed.{key}: expected a mapping, got {value!r}")
        if key in BOOL_KEYS and not isinstance(value, bool):
            raise ConfigError(f"deepspeed.{key}: expected true or false, got {value!r}")
        if key in POSITIVE_INT_KEYS and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ConfigError(f"deepspeed.{key}: expected a positive integer, got {value!r}")
        if key in NUMBER_KEYS and (isinstance(value, bool) or not isinstance(value, (int, float))
                                or not math.isfinite(value)):
            raise ConfigError(f"deepspeed.{key}: expected a number, got {value!r}")


def _deepspeed_models() -> Dict[str, Any]:
    """DeepSpeed's own (pydantic, unknown-keys-forbidden) models of the sections it validates."""
    from megallama.train.deepspeed_patches import quiet_cpu_fallback_notice

    with quiet_cpu_fallback_notice():
        from deepspeed.runtime.precision_config import DeepSpeedBF16Config, DeepSpeedFP16Config
        from deepspeed.runtime.zero.config import DeepSpeedZeroConfig
    return {"zero_optimization": DeepSpeedZeroConfig, "fp16": DeepSpeedFP16Config, "bf16": DeepSpeedBF16Config}


def _validate_sections(ds: Dict[str, Any]) -> Dict[str, Any]:
    """Each section DeepSpeed would validate inside ``initialize`` (a traceback there), validated
    here by DeepSpeed's own models and reported in one line naming the key."""
    from pydantic import ValidationError

    parsed = {}
    for key, model in _deepspeed_models().items():
        section = ds.get(key, {})
        bad = next((k for k in section if not isinstance(k, str)), None)
        if bad is not None:
            raise ConfigError(f"deepspeed.{key}.{bad}: keys must be strings")
        try:
            parsed[key] = model(**section)
        except ValidationError as exc:
            err = exc.errors()[0]
            loc = ".".join(str(x) for x in err["loc"])
            if err["type"] == "extra_forbidden":
                raise ConfigError(f"deepspeed.{key}.{loc}: unknown key"
                                  f"{did_you_mean(str(err['loc'][-1]), _fields_at(model, err['loc'][:-1]))}") from None
            got = repr(err.get("input"))
            got = got if len(got) <= 80 else got[:77] + "..."
            msg = "expected 0, 1, 2 or 3" if loc == "stage" else err["msg"][:1].lower() + err["msg"][1:]
            raise ConfigError(f"deepspeed.{key}{'.' + loc if loc else ''}: {msg} (got {got})") from None
        except (AssertionError, TypeError, ValueError) as exc:  # DeepSpeed's deprecated-field handling
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise ConfigError(f"deepspeed.{key}: {first}") from None
    section = ds.get("activation_checkpointing", {})  # DeepSpeed reads it key by key, ignoring unknown ones
    from deepspeed.runtime.activation_checkpointing.config import ACT_CHKPT_DEFAULT
    for k in section:
        if k not in ACT_CHKPT_DEFAULT:
            raise ConfigError(f"deepspeed.activation_checkpointing.{k}: unknown key"
                              f"{did_you_mean(str(k), ACT_CHKPT_DEFAULT)}")
    return parsed


def _fields_at(model, loc) -> list:
    """Field names (and aliases) of the nested model at ``loc`` inside ``model``."""
    from pydantic import BaseModel

    for part in loc:
        field = model.model_fields.get(part)
        ann = getattr(field, "annotation", None)
        args = [a for a in getattr(ann, "__args__", (ann,)) if isinstance(a, type) and issubclass(a, BaseModel)]
        if not args:
            return []
        model = args[0]
    names = list(model.model_fields)
    return names + [f.alias for f in model.model_fields.values() if f.alias]


def _refuse_unsafe_loading(ds: Dict[str, Any]) -> None:
    """DeepSpeed's universal-checkpoint loader unpickles ``TAG/zero/*.pt`` with no restriction, past
    megallama's loading gate; cross-layout resume goes through megallama's own ``universal/``."""
    value = ds.get("checkpoint", {}).get("load_universal", False)
    if value is not False:
        raise ConfigError(f"deepspeed.checkpoint.load_universal: {value!r} is refused: DeepSpeed's universal "
                          "loader unpickles files without checks; megallama resumes at a new layout from its own "
                          "layout-free files (remove the key)")


def zero_stage(ds: Dict[str, Any]) -> int:
    """Shorthand for ``DeepSpeedSettings.of(ds).zero_stage``."""
    return DeepSpeedSettings.of(ds).zero_stage


def build_ds_config(cfg: RunConfig, world_size: int) -> Dict[str, Any]:
    """A complete DeepSpeed config for ``world_size`` ranks (``cfg.deepspeed`` is not modified)."""
    from megallama.train.deepspeed_patches import TOP_LEVEL_KEYS  # first: imports DeepSpeed quietly

    ds = copy.deepcopy(cfg.deepspeed)
    for key in ds:
        if key not in TOP_LEVEL_KEYS:
            raise ConfigError(f"deepspeed.{key}: unknown DeepSpeed key{did_you_mean(str(key), TOP_LEVEL_KEYS)}")
    _check_types(ds)
    if ds.get("optimizer") or ds.get("scheduler"):
        raise ConfigError("deepspeed.optimizer: megallama builds AdamW and the LR schedule from train.*; "
                          "remove the optimizer/scheduler sections")
    p = cfg.parallel
    dp = world_size // p.model_ranks
    layout: BatchLayout = cfg.train.batch_layout(dp)
    _agree(ds, "train_micro_batch_size_per_gpu", layout.micro, "train.micro_batch_size")
    _agree(ds, "gradient_accumulation_steps", layout.accum, "train.grad_accum_steps (derived)")
    _agree(ds, "train_batch_size", layout.global_, "train.global_batch_size (micro x accum x dp)")
    _agree(ds, "gradient_clipping", cfg.train.grad_clip, "train.grad_clip")
    ds.setdefault("steps_per_print", 10**9)  # our progress line replaces DeepSpeed's
    ds.setdefault("wall_clock_breakdown", False)

    _refuse_unsafe_loading(ds)
    sections = _validate_sections(ds)
    fp16, bf16 = sections["fp16"].enabled, sections["bf16"].enabled
    if fp16 and bf16:
        raise ConfigError("deepspeed.fp16: fp16 and bf16 cannot both be enabled")
    zero = sections["zero_optimization"]
    stage = int(zero.stage)
    if stage not in (0, 1, 2, 3):
        raise ConfigError(f"deepspeed.zero_optimization.stage: expected 0, 1, 2 or 3, got {stage}")
    if "stage" in ds.get("zero_optimization", {}):
        ds["zero_optimization"]["stage"] = stage  # "2" and 2.0 read as DeepSpeed reads them
    if (fp16 or bf16) and stage == 0 and p.pp == 1 and p.tp > 1:
        # DeepSpeed wraps torch's AdamW in FP16_UnfusedOptimizer here; it filters TP-replicated weights
        # by an attribute its gradient tensors lack, so ranks > 0 add nothing (tp2: norm 2.47 for 3.47)
        raise ConfigError(f"deepspeed.zero_optimization.stage: 0 with {'bf16' if bf16 else 'fp16'} and "
                          f"parallel.tp={p.tp} gets a DeepSpeed optimizer whose grad norm (and clipping) leaves out "
                          f"TP shards; use stage 1")
    problem = layout_rules.pipeline_zero_problem(p.pp, stage)
    if problem:
        raise ConfigError(problem)
    offload = str(getattr(getattr(zero.offload_optimizer, "device", None), "value",
                          getattr(zero.offload_optimizer, "device", None)) or "none")
    problem = layout_rules.offload_problem(stage, offload not in ("none", None))
    if problem:
        raise ConfigError(problem)
    if offload not in ("none", None):
        ds.setdefault("zero_force_ds_cpu_optimizer", False)
    if stage > 0:
        ds.setdefault("zero_allow_untested_optimizer", True)
    _pipeline_transfers(ds, cfg)
    ac = cfg.train.activation_checkpointing
    for key in ("partition_activations", "cpu_checkpointing"):  # engine.py configures these from train.*
        given = ds.get("activation_checkpointing", {}).get(key, getattr(ac, key))
        if given != getattr(ac, key):
            raise ConfigError(f"deepspeed.activation_checkpointing.{key}: {json.dumps(given)} contradicts "
                              f"train.activation_checkpointing.{key} = {json.dumps(getattr(ac, key))} (set it there)")
    if ac.mode == "full":
        section = ds.setdefault("activation_checkpointing", {})
        section.setdefault("partition_activations", ac.partition_activations)
        section.setdefault("cpu_checkpointing", ac.cpu_checkpointing)
        section.setdefault("contiguous_memory_optimization", False)
        section.setdefault("number_checkpoints", cfg.model.n_layers)
    return ds


def _pipeline_transfers(ds: Dict[str, Any], cfg: RunConfig) -> None:
    """DeepSpeed's pipeline sends 1/tp of a stage's output from each TP rank and all-gathers it on
    the next stage (``pipe_partitioned``; ``grad_partitioned`` likewise for gradients), assuming
    every TP rank holds the same activations. Sequence parallelism gives each TP rank its own
    sequence shard, so the gathered tensor would silently mix shards: send whole tensors."""
    from megallama.train.deepspeed_patches import PIPELINE_KEYS

    section = ds.get("pipeline", {})
    for key in section:
        if key not in PIPELINE_KEYS:  # DeepSpeed keeps unknown keys without a word
            raise ConfigError(f"deepspeed.pipeline.{key}: unknown key{did_you_mean(str(key), PIPELINE_KEYS)}")
    if section.get("activation_checkpoint_interval", 0) != 0:  # DeepSpeed would override our checkpointing
        raise ConfigError(f"deepspeed.pipeline.activation_checkpoint_interval: expected 0, got "
                          f"{section['activation_checkpoint_interval']!r} (use train.activation_checkpointing)")
    for key in ("pipe_partitioned", "grad_partitioned"):
        if key in section and not isinstance(section[key], bool):
            raise ConfigError(f"deepspeed.pipeline.{key}: expected true or false, got {section[key]!r}")
    p = cfg.parallel
    if p.pp == 1 or p.tp == 1:
        return  # DeepSpeed partitions stage-to-stage transfers only with pp > 1 and tp > 1
    if p.sequence_parallel:
        for key in ("pipe_partitioned", "grad_partitioned"):
            if section.get(key) is True:
                raise ConfigError(f"deepspeed.pipeline.{key}: must be false with parallel.sequence_parallel "
                                  f"(TP ranks hold different sequence shards; a partitioned transfer mixes them)")
        section = ds.setdefault("pipeline", {})
        section["pipe_partitioned"] = section["grad_partitioned"] = False
    elif section.get("grad_partitioned", True) and section.get("pipe_partitioned", True) is False:
        # the sender splits each gradient in two messages, the receiver waits for one whole tensor: a hang
        raise ConfigError("deepspeed.pipeline.grad_partitioned: true (the default) needs "
                          "deepspeed.pipeline.pipe_partitioned=true; set both false or both true")


def check_device_supports(ds: Dict[str, Any]) -> None:
    """DeepSpeed's own check raises deep inside ``initialize``; say it in one line up front."""
    from deepspeed.accelerator import get_accelerator

    acc, wanted = get_accelerator(), DeepSpeedSettings.of(ds).precision
    for kind, supported in (("fp16", acc.is_fp16_supported), ("bf16", acc.is_bf16_supported)):
        if kind == wanted and not supported():
            raise ConfigError(f"deepspeed.{kind}: not supported by DeepSpeed's {acc.device_name()} accelerator "
                              f"on this machine (use {'bf16' if kind == 'fp16' else 'fp32'} here)")


def precision(ds: Dict[str, Any]) -> str:
    """Shorthand for ``DeepSpeedSettings.of(ds).precision``: fp32, bf16 or fp16."""
    return DeepSpeedSettings.of(ds).precision
