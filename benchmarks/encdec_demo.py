#!/usr/bin/env python
"""The encoder-decoder learning, end to end, on CPU in a few minutes.

(a) span corruption (T5's objective) on the embedded corpus: the loss falls;
(b) a learnable seq2seq task, reversing a string of letters ("q w e" -> "e w q"): JSONL made
    here, preprocessed into aligned source/target files (``megallama preprocess --json-keys
    source target``), trained under the ``deepspeed`` launcher on 2 ranks (ZeRO-2), then scored
    by exact match of greedy generations on held-out strings never seen in training.

Writes ``results.json`` and each run's loss curve (tools/plot_metrics.py) under ``--out``.

usage: python benchmarks/encdec_demo.py [--out benchmarks/results/encdec] [--work runs/encdec_demo]
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import socket
import string
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
MARKER = ".encdec_demo"
sys.path.insert(0, str(ROOT))  # this checkout's megallama, in process as in the subprocesses


def _env() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env["PATH"] = str(BIN) + os.pathsep + env.get("PATH", "")
    return env


def _run(cmd, log: Path) -> str:
    print("+", " ".join(map(str, cmd)), flush=True)
    proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, env=_env(), cwd=ROOT)
    log.write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        raise SystemExit(f"encdec_demo: command failed ({log}):\n{proc.stderr[-3000:]}")
    return proc.stdout


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_reverse_task(work: Path, n_train: int, n_test: int, seed: int):
    """Strings of 3-6 random letters; the held-out ones never occur in training."""
    rng = random.Random(seed)
    seen, rows = set(), []
    while len(rows) < n_train + n_test:
        word = tuple(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(3, 6)))
        if word not in seen:
            seen.add(word)
            rows.append({"source": " ".join(word), "target": " ".join(reversed(word))})
    train, test = rows[:n_train], rows[n_train:]
    (work / "reverse_train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in train))
    return test


def _config(work: Path, name: str, model: dict, train: dict, data: dict, save_every: int = 0) -> Path:
    cfg = {"run_dir": str(work / name), "model": {"preset": "tiny-encdec", "max_seq_len": 128, **model},
           "parallel": {"tp": 1, "pp": 1},
           "train": {"seed": 1234, "lr": 3e-3, "warmup_steps": 20, "log_every": 10, "eval_every": 0, **train},
           "data": data, "checkpoint": {"every": save_every},
           "deepspeed": str(ROOT / "ds_configs" / "zero2.json")}
    path = work / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _train_2ranks(cfg: Path, work: Path, name: str) -> dict:
    _run([BIN / "deepspeed", "--num_gpus", "2", "--master_port", _port(), "--module", "megallama", "train", cfg],
         work / f"{name}.log")
    return json.loads((work / name / "report.json").read_text())


def exact_match(checkpoint: Path, tokenizer: Path, test) -> dict:
    from megallama import from_pretrained
    from megallama.data import Tokenizer
    from megallama.inference import generate_seq2seq

    tok, model = Tokenizer(tokenizer), from_pretrained(checkpoint, dtype="float32")
    sources = [tok.encode(r["source"]) + [tok.eos_id] for r in test]
    out = generate_seq2seq(model, sources, 16, tok.bos_id, tok.eos_id).tokens
    got = [tok.decode(t).strip() for t in out]
    hits = [g == r["target"] for g, r in zip(got, test)]
    copies = [g == r["source"] for g, r in zip(got, test)]
    # chance: the exact letters of a length-L string drawn uniformly, averaged over the test set
    chance = sum(26.0 ** -len(r["source"].split()) for r in test) / len(test)
    return {"held_out": len(test), "exact_match": sum(hits) / len(test), "chance_exact_match": chance,
            "copied_source_instead": sum(copies) / len(test),
            "examples": [{"source": r["source"], "target": r["target"], "generated": g}
                         for r, g in list(zip(test, got))[:8]]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "encdec"))
    ap.add_argument("--work", default=str(ROOT / "runs" / "encdec_demo"))
    ap.add_argument("--reverse-steps", type=int, default=400)
    ap.add_argument("--span-steps", type=int, default=150)
    ap.add_argument("--vocab-size", type=int, default=312, help="tokenizer trained on the letter strings")
    args = ap.parse_args(argv)
    out, work = Path(args.out), Path(args.work)
    if work.exists():  # only a previous demo's directory (it carries the marker) is replaced
        if not (work / MARKER).is_file():
            raise SystemExit(f"encdec_demo: {work}: exists and is not a previous demo's --work; choose another")
        shutil.rmtree(work)
    work.mkdir(parents=True)
    (work / MARKER).write_text("scratch directory of benchmarks/encdec_demo.py; replaced on every run\n")
    out.mkdir(parents=True, exist_ok=True)
    start = time.time()

    # (a) span corruption on the embedded corpus
    span_cfg = _config(work, "span", {}, {"steps": args.span_steps, "seq_len": 64, "micro_batch_size": 8,
                                           "global_batch_size": 16, "eval_every": args.span_steps, "eval_iters": 4},
                       {"cache_dir": str(work / "data"), "embedded_max_files": 100, "split": "90,10,0"})
    span = _train_2ranks(span_cfg, work, "span")

    # (b) reverse a string: paired JSONL -> aligned token files -> train -> greedy exact match
    test = make_reverse_task(work, 8000, 200, seed=0)
    tok, prefix = work / "reverse_tok.model", work / "reverse"
    _run([sys.executable, "-m", "megallama", "preprocess", "--input", work / "reverse_train.jsonl",
          "--json-keys", "source", "target", "--train-tokenizer", "--vocab-size", args.vocab_size,
          "--tokenizer", tok, "--output-prefix", prefix, "--workers", "1", "--no-progress"], work / "preprocess.log")
    rev_cfg = _config(work, "reverse", {"vocab_size": args.vocab_size},
                      {"steps": args.reverse_steps, "seq_len": 16, "micro_batch_size": 16, "global_batch_size": 32,
                       "eval_every": args.reverse_steps, "eval_iters": 4},
                      {"prefixes": [str(prefix)], "tokenizer": str(tok), "split": "95,5,0",
                       "cache_dir": str(work / "data")}, save_every=args.reverse_steps)
    rev = _train_2ranks(rev_cfg, work, "reverse")
    ckpt = work / "reverse" / "checkpoints"
    score = exact_match(ckpt, tok, test)
    cli = json.loads(_run([sys.executable, "-m", "megallama", "generate", "--checkpoint", ckpt, "--tokenizer", tok,
                           "--prompt", test[0]["source"], "--max-new-tokens", "16", "--json"], work / "generate.log"))
    evaluated = json.loads(_run([sys.executable, "-m", "megallama", "eval", "--checkpoint", ckpt, "--config", rev_cfg,
                                 "--split", "valid", "--json"], work / "eval.log").strip().splitlines()[-1])

    for name in ("span", "reverse"):
        _run([sys.executable, ROOT / "tools" / "plot_metrics.py", work / name, "--out", out / f"{name}_metrics.png"],
             work / f"plot_{name}.log")
    results = {
        "span_corruption_embedded_corpus": _summary(span, work / "span"),
        "reverse_task": {**_summary(rev, work / "reverse"), **score, "eval_command": evaluated,
                         "generate_command": {"source": test[0]["source"], "target": test[0]["target"],
                                              "output": cli["results"][0]["completion"].strip()}},
        "settings": {"model": "tiny-encdec", "launcher": "deepspeed, 2 ranks, ZeRO-2, fp32, CPU",
                     "reverse_steps": args.reverse_steps, "span_steps": args.span_steps,
                     "reverse_train_pairs": 8000, "vocab_size": args.vocab_size},
        "wall_s": round(time.time() - start, 1),
    }
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    r = results["reverse_task"]
    print(f"span corruption: loss {results['span_corruption_embedded_corpus']['first_loss']:.3f} -> "
          f"{results['span_corruption_embedded_corpus']['final_loss']:.3f}; reverse: loss {r['first_loss']:.3f} -> "
          f"{r['final_loss']:.3f}, held-out exact match {r['exact_match']:.1%} (chance {r['chance_exact_match']:.2e}); "
          f"{out / 'results.json'}")
    return 0


def _summary(report: dict, run_dir: Path) -> dict:
    evals = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if '"eval' in x]
    return {"first_loss": report["first_loss"], "final_loss": report["final_loss"], "steps": report["steps"],
            "world_size": report["world_size"], "zero_stage": report["zero_stage"], "launcher": report["launcher"],
            "elapsed_s": round(report["elapsed_s"], 1), "last_eval": evals[-1] if evals else None,
            "loss_every_10_steps": [round(x, 4) for x in report["losses"][::10]]}

if __name__ == "__main__":
    sys.exit(main())
