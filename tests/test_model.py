"""Model properties on one process: the formulas, causality, RoPE's relative positions, apex."""
import logging

import pytest
import torch

from megallama import LlamaForCausalLM, ModelConfig
from megallama.model import LlamaEncoderDecoder, LlamaForSequenceClassification, RMSNorm, RotaryEmbedding
from megallama.model import norm as norm_mod
from megallama.parallel import ParallelState


def test_public_api_without_distributed_setup():
    cfg = ModelConfig.preset("tiny")
    model = LlamaForCausalLM(cfg, ParallelState())
    tokens = torch.randint(0, cfg.vocab_size, (2, 12))
    assert model(tokens).shape == (2, 12, cfg.vocab_size)
    loss = model(tokens, labels=tokens)
    ref = torch.nn.functional.cross_entropy(model(tokens).flatten(0, 1), tokens.flatten())
    assert torch.allclose(loss, ref, atol=1e-5)


def test_rmsnorm_equals_its_formula():
    x = torch.randn(3, 5, 16)
    norm = RMSNorm(16, eps=1e-6)
    with torch.no_grad():
        norm.weight.copy_(torch.linspace(0.5, 2.0, 16))
    expected = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * norm.weight
    assert torch.allclose(norm(x), expected, atol=1e-6)


def test_rope_scores_depend_only_on_relative_position():
    rope = RotaryEmbedding(32, 64, theta=10000.0)
    q, k = torch.randn(1, 1, 1, 32), torch.randn(1, 1, 1, 32)

    def score(i, j):
        return (rope(q, start_pos=i) * rope(k, start_pos=j)).sum().item()

    assert score(3, 1) == pytest.approx(score(12, 10), abs=1e-5)
    assert score(7, 7) == pytest.approx(score(0, 0), abs=1e-5)
    assert score(5, 1) != pytest.approx(score(5, 2), abs=1e-3)


def test_causal_logits_ignore_future_tokens():
    cfg = ModelConfig.preset("tiny-gqa")
    model = LlamaForCausalLM(cfg, ParallelState()).eval()
    a = torch.randint(0, cfg.vocab_size, (1, 16))
    b = a.clone()
    b[0, 9:] = torch.randint(0, cfg.vocab_size, (7,))
    la, lb = model(a), model(b)
    assert torch.allclose(la[:, :9], lb[:, :9], atol=1e-6)
    assert not torch.allclose(la[:, 9:], lb[:, 9:], atol=1e-3)


def test_padding_mask_hides_padded_keys():
    cfg = ModelConfig.preset("tiny")
    model = LlamaForCausalLM(cfg, ParallelState()).eval()
    tokens = torch.randint(0, cfg.vocab_size, (1, 10))
    mask = torch.ones(1, 10, dtype=torch.long)
    mask[0, :3] = 0  # left padding
    other = tokens.clone()
    other[0, :3] = (other[0, :3] + 1) % cfg.vocab_size
    out_a = model(tokens, attention_mask=mask)
    out_b = model(other, attention_mask=mask)
    assert torch.allclose(out_a[:, 3:], out_b[:, 3:], atol=1e-5)
    assert torch.isfinite(out_a).all()


def test_encoder_is_bidirectional_and_decoder_causal():
    cfg = ModelConfig.preset("tiny-encdec")
    model = LlamaEncoderDecoder(cfg, ParallelState()).eval()
    src = torch.randint(0, cfg.vocab_size, (1, 8))
    tgt = torch.randint(0, cfg.vocab_size, (1, 8))
    src2 = src.clone()
    src2[0, -1] = (src2[0, -1] + 1) % cfg.vocab_size
    assert not torch.allclose(model.encode(src)[:, 0], model.encode(src2)[:, 0], atol=1e-4)
    tgt2 = tgt.clone()
    tgt2[0, -1] = (tgt2[0, -1] + 1) % cfg.vocab_size
    assert torch.allclose(model(src, tgt)[:, :-1], model(src, tgt2)[:, :-1], atol=1e-6)
    assert model(src, tgt, labels=tgt).ndim == 0


def test_classification_head_on_trunk():
    cfg = ModelConfig.preset("tiny", num_labels=3)
    model = LlamaForSequenceClassification(cfg, ParallelState())
    lm = LlamaForCausalLM(cfg, ParallelState())
    missing, unexpected = model.load_state_dict(lm.state_dict(), strict=False)
    assert missing == ["score.weight"] and unexpected == ["output.weight"]
    tokens = torch.randint(0, cfg.vocab_size, (4, 10))
    assert model(tokens).shape == (4, 3)
    model(tokens, labels=torch.tensor([0, 1, 2, 0])).backward()


def test_init_is_seeded_and_independent_of_construction_order():
    cfg = ModelConfig.preset("tiny")
    a, b = LlamaForCausalLM(cfg, ParallelState(), seed=3), LlamaForCausalLM(cfg, ParallelState(), seed=3)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    fewer = LlamaForCausalLM(ModelConfig.preset("tiny", n_layers=2), ParallelState(), seed=3)
    assert torch.equal(fewer.layers[1].attention.wqkv.weight, a.layers[1].attention.wqkv.weight)
    assert not torch.equal(LlamaForCausalLM(cfg, ParallelState(), seed=4).output.weight, a.output.weight)


def test_meta_device_build_allocates_nothing():
    with torch.device("meta"):
        model = LlamaForCausalLM(ModelConfig.preset("llama-65b"), ParallelState())
    assert all(p.is_meta for p in model.parameters())


def test_rmsnorm_backend_torch_path_is_clean_without_apex(monkeypatch, caplog):
    monkeypatch.setattr(norm_mod, "_APEX_RMS", None)
    monkeypatch.setattr(norm_mod, "_LOGGED", False)
    with caplog.at_level(logging.INFO, logger="megallama.model.norm"):
        n = RMSNorm(8)
    assert norm_mod.rmsnorm_backend() == "torch" and not n.use_apex
    assert "torch.nn.functional.rms_norm" in caplog.text


@pytest.mark.skipif(norm_mod._APEX_RMS is None or not torch.cuda.is_available(), reason="needs NVIDIA apex + CUDA")
def test_apex_and_torch_rmsnorm_agree():
    x = torch.randn(4, 7, 64, device="cuda")
    fused, plain = RMSNorm(64).cuda(), RMSNorm(64, use_apex=False).cuda()
    assert torch.allclose(fused(x), plain(x), atol=1e-5)
