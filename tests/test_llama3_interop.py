"""Llama 3.1 in and out: RoPE scaling (rope_type "llama3") equals transformers' own, and a
Llama 3.1-style model (scaled RoPE, GQA) gives transformers' logits after conversion either way
(fp32, <= 1e-4), sharded safetensors and bf16 checkpoints included; Meta's ``use_scaled_rope``
imports; conversion streams tensor by tensor; bad inputs are one line."""
import json

import pytest
import torch

from megallama import from_pretrained
from megallama.checkpoint import load_consolidated, save_consolidated
from megallama.checkpoint.pretrained import build_for_inference
from megallama.cli import main
from megallama.config import ModelConfig
from megallama.config.schema import RopeScaling
from megallama.model.rope import inverse_frequencies
from tests.test_hf_interop import write_meta_layout

TOL = 1e-4
SEQ = 48  # positions up to 47: past the tiny original context, where the scaled bands differ
# a small original context, so the scaled (wavelength > 32) and blended (8..32) bands show at these positions
SCALING = dict(factor=4.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=32)


def hf_llama31(scaling=SCALING, theta=10000.0, intermediate=96):
    """A tiny random transformers Llama 3.1 (GQA, scaled RoPE); norms perturbed so none can hide,
    queries and keys enlarged so attention (and so RoPE's frequencies) shapes the logits."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=intermediate, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=96, max_position_embeddings=64, rms_norm_eps=1e-5,
                      rope_theta=theta, rope_scaling={"rope_type": "llama3", **scaling})
    model = LlamaForCausalLM(cfg).float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            if name.endswith(("q_proj.weight", "k_proj.weight")):
                p.mul_(8.0)
    return model


def logits(model, x):
    with torch.no_grad():
        out = model(x)
    return getattr(out, "logits", out)


def tokens():
    return torch.randint(0, 96, (2, SEQ), generator=torch.Generator().manual_seed(5))


def cli(*argv):
    return main([str(a) for a in argv])


@pytest.mark.parametrize("case", [
    dict(head_dim=128, theta=500000.0, factor=8.0, low=1.0, high=4.0, ctx=8192),  # Llama 3.1 8B/70B/405B
    dict(head_dim=64, theta=500000.0, factor=32.0, low=1.0, high=4.0, ctx=8192),  # Llama 3.2 1B
    dict(head_dim=16, theta=10000.0, factor=3.0, low=2.0, high=5.0, ctx=40),
])
def test_rope_scaling_matches_transformers(case):
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    hf = LlamaConfig(hidden_size=4 * case["head_dim"], num_attention_heads=4, rope_theta=case["theta"],
                     max_position_embeddings=int(case["ctx"] * case["factor"]),
                     rope_scaling=dict(rope_type="llama3", factor=case["factor"], low_freq_factor=case["low"],
                                       high_freq_factor=case["high"], original_max_position_embeddings=case["ctx"]))
    ref, _ = ROPE_INIT_FUNCTIONS["llama3"](hf, "cpu")
    scaling = RopeScaling(factor=case["factor"], low_freq_factor=case["low"], high_freq_factor=case["high"],
                          original_max_seq_len=case["ctx"])
    ours = inverse_frequencies(case["head_dim"], case["theta"], scaling)
    plain = inverse_frequencies(case["head_dim"], case["theta"])
    assert ((ours - ref.double()).abs() / ref.double()).max() < 1e-6  # transformers computes in fp32
    kept, slowed = ours == plain, torch.isclose(ours, plain / case["factor"], rtol=1e-12)
    assert kept.any() and slowed.any() and (~kept & ~slowed).any()  # all three bands exercised


@pytest.mark.parametrize("form", ["sharded", "bf16"])
def test_llama31_hf_import_matches_transformers(tmp_path, form):
    ref = hf_llama31()
    if form == "sharded":
        ref.save_pretrained(tmp_path / "hf", max_shard_size="40KB")
        assert (tmp_path / "hf" / "model.safetensors.index.json").is_file()
    else:  # a bf16 checkpoint, imported as fp32; the reference reads the same rounded weights
        ref.to(torch.bfloat16).save_pretrained(tmp_path / "hf")
        from transformers import LlamaForCausalLM

        ref = LlamaForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    assert cli("convert", "--from", "hf", "--input", tmp_path / "hf", "--output", tmp_path / "ours",
               *(["--dtype", "float32"] if form == "bf16" else [])) == 0
    cfg, state = load_consolidated(tmp_path / "ours")
    assert cfg.rope_scaling == RopeScaling(factor=4.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                           original_max_seq_len=32)
    assert cfg.kv_heads == 2 and all(t.dtype == torch.float32 for t in state.values())
    x = tokens()
    expected = logits(ref, x)
    for source in (tmp_path / "ours", tmp_path / "hf"):  # converted, and read on the fly (bf16 -> fp32)
        model = from_pretrained(source, dtype=torch.float32)
        assert (logits(model, x) - expected).abs().max().item() <= TOL
    # the comparison can fail: the same weights without the scaling, or with another factor, are far off
    for wrong in (None, cfg.rope_scaling.model_copy(update={"factor": 2.0})):
        broken = build_for_inference(cfg.model_copy(update={"rope_scaling": wrong}), state)
        assert (logits(broken, x) - expected).abs().max().item() > 100 * TOL


def ours_llama31(seed=3):
    from megallama.model import LlamaForCausalLM
    from megallama.parallel import ParallelState

    cfg = ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=96, multiple_of=16, max_seq_len=64,
                      rope_theta=20000.0, ffn_dim_multiplier=1.3,
                      rope_scaling=RopeScaling(factor=4.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                               original_max_seq_len=32))
    model = LlamaForCausalLM(cfg, ParallelState(), seed=seed).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.add_(0.3 * torch.randn_like(p))
            if name.endswith("wqkv.weight"):  # queries and keys enlarged, as in hf_llama31
                p[:(cfg.n_heads + cfg.kv_heads) * cfg.head_dim].mul_(8.0)
    return cfg, model


@pytest.mark.parametrize("form", ["sharded", "bf16"])
def test_llama31_export_matches_transformers(tmp_path, form):
    from transformers import LlamaForCausalLM

    cfg, ours = ours_llama31()
    save_consolidated(ours.state_dict(), cfg, tmp_path / "ours")
    flags = ["--shard-size", "30KB"] if form == "sharded" else ["--dtype", "bfloat16"]
    assert cli("convert", "--to", "hf", "--input", tmp_path / "ours", "--output", tmp_path / "hf", *flags) == 0
    hf_cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert hf_cfg["rope_scaling"] == {"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0,
                                      "high_freq_factor": 4.0, "original_max_position_embeddings": 32}
    if form == "sharded":
        index = json.loads((tmp_path / "hf" / "model.safetensors.index.json").read_text())
        assert len(set(index["weight_map"].values())) > 2
    else:  # the reference is our model holding the same bf16-rounded weights
        with torch.no_grad():
            for p in ours.parameters():
                p.copy_(p.to(torch.bfloat16).float())
    ref = LlamaForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    x = tokens()
    assert (logits(ref, x) - logits(ours, x)).abs().max().item() <= TOL
    # and back: the very same tensors and scaling
    assert cli("convert", "--from", "hf", "--input", tmp_path / "hf", "--output", tmp_path / "back",
               "--dtype", "float32") == 0
    cfg2, state2 = load_consolidated(tmp_path / "back")
    assert cfg2.rope_scaling == cfg.rope_scaling
    assert all(torch.equal(v, state2[k]) for k, v in ours.state_dict().items())


@pytest.mark.parametrize("factor", [None, 32.0])
def test_meta_use_scaled_rope_imports(tmp_path, factor):
    """Meta's params.json says only ``use_scaled_rope`` (8 over 8192 for Llama 3.1) or a factor."""
    ref = hf_llama31(dict(SCALING, factor=factor or 8.0, original_max_position_embeddings=8192), theta=500000.0,
                     intermediate=176)  # Meta's rule: 16 * ceil(int(8 * 64 / 3) / 16)
    write_meta_layout(ref, tmp_path / "meta", llama1_vocab=False)
    params = json.loads((tmp_path / "meta" / "params.json").read_text())
    params.update(use_scaled_rope=True, rope_theta=500000.0, **({"rope_scaling_factor": factor} if factor else {}))
    (tmp_path / "meta" / "params.json").write_text(json.dumps(params))
    assert cli("convert", "--from", "meta", "--input", tmp_path / "meta", "--output", tmp_path / "ours") == 0
    model = from_pretrained(tmp_path / "ours")
    assert model.config.rope_scaling == RopeScaling(factor=factor or 8.0)
    x = tokens()
    assert (logits(model, x) - logits(ref, x)).abs().max().item() <= TOL


