"""The training loop: launch, data, engine, steps, metrics, report."""
from __future__ import annotations

import json
import logging
import math
import os
import re
import time
from pathlib import Path
from typing import Any, Dict, Iterator

import torch
import torch.distributed as dist

from megallama.config import RunConfig
from megallama.errors import UserError
from megallama.parallel import initialize
from megallama.train.distributed import detect_launcher, device_for, init_distributed
from megallama.train.ds_config import build_ds_config, check_device_supports, precision, zero_stage
from megallama.train import checkpoint as ckpt
from megallama.train.engine import build_engine, set_schedule_position
from megallama.train.fits import check_training_fits
from megallama.train.metrics import MetricsLogger, device_peak_flops
from megallama.train.run_lock import hold_run_dir
from megallama.train.step import make_loss_fn
from megallama.train.unpickle_gate import check_safe_to_unpickle
from megallama.train.warmup_ops import check_comm_op_lock
from megallama.train.watchdog import Watchdog

log = logging.getLogger(__name__)


def _everyones(message: str) -> UserError:
    """An error rank 0 found and broadcast: printed once per node, not once per rank (cli.py)."""
    err = UserError(message)
    err.same_on_every_rank = True
    return err


def _prepare_data(cfg: RunConfig, rank: int):
    """Rank 0 builds (or finds) the token files; everyone else waits and reuses them."""
    from megallama.data import prepare_data

    box = [None, None]
    if rank == 0:
        try:
            box[0] = prepare_data(cfg)
        except UserError as exc:
            box[1] = str(exc)
    dist.broadcast_object_list(box, src=0)
    if box[1] is not None:
        raise _everyones(box[1])
    return box[0]


def _find_start(cfg: RunConfig, ckpt_dir: Path, rank: int):
    """Rank 0 picks (and verifies) the checkpoint to start from; everyone gets the same answer."""
    box = [None, None]
    if rank == 0:
        try:
            found = ckpt.find_resumable(ckpt_dir) if cfg.checkpoint.resume and ckpt_dir.is_dir() else None
            if found is None and cfg.checkpoint.load:
                found = Path(cfg.checkpoint.load)
                if (found / ckpt.LATEST).is_file():
                    found = ckpt.find_resumable(found)
                else:
                    problem = ckpt.verify(found)
                    if problem:
                        raise UserError(f"checkpoint.load: {problem}")
            if found is not None and _has_native(found):
                check_safe_to_unpickle(found)
            box[0] = str(found) if found else None
        except UserError as exc:
            box[1] = str(exc)
    dist.broadcast_object_list(box, src=0)
    if box[1] is not None:
        raise _everyones(box[1])
    return Path(box[0]) if box[0] else None


def _check_same_model(meta, cfg: RunConfig, path: Path) -> None:
    init_only = ("dropout", "init_std")  # how weights are drawn or dropped, not what the loaded ones are
    saved = {k: v for k, v in meta["model"].items() if k not in init_only}
    now = {k: v for k, v in cfg.model.model_dump().items() if k not in init_only}
    for m in (saved, now):  # n_kv_heads None means n_heads (an HF import spells it out)
        m["n_kv_heads"] = m.get("n_kv_heads") or m.get("n_heads")
    diff = sorted(k for k in now if saved.get(k) != now[k])
    if diff:
        raise UserError(f"checkpoint {path}: model.{diff[0]} is {saved.get(diff[0])!r} there, "
                        f"{now[diff[0]]!r} in this config")


SCHEDULE = ("steps", "warmup_steps", "lr", "min_lr_ratio")


