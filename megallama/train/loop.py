"""The training loop: start-up, resume, steps, evaluation, checkpoints, report."""
from __future__ import annotations

import json
import logging
import os
import socket
import statistics
import time
from pathlib import Path
from typing import Any, Dict, Optional

from megallama.config import RunConfig
from megallama.config.pipeline_split import describe_split
from megallama.errors import UserError
from megallama.train import checkpoint as ckpt
from megallama.train.distributed import on_rank0_then_share
from megallama.train.ds_config import precision, zero_stage
from megallama.train.engine import set_schedule_position
from megallama.train.hooks import HookList, installed
from megallama.train.metrics import MetricsLogger
from megallama.train.preemption import Preemption
from megallama.train.progress import Progress, skipped_steps
from megallama.train.resume import SCHEDULE, plan_resume
from megallama.train.runtime import Runtime, guard, on_device, open_datasets, prepared_data, start
from megallama.train.storage import resolve as resolve_storage
from megallama.train.trackers import check_trackers

log = logging.getLogger(__name__)


def train(cfg: RunConfig) -> Dict[str, Any]:
    """Run ``cfg.train.steps`` optimizer steps; returns the final report (on every rank)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("DeepSpeed", "deepspeed", "torch.distributed"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    rt = start(cfg, fits=True)  # a model/batch too big is one line, not an OOM
    with guard(rt, checkpoints=True, heartbeats=True):  # before anything is written to the run directory
        return _train(rt)


def _evaluate(rt: Runtime, dataset, iters: int) -> Dict[str, Any]:
    """Validation loss over ``iters`` global batches' worth of samples."""
    from megallama.train.evaluate import perplexity, pipeline_loss

    b = rt.batch
    if rt.pipeline:
        return pipeline_loss(rt.engine, dataset, b.micro, b.accum, rt.state, rt.device, iters, rt.loss_fn)
    return perplexity(rt.engine.module, dataset, b.micro, rt.device, rt.state, max_samples=iters * b.global_,
                      loss_fn=rt.loss_fn)


def _predict(rt: Runtime, rates: Optional[Dict[str, float]]) -> Optional[Dict[str, Any]]:
    """The run's prediction on this device (every rank its own, none waiting on another; rank 0
    prints the start line), or None with the reason logged when there is no profile to cost it on."""
    from megallama.train.prediction import predict_run

    try:
        p = predict_run(rt.cfg, rt.info.world_size, rates=rates)
    except UserError as exc:
        if rt.rank0:
            log.warning("no prediction for this run: %s", exc)
        return None
    if rt.rank0:
        log.info("%s", p.line())
    return p.as_dict()


def _metrics(rt: Runtime, start_step: int, predicted: Optional[Dict[str, Any]], peak: tuple) -> MetricsLogger:
    from megallama.profiling.flops import flops_per_token

    t = rt.cfg.train
    flops = flops_per_token(rt.cfg.model, t.seq_len, t.activation_checkpointing.mode)
    peak, peak_source = peak   # prediction.measure_at_start's
    if rt.rank0:
        log.info("peak %.2f TFLOP/s per rank (%s); %.3g model FLOPs per token", peak / 1e12, peak_source, flops.model)
    return MetricsLogger(rt.cfg, rt.rank0, rt.info.world_size, flops.model, flops.hardware, peak,
                         start_step=start_step, mem_predicted=rt.mem_predicted,
                         step_time_predicted=predicted["step_time_s"] if predicted else None)


