"""The per-stage block counts every consumer reads (megallama/config/pipeline_split.py)."""
import pytest

from megallama.config import ModelConfig, RunConfig
from megallama.config.pipeline_split import (StageWeights, balanced_split, describe_split, stage_layers,
                                             stage_of_block, uniform_split)


def _run(preset, pp, **parallel):
    cfg = RunConfig(model=ModelConfig.preset(preset))
    cfg.parallel.pp = pp
    for k, v in parallel.items():
        setattr(cfg.parallel, k, v)
    return cfg


def test_llama3_405b_on_16_stages_is_meta_s_split():
    counts = _run("llama3-405b", 16).stage_layers()
    assert counts == [7] + [8] * 14 + [7]
    assert describe_split(counts) == "7/8x14/7"


def test_uniform_puts_the_remainder_in_the_middle():
    assert uniform_split(126, 16) == [7] + [8] * 14 + [7]
    assert uniform_split(4, 3) == [1, 2, 1]
    assert uniform_split(8, 4) == [2, 2, 2, 2]
    assert _run("tiny", 3, pipeline_partition="uniform").stage_layers() == [1, 2, 1]


def test_balanced_split_minimises_the_heaviest_stage():
    w = StageWeights(block=10, first=25, last=25)
    counts = balanced_split(12, 4, w)
    heaviest = max(c * w.block + (w.first if i == 0 else 0) + (w.last if i == 3 else 0) for i, c in enumerate(counts))
    # brute force over every contiguous split of 12 blocks into 4 non-empty stages
    best = min(max(a * 10 + 25, b * 10, c * 10, (12 - a - b - c) * 10 + 25)
               for a in range(1, 10) for b in range(1, 10) for c in range(1, 10) if a + b + c < 12)
    assert heaviest == best and sum(counts) == 12 and min(counts) >= 1
    assert balanced_split(5, 5, w) == [1] * 5  # one block each, however heavy the ends


def test_a_light_vocabulary_changes_nothing_and_explicit_lists_win():
    assert _run("tiny", 2).stage_layers() == [2, 2]
    assert _run("tiny", 2, pipeline_layers=[3, 1]).stage_layers() == [3, 1]
    assert stage_of_block([1, 2, 1]) == [0, 1, 1, 2]
    with pytest.raises(ValueError, match="adds up to 3"):
        stage_layers(4, 2, explicit=[2, 1])
