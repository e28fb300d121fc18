"""megatron-core ``torch_dist`` checkpoints: a directory written by megatron-core's own
``dist_checkpointing.save`` of its GPTModel's ``sharded_state_dict`` and Adam's model-space state
(on CPU, gloo) converts to megallama with its logits (fp32, <= 1e-4) and Adam moments; the per-layer
key form reads the same; a crafted ``common.pt`` or ``.metadata`` is refused without running."""
import json
import os
import pickle
import shutil

import pytest
import torch

from megallama.checkpoint.dcp_safe import SafeDcpReader
from megallama.checkpoint.reshard import consolidate_training_checkpoint, resolve_checkpoint
from megallama.cli import main
from megallama.train.universal import UniversalReader
from tests.megatron_reference import reference
from tests.test_megatron_interop import GQA, TOKENS, TOL, _Runs, cli, megallama_logits


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """A torch_dist checkpoint megatron-core wrote (GQA, untied, vocabulary 96 padded to 128, after an Adam
    step), then converted to megallama and back to torch_dist and loaded by megatron-core into a fresh
    model and optimizer (one process: megatron-core's import is the slow part)."""
    tmp = tmp_path_factory.mktemp("torch_dist")
    src, ours, back = (str(tmp / n) for n in ("mcore", "ours", "back"))
    convert = [["convert", "--from", "megatron", "--input", src, "--output", ours],
               ["convert", "--to", "megatron", "--format", "torch_dist", "--input", ours, "--output", back]]
    made, loaded = reference([
        dict(kind="torch_dist", mode="make", model=GQA, seed=0, dir=src, iteration=7, tokens=TOKENS.tolist()),
        dict(kind="torch_dist", mode="load", model=GQA, seed=1, dir=back, iteration=7, tokens=TOKENS.tolist(),
             convert=convert)])
    return tmp, torch.tensor(made["logits"]), loaded


def test_torch_dist_checkpoint_converts_with_logits_and_adam_state(made, tmp_path):
    tmp, ref, _ = made
    it = tmp / "mcore" / "iter_0000007"
    assert {".metadata", "common.pt", "metadata.json"} <= {p.name for p in it.iterdir()}
    stored = SafeDcpReader(it).tensors  # megatron-core stacked its layers on a leading axis
    assert stored["decoder.layers.self_attention.linear_qkv.weight"][0] == (4, 128, 64)
    assert "optimizer.state.exp_avg.decoder.layers.mlp.linear_fc1.weight" in stored
    assert cli("convert", "--from", "megatron", "--input", tmp / "mcore", "--output", tmp_path / "ours") == 0
    cfg, state = consolidate_training_checkpoint(tmp_path / "ours")
    assert (cfg.n_heads, cfg.kv_heads, cfg.vocab_size, cfg.ffn_hidden_size, cfg.n_layers) == (4, 2, 96, 96, 4)
    assert (megallama_logits(state, cfg, TOKENS) - ref).abs().max().item() <= TOL
    # the parity check can fail: gate and up of one layer swapped moves the logits well past it
    gate, up = state["layers.1.feed_forward.w13.weight"].chunk(2)
    swapped = {**state, "layers.1.feed_forward.w13.weight": torch.cat([up, gate])}
    assert (megallama_logits(swapped, cfg, TOKENS) - ref).abs().max().item() > 10 * TOL
    tag = resolve_checkpoint(tmp_path / "ours")
    meta = json.loads((tag / "meta.json").read_text())
    assert (meta["step"], meta["consumed_samples"]) == (7, 448)
    reader = UniversalReader(tag / "universal")
    for name in reader.names():  # each moment landed on its own parameter, in megallama's layout
        master = reader.full(name)
        assert torch.equal(reader.full(name, "exp_avg"), 3 * master), name
        assert torch.equal(reader.full(name, "exp_avg_sq"), master ** 2), name


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_per_layer_keys_read_the_same(made, tmp_path):
    """Non-homogeneous blocks key each layer (``decoder.layers.3.…``): written here with DCP from the
    stacked file, they convert to the same weights and moments."""
    import torch.distributed.checkpoint as dcp

    tmp, _, _ = made
    src = tmp / "mcore" / "iter_0000007"
    reader = SafeDcpReader(src)
    flat = {}
    for fqn, (shape, _) in reader.tensors.items():
        head, sep, rest = fqn.partition("decoder.layers.")
        value = reader.load(fqn)
        if sep:
            flat.update({f"{head}decoder.layers.{i}.{rest}": value[i].clone() for i in range(shape[0])})
        else:
            flat[fqn] = value
    dst = tmp_path / "per_layer" / "iter_0000007"
    dcp.save(flat, storage_writer=dcp.FileSystemWriter(str(dst)), no_dist=True)
    for f in ("common.pt", "metadata.json"):
        shutil.copy(src / f, dst / f)
    (tmp_path / "per_layer" / "latest_checkpointed_iteration.txt").write_text("7")
    for name in ("stacked", "per_layer"):
        root = tmp / "mcore" if name == "stacked" else tmp_path / name
        assert cli("convert", "--from", "megatron", "--input", root, "--output", tmp_path / f"{name}_out") == 0
    a, b = (UniversalReader(resolve_checkpoint(tmp_path / f"{n}_out") / "universal") for n in ("stacked", "per_layer"))
    for name in a.names():
        for key in (None, "exp_avg", "exp_avg_sq"):
            assert torch.equal(a.full(name, key), b.full(name, key)), (name, key)