def _train(rt: Runtime) -> Dict[str, Any]:
    cfg, state, ds, t = rt.cfg, rt.state, rt.ds, rt.cfg.train
    batch = rt.batch
    if rt.rank0:
        log.info("launcher=%s world=%d tp=%d pp=%d%s dp=%d zero=%d precision=%s global_batch=%d (%d x %d x %d)",
                 rt.info.launcher, rt.info.world_size, state.tp, state.pp,
                 f" ulysses={state.ulysses}" if state.ulysses > 1 else "", state.dp, zero_stage(ds), precision(ds),
                 batch.global_, batch.micro, batch.accum, state.dp)
        if state.pp > 1:
            log.info("pipeline stages hold %s of %d layers", describe_split(cfg.stage_layers()), cfg.model.n_layers)
        if rt.micro_batch_choice:
            log.info("%s", rt.micro_batch_choice)
    from megallama.train.prediction import measure_at_start

    rates, peak = measure_at_start(rt)
    predicted = _predict(rt, rates)
    ckpt_dir = Path(cfg.checkpoint.dir or Path(cfg.run_dir) / "checkpoints")
    storage = resolve_storage(cfg.checkpoint.storage, ckpt_dir, cfg.checkpoint.every > 0 or cfg.checkpoint.resume)
    check_trackers(t.trackers)
    data = prepared_data(cfg)
    train_ds, valid_ds, _ = open_datasets(cfg, data)
    if rt.rank0:  # only once the data is known good: a failed start leaves no config behind
        (Path(cfg.run_dir) / "config.json").write_text(json.dumps(cfg.model_dump(), indent=2))
    layout = {"model": cfg.model.model_dump(), "tp": state.tp, "pp": state.pp, "dp": state.dp, "ulysses": state.ulysses,
              "zero": zero_stage(ds), "precision": precision(ds), "world_size": rt.info.world_size,
              # pipeline stages name their parameters as the model does (DeepSpeed's per-layer
              # files of an older pipeline run do not load as they are: resume those layout-free)
              "stage_names": "canonical",
              "stage_layers": cfg.stage_layers(),  # DeepSpeed's per-stage optimizer files fit this split only
              "schedule": {k: getattr(t, k) for k in SCHEDULE},
              # what `convert` writes beside exported weights when not given --tokenizer: the file
              # the run's tokens were made with (data.tokenizer, or the embedded corpus's own)
              "data": {"tokenizer": os.path.abspath(data.tokenizer)}}
    resume = plan_resume(cfg, ckpt_dir, layout, rt.rank0, storage)
    it = rt.sampler(train_ds, resume.consumed_samples)
    rt.build(universal=resume.universal, step=resume.step, weights_only=resume.weights_only)
    rt.consumed_samples = resume.consumed_samples
    if resume.native:
        rt.engine.load_checkpoint(str(resume.path.parent), tag=resume.path.name)
        ckpt.load_rng(resume.path, state.rng)
        if resume.refit:  # the restored schedule keeps the checkpoint's peak LR: take the config's
            set_schedule_position(rt.engine.lr_scheduler, resume.step, base_lr=t.lr)

    start_step, last_step = resume.step, min(t.steps, t.exit_at_step or t.steps)
    metrics = _metrics(rt, start_step, predicted, peak)
    progress = Progress(metrics, start_step, last_step, t.max_bad_steps, t.log_every, t.eval_every)
    hooks = HookList(installed() + [progress])
    batches = on_device(it, rt.device)
    run_start = time.perf_counter()
    preempt, stopped = Preemption(t.time_limit_min, rt.device), None
    with preempt:  # from here a SIGTERM/SIGINT stops every rank at a step boundary, with a checkpoint
        for step in range(start_step + 1, last_step + 1):
            began = time.perf_counter()
            rt.scheduled_step(batches, hooks, it)
            if t.eval_every > 0 and (step % t.eval_every == 0 or step == last_step):
                metrics.log_eval(step, _evaluate(rt, valid_ds, t.eval_iters))
                progress.restart_window(step)
            metrics.commit()
            # collective: every rank stops after the same step (on the last one, the run is simply done)
            stopped = preempt.should_stop(time.perf_counter() - began) if step < last_step else None
            if stopped or cfg.checkpoint.every > 0 and (step % cfg.checkpoint.every == 0 or step == last_step):
                began = time.perf_counter()
                ckpt.save(rt.engine, rt.module, state, ckpt_dir, step,
                          {"consumed_samples": rt.consumed_samples, "step": step}, cfg.checkpoint.keep,
                          layout, hooks=hooks, storage=storage)
                preempt.saved(time.perf_counter() - began)
                progress.restart_window(step)  # keep save time out of the throughput window
            if stopped:
                break
    extra = _preempted(rt, stopped, ckpt_dir) if stopped else {}
    return _report(rt, progress, metrics, time.perf_counter() - run_start, last_step, {**extra,
                                                                                        **_checked(metrics, predicted)})


