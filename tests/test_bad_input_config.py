"""Every bad run config or DeepSpeed config is one line naming the field, never a traceback.

Property-based: hypothesis mutates a valid run config (as YAML on disk, as ``--set`` overrides,
with the DeepSpeed section inline or as a JSON file) by wrong types, deleted, misspelt and
unknown keys, impossible layouts and batch arithmetic, and sequences longer than the model's.
Each case goes through exactly what ``megallama train`` runs before start-up
(``load_run_config`` -> ``check_layout(world)`` -> ``build_ds_config``) and must either pass or
raise :class:`UserError` whose message is one line naming a field; any other exception is a bug.
A few cases then go through the real CLI (``validate`` in-process and as a subprocess, ``train``
with a launcher's world size) to show the process prints that line alone and writes nothing.
"""
from __future__ import annotations

import copy
import functools
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Dict, List, Optional

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from megallama.config import RunConfig, load_run_config
from megallama.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
SECTIONS = ("config", "run_dir", "model", "parallel", "train", "data", "checkpoint", "deepspeed", "--set")
FAST = settings(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])

BASE: Dict[str, Any] = {
    "run_dir": "runs/should-never-be-written",
    "model": {"preset": "tiny", "max_seq_len": 128},
    "parallel": {"tp": 1, "pp": 1, "sequence_parallel": False},
    "train": {"steps": 5, "seed": 7, "seq_len": 64, "micro_batch_size": 2, "global_batch_size": 8, "lr": 1e-3,
              "warmup_steps": 1, "log_every": 1, "activation_checkpointing": {"mode": "full", "every": 1}},
    "data": {"embedded_max_files": 10},
    "checkpoint": {"every": 2, "keep": 2},
    "deepspeed": {"zero_optimization": {"stage": 1, "offload_optimizer": {"device": "none"}},
                  "bf16": {"enabled": False}, "fp16": {"enabled": False}, "gradient_clipping": 1.0,
                  "activation_checkpointing": {"partition_activations": False}},
}
WORLD = 4  # BASE is valid at this world size: dp 4, global 8 = 2 x 1 x 4


# ------------------------------------------------------------------------------------ oracle
def check(path: Optional[Path], world: Optional[int], overrides: List[str] = (), data=None) -> Optional[str]:
    """What ``validate``/``train`` run before start-up: None if accepted, else the one-line error.
    Anything but UserError escapes (and fails the test)."""
    from megallama.train.ds_config import build_ds_config

    try:
        cfg = load_run_config(path, list(overrides), data=data)
        cfg.check_layout(world)
        build_ds_config(cfg, world or cfg.parallel.tp * cfg.parallel.pp)
    except UserError as exc:
        msg = str(exc)
        assert msg.strip(), "empty error message"
        assert "\n" not in msg and "\r" not in msg, f"not one line: {msg!r}"
        assert "Traceback" not in msg and "validation error" not in msg, msg  # no leaked pydantic dump
        return msg
    return None


def outcome(tree: Dict[str, Any], world: Optional[int], overrides: List[str] = (), ds_as_file: bool = False,
            as_yaml: bool = True) -> Optional[str]:
    """:func:`check` of ``tree`` written as YAML (its DeepSpeed section as a JSON file, or inline)."""
    with tempfile.TemporaryDirectory() as tmp:
        tree = copy.deepcopy(tree)
        if ds_as_file and isinstance(tree.get("deepspeed"), dict):
            ds_file = Path(tmp) / "ds.json"
            ds_file.write_text(json.dumps(tree["deepspeed"]))
            tree["deepspeed"] = str(ds_file)
        if not as_yaml:
            return check(None, world, overrides, data=tree)
        path = Path(tmp) / "run.yaml"
        path.write_text(yaml.safe_dump(tree, allow_unicode=True))
        return check(path, world, overrides)


def names_a_field(msg: str, *extra: str) -> bool:
    head = msg.split(":", 1)[0]
    return head.split(" ")[0].split(".")[0] in SECTIONS or any(e and e in msg for e in extra)


def test_base_is_valid():
    assert outcome(BASE, WORLD) is None
    assert outcome(BASE, WORLD, ds_as_file=True, as_yaml=False) is None


