"""Megatron interop: a checkpoint written by megatron-core's own GPTModel and Adam (on CPU) converts
to megallama with its logits (fp32, <= 1e-4) and Adam state, and back into a file megatron-core
loads strictly with the same logits and optimizer; TP=2/PP=2 files follow Megatron's documented
shard layout; training resumes from a megallama -> Megatron -> megallama checkpoint on its loss
trajectory; a file asking to unpickle anything else is refused without running it."""
import json
import os
from pathlib import Path

import pytest
import torch

from megallama import ModelConfig
from megallama.checkpoint import load_consolidated, save_consolidated
from megallama.checkpoint.megatron_files import load_file
from megallama.checkpoint.reshard import consolidate_training_checkpoint, resolve_checkpoint
from megallama.cli import main
from megallama.model import build_model
from megallama.parallel import ParallelState
from megallama.train.universal import UniversalReader
from tests.megatron_reference import reference
from tests.train_utils import run_train, tiny_run_config

TOL = 1e-4


def megallama_logits(state, cfg, tokens):
    model = build_model(cfg, ParallelState(), seed=None)
    model.load_state_dict(state)
    with torch.no_grad():
        return model.eval()(tokens)


def cli(*argv):
    return main([str(a) for a in argv])


GQA = dict(hidden=64, layers=4, heads=4, groups=2, ffn=96, vocab=96, padded=128, eps=1e-5, seq=64, theta=10000,
           tie=False)
TOKENS = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(5))


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """A checkpoint megatron-core wrote (GQA, untied, vocabulary 96 padded to 128, after an Adam step)."""
    tmp = tmp_path_factory.mktemp("megatron")
    (logits,) = reference([dict(mode="make", model=GQA, seed=0, dir=str(tmp / "mcore"), iteration=7,
                                tokens=TOKENS.tolist())])
    assert cli("convert", "--from", "megatron", "--input", tmp / "mcore", "--output", tmp / "ours") == 0
    return tmp, torch.tensor(logits["logits"])


def test_megatron_core_checkpoint_round_trips_with_logits_and_adam_state(made, tmp_path):
    tmp, ref = made
    cfg, state = consolidate_training_checkpoint(tmp / "ours")
    assert (cfg.n_heads, cfg.kv_heads, cfg.vocab_size, cfg.ffn_hidden_size, cfg.tie_embeddings) == (4, 2, 96, 96, False)
    assert (megallama_logits(state, cfg, TOKENS) - ref).abs().max().item() <= TOL
    tag = resolve_checkpoint(tmp / "ours")
    assert json.loads((tag / "meta.json").read_text())["step"] == 7
    reader = UniversalReader(tag / "universal")
    for name in reader.names():  # each moment landed on its own parameter, in megallama's layout
        master = reader.full(name)
        assert torch.equal(reader.full(name, "exp_avg"), 3 * master), name
        assert torch.equal(reader.full(name, "exp_avg_sq"), master ** 2), name
    # back to Megatron (with the optimizer), and a tied model exported from megallama: megatron-core
    # loads both strictly, with its own keys, logits and (for the first) Adam state
    assert cli("convert", "--from", "megallama", "--to", "megatron", "--input", tmp / "ours",
               "--output", tmp_path / "back") == 0
    tied = ModelConfig(dim=64, n_layers=2, n_heads=4, vocab_size=96, multiple_of=16, max_seq_len=64,
                       tie_embeddings=True, rope_theta=20000.0)
    tied_state = build_model(tied, ParallelState(), seed=1).state_dict()
    save_consolidated(tied_state, tied, tmp_path / "tied")
    assert cli("convert", "--to", "megatron", "--input", tmp_path / "tied", "--output", tmp_path / "tied_meg") == 0
    tied_model = dict(GQA, layers=2, groups=4, ffn=tied.ffn_hidden_size, tie=True, theta=20000)
    back, tied_back = reference([dict(mode="load", model=GQA, seed=1, dir=str(tmp_path / "back"), iteration=7,
                                      tokens=TOKENS.tolist()),
                                 dict(mode="load", model=tied_model, seed=2, dir=str(tmp_path / "tied_meg"),
                                      iteration=0, tokens=TOKENS.tolist())])
    for got in (back, tied_back):
        assert got["keys"] == got["reference_keys"]
    assert (torch.tensor(back["logits"]) - ref).abs().max().item() <= TOL
    assert back["moment_error"] == 0.0
    tied_ref = megallama_logits(tied_state, tied, TOKENS)
    assert (torch.tensor(tied_back["logits"]) - tied_ref).abs().max().item() <= TOL


