"""Megatron's distributed optimizer (legacy ``distrib_optim.pt``): a checkpoint written by
megatron-core's own DistributedOptimizer (on CPU, gloo, DP=1, several grad buckets, parameters whose
sizes leave alignment padding) converts to megallama with its logits (fp32, <= 1e-4) and Adam
moments, from its legacy ``distrib_optim.pt`` and torch_dist's ``dp_reshardable`` buckets;
megallama's ``--distributed-optimizer`` exports (legacy, and torch_dist's ``fully_reshardable``)
load back into megatron-core's DistributedOptimizer with the same logits and moments; a wrong
bucket order or bucket split fails."""
import json

import pytest
import torch

from megallama.checkpoint import megatron_dopt
from megallama.checkpoint.reshard import consolidate_training_checkpoint, resolve_checkpoint
from megallama.cli import main
from megallama.train.universal import UniversalReader
from tests.megatron_reference import reference
from tests.test_megatron_interop import GQA, TOKENS, TOL, cli, megallama_logits

# 48-element norms start 64-aligned, so the buffer holds padding; buckets of 2330 elements close
# after a norm at an unaligned offset, so a layout that ignored the buckets would be 32 elements long
MODEL = dict(GQA, hidden=48, layers=2, ffn=80)
BUCKET = 2330


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """megatron-core's checkpoint (after an Adam step, moments 3w and w**2 of each weight w), converted
    to megallama and back with --distributed-optimizer, then loaded by megatron-core (one process)."""
    tmp = tmp_path_factory.mktemp("dopt")
    src, ours, back, back_td = (str(tmp / n) for n in ("mcore", "ours", "back", "back_td"))
    convert = [["convert", "--from", "megatron", "--input", src, "--output", ours],
               ["convert", "--to", "megatron", "--distributed-optimizer", "--input", ours, "--output", back],
               ["convert", "--to", "megatron", "--format", "torch_dist", "--distributed-optimizer", "--input", ours,
                "--output", back_td]]
    made, loaded, loaded_td = reference([
        dict(mode="make", model=MODEL, seed=0, dir=src, iteration=7, tokens=TOKENS.tolist(),
             dopt={"bucket": BUCKET, "torch_dist": str(tmp / "mcore_dist")}),
        dict(mode="load", model=MODEL, seed=1, dir=back, iteration=7, tokens=TOKENS.tolist(), dopt={"bucket": None},
             convert_first=convert),
        dict(mode="load", model=MODEL, seed=2, dir=back_td, iteration=7, tokens=TOKENS.tolist(),
             dopt={"bucket": BUCKET, "torch_dist": True})])
    return tmp, torch.tensor(made["logits"]), (loaded, loaded_td)


def _moments_follow_masters(path):
    reader = UniversalReader(resolve_checkpoint(path) / "universal")
    for name in reader.names():  # each moment landed on its own parameter, in megallama's layout
        master = reader.full(name)
        assert torch.equal(reader.full(name, "exp_avg"), 3 * master), name
        assert torch.equal(reader.full(name, "exp_avg_sq"), master ** 2), name


def test_megatron_core_distributed_optimizer_checkpoint_round_trips(made):
    tmp, ref, loaded = made
    rank = tmp / "mcore" / "iter_0000007" / "mp_rank_00"
    assert (rank / "distrib_optim.pt").is_file()
    cfg, state = consolidate_training_checkpoint(tmp / "ours")
    assert (cfg.dim, cfg.n_heads, cfg.kv_heads, cfg.ffn_hidden_size, cfg.n_layers) == (48, 4, 2, 80, 2)
    assert (megallama_logits(state, cfg, TOKENS) - ref).abs().max().item() <= TOL
    meta = json.loads((resolve_checkpoint(tmp / "ours") / "meta.json").read_text())
    assert (meta["step"], meta["consumed_samples"]) == (7, 448)
    _moments_follow_masters(tmp / "ours")
    # megallama's exports, loaded by megatron-core's DistributedOptimizer (legacy: param groups, then
    # load_parameter_state; torch_dist: dist_checkpointing.load of its fully_reshardable sharded state
    # dict, into buckets of another size): its masters, moments and logits are the original checkpoint's
    legacy, td = loaded
    assert legacy["keys"] == legacy["reference_keys"]
    assert {k for k in td["reference_keys"] if not k.endswith("_extra_state")} <= set(td["keys"])
    for got in (legacy, td):
        assert got["moment_error"] == 0.0
        assert (torch.tensor(got["logits"]) - ref).abs().max().item() <= TOL


def test_torch_dist_dp_reshardable_buckets_read_the_same(made, tmp_path):
    """megatron-core's torch_dist save of the same run, its optimizer in Megatron-LM's default
    ``dp_reshardable`` form (a tensor per grad bucket), converts to the same weights and Adam state."""
    from megallama.checkpoint.dcp_safe import SafeDcpReader

    tmp, _, _ = made
    stored = SafeDcpReader(tmp / "mcore_dist" / "iter_0000007").tensors
    assert "optimizer.distributed.dp_group_idx_0.gbuf_idx_0.dtype_(torch.float32, torch.float32).bucket_idx_9." \
        "exp_avg" in stored and not any(k.startswith("optimizer.state.") for k in stored)
    assert cli("convert", "--from", "megatron", "--input", tmp / "mcore_dist" / "iter_0000007", "--output",
               tmp_path / "td") == 0
    a, b = (UniversalReader(resolve_checkpoint(p) / "universal") for p in (tmp / "ours", tmp_path / "td"))
    for name in a.names():
        for key in (None, "exp_avg", "exp_avg_sq"):
            assert torch.equal(a.full(name, key), b.full(name, key)), (name, key)


