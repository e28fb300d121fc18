"""torchtitan's DCP format both ways. A checkpoint written the way torchtitan writes one (DCP's own
``dcp.save`` of a transformers Llama under the names torchtitan's HF adapter gives, Adam flattened
by torch's ``get_optimizer_state_dict``) imports with transformers' logits (fp32, <= 1e-4) and its
moments in our layout; exported again, torchtitan's own load calls restore weights and Adam state
exactly. A megallama training checkpoint goes through DCP and back unchanged and resumes the loss;
an export reads in transformers through torchtitan's mapping with our logits. FSDP-sharded saves
reshard on load; hostile pickles are refused without running."""
import json
import os
import pickle
import subprocess
import sys

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, set_model_state_dict,
                                                     set_optimizer_state_dict)

from megallama.checkpoint.reshard import consolidate_training_checkpoint, resolve_checkpoint
from megallama.cli import main
from megallama.model import build_model
from megallama.parallel import ParallelState
from megallama.train.universal import UniversalReader
from tests.dist_utils import free_port
from tests.train_utils import ROOT, env, run_train, tiny_run_config

TOL = 1e-4
FLAT = StateDictOptions(flatten_optimizer_state_dict=True)  # as torchtitan's OptimizersContainer
SCALING = dict(factor=4.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=32)
PARAMS = {"dim": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "vocab_size": 96, "multiple_of": 32,
          "norm_eps": 1e-5, "rope_theta": 10000.0,  # torchtitan's model args; its RoPE scaling named its way:
          "rope_scaling_args": {"scaling_factor": 4.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                "original_max_position_embeddings": 32}}
# transformers name -> torchtitan's (its Llama3StateDictAdapter.from_hf_map)
FROM_HF = {"model.embed_tokens.weight": "tok_embeddings.weight", "model.norm.weight": "norm.weight",
           "lm_head.weight": "output.weight"}
LAYER = {"self_attn.q_proj": "attention.wq", "self_attn.k_proj": "attention.wk", "self_attn.v_proj": "attention.wv",
         "self_attn.o_proj": "attention.wo", "mlp.gate_proj": "feed_forward.w1", "mlp.up_proj": "feed_forward.w3",
         "mlp.down_proj": "feed_forward.w2", "input_layernorm": "attention_norm",
         "post_attention_layernorm": "ffn_norm"}


