"""Fine-tuning a classification head on a pre-trained tiny trunk beats chance clearly."""
import json
import os
import random
import subprocess

import pytest

from tests.train_utils import ROOT, cli_in_process, env, launch_cmd, run_train, tiny_run_config


@pytest.fixture(scope="module")
def trunk(tmp_path_factory, data_cache):
    tmp = tmp_path_factory.mktemp("ft")
    cfg = tiny_run_config(tmp, data_cache)
    run_train(cfg, ["train.steps=2", "checkpoint.every=2", f"run_dir={tmp / 'pre'}"])
    tokenizer = next(data_cache.rglob("tokenizer.model"))
    rng = random.Random(0)
    words = (["def", "return", "import", "class", "self"], ["while", "for", "yield", "lambda", "break"])
    with open(tmp / "task.jsonl", "w") as f:
        for i in range(240):
            label = i % 2
            f.write(json.dumps({"text": " ".join(rng.choice(words[label]) for _ in range(6)),
                                "label": ["code", "loop"][label]}) + "\n")
    return cfg, tmp, tokenizer


def _finetune(cfg, tmp, tokenizer, world=1, *extra):
    args = ["finetune", str(cfg), "--pretrained", str(tmp / "pre" / "checkpoints"), "--data", str(tmp / "task.jsonl"),
            "--tokenizer", str(tokenizer), "--holdout", "0.25", "--set", "train.steps=30", "--set", "train.lr=2e-3",
            "--set", "train.seq_len=16", "--set", "train.micro_batch_size=8", "--set", "train.global_batch_size=16",
            "--set", f"run_dir={tmp / 'ft'}", *extra]
    return subprocess.run(launch_cmd("none" if world == 1 else "torchrun", world) + args, capture_output=True,
                          text=True, env=env(), cwd=ROOT, timeout=600)


def _saved_model_predicts(report, tmp, cli=None):
    """The run's saved checkpoint is the fine-tuned classifier: loaded on its own, it labels the
    task as well as the report says; eval and generate refuse it in one line. ``cli(argv)``:
    ``(exit code, stderr)`` of the refusals in this process; a process each where not given."""
    from megallama import from_pretrained
    from megallama.data import Tokenizer
    from megallama.model import LlamaForSequenceClassification
    from megallama.train.finetune import encode, read_examples

    ckpt = report["checkpoint"]
    model = from_pretrained(ckpt)
    assert isinstance(model, LlamaForSequenceClassification)
    assert json.loads((tmp / "ft" / "finetuned" / "config.json").read_text())["labels"] == report["labels"]
    texts, labels = read_examples(str(tmp / "task.jsonl"), "text", "label")
    ids, mask = encode(Tokenizer(f"{ckpt}/tokenizer.model"), texts, 16)
    pred = model(ids, attention_mask=mask).argmax(-1).tolist()
    assert sum(report["labels"][k] == y for k, y in zip(pred, labels)) / len(labels) >= 0.85
    for argv in (["eval", "--checkpoint", ckpt, "--data", "x"], ["generate", "--checkpoint", ckpt, "--prompt", "x"],
                 ["convert", "--input", ckpt, "--output", str(tmp / "as_hf"), "--to", "hf"]):
        if cli is None:
            r = subprocess.run(launch_cmd("none", 1) + argv, capture_output=True, text=True, env=env(), cwd=ROOT)
            rc, err = r.returncode, r.stderr
        else:
            rc, err = cli(argv)
        assert rc == 2 and "fine-tuned classifier" in err and len(err.splitlines()) == 1, err


def test_finetune_beats_chance(trunk):
    r = _finetune(*trunk)
    assert r.returncode == 0, r.stderr[-3000:]
    report = json.loads(r.stdout.strip().splitlines()[-1])
    assert report["held_out"] == 60 and report["labels"] == ["code", "loop"]
    assert report["accuracy"] >= 0.85 > report["majority_baseline"] + 0.2, report
    assert report["final_loss"] < report["first_loss"]
    _saved_model_predicts(report, trunk[1])


def test_finetune_tp2_runs_and_learns(trunk, monkeypatch, capsys):
    r = _finetune(*trunk, 2, "--set", "parallel.tp=2", "--set", "train.global_batch_size=8")
    assert r.returncode == 0, r.stderr[-3000:]
    report = json.loads(r.stdout.strip().splitlines()[-1])
    assert report["accuracy"] >= 0.85
    # whole tensors, gathered over the TP pair; the refusals (in a process each above) here in-process
    _saved_model_predicts(report, trunk[1], lambda argv: cli_in_process(argv, monkeypatch, capsys)[::2])


def test_finetune_bad_jsonl_names_the_line(trunk, tmp_path):
    cfg, tmp, tokenizer = trunk
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "a", "label": 0}\n{"txt": "b", "label": 1}\n')
    r = subprocess.run(launch_cmd("none", 1) + ["finetune", str(cfg), "--pretrained", str(tmp / "pre" / "checkpoints"),
                                                "--data", str(bad), "--tokenizer", str(tokenizer)],
                       capture_output=True, text=True, env=env(), cwd=ROOT)
    assert r.returncode == 2 and f"{bad}:2: expected keys 'text' and 'label'" in r.stderr
    assert "Traceback" not in r.stderr


def test_finetune_refuses_a_run_dir_another_job_holds(trunk):
    """Fine-tuning takes the same run_dir lock as train: a second job there stops in one line."""
    from megallama.train.run_lock import RunLock

    cfg, tmp, tokenizer = trunk
    (tmp / "ft").mkdir(exist_ok=True)
    held = RunLock(tmp / "ft", created_dir=False).acquire()
    try:
        r = _finetune(cfg, tmp, tokenizer)
    finally:
        held.release()
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert f"pid {os.getpid()}" in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr[-2000:]
