"""A model uses only the layout it was built for: with every global route to a parallel state or
an RNG tracker made to raise, forward and backward still run (one process, and TP=2 with
sequence parallelism on two gloo ranks), dropout streams and recomputation included."""
from __future__ import annotations

import functools
import sys

import pytest
import torch

from megallama.config import ModelConfig
from megallama.model import LlamaForSequenceClassification, build_model
from megallama.parallel import ParallelState, model_parallel_seed
from megallama.parallel.random import RNGStatesTracker, checkpoint
from tests.dist_utils import run_distributed

LOOKUPS = ("get_state", "set_state", "layout", "get_rng_tracker", "set_rng_tracker")
GLOBALS = ("_STATE", "_TRACKER")


class _Poisoned:
    def __getattr__(self, name):
        raise AssertionError(f"read the global parallel state (.{name})")


def _refuse(*args, **kwargs):
    raise AssertionError("looked up the global parallel state")


def forbid_global_state(setattr_) -> None:
    """Make every module-level layout, tracker or lookup function in megallama raise when used."""
    for name, module in list(sys.modules.items()):
        if not name.startswith("megallama") or module is None:
            continue
        for attr, value in list(vars(module).items()):
            if attr in LOOKUPS and callable(value):
                setattr_(module, attr, _refuse)
            elif attr in GLOBALS or isinstance(value, (ParallelState, RNGStatesTracker)):
                setattr_(module, attr, _Poisoned())


def _model(arch: str, state: ParallelState, seed: int = 3):
    """A training-mode model with dropout, recomputed blocks and recomputed attention cores."""
    cfg = ModelConfig.preset("tiny-encdec" if arch == "encdec" else "tiny", dropout=0.1, n_layers=2,
                             num_labels=3)
    model = LlamaForSequenceClassification(cfg, state, seed=seed) if arch == "classifier" \
        else build_model(cfg, state, seed=seed)
    for layer in list(getattr(model, "encoder_layers", [])) + list(model.layers):
        layer.checkpoint_fn = functools.partial(checkpoint, state.rng)
        layer.attention.recompute_core = True
    model_parallel_seed(state, seed)
    return model.train()


def _loss(model, arch: str, seq: int = 8):
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, model.config.vocab_size, (2, seq), generator=gen)
    if arch == "encdec":
        return model(tokens.flip(1), tokens, labels=tokens)
    if arch == "classifier":
        return model(tokens, labels=torch.tensor([0, 2]))
    return model(tokens, labels=tokens)


def _check_grads(model) -> None:
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


ARCHES = ["decoder", "encdec", "classifier"]
LAYOUTS = [ParallelState(), ParallelState(sequence_parallel=True)]  # SP routes through the per-rank stream


@pytest.mark.parametrize("arch", ARCHES)
@pytest.mark.parametrize("layout", LAYOUTS, ids=["tp1", "tp1-sp"])
def test_forward_and_backward_read_no_global(arch, layout, monkeypatch):
    model = _model(arch, ParallelState(sequence_parallel=layout.sequence_parallel))
    forbid_global_state(monkeypatch.setattr)
    _loss(model, arch).backward()
    _check_grads(model)


@pytest.mark.parametrize("arch", ARCHES)
def test_backward_reads_no_global(arch, monkeypatch):
    """The autograd functions keep their group in ``ctx``: backward alone is checked too."""
    model = _model(arch, ParallelState(sequence_parallel=True))
    loss = _loss(model, arch)
    forbid_global_state(monkeypatch.setattr)
    loss.backward()
    _check_grads(model)


def test_the_guard_catches_a_global_read(monkeypatch):
    """The poison is live: a lookup of the old kind raises."""
    import megallama.parallel.state as state_module

    monkeypatch.setattr(state_module, "_STATE", None, raising=False)
    monkeypatch.setattr(state_module, "get_state", lambda: state_module._STATE, raising=False)
    forbid_global_state(monkeypatch.setattr)
    with pytest.raises(AssertionError, match="global parallel state"):
        state_module.get_state()
    with pytest.raises(AssertionError, match="global parallel state"):
        state_module._STATE.tp


def _tp2_sp(rank, world):
    from megallama.parallel import initialize

    state = initialize(tp=world, sequence_parallel=True)
    models = {arch: _model(arch, state) for arch in ARCHES}
    forbid_global_state(setattr)  # a spawned rank: nothing to restore
    for arch, model in models.items():
        _loss(model, arch).backward()
        _check_grads(model)
    return True


def test_tp2_sequence_parallel_reads_no_global():
    assert run_distributed(_tp2_sp, 2)