def test_meta_scaling_of_a_shape_comes_from_its_preset():
    from megallama.checkpoint.meta import _scaled_preset, meta_rope_scaling

    llama32_1b = dict(dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, vocab_size=128256, use_scaled_rope=True)
    llama31_8b = dict(llama32_1b, dim=4096, n_layers=32)
    assert meta_rope_scaling(llama32_1b, _scaled_preset(llama32_1b), "p").factor == 32.0
    assert meta_rope_scaling(llama31_8b, _scaled_preset(llama31_8b), "p").factor == 8.0
    assert meta_rope_scaling(dict(llama32_1b, use_scaled_rope=False), _scaled_preset(llama32_1b), "p") is None


def test_conversion_streams_one_tensor_at_a_time(tmp_path, monkeypatch):
    """Each input tensor is read once, right before the output tensor it makes is written."""
    import safetensors

    from megallama.checkpoint import streaming

    hf_llama31().save_pretrained(tmp_path / "hf", max_shard_size="40KB")
    events = []
    real_open, real_write = safetensors.safe_open, streaming.write_tensor

    class Logged:
        def __init__(self, *args, **kwargs):
            self.f = real_open(*args, **kwargs)

        def __enter__(self):
            self.inner = self.f.__enter__()
            return self

        def __exit__(self, *exc):
            return self.f.__exit__(*exc)

        def get_tensor(self, name):
            events.append(("read", name))
            return self.inner.get_tensor(name)

        def get_slice(self, name):
            events.append(("read", name))
            return self.inner.get_slice(name)

    def write(fh, name, t):
        real_write(fh, name, t)
        events.append(("write", name))

    monkeypatch.setattr(safetensors, "safe_open", Logged)
    monkeypatch.setattr(streaming, "write_tensor", write)
    assert cli("convert", "--from", "hf", "--input", tmp_path / "hf", "--output", tmp_path / "ours") == 0
    reads = [n for kind, n in events if kind == "read"]
    assert sorted(reads) == sorted(json.loads((tmp_path / "hf" / "model.safetensors.index.json").read_text())
                                   ["weight_map"])  # each once
    pending = []
    for kind, name in events:
        if kind == "read":
            pending.append(name)
            continue
        want = {"attention.wqkv.weight": 3, "feed_forward.w13.weight": 2}.get(name.split(".", 2)[-1], 1)
        assert len(pending) == want, (name, pending)  # only this tensor's sources were read
        pending = []
    _, state = load_consolidated(tmp_path / "ours")
    assert len(state) == sum(kind == "write" for kind, _ in events)


