"""No code execution from files: configs go through ``yaml.safe_load``, weights through
safetensors or ``torch.load(weights_only=True)``, and nothing calls eval/exec or a shell.

Two kinds of evidence: a scan of the source (every call site, by its AST), and live payloads:
a YAML file with Python tags and a pickle whose ``__reduce__`` runs a shell command, fed to every
loader of YAML and every ``torch.load`` site, each leaving the marker file the payload would
create absent. Controls show the payloads are live (an unsafe load does create the marker).
``tests/test_checkpoint_safety.py`` covers the Meta ``.pth`` loader and HF ``pytorch_model.bin``.
"""
from __future__ import annotations

import ast
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Dict, List

import pytest
import torch
import yaml

from megallama.errors import UserError
from megallama.parallel.random import RNGStatesTracker

ROOT = Path(__file__).resolve().parents[1]
SCANNED = ("megallama", "tools")


# ------------------------------------------------------------------------------ source scan
UNSAFE_CALLS = {
    "eval": "eval", "exec": "exec", "compile": "compile() of source text", "__import__": "__import__",
    "os.system": "a shell", "os.popen": "a shell", "subprocess.getoutput": "a shell",
    "subprocess.getstatusoutput": "a shell", "pickle.load": "unpickling", "pickle.loads": "unpickling",
    "pickle.Unpickler": "unpickling", "cPickle.load": "unpickling", "cPickle.loads": "unpickling",
    "dill.load": "unpickling", "dill.loads": "unpickling", "cloudpickle.load": "unpickling",
    "cloudpickle.loads": "unpickling", "joblib.load": "unpickling", "marshal.load": "unmarshalling",
    "marshal.loads": "unmarshalling", "shelve.open": "unpickling", "pandas.read_pickle": "unpickling",
    "yaml.unsafe_load": "unsafe YAML", "yaml.full_load": "unsafe YAML", "yaml.unsafe_load_all": "unsafe YAML",
    "yaml.full_load_all": "unsafe YAML",
}
UNSAFE_NAMES = {"yaml.Loader", "yaml.UnsafeLoader", "yaml.FullLoader", "yaml.CLoader", "yaml.CUnsafeLoader",
                "yaml.CFullLoader"}


def _imports(tree: ast.AST) -> Dict[str, str]:
    """Local name -> dotted origin, for ``import a.b as c`` and ``from a import b as c``."""
    names: Dict[str, str] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                top = alias.name.split(".")[0]
                names[alias.asname or top] = alias.name if alias.asname else top
        elif isinstance(node, ast.ImportFrom) and node.module:
            for alias in node.names:
                names[alias.asname or alias.name] = f"{node.module}.{alias.name}"
    return names


def _dotted(node: ast.AST, names: Dict[str, str]) -> str:
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name):
        return ""
    head = names.get(node.id, node.id)
    return ".".join([head] + parts[::-1])


def _kw(call: ast.Call, name: str):
    return next((k.value for k in call.keywords if k.arg == name), None)


def _is_true(node) -> bool:
    return isinstance(node, ast.Constant) and node.value is True


def scan(source: str, filename: str = "<src>") -> List[str]:
    """Every unsafe call site in ``source``, as 'file:line: what'."""
    tree = ast.parse(source, filename)
    names = _imports(tree)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Attribute, ast.Name)) and _dotted(node, names) in UNSAFE_NAMES:
            found.append(f"{filename}:{node.lineno}: {_dotted(node, names)}")
        if not isinstance(node, ast.Call):
            continue
        target = _dotted(node.func, names)
        where = f"{filename}:{node.lineno}: {target or ast.unparse(node.func)}"
        if isinstance(node.func, ast.Name) and node.func.id in ("eval", "exec", "compile", "__import__") \
                and node.func.id not in names:
            found.append(f"{where} ({UNSAFE_CALLS[node.func.id]})")
        elif target in UNSAFE_CALLS and target.split(".")[0] not in ("eval", "exec", "compile", "__import__"):
            found.append(f"{where} ({UNSAFE_CALLS[target]})")
        if _is_true(_kw(node, "shell")):
            found.append(f"{where} (shell=True)")
        if target in ("yaml.load", "yaml.load_all"):
            loader = _kw(node, "Loader") or (node.args[1] if len(node.args) > 1 else None)
            if loader is None or _dotted(loader, names) not in ("yaml.SafeLoader", "yaml.CSafeLoader"):
                found.append(f"{where} (yaml.load without SafeLoader)")
        if target == "torch.load" and not _is_true(_kw(node, "weights_only")):
            found.append(f"{where} (torch.load without weights_only=True)")
        if target in ("numpy.load", "np.load") and _is_true(_kw(node, "allow_pickle")):
            found.append(f"{where} (numpy.load with allow_pickle=True)")
    return found


