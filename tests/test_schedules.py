"""Recipes without a run: each LR schedule against its formula, run length in tokens, the batch
ramp's sizes, and the config and resume checks that guard them (one line each)."""
import math

import pytest

from megallama.config import CheckpointConfig, ConfigError, TrainConfig
from megallama.config.rampup import BatchRamp, samples_to_steps
from megallama.errors import UserError
from megallama.train.optim import lr_lambda
from megallama.train.resume import SCHEDULE, schedule_changed

STEPS, WARMUP, FLOOR = 100, 10, 0.1


def _f(schedule, **kw):
    return lr_lambda(TrainConfig(steps=STEPS, warmup_steps=WARMUP, min_lr_ratio=FLOOR, lr_schedule=schedule, **kw))


@pytest.mark.parametrize("schedule", ["cosine", "linear", "constant", "wsd", "inverse_sqrt"])
def test_every_schedule_warms_up_linearly(schedule):
    f = _f(schedule)
    assert [f(s) for s in (0, 4, 9)] == pytest.approx([0.1, 0.5, 1.0])


def test_cosine_linear_constant_follow_their_formulas():
    cos, lin, const = _f("cosine"), _f("linear"), _f("constant")
    for s in (10, 32, 55, 77, 99, 100, 150):
        p = min(1.0, (s - WARMUP) / (STEPS - WARMUP))
        assert cos(s) == pytest.approx(FLOOR + (1 - FLOOR) * 0.5 * (1 + math.cos(math.pi * p)))
        assert lin(s) == pytest.approx(FLOOR + (1 - FLOOR) * (1 - p))
        assert const(s) == 1.0
    assert cos(55) == pytest.approx(0.55) and lin(55) == pytest.approx(0.55) and lin(77) != pytest.approx(cos(77))


def test_wsd_holds_the_peak_then_decays_linearly_over_its_fraction():
    f = _f("wsd", lr_decay_fraction=0.25)  # decay over the last 25 of 100 steps: from step 75
    assert [f(s) for s in (10, 50, 75)] == [1.0, 1.0, 1.0]
    for s in (76, 80, 90, 99, 100, 120):
        assert f(s) == pytest.approx(FLOOR + (1 - FLOOR) * (1 - min(1.0, (s - 75) / 25)))
    assert f(80) == pytest.approx(0.82)


def test_inverse_sqrt_continues_the_warmup_and_is_floored():
    f = _f("inverse_sqrt")
    for s in (9, 10, 39, 399):
        assert f(s) == pytest.approx(max(FLOOR, math.sqrt(WARMUP / (s + 1))))
    assert f(39) == pytest.approx(0.5) and f(10**6) == FLOOR


def test_tokens_become_steps_by_one_rule():
    per_step = 8 * 64
    assert TrainConfig(tokens=10 * per_step, global_batch_size=8, seq_len=64).steps == 10
    assert TrainConfig(tokens=10 * per_step + 1, global_batch_size=8, seq_len=64).steps == 11  # covers every token
    ramp = TrainConfig(tokens=10**6, global_batch_size=8, seq_len=64, rampup_batch_size=[2, 2, 100])
    consumed, steps = 0, 0  # the walk the rule stands for, step by step
    while consumed < math.ceil(10**6 / 64):
        consumed, steps = consumed + ramp.ramp.global_batch(consumed), steps + 1
    assert ramp.steps == steps == 1972


@pytest.mark.parametrize("start,inc,samples,full,target", [(4, 4, 16, 12, 500), (1, 1, 1000, 37, 5000),
                                                           (32, 32, 6000, 1024, 9999), (8, 8, 7, 16, 3)])
def test_steps_for_samples_match_the_step_by_step_walk(start, inc, samples, full, target):
    ramp = BatchRamp(start, inc, samples, full)
    consumed, steps = 0, 0
    while consumed < target:
        consumed, steps = consumed + ramp.global_batch(consumed), steps + 1
    assert samples_to_steps(target, full, ramp) == steps


def test_ramp_grows_by_increments_over_the_samples_as_megatron():
    r = BatchRamp(start=4, increment=4, samples=16, full=12)
    assert [r.global_batch(c) for c in (0, 4, 7, 8, 15, 16, 28, 10**9)] == [4, 4, 4, 8, 8, 12, 12, 12]
    sizes, consumed = [], 0
    for _ in range(6):
        sizes.append(r.global_batch(consumed))
        consumed += sizes[-1]
    assert sizes == [4, 4, 8, 12, 12, 12]


@pytest.mark.parametrize("train,message", [
    ({"rampup_batch_size": [4, 4]}, "train.rampup_batch_size: expected three positive integers"),
    ({"rampup_batch_size": [4, 4, 16]}, "train.rampup_batch_size: needs train.global_batch_size"),
    ({"rampup_batch_size": [12, 4, 16], "global_batch_size": 12}, "start 12 must be below"),
    ({"rampup_batch_size": [4, 3, 16], "global_batch_size": 12}, "is not a multiple of the increment 3"),
    ({"tokens": 1000, "steps": 5, "global_batch_size": 8}, "train.tokens: give train.steps or train.tokens"),
    ({"tokens": 1000}, "train.tokens: needs train.global_batch_size"),
    ({"lr_schedule": "wsd", "steps": 10, "warmup_steps": 9}, "train.lr_decay_fraction: 0.2 of train.steps=10"),
    ({"trackers": ["csv", "csv"]}, "train.trackers: ['csv', 'csv'] names a tracker twice"),
])
def test_bad_recipe_is_one_line_naming_the_field(train, message):
    with pytest.raises(ConfigError) as err:
        TrainConfig(**train)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_ramp_sizes_must_split_over_micro_batches_and_ranks():
    t = TrainConfig(micro_batch_size=2, global_batch_size=16, rampup_batch_size=[4, 2, 100])
    t.batch_layout(1)
    with pytest.raises(ConfigError, match=r"train.rampup_batch_size: increment 2 is not divisible by "
                                          r"micro_batch_size x data-parallel size = 2 x 2"):
        t.batch_layout(2)


def test_weights_only_needs_a_checkpoint_to_load():
    with pytest.raises(ConfigError, match="checkpoint.load_weights_only: needs checkpoint.load"):
        CheckpointConfig(load_weights_only=True)


class _Cfg:
    def __init__(self, **train):
        self.train = TrainConfig(steps=6, warmup_steps=1, **train)


def _meta(cfg, **changes):
    return {"step": 4, "schedule": {**{k: getattr(cfg.train, k) for k in SCHEDULE}, **changes}}


def test_resume_refuses_a_changed_schedule_and_reads_older_checkpoints():
    cfg = _Cfg()
    assert not schedule_changed(_meta(cfg), cfg, "ckpt")
    older = {"step": 4, "schedule": {k: getattr(cfg.train, k) for k in ("steps", "warmup_steps", "lr", "min_lr_ratio")}}
    assert not schedule_changed(older, cfg, "ckpt")  # written before the new fields: their defaults
    for field, value in (("lr_schedule", "wsd"), ("rampup_batch_size", [2, 2, 8])):
        with pytest.raises(UserError) as err:
            schedule_changed(_meta(cfg, **{field: value}), cfg, "ckpt")
        assert f"train.{field}:" in str(err.value) and "train.allow_schedule_change=true" in str(err.value)
    assert schedule_changed(_meta(cfg, lr_schedule="wsd"), _Cfg(allow_schedule_change=True), "ckpt")
