"""Parameter and FLOP counts against hand-computed values (LLaMA paper sizes, Megatron's formula)."""
import math

import pytest

from megallama.config import ModelConfig
from megallama.profiling.arch import ArchSpec, as_spec
from megallama.profiling.flops import (flops_per_token, hfu, megatron_formula_flops_per_token, mfu,
                                       parameter_breakdown, parameter_count)

# LLaMA paper, Table 2: 6.7B, 13.0B, 32.5B, 65.2B; FFN widths from Meta's SwiGLU rule.
PAPER = {"llama-7b": (6.7, 11008, 6_738_415_616), "llama-13b": (13.0, 13824, 13_015_864_320),
         "llama-33b": (32.5, 17920, 32_528_943_616), "llama-65b": (65.2, 22016, 65_285_660_672)}


@pytest.mark.parametrize("name", sorted(PAPER))
def test_llama_parameter_counts_match_the_paper(name):
    billions, ffn, exact = PAPER[name]
    spec = as_spec(name)
    assert spec.ffn_hidden == ffn
    d, l, v = spec.dim, spec.n_layers, spec.vocab_size
    by_hand = l * (4 * d * d + 3 * d * ffn + 2 * d) + 2 * v * d + d   # blocks, embedding + head, final norm
    assert parameter_count(name) == by_hand == exact
    assert math.floor(exact / 1e8) / 10 == billions      # the paper truncates: 65.29B -> "65.2B"


def test_gqa_and_encoder_decoder_counts_by_hand():
    # Llama 2 70B: 8 kv heads of 128 -> K, V are 8192 x 1024; FFN 28672
    d, f, kv = 8192, 28672, 1024
    by_hand = 80 * (2 * d * d + 2 * d * kv + 3 * d * f + 2 * d) + 2 * 32000 * d + d
    assert parameter_count("llama2-70b") == by_hand == 68_976_648_192
    # tiny-encdec: shared embedding, untied head, encoder norm + final norm, cross-attention blocks
    d, f, v = 128, 352, 2048
    attn, mlp = 4 * d * d, 3 * d * f
    enc, dec = 2 * (attn + mlp + 2 * d), 2 * (2 * attn + mlp + 3 * d)
    assert parameter_count("tiny-encdec") == enc + dec + 2 * v * d + 2 * d


@pytest.mark.parametrize("name", ["tiny", "tiny-gqa", "tiny-encdec"])
def test_parameter_count_matches_the_model_built_in_torch(name):
    from megallama.model import build_model

    model = build_model(ModelConfig.preset(name))
    assert parameter_count(name) == sum(p.numel() for p in model.parameters())


def test_flops_per_token_by_hand_for_llama_7b():
    s, d, f, l, v = 2048, 4096, 11008, 32, 32000
    fwd = l * (2 * 4 * d * d + 2 * 3 * d * f + 2 * 2 * s * d) + 2 * d * v   # proj, SwiGLU, QK^T+PV, head
    head, core = 2 * d * v, l * 4 * s * d
    none = flops_per_token("llama-7b", s, "none")
    assert none.forward == fwd and none.model == none.hardware == 3 * fwd
    assert flops_per_token("llama-7b", s, "full").hardware == 4 * fwd - head        # head is not recomputed
    assert flops_per_token("llama-7b", s, "selective").hardware == 3 * fwd + core   # attention core only
    assert flops_per_token("llama-7b", s, "full").model == 3 * fwd                 # MFU numerator unchanged
    # the familiar 6N + 12 l s d rule (N = matmul weights, incl. the head)
    n_matmul = parameter_count("llama-7b") - v * d - (2 * l + 1) * d
    assert none.model == pytest.approx(6 * n_matmul + 12 * l * s * d, rel=1e-12)


def test_gqa_shrinks_only_the_kv_projections():
    from megallama.config import ModelConfig

    gqa_7b = ModelConfig.preset("llama-7b", n_kv_heads=8)  # Llama 2 7B itself is MHA; only 70B uses GQA
    mha, gqa = flops_per_token("llama-7b", 4096), flops_per_token(gqa_7b, 4096)
    d, kv, l = 4096, 1024, 32
    assert mha.terms["attn_proj"] - gqa.terms["attn_proj"] == l * 2 * d * 2 * (d - kv)
    assert mha.terms["attn_core"] == gqa.terms["attn_core"]


def test_gpt_with_full_recompute_is_megatrons_formula():
    spec = ArchSpec(name="gpt-1t", family="gpt", arch="decoder", dim=25600, n_layers=128, n_encoder_layers=0,
                    n_heads=160, kv_heads=160, ffn_hidden=4 * 25600, vocab_size=51200, max_seq_len=2048,
                    bias=True, tied_embeddings=True)
    ours = flops_per_token(spec, 2048, "full").hardware
    assert ours == pytest.approx(megatron_formula_flops_per_token(spec, 2048), rel=1e-12)
    parts = parameter_breakdown(spec)
    assert parts["lm_head"] == 0 and parts["positions"] == 2048 * 25600   # tied head, learned positions
    assert parameter_count(spec) / 1e9 == pytest.approx(1008.0, abs=0.5)     # Table 1: 1008.0B


def test_encoder_decoder_counts_encoder_and_cross_attention():
    enc = flops_per_token("tiny-encdec", 128)
    dec_only = flops_per_token(ModelConfig.preset("tiny-encdec").model_copy(update={"arch": "decoder"}), 128)
    assert enc.terms["encoder"] > 0 and enc.terms["cross_core"] == enc.terms["attn_core"]
    assert enc.forward > dec_only.forward


def test_mfu_and_hfu():
    f = flops_per_token("llama-7b", 2048, "full")
    assert mfu(1000.0, f, 312e12) == pytest.approx(1000 * f.model / 312e12)
    assert hfu(1000.0, f, 312e12) > mfu(1000.0, f, 312e12)
    with pytest.raises(ValueError):
        flops_per_token("llama-7b", 2048, "sometimes")
