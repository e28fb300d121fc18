"""Document-aware packing and the global-batch token mean.

A packed row under ``data.document_mask`` gives each document the logits and loss it has alone
(and not without the mask), on one process and at TP=2 with sequence parallelism; the packed
dataset's document ids come from the index's boundaries; a training step's gradient over DP
ranks and micro-batches with uneven ignored labels is the full batch's token-mean gradient
(the old per-micro-batch mean is shown to miss it); a PP=2 run trains as the PP=1 run does."""
from contextlib import contextmanager

import numpy as np
import pytest
import torch

from tests.dist_utils import run_distributed

LENS = [5, 7, 4, 9]  # one packed row of 25 tokens: inputs 24, four documents (the last cut short)


def _packed_row(vocab: int):
    """``[2, 25]`` tokens over document ids, and the documents it packs."""
    g = torch.Generator().manual_seed(0)
    docs = [torch.randint(0, vocab, (n,), generator=g) for n in LENS]
    ids = torch.cat([torch.full((n,), i) for i, n in enumerate(LENS)])
    return torch.stack([torch.cat(docs), ids]), docs


def _per_document(model, docs):
    """Each document run alone: logits and per-token loss sums, in order."""
    logits, sums, count = [], 0.0, 0
    for d in docs:
        logits.append(model(d[None, :-1]))
        n = len(d) - 1
        sums, count = sums + model(d[None, :-1], labels=d[None, 1:]) * n, count + n
    return torch.cat(logits, dim=1), sums / count


def test_a_packed_row_equals_each_document_alone():
    from megallama.config import ModelConfig
    from megallama.model import build_model
    from megallama.model.rope import document_positions
    from megallama.train.step import DecoderLoss

    cfg = ModelConfig.preset("tiny-gqa")
    model = build_model(cfg, seed=3)
    row, docs = _packed_row(cfg.vocab_size)
    fn = DecoderLoss(document_mask=True, reset_positions=True)
    tokens, labels, ids, pos = fn.parts(row[None])
    assert pos[0].tolist() == [i for n in LENS for i in range(n)][:24]
    assert (labels == -100).sum() == len(LENS) - 1  # the three boundaries predict nothing
    with torch.no_grad():
        packed = model(tokens, document_ids=ids, position_ids=pos)
        plain = model(tokens)
        loss, count = fn(model, row[None])
        ref, alone_loss = _per_document(model, docs)
    keep = (labels[0] != -100).nonzero().squeeze(1)  # positions that are not a document's last token
    assert (packed[0, keep] - ref[0]).abs().max() < 1e-5
    assert abs(loss.item() - alone_loss.item()) < 1e-5 and count.item() == 24 - 3
    assert (plain[0, keep] - ref[0]).abs().max() > 1e-2  # without the mask documents see each other
    assert torch.equal(document_positions(torch.tensor([[3, 3, 4, 4, 4, 9]])), torch.tensor([[0, 1, 0, 1, 2, 0]]))


def test_packed_samples_carry_the_index_document_boundaries(tmp_path):
    from megallama.data.indexed import IndexedTokens, IndexedWriter
    from megallama.data.packing import PackedDataset

    lengths = [3, 11, 1, 6, 20, 2, 9]
    with IndexedWriter(str(tmp_path / "d"), np.uint16) as w:
        for d, n in enumerate(lengths):
            w.add_document(d * 100 + np.arange(n))  # each token names its document
    ids = IndexedTokens(str(tmp_path / "d"))
    plain = PackedDataset(ids, (0, len(ids)), 8, seed=(1,))
    packed = PackedDataset(ids, (0, len(ids)), 8, seed=(1,), documents=True)
    for i in range(2 * len(packed)):  # two epochs, shuffled
        s = packed[i]
        assert s.shape == (2, 9) and np.array_equal(s[0], plain[i])
        doc = s[0] // 100
        assert s[1, 0] == 0 and np.array_equal(np.diff(s[1]) != 0, np.diff(doc) != 0)
        assert np.all(np.diff(s[1]) >= 0)


