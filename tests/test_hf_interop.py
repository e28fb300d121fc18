"""Hugging Face and Meta interop: logits of transformers' LlamaForCausalLM and ours agree after
conversion either way (fp32, <= 1e-4), GQA and sharded safetensors included; Meta's original
layout (interleaved RoPE rows, split across files) imports; bad inputs are one line and exit 2."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from megallama import ModelConfig, from_pretrained
from megallama.checkpoint import load_consolidated, save_consolidated
from megallama.checkpoint.hf import _ffn_fields, load_hf
from megallama.checkpoint.meta import half_to_interleaved
from megallama.cli import main

ROOT = Path(__file__).resolve().parent.parent
TOL = 1e-4


def hf_model(gqa: bool, intermediate: int = 100, tie: bool = False):
    """A tiny random transformers Llama; norms perturbed so a swapped norm cannot hide."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=intermediate, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2 if gqa else 4, vocab_size=96, max_position_embeddings=64,
                      rms_norm_eps=1e-5, rope_theta=50000.0, tie_word_embeddings=tie)
    model = LlamaForCausalLM(cfg).float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
    return model


def hf_logits(model, tokens):
    with torch.no_grad():
        return model(tokens).logits


def tokens(vocab=96, seq=12):
    return torch.randint(0, vocab, (2, seq), generator=torch.Generator().manual_seed(5))


def cli(*argv):
    return main([str(a) for a in argv])


@pytest.mark.parametrize("gqa,sharded", [(False, False), (True, True)])
def test_hf_import_matches_transformers(tmp_path, gqa, sharded):
    ref = hf_model(gqa)
    ref.save_pretrained(tmp_path / "hf", safe_serialization=True, **({"max_shard_size": "40KB"} if sharded else {}))
    assert (tmp_path / "hf" / "model.safetensors.index.json").is_file() == sharded
    assert cli("convert", "--from", "hf", "--input", tmp_path / "hf", "--output", tmp_path / "ours") == 0
    cfg, _ = load_consolidated(tmp_path / "ours")
    assert (cfg.n_heads, cfg.kv_heads, cfg.ffn_hidden_size, cfg.rope_theta) == (4, 2 if gqa else 4, 100, 50000.0)
    x = tokens()
    expected = hf_logits(ref, x)
    for source in (tmp_path / "ours", tmp_path / "hf"):  # converted, and converted on the fly
        model = from_pretrained(source)
        assert not model.training
        assert (model(x) - expected).abs().max().item() <= TOL


def test_export_to_hf_matches_and_round_trips(tmp_path):
    from transformers import LlamaForCausalLM

    from megallama.model import LlamaForCausalLM as Ours
    from megallama.parallel import ParallelState

    cfg = ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=96, multiple_of=16, max_seq_len=64,
                      rope_theta=20000.0, ffn_dim_multiplier=1.3)
    ours = Ours(cfg, ParallelState(), seed=3).eval()
    with torch.no_grad():
        ours.norm.weight.add_(0.3 * torch.randn(64))
        ours.layers[1].ffn_norm.weight.add_(0.3 * torch.randn(64))
    save_consolidated(ours.state_dict(), cfg, tmp_path / "ours")
    assert cli("convert", "--to", "hf", "--input", tmp_path / "ours", "--output", tmp_path / "hf") == 0
    ref = LlamaForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    x = tokens()
    with torch.no_grad():
        assert (hf_logits(ref, x) - ours(x)).abs().max().item() <= TOL
    # and back again: the very same tensors
    assert cli("convert", "--from", "hf", "--input", tmp_path / "hf", "--output", tmp_path / "back") == 0
    cfg2, state2 = load_consolidated(tmp_path / "back")
    assert cfg2.ffn_hidden_size == cfg.ffn_hidden_size and cfg2.kv_heads == 2
    assert all(torch.equal(v, state2[k]) for k, v in ours.state_dict().items())


def test_export_casts_dtype(tmp_path):
    from safetensors import safe_open

    ref = hf_model(gqa=False)
    ref.save_pretrained(tmp_path / "hf", safe_serialization=True)
    assert cli("convert", "--from", "hf", "--to", "hf", "--dtype", "bfloat16", "--input", tmp_path / "hf",
               "--output", tmp_path / "bf16") == 0
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["dtype"] == "bfloat16"
    with safe_open(str(tmp_path / "bf16" / "model.safetensors"), "pt") as f:
        assert all(f.get_tensor(k).dtype == torch.bfloat16 for k in f.keys())


def test_sharded_export_is_read_by_transformers(tmp_path):
    from transformers import LlamaForCausalLM

    from megallama.checkpoint.hf import save_hf

    ref = hf_model(gqa=True)
    ref.save_pretrained(tmp_path / "hf", safe_serialization=True)
    cfg, state = load_hf(tmp_path / "hf")
    save_hf(state, cfg, tmp_path / "sharded", max_shard_bytes=30_000)
    index = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2
    again = LlamaForCausalLM.from_pretrained(tmp_path / "sharded", dtype=torch.float32).eval()
    x = tokens()
    assert torch.equal(hf_logits(again, x), hf_logits(ref, x))


