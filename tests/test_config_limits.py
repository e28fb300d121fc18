"""A run config is bounded before anything is built, and typed strictly.

Each hostile input here used to end in a traceback, a minute of CPU or gigabytes of memory: a
50k-deep YAML list (RecursionError), a "billion laughs" alias document as ``run_dir`` or through
``--set`` (2.7 GB spent printing it), a 5000-digit ``train.seed`` (int() refuses it) or a 30-digit
one (torch.manual_seed overflows), a 50 MB list. Now each is one line naming the file or the
``--set`` key, in well under a second. Types: ``train.steps: true`` was taken as 1, an empty file
started building the 7B default model, ``sequence_parallel`` with ``tp: 1`` ran, and
``train.train_iters`` was taken for a misspelling of ``eval_iters``.
"""
from __future__ import annotations

import time

import pytest

from megallama.config import RunConfig, load_run_config
from megallama.config.bounded_yaml import MAX_BYTES, MAX_DEPTH, MAX_VALUES
from megallama.errors import UserError


def _laughs(levels: int = 9, width: int = 10, flow: bool = False) -> str:
    """Alias-of-alias lists expanding to width**levels values from a few hundred bytes."""
    if flow:
        parts = ["&a0 [" + ",".join(["x"] * width) + "]"]
        parts += [f"&a{i} [" + ",".join([f"*a{i - 1}"] * width) + "]" for i in range(1, levels + 1)]
        return "[" + ", ".join(parts) + f", *a{levels}]"
    lines = ["model: tiny", "a0: &a0 [" + ",".join(["x"] * width) + "]"]
    lines += [f"a{i}: &a{i} [" + ",".join([f"*a{i - 1}"] * width) + "]" for i in range(1, levels + 1)]
    return "\n".join(lines + [f"run_dir: *a{levels}"]) + "\n"


def refused(path=None, overrides=(), data=None, within_s: float = 30.0) -> str:
    """The one-line ConfigError for this input, reached quickly (the bound is loose for a loaded
    2-core CI box; unbounded, these took minutes or gigabytes)."""
    start = time.perf_counter()
    with pytest.raises(UserError) as exc:
        cfg = load_run_config(path, list(overrides), data=data)
        cfg.check_layout()
    assert time.perf_counter() - start < within_s
    msg = str(exc.value)
    assert msg and "\n" not in msg and len(msg) < 600, msg
    return msg


@pytest.mark.parametrize("text,needle", [
    ("model: tiny\nrun_dir: " + "[" * 50000 + "]" * 50000 + "\n", f"line 2: nested deeper than {MAX_DEPTH} levels"),
    ("model: tiny\nrun_dir:\n" + "".join("  " * i + "- \n" for i in range(500)), "nested deeper than"),
    ("model: tiny\ntrain: " + "{a: " * 50000 + "1" + "}" * 50000 + "\n", "nested deeper than"),
    (_laughs(), "values once its aliases are expanded"),
    ("model: tiny\nrun_dir: &a [*a]\n", "an alias refers to a collection that contains it"),
    ("model: tiny\ntrain: {seed: " + "7" * 5000 + "}\n", "line 2: an integer of 5000 characters"),
    ("model: tiny\nrun_dir: [" + ",".join(["1"] * (MAX_VALUES + 1)) + "]\n", f"more than {MAX_VALUES:,} values"),
])
def test_hostile_yaml_is_one_line_naming_the_file(tmp_path, text, needle):
    path = tmp_path / "run.yaml"
    path.write_text(text)
    msg = refused(path)
    assert msg.startswith(f"config: {path}") and needle in msg, msg


def test_depth_through_aliases_is_bounded(tmp_path):
    """Each anchor is shallow, but nesting them makes the structure as deep as their chain."""
    lines = ["model: tiny", "a0: &a0 [[[[1]]]]"]
    lines += [f"a{i}: &a{i} [[[[*a{i - 1}]]]]" for i in range(1, 40)]
    (tmp_path / "run.yaml").write_text("\n".join(lines + ["run_dir: *a39"]) + "\n")
    assert "nested deeper than" in refused(tmp_path / "run.yaml")


