"""Tied input/output embeddings and TP vocabulary padding.

One vocab-parallel weight serves the embedding and the LM head: at TP=2 (with and without
sequence parallelism) the loss and its gradient equal TP=1's; a vocabulary not divisible by TP is
padded (Megatron's make-vocab-size-divisible-by) and trains exactly as the unpadded TP=1 model;
transformers' ``tie_word_embeddings`` models convert both ways with equal logits. Each parity
check is also run against a broken model, to show it can fail."""
import json

import torch

from tests.dist_utils import run_distributed
from tests.test_hf_interop import TOL, cli, hf_logits, hf_model, tokens

SEQ, BATCH = 16, 2
# (overrides of the tiny preset, sequence parallel)
CASES = [({"tie_embeddings": True}, False), ({"tie_embeddings": True}, True),
         ({"vocab_size": 2049, "pad_vocab_to_multiple_of": 8}, False),
         ({"vocab_size": 2049, "pad_vocab_to_multiple_of": 8, "tie_embeddings": True}, True)]


def _run(model, tokens_, labels):
    logits = model(tokens_)
    loss = model(tokens_, labels=labels)
    loss.backward()
    return logits.detach(), loss.detach()


def _parity(rank, world):
    from dataclasses import replace

    from megallama.config import ModelConfig
    from megallama.model import build_model
    from megallama.parallel import ParallelState, initialize
    from megallama.parallel.layers import gather_tp_tensor

    state = initialize(tp=world)
    tp = state.tensor_parallel
    out = []
    for i, (fields, sp) in enumerate(CASES + [CASES[-1]]):
        broken = i == len(CASES)  # the last case again, its shared weight's shard perturbed on rank 1
        cfg = ModelConfig.preset("tiny", **fields)
        gen = torch.Generator().manual_seed(1)
        x = torch.randint(0, cfg.vocab_size, (BATCH, SEQ), generator=gen)
        labels = torch.randint(0, cfg.vocab_size, (BATCH, SEQ), generator=gen)
        labels[0, :3] = -100
        labels[1, 5] = cfg.vocab_size - 1  # the last real token: next to the padding
        model = build_model(cfg, replace(state, sequence_parallel=sp), seed=7)
        if broken and rank == 1:
            with torch.no_grad():
                model.tok_embeddings.weight[:4].mul_(1.2)
        logits, loss = _run(model, x, labels)
        emb = model.tok_embeddings.weight
        tail = emb.grad[min(max(cfg.vocab_size - rank * emb.size(0), 0), emb.size(0)):]  # this rank's padded rows
        pad_grad = torch.tensor([tail.abs().max().item() if tail.numel() else 0.0])
        torch.distributed.all_reduce(pad_grad, op=torch.distributed.ReduceOp.MAX, group=tp.group)
        grads = {n: gather_tp_tensor(p.grad, p, tp) for n, p in model.named_parameters()}
        if rank == 0:  # the reference: TP=1, never padded (same seed: padding adds only zero rows)
            ref = build_model(cfg.model_copy(update={"pad_vocab_to_multiple_of": None}), ParallelState(), seed=7)
            ref_logits, ref_loss = _run(ref, x, labels)
            ref_grads = {n: p.grad for n, p in ref.named_parameters()}
            out.append(dict(case=fields, sp=sp, broken=broken, names=sorted(grads), ref_names=sorted(ref_grads),
                            logit_err=(logits - ref_logits).abs().max().item(),
                            loss_err=abs(loss.item() - ref_loss.item()),
                            emb_grad_err=(grads["tok_embeddings.weight"] - ref_grads["tok_embeddings.weight"])
                            .abs().max().item() / ref_grads["tok_embeddings.weight"].abs().max().item(),
                            grad_err=max((grads[n] - ref_grads[n]).abs().max().item()
                                         / (ref_grads[n].abs().max().item() + 1e-12) for n in ref_grads),
                            local_rows=emb.size(0), pad_grad=pad_grad.item()))
    return out


