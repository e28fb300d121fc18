"""Activation bytes: Korthikanti's closed forms, a hand-worked LLaMA case, and the exact storages
autograd saves in ``megallama.model`` on CPU."""
import functools
import pytest
import torch

from megallama.config import ModelConfig
from megallama.profiling import activations as act
from megallama.profiling.arch import ArchSpec
from megallama.profiling.layout import Layout
from megallama.profiling.memory import stage_activation_bytes

GPT = ArchSpec(name="gpt", family="gpt", arch="decoder", dim=1024, n_layers=2, n_encoder_layers=0, n_heads=16,
               kv_heads=16, ffn_hidden=4096, vocab_size=1000, max_seq_len=512, dropout=0.1, bias=True,
               tied_embeddings=True)
MEGATRON = act.ActivationImpl(attention="eager", sp_saves_gathered_input=False)


def korthikanti_bytes_per_layer(seq: int, mbs: int, hidden: int, heads: int, tp: int = 1, sp: bool = False,
                                recompute: str = "none") -> float:
    """The paper's closed forms (GPT, fp16, dropout on), for comparison: sbh(10 + 24/t + 5as/ht),
    sbh(34/t + 5as/ht) with SP, 34sbh/t selective+SP, 2sbh full."""
    s, b, h, a, t = seq, mbs, hidden, heads, tp
    if recompute == "full":
        return 2.0 * s * b * h / (t if sp else 1)
    core = 0.0 if recompute == "selective" else 5.0 * a * s / (h * t)
    return s * b * h * ((34.0 / t if sp else 10 + 24.0 / t) + core)


@pytest.mark.parametrize("tp, sp", [(1, False), (4, False), (4, True)])
@pytest.mark.parametrize("recompute", ["none", "selective", "full"])
def test_gpt_reproduces_korthikanti(tp, sp, recompute):
    """sbh(34 + 5as/h) and its TP/SP/selective/full variants (norm statistics aside: the paper
    ignores them)."""
    saved = act.layer_saved_tensors(GPT, 512, 2, tp, sp, recompute, 2, MEGATRON)
    ours = sum(x.bytes for x in saved if not x.name.endswith(".stats"))
    assert ours == korthikanti_bytes_per_layer(512, 2, 1024, 16, tp, sp, recompute)


def test_llama_block_hand_worked():
    """tiny: s=64, b=2 (N=128), h=128, a=4, f=352, bf16, flash, fused norms, t=1:
    seven h-wide tensors + the 3h fused QKV output + four f-wide ones, at 2 bytes, plus two fp32
    rstd vectors and the fp32 logsumexp: N (2(7h + 3h + 4f) + 2*4 + 4a) = 128 * 5400 bytes."""
    assert act.activation_bytes_per_layer("tiny", 64, 2) == 128 * (2 * (7 * 128 + 3 * 128 + 4 * 352) + 8 + 16)
    # GQA (8 heads over 4 kv heads, head_dim 16): QKV output 128 + 2*64 wide, k after RoPE 64 wide
    gqa = 128 * (2 * (6 * 128 + 64 + (128 + 2 * 64) + 4 * 352) + 8 + 4 * 8)
    assert act.activation_bytes_per_layer("tiny-gqa", 64, 2) == gqa
    # full recompute keeps only the block input; SP shards it
    assert act.activation_bytes_per_layer("tiny", 64, 2, recompute="full") == 128 * 128 * 2
    assert act.activation_bytes_per_layer("tiny", 64, 2, tp=2, sp=True, recompute="full") == 128 * 128


def _saved_storages(model, *inputs) -> int:
    """Bytes of the distinct storages autograd saves, less parameters, RoPE's constant tables and
    0-d scalars (the loss's token count)."""
    skip = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen = {}

    def pack(t):
        seen.setdefault(t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(*inputs)
    for m in model.modules():
        for pair in getattr(m, "_cache", {}).values():
            skip |= {t.untyped_storage().data_ptr() for t in pair}
    return sum(n for ptr, n in seen.items() if ptr not in skip and n > 16)


CASES = ([(n, d, "none") for n in ("tiny", "tiny-gqa", "tiny-encdec") for d in ("fp32", "bf16")]
         + [(n, "bf16", rc) for n in ("tiny", "tiny-gqa") for rc in ("selective", "full")])


@pytest.mark.parametrize("name, dtype, recompute", CASES)
def test_matches_what_autograd_saves_in_our_model(name, dtype, recompute):
    from megallama.model import build_model
    from megallama.parallel.random import checkpoint

    cfg = ModelConfig.preset(name)
    torch.manual_seed(0)
    model = build_model(cfg).to(torch.float32 if dtype == "fp32" else torch.bfloat16)
    for layer in getattr(model, "layers", []):
        if recompute == "full":
            layer.checkpoint_fn = functools.partial(checkpoint, model.parallel_state.rng)
        layer.attention.recompute_core = recompute == "selective"
    seq, mbs = 64, 2
    src, tgt, labels = (torch.randint(0, cfg.vocab_size, (mbs, seq)) for _ in range(3))
    inputs = (src, tgt, labels) if cfg.arch == "encoder_decoder" else (tgt, labels)
    measured = _saved_storages(model, *inputs)

    impl = act.ActivationImpl.for_device("cpu")
    layout = Layout(mbs=mbs, dtype=dtype, recompute=recompute)
    d = stage_activation_bytes(cfg, layout, seq, 0, impl)
    transient = sum(x.bytes for x in act.last_stage_saved_tensors(cfg, seq, mbs, 1, False, layout.dtype_bytes, impl)
                    if not x.saved)
    assert d["blocks"] + d["embedding"] + d["head_and_loss"] - transient == measured