def test_the_scanner_finds_each_unsafe_pattern():
    bad = '''
import pickle, yaml, subprocess, os
import torch as T
import numpy as np
from pickle import loads as L
eval("1"); exec("x = 1")
subprocess.run("ls", shell=True)
os.system("ls")
yaml.load(text)
yaml.load(text, Loader=yaml.Loader)
yaml.full_load(text)
pickle.load(f)
L(b"")
T.load("x.pt")
T.load("x.pt", weights_only=False)
np.load("a.npy", allow_pickle=True)
'''
    found = scan(bad)
    for needle in ("eval", "exec", "shell=True", "os.system", "yaml.load without SafeLoader", "yaml.Loader",
                   "yaml.full_load", "pickle.load", "pickle.loads", "torch.load without weights_only=True",
                   "allow_pickle=True"):
        assert any(needle in f for f in found), (needle, found)
    assert len([f for f in found if "torch.load" in f]) == 2
    ok = '''
import yaml, torch, subprocess
yaml.safe_load(text)
yaml.load(text, Loader=yaml.SafeLoader)
torch.load("x.pt", map_location="cpu", weights_only=True)
subprocess.run(["ls", "-l"], check=True)
model.eval()
torch.compile(model)
'''
    assert scan(ok) == []


def test_no_unsafe_call_in_the_source():
    found = []
    for top in SCANNED:
        for path in sorted((ROOT / top).rglob("*.py")):
            found += scan(path.read_text(), str(path.relative_to(ROOT)))
    assert not found, "\n".join(found)


# ---------------------------------------------------------------------------------- YAML
def _yaml_payloads(marker: Path) -> Dict[str, str]:
    cmd = f"touch {marker}"
    return {
        "apply": f"!!python/object/apply:os.system ['{cmd}']\n",
        "nested": f"model: tiny\ntrain: !!python/object/apply:os.system ['{cmd}']\n",
        "new": f"model: !!python/object/new:os.system ['{cmd}']\n",
        "name": "model: !!python/name:os.system\n",
        "module": "model: !!python/module:os\n",
        "run_dir": f"run_dir: !!python/object/apply:subprocess.check_call [['touch', '{marker}']]\nmodel: tiny\n",
    }


def test_the_yaml_payload_is_live(tmp_path):
    marker = tmp_path / "pwned"
    yaml.unsafe_load(_yaml_payloads(marker)["apply"])
    assert marker.exists()


def _cli(capsys, *argv):
    import torch.distributed as dist

    from megallama.cli import main

    capsys.readouterr()
    try:
        rc = main([str(a) for a in argv])
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    out = capsys.readouterr()
    return rc, out.out, out.err


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from megallama import LlamaForCausalLM, ModelConfig
    from megallama.checkpoint import save_consolidated
    from megallama.parallel import ParallelState

    cfg = ModelConfig.preset("tiny", vocab_size=320, n_layers=1, max_seq_len=64)
    out = tmp_path_factory.mktemp("nce") / "ckpt"
    save_consolidated(LlamaForCausalLM(cfg, ParallelState(), seed=0).state_dict(), cfg, out)
    return out


def _one_process_group(timeout_s: int = 300, info=None):
    """eval starts its group before reading --config; a plain one-rank gloo group stands in for
    DeepSpeed's comm start-up (whose op build can wait on a lock other runs hold)."""
    import torch.distributed as dist

    from megallama.train.distributed import detect_launcher

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    return info or detect_launcher()