def test_tied_and_padded_tp2_match_tp1_and_a_broken_shard_is_caught():
    results = run_distributed(_parity, 2)
    assert len(results) == len(CASES) + 1
    for r in results[:-1]:
        assert r["names"] == r["ref_names"], r
        if r["case"].get("tie_embeddings"):
            assert "output.weight" not in r["names"]  # one weight, used twice
        assert r["logit_err"] < 1e-5 and r["loss_err"] < 1e-5, r
        assert r["emb_grad_err"] < 1e-4 and r["grad_err"] < 1e-4, r
        assert r["pad_grad"] == 0.0, r  # padded rows: no gradient, they stay zero
    assert results[2]["local_rows"] == 1032  # 2049 padded to 2064 over 2 ranks
    broken = results[-1]
    assert broken["logit_err"] > 1e-4 and broken["emb_grad_err"] > 1e-4, broken  # each check alone fails it


def test_tied_hf_import_matches_transformers(tmp_path):
    from safetensors import safe_open

    from megallama import from_pretrained
    from megallama.checkpoint import load_consolidated

    ref = hf_model(gqa=True, tie=True)
    ref.save_pretrained(tmp_path / "hf", safe_serialization=True)
    with safe_open(str(tmp_path / "hf" / "model.safetensors"), "pt") as f:
        assert "lm_head.weight" not in f.keys()
    assert cli("convert", "--from", "hf", "--input", tmp_path / "hf", "--output", tmp_path / "ours") == 0
    cfg, state = load_consolidated(tmp_path / "ours")
    assert cfg.tie_embeddings and "output.weight" not in state
    x = tokens()
    expected = hf_logits(ref, x)
    for source in (tmp_path / "ours", tmp_path / "hf"):
        assert (from_pretrained(source)(x) - expected).abs().max().item() <= TOL
    # the check can fail: the same weights read untied (a head of its own) give other logits
    ref.config.tie_word_embeddings = False
    untied = type(ref)(ref.config).float().eval()
    untied.load_state_dict(ref.state_dict(), strict=False)
    with torch.no_grad():
        untied.lm_head.weight.normal_()
    assert (from_pretrained(tmp_path / "ours")(x) - hf_logits(untied, x)).abs().max().item() > 1e-2


def test_tied_export_to_hf_matches_and_round_trips(tmp_path):
    from safetensors import safe_open
    from transformers import LlamaForCausalLM

    from megallama import ModelConfig
    from megallama.checkpoint import load_consolidated, save_consolidated
    from megallama.model import LlamaForCausalLM as Ours
    from megallama.parallel import ParallelState

    cfg = ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=96, multiple_of=16, max_seq_len=64,
                      tie_embeddings=True)
    ours = Ours(cfg, ParallelState(), seed=3).eval()
    save_consolidated(ours.state_dict(), cfg, tmp_path / "ours")
    assert cli("convert", "--to", "hf", "--input", tmp_path / "ours", "--output", tmp_path / "hf") == 0
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["tie_word_embeddings"] is True
    with safe_open(str(tmp_path / "hf" / "model.safetensors"), "pt") as f:
        assert "lm_head.weight" not in f.keys()
    ref = LlamaForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    assert ref.lm_head.weight.data_ptr() == ref.model.embed_tokens.weight.data_ptr()
    x = tokens()
    with torch.no_grad():
        assert (hf_logits(ref, x) - ours(x)).abs().max().item() <= TOL
        # the check can fail: the export read as untied gets a fresh, random head
        untied = LlamaForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32, tie_word_embeddings=False)
        assert (hf_logits(untied.eval(), x) - ours(x)).abs().max().item() > 1e-2
    assert cli("convert", "--from", "hf", "--input", tmp_path / "hf", "--output", tmp_path / "back") == 0
    cfg2, state2 = load_consolidated(tmp_path / "back")
    assert cfg2.tie_embeddings and set(state2) == set(ours.state_dict())
    assert all(torch.equal(v, state2[k]) for k, v in ours.state_dict().items())