def _checked(metrics: MetricsLogger, predicted: Optional[Dict[str, Any]]) -> Dict[str, Any]:
    """The report's predicted-vs-measured: the median logged step time past the run's first record
    (its window holds start-up: first-touch allocation, kernel selection) against the prediction."""
    from megallama.train.metrics import relative_error

    times = metrics.step_times[1:] or metrics.step_times
    measured = statistics.median(times) if times else None
    pred = predicted["step_time_s"] if predicted else None
    if metrics.enabled and measured and pred:
        log.info("predicted vs measured: step %.4g s vs %.4g s (%+.1f%%), %s tokens/s vs %s", pred, measured,
                 100 * relative_error(measured, pred), f"{predicted['tokens_per_s']:,.0f}",
                 f"{predicted['tokens_per_s'] * pred / measured:,.0f}")
    return {"predicted": predicted, "step_time_s": measured, "step_time_predicted_s": pred,
            "step_time_error": relative_error(measured, pred)}


def _rank_hosts() -> list:
    """Each rank's hostname in rank order: where a multi-node run really ran (a list of one alone)."""
    import torch.distributed as dist

    host = socket.gethostname()
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [host]
    hosts = [None] * dist.get_world_size()
    dist.all_gather_object(hosts, host)
    return hosts


def _preempted(rt: Runtime, reason: str, ckpt_dir: Path) -> Dict[str, Any]:
    """The report of a preempted run: where it stopped and the step its newest checkpoint holds
    (read back from ``latest``), so the steps a resume loses are measured, not assumed."""
    saved = on_rank0_then_share(lambda: ckpt.read_meta(ckpt_dir / (ckpt_dir / ckpt.LATEST).read_text().strip()))
    lost = rt.step - saved["step"]
    if rt.rank0:
        log.info("%s: stopped after step %d; checkpoint step %d, steps lost %d", reason, rt.step, saved["step"], lost)
    return {"preempted": reason, "end_step": rt.step, "checkpoint_step": saved["step"], "steps_lost": lost}


def _report(rt: Runtime, progress: Progress, metrics: MetricsLogger, elapsed: float, last_step: int,
            extra: Dict[str, Any]) -> Dict[str, Any]:
    cfg, state, t, losses = rt.cfg, rt.state, rt.cfg.train, progress.losses
    if not losses:
        field = "train.steps" if last_step == t.steps else "train.exit_at_step"
        raise UserError(f"{field}: {last_step} already reached by the checkpoint at step {progress.start_step}")
    report = {
        "steps": t.steps, "start_step": progress.start_step, "end_step": last_step,
        "first_loss": losses[0], "final_loss": losses[-1], "losses": losses,
        "elapsed_s": elapsed, "world_size": rt.info.world_size, "tp": state.tp, "pp": state.pp, "dp": state.dp,
        "ulysses": state.ulysses,
        "zero_stage": zero_stage(rt.ds), "precision": precision(rt.ds), "launcher": rt.info.launcher,
        "tokens_per_s": metrics.last.get("tokens_per_s"), "tflops_per_rank": metrics.last.get("tflops_per_rank"),
        "mfu": metrics.last.get("mfu"), "mem_bytes": metrics.last.get("mem_bytes"),
        "skipped_steps": skipped_steps(rt.engine), "hosts": _rank_hosts(),
        "metrics": str(Path(cfg.run_dir) / ("metrics.jsonl" if "jsonl" in t.trackers else "")),
        "preempted": None, **extra,
    }
    metrics.close()
    if rt.rank0:
        (Path(cfg.run_dir) / "report.json").write_text(json.dumps(report, indent=2))
    return report