# ------------------------------------------------------------------------- field universe
def _model_paths(cls, prefix: str) -> List[str]:
    from pydantic import BaseModel

    out = []
    for name, field in cls.model_fields.items():
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            out += _model_paths(ann, f"{prefix}{name}.")
        elif name != "deepspeed":
            out.append(f"{prefix}{name}")
    return out


@functools.lru_cache(maxsize=None)
def field_paths() -> List[str]:
    """Every run-config field, and the DeepSpeed keys megallama or DeepSpeed validate."""
    from megallama.train.deepspeed_patches import TOP_LEVEL_KEYS
    from megallama.train.ds_config import _deepspeed_models

    paths = _model_paths(RunConfig, "") + ["model.preset"]
    paths += [f"deepspeed.{k}" for k in sorted(TOP_LEVEL_KEYS)]
    for section, model in _deepspeed_models().items():
        paths += [f"deepspeed.{section}.{k}" for k in model.model_fields]
    paths += [f"deepspeed.zero_optimization.offload_optimizer.{k}" for k in ("device", "pin_memory")]
    return paths


@functools.lru_cache(maxsize=None)
def valid_keys_at(section: str) -> frozenset:
    """Key names valid inside ``section`` (a dotted path; '' is the top level)."""
    return frozenset(p[len(section) + 1:].split(".")[0] if section else p.split(".")[0]
                     for p in field_paths() if not section or p.startswith(section + ".")) | (
        frozenset({"preset"}) if section == "model" else frozenset())


def get_node(tree, path: List[str]):
    node = tree
    for part in path:
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def set_path(tree, path: List[str], value) -> None:
    node = tree
    for part in path[:-1]:
        if not isinstance(node.get(part), dict):
            node[part] = {}
        node = node[part]
    node[path[-1]] = value


# ---------------------------------------------------------------------------- strategies
KEY_TEXT = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), min_size=1, max_size=10)
VALUES = st.one_of(
    st.none(), st.booleans(), st.integers(-3, 12), st.integers(-2**70, 2**70),
    st.floats(allow_nan=True, allow_infinity=True), st.sampled_from(["", "auto", "cpu", "none", "full", "1e-3",
                                                                    "tiny", "4", "yes", "98,1,1", "nope"]),
    KEY_TEXT, st.lists(st.integers(-2, 5), max_size=3), st.dictionaries(KEY_TEXT, st.integers(), max_size=2))


def typo(key: str, how: int, i: int) -> str:
    i = i % max(len(key), 1)
    if how == 0 and len(key) > 2:
        return key[:i] + key[i + 1:]                  # a letter dropped
    if how == 1 and len(key) > 2:
        j = min(i, len(key) - 2)
        return key[:j] + key[j + 1] + key[j] + key[j + 2:]  # two letters swapped
    if how == 2:
        return key[:i] + key[i] + key[i:]             # a letter doubled
    if how == 3 and "_" in key:
        return key.replace("_", "-", 1)               # dash for underscore
    return key + "s"


@st.composite
def mutations(draw):
    """(kind, path, value): one edit of a config tree."""
    kind = draw(st.sampled_from(["set", "set", "set", "delete", "misspell", "unknown"]))
    path = draw(st.sampled_from(field_paths()))
    if kind == "set":
        return kind, path, draw(VALUES)
    if kind == "misspell":
        return kind, path, (draw(st.integers(0, 4)), draw(st.integers(0, 30)))
    if kind == "unknown":
        return kind, path, draw(KEY_TEXT)
    return kind, path, None


