"""Config loading, overrides, presets, and one-line errors for bad configs."""
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from megallama.config import ConfigError, ModelConfig, load_run_config

ROOT = Path(__file__).resolve().parents[1]


# Meta's published configurations. LLaMA 1: Touvron et al. 2023, "LLaMA: Open and Efficient
# Foundation Language Models", Table 2 (dim, heads, layers), and Meta's params.json (norm_eps
# 1e-6, multiple_of 256); Llama 2: Touvron et al. 2023b and its params.json (norm_eps 1e-5; only
# 70B uses grouped-query attention: n_kv_heads 8, ffn_dim_multiplier 1.3, multiple_of 4096).
# FFN widths, vocabularies and exact parameter counts as transformers' LlamaConfig for the
# released checkpoints gives them (intermediate_size, num_key_value_heads, rms_norm_eps,
# rope_theta 10000 for all; e.g. meta-llama/Llama-2-13b-hf: 5120/40 heads/40 kv/13824/1e-5).
PUBLISHED = {  # name: (dim, layers, heads, kv heads, ffn, norm_eps, max_seq_len, parameters, paper's "B")
    "llama-7b": (4096, 32, 32, 32, 11008, 1e-6, 2048, 6_738_415_616, 6.7),
    "llama-13b": (5120, 40, 40, 40, 13824, 1e-6, 2048, 13_015_864_320, 13.0),
    "llama-33b": (6656, 60, 52, 52, 17920, 1e-6, 2048, 32_528_943_616, 32.5),
    "llama-65b": (8192, 80, 64, 64, 22016, 1e-6, 2048, 65_285_660_672, 65.2),
    "llama2-7b": (4096, 32, 32, 32, 11008, 1e-5, 4096, 6_738_415_616, 6.7),
    "llama2-13b": (5120, 40, 40, 40, 13824, 1e-5, 4096, 13_015_864_320, 13.0),
    "llama2-70b": (8192, 80, 64, 8, 28672, 1e-5, 4096, 68_976_648_192, 68.9),
}
# Llama 3.x (Meta's params.json; parameter counts as transformers counts the released checkpoints,
# e.g. meta-llama/Meta-Llama-3-8B: 8,030,261,248): vocabulary 128,256, RoPE theta 500,000, GQA 8.
# name: (dim, layers, heads, kv heads, ffn, max_seq_len, rope scaling factor, tied, parameters)
LLAMA3 = {
    "llama3-8b": (4096, 32, 32, 8, 14336, 8192, None, False, 8_030_261_248),
    "llama3-70b": (8192, 80, 64, 8, 28672, 8192, None, False, 70_553_706_496),
    "llama3-405b": (16384, 126, 128, 8, 53248, 131072, 8.0, False, 405_853_388_800),
    "llama3.2-1b": (2048, 16, 32, 8, 8192, 131072, 32.0, True, 1_235_814_400),
    "llama3.2-3b": (3072, 28, 24, 8, 8192, 131072, 32.0, True, 3_212_749_824),
}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_presets_match_metas_published_configs(name):
    from megallama.model.describe import describe

    dim, layers, heads, kv, ffn, eps, max_seq, params, params_b = PUBLISHED[name]
    cfg = ModelConfig.preset(name)
    assert (cfg.dim, cfg.n_layers, cfg.n_heads, cfg.kv_heads, cfg.ffn_hidden_size) == (dim, layers, heads, kv, ffn)
    assert (cfg.vocab_size, cfg.norm_eps, cfg.rope_theta, cfg.max_seq_len) == (32000, eps, 10000.0, max_seq)
    info = describe(cfg)
    assert info["parameters"] == params and info["ffn_hidden_size"] == ffn
    # the papers truncate: 65,285,660,672 parameters are reported as 65.2B
    assert math.floor(info["parameters"] / 1e8) / 10 == params_b