def _schedule_changed(meta, cfg: RunConfig, path: Path) -> bool:
    """A resume under another LR schedule is refused, as Megatron refuses it unless told
    (--override-opt_param-scheduler): the cosine would silently re-stretch from the resume step.
    ``train.allow_schedule_change`` opts in; True then (the caller re-fits the schedule)."""
    saved, t = meta.get("schedule"), cfg.train
    diff = [k for k in SCHEDULE if saved and saved.get(k) != getattr(t, k)]
    if not diff:
        return False
    k = diff[0]
    if not t.allow_schedule_change:
        raise UserError(f"train.{k}: {getattr(t, k)} differs from {saved[k]} in checkpoint {path}, whose LR schedule "
                        f"it would re-stretch from step {meta['step']}; set train.{k}={saved[k]} to continue that "
                        "schedule, or train.allow_schedule_change=true to re-fit it")
    log.warning("train.%s: %s (checkpoint: %s): re-fitting the LR schedule from step %d "
                "(train.allow_schedule_change=true)", k, getattr(t, k), saved[k], meta["step"])
    return True


def _peer_failure(problem: str, rank: int, exc: BaseException) -> str:
    """One whole line: the failed peer, and this rank stopping because of it, with the collective's
    own reason only when it is short enough to quote whole (never cut mid-sentence)."""
    first = (str(exc).strip().splitlines() or [""])[0]
    first = re.sub(r"^\[[^\]]*\]\s*", "", first)  # gloo's "[file.cc:123] " prefix
    cause = f"{type(exc).__name__}: {first}" if first and len(first) <= 160 else type(exc).__name__
    return f"{problem}; rank {rank} stops because a collective with it failed ({cause})"


def _rank0_value(fn, rank: int):
    """``fn()`` computed once on rank 0 and shared (e.g. a measurement other ranks would disturb)."""
    box = [fn() if rank == 0 else None]
    if dist.get_world_size() > 1:
        dist.broadcast_object_list(box, src=0)
    return box[0]


def _has_native(tag_dir: Path) -> bool:
    return any(tag_dir.glob("*model_states.pt"))


def _evaluate(engine, built, dataset, batch, state, device, iters: int, loss_fn) -> Dict[str, Any]:
    """Validation loss over ``iters`` global batches' worth of samples."""
    from megallama.train.evaluate import perplexity, pipeline_loss

    if built.pipeline:
        return pipeline_loss(engine, dataset, batch.micro, batch.accum, state, device, iters)
    return perplexity(engine.module, dataset, batch.micro, device, state, max_samples=iters * batch.global_,
                      loss_fn=loss_fn)


def _pipe_batches(it, device) -> Iterator:
    for tokens in it:
        tokens = tokens.to(device, non_blocking=True)
        yield tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()


def _loss_scale(engine):
    opt = getattr(engine, "optimizer", None)
    scale = getattr(opt, "cur_scale", None) or getattr(getattr(opt, "loss_scaler", None), "cur_scale", None)
    return float(scale) if scale is not None else None


def _dp_mean(value: torch.Tensor, state) -> float:
    value = value.detach().float().clone()
    if state.dp > 1:
        dist.all_reduce(value, group=state.dp_group)
        value /= state.dp
    return value.item()


def _fault_steps() -> set:
    """Steps whose loss is made infinite: a fault-injection hook for tests of the skip logic."""
    raw = os.environ.get("MEGALLAMA_FAULT_NONFINITE_STEPS", "")
    return {int(x) for x in raw.split(",") if x.strip()}