def apply(tree, mutation):
    """Apply one mutation; returns (section path, key) of a key that is not valid there, or None."""
    kind, path, value = mutation
    parts = path.split(".")
    if kind == "set":
        set_path(tree, parts, value)
        return None
    if kind == "delete":
        parent = get_node(tree, parts[:-1]) if len(parts) > 1 else tree
        if isinstance(parent, dict):
            parent.pop(parts[-1], None)
        return None
    section = parts[:-1]
    parent = get_node(tree, section) if section else tree
    if not isinstance(parent, dict):
        return None
    if kind == "misspell":
        if parts[-1] not in parent:
            set_path(tree, parts, copy.deepcopy(get_node(BASE, parts)))
        bad = typo(parts[-1], *value)
    else:
        bad = value
    if bad in valid_keys_at(".".join(section)) or bad in parent:
        return None  # the "typo" is another valid key
    if ".".join(section) in ("deepspeed.pipeline", "deepspeed.tensorboard", "deepspeed.flops_profiler",
                             "deepspeed.comms_logger", "deepspeed.checkpoint", "deepspeed.data_types",
                             "deepspeed.wandb", "deepspeed.csv_monitor", "deepspeed.elasticity", "deepspeed.aio",
                             "deepspeed.compression_training", "deepspeed.autotuning", "deepspeed.data_efficiency",
                             "deepspeed.timers", "deepspeed.torch_autocast", "deepspeed.amp"):
        return None  # free-form sections DeepSpeed passes on without a key list
    if kind == "misspell":
        parent[bad] = parent.pop(parts[-1])
    else:
        parent[bad] = 1
    return section, bad


def as_override(path: str, value) -> str:
    return f"{path}={yaml.safe_dump(value, default_flow_style=True, width=10**6).strip().removesuffix('...').strip()}"


# ------------------------------------------------------------------------------ properties
@settings(FAST, max_examples=400)
@given(muts=st.lists(mutations(), min_size=1, max_size=3), world=st.sampled_from([None, 1, 2, 4, 8, 3, 0, -1]),
       ds_as_file=st.booleans())
def test_mutated_configs_pass_or_fail_in_one_line(muts, world, ds_as_file):
    tree = copy.deepcopy(BASE)
    bad = [b for b in (apply(tree, m) for m in muts) if b is not None]
    bad = [key for section, key in bad if isinstance(get_node(tree, section), dict) and key in get_node(tree, section)]
    msg = outcome(tree, world, ds_as_file=ds_as_file)
    if msg is None:
        assert not bad, f"unknown keys {bad} were accepted"
        return
    read = [next(iter(yaml.safe_load(yaml.safe_dump({k: 1}, allow_unicode=True)))) for k in bad]  # via YAML
    shown = [s for k in bad + read for s in (str(k), repr(k), str(k).replace("\n", "\\n").replace("\r", "\\r"))]
    assert names_a_field(msg, *shown), msg
    if len(muts) == 1 and shown and world in (None, 1, 2, 4):  # BASE itself is valid there
        assert any(x in msg for x in shown), (shown, msg)


@settings(FAST, max_examples=150)
@given(sets=st.lists(st.tuples(st.deferred(lambda: st.sampled_from(field_paths())), VALUES), min_size=1, max_size=3),
       junk=st.lists(st.sampled_from(["train", "=3", "train..steps=1", "data.prefixes.7=x", "model.preset.x=1",
                                      "train.steps.x=1", "deepspeed=nope.json", "parallel=3", "model=llama-7b",
                                      "data.prefixes=[a]", "data.prefixes.0.x=1", "deepspeed.zero_optimization=2",
                                      "modle.dim=3", "train.activation_checkpointing.mod=full"]), max_size=2))
def test_set_overrides_pass_or_fail_in_one_line(sets, junk):
    overrides = [as_override(p, v) for p, v in sets] + junk
    msg = outcome(BASE, WORLD, overrides=overrides)
    if msg is not None:
        assert names_a_field(msg, *[j.split("=")[0].split(".")[0] for j in junk if "=" in j]), msg


def _batch_ok(mbs, gbs, acc, tp, pp, world, stage) -> bool:
    if mbs < 1 or (gbs is not None and gbs < 1) or (acc is not None and acc < 1) or world < 1:
        return False
    if 4 % tp or pp > 4 or world % (tp * pp) or (pp > 1 and stage >= 2):
        return False  # tiny: 4 heads, 4 layers (a stage needs one); DeepSpeed's pipeline engine takes ZeRO 0/1
    dp = world // (tp * pp)
    if gbs is None:
        return True
    if acc is None:
        return gbs % (mbs * dp) == 0
    return gbs == mbs * acc * dp


@settings(FAST, max_examples=300)
@given(mbs=st.integers(-1, 6), gbs=st.one_of(st.none(), st.integers(-2, 50)),
       acc=st.one_of(st.none(), st.integers(-1, 6)),
       tp=st.sampled_from([1, 2, 3, 4]), pp=st.sampled_from([1, 2, 3, 4]), world=st.integers(-1, 17),
       stage=st.integers(0, 3), seq=st.integers(-2, 300), max_seq=st.integers(-1, 300))