@pytest.mark.parametrize("name", sorted(LLAMA3))
def test_llama3_presets_match_metas_params(name):
    from megallama.model.describe import describe

    dim, layers, heads, kv, ffn, max_seq, factor, tied, params = LLAMA3[name]
    cfg = ModelConfig.preset(name)
    assert (cfg.dim, cfg.n_layers, cfg.n_heads, cfg.kv_heads, cfg.ffn_hidden_size) == (dim, layers, heads, kv, ffn)
    assert (cfg.vocab_size, cfg.norm_eps, cfg.rope_theta, cfg.max_seq_len) == (128256, 1e-5, 500000.0, max_seq)
    assert (cfg.rope_scaling.factor if cfg.rope_scaling else None, cfg.tie_embeddings) == (factor, tied)
    assert describe(cfg)["parameters"] == params


def test_every_llama_preset_is_checked():
    from megallama.config import preset_names

    assert {n for n in preset_names() if n.startswith("llama")} == set(PUBLISHED) | set(LLAMA3)


def test_overrides_reach_presets_lists_and_deepspeed(tmp_path):
    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps({"zero_optimization": {"stage": 2}}))
    cfg_file = tmp_path / "run.yaml"
    cfg_file.write_text(f"model: tiny\ndeepspeed: {ds}\ndata: {{prefixes: [a, b]}}\n")
    cfg = load_run_config(cfg_file, ["model.n_heads=8", "deepspeed.zero_optimization.stage=3",
                                     "data.prefixes.1=c", "train.activation_checkpointing.mode=full"])
    assert cfg.model.n_heads == 8 and cfg.model.dim == 128
    assert cfg.deepspeed["zero_optimization"]["stage"] == 3
    assert cfg.data.prefixes == ["a", "c"]
    assert cfg.train.activation_checkpointing.mode == "full"


@pytest.mark.parametrize("data,world,needle", [
    ({"modle": "tiny"}, None, "modle: unknown key; did you mean 'model'"),
    ({"model": {"preset": "tiny", "n_layer": 2}}, None, "did you mean 'n_layers'"),
    ({"model": "tiny", "train": {"seq_len": "long"}}, None, "train.seq_len"),
    ({"model": "tiny", "parallel": {"tp": 3}}, None, "model.n_heads: 4 is not divisible by parallel.tp=3"),
    ({"model": {"preset": "tiny-gqa", "dim": 192, "n_heads": 12, "n_kv_heads": 4}, "parallel": {"tp": 6}}, None,
     "model.n_kv_heads: 4 neither divides nor is divisible by parallel.tp=6"),
    ({"model": {"preset": "tiny", "vocab_size": 2050}, "parallel": {"tp": 4}}, None, "model.vocab_size"),
    ({"model": {"preset": "tiny", "multiple_of": 1, "dim": 128}, "parallel": {"tp": 2}}, None, "ffn_hidden_size"),
    ({"model": "tiny", "parallel": {"pp": 5}}, None,
     "parallel.pp: 5 stages need at least one layer each, model.n_layers is 4"),
    ({"model": "tiny", "parallel": {"pp": 3, "pipeline_layers": [2, 1]}}, None,
     "parallel.pipeline_layers: lists 2 stages, expected parallel.pp=3"),
    ({"model": "tiny", "parallel": {"pp": 2, "pipeline_layers": [2, 1]}}, None,
     "parallel.pipeline_layers: adds up to 3 layers, expected model.n_layers=4"),
    ({"model": "tiny", "parallel": {"pp": 2, "pipeline_layers": [4, 0]}}, None,
     "parallel.pipeline_layers: every stage needs at least one layer, got [4, 0]"),
    ({"model": "tiny", "parallel": {"tp": 2, "pp": 2}}, 6, "world size 6 is not a multiple of tp x pp"),
    ({"model": "tiny", "train": {"micro_batch_size": 4, "global_batch_size": 10}}, 2, "train.global_batch_size"),
    ({"model": "nope"}, None, "model.preset: unknown preset 'nope'"),
    ({"model": "tiny", "train": {"seq_len": 4096}}, None, "exceeds model.max_seq_len"),
    ({"model": "tiny", "train": {"time_limit_min": 0}}, None, "train.time_limit_min: input should be greater than 0"),
    ({"model": "tiny", "train": {"time_limit_min": "soon"}}, None, "train.time_limit_min: input should be a valid number"),
    ({"model": "tiny", "train": {"time_limit_min": True}}, None, "train.time_limit_min: expected a number"),
])
def test_bad_configs_are_one_line_errors(data, world, needle):
    with pytest.raises(ConfigError) as exc:
        load_run_config(data=data).check_layout(world)
    assert needle in str(exc.value)
    assert "\n" not in str(exc.value)


