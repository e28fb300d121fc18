"""Attention with a mask (packed documents): SDPA's per-block mask bias, and on CUDA grouped K/V
expanded to the query heads (``model.attention.kv_for_sdpa``), counted as autograd saves them."""
import dataclasses
import functools
from pathlib import Path

import pytest
import torch

from megallama.config import ModelConfig
from megallama.model import attention as attention_mod
from megallama.profiling import activations as act
from megallama.profiling.layout import Layout
from megallama.profiling.memory import stage_activation_bytes
from tests.test_profiling_activations import _saved_storages

SEQ, MBS = 64, 2


def _predicted(cfg, impl, recompute):
    layout = Layout(mbs=MBS, dtype="bf16", recompute=recompute)
    d = stage_activation_bytes(cfg, layout, SEQ, 0, impl)
    transient = sum(x.bytes for x in act.last_stage_saved_tensors(cfg, SEQ, MBS, 1, False, 2, impl) if not x.saved)
    return d["blocks"] + d["embedding"] + d["head_and_loss"] - transient


def _measured(cfg, recompute, cuda_rule, monkeypatch):
    """Saved storages of a bf16 run on CPU with two packed documents per row; ``cuda_rule``:
    ``kv_for_sdpa`` decides as it does on CUDA (CPU's SDPA runs either form)."""
    from megallama.model import build_model
    from megallama.parallel.random import checkpoint

    torch.manual_seed(0)
    model = build_model(cfg).to(torch.bfloat16)
    for layer in model.layers:
        layer.attention.recompute_core = recompute == "selective"
        if recompute == "full":
            layer.checkpoint_fn = functools.partial(checkpoint, model.parallel_state.rng)
    real = attention_mod.kv_for_sdpa
    monkeypatch.setattr(attention_mod, "kv_for_sdpa", lambda q, k, v, mask, cuda: real(q, k, v, mask, cuda_rule))
    tokens, labels = (torch.randint(0, cfg.vocab_size, (MBS, SEQ)) for _ in range(2))
    docs = (torch.arange(SEQ) >= 20).long().expand(MBS, SEQ)
    return _saved_storages(model, tokens, labels, None, 0, None, docs)


@pytest.mark.parametrize("kv_heads", [8, 4, 2])   # MHA, groups of 2 and of 4
@pytest.mark.parametrize("recompute", ["none", "selective", "full"])
@pytest.mark.parametrize("cuda", [False, True])
def test_masked_attention_matches_what_autograd_saves(kv_heads, recompute, cuda, monkeypatch):
    cfg = ModelConfig.preset("tiny-gqa").model_copy(update={"n_kv_heads": kv_heads})
    impl = dataclasses.replace(act.ActivationImpl.for_device("cpu", masked=True), cuda=cuda)
    # a full checkpoint holds the boolean mask through its closure (blocks.py ``run``), which the
    # hooks do not see; selective's checkpoint saves it as an argument
    held = MBS * SEQ * SEQ if recompute == "full" else 0
    assert _measured(cfg, recompute, cuda, monkeypatch) + held == _predicted(cfg, impl, recompute)


def test_what_the_mask_and_the_expansion_add_per_block():
    """tiny-gqa with 2 KV heads (group 4), N = 128 tokens, h = 128, K/V width 32, bf16: the bias
    ``b s^2`` per block; expanded K and V ``2 N h`` in place of the fused QKV output ``N (h + 2 kd)``."""
    cfg = ModelConfig.preset("tiny-gqa").model_copy(update={"n_kv_heads": 2})
    per_block = {name: act.activation_bytes_per_layer(cfg, SEQ, MBS, impl=impl) for name, impl in (
        ("plain", act.ActivationImpl()), ("masked cpu", act.ActivationImpl(masked=True, cuda=False)),
        ("masked cuda", act.ActivationImpl(masked=True)))}
    n, h, kd = SEQ * MBS, 128, 32
    assert per_block["masked cpu"] - per_block["plain"] == MBS * SEQ * SEQ * 2
    assert per_block["masked cuda"] - per_block["masked cpu"] == (2 * n * h - n * (h + 2 * kd)) * 2 > 0
    # the trainer's prediction reads data.document_mask, and the device
    from types import SimpleNamespace
    from megallama.profiling.compare import impl_of
    def cfg_with(mask):
        return SimpleNamespace(data=SimpleNamespace(document_mask=mask), train=SimpleNamespace(
            activation_checkpointing=SimpleNamespace(partition_activations=False)))
    assert impl_of(cfg_with(True), "cuda").expands_kv(4) and not impl_of(cfg_with(True), "cpu").expands_kv(4)
    assert not impl_of(cfg_with(False), "cuda").masked


@pytest.mark.parametrize("cuda", [False, True])
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("group", [1, 2])
def test_the_rule_is_the_models(cuda, masked, group):
    q, kv = torch.zeros(1, 4, 8, 2), torch.zeros(1, 4 // group, 8, 2)
    mask = torch.ones(1, 1, 8, 8, dtype=torch.bool) if masked else None
    k, _, _ = attention_mod.kv_for_sdpa(q, kv, kv, mask, cuda)
    assert (k.size(1) > kv.size(1)) == act.ActivationImpl(masked=masked, cuda=cuda).expands_kv(group)


def test_estimate_and_plan_count_the_runs_document_mask(tmp_path, capsys):
    """``estimate --config`` and ``plan --config`` cost a run that sets ``data.document_mask`` with
    its mask (the trainer's rule, ``compare.impl_of``), not as an unmasked run."""
    import json

    import yaml

    from megallama.cli import main

    root = Path(__file__).resolve().parent.parent
    base = yaml.safe_load((root / "examples" / "llama-7b.yaml").read_text())
    peaks = {}
    for mask in (False, True):
        cfg = dict(base, data={**base["data"], "document_mask": mask},
                   deepspeed=str((root / "examples" / base["deepspeed"]).resolve()))
        path = tmp_path / f"mask_{mask}.yaml"
        path.write_text(yaml.safe_dump(cfg))
        assert main(["estimate", "--config", str(path), "--gpu", "h100-sxm", "--tp", "1", "--pp", "1", "--dp", "8",
                     "--zero", "3", "--mbs", "1", "--recompute", "none", "--json"]) == 0
        est = json.loads(capsys.readouterr().out)
        assert main(["plan", "--config", str(path), "--gpus", "8", "--gpu", "h100-sxm", "--tp", "1", "--pp", "1",
                     "--zero", "3", "--mbs", "1", "--recompute", "none", "--json"]) == 0
        best = json.loads(capsys.readouterr().out)["best"]
        peaks[mask] = (est["stages"]["0"]["activations.blocks"], best["memory_breakdown_bytes"]["activations.blocks"])
    assert all(m > u for m, u in zip(peaks[True], peaks[False])), peaks