def test_layout_and_batch_arithmetic_follow_the_rule(mbs, gbs, acc, tp, pp, world, stage, seq, max_seq):
    """Accepted exactly when global = micro x accumulation x dp can hold, the layout divides the
    model and the world, and the sequence fits the model; the DeepSpeed dict then agrees."""
    tree = copy.deepcopy(BASE)
    tree["train"].update(micro_batch_size=mbs, global_batch_size=gbs, grad_accum_steps=acc, seq_len=seq)
    tree["model"]["max_seq_len"] = max_seq
    tree["parallel"].update(tp=tp, pp=pp)
    tree["deepspeed"]["zero_optimization"]["stage"] = stage
    msg = outcome(tree, world, as_yaml=False)
    ok = _batch_ok(mbs, gbs, acc, tp, pp, world, stage) and 1 <= seq <= max_seq
    assert (msg is None) == ok, (msg, ok)
    if msg is not None:
        assert names_a_field(msg), msg
    if seq > max_seq >= 1 and _batch_ok(mbs, gbs, acc, tp, pp, world, stage) and seq >= 1:
        assert msg.startswith("train.seq_len") and "max_seq_len" in msg, msg


def test_batch_sizes_reach_deepspeed_consistently():
    from megallama.train.ds_config import build_ds_config

    for mbs, gbs, acc, world in [(2, 8, None, 4), (1, None, 3, 2), (4, 32, 2, 4), (3, None, None, 1)]:
        tree = copy.deepcopy(BASE)
        tree["train"].update(micro_batch_size=mbs, global_batch_size=gbs, grad_accum_steps=acc)
        ds = build_ds_config(load_run_config(data=tree), world)
        micro, accum = ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"]
        assert ds["train_batch_size"] == micro * accum * world


@pytest.mark.parametrize("edit,needle", [
    ({"deepspeed": {"zero_optimization": {"stag": 2}}},
     "deepspeed.zero_optimization.stag: unknown key; did you mean 'stage'"),
    ({"deepspeed": {"zero_optimization": {"stage": "two"}}},
     "deepspeed.zero_optimization.stage: expected 0, 1, 2 or 3"),
    ({"deepspeed": {"zero_optimization": {"stage": 1, "offload_optimizer": {"device": "gpu"}}}},
     "deepspeed.zero_optimization.offload_optimizer.device"),
    ({"deepspeed": {"zero_optimization": 2}}, "deepspeed.zero_optimization: expected a mapping"),
    ({"deepspeed": {"fp16": {"enabld": True}}}, "deepspeed.fp16.enabld: unknown key; did you mean 'enabled'"),
    ({"deepspeed": {"bf16": True}}, "deepspeed.bf16: expected a mapping"),
    ({"deepspeed": {"train_batch_size": "8"}}, "deepspeed.train_batch_size: '8' contradicts"),
    ({"deepspeed": {"steps_per_print": 0}}, "deepspeed.steps_per_print: expected a positive integer"),
    ({"deepspeed": {"zero_optimisation": {"stage": 1}}}, "did you mean 'zero_optimization'"),
    ({"deepspeed": {"activation_checkpointing": {"partition_activation": True}}},
     "deepspeed.activation_checkpointing.partition_activation: unknown key; did you mean 'partition_activations'"),
    ({"deepspeed": {"zero_optimization": {"stage": 2}}, "parallel": {"pp": 2}}, "pipeline engine supports ZeRO"),
    ({"train": {"grad_accum_steps": 0, "global_batch_size": None}}, "train.grad_accum_steps"),
    ({"train": {"steps": 0}}, "train.steps"),
    ({"train": {"log_every": 0}}, "train.log_every"),
    ({"train": {"lr": float("nan")}}, "train.lr"),
    ({"checkpoint": {"keep": 0}}, "checkpoint.keep"),
    ({"model": {"preset": "tiny", "n_kv_heads": 0}}, "model.n_kv_heads: expected a positive integer"),
    ({"model": {"preset": "../configs/models/tiny"}}, "model.preset: unknown preset"),
    ({"model": {"preset": "tiny", "norm_eps": 0}}, "model.norm_eps"),
    ({"model": {"preset": "tiny\nmodel"}}, "model.preset: unknown preset 'tiny\\nmodel'"),
])
def test_known_bad_configs(edit, needle):
    tree = copy.deepcopy(BASE)
    for section, value in edit.items():
        if section == "deepspeed":
            tree["deepspeed"] = {**copy.deepcopy(BASE["deepspeed"]), **value}
        else:
            tree[section] = {**tree[section], **value} if section != "model" else value
    msg = outcome(tree, WORLD, as_yaml=False)
    assert msg is not None and needle in msg, msg


