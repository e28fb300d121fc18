"""Fine-tuning as the seed draws it: a sequence-classification head on a pre-trained trunk,
trained with the same DeepSpeed engine, judged by accuracy on a held-out split."""
from __future__ import annotations

import json
import logging
import random
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple

import torch
import torch.distributed as dist

from megallama.config import RunConfig
from megallama.errors import UserError

log = logging.getLogger(__name__)


def read_examples(path: str, text_key: str, label_key: str) -> Tuple[List[str], List[Any]]:
    texts, labels = [], []
    p = Path(path)
    if not p.is_file():
        raise UserError(f"{path}: not found")
    with open(p, "rb") as f:
        for i, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            try:
                rec = json.loads(raw.decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError) as exc:
                raise UserError(f"{path}:{i}: not a JSON object ({type(exc).__name__})") from None
            if not isinstance(rec, dict) or text_key not in rec or label_key not in rec:
                raise UserError(f"{path}:{i}: expected keys '{text_key}' and '{label_key}'")
            texts.append(str(rec[text_key]))
            labels.append(rec[label_key])
    if len(set(map(str, labels))) < 2:
        raise UserError(f"{path}: needs at least two distinct labels, found {len(set(map(str, labels)))}")
    return texts, labels


def encode(tokenizer, texts: List[str], seq_len: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ``[n, seq_len]`` token ids with BOS, and the attention mask."""
    pad = max(tokenizer.pad_id, 0)
    ids = torch.full((len(texts), seq_len), pad, dtype=torch.long)
    mask = torch.zeros((len(texts), seq_len), dtype=torch.long)
    for i, text in enumerate(texts):
        toks = tokenizer.encode(text, bos=True)[:seq_len]
        ids[i, :len(toks)] = torch.tensor(toks)
        mask[i, :len(toks)] = 1
    return ids, mask


def _load_trunk(model, state: Dict[str, torch.Tensor], ps) -> List[str]:
    """Copy every matching tensor (each rank its TP slice of ``ps``); returns what the trunk lacked."""
    from megallama.parallel.layers import param_shard

    missing = []
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name not in state:
                missing.append(name)
                continue
            p.copy_(param_shard(state[name], p, ps.tp, ps.tp_rank).to(p.dtype))
    return missing


def _saved_labels(path: str) -> Optional[List[str]]:
    """The labels a fine-tuned (consolidated) checkpoint's head was trained on."""
    try:
        return json.loads((Path(path) / "config.json").read_text()).get("labels")
    except (OSError, ValueError, AttributeError):
        return None


@torch.no_grad()
def accuracy(model, ids, mask, labels, micro: int, state) -> Tuple[float, int]:
    n = len(ids) - len(ids) % state.dp
    correct = torch.zeros(2, dtype=torch.float64)
    model.eval()
    for start in range(state.dp_rank * micro, n, micro * state.dp):
        sl = slice(start, min(start + micro, n))
        pred = model(ids[sl], attention_mask=mask[sl]).argmax(-1)
        correct += torch.tensor([(pred == labels[sl]).sum().item(), len(pred)], dtype=torch.float64)
    if dist.is_initialized() and state.dp > 1:
        dist.all_reduce(correct, group=state.dp_group)
    model.train()
    return (correct[0] / correct[1].clamp(min=1)).item(), int(correct[1].item())


def finetune(cfg: RunConfig, pretrained: str, data: str, tokenizer_path: Optional[str], holdout: float,
             text_key: str = "text", label_key: str = "label") -> Dict[str, Any]:
    from megallama.checkpoint.pretrained import load_checkpoint, verified_with_tokenizer
    from megallama.data.tokenizer import Tokenizer
    from megallama.train.runtime import guard, start

    if cfg.parallel.pp != 1:
        raise UserError("parallel.pp: fine-tuning runs without pipeline stages (use pp: 1)")
    if cfg.parallel.ulysses != 1:
        raise UserError("parallel.ulysses: a classifier reads each text's last token whole; fine-tune with ulysses: 1")
    if not 0.0 < holdout < 1.0:
        raise UserError(f"--holdout: expected a fraction in (0, 1), got {holdout}")
    texts, raw_labels = read_examples(data, text_key, label_key)
    names = sorted(set(map(str, raw_labels)))
    labels = torch.tensor([names.index(str(x)) for x in raw_labels])
    tag, tok = verified_with_tokenizer(pretrained, tokenizer_path)   # a training run's recorded one by default
    tok_file = str(tok or Path(pretrained) / "tokenizer.model")
    if not Path(tok_file).is_file():
        raise UserError(f"--tokenizer: {tok_file} not found (pass the tokenizer file of the trunk)")
    model_cfg, state_dict, _ = load_checkpoint(tag or pretrained, resolved=tag is not None)
    if "score.weight" in state_dict and _saved_labels(pretrained) != names:  # another task's head: start afresh
        state_dict = {k: v for k, v in state_dict.items() if k != "score.weight"}
    tokenizer = Tokenizer(tok_file)
    tokenizer.check_vocab(model_cfg.vocab_size)
    model_cfg = model_cfg.model_copy(update={"num_labels": len(names)})
    rt = start(cfg.model_copy(update={"model": model_cfg}))
    with guard(rt):  # one job per run directory, as for train
        return _train_classifier(rt, state_dict, encode(tokenizer, texts, rt.cfg.train.seq_len), labels, names,
                                 pretrained, tok_file, holdout)


def _classifier_loss(model, batch) -> Tuple[torch.Tensor, None]:
    ids, labels, mask = batch
    return model(ids, labels=labels, attention_mask=mask), None


def _examples(rt, train: List[int], ids, labels, mask) -> Iterator[Tuple[torch.Tensor, ...]]:
    """This rank's micro-batches of the training examples, on the device, reshuffled (seeded)
    whenever too few are left for one more round over the DP ranks."""
    micro, dp, dp_rank = rt.batch.micro, rt.state.dp, rt.state.dp_rank
    gen = torch.Generator().manual_seed(rt.cfg.train.seed)
    perm, pos = torch.tensor(train)[torch.randperm(len(train), generator=gen)], 0
    while True:
        if pos + micro * dp > len(perm):
            perm, pos = torch.tensor(train)[torch.randperm(len(train), generator=gen)], 0
        idx = perm[pos + dp_rank * micro: pos + (dp_rank + 1) * micro]
        pos += micro * dp
        yield ids[idx].to(rt.device), labels[idx].to(rt.device), mask[idx].to(rt.device)


def _train_classifier(rt, state_dict, encoded, labels, names, pretrained: str, tok_file: str,
                      holdout: float) -> Dict[str, Any]:
    from megallama.model import LlamaForSequenceClassification

    cfg, t, model_cfg = rt.cfg, rt.cfg.train, rt.cfg.model
    ids, mask = encoded
    order = list(range(len(ids)))
    random.Random(t.seed).shuffle(order)
    n_hold = max(1, int(round(holdout * len(order))))
    hold, train = order[:n_hold], order[n_hold:]
    model = LlamaForSequenceClassification(model_cfg, rt.state, seed=t.seed)
    missing = _load_trunk(model, state_dict, rt.state)
    if rt.rank0:
        log.info("fine-tuning %d-label classifier on %d examples (%d held out); new: %s", len(names), len(train),
                 len(hold), ", ".join(missing))
    rt.build(module=model)
    rt.loss_fn = _classifier_loss
    batches, losses = _examples(rt, train, ids, labels, mask), []
    for step in range(1, t.steps + 1):  # under train.rampup_batch_size, at train's batch sizes
        losses.append(float(rt.scheduled_step(batches)))
        if rt.rank0 and (step % t.log_every == 0 or step == t.steps):
            print(f"finetune step {step:>5}/{t.steps} | loss {losses[-1]:.4f} | lr {rt.engine.get_lr()[0]:.2e} | "
                  f"global batch {rt.global_batch} | samples {rt.consumed_samples}", flush=True)
    hold_t, dev, module = torch.tensor(hold), rt.device, rt.engine.module
    acc, counted = accuracy(module, ids[hold_t].to(dev), mask[hold_t].to(dev), labels[hold_t].to(dev),
                            rt.batch.micro, rt.state)
    majority = max((labels[hold_t] == k).float().mean().item() for k in range(len(names)))
    out = Path(cfg.run_dir) / "finetuned"
    report = {"accuracy": acc, "held_out": counted, "majority_baseline": majority, "labels": names,
              "first_loss": losses[0], "final_loss": losses[-1], "steps": t.steps,
              "consumed_samples": rt.consumed_samples, "checkpoint": str(out)}
    save_classifier(module, model_cfg, out, names, pretrained, tok_file, rt.info.rank)
    if rt.rank0:
        (Path(cfg.run_dir) / "finetune_report.json").write_text(json.dumps(report, indent=2))
    return report


def save_classifier(module, model_cfg, out: Path, labels: List[str], pretrained: str, tokenizer: str,
                    rank: int) -> None:
    """The fine-tuned model as a consolidated checkpoint (trunk + ``score`` head, its labels and the
    tokenizer): ``from_pretrained(out)`` returns the classifier, ``finetune --pretrained out``
    continues it. Collective: full tensors are gathered over TP (and ZeRO-3) on every rank."""
    import shutil

    import deepspeed

    from megallama.checkpoint.consolidated import CLASSIFIER_HEAD, save_consolidated
    from megallama.data.tokenizer import tokenizer_class
    from megallama.parallel.layers import gather_tp_tensor

    params = dict(module.named_parameters())
    with deepspeed.zero.GatheredParameters(list(params.values()), modifier_rank=None):
        full = {name: gather_tp_tensor(p.data, p, module.parallel_state.tensor_parallel).float().cpu()
                for name, p in params.items()}
    if rank == 0:
        save_consolidated(full, model_cfg, out, overwrite=True,
                          extra={"head": CLASSIFIER_HEAD, "labels": labels, "finetuned_from": str(pretrained)})
        shutil.copyfile(tokenizer, out / tokenizer_class(tokenizer).FILE_NAME)
        log.info("fine-tuned classifier saved to %s", out)
    if dist.is_initialized():
        dist.barrier()
