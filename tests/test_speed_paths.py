"""The fast paths mean what the plain formulas mean: RoPE's one-pass rotation, SwiGLU's fused
gradient, the single-rank cross entropy, fused AdamW, and compiled blocks (values and gradients)."""
import pytest
import torch
import torch.nn.functional as F

from megallama import ModelConfig
from megallama.config import TrainConfig
from megallama.model import build_model
from megallama.model.compile import compile_blocks
from megallama.model.mlp import swiglu
from megallama.model.rope import RotaryEmbedding
from megallama.parallel import TPGroup, vocab_parallel_cross_entropy
from megallama.train.optim import build_optimizer, param_groups


def rope_reference(x, theta, start_pos):
    """HF's rotate-half formula with the full ``cat(freqs, freqs)`` tables, in float64."""
    d, s = x.size(-1), x.size(1)
    inv = 1.0 / (theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
    freqs = torch.outer(torch.arange(start_pos, start_pos + s, dtype=torch.float64), inv)
    emb = torch.cat((freqs, freqs), -1)[:, None]
    rotated = torch.cat((-x[..., d // 2:], x[..., :d // 2]), -1)
    return x * emb.cos() + rotated * emb.sin()


@pytest.mark.parametrize("start_pos", [0, 5])
def test_rope_matches_rotate_half_formula_on_a_strided_view(start_pos):
    rope = RotaryEmbedding(16, 32, theta=500.0)
    qkv = torch.randn(2, 7, 6, 16, dtype=torch.float64, requires_grad=True)
    qk = qkv.split([4, 2], dim=2)[0]  # the Q|K heads of a fused QKV output: not contiguous
    out, ref = rope(qk, start_pos), rope_reference(qk, 500.0, start_pos)
    assert out.is_contiguous() and torch.allclose(out, ref, atol=1e-12)
    g = torch.randn_like(ref)
    (got,), (want,) = torch.autograd.grad(out, qkv, g), torch.autograd.grad(ref, qkv, g)
    assert torch.allclose(got, want, atol=1e-12)
    with torch.no_grad():
        assert torch.allclose(rope(qk, start_pos), ref, atol=1e-12)


def test_swiglu_value_and_gradient():
    x = torch.randn(3, 5, 2 * 8, dtype=torch.float64, requires_grad=True)
    gate, up = x.chunk(2, -1)
    ref = F.silu(gate) * up
    out = swiglu(x)
    assert torch.equal(out, ref)
    g = torch.randn_like(ref)
    assert torch.allclose(torch.autograd.grad(out, x, g)[0], torch.autograd.grad(ref, x, g)[0], atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cross_entropy_single_rank(dtype):
    logits = (4 * torch.randn(3, 6, 50)).to(dtype).requires_grad_()
    target = torch.randint(0, 50, (3, 6))
    target[0, :2] = -100
    loss = vocab_parallel_cross_entropy(logits, target, TPGroup())
    ref = F.cross_entropy(logits.double().flatten(0, 1), target.flatten(), reduction="none").view(3, 6)
    assert loss.dtype == torch.float32 and torch.allclose(loss.double(), ref, atol=1e-5)
    w = torch.rand(3, 6)
    (got,) = torch.autograd.grad((loss * w).sum(), logits)
    (want,) = torch.autograd.grad((ref * w).sum(), logits)
    assert got.dtype == dtype and torch.allclose(got.double(), want.double(), atol=1e-6 if dtype == torch.float32 else 1e-2)
    assert torch.equal(got[0, :2], torch.zeros_like(got[0, :2]))


def test_cross_entropy_leaves_fp32_logits_alone():
    logits = torch.randn(4, 10, requires_grad=True)
    before = logits.detach().clone()
    loss = vocab_parallel_cross_entropy(logits, torch.arange(4), TPGroup())
    loss.sum().backward()
    assert torch.equal(logits.detach(), before)


def test_adamw_is_fused_on_cpu_with_the_recipe_groups():
    model = build_model(ModelConfig.preset("tiny"))
    t = TrainConfig()
    opt = build_optimizer(model, t)
    assert all(g["fused"] for g in opt.param_groups)
    assert [g["weight_decay"] for g in opt.param_groups] == [g["weight_decay"] for g in
                                                             param_groups(model.named_parameters(), t.weight_decay)]
    assert opt.defaults["betas"] == (t.beta1, t.beta2)


def test_compiled_blocks_give_the_eager_loss_and_gradients():
    pytest.importorskip("torch._inductor")
    cfg = ModelConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=64, multiple_of=16, max_seq_len=16)
    eager, compiled = build_model(cfg, seed=3), build_model(cfg, seed=3)
    names = list(compiled.state_dict())
    assert compile_blocks(compiled) == 2 and list(compiled.state_dict()) == names
    tokens = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(0))
    losses = []
    for m in (eager, compiled):
        loss = m(tokens[:, :-1], labels=tokens[:, 1:])
        loss.backward()
        losses.append(loss.item())
    assert losses[0] == pytest.approx(losses[1], abs=1e-5)
    for (name, a), b in zip(eager.named_parameters(), compiled.parameters()):
        assert torch.allclose(a.grad, b.grad, atol=1e-5), name


def test_cross_entropy_target_far_below_the_max_stays_exact():
    """A target probability below fp32's range (gap of 200) takes the logsumexp path: finite, exact."""
    logits = torch.zeros(2, 3, 40)
    target = torch.tensor([[1, 2, 3], [4, 5, -100]])
    logits[0, 1, 2] = -200.0   # row (0, 1): the target's logit is 200 below the others
    logits.requires_grad_()
    loss = vocab_parallel_cross_entropy(logits, target, TPGroup())
    ref = F.cross_entropy(logits.double().flatten(0, 1), target.flatten(), reduction="none").view(2, 3)
    assert torch.isfinite(loss).all() and torch.allclose(loss.double(), ref, rtol=1e-6, atol=1e-5)
    loss.sum().backward()
    assert torch.isfinite(logits.grad).all()