def test_torch_dist_export_loads_in_megatron_core_with_logits_and_adam_state(made):
    """megallama -> torch_dist: megatron-core's own dist_checkpointing.load fills its model and Adam
    state (strictly: every sharded key present), with the logits of the original checkpoint."""
    tmp, ref, loaded = made
    assert (torch.tensor(loaded["logits"]) - ref).abs().max().item() <= TOL
    assert loaded["moment_error"] == 0.0 and all(loaded["common"])
    stored = SafeDcpReader(tmp / "back" / "iter_0000007").tensors
    assert stored["decoder.layers.mlp.linear_fc1.weight"][0] == (4, 192, 64)  # stacked, as megatron-core writes


def test_row_block_chunks_read_back_the_same(made, tmp_path, monkeypatch):
    """A tensor larger than a block is written as several chunks per layer; DCP reassembles them."""
    from megallama.checkpoint import megatron_dist_write

    tmp, _, _ = made
    monkeypatch.setattr(megatron_dist_write, "CHUNK_BYTES", 4096)
    assert cli("convert", "--to", "megatron", "--format", "torch_dist", "--input", tmp / "ours",
               "--output", tmp_path / "td") == 0
    meta = SafeDcpReader(tmp_path / "td" / "iter_0000007").meta.state_dict_metadata
    assert len(meta["decoder.layers.mlp.linear_fc1.weight"].chunks) == 4 * 12  # 192 rows of 256 B, 16 a block
    assert cli("convert", "--from", "megatron", "--input", tmp_path / "td", "--output", tmp_path / "back") == 0
    a, b = (UniversalReader(resolve_checkpoint(p) / "universal") for p in (tmp / "ours", tmp_path / "back"))
    for name in a.names():
        for key in (None, "exp_avg", "exp_avg_sq"):
            assert torch.equal(a.full(name, key), b.full(name, key)), (name, key)


@pytest.mark.parametrize("target", ["common.pt", ".metadata"])
def test_a_crafted_common_pt_or_metadata_is_refused_unrun(made, tmp_path, monkeypatch, capsys, target):
    tmp, _, _ = made
    bad = tmp_path / "bad"
    shutil.copytree(tmp / "mcore", bad)
    marker = tmp_path / "ran"
    monkeypatch.setenv("MEGATRON_MARKER", str(marker))
    f = bad / "iter_0000007" / target
    if target == "common.pt":
        torch.save({"args": _Runs(), "iteration": 7}, f)
    else:
        f.write_bytes(pickle.dumps(_Runs()))
    assert main(["convert", "--from", "megatron", "--input", str(bad), "--output", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and target in err and "system" in err, err
    assert not marker.exists() and not (tmp_path / "out").exists()


@pytest.mark.parametrize("damage,expected", [("backend", "sharded_backend"), ("no_json", "metadata.json"),
                                             ("layers", "num_layers")])
def test_bad_torch_dist_inputs_are_one_line(made, tmp_path, capsys, damage, expected):
    tmp, _, _ = made
    bad = tmp_path / "bad"
    shutil.copytree(tmp / "mcore", bad)
    it = bad / "iter_0000007"
    if damage == "backend":
        (it / "metadata.json").write_text(json.dumps({"sharded_backend": "zarr"}))
    elif damage == "no_json":
        os.remove(it / "metadata.json")
    else:
        from megallama.checkpoint.megatron_files import load_file

        data = load_file(it / "common.pt")
        data["args"].num_layers = 3
        data["args"].attention_backend = "auto"
        torch.save(data, it / "common.pt")
    assert main(["convert", "--from", "megatron", "--input", str(bad), "--output", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and expected in err, err
    assert not (tmp_path / "out").exists()
