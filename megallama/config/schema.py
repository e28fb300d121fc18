"""The typed sections of a run config (parallel, train, data, checkpoint; the model's in
``model_schema``) and the run config that holds them.

Every failure raises :class:`ConfigError` whose message is one line naming the field and what
was expected, so the CLI can print it without a traceback.
"""
from __future__ import annotations

import logging
import math
from typing import Any, Dict, List, Literal, Optional, Union

from pydantic import BaseModel, field_validator, model_validator

from megallama.config import layout_rules as rules
from megallama.config.fields import MAX_SEED, MAX_SIZE, PRESET_DIR, ConfigError, Float, Int, _int, _num, _Strict
from megallama.config.model_schema import ModelConfig, RopeScaling, load_preset, preset_names
from megallama.config.pipeline_split import explicit_problem, stage_layers
from megallama.config.rampup import BatchRamp, ceil_div, ramp_problem, samples_to_steps

# the model section and the shared field types live beside this module; importers read them here too
__all__ = ["MAX_SEED", "MAX_SIZE", "PRESET_DIR", "ActivationCheckpointing", "BatchLayout", "CheckpointConfig",
           "ConfigError", "DataConfig", "ModelConfig", "ParallelConfig", "RopeScaling", "RunConfig", "TrainConfig",
           "load_preset", "preset_names"]


# ------------------------------------------------------------------------------------ parallel
class ParallelConfig(_Strict):
    tp: Int = _int(1, ge=-MAX_SIZE)  # below 1: check_layout says so by name
    pp: Int = _int(1, ge=-MAX_SIZE)
    sequence_parallel: bool = False
    # blocks per stage (megallama/config/pipeline_split.py): balanced by parameters with the embedding
    # and head counted, or uniform; an explicit list (one count per stage) overrides both
    pipeline_partition: Literal["parameters", "uniform", "embeddings"] = "parameters"  # pipeline_split.PARTITIONS
    pipeline_layers: Optional[List[Int]] = None
    # DeepSpeed-Ulysses: ranks each sequence is split over for the whole block, swapped to heads around
    # attention by all-to-alls (megallama/parallel/ulysses.py); 1 = off
    ulysses: Int = _int(1, ge=-MAX_SIZE)

    @property
    def model_ranks(self) -> int:
        """Ranks one model replica spans: the data-parallel degree is the world over this."""
        return self.tp * self.pp * self.ulysses

    def degrees(self) -> Dict[str, int]:
        """The set degrees, as the world-size rule names them (Ulysses only when on)."""
        return {"tp": self.tp, "pp": self.pp, **({"ulysses": self.ulysses} if self.ulysses != 1 else {})}


class ActivationCheckpointing(_Strict):
    mode: Literal["none", "full", "selective"] = "none"
    every: Int = _int(1)  # checkpoint every N blocks (full mode)
    partition_activations: bool = False
    cpu_checkpointing: bool = False


LR_SCHEDULES = ("cosine", "linear", "constant", "wsd", "inverse_sqrt")  # megallama/train/optim.py
TRACKERS = ("jsonl", "csv", "tensorboard", "wandb")  # megallama/train/trackers.py


class WandbConfig(_Strict):
    """Weights & Biases sink (``train.trackers`` lists ``wandb``); offline/online is wandb's own
    ``WANDB_MODE`` unless ``mode`` is set."""

    project: str = "megallama"
    name: Optional[str] = None  # default: the run directory's name
    dir: Optional[str] = None  # default: RUN_DIR (wandb writes RUN_DIR/wandb/...)
    mode: Optional[Literal["online", "offline", "disabled"]] = None