def test_tied_pipeline_matches_one_stage_and_exports_once_without_padding(tmp_path, data_cache):
    """PP=2 (embedding on stage 0, its tied head on stage 1, vocabulary padded) trains as PP=1 does
    unpadded; without DeepSpeed's tied-gradient all-reduce it would not. Its layout-free checkpoint
    holds the weight once, unpadded; a TP=2 reshard re-pads it and the HF export drops padding."""
    from safetensors import safe_open

    from megallama.train.universal import UniversalReader
    from tests.train_utils import run_train, tiny_run_config

    cfg = tiny_run_config(tmp_path, data_cache, steps=3)  # grad norms ~3 > train.grad_clip 1: every step clips
    tied = ["model.tie_embeddings=true"]
    pp2 = tied + ["parallel.pp=2", "model.pad_vocab_to_multiple_of=12", "checkpoint.every=3"]
    ref = run_train(cfg, tied + [f"run_dir={tmp_path / 'pp1'}"])["losses"]
    got = run_train(cfg, pp2 + [f"run_dir={tmp_path / 'pp2'}"], world=2)["losses"]
    # fp32 rounding only (the tied gradient is summed in another order); the copy counted twice
    # in the clipped norm was 1.4e-5 off at step 3, untied gradients 9e-4 at step 2
    assert len(got) == len(ref) == 3 and all(abs(a - b) < 5e-6 * b for a, b in zip(got, ref)), (got, ref)
    broken = run_train(cfg, pp2 + [f"run_dir={tmp_path / 'untied'}"], world=2, faults=["--untie-pipeline-grads", "1"])
    assert broken["losses"][0] == got[0], (broken["losses"], got)
    assert all(abs(a - b) > 1e-4 * b for a, b in zip(broken["losses"][1:], ref[1:])), (broken["losses"], ref)

    tag = tmp_path / "pp2" / "checkpoints" / "step00000003"
    index = {f.name: json.loads(f.read_text()) for f in (tag / "universal").glob("*.index.json")}
    assert ["tok_embeddings.weight" in i for _, i in sorted(index.items())] == [True, False]  # stored once
    saved = UniversalReader(tag / "universal").full("tok_embeddings.weight")
    assert saved.shape == (2048, 128)
    assert cli("convert", "--input", tmp_path / "pp2" / "checkpoints", "--output", tmp_path / "tp2", "--tp", "2") == 0
    with safe_open(str(next((tmp_path / "tp2").glob("*/universal/pp00-tp01.safetensors"))), "pt") as f:
        assert f.get_slice("tok_embeddings.weight").get_shape() == [1032, 128]  # 2048 padded to 2064 at TP 2
    assert cli("convert", "--to", "hf", "--input", tmp_path / "tp2", "--output", tmp_path / "hf") == 0
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["tie_word_embeddings"] is True
    with safe_open(str(tmp_path / "hf" / "model.safetensors"), "pt") as f:
        assert "lm_head.weight" not in f.keys()
        assert torch.equal(f.get_tensor("model.embed_tokens.weight").float(), saved)


def test_tied_meta_import_matches_transformers(tmp_path):
    """Meta's Llama 3.2 1B/3B releases have no ``output.weight``: the head is the embedding."""
    from megallama import from_pretrained
    from tests.test_hf_interop import write_meta_layout

    ref = hf_model(gqa=True, intermediate=176, tie=True)
    write_meta_layout(ref, tmp_path / "meta", llama1_vocab=False)
    for f in (tmp_path / "meta").glob("consolidated.*.pth"):
        shard = torch.load(f, weights_only=True)
        del shard["output.weight"]
        torch.save(shard, f)
    assert cli("convert", "--from", "meta", "--input", tmp_path / "meta", "--output", tmp_path / "ours") == 0
    model = from_pretrained(tmp_path / "ours")
    assert model.config.tie_embeddings and not hasattr(model, "output")
    assert (model(tokens()) - hf_logits(ref, tokens())).abs().max().item() <= TOL