def train(cfg: RunConfig) -> Dict[str, Any]:
    """Run ``cfg.train.steps`` optimizer steps; returns the final report (on every rank)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("DeepSpeed", "deepspeed", "torch.distributed"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    info = detect_launcher()
    cfg.check_layout(info.world_size)  # every layout error surfaces before any process group exists
    ds = build_ds_config(cfg, info.world_size)
    check_device_supports(ds)
    check_training_fits(cfg, info.world_size, info.local_rank)  # a model/batch too big is one line, not an OOM
    init_distributed(cfg.train.dist_timeout_s, info)
    if not torch.cuda.is_available():  # the engine will load DeepSpeed's comm op: no start on a stale lock
        check_comm_op_lock()
    # before anything is written there (heartbeats included): one job per run directory
    lock = hold_run_dir(cfg.run_dir, cfg.checkpoint.dir, cfg.checkpoint.every > 0, info.rank)
    watchdog = None
    if info.world_size > 1 and cfg.train.heartbeat_timeout_s > 0:
        watchdog = Watchdog(cfg.run_dir, info.rank, info.world_size, cfg.train.heartbeat_timeout_s).start()
    try:
        return _train(cfg, info, ds)
    except (RuntimeError, OSError) as exc:
        problem = watchdog.wait_for_dead_rank() if watchdog else None
        if problem:  # a collective failed because a peer died: say which, in one line
            raise UserError(_peer_failure(problem, info.rank, exc)) from None
        raise
    finally:
        if watchdog:
            watchdog.stop()
        if lock:
            lock.release()


def _train(cfg: RunConfig, info, ds) -> Dict[str, Any]:
    state = initialize(cfg.parallel.tp, cfg.parallel.pp, cfg.parallel.sequence_parallel)
    device = device_for(info.local_rank)
    t = cfg.train
    batch = t.batch_layout(state.dp)
    rank0 = info.rank == 0
    if rank0:
        log.info("launcher=%s world=%d tp=%d pp=%d dp=%d zero=%d precision=%s global_batch=%d (%d x %d x %d)",
                 info.launcher, info.world_size, state.tp, state.pp, state.dp, zero_stage(ds), precision(ds),
                 batch.global_, batch.micro, batch.accum, state.dp)

    from megallama.data import MicroBatchIterator, build_datasets

    art = _prepare_data(cfg, info.rank)
    train_ds, valid_ds, _ = build_datasets(cfg, art)
    if rank0:  # only once the data is known good: a failed start leaves no config behind
        (Path(cfg.run_dir) / "config.json").write_text(json.dumps(cfg.model_dump(), indent=2))
    layout = {"model": cfg.model.model_dump(), "tp": state.tp, "pp": state.pp, "dp": state.dp,
              "zero": zero_stage(ds), "precision": precision(ds), "world_size": info.world_size,
              "schedule": {k: getattr(t, k) for k in SCHEDULE}}
    ckpt_dir = Path(cfg.checkpoint.dir or Path(cfg.run_dir) / "checkpoints")
    resume = _find_start(cfg, ckpt_dir, info.rank)
    start_step, consumed, universal, refit = 0, 0, None, False
    if resume is not None:
        meta = ckpt.read_meta(resume)
        _check_same_model(meta, cfg, resume)
        refit = _schedule_changed(meta, cfg, resume)
        start_step, consumed = int(meta["step"]), int(meta["consumed_samples"])
        same_layout = all(meta.get(k) == layout[k] for k in ("tp", "pp", "dp", "zero", "precision")) \
            and _has_native(resume)
        if not same_layout:
            from megallama.train.universal import UniversalReader

            universal = UniversalReader(resume / "universal")
        if rank0:
            log.info("resuming from %s at step %d (%s)", resume, start_step,
                     "same layout: DeepSpeed checkpoint" if same_layout else "new layout: layout-free state")
    it = MicroBatchIterator(train_ds, batch.micro, batch.accum, state.dp_rank, state.dp,
                            consumed_samples=consumed, seed=t.seed)
    built = build_engine(cfg, state, ds, device, universal=universal, step=start_step)
    engine = built.engine
    if resume is not None and universal is None:
        engine.load_checkpoint(str(resume.parent), tag=resume.name)
        ckpt.load_rng(resume)
        if refit:  # the restored schedule keeps the checkpoint's peak LR: take the config's
            set_schedule_position(engine.lr_scheduler, start_step, base_lr=t.lr)

    from megallama.profiling.flops import flops_per_token

    flops = flops_per_token(cfg.model, t.seq_len, t.activation_checkpointing.mode)
    peak, peak_source = _rank0_value(lambda: device_peak_flops(precision(ds)), info.rank)
    tokens_per_step = batch.global_ * t.seq_len
    metrics = MetricsLogger(cfg.run_dir, rank0, t.steps, tokens_per_step, info.world_size,
                            flops.model, flops.hardware, peak, start_step=start_step)
    if rank0:
        log.info("peak %.2f TFLOP/s per rank (%s); %.3g model FLOPs per token", peak / 1e12, peak_source, flops.model)

    pipe_iter = _pipe_batches(it, device) if built.pipeline else None
    loss_fn = make_loss_fn(cfg.model.arch, t.seq_len)
    faults = _fault_steps()
    losses, bad_in_a_row, skips_seen = [], 0, 0
    run_start = time.perf_counter()
    last_log, last_logged = run_start, start_step
    last_step = min(t.steps, t.exit_at_step or t.steps)
    for step in range(start_step + 1, last_step + 1):
        lr = engine.get_lr()[0]  # the LR this step applies (the schedule moves on inside engine.step)
        if built.pipeline:
            loss = engine.train_batch(data_iter=pipe_iter)
            loss_value = loss.item()
        else:
            micro_losses = []
            for _ in range(batch.accum):
                tokens = next(it).to(device, non_blocking=True)
                loss, _ = loss_fn(engine, tokens)
                if step in faults:
                    loss = loss * float("inf")
                engine.backward(loss)
                engine.step()
                micro_losses.append(loss.detach().float())
            loss_value = _dp_mean(torch.stack(micro_losses).mean(), state)
        skips = int(getattr(engine, "skipped_steps", 0))
        if skips > skips_seen and rank0:
            scale = _loss_scale(engine)
            log.warning("step %d: optimizer step skipped: non-finite gradients%s (%d skipped so far)", step,
                        f" (loss scaler overflow; scale now {scale})" if scale else "", skips)
        skips_seen = skips
        losses.append(loss_value)
        if not math.isfinite(loss_value):
            bad_in_a_row += 1
            if bad_in_a_row >= t.max_bad_steps:
                raise UserError(f"train: loss was non-finite for {bad_in_a_row} steps in a row (train.max_bad_steps="
                                f"{t.max_bad_steps}); stopping at step {step}")
        else:
            bad_in_a_row = 0
        if step % t.log_every == 0 or step == last_step or step == start_step + 1:
            gn = engine.get_global_grad_norm()
            gn = float(gn) if gn is not None else None
            window = (time.perf_counter() - last_log) / max(1, step - last_logged)
            last_log, last_logged = time.perf_counter(), step
            metrics.log(step, loss_value, lr, gn, window,
                        step - start_step,
                        extra={"skipped_steps": int(getattr(engine, "skipped_steps", 0)),
                               "loss_scale": _loss_scale(engine)})
        if t.eval_every > 0 and (step % t.eval_every == 0 or step == last_step):
            metrics.log_eval(step, _evaluate(engine, built, valid_ds, batch, state, device, t.eval_iters, loss_fn))
            last_log, last_logged = time.perf_counter(), step
        if cfg.checkpoint.every > 0 and (step % cfg.checkpoint.every == 0 or step == last_step):
            ckpt.save(engine, built.module, state, ckpt_dir, step,
                      {"consumed_samples": it.consumed_samples, "step": step}, cfg.checkpoint.keep, layout)
            last_log, last_logged = time.perf_counter(), step  # keep save time out of the throughput window
    elapsed = time.perf_counter() - run_start
    if not losses:
        field = "train.steps" if last_step == t.steps else "train.exit_at_step"
        raise UserError(f"{field}: {last_step} already reached by the checkpoint at step {start_step}")
    report = {
        "steps": t.steps, "start_step": start_step, "end_step": last_step,
        "first_loss": losses[0], "final_loss": losses[-1], "losses": losses,
        "elapsed_s": elapsed, "world_size": info.world_size, "tp": state.tp, "pp": state.pp, "dp": state.dp,
        "zero_stage": zero_stage(ds), "precision": precision(ds), "launcher": info.launcher,
        "tokens_per_s": metrics.last.get("tokens_per_s"), "tflops_per_rank": metrics.last.get("tflops_per_rank"),
        "mfu": metrics.last.get("mfu"), "mem_bytes": metrics.last.get("mem_bytes"),
        "skipped_steps": int(getattr(engine, "skipped_steps", 0)),
        "metrics": str(Path(cfg.run_dir) / "metrics.jsonl"),
    }
    metrics.close()
    if rank0:
        (Path(cfg.run_dir) / "report.json").write_text(json.dumps(report, indent=2))
    return report
