"""Typed run configuration: one YAML per run, dotted overrides, presets, layout checks.

``schema`` holds the pydantic sections; ``loading`` reads YAML, applies ``--set`` overrides and
validates. Import from here: ``from megallama.config import RunConfig, load_run_config``.
"""
from megallama.config.schema import (PRESET_DIR, ActivationCheckpointing, BatchLayout, CheckpointConfig,
                                     ConfigError, DataConfig, ModelConfig, ParallelConfig, RunConfig,
                                     TrainConfig, load_preset, preset_names)
from megallama.config.loading import apply_override, build_section, load_run_config, parse_override

__all__ = ["PRESET_DIR", "ActivationCheckpointing", "BatchLayout", "CheckpointConfig", "ConfigError", "DataConfig",
           "ModelConfig", "ParallelConfig", "RunConfig", "TrainConfig", "apply_override", "build_section",
           "load_preset", "load_run_config", "parse_override", "preset_names"]
