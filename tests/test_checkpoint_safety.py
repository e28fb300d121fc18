"""No loader unpickles arbitrary objects: a crafted pickle that would run a shell command is
refused with one line (exit 2) and the command never runs."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megallama.errors import UserError

ROOT = Path(__file__).resolve().parent.parent


class Payload:
    """Unpickling this calls os.system(command): what a malicious checkpoint would do."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


def write_malicious_meta(directory: Path, marker: Path) -> Path:
    directory.mkdir()
    (directory / "params.json").write_text(json.dumps(dict(dim=64, n_layers=1, n_heads=4, vocab_size=96)))
    torch.save({"tok_embeddings.weight": torch.zeros(96, 64), "norm.weight": Payload(f"touch {marker}")},
               directory / "consolidated.00.pth")
    return directory


def test_the_payload_is_live(tmp_path):
    """Control: an unrestricted load really runs the command (so the refusal below means something)."""
    marker = tmp_path / "pwned-control"
    ckpt = write_malicious_meta(tmp_path / "meta", marker)
    torch.load(ckpt / "consolidated.00.pth", weights_only=False)
    assert marker.exists()


def test_convert_refuses_malicious_pickle(tmp_path):
    marker = tmp_path / "pwned"
    ckpt = write_malicious_meta(tmp_path / "meta", marker)
    proc = subprocess.run([sys.executable, "-m", "megallama", "convert", "--from", "meta", "--input", str(ckpt),
                           "--output", str(tmp_path / "out")], capture_output=True, text=True, cwd=ROOT,
                          env=dict(os.environ, PYTHONPATH=str(ROOT)), timeout=120)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert "consolidated.00.pth" in lines[0] and "refused" in lines[0]
    assert not marker.exists() and not (tmp_path / "out").exists()


def test_python_loaders_refuse_it_too(tmp_path):
    from megallama import from_pretrained

    marker = tmp_path / "pwned"
    ckpt = write_malicious_meta(tmp_path / "meta", marker)
    with pytest.raises(UserError, match="refused"):
        from_pretrained(ckpt)
    # an HF directory holding only a pickle (pytorch_model.bin) is not unpickled at all
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text(json.dumps(dict(model_type="llama", hidden_size=64, intermediate_size=172,
                                                    num_hidden_layers=1, num_attention_heads=4, vocab_size=96)))
    os.replace(ckpt / "consolidated.00.pth", hf / "pytorch_model.bin")
    from megallama.checkpoint.hf import load_hf

    with pytest.raises(UserError, match="pytorch_model"):
        load_hf(hf)
    assert not marker.exists()


def test_no_unrestricted_unpickling_in_loaders():
    """Every torch.load under the checkpoint/inference code asks for weights_only=True; no pickle.load."""
    offenders = []
    for sub in ("checkpoint", "inference", "commands"):
        for path in (ROOT / "megallama" / sub).rglob("*.py"):
            text = path.read_text()
            for m in re.finditer(r"torch\.load\(", text):
                depth, end = 0, m.end() - 1
                for end in range(m.end() - 1, len(text)):  # the call up to its matching parenthesis
                    depth += {"(": 1, ")": -1}.get(text[end], 0)
                    if depth == 0:
                        break
                call = text[m.start():end + 1]
                if "weights_only=True" not in call:
                    offenders.append(f"{path.relative_to(ROOT)}: {call}")
            if re.search(r"\bpickle\.loads?\(|\bcloudpickle|\bdill\.load", text):
                offenders.append(f"{path.relative_to(ROOT)}: pickle load")
    assert not offenders, offenders