def _file(root, tp_rank, stage, pp):
    name = f"mp_rank_{tp_rank:02d}" + (f"_{stage:03d}" if pp > 1 else "")
    data = load_file(next(Path(root).glob(f"iter_*/{name}/model_optim_rng.pt")))  # megatron itself not imported
    data["args"].attention_backend = "auto"  # an inert record here; a plain string when saved again
    return data


def test_tp2_pp2_files_follow_megatrons_layout_and_read_back(made, tmp_path):
    tmp, ref = made
    assert cli("convert", "--from", "megatron", "--to", "megatron", "--tp", "2", "--pp", "2", "--input",
               tmp / "mcore", "--output", tmp_path / "tp2pp2") == 0
    one = _file(tmp / "mcore", 0, 0, 1)["model"]
    for stage in range(2):
        for t in range(2):
            got = _file(tmp_path / "tp2pp2", t, stage, 2)["model"]
            for i in range(2):  # stage s holds global layers 2s, 2s+1 as its layers 0, 1
                src, dst = f"decoder.layers.{2 * stage + i}.", f"decoder.layers.{i}."
                # Megatron's shards: QKV groups and fc1's [gate; up] per rank, row-parallel by columns
                gate, up = one[src + "mlp.linear_fc1.weight"].chunk(2)
                assert torch.equal(got[dst + "self_attention.linear_qkv.weight"],
                                   one[src + "self_attention.linear_qkv.weight"].chunk(2)[t])
                assert torch.equal(got[dst + "mlp.linear_fc1.weight"], torch.cat([gate.chunk(2)[t], up.chunk(2)[t]]))
                for name in ("self_attention.linear_proj.weight", "mlp.linear_fc2.weight"):
                    assert torch.equal(got[dst + name], one[src + name].chunk(2, dim=1)[t])
                assert torch.equal(got[dst + "input_layernorm.weight"], one[src + "input_layernorm.weight"])
    # the vocabulary is re-padded for TP=2 (96 real rows of 256) and split by rows
    emb = torch.cat([_file(tmp_path / "tp2pp2", t, 0, 2)["model"]["embedding.word_embeddings.weight"] for t in (0, 1)])
    assert emb.shape[0] == 256 and torch.equal(emb[:96], one["embedding.word_embeddings.weight"][:96])
    assert not emb[96:].any()
    # and read back: the same logits and Adam state as from the megatron-core file itself
    assert cli("convert", "--from", "megatron", "--input", tmp_path / "tp2pp2", "--output", tmp_path / "ours") == 0
    cfg, state = consolidate_training_checkpoint(tmp_path / "ours")
    assert (megallama_logits(state, cfg, TOKENS) - ref).abs().max().item() <= TOL
    a, b = (UniversalReader(resolve_checkpoint(p) / "universal") for p in (tmp / "ours", tmp_path / "ours"))
    for name in a.names():
        for key in (None, "exp_avg", "exp_avg_sq"):
            assert torch.equal(a.full(name, key), b.full(name, key)), (name, key)


