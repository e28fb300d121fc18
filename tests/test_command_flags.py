"""Flags of convert/eval/preprocess take effect or are refused in one line; "latest" is never
silently another step; stdout of ``--json`` is the JSON alone; a refused pickle is our one line;
SIGTERM cleans up like Ctrl-C; a run continues from an imported Hugging Face checkpoint."""
import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch

from megallama import LlamaForCausalLM, ModelConfig
from megallama.checkpoint import save_consolidated
from megallama.errors import UserError
from megallama.parallel import ParallelState
from tests.conftest_data import assert_one_line_error, cli, sample_texts, tokenizer_path, write_docs, write_jsonl
from tests.dist_utils import sigint_as_a_terminal_has
from tests.train_utils import ROOT, env, run_train, tiny_run_config


def _megallama(*argv, timeout=120):
    return subprocess.run([sys.executable, "-m", "megallama", *map(str, argv)], capture_output=True, text=True,
                          env=env(), cwd=ROOT, timeout=timeout)


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """A consolidated checkpoint, token files for it, and a training checkpoint made from it."""
    from megallama.data.tokenizer import Tokenizer

    root = tmp_path_factory.mktemp("flags")
    tok = tokenizer_path(320)
    cfg = ModelConfig.preset("tiny", vocab_size=320, n_layers=1, max_seq_len=64)
    save_consolidated(LlamaForCausalLM(cfg, ParallelState(), seed=1).state_dict(), cfg, root / "cons")
    shutil.copyfile(tok, root / "cons" / "tokenizer.model")
    t = Tokenizer(tok)
    write_docs(str(root / "tokens"), [t.encode(x, eos=True) for x in sample_texts(60, seed=3)])
    assert main_ok(["convert", "--input", root / "cons", "--output", root / "train", "--tp", "1"])
    assert (root / "train" / "latest").is_file()  # an explicit --tp 1 makes a training checkpoint
    return root


def main_ok(argv) -> bool:
    from megallama.cli import main

    return main([str(a) for a in argv]) == 0


def test_to_hf_honours_dtype_for_training_and_consolidated_inputs(ckpts, tmp_path):
    from safetensors import safe_open

    for src in ("train", "cons"):
        out = tmp_path / f"hf_{src}"
        assert main_ok(["convert", "--input", ckpts / src, "--output", out, "--to", "hf", "--dtype", "bfloat16"])
        assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
        with safe_open(str(out / "model.safetensors"), "pt") as f:
            assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}, src


@pytest.mark.parametrize("src,extra,needle", [
    ("cons", ["--to", "hf", "--tp", "2"], "--tp/--pp: a Hugging Face export is unsharded"),
    ("train", ["--to", "hf", "--pp", "2"], "--tp/--pp: a Hugging Face export is unsharded"),
    ("train", ["--dtype", "bfloat16"], "--dtype: a training checkpoint keeps fp32"),
    ("cons", ["--tp", "2", "--dtype", "float16"], "--dtype: a training checkpoint keeps fp32"),
    ("cons", ["--from", "hf", "--tp", "2"], "--tp/--pp: only for megallama checkpoints"),
])
def test_flags_that_cannot_apply_are_refused(ckpts, tmp_path, capsys, src, extra, needle):
    rc, _, err = cli(capsys, "convert", "--input", ckpts / src, "--output", tmp_path / "out", *extra)
    assert_one_line_error(rc, err, needle)
    assert not (tmp_path / "out").exists() and os.listdir(tmp_path) == []


@pytest.fixture
def broken_latest(ckpts, tmp_path):
    """``latest`` names step 5, whose weights file is gone; step 0 is complete."""
    d = tmp_path / "checkpoints"
    shutil.copytree(ckpts / "train", d)
    shutil.copytree(d / "step00000000", d / "step00000005")
    (d / "latest").write_text("step00000005")
    missing = d / "step00000005" / "universal" / "pp00-tp00.safetensors"
    missing.unlink()
    return d, missing


def test_incomplete_latest_is_refused_by_convert_and_eval(broken_latest, ckpts, tmp_path, capsys):
    d, missing = broken_latest
    for argv in (["convert", "--input", d, "--output", tmp_path / "out"],
                 ["convert", "--input", d, "--output", tmp_path / "out", "--to", "hf"],
                 ["eval", "--checkpoint", d, "--data", ckpts / "tokens", "--seq-len", "16"]):
        rc, out, err = cli(capsys, *argv)
        assert_one_line_error(rc, err, str(missing), "latest checkpoint is incomplete", str(d / "step00000000"))
        assert out == "" and not (tmp_path / "out").exists()
    # naming the older step is the explicit way to use it
    assert main_ok(["convert", "--input", d / "step00000000", "--output", tmp_path / "out", "--to", "hf"])