def _tp_documents(rank, world):
    from dataclasses import replace

    from megallama.config import ModelConfig
    from megallama.model import build_model
    from megallama.parallel import ParallelState, initialize
    from megallama.parallel.layers import gather_tp_tensor
    from megallama.train.step import DecoderLoss

    cfg = ModelConfig.preset("tiny-gqa")
    state = initialize(tp=world)
    row, _ = _packed_row(cfg.vocab_size)
    rows = torch.stack([row, row.roll(7, dims=1)])  # two rows; the second starts mid-document
    rows[1, 1] = (rows[1, 1] + 1) % 4  # ... with ids unsorted: only changes matter
    fn = DecoderLoss(document_mask=True, reset_positions=True)
    tokens, labels, ids, pos = fn.parts(rows)
    out = {}
    for sp in (False, True):
        model = build_model(cfg, replace(state, sequence_parallel=sp), seed=7)
        loss, _ = fn(model, rows)
        loss.backward()
        tp = model.parallel_state.tensor_parallel
        grads = {n: gather_tp_tensor(p.grad, p, tp) for n, p in model.named_parameters()}
        with torch.no_grad():
            out[sp] = (model(tokens, document_ids=ids, position_ids=pos), model(tokens), loss.detach(), grads)
    ref = build_model(cfg, ParallelState(), seed=7)
    ref_loss, _ = fn(ref, rows)
    ref_loss.backward()
    with torch.no_grad():
        ref_logits = ref(tokens, document_ids=ids, position_ids=pos)
    res = {}
    for sp, (logits, plain, loss, grads) in out.items():
        res[sp] = dict(logit_err=(logits - ref_logits).abs().max().item(),
                       unmasked_err=(plain - ref_logits).abs().max().item(),
                       loss_err=abs(loss.item() - ref_loss.item()),
                       grad_err=max(((grads[n] - p.grad).abs().max() / p.grad.abs().max().clamp(min=1e-12)).item()
                                    for n, p in ref.named_parameters()))
    return res


def _all_layouts(rank, world):
    """One pair of processes for the three multi-rank checks (the spawn and imports cost the most)."""
    return {"tp": _tp_documents(rank, world), "dp": _dp_step(rank, world), "pp": _pipeline_step(rank, world)}


@pytest.fixture(scope="module")
def layouts():
    return run_distributed(_all_layouts, 2)


def test_document_mask_under_tensor_and_sequence_parallelism(layouts):
    for sp, r in layouts["tp"].items():
        assert r["logit_err"] < 1e-5 and r["loss_err"] < 1e-5 and r["grad_err"] < 1e-4, (sp, r)
        assert r["unmasked_err"] > 1e-2, (sp, r)  # the comparison can fail


class _GradProbe:
    """Copies the gradients at the accumulation boundary, before the optimizer consumes them."""

    def __init__(self, module, accum: int):
        self.module, self.accum, self.seen, self.grads = module, accum, 0, None

    def __getattr__(self, name):  # every other hook is a no-op
        from megallama.train.hooks import NO_HOOKS

        return getattr(NO_HOOKS, name)

    @contextmanager
    def phase(self, name):
        if name == "optimizer":
            self.seen += 1
            if self.seen == self.accum:
                self.grads = {n: p.grad.detach().clone() for n, p in self.module.named_parameters()}
        yield