def test_shard_size_parses_like_hugging_face():
    from megallama.checkpoint.streaming import parse_size
    from megallama.errors import UserError

    assert parse_size("5GB") == 5 * 10**9 and parse_size("2GiB") == 2 * 2**30 and parse_size("500mb") == 5 * 10**8
    assert parse_size("1.5GB") == 1_500_000_000 and parse_size("4096") == 4096
    for bad in ("", "5XB", "-1GB", "0", "GB", "1e9"):
        with pytest.raises(UserError, match="--shard-size"):
            parse_size(bad)


def test_bad_llama3_inputs_are_one_line(tmp_path, capsys):
    hf_llama31().save_pretrained(tmp_path / "hf")
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    key = "rope_parameters" if "rope_parameters" in cfg else "rope_scaling"
    cases = [
        ({key: {**cfg[key], "rope_type": "yarn"}}, ["rope type 'yarn' is not supported"]),
        ({key: {k: v for k, v in cfg[key].items() if k != "factor"}}, [f"{key}.factor: missing"]),
        ({key: {**cfg[key], "high_freq_factor": 0.5}}, ["high_freq_factor"]),
        ({key: {**cfg[key], "original_max_position_embeddings": "x"}}, [f"{key}.original_max_position_embeddings"]),
    ]
    for i, (edit, needles) in enumerate(cases):
        bad = tmp_path / f"bad{i}"
        bad.mkdir()
        for f in (tmp_path / "hf").iterdir():
            (bad / f.name).write_bytes(f.read_bytes())
        (bad / "config.json").write_text(json.dumps({**cfg, **edit}))
        capsys.readouterr()
        assert cli("convert", "--from", "hf", "--input", bad, "--output", tmp_path / f"o{i}") == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and all(n in err for n in needles) and "config.json" in err, err
    flags = [(["--to", "hf", "--shard-size", "5XB"], "--shard-size: expected a positive size"),
             (["--shard-size", "5GB"], "--shard-size: only a Hugging Face output")]
    for argv, needle in flags:
        capsys.readouterr()
        assert cli("convert", "--from", "hf", "--input", tmp_path / "hf", "--output", tmp_path / "o", *argv) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and needle in err, err
    assert not any(p.name.startswith("o") for p in tmp_path.iterdir())