def write_meta_layout(ref, out: Path, n_files: int = 2, llama1_vocab: bool = True) -> None:
    """Meta's release from an HF model: interleaved RoPE rows, tensors split over n_files."""
    c = ref.config
    sd = ref.state_dict()
    names = {"model.embed_tokens.weight": ("tok_embeddings.weight", 1), "model.norm.weight": ("norm.weight", None),
             "lm_head.weight": ("output.weight", 0)}
    meta = {}
    for hf_name, (name, dim) in names.items():
        meta[name] = (sd[hf_name], dim)
    for i in range(c.num_hidden_layers):
        h, m = f"model.layers.{i}.", f"layers.{i}."
        meta[m + "attention.wq.weight"] = (half_to_interleaved(sd[h + "self_attn.q_proj.weight"],
                                                               c.num_attention_heads), 0)
        meta[m + "attention.wk.weight"] = (half_to_interleaved(sd[h + "self_attn.k_proj.weight"],
                                                               c.num_key_value_heads), 0)
        for hf_name, name, dim in (("self_attn.v_proj", "attention.wv", 0), ("self_attn.o_proj", "attention.wo", 1),
                                   ("mlp.gate_proj", "feed_forward.w1", 0), ("mlp.up_proj", "feed_forward.w3", 0),
                                   ("mlp.down_proj", "feed_forward.w2", 1), ("input_layernorm", "attention_norm", None),
                                   ("post_attention_layernorm", "ffn_norm", None)):
            meta[m + name + ".weight"] = (sd[h + hf_name + ".weight"], dim)
    out.mkdir()
    for r in range(n_files):
        shard = {k: (t if d is None else t.chunk(n_files, dim=d)[r]).clone() for k, (t, d) in meta.items()}
        shard["rope.freqs"] = torch.ones(c.hidden_size // c.num_attention_heads // 2)
        torch.save(shard, out / f"consolidated.{r:02d}.pth")
    params = dict(dim=c.hidden_size, n_layers=c.num_hidden_layers, n_heads=c.num_attention_heads,
                  n_kv_heads=c.num_key_value_heads, vocab_size=-1 if llama1_vocab else c.vocab_size,
                  multiple_of=16, norm_eps=c.rms_norm_eps, rope_theta=50000.0, max_seq_len=64)
    (out / "params.json").write_text(json.dumps(params))


@pytest.mark.parametrize("gqa", [False, True])
def test_meta_import_matches_reference(tmp_path, gqa):
    ref = hf_model(gqa, intermediate=176)  # Meta's rule: 16 * ceil(int(8 * 64 / 3) / 16)
    write_meta_layout(ref, tmp_path / "meta", llama1_vocab=not gqa)
    assert cli("convert", "--from", "meta", "--input", tmp_path / "meta", "--output", tmp_path / "ours") == 0
    model = from_pretrained(tmp_path / "ours")
    x = tokens()
    assert (model(x) - hf_logits(ref, x)).abs().max().item() <= TOL
    assert model.config.vocab_size == 96 and model.config.kv_heads == (2 if gqa else 4)


@settings(max_examples=60, deadline=None)
@given(dim=st.integers(1, 512).map(lambda n: 8 * n), intermediate=st.integers(1, 20000))
def test_any_intermediate_size_is_reproduced(dim, intermediate):
    assert ModelConfig(dim=dim, **_ffn_fields(dim, intermediate)).ffn_hidden_size == intermediate


def test_meta_settings_are_recovered():
    assert _ffn_fields(4096, 11008) == dict(multiple_of=256, ffn_dim_multiplier=None)  # llama-7b
    assert ModelConfig(dim=8192, **_ffn_fields(8192, 28672)).ffn_hidden_size == 28672  # llama-2-70b


def _assert_one_line(proc, *needles):
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


def test_bad_inputs_are_one_line_errors(tmp_path):
    hf_model(False).save_pretrained(tmp_path / "tied", safe_serialization=True)  # then claimed tied:
    hf_cfg = json.loads((tmp_path / "tied" / "config.json").read_text())  # its separate lm_head contradicts it
    (tmp_path / "tied" / "config.json").write_text(json.dumps({**hf_cfg, "tie_word_embeddings": True}))
    (tmp_path / "empty").mkdir()
    (tmp_path / "exists").mkdir()
    cases = [
        (["--from", "hf", "--input", tmp_path / "empty", "--output", tmp_path / "o1"], ["config.json", "not found"]),
        (["--from", "hf", "--input", tmp_path / "tied", "--output", tmp_path / "o2"],
         ["tie_word_embeddings", "lm_head.weight differs"]),
        (["--from", "gguf", "--input", tmp_path / "tied", "--output", tmp_path / "o3"], ["--from", "gguf"]),
        (["--from", "hf", "--input", tmp_path / "tied", "--output", tmp_path / "exists"], ["exists", "--overwrite"]),
        (["--from", "meta", "--input", tmp_path / "empty", "--output", tmp_path / "o4"], ["params.json"]),
    ]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    procs = [subprocess.Popen([sys.executable, "-m", "megallama", "convert", *map(str, argv)], cwd=ROOT, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
             for argv, _ in cases]  # the CLI in subprocesses, side by side
    for proc, (argv, needles) in zip(procs, cases):
        out, err = proc.communicate(timeout=120)
        _assert_one_line(subprocess.CompletedProcess(argv, proc.returncode, out, err), *needles)
    assert not any((tmp_path / f"o{i}").exists() for i in range(1, 5))
    assert list((tmp_path / "exists").iterdir()) == []
