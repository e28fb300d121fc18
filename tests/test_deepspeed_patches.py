"""Each patch in ``megallama.train.deepspeed_patches`` takes effect on DeepSpeed's engine, the
engine applies exactly the patches its ``EngineTraits`` name, the predicted traits (what the cost
models read) are the recorded ones, and an unsupported DeepSpeed version is refused at import."""
from __future__ import annotations

import importlib
import inspect
from types import SimpleNamespace

import pytest

from megallama.train import deepspeed_patches as patches
from megallama.train.ds_settings import DeepSpeedSettings, EngineTraits
from tests.dist_utils import run_distributed


def test_an_unsupported_deepspeed_version_is_refused_at_import(monkeypatch):
    import deepspeed

    monkeypatch.setattr(deepspeed, "__version__", "0.20.0")
    with pytest.raises(ImportError, match=r"needs DeepSpeed 0\.19\.x .* found 0\.20\.0"):
        importlib.reload(patches)
    monkeypatch.undo()
    importlib.reload(patches)   # the real version imports again
    patches.check_version("0.19.8")


def test_settings_read_every_key_once():
    s = DeepSpeedSettings.of({"bf16": {"enabled": True}, "zero_optimization": {
        "stage": 2, "offload_optimizer": {"device": "cpu"}, "offload_param": {"device": "none"},
        "reduce_bucket_size": 3e5, "overlap_comm": True, "stage3_max_reuse_distance": 7}})
    assert (s.zero_stage, s.precision, s.offload_optimizer, s.offload_param, s.offloaded) == (2, "bf16", "cpu", None,
                                                                                           True)
    assert (s.buckets.reduce, s.buckets.overlap_comm, s.buckets.reuse_distance) == (300000, True, 7.0)
    assert DeepSpeedSettings.of({}) == DeepSpeedSettings() and DeepSpeedSettings().buckets.overlaps(3)


def test_traits_name_the_patches_of_each_layout():
    fp32 = EngineTraits.predict(0, "fp32", dp=1, pp=1)
    assert (fp32.optimizer, fp32.clips_fp32, fp32.skips_dp_allreduce, fp32.resets_unfused_warmup) == \
        ("torch", True, True, False)
    assert not EngineTraits.predict(0, "fp32", dp=2, pp=1).skips_dp_allreduce
    unfused = EngineTraits.predict(0, "bf16", dp=1, pp=1)
    assert (unfused.optimizer, unfused.resets_unfused_warmup, unfused.skips_dp_allreduce) == ("unfused", True, True)
    pipe = EngineTraits.predict(0, "bf16", dp=1, pp=2)
    assert (pipe.optimizer, pipe.effective_zero, pipe.skips_dp_allreduce) == ("bf16", 1, False)
    zero = EngineTraits.predict(1, "bf16", dp=1, pp=1)
    assert (zero.optimizer, zero.clips_fp32, zero.skips_dp_allreduce) == ("zero", False, False)
    assert unfused.norms_in_fp64 and pipe.norms_in_fp64 and not zero.norms_in_fp64 and not fp32.norms_in_fp64


def test_wrapped_pipeline_instructions_replace_the_map_deepspeed_reads():
    from deepspeed.runtime.pipe.engine import PipelineEngine

    assert "self._INSTRUCTION_MAP" in inspect.getsource(PipelineEngine._exec_schedule)

    class Engine:
        _INSTRUCTION_MAP = dict(PipelineEngine._INSTRUCTION_MAP)

    engine, seen = Engine(), []
    with patches.wrapped_pipeline_instructions(engine, lambda kind, fn: seen.append(kind) or kind.__name__):
        assert set(engine._INSTRUCTION_MAP.values()) == {k.__name__ for k in PipelineEngine._INSTRUCTION_MAP}
    assert "_INSTRUCTION_MAP" not in vars(engine) and len(seen) == len(PipelineEngine._INSTRUCTION_MAP)


def test_loss_scale_reads_either_place():
    assert patches.loss_scale(SimpleNamespace(optimizer=SimpleNamespace(cur_scale=8))) == 8.0
    assert patches.loss_scale(SimpleNamespace(optimizer=SimpleNamespace(loss_scaler=SimpleNamespace(cur_scale=4)))) == 4
    assert patches.loss_scale(SimpleNamespace(optimizer=object())) is None


def _engine(precision: str, stage: int):
    import torch

    from megallama.config import load_run_config
    from megallama.parallel import initialize
    from megallama.train.ds_config import build_ds_config
    from megallama.train.engine import build_engine

    ds = {"zero_optimization": {"stage": stage}, "bf16": {"enabled": precision == "bf16"}}
    cfg = load_run_config(data={"model": "tiny", "deepspeed": ds, "train": {"seq_len": 16, "micro_batch_size": 2}})
    state = initialize()
    return build_engine(cfg, state, build_ds_config(cfg, 1), torch.device("cpu")), state