def test_eval_json_stdout_is_exactly_the_json(ckpts):
    r = _megallama("eval", "--checkpoint", ckpts / "cons", "--data", ckpts / "tokens", "--seq-len", "16",
                   "--max-samples", "4", "--json")
    assert r.returncode == 0, r.stderr[-2000:]
    result = json.loads(r.stdout)  # the whole of stdout: no library log line before or after it
    assert result["samples"] == 4 and r.stdout.count("\n") == 1


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _protocol4_pickle(path: Path, marker: Path) -> None:
    """A raw pickle (protocol 4, not torch.save's 2): torch warns about it before refusing."""
    path.write_bytes(pickle.dumps({"tok_embeddings.weight": _Payload(marker)}, protocol=4))


def test_refused_pickle_is_our_one_line_only(tmp_path):
    marker = tmp_path / "pwned"
    meta = tmp_path / "meta"
    meta.mkdir()
    (meta / "params.json").write_text(json.dumps(dict(dim=64, n_layers=1, n_heads=4, vocab_size=96)))
    _protocol4_pickle(meta / "consolidated.00.pth", marker)
    r = _megallama("convert", "--from", "meta", "--input", meta, "--output", tmp_path / "out")
    # a raw pickle is not torch's zip format: refused before any unpickling, as a legacy file
    # (it could not be memory-mapped and checked first), in our words only
    assert_one_line_error(r.returncode, r.stderr, "consolidated.00.pth", "legacy", "not loaded")
    assert "file an issue" not in r.stderr.lower() and "weights_only" not in r.stderr
    assert not marker.exists() and not (tmp_path / "out").exists()


def test_deepspeed_file_refusal_warns_nothing(tmp_path):
    from megallama.train.unpickle_gate import check_safe_to_unpickle

    _protocol4_pickle(tmp_path / "mp_rank_00_model_states.pt", tmp_path / "pwned")
    with warnings.catch_warnings(record=True) as caught, pytest.raises(UserError) as exc:
        warnings.simplefilter("always")
        check_safe_to_unpickle(tmp_path)
    assert caught == [] and "Unsupported" in str(exc.value) and "file an issue" not in str(exc.value).lower()
    assert not (tmp_path / "pwned").exists()


@pytest.mark.parametrize("sig,workers", [(signal.SIGTERM, 2), (signal.SIGINT, 1)])
def test_signal_during_preprocess_leaves_no_debris(tmp_path, sig, workers):
    src = write_jsonl(tmp_path / "c.jsonl", sample_texts(40_000))
    out = tmp_path / "out"
    out.mkdir()
    proc = subprocess.Popen([sys.executable, "-m", "megallama", "preprocess", "--input", str(src), "--tokenizer",
                             tokenizer_path(320), "--output-prefix", str(out / "c"), "--workers", str(workers),
                             "--no-progress"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env(),
                            cwd=ROOT, preexec_fn=sigint_as_a_terminal_has)
    deadline = time.monotonic() + 120
    while not any(".tmp-" in p.name for p in out.iterdir()):  # the writer has started
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.01)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == (143 if sig == signal.SIGTERM else 130), err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert os.listdir(out) == []


def test_training_continues_from_an_imported_hf_checkpoint(tmp_path, data_cache):
    """An HF export spells n_kv_heads out and carries its own initializer_range: neither makes the
    imported weights another model, so ``checkpoint.load`` of them must be accepted."""
    from megallama.checkpoint.hf import save_hf
    from megallama.config import load_run_config

    cfg_path = tiny_run_config(tmp_path, data_cache)
    model_cfg = load_run_config(str(cfg_path), []).model
    hf_cfg = model_cfg.model_copy(update={"init_std": 0.05})
    save_hf(LlamaForCausalLM(hf_cfg, ParallelState(), seed=3).state_dict(), hf_cfg, tmp_path / "hf")
    assert main_ok(["convert", "--from", "hf", "--input", tmp_path / "hf", "--output", tmp_path / "ours"])
    assert main_ok(["convert", "--input", tmp_path / "ours", "--output", tmp_path / "ckpt", "--tp", "1"])
    report = run_train(cfg_path, ["train.steps=1", "train.warmup_steps=0", f"checkpoint.load={tmp_path / 'ckpt'}",
                                  f"run_dir={tmp_path / 'run'}"])
    assert "resuming from" in report["stderr"] and report["steps"] == 1
