"""``megallama finetune``: a classification head on a pre-trained trunk, accuracy on held-out data."""
from __future__ import annotations

import json
import sys

NAME = "finetune"
HELP = "fine-tune a sequence-classification head on a pre-trained trunk with JSONL {text, label}"


def add_arguments(p) -> None:
    p.add_argument("config", help="run config: train.*, parallel.tp, deepspeed (the model comes from --pretrained)")
    p.add_argument("--pretrained", required=True, help="checkpoint of the trunk (training, consolidated, HF)")
    p.add_argument("--data", required=True, help="JSONL file of {text, label} records")
    p.add_argument("--tokenizer", help="tokenizer file (default: PRETRAINED's own, or the one its training run recorded)")
    p.add_argument("--holdout", type=float, default=0.2, help="fraction held out for accuracy")
    p.add_argument("--text-key", default="text")
    p.add_argument("--label-key", default="label")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")


def run(args) -> int:
    import torch.distributed as dist

    from megallama.config import load_run_config
    from megallama.train.distributed import finish_distributed
    from megallama.train.finetune import finetune

    cfg = load_run_config(args.config, args.overrides)
    report = finetune(cfg, args.pretrained, args.data, args.tokenizer, args.holdout, args.text_key, args.label_key)
    if not dist.is_initialized() or dist.get_rank() == 0:
        sys.stdout.write(f"held-out accuracy {report['accuracy']:.3f} on {report['held_out']} examples "
                         f"(majority baseline {report['majority_baseline']:.3f})\n" + json.dumps(report) + "\n")
    finish_distributed()
    return 0
