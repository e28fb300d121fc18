"""megatron-core's GPTModel on CPU: the reference the Megatron interop tests compare against.

Run in its own process (``python -m tests.megatron_reference JOBS PORT``; :func:`reference` does it
from a test): megatron-core's import is slow and it takes a process group of its own. Three
CUDA-only calls in its forward get CPU stand-ins (the device its RoPE table moves to, the default
causal mask, the dropout RNG tracker's fork; dropout is 0); the model, its state dict, parameter
grouping and the files are megatron-core's own.

Each job is a dict: ``kind`` ``legacy`` (``model_optim_rng.pt``, with ``dopt`` megatron-core's
DistributedOptimizer and its ``distrib_optim.pt``) or ``torch_dist`` (``dist_checkpointing``);
``mode`` ``make`` (one Adam step, then write the checkpoint) or ``load`` (read one into a fresh
model); ``model``, ``seed``, ``dir``, ``iteration``, ``tokens``; megallama conversions to run first
(``convert_first``; under torch_dist ``convert``, run once the model exists). Each job's result:
the logits of ``tokens`` and, on load, how far the Adam moments landed from their parameters.
"""
from __future__ import annotations

import contextlib
import json
import os
import random
import sys
import warnings
from argparse import Namespace

import numpy as np
import torch


def reference(jobs, timeout: int = 300):
    """The results of ``jobs``, run in a fresh process."""
    import subprocess

    from tests.dist_utils import free_port
    from tests.train_utils import ROOT, env

    r = subprocess.run([sys.executable, "-m", "tests.megatron_reference", json.dumps(jobs), str(free_port())],
                       capture_output=True, text=True, env=env(), cwd=ROOT, timeout=timeout)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.split("RESULT", 1)[1])