def hf_to_titan_rows(w, heads):  # torchtitan's adapter, _reverse_permute (HF rotate-half -> complex pairs)
    d1, d2 = w.shape
    return w.view(heads, 2, d1 // heads // 2, d2).transpose(1, 2).reshape(d1, d2)


def titan_to_hf_rows(w, heads):  # torchtitan's adapter, _permute
    d1, d2 = w.shape
    return w.view(heads, d1 // heads // 2, 2, d2).transpose(1, 2).reshape(d1, d2)


def titan_names(n_layers):
    names = dict(FROM_HF)
    for i in range(n_layers):
        names.update({f"model.layers.{i}.{h}.weight": f"layers.{i}.{t}.weight" for h, t in LAYER.items()})
    return names


def hf_to_titan(hf_state, heads, kv_heads):
    out = {}
    for hf, titan in titan_names(len({k.split(".")[2] for k in hf_state if ".layers." in k})).items():
        w = hf_state[hf]
        out[titan] = hf_to_titan_rows(w, heads if "q_proj" in hf else kv_heads) if "q_proj" in hf or "k_proj" in hf \
            else w
    return out


def titan_to_hf(titan_state, heads, kv_heads):
    back = {t: h for h, t in titan_names(len({k.split(".")[1] for k in titan_state if k.startswith("layers.")}))
            .items()}
    return {back[k]: titan_to_hf_rows(v, heads if ".wq." in k else kv_heads) if ".wq." in k or ".wk." in k else v
            for k, v in titan_state.items()}


def titan_module(state):
    """A module whose parameter names are torchtitan's (its Transformer's FQNs)."""
    root = torch.nn.Module()
    for name, t in state.items():
        *path, leaf = name.split(".")
        mod = root
        for part in path:
            if not hasattr(mod, part):
                mod.add_module(part, torch.nn.Module())
            mod = getattr(mod, part)
        mod.register_parameter(leaf, torch.nn.Parameter(t.detach().clone()))
    return root


def hf_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=192, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=96, max_position_embeddings=64, rms_norm_eps=1e-5,
                      rope_theta=10000.0, rope_scaling={"rope_type": "llama3", **SCALING})
    model = LlamaForCausalLM(cfg).float().eval()
    with torch.no_grad():  # norms perturbed and queries/keys enlarged: RoPE and every norm shape the logits
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            if name.endswith(("q_proj.weight", "k_proj.weight")):
                p.mul_(8.0)
    return model


def tokens(vocab=96, seq=48):
    return torch.randint(0, vocab, (2, seq), generator=torch.Generator().manual_seed(5))


def megallama_logits(state, cfg, x):
    model = build_model(cfg, ParallelState(), seed=None)
    model.load_state_dict(state)
    with torch.no_grad():
        return model.eval()(x)


def cli(*argv):
    return main([str(a) for a in argv])


def titan_training(model, steps=2):
    """torchtitan's AdamW + LambdaLR stepped ``steps`` times (random gradients), and the state dict
    its CheckpointManager hands ``dcp.save``."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 4))
    gen = torch.Generator().manual_seed(3)
    for _ in range(steps):
        for p in model.parameters():
            p.grad = torch.randn(p.shape, generator=gen)
        opt.step()
        sched.step()
    state = {**get_model_state_dict(model), "optimizer": get_optimizer_state_dict(model, opt, options=FLAT),
             "lr_scheduler": sched.state_dict(), "train_state": {"step": steps, "ntokens_seen": 96 * steps},
             "dataloader": {"world_size": 1, "dp_rank_0": pickle.dumps({"sample_idx": 7})}}
    return opt, sched, state


def titan_resume(path, names):
    """What torchtitan's CheckpointManager.load does: a fresh model and optimizer, DCP's load of
    model, optimizer, schedule and train state (not the dataloader), then the set_* calls."""
    model = titan_module({n: torch.zeros(s) for n, s in names.items()})
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 4))
    state = {**get_model_state_dict(model), "optimizer": get_optimizer_state_dict(model, opt, options=FLAT),
             "lr_scheduler": sched.state_dict(), "train_state": {"step": 0, "ntokens_seen": 0}}
    dcp.load(state, checkpoint_id=str(path))
    set_model_state_dict(model, {k: v for k, v in state.items() if k in names})
    set_optimizer_state_dict(model, opt, state["optimizer"], options=FLAT)
    sched.load_state_dict(state["lr_scheduler"])
    return model, opt, sched, state["train_state"]


def test_torchtitan_checkpoint_imports_with_transformers_logits_and_resumes_there(tmp_path):
    hf = hf_llama()
    model = titan_module(hf_to_titan(hf.state_dict(), 4, 2))
    opt, sched, state = titan_training(model)
    dcp.save(state, checkpoint_id=str(tmp_path / "titan"))
    (tmp_path / "params.json").write_text(json.dumps(PARAMS))
    titan = {k: v.detach() for k, v in model.named_parameters()}
    hf.load_state_dict(titan_to_hf(titan, 4, 2))  # the reference: the stepped weights, read by transformers
    x = tokens()
    with torch.no_grad():
        expected = hf(x).logits

    assert cli("convert", "--from", "dcp", "--params", tmp_path / "params.json", "--input", tmp_path / "titan",
               "--output", tmp_path / "ours") == 0
    cfg, ours = consolidate_training_checkpoint(tmp_path / "ours")  # Adam state: a training checkpoint
    assert (cfg.n_kv_heads, cfg.rope_scaling.factor, cfg.rope_scaling.original_max_seq_len) == (2, 4.0, 32)
    assert (megallama_logits(ours, cfg, x) - expected).abs().max() <= TOL
    assert cli("convert", "--from", "dcp", "--params", tmp_path / "params.json", "--input", tmp_path / "titan",
               "--output", tmp_path / "ours_tp2", "--tp", "2") == 0  # straight to another layout
    assert json.loads((resolve_checkpoint(tmp_path / "ours_tp2") / "meta.json").read_text())["tp"] == 2
    _, ours_tp2 = consolidate_training_checkpoint(tmp_path / "ours_tp2")
    assert (megallama_logits(ours_tp2, cfg, x) - expected).abs().max() <= TOL
    tag = resolve_checkpoint(tmp_path / "ours")
    assert json.loads((tag / "meta.json").read_text())["step"] == 2
    reader = UniversalReader(tag / "universal")
    params = dict(model.named_parameters())
    for key in ("exp_avg", "exp_avg_sq"):  # moments in our (transformers') row order, as torchtitan's to_hf maps
        for i in range(2):
            m = {n: opt.state[params[f"layers.{i}.attention.{n}.weight"]][key] for n in ("wq", "wk", "wv")}
            qkv = torch.cat([titan_to_hf_rows(m["wq"], 4), titan_to_hf_rows(m["wk"], 2), m["wv"]])
            assert torch.equal(reader.full(f"layers.{i}.attention.wqkv.weight", key), qkv)
            w13 = torch.cat([opt.state[params[f"layers.{i}.feed_forward.w{n}.weight"]][key] for n in (1, 3)])
            assert torch.equal(reader.full(f"layers.{i}.feed_forward.w13.weight", key), w13)

    # and back: torchtitan's own load calls restore its weights and Adam state exactly
    assert cli("convert", "--input", tmp_path / "ours", "--output", tmp_path / "back", "--to", "dcp") == 0
    model2, opt2, sched2, train_state = titan_resume(tmp_path / "back", {k: v.shape for k, v in titan.items()})
    assert train_state["step"] == 2 and sched2.last_epoch == 2
    params2 = dict(model2.named_parameters())
    for name, p in params.items():
        assert torch.equal(params2[name], p), name
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(opt2.state[params2[name]][key], opt.state[p][key]), (name, key)


def test_export_reads_in_transformers_through_torchtitans_mapping(tmp_path):
    """An export is in torchtitan's layout: mapped to transformers the way torchtitan's adapter
    does (its RoPE row order undone), it gives our logits."""
    from megallama.checkpoint.consolidated import load_consolidated, save_consolidated
    from megallama.config import ModelConfig
    from megallama.config.schema import RopeScaling

    cfg = ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=96, multiple_of=32, max_seq_len=64,
                      rope_scaling=RopeScaling(factor=4.0, original_max_seq_len=32))
    model = build_model(cfg, ParallelState(), seed=3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "wqkv" in name:
                p.mul_(8.0)
    save_consolidated(model.state_dict(), cfg, tmp_path / "ours")
    assert cli("convert", "--input", tmp_path / "ours", "--output", tmp_path / "titan", "--to", "dcp") == 0
    shapes = {n: s for n, s in [(k, tuple(v.shape)) for k, v in hf_to_titan(hf_llama().state_dict(), 4, 2).items()]}
    titan = {n: torch.zeros(s) for n, s in shapes.items()}
    dcp.load(titan, checkpoint_id=str(tmp_path / "titan"))
    hf = hf_llama()
    hf.load_state_dict(titan_to_hf(titan, 4, 2))
    x = tokens()
    with torch.no_grad():
        assert (hf(x).logits - megallama_logits(model.state_dict(), cfg, x)).abs().max() <= TOL
    params = json.loads((tmp_path / "titan" / "params.json").read_text())
    assert params["rope_scaling_args"]["scaling_factor"] == 4.0 and params["n_kv_heads"] == 2
    assert cli("convert", "--from", "dcp", "--input", tmp_path / "titan", "--output", tmp_path / "back") == 0
    cfg2, back = load_consolidated(tmp_path / "back")  # weights alone: a consolidated checkpoint, unchanged
    assert cfg2 == cfg and all(torch.equal(back[k], v) for k, v in model.state_dict().items())


@pytest.fixture(scope="module")
def trained(tmp_path_factory, data_cache):
    tmp = tmp_path_factory.mktemp("dcp")
    cfg = tiny_run_config(tmp, data_cache)
    base = ["train.steps=3", "checkpoint.every=2", "checkpoint.keep=2", "deepspeed.zero_optimization.stage=1"]
    ref = run_train(cfg, base + [f"run_dir={tmp / 'ref'}"])
    return cfg, tmp, base, ref["losses"]


def test_training_checkpoint_through_dcp_is_unchanged_and_resumes(trained):
    cfg, tmp, base, ref = trained
    src = tmp / "ref" / "checkpoints" / "step00000002"
    assert cli("convert", "--input", src, "--output", tmp / "titan", "--to", "dcp") == 0
    assert cli("convert", "--from", "dcp", "--input", tmp / "titan", "--output", tmp / "back") == 0
    a, b = UniversalReader(src / "universal"), UniversalReader(resolve_checkpoint(tmp / "back") / "universal")
    assert sorted(a.names()) == sorted(b.names())
    for name in a.names():
        for key in (None, "exp_avg", "exp_avg_sq"):
            assert torch.equal(a.full(name, key), b.full(name, key)), (name, key)
    meta = json.loads((resolve_checkpoint(tmp / "back") / "meta.json").read_text())
    orig = json.loads((src / "meta.json").read_text())
    assert (meta["step"], meta["consumed_samples"]) == (orig["step"], orig["consumed_samples"]) == (2, 16)
    mcfg, state = consolidate_training_checkpoint(tmp / "back")
    _, state0 = consolidate_training_checkpoint(src)
    x = tokens(mcfg.vocab_size, 32)
    assert (megallama_logits(state, mcfg, x) - megallama_logits(state0, mcfg, x)).abs().max() <= TOL
    got = run_train(cfg, base + [f"checkpoint.load={tmp / 'back'}", f"run_dir={tmp / 'resumed'}"])
    assert got["start_step"] == 2
    for x_, y in zip(got["losses"], ref[2:]):
        assert abs(x_ - y) < 2e-4 * y, (got["losses"], ref)


_SAVE_SHARDED = r"""
import sys, torch, torch.distributed as dist, torch.distributed.checkpoint as dcp
from torch.distributed.tensor import distribute_tensor, Shard, init_device_mesh
dist.init_process_group("gloo", init_method="tcp://127.0.0.1:" + sys.argv[2], rank=int(sys.argv[3]), world_size=2)
mesh = init_device_mesh("cpu", (2,))
full = torch.arange(96 * 64, dtype=torch.float32).reshape(96, 64)
dcp.save({"w": distribute_tensor(full, mesh, [Shard(0)])}, checkpoint_id=sys.argv[1])
dist.barrier()   # neither rank tears the group down while the other still uses it (gloo aborts)
dist.destroy_process_group()
"""


def test_fsdp_sharded_save_reshards_on_load(tmp_path):
    """Two ranks each save half of a tensor (FSDP's Shard(0)); the reader assembles it whole."""
    from megallama.checkpoint.dcp_safe import SafeDcpReader

    script = tmp_path / "save.py"
    script.write_text(_SAVE_SHARDED)
    port = str(free_port())
    procs = [subprocess.Popen([sys.executable, str(script), str(tmp_path / "ck"), port, str(rank)], stderr=subprocess.PIPE, text=True, env=env(), cwd=ROOT) for rank in (0, 1)]
    for proc in procs:
        assert proc.wait(timeout=120) == 0, proc.stderr.read()[-3000:]
    reader = SafeDcpReader(tmp_path / "ck")
    assert len(reader.meta.state_dict_metadata["w"].chunks) == 2
    assert torch.equal(reader.load("w"), torch.arange(96 * 64, dtype=torch.float32).reshape(96, 64))


class _Evil:
    def __reduce__(self):
        return (os.system, (f"touch {os.environ.get('DCP_MARKER', '/nonexistent/marker')}",))


def test_hostile_pickles_are_refused_without_running(tmp_path, monkeypatch, capsys):
    from megallama.checkpoint.dcp_safe import SafeDcpReader
    from megallama.errors import UserError

    marker = tmp_path / "ran"
    monkeypatch.setenv("DCP_MARKER", str(marker))
    dcp.save({"w": torch.ones(2), "train_state": {"step": _Evil()}}, checkpoint_id=str(tmp_path / "bytes"))
    reader = SafeDcpReader(tmp_path / "bytes")  # the metadata is fine; the value entry is a hostile pickle
    with pytest.raises(UserError, match="train_state.step"):
        reader.load_value("train_state.step")
    (tmp_path / "meta").mkdir()
    (tmp_path / "meta" / ".metadata").write_bytes(pickle.dumps(_Evil()))
    assert cli("convert", "--from", "dcp", "--input", tmp_path / "meta", "--output", tmp_path / "o") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "refused" in err[0] and "system" in err[0], err
    assert not marker.exists() and not (tmp_path / "o").exists()


def test_tied_model_and_torchtitan_main_names(tmp_path):
    """A tied model round-trips (torchtitan v0.2 gets the head as its own tensor); a checkpoint
    under torchtitan main's names (``qkv_linear.wq``, ``lm_head``) reads as v0.2's."""
    from megallama.checkpoint.consolidated import load_consolidated, save_consolidated
    from megallama.config import ModelConfig

    cfg = ModelConfig(dim=32, n_layers=1, n_heads=2, vocab_size=64, multiple_of=16, max_seq_len=32,
                      tie_embeddings=True)
    state = build_model(cfg, ParallelState(), seed=0).state_dict()
    save_consolidated(state, cfg, tmp_path / "ours")
    assert cli("convert", "--input", tmp_path / "ours", "--output", tmp_path / "titan", "--to", "dcp") == 0
    assert cli("convert", "--from", "dcp", "--input", tmp_path / "titan", "--output", tmp_path / "back") == 0
    cfg2, back = load_consolidated(tmp_path / "back")
    assert cfg2.tie_embeddings and back.keys() <= state.keys()
    assert all(torch.equal(v, state[k]) for k, v in back.items())
    names = {"tok_embeddings.weight": (64, 32), "norm.weight": (32,), "output.weight": (64, 32)}
    names.update({f"layers.0.{n}.weight": s for n, s in [("attention.wq", (32, 32)), ("attention.wk", (32, 32)),
                  ("attention.wv", (32, 32)), ("attention.wo", (32, 32)), ("feed_forward.w1", (96, 32)),
                  ("feed_forward.w2", (32, 96)), ("feed_forward.w3", (96, 32)), ("attention_norm", (32,)),
                  ("ffn_norm", (32,))]})
    v02 = {n: torch.randn(s) for n, s in names.items()}
    renamed = {n.replace("attention.w", "attention.qkv_linear.w").replace("qkv_linear.wo", "wo")
               .replace("output.", "lm_head."): t for n, t in v02.items()}
    dcp.save(v02, checkpoint_id=str(tmp_path / "v02"))
    dcp.save(renamed, checkpoint_id=str(tmp_path / "main"))
    params = {"dim": 32, "n_layers": 1, "n_heads": 2, "multiple_of": 16}
    (tmp_path / "params.json").write_text(json.dumps(params))
    for src in ("v02", "main"):
        assert cli("convert", "--from", "dcp", "--params", tmp_path / "params.json", "--input", tmp_path / src,
                   "--output", tmp_path / f"{src}_ours") == 0
    _, a = load_consolidated(tmp_path / "v02_ours")
    _, b = load_consolidated(tmp_path / "main_ours")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_bad_inputs_are_one_line(tmp_path, capsys):
    from megallama.checkpoint.consolidated import save_consolidated
    from megallama.config import ModelConfig

    cfg = ModelConfig(dim=32, n_layers=1, n_heads=2, vocab_size=64, multiple_of=16, max_seq_len=32)
    save_consolidated(build_model(cfg, ParallelState(), seed=0).state_dict(), cfg, tmp_path / "ours")
    assert cli("convert", "--input", tmp_path / "ours", "--output", tmp_path / "titan", "--to", "dcp") == 0
    (tmp_path / "titan" / "params.json").rename(tmp_path / "params.json")
    (tmp_path / "exists").mkdir()
    cases = [
        (["--from", "dcp", "--input", tmp_path / "titan", "--output", tmp_path / "o1"], ["params.json", "--params"]),
        (["--input", tmp_path / "ours", "--output", tmp_path / "o2", "--to", "dcp", "--tp", "2"], ["--tp"]),
        (["--from", "dcp", "--params", tmp_path / "params.json", "--input", tmp_path / "titan", "--output",
          tmp_path / "exists"], ["exists", "--overwrite"]),
        (["--from", "dcp", "--params", tmp_path / "params.json", "--input", tmp_path / "ours", "--output",
          tmp_path / "o3"], [".metadata"]),
    ]
    for argv, needles in cases:
        assert cli("convert", *argv) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and all(n in err[0] for n in needles), (argv, err)
    assert not any((tmp_path / o).exists() for o in ("o1", "o2", "o3"))
    assert list((tmp_path / "exists").iterdir()) == []