def _global_rows(vocab: int, seq: int):
    """8 document rows: widths from 1 (every label ignored) to a whole row (none ignored)."""
    g = torch.Generator().manual_seed(5)
    widths = [1, 2, seq + 1, 3, seq + 1, seq + 1, 1, 5]
    return [torch.stack([torch.randint(0, vocab, (seq + 1,), generator=g), torch.arange(seq + 1) // w])
            for w in widths]


def _dp_step(rank, world):
    import tempfile

    from megallama.config import ModelConfig, RunConfig
    from megallama.model import build_model
    from megallama.parallel import ParallelState
    from megallama.train.runtime import start
    from megallama.train.step import step_loss, train_step

    seq, micro, accum = 16, 2, 2
    cfg = RunConfig(run_dir=tempfile.mkdtemp(), model=ModelConfig.preset("tiny"),
                    deepspeed={"zero_optimization": {"stage": 0}}, data={"document_mask": True},
                    train={"seq_len": seq, "micro_batch_size": micro, "global_batch_size": micro * accum * world,
                           "seed": 3, "lr": 1e-3})
    rt = start(cfg)
    rt.build()
    rows = _global_rows(cfg.model.vocab_size, seq)
    mine = [torch.stack(rows[m * micro * world + rank * micro:][:micro]) for m in range(accum)]  # the sampler's order
    ref = build_model(cfg.model, ParallelState(), seed=0)
    out = {}
    for mode in ("global", "per_micro_batch"):
        ref.load_state_dict(rt.module.state_dict())
        ref.zero_grad()
        tokens, labels, ids, _ = rt.loss_fn.parts(torch.stack(rows))
        ref_loss = ref(tokens, labels=labels, document_ids=ids)  # the full batch's token mean
        ref_loss.backward()
        if mode == "per_micro_batch":  # the old weighting: a loss without counts, each micro-batch's mean
            fn = rt.loss_fn
            rt.loss_fn = lambda model, batch: fn(model, batch)
        probe = _GradProbe(rt.module, accum)
        loss = step_loss(rt, train_step(rt, iter(mine), probe))
        out[mode] = dict(grad_err=max(((probe.grads[n] - p.grad).abs().max() / p.grad.abs().max()).item()
                                      for n, p in ref.named_parameters()),
                         loss_err=abs(loss - ref_loss.item()))
    return out


def test_the_step_takes_the_token_mean_of_the_global_batch(layouts):
    r = layouts["dp"]
    assert r["global"]["grad_err"] < 1e-5 and r["global"]["loss_err"] < 1e-5, r
    assert r["per_micro_batch"]["grad_err"] > 1e-1 and r["per_micro_batch"]["loss_err"] > 1e-3, r


def _pipeline_step(rank, world):
    import tempfile

    import torch.distributed as dist

    from megallama.config import ModelConfig, RunConfig
    from megallama.model import build_model
    from megallama.parallel import ParallelState
    from megallama.train.runtime import start
    from megallama.train.step import train_step
    from megallama.train.universal import canonical_params

    seq, micro = 16, 2
    cfg = RunConfig(run_dir=tempfile.mkdtemp(), model=ModelConfig.preset("tiny"), parallel={"pp": world},
                    deepspeed={"zero_optimization": {"stage": 0}},
                    data={"document_mask": True, "reset_position_ids": True},
                    train={"seq_len": seq, "micro_batch_size": micro, "global_batch_size": 8, "seed": 3,
                           "lr": 0.0})  # weights stay put: both weightings meet the same reference
    rt = start(cfg)
    rt.build()
    rows = _global_rows(cfg.model.vocab_size, seq)
    ref = build_model(cfg.model, ParallelState(), seed=3)  # each stage checks its own parameters
    tokens, labels, ids, pos = rt.loss_fn.parts(torch.stack(rows))
    ref_loss = ref(tokens, labels=labels, document_ids=ids, position_ids=pos)
    ref_loss.backward()
    ref_grads = dict(ref.named_parameters())
    grads, take_step = {}, rt.engine._take_model_step

    def snapshot(*args, **kwargs):  # the stage's gradients, before the optimizer consumes them
        grads.update({n: p.grad.clone() for n, p in canonical_params(rt.module)})
        return take_step(*args, **kwargs)

    rt.engine._take_model_step = snapshot
    mine = [torch.stack(rows[m * micro:][:micro]) for m in range(rt.accum)]
    counted = rt.loss_fn
    out = {}
    for mode in ("global", "per_micro_batch"):
        if mode == "per_micro_batch":  # the old weighting: a loss without counts, each micro-batch's mean
            fn = rt.loss_fn
            rt.loss_fn = type("Uncounted", (), {"pipeline_inputs": staticmethod(fn.pipeline_inputs)})()
        loss = train_step(rt, iter(mine)).item()
        err = torch.tensor(max(((g - ref_grads[n].grad).abs().max() / ref_grads[n].grad.abs().max()).item()
                               for n, g in grads.items()))
        dist.all_reduce(err, op=dist.ReduceOp.MAX)  # over both stages
        out[mode] = dict(loss_err=abs(loss - ref_loss.item()), grad_err=err.item(), names=len(grads))
    # evaluation of the same rows (lr 0: the same weights) takes the same token mean
    from megallama.train.evaluate import pipeline_loss

    out["eval_err"] = abs(pipeline_loss(rt.engine, rows, micro, rt.accum, rt.state, rt.device, 1, counted)["loss"]
                          - ref_loss.item())
    return out


def test_document_rows_travel_through_the_pipeline_stages(layouts):
    r = layouts["pp"]
    assert r["global"]["loss_err"] < 1e-5 and r["global"]["grad_err"] < 1e-5 and r["global"]["names"] > 3, r
    assert r["per_micro_batch"]["loss_err"] > 1e-3 and r["per_micro_batch"]["grad_err"] > 1e-1, r
    assert r["eval_err"] < 1e-5, r  # the mean of micro-batch means misses by as much as per_micro_batch


@pytest.mark.parametrize("overrides, field", [
    (["data.reset_position_ids=true"], "data.reset_position_ids"),
    (["data.document_mask=true", "model.arch=encoder_decoder"], "data.document_mask"),
])
def test_document_settings_that_cannot_work_are_one_line(overrides, field):
    from megallama.config import load_run_config
    from megallama.errors import UserError

    with pytest.raises(UserError) as err:
        load_run_config(data={"model": {"preset": "tiny-encdec"} if "encoder" in overrides[-1] else {"preset": "tiny"},
                              "train": {"seq_len": 32}}, overrides=overrides).check_layout(1)
    msg = str(err.value)
    assert msg.startswith(field + ":") and "\n" not in msg, msg