def test_world_size_must_be_positive():
    assert outcome(BASE, 0).startswith("parallel: world size must be a positive integer")
    assert outcome(BASE, -2).startswith("parallel: world size must be a positive integer")


@pytest.mark.parametrize("text,needle", [
    ("- model\n- tiny\n", "expected a mapping at the top level, got list"),
    ("just a string\n", "expected a mapping at the top level, got str"),
    ("model: tiny\ndeepspeed: ds.json\n", "deepspeed:"),
])
def test_odd_files(tmp_path, text, needle):
    (tmp_path / "ds.json").write_bytes(b"\xff\xfe\x00garbage")
    path = tmp_path / "run.yaml"
    path.write_text(text)
    with pytest.raises(UserError) as exc:
        load_run_config(path)
    assert needle in str(exc.value) and "\n" not in str(exc.value)


# ---------------------------------------------------------------------------------- the CLI
def _cli(capsys, *argv):
    from megallama.cli import main

    capsys.readouterr()
    rc = main([str(a) for a in argv])
    out = capsys.readouterr()
    return rc, out.out, out.err


@settings(FAST, max_examples=40, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(mut=mutations(), world=st.sampled_from([None, 4, 3, 0]))
def test_validate_cli_is_one_line(capsys, mut, world):
    tree = copy.deepcopy(BASE)
    apply(tree, mut)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "run.yaml"
        path.write_text(yaml.safe_dump(tree, allow_unicode=True))
        args = ["validate", path] + (["--world-size", world] if world is not None else [])
        rc, out, err = _cli(capsys, *args)
        assert sorted(os.listdir(tmp)) == ["run.yaml"]
        expected = check(path, world)
    if expected is None:
        assert rc == 0 and out.startswith("ok: ") and not err, (out, err)
    else:
        assert rc == 2 and not out and err == f"megallama validate: error: {expected}\n", err
    assert not (ROOT / BASE["run_dir"]).exists()


def _run(args, env_extra=None, cwd=None):
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", **(env_extra or {}))
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        if not env_extra or key not in env_extra:
            env.pop(key, None)
    return subprocess.run([sys.executable, "-m", "megallama", *map(str, args)], capture_output=True, text=True,
                          env=env, cwd=cwd or ROOT, timeout=180)


def test_train_and_validate_processes_print_one_line_and_write_nothing(tmp_path):
    """Real processes: launcher world sizes that cannot work fail before start-up, in one line on
    stderr, and the existing run directory (metrics, checkpoints) is untouched."""
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints" / "step00000002").mkdir(parents=True)
    (run_dir / "metrics.jsonl").write_text('{"step": 1}\n')
    (run_dir / "checkpoints" / "latest").write_text("step00000002")
    before = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    cfg = copy.deepcopy(BASE)
    cfg["run_dir"] = str(run_dir)
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    cases = [
        (["train", path], {"RANK": "0", "WORLD_SIZE": "3", "LOCAL_RANK": "0"},
         "parallel: world size 3 is not a multiple of tp x pp = 2 x 1", ["--set", "parallel.tp=2"]),
        (["train", path], {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0"},
         "deepspeed.zero_optimization.stag: unknown key; did you mean 'stage'",
         ["--set", "deepspeed.zero_optimization.stag=2", "--set", "train.global_batch_size=4"]),
        (["validate", path, "--world-size", "6"], None, "train.global_batch_size: 8 is not divisible", []),
    ]
    for args, env, needle, extra in cases:
        proc = _run(args + extra, env)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and len(lines) == 1 and needle in lines[0], proc.stderr
        assert "Traceback" not in proc.stderr + proc.stdout
    assert {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()} == before