class TrainConfig(_Strict):
    steps: Int = _int(300)
    # the run's length in tokens instead: steps = the fewest whose global batches (ramp-up included) of
    # seq_len tokens cover it; needs global_batch_size, so the count does not depend on the rank count
    tokens: Optional[Int] = _int(None, le=2**62)
    seed: Int = _int(1234, ge=0, le=MAX_SEED)
    seq_len: Int = _int(256)
    # below 1: batch_layout says so by name; "auto": the largest dividing global_batch_size / dp that the
    # memory model fits on the device, chosen at start-up (megallama/train/prediction.py)
    micro_batch_size: Union[int, Literal["auto"]] = 4
    global_batch_size: Optional[Int] = _int(None)
    grad_accum_steps: Optional[Int] = _int(None)
    lr: Float = _num(3.0e-4, ge=0)
    min_lr_ratio: Float = _num(0.1, ge=0, le=1)
    warmup_steps: Int = _int(30, ge=0)
    # after the linear warm-up: cosine or linear decay to min_lr_ratio, constant, wsd (warmup-stable-decay:
    # the peak until the last lr_decay_fraction of the steps, then linear to min_lr_ratio), or inverse_sqrt
    # (peak x sqrt(warmup_steps / step), floored at min_lr_ratio)
    lr_schedule: Literal[LR_SCHEDULES] = "cosine"
    lr_decay_fraction: Float = _num(0.2, gt=0, le=1)
    # Megatron's --rampup-batch-size [start, increment, samples]: the global batch grows from start by
    # increment over that many consumed samples to global_batch_size
    rampup_batch_size: Optional[List[Int]] = None
    weight_decay: Float = _num(0.1, ge=0)
    beta1: Float = _num(0.9, ge=0, lt=1)
    beta2: Float = _num(0.95, ge=0, lt=1)
    eps: Float = _num(1.0e-8, gt=0)
    grad_clip: Float = _num(1.0, ge=0)
    log_every: Int = _int(10)
    exit_at_step: Optional[Int] = _int(None)  # stop early (with a checkpoint), keeping the schedule of `steps`
    eval_every: Int = _int(0, ge=0)
    eval_iters: Int = _int(10)
    max_bad_steps: Int = _int(5)  # consecutive non-finite steps before the run stops
    activation_checkpointing: ActivationCheckpointing = ActivationCheckpointing()
    compile: bool = False
    dist_timeout_s: Int = _int(300)  # collective timeout of the process group
    # a rank silent this long is declared dead (0: no watchdog)
    heartbeat_timeout_s: Float = _num(60.0, ge=0, le=MAX_SIZE)
    # wall-clock budget from process start: stop (with a checkpoint, exit 75) while a step and a save still fit
    time_limit_min: Optional[Float] = _num(None, gt=0, le=MAX_SIZE)
    # a resume whose steps/warmup_steps/lr/min_lr_ratio differ from the checkpoint's is refused (as
    # Megatron does) unless this re-fits the schedule (Megatron's --override-opt_param-scheduler)
    allow_schedule_change: bool = False
    trackers: List[Literal[TRACKERS]] = ["jsonl", "csv", "tensorboard"]  # where each step's record goes
    wandb: WandbConfig = WandbConfig()

    @field_validator("micro_batch_size", mode="before")
    @classmethod
    def _micro_batch(cls, value: Any) -> Any:
        if value == "auto" or isinstance(value, int) and not isinstance(value, bool) and abs(value) <= MAX_SIZE:
            return value
        raise ValueError(f"input should be a valid integer up to {MAX_SIZE} or 'auto'")

    @property
    def ramp(self) -> Optional[BatchRamp]:
        r = self.rampup_batch_size
        return None if r is None else BatchRamp(r[0], r[1], r[2], self.global_batch_size)

    @property
    def decay_steps(self) -> int:
        """WSD's decay phase: the last ``lr_decay_fraction`` of the steps (at least one)."""
        return max(1, round(self.lr_decay_fraction * self.steps))

    @model_validator(mode="after")
    def _steps_from_tokens(self) -> "TrainConfig":
        problem = ramp_problem(self.rampup_batch_size, self.global_batch_size)
        if problem:
            raise ConfigError(problem)
        if len(set(self.trackers)) != len(self.trackers):
            raise ConfigError(f"train.trackers: {self.trackers} names a tracker twice")
        if self.tokens is None:
            return self
        if "steps" in self.model_fields_set:
            raise ConfigError("train.tokens: give train.steps or train.tokens, not both")
        if self.global_batch_size is None:
            raise ConfigError("train.tokens: needs train.global_batch_size (steps = tokens / (global batch x "
                              "seq_len), independent of the rank count)")
        steps = samples_to_steps(ceil_div(self.tokens, self.seq_len), self.global_batch_size, self.ramp)
        if steps > MAX_SIZE:
            raise ConfigError(f"train.tokens: {self.tokens} tokens make {steps} steps, above {MAX_SIZE}")
        self.__dict__["steps"] = steps  # not via assignment: that would validate this model again
        return self

    @model_validator(mode="after")
    def _warmup_within_steps(self) -> "TrainConfig":
        """A warm-up as long as the run never reaches its LR: refused when asked for; the default
        (30) shrinks to a tenth of a shorter run, and says so."""
        if self.warmup_steps < self.steps:
            return self
        if "warmup_steps" in self.model_fields_set:
            raise ConfigError(f"train.warmup_steps: {self.warmup_steps} is not fewer than train.steps={self.steps} "
                              "(the LR would never reach its peak); lower warmup_steps or raise steps")
        short = self.steps // 10
        logging.getLogger(__name__).info("train.warmup_steps: the default %d is not fewer than train.steps=%d; "
                                         "using %d", self.warmup_steps, self.steps, short)
        self.__dict__["warmup_steps"] = short  # not via assignment: that would validate this model again
        return self

    @model_validator(mode="after")
    def _decay_after_warmup(self) -> "TrainConfig":
        if self.lr_schedule == "wsd" and self.warmup_steps + self.decay_steps > self.steps:
            raise ConfigError(f"train.lr_decay_fraction: {self.lr_decay_fraction} of train.steps={self.steps} is "
                              f"{self.decay_steps} decay steps, which overlap the {self.warmup_steps} warm-up steps")
        return self

    def batch_layout(self, dp: int) -> "BatchLayout":
        """Resolve global = micro x accumulation x dp from whichever two are given."""
        mbs, gbs, acc = self.micro_batch_size, self.global_batch_size, self.grad_accum_steps
        if mbs == "auto":
            raise ConfigError("train.micro_batch_size: auto is chosen for a world size and a device; "
                              "train and validate --world-size choose it, other commands need a number")
        if mbs <= 0:
            raise ConfigError(f"train.micro_batch_size: expected a positive integer, got {mbs}")
        if dp <= 0:
            raise ConfigError(f"parallel: data-parallel size must be a positive integer, got {dp}")
        if gbs is None:
            acc = 1 if acc is None else acc
            gbs = mbs * acc * dp
        elif acc is None:
            if gbs % (mbs * dp):
                raise ConfigError(
                    f"train.global_batch_size: {gbs} is not divisible by micro_batch_size x data-parallel size"
                    f" = {mbs} x {dp}")
            acc = gbs // (mbs * dp)
        elif gbs != mbs * acc * dp:
            raise ConfigError(
                f"train.global_batch_size: {gbs} contradicts micro_batch_size x grad_accum_steps x data-parallel"
                f" size = {mbs} x {acc} x {dp} = {mbs * acc * dp}")
        if acc <= 0:
            raise ConfigError(f"train.grad_accum_steps: expected a positive integer, got {acc}")
        if self.rampup_batch_size is not None:
            for name, size in zip(("start", "increment"), self.rampup_batch_size):
                if size % (mbs * dp):
                    raise ConfigError(f"train.rampup_batch_size: {name} {size} is not divisible by micro_batch_size "
                                      f"x data-parallel size = {mbs} x {dp}")
        return BatchLayout(micro=mbs, accum=acc, dp=dp, global_=gbs)


