"""DeepSpeed-Ulysses' activation memory, measured: the bytes autograd saves per rank (the
saved-tensor meter, distinct storages) for one block and for the whole model at Ulysses 1, 2
and 4 fall ~1/N and agree with the memory model (``profiling.activations``, ``ulysses=N``).

One block is the meter's live bytes across ``layers[1]`` in the model's own forward; the whole
model is the live bytes at the end of the forward (less the loss's logits, alive there but not
saved). Both match the model byte for byte (the issue asks for 5%), including the embedding's ids,
a view of the whole ``[b, s]`` rows that keeps their storage. The same measurement against the
model evaluated as if Ulysses were off is 2x-4x out: the comparison can fail.
"""
import pytest
import torch

from tests.dist_utils import run_distributed

SEQ, MBS = 128, 2
# (preset, n_kv_heads, dtype, recompute): MQA replicates its one KV head to every rank
CASES = [("tiny", None, "fp32", "none"), ("tiny-gqa", 1, "fp32", "none"), ("tiny-gqa", None, "bf16", "none"),
         ("tiny", None, "fp32", "selective"), ("tiny-gqa", 1, "fp32", "full")]


def _measure_case(state, preset, kv, dtype, recompute):
    import functools

    from megallama.config import ModelConfig
    from megallama.model import build_model
    from megallama.parallel.random import checkpoint
    from megallama.profiling.measure import SavedTensorMeter

    cfg = ModelConfig.preset(preset, **({} if kv is None else {"n_kv_heads": kv}))
    model = build_model(cfg, state, seed=3).to(torch.float32 if dtype == "fp32" else torch.bfloat16)
    for layer in model.layers:
        if recompute == "full":
            layer.checkpoint_fn = functools.partial(checkpoint, state.rng)
        layer.attention.recompute_core = recompute == "selective"
    tokens = torch.randint(0, cfg.vocab_size, (MBS, SEQ), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():  # RoPE's tables exist before the meter lists them as constants
        model(tokens)
    meter = SavedTensorMeter(model)

    def mark(name):
        def hook(*_):
            meter.mark(name)
        return hook

    hooks = [model.layers[1].register_forward_pre_hook(mark("block_in")),
             model.layers[1].register_forward_hook(mark("block_out"))]
    with meter:
        loss = model(tokens, tokens)
        meter.mark("forward")
    for h in hooks:  # a recomputed block's forward in backward is not the forward pass
        h.remove()
    loss.backward()  # the step the saved tensors serve runs through
    return dict(block=meter.marks["block_out"] - meter.marks["block_in"], model=meter.marks["forward"])


def _predict(preset, kv, dtype, recompute, u):
    from megallama.config import ModelConfig
    from megallama.profiling import activations as act
    from megallama.profiling.layout import Layout
    from megallama.profiling.memory import stage_activation_bytes

    cfg = ModelConfig.preset(preset, **({} if kv is None else {"n_kv_heads": kv}))
    impl = act.ActivationImpl.for_device("cpu")
    layout = Layout(mbs=MBS, dtype=dtype, recompute=recompute, ulysses=u)
    d = stage_activation_bytes(cfg, layout, SEQ, 0, impl)
    # the loss's logits are alive at the peak but not saved: the meter does not see them
    transient = sum(x.bytes for x in act.last_stage_saved_tensors(cfg, SEQ // u, MBS, 1, False, layout.dtype_bytes,
                                                                   impl) if not x.saved)
    block = act.activation_bytes_per_layer(cfg, SEQ, MBS, 1, False, recompute, layout.dtype_bytes, impl,
                                           "decoder", u)
    return dict(block=block, model=d["blocks"] + d["embedding"] + d["head_and_loss"] - transient)


def _measure_all(rank, world):
    from megallama.parallel import initialize

    state = initialize(ulysses=world)
    return [_measure_case(state, *case) for case in CASES]


@pytest.fixture(scope="module")
def measured():
    single = _measure_all(0, 1)
    return {1: single, 2: run_distributed(_measure_all, 2), 4: run_distributed(_measure_all, 4)}


@pytest.mark.parametrize("u", [1, 2, 4])
def test_measured_bytes_match_the_memory_model(measured, u):
    for case, got in zip(CASES, measured[u]):
        want = _predict(*case, u)
        assert got == want, (case, u)
        if u > 1:  # the model as if Ulysses were off is far out: the check can fail
            assert abs(got["model"] - _predict(*case, 1)["model"]) > 0.4 * got["model"], (case, u)


@pytest.mark.parametrize("u", [2, 4])
def test_bytes_per_rank_fall_about_one_over_the_degree(measured, u):
    for case, got, one in zip(CASES, measured[u], measured[1]):
        for part in ("block", "model"):
            ratio = got[part] / one[part]
            # a little under 1/u (the QKV output a V view kept at u=1 is freed by the all-to-all), or
            # over it where KV heads fewer than u are replicated (MQA at u=4: 1.04/u)
            assert 0.85 / u <= ratio <= 1.1 / u, (case, u, part, ratio)
