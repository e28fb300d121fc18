"""Fine-tuning as the seed draws it: a sequence-classification head on a pre-trained trunk,
trained with the same DeepSpeed engine, judged by accuracy on a held-out split."""
from __future__ import annotations

import json
import logging
import random
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

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


def _load_trunk(model, state: Dict[str, torch.Tensor]) -> List[str]:
    """Copy every matching tensor (each rank its TP slice); returns what the trunk lacked."""
    from megallama.parallel.layers import split_for_rank

    ps, missing = model.parallel_state, []
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name not in state:
                missing.append(name)
                continue
            full = state[name]
            if getattr(p, "tensor_model_parallel", False) and ps.tp > 1:
                full = split_for_rank(full, p.tp_split_dim, p.tp_fused_sizes, ps.tp, ps.tp_rank)
            p.copy_(full.to(p.dtype))
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
    from megallama.checkpoint.pretrained import load_checkpoint
    from megallama.data import Tokenizer
    from megallama.train.distributed import detect_launcher, init_distributed
    from megallama.train.ds_config import build_ds_config, check_device_supports
    from megallama.train.run_lock import hold_run_dir

    if cfg.parallel.pp != 1:
        raise UserError("parallel.pp: fine-tuning runs without pipeline stages (use pp: 1)")
    if not 0.0 < holdout < 1.0:
        raise UserError(f"--holdout: expected a fraction in (0, 1), got {holdout}")
    texts, raw_labels = read_examples(data, text_key, label_key)
    names = sorted(set(map(str, raw_labels)))
    labels = torch.tensor([names.index(str(x)) for x in raw_labels])
    tok_file = tokenizer_path or str(Path(pretrained) / "tokenizer.model")
    if not Path(tok_file).is_file():
        raise UserError(f"--tokenizer: {tok_file} not found (pass the SentencePiece model of the trunk)")
    model_cfg, state_dict, _ = load_checkpoint(pretrained)
    if "score.weight" in state_dict and _saved_labels(pretrained) != names:  # another task's head: start afresh
        state_dict = {k: v for k, v in state_dict.items() if k != "score.weight"}
    tokenizer = Tokenizer(tok_file)
    tokenizer.check_vocab(model_cfg.vocab_size)
    model_cfg = model_cfg.model_copy(update={"num_labels": len(names)})
    cfg = cfg.model_copy(update={"model": model_cfg})
    info = detect_launcher()
    cfg.check_layout(info.world_size)
    ds = build_ds_config(cfg, info.world_size)
    check_device_supports(ds)
    init_distributed(cfg.train.dist_timeout_s, info)
    lock = hold_run_dir(cfg.run_dir, None, False, info.rank)  # one job per run directory, as for train
    try:
        return _train_classifier(cfg, info, ds, model_cfg, state_dict, tokenizer, texts, labels, names,
                                 pretrained, tok_file, holdout)
    finally:
        if lock:
            lock.release()


def _train_classifier(cfg: RunConfig, info, ds, model_cfg, state_dict, tokenizer, texts, labels, names,
                      pretrained: str, tok_file: str, holdout: float) -> Dict[str, Any]:
    from megallama.model import LlamaForSequenceClassification
    from megallama.parallel import initialize
    from megallama.train.distributed import device_for
    from megallama.train.engine import build_engine

    state = initialize(cfg.parallel.tp, 1, cfg.parallel.sequence_parallel)
    device = device_for(info.local_rank)
    t = cfg.train
    batch = t.batch_layout(state.dp)

    order = list(range(len(texts)))
    random.Random(t.seed).shuffle(order)
    n_hold = max(1, int(round(holdout * len(order))))
    hold, train = order[:n_hold], order[n_hold:]
    ids, mask = encode(tokenizer, texts, t.seq_len)
    model = LlamaForSequenceClassification(model_cfg, state, seed=t.seed)
    missing = _load_trunk(model, state_dict)
    if info.rank == 0:
        log.info("fine-tuning %d-label classifier on %d examples (%d held out); new: %s", len(names), len(train),
                 len(hold), ", ".join(missing))
    engine = build_engine(cfg, state, ds, device, module=model).engine
    gen = torch.Generator().manual_seed(t.seed)
    perm, pos, losses = torch.tensor(train)[torch.randperm(len(train), generator=gen)], 0, []
    for step in range(1, t.steps + 1):
        step_losses = []
        for _ in range(batch.accum):
            if pos + batch.micro * state.dp > len(perm):
                perm, pos = torch.tensor(train)[torch.randperm(len(train), generator=gen)], 0
            idx = perm[pos + state.dp_rank * batch.micro: pos + (state.dp_rank + 1) * batch.micro]
            pos += batch.micro * state.dp
            loss = engine(ids[idx].to(device), labels=labels[idx].to(device), attention_mask=mask[idx].to(device))
            engine.backward(loss)
            engine.step()
            step_losses.append(loss.item())
        losses.append(sum(step_losses) / len(step_losses))
        if info.rank == 0 and (step % t.log_every == 0 or step == t.steps):
            print(f"finetune step {step:>5}/{t.steps} | loss {losses[-1]:.4f} | lr {engine.get_lr()[0]:.2e}", flush=True)
    hold_t = torch.tensor(hold)
    acc, counted = accuracy(engine.module, ids[hold_t].to(device), mask[hold_t].to(device), labels[hold_t].to(device),
                            batch.micro, state)
    majority = max((labels[hold_t] == k).float().mean().item() for k in range(len(names)))
    out = Path(cfg.run_dir) / "finetuned"
    report = {"accuracy": acc, "held_out": counted, "majority_baseline": majority, "labels": names,
              "first_loss": losses[0], "final_loss": losses[-1], "steps": t.steps, "checkpoint": str(out)}
    save_classifier(engine.module, model_cfg, out, names, pretrained, tok_file, info.rank)
    if info.rank == 0:
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
    from megallama.parallel.layers import gather_tp_tensor

    params = dict(module.named_parameters())
    with deepspeed.zero.GatheredParameters(list(params.values()), modifier_rank=None):
        full = {name: gather_tp_tensor(p.data, p, module.parallel_state.tensor_parallel).float().cpu()
                for name, p in params.items()}
    if rank == 0:
        save_consolidated(full, model_cfg, out, overwrite=True,
                          extra={"head": CLASSIFIER_HEAD, "labels": labels, "finetuned_from": str(pretrained)})
        shutil.copyfile(tokenizer, out / "tokenizer.model")
        log.info("fine-tuned classifier saved to %s", out)
    if dist.is_initialized():
        dist.barrier()