def test_megallama_weights_round_trip_at_tp2_pp2(tmp_path):
    cfg = ModelConfig(dim=64, n_layers=4, n_heads=4, n_kv_heads=2, vocab_size=100, multiple_of=16, max_seq_len=64,
                      tie_embeddings=True)
    state = build_model(cfg, ParallelState(), seed=4).state_dict()
    state = {k: v + 0.1 * torch.randn_like(v) if k.endswith("norm.weight") else v for k, v in state.items()}
    save_consolidated(state, cfg, tmp_path / "ours")
    assert cli("convert", "--to", "megatron", "--tp", "2", "--pp", "2", "--dtype", "bfloat16", "--input",
               tmp_path / "ours", "--output", tmp_path / "meg") == 0
    last = _file(tmp_path / "meg", 1, 1, 2)
    assert last["args"].padded_vocab_size == 256 and last["model"]["output_layer.weight"].dtype == torch.bfloat16
    assert cli("convert", "--from", "megatron", "--input", tmp_path / "meg", "--output", tmp_path / "back") == 0
    got_cfg, got = load_consolidated(tmp_path / "back")
    assert got_cfg == cfg and set(got) == set(state)
    for name, value in state.items():
        assert torch.equal(got[name], value.to(torch.bfloat16)), name


def test_resume_after_a_trip_through_megatron_continues_the_loss(tmp_path, data_cache):
    """Through the distributed optimizer's flat buffers (the plain optimizer's state is shown equal
    after the same trip above)."""
    cfg = tiny_run_config(tmp_path, data_cache)
    base = ["train.steps=4", "checkpoint.every=2"]
    ref = run_train(cfg, base + [f"run_dir={tmp_path / 'ref'}"])["losses"]
    src = tmp_path / "ref" / "checkpoints" / "step00000002"
    assert cli("convert", "--to", "megatron", "--tp", "2", "--distributed-optimizer", "--input", src,
               "--output", tmp_path / "meg") == 0
    assert (tmp_path / "meg" / "iter_0000002" / "mp_rank_01" / "distrib_optim.pt").is_file()
    assert cli("convert", "--from", "megatron", "--input", tmp_path / "meg", "--output", tmp_path / "back") == 0
    got = run_train(cfg, base + [f"checkpoint.load={tmp_path / 'back'}", f"run_dir={tmp_path / 'resumed'}"])
    assert got["start_step"] == 2
    for a, b in zip(got["losses"], ref[2:]):
        assert abs(a - b) < 2e-4 * b, (got["losses"], ref)


class _Runs:
    def __reduce__(self):
        return (os.system, ("touch " + str(Path(os.environ["MEGATRON_MARKER"])),))