class OnCpu(torch.overrides.TorchFunctionMode):
    """DDP and the distributed optimizer: the CUDA tensors they make, made on CPU."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:  # its dtype check names CUDA types
            return func(*args).replace("torch.", "torch.cuda.", 1)
        if func is torch.Tensor.cuda:
            return args[0]
        if str(kwargs.get("device", "")).startswith("cuda"):
            kwargs["device"] = "cpu"
        return func(*args, **kwargs)


def _setup(port: str) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
    dist.init_process_group("gloo", rank=0, world_size=1)
    from megatron.core import parallel_state as ps
    import megatron.core.fusions.fused_softmax as fs
    from megatron.core.tensor_parallel import random as mr

    ps.initialize_model_parallel(1, 1)
    torch.cuda.current_device = lambda: "cpu"
    fs.get_default_causal_mask = lambda sq: torch.triu(torch.ones(sq, sq), diagonal=1).bool()
    mr.get_cuda_rng_tracker().fork = lambda *a, **k: contextlib.nullcontext()


def _convert(argvs) -> None:
    """megallama's conversions, in this process (megatron's import is the slow part)."""
    from megallama.cli import main

    for argv in argvs:
        assert main(argv) == 0, argv


def _model(m, seed):
    """(config, GPTModel, torch Adam over megatron-core's parameter groups), seeded."""
    import torch.nn.functional as F
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.models.gpt.gpt_model import GPTModel
    from megatron.core.optimizer import OptimizerConfig, _get_param_groups
    from megatron.core.transformer.transformer_config import TransformerConfig

    torch.manual_seed(seed)
    tc = TransformerConfig(num_layers=m["layers"], hidden_size=m["hidden"], num_attention_heads=m["heads"],
                           num_query_groups=m["groups"], ffn_hidden_size=m["ffn"], normalization="RMSNorm",
                           gated_linear_unit=True, activation_func=F.silu, add_bias_linear=False,
                           layernorm_epsilon=m["eps"], use_cpu_initialization=True, bias_dropout_fusion=False,
                           apply_rope_fusion=False, hidden_dropout=0.0, attention_dropout=0.0)
    model = GPTModel(tc, get_gpt_layer_local_spec(normalization="RMSNorm"), vocab_size=m["padded"],
                     max_sequence_length=m["seq"], position_embedding_type="rope",
                     share_embeddings_and_output_weights=m["tie"], rotary_base=m["theta"])
    groups = _get_param_groups([model], OptimizerConfig(lr=1e-3, weight_decay=0.1), None)
    return tc, model, torch.optim.Adam(groups, lr=1e-3)


def _step(model, opt, inner, tokens, pos, ddp=None) -> None:
    """Norms moved off 1, one Adam step, then each moment tied to its own parameter (3w and w**2):
    a moment that lands on another parameter shows. ``inner``: the torch optimizer holding the state."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("layernorm.weight"):
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
    model(tokens, pos, None).square().mean().backward()
    if ddp is not None:
        ddp.finish_grad_sync()
    opt.step()
    for p, st in inner.state.items():
        st["exp_avg"], st["exp_avg_sq"] = 3 * p.detach(), p.detach() ** 2


def megatron_args(m) -> Namespace:
    """The training arguments Megatron-LM stores beside the weights."""
    from megatron.core.transformer.enums import AttnBackend

    return Namespace(num_layers=m["layers"], hidden_size=m["hidden"], ffn_hidden_size=m["ffn"],
                     num_attention_heads=m["heads"], group_query_attention=m["groups"] != m["heads"],
                     num_query_groups=m["groups"], kv_channels=m["hidden"] // m["heads"],
                     max_position_embeddings=m["seq"], seq_length=m["seq"], vocab_size=m["vocab"],
                     padded_vocab_size=m["padded"], make_vocab_size_divisible_by=128, swiglu=True,
                     normalization="RMSNorm", norm_epsilon=m["eps"], position_embedding_type="rope",
                     rotary_base=m["theta"], rotary_percent=1.0, add_bias_linear=False,
                     untie_embeddings_and_output_weights=not m["tie"], tensor_model_parallel_size=1,
                     pipeline_model_parallel_size=1, params_dtype=torch.float32, bf16=False,
                     attention_backend=AttnBackend.auto, consumed_train_samples=448,
                     use_distributed_optimizer=False, transformer_impl="local")


def _inputs(job):
    tokens = torch.tensor(job["tokens"])
    return tokens, torch.arange(tokens.shape[1]).expand_as(tokens)


def _logits(model, tokens, pos, m):
    model.eval()
    with torch.no_grad():
        return model(tokens, pos, None)[..., : m["vocab"]].tolist()


def _mark_latest(job) -> None:
    with open(os.path.join(job["dir"], "latest_checkpointed_iteration.txt"), "w") as fh:
        fh.write(str(job["iteration"]))


def legacy(job):
    """``model_optim_rng.pt`` (and ``distrib_optim.pt`` with ``dopt``: DP=1, grad buckets of
    ``dopt["bucket"]`` elements; with ``dopt["torch_dist"]`` also, or only, in torch_dist form)."""
    _convert(job.get("convert_first", ()))
    m = job["model"]
    tc, model, opt = _model(m, job["seed"])
    dopt = job.get("dopt")
    if dopt:
        from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
        from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

        on_cpu = OnCpu()
        on_cpu.__enter__()
        ddp = DistributedDataParallel(tc, DistributedDataParallelConfig(
            use_distributed_optimizer=True, overlap_grad_reduce=True, bucket_size=dopt["bucket"]), model)
        opt = get_megatron_optimizer(OptimizerConfig(optimizer="adam", lr=1e-3, weight_decay=0.1,
                                                     use_distributed_optimizer=True), [ddp])
        shards = opt.chained_optimizers[0]
        state_of = lambda p: shards._get_main_param_and_optimizer_states(p)  # noqa: E731
    tokens, pos = _inputs(job)
    path = os.path.join(job["dir"], "iter_%07d" % job["iteration"], "mp_rank_00", "model_optim_rng.pt")
    out = {}
    if job["mode"] == "make":
        _step(model, opt, shards.optimizer if dopt else opt, tokens, pos, ddp if dopt else None)
        args = megatron_args(m)
        os.makedirs(os.path.dirname(path))
        if dopt:  # the optimizer entry keeps param groups only; the state goes to distrib_optim.pt
            args.use_distributed_optimizer, args.overlap_grad_reduce, args.ddp_bucket_size = True, True, dopt["bucket"]
            opt.save_parameter_state(os.path.join(os.path.dirname(path), "distrib_optim.pt"))
        torch.save({"args": args, "checkpoint_version": 3.0, "iteration": job["iteration"],
                    "model": model.state_dict(), "optimizer": opt.state_dict(),
                    "rng_state": [{"random_rng_state": random.getstate(), "np_rng_state": np.random.get_state(),
                                   "torch_rng_state": torch.get_rng_state()}],
                    "opt_param_scheduler": {"max_lr": 1e-3, "num_steps": 7}}, path)
        _mark_latest(job)
        if dopt and dopt.get("torch_dist"):  # and in torch_dist form, the optimizer as Megatron-LM's default shards it
            from megatron.core import dist_checkpointing
            torch.cuda.synchronize = lambda *a, **k: None  # its async file writer's only CUDA call
            sharded = model.sharded_state_dict()
            it = os.path.join(dopt["torch_dist"], "iter_%07d" % job["iteration"])
            os.makedirs(it)
            dist_checkpointing.save({**sharded, "optimizer": opt.sharded_state_dict(sharded, metadata={
                "distrib_optim_sharding_type": "dp_reshardable"}), "args": args, "iteration": job["iteration"],
                "checkpoint_version": 3.0}, it)
    else:
        if dopt and dopt.get("torch_dist"):  # its fully_reshardable form, as Megatron-LM's loader asks for it
            from megatron.core import dist_checkpointing
            shards._init_optimizer_states_with_dummy_values()  # as Megatron-LM does before a dist load
            sharded = model.sharded_state_dict()
            osd = opt.sharded_state_dict(sharded, is_loading=True,
                                         metadata={"distrib_optim_sharding_type": "fully_reshardable"})
            with torch.serialization.safe_globals([Namespace]):
                sd = dist_checkpointing.load({**sharded, "optimizer": osd}, os.path.dirname(os.path.dirname(path)))
            sd = {"optimizer": sd.pop("optimizer"), "model": {k: v for k, v in sd.items() if k in sharded}}
        else:
            with torch.serialization.safe_globals([Namespace]):
                sd = torch.load(path, weights_only=True)
        out["keys"], out["reference_keys"] = list(sd["model"]), list(model.state_dict())
        model.load_state_dict(sd["model"], strict=True)
        if dopt:  # as Megatron's loader does: param groups, then the gathered state scattered from DP rank 0
            # torch Adam's per-parameter 'step' (GPU runs' FusedAdam keeps none) is in no gathered file, its
            # own included, yet megatron-core's loader copies every state key: keep the step load_state_dict set
            set_states = type(shards)._set_main_param_and_optimizer_states
            shards._set_main_param_and_optimizer_states = lambda p, t: set_states(shards, p, {**state_of(p), **t})
            with torch.no_grad():  # fp32 masters are views of the weights here (a bf16 run's are copies)
                opt.load_state_dict(sd["optimizer"])  # torch_dist: its per-parameter state too
                if not dopt.get("torch_dist"):
                    opt.load_parameter_state(os.path.join(os.path.dirname(path), "distrib_optim.pt"))
            out["moment_error"] = max(max((state_of(p)["exp_avg"] - 3 * p.detach().view(-1)).abs().max().item(),
                                          (state_of(p)["exp_avg_sq"] - p.detach().view(-1) ** 2).abs().max().item(),
                                          (state_of(p)["param"] - p.detach().view(-1)).abs().max().item())
                                      for p in model.parameters())
        elif "optimizer" in sd:
            opt.load_state_dict(sd["optimizer"])
            out["moment_error"] = max(max((opt.state[p]["exp_avg"] - 3 * p.detach()).abs().max().item(),
                                          (opt.state[p]["exp_avg_sq"] - p.detach() ** 2).abs().max().item())
                                      for p in model.parameters())
    out["logits"] = _logits(model, tokens, pos, m)
    if dopt:
        on_cpu.__exit__(None, None, None)
    return out


def torch_dist(job):
    """megatron-core's ``dist_checkpointing`` of its GPTModel's ``sharded_state_dict`` and Adam's
    model-space state: written (``make``), or loaded from a directory megallama wrote (``load``,
    after running ``convert``)."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.optimizer import (get_param_id_to_sharded_param_map,
                                                            optim_state_to_sharding_state)

    m = job["model"]
    _, model, opt = _model(m, job["seed"])
    tokens, pos = _inputs(job)
    torch.cuda.synchronize = lambda *a, **k: None  # its async file writer's only CUDA call
    _step(model, opt, opt, tokens, pos)
    sharded = model.sharded_state_dict()
    osd = opt.state_dict()  # as megatron-core's FP32Optimizer.sharded_state_dict builds it
    params = [p for g in opt.param_groups for p in g["params"]]
    optim_state_to_sharding_state(osd, get_param_id_to_sharded_param_map(sharded, params), exclude_keys="step")
    it = os.path.join(job["dir"], "iter_%07d" % job["iteration"])
    out = {}
    if job["mode"] == "make":
        os.makedirs(it)
        dist_checkpointing.save({**sharded, "optimizer": osd, "args": megatron_args(m), "iteration": job["iteration"],
                                 "checkpoint_version": 3.0}, it)
        _mark_latest(job)
    else:
        _convert(job["convert"])
        with torch.serialization.safe_globals([Namespace]):  # as Megatron's training loader allows it
            loaded = dist_checkpointing.load({**sharded, "optimizer": osd}, it)
        opt_state = loaded.pop("optimizer")["state"]
        out["common"] = [loaded.pop(k) is not None for k in ("args", "iteration", "checkpoint_version")]
        model.load_state_dict(loaded, strict=True)
        out["moment_error"] = max(max((opt_state[i]["exp_avg"] - 3 * p.detach()).abs().max().item(),
                                      (opt_state[i]["exp_avg_sq"] - p.detach() ** 2).abs().max().item())
                                  for i, p in enumerate(params))
    out["logits"] = _logits(model, tokens, pos, m)
    return out


KINDS = {"legacy": legacy, "torch_dist": torch_dist}


def main(argv) -> None:
    warnings.filterwarnings("ignore")
    jobs = json.loads(argv[0])
    _setup(argv[1])
    results = [KINDS[job.get("kind", "legacy")](job) for job in jobs]
    print("RESULT" + json.dumps(results))


if __name__ == "__main__":
    main(sys.argv[1:])