def test_tp2_pp2_distributed_optimizer_files_read_back_the_same(made, tmp_path):
    tmp, _, _ = made
    assert cli("convert", "--to", "megatron", "--tp", "2", "--pp", "2", "--distributed-optimizer", "--dtype",
               "bfloat16", "--input", tmp / "ours", "--output", tmp_path / "meg") == 0
    assert len(list((tmp_path / "meg").glob("iter_0000007/mp_rank_*/distrib_optim.pt"))) == 4
    assert cli("convert", "--from", "megatron", "--input", tmp_path / "meg", "--output", tmp_path / "back") == 0
    a, b = (UniversalReader(resolve_checkpoint(p) / "universal") for p in (tmp / "ours", tmp_path / "back"))
    for name in a.names():  # fp32 masters from the buffers, not the bf16 weights
        for key in (None, "exp_avg", "exp_avg_sq"):
            assert torch.equal(a.full(name, key), b.full(name, key)), (name, key)


def test_a_wrong_bucket_order_or_split_fails(made, tmp_path, monkeypatch, capsys):
    """Parameters placed in model order instead of Megatron's reverse: written so, the buffers are as
    long, and their masters differ from the weights, which refuses them (without that check they would
    land on the wrong parameters: the logits show it); read so from megatron-core's bucketed file, or
    with its buckets ignored, the lengths disagree and the conversion is refused."""
    tmp, ref, _ = made
    real, real_check = megatron_dopt.flat_layout, megatron_dopt.check_masters

    def model_order(numels, own, size):
        offsets, total = real(numels[::-1], own[::-1], size)
        return offsets[::-1], total
    monkeypatch.setattr(megatron_dopt, "flat_layout", model_order)
    assert cli("convert", "--to", "megatron", "--distributed-optimizer", "--input", tmp / "ours", "--output",
               tmp_path / "wrong") == 0
    monkeypatch.setattr(megatron_dopt, "flat_layout", real)
    capsys.readouterr()
    assert main(["convert", "--from", "megatron", "--input", str(tmp_path / "wrong"), "--output",
                 str(tmp_path / "back")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "master of 'embedding.word_embeddings.weight' is not its weight" in err
    monkeypatch.setattr(megatron_dopt, "check_masters", lambda rows, where: None)
    assert cli("convert", "--from", "megatron", "--input", tmp_path / "wrong", "--output", tmp_path / "back") == 0
    monkeypatch.setattr(megatron_dopt, "check_masters", real_check)
    cfg, state = consolidate_training_checkpoint(tmp_path / "back")
    assert (megallama_logits(state, cfg, TOKENS) - ref).abs().max().item() > 10 * TOL
    for name, layout in (("forward", model_order), ("one_bucket", lambda n, own, size: real(n, own, None))):
        monkeypatch.setattr(megatron_dopt, "flat_layout", layout)
        capsys.readouterr()
        assert main(["convert", "--from", "megatron", "--input", str(tmp / "mcore"), "--output",
                     str(tmp_path / name)]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "distrib_optim.pt" in err and "holds 49440 elements" in err, err
        assert not (tmp_path / name).exists()


@pytest.mark.parametrize("damage,expected", [("legacy", "coalesced"), ("short", "'exp_avg_sq'")])
def test_a_bad_distrib_optim_file_is_one_line(made, tmp_path, capsys, damage, expected):
    import shutil

    from megallama.checkpoint.megatron_files import load_file

    tmp, _, _ = made
    shutil.copytree(tmp / "mcore", tmp_path / "bad")
    f = tmp_path / "bad" / "iter_0000007" / "mp_rank_00" / "distrib_optim.pt"
    data = {k: v for k, v in load_file(f).items()}
    if damage == "legacy":  # the pre-2024 form: a list of per-bucket tensors
        data.pop("buckets_coalesced")
    else:
        flat = next(iter(data[0].values()))
        flat["exp_avg_sq"] = flat["exp_avg_sq"][:-1].clone()
    torch.save(data, tmp_path / "new.pt")
    f.unlink()
    (tmp_path / "new.pt").rename(f)
    assert main(["convert", "--from", "megatron", "--input", str(tmp_path / "bad"), "--output",
                 str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and expected in err and "distrib_optim.pt" in err, err
    assert not (tmp_path / "out").exists()


def test_the_flag_needs_a_megatron_output_and_adam_state(made, tmp_path, capsys):
    from megallama import ModelConfig
    from megallama.checkpoint import save_consolidated
    from megallama.model import build_model
    from megallama.parallel import ParallelState

    tmp, _, _ = made
    cfg = ModelConfig(dim=64, n_layers=2, n_heads=4, vocab_size=96, multiple_of=16, max_seq_len=64)
    save_consolidated(build_model(cfg, ParallelState(), seed=0).state_dict(), cfg, tmp_path / "weights")
    for argv, expected in ((["--to", "hf", "--input", tmp / "ours"], "--distributed-optimizer: only for a --to "
                            "megatron output"),
                           (["--to", "megatron", "--input", tmp_path / "weights"], "holds no Adam state")):
        capsys.readouterr()
        assert main(["convert", "--distributed-optimizer", "--output", str(tmp_path / "out")]
                    + [str(a) for a in argv]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and expected in err, err
        assert not (tmp_path / "out").exists()