def test_a_file_with_another_global_is_refused_unrun(made, tmp_path, monkeypatch, capsys):
    tmp, _ = made
    bad = tmp_path / "bad"
    rank = bad / "iter_0000007" / "mp_rank_00"
    rank.mkdir(parents=True)
    (bad / "latest_checkpointed_iteration.txt").write_text("7")
    data = _file(tmp / "mcore", 0, 0, 1)
    marker = tmp_path / "ran"
    monkeypatch.setenv("MEGATRON_MARKER", str(marker))
    data["rng_state"] = [_Runs()]
    torch.save(data, rank / "model_optim_rng.pt")
    assert main(["convert", "--from", "megatron", "--input", str(bad), "--output", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "model_optim_rng.pt" in err and "system" in err, err
    assert not marker.exists() and not (tmp_path / "out").exists()


@pytest.mark.parametrize("damage,expected", [
    ("torch_dist", "torch_dist"), ("no_swiglu", "swiglu"), ("missing_rank", "missing"), ("tracker", "iteration")])
def test_bad_megatron_inputs_are_one_line(made, tmp_path, capsys, damage, expected):
    import shutil

    tmp, _ = made
    bad = tmp_path / "bad"
    shutil.copytree(tmp / "mcore", bad)
    it = bad / "iter_0000007"
    if damage == "torch_dist":
        (it / ".metadata").write_bytes(b"")
    elif damage == "no_swiglu":
        data = _file(bad, 0, 0, 1)
        data["args"].swiglu = False
        torch.save(data, tmp_path / "new.pt")  # not over the file its tensors are mapped from
        os.replace(tmp_path / "new.pt", it / "mp_rank_00" / "model_optim_rng.pt")
    elif damage == "missing_rank":
        shutil.copytree(it / "mp_rank_00", it / "mp_rank_01_001")
    else:
        (bad / "latest_checkpointed_iteration.txt").write_text("seven")
    assert main(["convert", "--from", "megatron", "--input", str(bad), "--output", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and expected in err, err
    assert not (tmp_path / "out").exists()


def test_older_and_transformer_engine_names_read_the_same(made, tmp_path):
    """Megatron-LM's pre-core models (nested ``language_model``, ``query_key_value``, ``dense_h_to_4h``)
    and Transformer Engine's fused-norm names (``linear_qkv.layer_norm_weight``) give the same weights."""
    tmp, _ = made
    data = _file(tmp / "mcore", 0, 0, 1)
    model = {k: v for k, v in data["model"].items() if isinstance(v, torch.Tensor)}
    data.pop("optimizer")
    legacy = {"embedding": {"word_embeddings": {"weight": model.pop("embedding.word_embeddings.weight")}},
              "output_layer": {"weight": model.pop("output_layer.weight")}, "encoder": {}}
    te = dict(data["model"])
    for name, value in model.items():
        old = (name.replace("decoder.", "").replace("self_attention.linear_qkv", "self_attention.query_key_value")
               .replace("self_attention.linear_proj", "self_attention.dense").replace("pre_mlp_layernorm",
                                                                                      "post_attention_layernorm")
               .replace("linear_fc1", "dense_h_to_4h").replace("linear_fc2", "dense_4h_to_h"))
        legacy["encoder"][old] = value
        te_name = name.replace("input_layernorm.weight", "self_attention.linear_qkv.layer_norm_weight").replace(
            "pre_mlp_layernorm.weight", "mlp.linear_fc1.layer_norm_weight")
        te[te_name] = te.pop(name)
    outs = []
    for kind, weights in (("legacy", {"language_model": legacy}), ("te", te)):
        root = tmp_path / kind
        (root / "iter_0000007" / "mp_rank_00").mkdir(parents=True)
        (root / "latest_checkpointed_iteration.txt").write_text("7")
        torch.save({**data, "model": weights}, root / "iter_0000007" / "mp_rank_00" / "model_optim_rng.pt")
        assert cli("convert", "--from", "megatron", "--input", root, "--output", tmp_path / f"{kind}_out") == 0
        outs.append(load_consolidated(tmp_path / f"{kind}_out")[1])
    _, ref = consolidate_training_checkpoint(tmp / "ours")  # from the megatron-core names, Adam masters
    for name, value in ref.items():
        for got in outs:
            assert torch.equal(got[name], value), name


def test_bf16_export_keeps_fp32_masters_in_megatrons_float16_optimizer_form(made, tmp_path):
    tmp, _ = made
    assert cli("convert", "--to", "megatron", "--dtype", "bfloat16", "--input", tmp / "ours",
               "--output", tmp_path / "meg") == 0
    data = _file(tmp_path / "meg", 0, 0, 1)
    assert data["model"]["output_layer.weight"].dtype == torch.bfloat16 and data["args"].bf16
    assert set(data["optimizer"]) == {"optimizer", "fp32_from_fp16_params"}
    assert cli("convert", "--from", "megatron", "--input", tmp_path / "meg", "--output", tmp_path / "back") == 0
    a, b = (UniversalReader(resolve_checkpoint(p) / "universal") for p in (tmp / "ours", tmp_path / "back"))
    for name in a.names():  # masters from fp32_from_fp16_params, not the bf16 weights
        for key in (None, "exp_avg", "exp_avg_sq"):
            assert torch.equal(a.full(name, key), b.full(name, key)), (name, key)