def _step(engine, nan: bool = False):
    """One step; returns the gradient norm before the step (clipping) by hand where the
    parameters hold their gradients (ZeRO-0), else None."""
    import torch

    tokens = torch.randint(0, 2048, (2, 17), generator=torch.Generator().manual_seed(0))
    loss = engine(tokens[:, :-1], labels=tokens[:, 1:])
    engine.backward(loss)
    if nan:
        next(engine.module.parameters()).grad.fill_(float("nan"))
    norms = [p.grad.double().norm() for p in engine.module.parameters() if p.grad is not None]
    engine.step()
    return float(torch.stack(norms).norm()) if norms else None


def _fp32_zero0(rank, world):
    """Clipping recorded, a non-finite step skipped, the self all-reduce skipped."""
    import torch

    built, _ = _engine("fp32", 0)
    engine, out = built.engine, {"traits": built.traits}
    calls = []
    real = engine.allreduce_gradients
    engine.allreduce_gradients = lambda *a, **k: calls.append(1) or real(*a, **k)
    out["norm_by_hand"] = _step(engine)
    out["allreduce_calls"], out["hooks"] = len(calls), patches.gradients_final_at(engine)
    out["norm"], out["clip_patched"] = float(engine.get_global_grad_norm()), "clip_fp32_gradients" in vars(engine)
    before = [p.detach().clone() for p in engine.module.parameters()]
    _step(engine, nan=True)
    out["skipped"] = engine.skipped_steps
    out["unchanged"] = all(torch.equal(a, p) for a, p in zip(before, engine.module.parameters()))
    out["holds"] = patches.holds_fp32_state(next(engine.module.parameters()))
    out["comm"] = [(attr, name) for _, attr, name in patches.cached_comm_functions()]
    return out


def test_fp32_zero0_patches_take_effect():
    out = run_distributed(_fp32_zero0, 1)
    assert out["traits"] == EngineTraits.predict(0, "fp32", 1, 1)
    assert out["allreduce_calls"] == 0 and "step" in out["hooks"]               # skip_self_allreduce
    assert out["clip_patched"] and out["norm"] > 0  # record_fp32_grad_norm
    assert out["norm"] == pytest.approx(out["norm_by_hand"], rel=1e-5)
    assert out["skipped"] == 1 and out["unchanged"]                             # ... and the step guard
    assert not out["holds"]
    assert ("all_gather_function", "all_gather_into_tensor") in out["comm"]


def _mixed(rank, world, tmp):
    """bf16 ZeRO-0's warm-up undone; ZeRO-1's undecayed group linked to its optimizer state, its
    checkpoint writes wrapped."""
    import torch
    from deepspeed.utils import safe_get_full_optimizer_state

    built, _ = _engine("bf16", 0)
    opt = built.engine.optimizer
    out = {"unfused": built.traits, "fp16_wrapper": patches.is_fp16_wrapper(opt),
           "state_cleared": len(opt.optimizer.state) == 0,
           "masters": all(torch.equal(m, lo.float()) for g, f in zip(opt.fp16_groups, opt.fp32_groups)
                          for lo, m in zip(g, f))}
    built, _ = _engine("bf16", 1)
    engine = built.engine
    out["zero"], out["zero_fp16_wrapper"] = built.traits, patches.is_fp16_wrapper(engine.optimizer)
    _step(engine)
    norm = dict(engine.module.named_parameters())["norm.weight"]
    out["holds"] = patches.holds_fp32_state(norm)
    out["hooks"] = patches.gradients_final_at(engine)

    def linked() -> bool:
        try:
            return safe_get_full_optimizer_state(norm, "exp_avg") is not None
        except ValueError:   # "exp_avg not found in optimizer state fragment"
            return False

    out["before"] = linked()
    patches.relink_optimizer_fragments(engine)
    out["after"] = linked()
    saved = []

    def wrap_save(real_save):
        return lambda state_dict, path, *a, **k: saved.append(str(path)) or real_save(state_dict, path, *a, **k)

    with patches.wrapped_checkpoint_writes(engine, wrap_save, lambda real_copy: lambda path: saved.append("script")):
        engine.save_checkpoint(tmp, tag="t")
    out["saved"], out["restored"] = saved, "save" not in vars(engine.checkpoint_engine)
    return out


def test_mixed_precision_patches_take_effect(tmp_path):
    out = run_distributed(_mixed, 1, str(tmp_path))
    assert out["unfused"] == EngineTraits.predict(0, "bf16", 1, 1)
    assert out["fp16_wrapper"] and out["state_cleared"] and out["masters"]    # undo_unfused_warmup_step
    assert out["zero"] == EngineTraits.predict(1, "bf16", 1, 1) and not out["zero_fp16_wrapper"]
    assert out["holds"] and "step" not in out["hooks"]
    assert not out["before"] and out["after"]                                 # relink_optimizer_fragments
    assert any(p.endswith("optim_states.pt") for p in out["saved"]) and "script" in out["saved"]   # wrapped writes
    assert out["restored"]