def test_a_huge_file_is_refused_by_its_size_before_parsing(tmp_path):
    path = tmp_path / "run.yaml"
    with path.open("w") as f:   # 50 MB of list: used to be killed for memory (100 MB took 44 s)
        f.write("model: tiny\nrun_dir:\n")
        f.write("- 1\n" * (50 * 2 ** 20 // 4))
    msg = refused(path, within_s=10.0)
    assert msg == f"config: {path}: larger than {MAX_BYTES:,} bytes; a config is a few kilobytes"


def test_deepspeed_json_is_bounded_too(tmp_path):
    (tmp_path / "deep.json").write_text("[" * 100000 + "]" * 100000)
    (tmp_path / "int.json").write_text('{"train_batch_size": ' + "9" * 5000 + "}")
    (tmp_path / "run.yaml").write_text("model: tiny\n")
    assert "deepspeed: " in refused(tmp_path / "run.yaml", [f"deepspeed={tmp_path / 'deep.json'}"])
    msg = refused(tmp_path / "run.yaml", [f"deepspeed={tmp_path / 'int.json'}"])
    assert msg.startswith(f"deepspeed: {tmp_path / 'int.json'}"), msg


@pytest.mark.parametrize("override,needle", [
    ("run_dir=" + _laughs(flow=True), "--set run_dir: 23,456,790,122 values once its aliases are expanded"),
    ("train.seed=" + "9" * 5000, "--set train.seed line 1: an integer of 5000 characters"),
    ("train.seed=" + "9" * 30, "train.seed: input should be less than or equal to 2147483647"),
    ("run_dir=" + "[" * 50000 + "]" * 50000, "--set run_dir line 1: nested deeper than"),
    ("deepspeed=" + "x" * 10000, "deepspeed: 'xxxxxxxx"),
    ("train." + "x" * 5000 + "=1", "not a config key (too long)"),
])
def test_set_values_have_the_same_bounds(tmp_path, override, needle):
    (tmp_path / "run.yaml").write_text("model: tiny\n")
    msg = refused(tmp_path / "run.yaml", [override])
    assert needle in msg, msg


def test_errors_never_print_an_unbounded_value(tmp_path):
    """A wrong type whose value is large is described, not printed (the old repr-then-cut built
    the whole repr of a 10**9-item structure first)."""
    (tmp_path / "run.yaml").write_text("model: tiny\n")
    msg = refused(tmp_path / "run.yaml", ["run_dir=[" + ",".join(["1"] * 20000) + "]"])
    assert msg == "run_dir: input should be a valid string (got <a list of 20000 items>)", msg
    msg = refused(data={"model": "tiny", "run_dir": [[1] * 10] * 10 ** 7}, within_s=10.0)
    assert "<a list of 10000000 items>" in msg


def test_ordinary_anchors_still_work(tmp_path):
    (tmp_path / "run.yaml").write_text("model: tiny\ntrain: {steps: &n 5, eval_iters: *n}\n"
                                       "checkpoint: {dir: &d ckpts, load: *d}\n")
    cfg = load_run_config(tmp_path / "run.yaml")
    assert cfg.train.eval_iters == 5 and cfg.checkpoint.load == "ckpts"


# -------------------------------------------------------------------------------- strict types
def _numeric_fields(cls=RunConfig, prefix=""):
    from pydantic import BaseModel

    for name, field in cls.model_fields.items():
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            yield from _numeric_fields(ann, f"{prefix}{name}.")
        elif "int" in str(ann) or "float" in str(ann):
            yield f"{prefix}{name}", "int" in str(ann), "List" in str(ann)


@pytest.mark.parametrize("path,is_int,listed", list(_numeric_fields()))
def test_booleans_are_not_numbers_anywhere(path, is_int, listed):
    # a list of numbers (data.weights, parallel.pipeline_layers): its items are the numbers
    msg = refused(data={"model": {"preset": "tiny"}}, overrides=[f"{path}={'[true]' if listed else 'true'}"])
    assert msg.startswith(f"{path}{'.0' if listed else ''}: "), msg
    assert ("valid integer" if is_int else "not a boolean") in msg and "(got True)" in msg, msg


def test_integer_fields_take_no_floats_or_strings():
    assert "train.steps: input should be a valid integer" in refused(data={"model": "tiny", "train": {"steps": 10.0}})
    assert "train.steps: input should be a valid integer" in refused(data={"model": "tiny", "train": {"steps": "10"}})
    # floats still read YAML 1.1's dotless exponent, which PyYAML hands over as a string
    assert load_run_config(data={"model": "tiny"}, overrides=["train.lr=1e-3"]).train.lr == 1e-3


@pytest.mark.parametrize("text,needle", [
    ("", "model: a run config must name its model"),
    ("train: {steps: 3}\n", "model: a run config must name its model"),
    ("model: {}\n", "model: a run config must name its model"),
    ("model: {n_layers: 2}\n", "model: name a preset (model: {preset: tiny, ...}) or give the architecture in full "
                               "(missing: dim, n_heads, vocab_size)"),
    ("modle: tiny\n", "modle: unknown key; did you mean 'model'?"),
])
def test_a_run_config_must_name_its_model(tmp_path, text, needle):
    (tmp_path / "run.yaml").write_text(text)
    assert needle in refused(tmp_path / "run.yaml")


def test_a_full_architecture_needs_no_preset():
    cfg = load_run_config(data={"model": {"dim": 64, "n_layers": 2, "n_heads": 4, "vocab_size": 256,
                                          "max_seq_len": 256}})
    assert (cfg.model.dim, cfg.model.n_layers) == (64, 2)


def test_sequence_parallel_needs_tensor_parallelism():
    msg = refused(data={"model": "tiny", "parallel": {"tp": 1, "sequence_parallel": True}})
    assert msg.startswith("parallel.sequence_parallel: needs parallel.tp > 1"), msg
    load_run_config(data={"model": "tiny", "parallel": {"tp": 2, "sequence_parallel": True}}).check_layout(2)


@pytest.mark.parametrize("override,suggestion", [
    ("train.train_iters=10", "train.steps"),
    ("train_iters=10", "train.steps"),
    ("parallel.tensor_model_parallel_size=2", "parallel.tp"),
    ("train.pipeline_model_parallel_size=2", "parallel.pp"),
    ("train.lr_warmup_iters=5", "train.warmup_steps"),
    ("train.seq_length=64", "train.seq_len"),
    ("model.num_layers=2", "model.n_layers"),
    ("model.hidden_size=64", "model.dim"),
    ("model.num_attention_heads=4", "model.n_heads"),
    ("model.num_key_value_heads=2", "model.n_kv_heads"),
    ("model.num_query_groups=2", "model.n_kv_heads"),
    ("model.max_position_embeddings=64", "model.max_seq_len"),
    ("model.norm_epsilon=1e-5", "model.norm_eps"),
    ("model.rotary_base=10000", "model.rope_theta"),
    ("train.rope_theta=10000", "model.rope_theta"),
    ("model.seed=3", "train.seed"),
    ("checkpoint.save_interval=10", "checkpoint.every"),
    ("parallel.micro_batch_size=2", "train.micro_batch_size"),
    ("global_batch_size=8", "train.global_batch_size"),
    ("model.ffn_hidden_size=256", "model.ffn_dim_multiplier"),
    ("train.tp=2", "parallel.tp"),
])
def test_megatron_names_and_misplaced_keys_get_their_dotted_path(override, suggestion):
    msg = refused(data={"model": "tiny"}, overrides=[override])
    key = override.split("=")[0]
    assert msg.startswith(f"{key}: unknown key; did you mean '{suggestion}'?"), msg


def test_plain_misspellings_still_suggest_the_near_key():
    assert "did you mean 'steps'?" in refused(data={"model": "tiny"}, overrides=["train.stepss=3"])
    assert "did you mean 'eval_iters'?" in refused(data={"model": "tiny"}, overrides=["train.eval_iter=3"])