def _loaders(config: Path, checkpoint: Path, data: Path):
    """Every command that reads a YAML the user names (its argv)."""
    return {
        "validate": ["validate", config],
        "train": ["train", config],
        "describe": ["describe", "--model", config],
        "plan --config": ["plan", "--config", config, "--gpus", "8", "--gpu", "a100-80gb"],
        "estimate --config": ["estimate", "--config", config],
        "finetune": ["finetune", config, "--pretrained", checkpoint, "--data", data],
        "profile": ["profile", config],
        "eval --config": ["eval", "--checkpoint", checkpoint, "--config", config],
    }


@pytest.mark.parametrize("payload", sorted(_yaml_payloads(Path("x"))))
def test_yaml_with_python_tags_is_refused_by_every_loader(tmp_path, capsys, monkeypatch, checkpoint, payload):
    from megallama.cli import build_parser

    for key, value in dict(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1").items():
        monkeypatch.setenv(key, value)
    from tests.dist_utils import free_port

    monkeypatch.setenv("MASTER_PORT", str(free_port()))
    monkeypatch.setattr("megallama.train.distributed.init_distributed", _one_process_group)
    monkeypatch.chdir(tmp_path)
    marker = tmp_path / "pwned"
    config = tmp_path / "evil.yaml"
    config.write_text(_yaml_payloads(marker)[payload])
    data = tmp_path / "docs.jsonl"
    data.write_text('{"text": "a", "label": 0}\n')
    commands = set(build_parser()._subparsers._group_actions[0].choices)
    loaders = _loaders(config, checkpoint, data)
    if payload != "apply":  # every loader reads YAML the same way: the other tags through two of them
        loaders = {k: v for k, v in loaders.items() if k in ("validate", "plan --config")}
    for name, argv in loaders.items():
        if argv[0] not in commands:
            continue
        rc, out, err = _cli(capsys, *argv)
        lines = err.strip().splitlines()
        assert rc == 2 and len(lines) == 1, (name, err)
        assert "evil.yaml" in lines[0] and "not valid YAML" in lines[0], (name, lines)
        assert not marker.exists(), name
    # a tag in a --set value is read as a plain string, never constructed
    (tmp_path / "ok.yaml").write_text("model: tiny\n")
    rc, out, err = _cli(capsys, "validate", tmp_path / "ok.yaml", "--set",
                        f"run_dir=!!python/object/apply:os.system ['touch {marker}']")
    assert rc == 0 and not marker.exists(), err


def test_presets_are_names_not_paths(tmp_path):
    """A model preset never reads a file the user names (no path escapes the package)."""
    from megallama.config import ConfigError, ModelConfig

    evil = tmp_path / "evil.yaml"
    evil.write_text(_yaml_payloads(tmp_path / "pwned")["apply"])
    for name in (str(evil.with_suffix("")), f"../../../../../../..{evil.with_suffix('')}"):
        with pytest.raises(ConfigError, match="unknown preset"):
            ModelConfig.preset(name)
    assert not (tmp_path / "pwned").exists()


# ---------------------------------------------------------------------------------- pickles
class Payload:
    """Unpickling this runs ``touch MARKER`` in a shell: what a malicious checkpoint would do."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_the_pickle_payload_is_live(tmp_path):
    marker = tmp_path / "pwned"
    torch.save({"cpu": Payload(marker)}, tmp_path / "x.pt")
    torch.load(tmp_path / "x.pt", weights_only=False)
    assert marker.exists()


def _rng_file(tmp_path: Path, marker: Path) -> Path:
    torch.save({"cpu": Payload(marker)}, tmp_path / "rng_rank00000.pt")
    return tmp_path


def test_training_rng_file_never_unpickles_code(tmp_path, monkeypatch):
    """``megallama.train.checkpoint.load_rng`` (each rank's RNG state on resume)."""
    from megallama.train import checkpoint as ckpt

    monkeypatch.setattr(ckpt.dist, "get_rank", lambda: 0)
    marker = tmp_path / "pwned"
    with pytest.raises(Exception):
        ckpt.load_rng(_rng_file(tmp_path, marker), RNGStatesTracker())
    assert not marker.exists()


def test_training_rng_file_refusal_is_one_line(tmp_path, monkeypatch):
    from megallama.train import checkpoint as ckpt

    monkeypatch.setattr(ckpt.dist, "get_rank", lambda: 0)
    with pytest.raises(UserError, match="rng_rank00000.pt"):
        ckpt.load_rng(_rng_file(tmp_path, tmp_path / "pwned"), RNGStatesTracker())


def test_every_checkpoint_loader_refuses_a_pickle(tmp_path, checkpoint):
    """``load_checkpoint`` (behind eval, generate, finetune --pretrained, convert, from_pretrained)
    on each kind of directory holding a malicious pickle where weights would be."""
    from megallama.checkpoint.pretrained import load_checkpoint

    marker = tmp_path / "pwned"
    cons = tmp_path / "cons"
    shutil.copytree(checkpoint, cons)
    torch.save({"tok_embeddings.weight": Payload(marker)}, cons / "model.safetensors")
    meta = tmp_path / "meta"
    meta.mkdir()
    (meta / "params.json").write_text(json.dumps(dict(dim=128, n_layers=1, n_heads=4, vocab_size=320)))
    torch.save({"tok_embeddings.weight": Payload(marker)}, meta / "consolidated.00.pth")
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text(json.dumps(dict(model_type="llama", hidden_size=128, intermediate_size=352,
                                                    num_hidden_layers=1, num_attention_heads=4, vocab_size=320)))
    torch.save({"lm_head.weight": Payload(marker)}, hf / "model.safetensors")
    torch.save({"lm_head.weight": Payload(marker)}, hf / "pytorch_model.bin")
    for path in (cons, meta, hf):
        with pytest.raises(UserError) as exc:
            load_checkpoint(path)
        assert "\n" not in str(exc.value) and str(path) in str(exc.value)
        assert not marker.exists(), path


def test_resuming_a_crafted_training_checkpoint_runs_no_code(tmp_path):
    from megallama.config import load_run_config
    from megallama.data.tokenizer import Tokenizer
    from megallama.train.checkpoint import write_manifest
    from tests.conftest_data import sample_texts, tokenizer_path, write_docs

    marker = tmp_path / "pwned"
    tok = tmp_path / "tok.model"
    shutil.copyfile(tokenizer_path(320), tok)
    t = Tokenizer(tok)
    write_docs(str(tmp_path / "tokens"), [t.encode(x, eos=True) for x in sample_texts(40, seed=3)])
    tag = tmp_path / "evil" / "step00000001"
    cfg = {"run_dir": str(tmp_path / "run"),
           "model": {"preset": "tiny", "vocab_size": 320, "n_layers": 1, "max_seq_len": 32},
           "train": {"steps": 2, "seq_len": 16, "micro_batch_size": 2, "global_batch_size": 2, "warmup_steps": 0},
           "data": {"prefixes": [str(tmp_path / "tokens")], "tokenizer": str(tok), "split": "1"},
           "checkpoint": {"every": 0, "load": str(tag)}, "deepspeed": str(ROOT / "ds_configs" / "zero0.json")}
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(cfg))
    model = load_run_config(tmp_path / "run.yaml").model.model_dump()
    tag.mkdir(parents=True)
    torch.save({"module": Payload(marker)}, tag / "mp_rank_00_model_states.pt")
    (tag / "meta.json").write_text(json.dumps({"model": model, "tp": 1, "pp": 1, "dp": 1, "zero": 0,
                                               "precision": "fp32", "world_size": 1, "step": 1,
                                               "consumed_samples": 2}))
    write_manifest(tag)  # whoever crafts the files can write a matching manifest
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    proc = subprocess.run([sys.executable, "-m", "megallama", "train", str(tmp_path / "run.yaml")],
                          capture_output=True, text=True, cwd=ROOT, timeout=300,
                          env=dict(env, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1"))
    assert not marker.exists(), "resuming ran the checkpoint's code"
    errors = [ln for ln in proc.stderr.splitlines() if "megallama train: error" in ln]
    assert proc.returncode == 2 and len(errors) == 1 and "mp_rank_00_model_states.pt" in errors[0], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr


# ------------------------------------------------- every file of every training checkpoint kind
# One tiny 1-step checkpoint per kind of file set DeepSpeed and megallama write: ZeRO-0 model
# states; bf16 ZeRO-2 optimizer partitions; ZeRO-3 parameter shards; the pipeline's layer files
# with fp32 ZeRO-1 partitions (ZeRO-1 and -2 name their files alike); each with megallama's
# universal/, RNG and meta files. Each file is then swapped for a pickle whose __reduce__ runs a
# command. fp16 is not among them: DeepSpeed's CPU accelerator does not support it.
KINDS = {"zero0": ("zero0.json", 1, []), "bf16-zero2": ("bf16_zero1.json", 1, ["deepspeed.zero_optimization.stage=2"]),
         "zero3": ("zero3.json", 1, []), "pipeline": ("pipeline.json", 2, ["parallel.pp=2"])}
# files DeepSpeed's own universal loader would read (deepspeed.checkpoint.load_universal)
DEEPSPEED_UNIVERSAL = ("zero/optimizer_state.pt", "zero/tok_embeddings.weight/fp32.pt",
                       "zero/tok_embeddings.weight/exp_avg.pt")


@pytest.fixture(scope="module")
def training_checkpoints(tmp_path_factory, data_cache):
    from tests.train_utils import run_train, tiny_run_config

    tmp = tmp_path_factory.mktemp("kinds")
    cfg = tiny_run_config(tmp, data_cache, steps=1, warmup_steps=0, seq_len=32, micro_batch_size=2, global_batch_size=2)
    tags = {}
    for kind, (ds, world, extra) in KINDS.items():
        run_train(cfg, [f"run_dir={tmp / kind}", "checkpoint.every=1", f"deepspeed={ROOT / 'ds_configs' / ds}"]
                  + extra, world=world)
        tags[kind] = tmp / kind / "checkpoints" / "step00000001"
    return cfg, tags


def _load_like_resume(tag: Path) -> None:
    """Everything resuming (either layout) or consolidating reads from a checkpoint, in order."""
    from megallama.train import checkpoint as ckpt
    from megallama.train.universal import UniversalReader
    from megallama.train.unpickle_gate import check_safe_to_unpickle

    problem = ckpt.verify(tag)
    if problem:
        raise UserError(problem)
    check_safe_to_unpickle(tag)  # the gate before DeepSpeed's engine.load_checkpoint
    ckpt.read_meta(tag)
    reader = UniversalReader(tag / "universal")
    for name in reader.names():
        reader.full(name)
    for rng in sorted(tag.glob("rng_rank*.pt")):
        ckpt.dist.get_rank = lambda r=int(rng.stem[-5:]): r
        ckpt.load_rng(tag, RNGStatesTracker())


def test_deepspeeds_loader_would_run_the_payload(tmp_path):
    """Control: the loader DeepSpeed resumes with does execute a pickle (so the gate matters)."""
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    marker = tmp_path / "pwned"
    torch.save({"optimizer_state_dict": Payload(marker)}, tmp_path / "x.pt")
    TorchCheckpointEngine().load(str(tmp_path / "x.pt"), map_location="cpu")
    assert marker.exists()


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_a_payload_in_any_checkpoint_file_never_runs(kind, training_checkpoints, tmp_path, monkeypatch):
    from megallama.train import checkpoint as ckpt

    monkeypatch.setattr(ckpt.dist, "get_rank", ckpt.dist.get_rank)
    tag = tmp_path / "step00000001"
    shutil.copytree(training_checkpoints[1][kind], tag)
    _load_like_resume(tag)  # intact, it loads
    marker = tmp_path / "pwned"
    targets = sorted(str(p.relative_to(tag)) for p in tag.rglob("*") if p.is_file() and p.name != "manifest.json")
    assert len(targets) >= 6 and any(t.endswith(".pt") for t in targets), targets
    for rel in targets + list(DEEPSPEED_UNIVERSAL):
        path = tag / rel
        original = path.read_bytes() if path.exists() else None
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"state": Payload(marker)}, path)
        ckpt.write_manifest(tag)  # whoever crafts the files can write a matching manifest
        with pytest.raises(UserError) as exc:
            _load_like_resume(tag)
        assert not marker.exists(), f"{kind}: {rel} ran its payload"
        assert "\n" not in str(exc.value) and path.name in str(exc.value), (rel, str(exc.value))
        if original is None:
            shutil.rmtree(tag / "zero")
        else:
            path.write_bytes(original)
    ckpt.write_manifest(tag)
    _load_like_resume(tag)


def test_resume_with_a_payload_in_deepspeeds_own_files_runs_no_code(training_checkpoints, tmp_path):
    """End to end: `train` resuming a ZeRO-3 checkpoint whose optimizer partition (read by
    DeepSpeed's unrestricted torch.load) and universal zero/ state hold payloads."""
    from megallama.train.checkpoint import write_manifest

    cfg, tags = training_checkpoints
    marker = tmp_path / "pwned"
    tag = tmp_path / "ckpt" / "step00000001"
    shutil.copytree(tags["zero3"], tag)
    (tag.parent / "latest").write_text(tag.name)
    evil = tag / "zero" / "optimizer_state.pt"
    evil.parent.mkdir()
    torch.save({"optimizer_state_dict": Payload(marker)}, evil)
    write_manifest(tag)
    base = [sys.executable, "-m", "megallama", "train", str(cfg), "--set", f"run_dir={tmp_path / 'run'}",
            "--set", f"checkpoint.load={tag.parent}", "--set", "train.steps=2",
            "--set", f"deepspeed={ROOT / 'ds_configs' / 'zero3.json'}"]
    from tests.train_utils import env

    proc = subprocess.run(base, capture_output=True, text=True, cwd=ROOT, timeout=300, env=env())
    assert not marker.exists(), "resuming ran the checkpoint's code"
    errors = [ln for ln in proc.stderr.splitlines() if "megallama train: error" in ln]
    assert proc.returncode == 2 and len(errors) == 1 and "zero/optimizer_state.pt" in errors[0], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr


def test_deepspeeds_universal_loader_is_refused(training_checkpoints):
    """`deepspeed.checkpoint.load_universal` would have DeepSpeed unpickle zero/ itself: refused
    by validate and train (both build the DeepSpeed config through the same check)."""
    from megallama.config import ConfigError, load_run_config
    from megallama.train.ds_config import build_ds_config

    for value in ("true", "1", "'yes'"):
        cfg = load_run_config(training_checkpoints[0], [f"deepspeed.checkpoint.load_universal={value}"])
        with pytest.raises(ConfigError, match="deepspeed.checkpoint.load_universal: .* is refused"):
            build_ds_config(cfg, 1)
    build_ds_config(load_run_config(training_checkpoints[0], ["deepspeed.checkpoint.load_universal=false"]), 1)


def _gate_two_ranks(rank, world, tag):
    from megallama.train.resume import _gate_on_every_rank

    try:
        _gate_on_every_rank(Path(tag))
    except UserError as exc:
        return str(exc), getattr(exc, "same_on_every_rank", False)
    return None, False


def test_the_unpickle_gate_is_shared_by_the_ranks_and_refuses_on_every_one(tmp_path):
    """Each rank opens a disjoint share of the files (no rank opens every file while the others
    wait), and a crafted file in any share is every rank's one-line refusal, nothing executed."""
    from megallama.train.unpickle_gate import _files_under, check_safe_to_unpickle
    from tests.dist_utils import run_distributed

    marker = tmp_path / "pwned"
    tag = tmp_path / "step00000001"
    tag.mkdir()
    for i in range(5):
        torch.save({"w": torch.zeros(2)}, tag / f"layer_{i:02d}-model_states.pt")
    files = _files_under(tag)
    shares = [files[r::2] for r in range(2)]
    assert sorted(shares[0] + shares[1]) == files and not set(shares[0]) & set(shares[1])
    check_safe_to_unpickle(tag, 1, 2)
    torch.save({"w": Payload(marker)}, shares[1][0])   # a crafted file in rank 1's share only
    check_safe_to_unpickle(tag, 0, 2)                   # rank 0 never opens it...
    out = run_distributed(_gate_two_ranks, 2, str(tag))
    assert out[1] and f"{shares[1][0]}: refusing to unpickle it" in out[0]   # ...yet refuses with rank 1
    assert not marker.exists()
