"""Grouped attention with a mask on CUDA expands K/V so the memory-efficient kernel can run it; the
expansion must pair each query head with the KV head ``enable_gqa`` gives it (run here on CPU
tensors: the same arithmetic, the device only picks the kernel)."""
import pytest
import torch
import torch.nn.functional as F

from megallama.model.attention import build_mask, kv_for_sdpa


def _qkv(heads=8, kv_heads=2, seq=16, hd=8):
    g = torch.Generator().manual_seed(0)
    return (torch.randn(2, heads, seq, hd, generator=g, dtype=torch.float64, requires_grad=True),
            torch.randn(2, kv_heads, seq, hd, generator=g, dtype=torch.float64, requires_grad=True),
            torch.randn(2, kv_heads, seq, hd, generator=g, dtype=torch.float64, requires_grad=True))


def _document_mask(seq):
    """Three packed documents, as the trainer builds the mask for them."""
    docs = torch.tensor([0] * 5 + [1] * 7 + [2] * (seq - 12))
    return build_mask(seq, seq, True, None, "cpu", document_ids=docs.expand(2, seq))


@pytest.mark.parametrize("kv_heads", [1, 2, 4])
def test_expanded_kv_gives_the_grouped_result_and_gradients(kv_heads):
    q, k, v = _qkv(kv_heads=kv_heads)
    mask = _document_mask(q.size(2))
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    ref_grads = torch.autograd.grad(ref.square().sum(), (q, k, v))
    k2, v2, gqa = kv_for_sdpa(q, k, v, mask, cuda=True)
    assert not gqa and k2.size(1) == q.size(1) == v2.size(1)
    out = F.scaled_dot_product_attention(q, k2, v2, attn_mask=mask, enable_gqa=gqa)
    grads = torch.autograd.grad(out.square().sum(), (q, k, v))
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


def test_head_pairing_is_checked():
    """The test above fails for the wrong pairing (KV heads tiled instead of repeated in place)."""
    q, k, v = _qkv(kv_heads=2)
    mask = _document_mask(q.size(2))
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    tiled = F.scaled_dot_product_attention(q, k.repeat(1, 4, 1, 1), v.repeat(1, 4, 1, 1), attn_mask=mask)
    assert not torch.allclose(tiled, ref)


def test_no_copy_without_a_mask_or_off_cuda():
    q, k, v = _qkv()
    mask = _document_mask(q.size(2))
    for m, cuda in ((None, True), (mask, False), (None, False)):
        k2, v2, gqa = kv_for_sdpa(q, k, v, m, cuda)
        assert k2 is k and v2 is v and gqa
    q1, k1, v1 = _qkv(kv_heads=8)
    assert kv_for_sdpa(q1, k1, v1, mask, True) == (k1, v1, False)   # not grouped: nothing to expand
