"""``python -m tests.train_many RUNS.json``: several single-process ``megallama train`` runs, one
after another, in one interpreter (``RUNS.json``: a list of ``[config, [override, ...]]``).

Why: a tiny run's start-up (importing torch, DeepSpeed, and torch._dynamo, which torch.optim's
first step imports) is most of its cost, so the single-process references parity tests compare
against are trained together and the start-up is paid once. Each run goes through the CLI's own
``main`` exactly as ``python -m megallama train`` would; a run's losses and grad norms come out
bit-identical to a fresh process's (a leak from one run into the next would show as a parity
failure, never as a pass: the layouts compared against them are separate launches).
"""
from __future__ import annotations

import json
import sys

from megallama.cli import main as megallama_main


def run_all(runs) -> int:
    for n, (config, overrides) in enumerate(runs):
        rc = megallama_main(["train", config] + [x for o in overrides for x in ("--set", o)])
        if rc != 0:
            sys.stderr.write(f"tests.train_many: run {n} ({config} {overrides}) exited {rc}\n")
            return rc
    return 0


def main(argv) -> int:
    with open(argv[0]) as f:
        return run_all(json.load(f))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