class BatchLayout(BaseModel):
    micro: int
    accum: int
    dp: int
    global_: int


class DataConfig(_Strict):
    prefixes: List[str] = []  # Megatron .bin/.idx prefixes; empty (and no sources): the embedded corpus
    # raw documents (what `megallama preprocess --input` reads: JSONL, .gz/.zst, parquet, arrow, a datasets
    # directory) tokenized at start with data.tokenizer and cached; each joins the blend after the prefixes
    sources: List[str] = []
    text_field: str = "text"  # the JSONL key or table column holding data.sources' text
    weights: Optional[List[Float]] = None  # blend weights; None: proportional to each prefix's tokens
    tokenizer: Optional[str] = None  # sentencepiece model; required with prefixes
    split: str = "98,1,1"  # train,valid,test shares of the documents of every prefix
    embedded_max_files: Int = _int(400, ge=-MAX_SIZE)  # stdlib files taken for the embedded corpus
    cache_dir: Optional[str] = None  # tokenizer/corpus/validation caches; None: RUN_DIR/data
    shuffle: bool = True  # seeded per-epoch document order and sample order (Megatron's), from train.seed
    # packed documents attend only within themselves (block-diagonal causal mask; a document's last
    # token is not trained to predict the next document's first), as Llama 3 trained
    document_mask: bool = False
    reset_position_ids: bool = False  # RoPE positions restart at each document (needs document_mask)

    @field_validator("split")
    @classmethod
    def _split(cls, value: str) -> str:
        parts = [p.strip() for p in value.replace("/", ",").split(",")]
        try:
            shares = [float(p) for p in parts]
        except ValueError:
            raise ValueError("expected up to three comma-separated numbers like '98,1,1'") from None
        if not 1 <= len(shares) <= 3 or any(x < 0 or not math.isfinite(x) for x in shares) or shares[0] <= 0:
            raise ValueError("expected 1-3 non-negative shares with a positive train share")
        return value

    @field_validator("weights")
    @classmethod
    def _weights(cls, value: Optional[List[float]]) -> Optional[List[float]]:
        if value is not None and (not value or any(not (w > 0 and math.isfinite(w)) for w in value)):
            raise ValueError("expected a non-empty list of positive blend weights")
        return value

    @field_validator("embedded_max_files")
    @classmethod
    def _max_files(cls, value: int) -> int:
        if value < 1:
            raise ValueError("expected a positive number of files")
        return value

    @field_validator("sources")
    @classmethod
    def _sources(cls, value: List[str]) -> List[str]:
        if "-" in value:
            raise ValueError("standard input ('-') cannot feed a run (read it with `megallama preprocess --input -`)")
        return value

    @model_validator(mode="after")
    def _documents(self) -> "DataConfig":
        if self.reset_position_ids and not self.document_mask:
            raise ConfigError("data.reset_position_ids: needs data.document_mask: true (positions restart "
                              "where attention is cut, at each document)")
        return self