def _cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "megallama", *args], capture_output=True, text=True, cwd=cwd)


@pytest.mark.parametrize("yaml_text,extra,needle", [
    ("model: tiny\nparallel: {tp: 3}\n", [], "parallel.tp=3"),
    ("model: tiny\ntrian: {steps: 3}\n", [], "did you mean 'train'"),
    ("model: tiny\n", ["--set", "train.steps=abc"], "train.steps"),
    ("model: tiny\ndeepspeed: missing.json\n", [], "deepspeed: file 'missing.json' not found"),
    ("model: tiny\n", ["--world-size", "3", "--set", "parallel.tp=2"], "world size 3"),
    ("model: [tiny\n", [], "not valid YAML"),
    ("!!python/object/apply:os.system ['echo hi']\n", [], "not valid YAML"),
])
def test_cli_reports_bad_config_in_one_line(tmp_path, yaml_text, extra, needle):
    path = tmp_path / "run.yaml"
    path.write_text(yaml_text)
    r = _cli("validate", str(path), *extra)
    assert r.returncode == 2, r
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], r.stderr
    assert "Traceback" not in r.stderr


def test_cli_validate_and_describe_ok(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("model: tiny\ntrain: {micro_batch_size: 2, global_batch_size: 8}\n")
    r = _cli("validate", str(path), "--world-size", "2")
    assert r.returncode == 0 and "global batch 8 = 2 x 2 x 2" in r.stdout, r
    r = _cli("describe", "--model", "llama-7b", "--tp", "2", "--json")
    info = json.loads(r.stdout)
    assert info["parameters"] == 6738415616 and info["ffn_hidden_size"] == 11008
    rows = {row["name"]: row for row in info["layer"]}
    assert rows["layers.0.attention.wq"]["full_shape"] == [4096, 4096]
    assert rows["layers.0.feed_forward.w1"]["parallel"] == "column"
    assert rows["layers.0.feed_forward.w2"]["full_shape"] == [11008, 4096]
    assert rows["layers.0.feed_forward.w2"]["rank_shape"] == [5504, 4096]
    assert rows["layers.0.feed_forward.w2"]["parallel"] == "row"


def test_overrides_never_change_the_callers_data():
    data = {"model": {"preset": "tiny"}, "train": {"steps": 5, "warmup_steps": 1}, "data": {"prefixes": ["a", "b"]}}
    before = json.dumps(data)
    cfg = load_run_config(data=data, overrides=["train.steps=7", "model.n_layers=2", "data.prefixes.1=c"])
    assert (cfg.train.steps, cfg.model.n_layers, cfg.data.prefixes) == (7, 2, ["a", "c"])
    assert json.dumps(data) == before


def test_default_warmup_shrinks_for_a_short_run_and_an_asked_for_one_is_refused():
    from megallama.config.schema import TrainConfig

    assert TrainConfig(steps=5).warmup_steps == 0 and TrainConfig(steps=20).warmup_steps == 2
    assert TrainConfig(steps=300).warmup_steps == 30  # the default where it fits
    with pytest.raises(ConfigError, match=r"^train\.warmup_steps: 5 is not fewer than train\.steps=5"):
        TrainConfig(steps=5, warmup_steps=5)