class CheckpointConfig(_Strict):
    every: Int = _int(100, ge=0)  # 0: no periodic checkpoints
    keep: Int = _int(3)  # at least the checkpoint just written
    dir: Optional[str] = None  # default: RUN_DIR/checkpoints
    resume: bool = True  # continue from the newest complete checkpoint in dir
    load: Optional[str] = None  # else start from this checkpoint (any layout, e.g. `megallama convert` output)
    # where checkpoint files live over nodes (megallama/train/storage.py): "shared" (one directory every
    # node sees; refused at start if not), "node_local" (each node keeps its ranks' files plus a copy of
    # the layout-free part), "auto" (shared when the start-up probe finds it shared, else refused)
    storage: Literal["auto", "shared", "node_local"] = "auto"
    # start from checkpoint.load's weights alone, at step 0 with a fresh optimizer, LR schedule and data
    # position (Megatron's --finetune); a restart of this run still resumes from its own checkpoints
    load_weights_only: bool = False

    @model_validator(mode="after")
    def _weights_need_load(self) -> "CheckpointConfig":
        if self.load_weights_only and not self.load:
            raise ConfigError("checkpoint.load_weights_only: needs checkpoint.load (the checkpoint whose weights "
                              "start the run)")
        return self


class RunConfig(_Strict):
    run_dir: str = "runs/default"
    model: ModelConfig = ModelConfig()
    parallel: ParallelConfig = ParallelConfig()
    train: TrainConfig = TrainConfig()
    data: DataConfig = DataConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    deepspeed: Dict[str, Any] = {}

    def check_layout(self, world_size: Optional[int] = None) -> None:
        """Reject layouts that cannot work, before any process group exists. The rules are
        :mod:`megallama.config.layout_rules`; its ZeRO ones run where the DeepSpeed section is read."""
        m, p, t = self.model, self.parallel, self.train
        m.check()
        if self.data.document_mask and m.arch == "encoder_decoder":
            raise ConfigError("data.document_mask: packs decoder-only samples; an encoder-decoder's rows are "
                              "one source and one target each (set it false)")
        ac = t.activation_checkpointing
        problem = (rules.positive_problem("tp", p.tp) or rules.positive_problem("pp", p.pp)
                   or rules.positive_problem("ulysses", p.ulysses)
                   or rules.layout_problem(m.shape, p.tp, p.pp, p.sequence_parallel, t.seq_len, ulysses=p.ulysses)
                   or rules.partition_problem(m.arch, p.tp, p.sequence_parallel, ac.mode == "full",
                                              ac.partition_activations)
                   or rules.positions_problem(t.seq_len, m.max_seq_len)
                   or (None if world_size is None else rules.world_problem(world_size, p.degrees())))
        if problem is None and p.pipeline_layers is not None:
            problem = explicit_problem(p.pipeline_layers, m.n_layers, p.pp)
        if problem:
            raise ConfigError(problem)
        if world_size is not None and t.micro_batch_size != "auto":   # auto: chosen once the layout is known good
            t.batch_layout(world_size // p.model_ranks)

    def stage_layers(self) -> List[int]:
        """Blocks on each pipeline stage of this run (one entry at pp 1)."""
        p = self.parallel
        return stage_layers(self.model.n_layers, p.pp, p.pipeline_partition, p.pipeline_layers,
                            self.model.pipeline_weights())
