"""Every command README.md and examples/ show runs as a user would type it.

Commands are extracted from README.md (```bash blocks and inline `megallama ...`-style spans),
from the scripts in examples/ (each run whole), and from command lines in the comments of the
other example files. Each must appear in RUNS below, which says how it runs: as written with
cheap overrides appended (a later ``--set`` wins), with placeholders (DIR, PREFIX, ...) bound to
files the earlier commands made, or in an emulated form whose reason is given. An extracted
command RUNS does not know fails the test, and so does a RUNS entry the docs no longer show:
a new or changed line in the docs cannot rot unnoticed.

All commands run in order in one scratch directory (examples/, ds_configs/, tools/ and the
Makefile linked in), so later ones use what earlier ones wrote (runs/x, ours, data/...).
"""
from __future__ import annotations

import json
import os
import random
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Tuple

import pytest
import yaml

from tests.conftest_data import sample_texts, write_jsonl
from tests.dist_utils import free_port
from tests.fork_launch import run_forked
from tests.train_utils import BIN, ROOT, env

COMMAND_WORDS = ("megallama", "python", "torchrun", "deepspeed", "mpiexec", "sbatch", "srun", "make", "bash", "pip")
TINY = ("train.steps=2", "train.warmup_steps=1", "train.seq_len=32", "train.log_every=1", "data.embedded_max_files=40", "data.split=90,5,5")
# the 7B examples at tiny size: preset, batch and sequence; their data are the README's preprocess output
SEVEN_B = ("model.preset=tiny", "model.vocab_size=320", "train.micro_batch_size=2", "train.global_batch_size=4",
           "train.warmup_steps=1")
# Commands that train run as typed, through the `megallama` script; the others (preprocess, convert,
# eval, generate, validate, ...) run the CLI's main in a process forked from the tests' fork server
# (tests/fork_launch.py), which imported torch and DeepSpeed once: ~22 start-ups saved.
AS_TYPED = ("train", "finetune")
PLACEHOLDERS = {"DIR": "ours", "PREFIX": "data/pile_text_document", "CONFIG": "examples/tiny.yaml", "N": "2",
                "RUN_DIR": "runs/x"}


@dataclass(frozen=True)
class Run:
    """How one documented command runs here."""

    extra: Tuple[str, ...] = ()  # appended to the command as written
    sets: Tuple[str, ...] = ()  # appended as --set KEY=VALUE
    emulate: str = ""  # '' (as written), 'make-demo', 'make-test', 'sbatch', 'hostfile', 'python', 'covered'
    why: str = ""  # the reason for any substitution beyond cheap overrides


def _train(*sets: str) -> Run:
    return Run(sets=TINY + sets)


RUNS: Dict[str, Run] = {
    # data first: the 7B examples read what this writes
    "megallama preprocess --input pile.jsonl --train-tokenizer --tokenizer data/tokenizer.model --vocab-size 32000 "
    "--output-prefix data/pile_text_document": Run(
        extra=("--vocab-size", "320", "--workers", "1"),
        why="a 32000-piece vocabulary needs more text than a test has"),
    "megallama data-stats PREFIX --json": Run(),
    "megallama train examples/tiny.yaml --set run_dir=runs/x": _train(),
    "megallama convert --input runs/x/checkpoints --output ckpt_tp1pp2 --tp 1 --pp 2": Run(),
    "torchrun --nproc_per_node 2 -m megallama train examples/tiny.yaml --set run_dir=runs/x_pp2 --set parallel.pp=2 "
    "--set deepspeed.zero_optimization.stage=1 --set checkpoint.load=ckpt_tp1pp2 --set train.steps=300 "
    "--set train.allow_schedule_change=true":
        _train("train.steps=4"),
    "megallama convert --input runs/x/checkpoints --output hf_out --to hf --dtype bfloat16": Run(),
    "megallama convert --from hf --input hf_out --output ours": Run(),
    "megallama convert --input ours --output ours_tp2 --tp 2": Run(),
    "megallama convert --input runs/x/checkpoints --output mg_tp2 --to megatron --tp 2": Run(),
    "megallama convert --from megatron --input mg_tp2 --output ours_mg": Run(),
    "megallama convert --input runs/x/checkpoints --output titan_dcp --to dcp": Run(),
    "megallama convert --from dcp --input titan_dcp --output ours_dcp": Run(),
    "megallama convert --from meta --input llama-7b/ --output ours_7b": Run(
        why="llama-7b/ is a tiny release in Meta's layout written by the test"),
    "megallama eval --checkpoint DIR --config cfg.yaml '[--split' 'valid]'": Run(
        extra=("--max-samples", "8", "--json"), why="cfg.yaml: the tiny config that trained runs/x"),
    "megallama generate --checkpoint DIR --prompt 'def main' '[--temperature' 0.8 --top-p '0.9]'": Run(
        extra=("--max-new-tokens", "8")),
    "'from megallama import from_pretrained; model = from_pretrained(DIR)'": Run(
        emulate="python", why="Python, not shell: run with python -c"),
    "megallama finetune cfg.yaml --pretrained DIR --data task.jsonl --tokenizer tok.model": Run(
        sets=("run_dir=runs/ft", "train.steps=2", "train.warmup_steps=1", "train.seq_len=16", "train.micro_batch_size=4",
              "train.global_batch_size=4"), why="tok.model: the tokenizer the trunk was trained with"),
    "megallama validate CONFIG --world-size N": Run(),
    "megallama validate cfg.yaml --world-size N": Run(),
    "megallama estimate --config examples/llama-7b.yaml --dp 32": Run(),
    "megallama plan --model llama-65b --gpus 2048 --gpu a100-80gb": Run(),
    "megallama describe --model llama-7b --tp 2 '[--json]'": Run(),
    "megallama describe --model llama3-405b --pp 16": Run(),
    "python tools/plot_metrics.py RUN_DIR": Run(),
    "megallama validate examples/llama-7b.yaml --world-size 32": Run(),
    "megallama validate examples/llama-13b.yaml --world-size 64": Run(),
    "megallama validate examples/llama-33b.yaml --world-size 64": Run(),
    "megallama validate examples/llama-65b.yaml --world-size 2048": Run(),
    # training under each launcher, at tiny size
    "megallama train examples/tiny.yaml --set train.steps=50": _train(),
    "deepspeed --num_gpus 2 --module megallama train examples/tiny.yaml": _train(),
    "torchrun --nproc_per_node 4 -m megallama train examples/tiny.yaml --set parallel.tp=2 --set parallel.pp=2 "
    "--set deepspeed.zero_optimization.stage=1": _train(),
    "mpiexec -n 2 python -m megallama train examples/tiny.yaml": _train(),
    # the encoder-decoder: span corruption on the embedded corpus, then the paired reverse task
    "megallama train examples/tiny-encdec.yaml --set train.steps=50": _train(),
    "megallama preprocess --input reverse_train.jsonl --json-keys source target --train-tokenizer --vocab-size 312 "
    "--tokenizer rev.model --output-prefix data/reverse": Run(extra=("--workers", "1")),
    "deepspeed --num_gpus 2 --module megallama train rev.yaml": _train("run_dir=runs/rev"),
    "megallama eval --checkpoint runs/rev/checkpoints --config rev.yaml --split valid": Run(
        extra=("--max-samples", "8")),
    "megallama generate --checkpoint runs/rev/checkpoints --tokenizer rev.model --prompt 'b y n b e'": Run(
        extra=("--max-new-tokens", "8")),
    "megallama profile examples/tiny.yaml": Run(extra=("--steps", "1", "--warmup", "1", "--no-census"), sets=TINY),
    "make demo": Run(emulate="make-demo", sets=TINY, why="the install step needs the network: `make -n demo` must "
                     "show it runs examples/demo.sh, which then runs here with the venv on PATH"),
    "script examples/demo.sh": Run(emulate="covered", why="run whole by `make demo` above"),
    "megallama network --gpu h100-sxm --out cluster.yaml": Run(
        emulate="covered", why="needs ranks on 2+ nodes: tests/test_network_share.py runs it on two emulated nodes"),
    "sbatch examples/slurm_llama7b.sbatch": Run(emulate="sbatch", sets=TINY + SEVEN_B, why=(
        "no SLURM here: the script runs under bash with the variables sbatch sets, and a stand-in `srun` "
        "starts one task with the variables srun sets (SLURM_PROCID, SLURM_LOCALID, ...)")),
    "script examples/slurm_llama7b.sbatch": Run(emulate="covered", why="run whole by the sbatch line above"),
    "deepspeed --hostfile examples/hostfile --module megallama train examples/llama-7b.yaml": Run(
        emulate="hostfile", sets=TINY + SEVEN_B, why=(
            "the example's nodes do not exist and there is no ssh: a hostfile naming only localhost (1 slot), "
            "with --no_ssh_check and --master_addr 127.0.0.1")),
    "megallama doctor --hostfile examples/hostfile examples/llama-7b.yaml": Run(
        emulate="hostfile", why="the example's nodes do not exist: a hostfile naming only localhost (1 slot), "
                                "one node, so no ssh (tests/test_cluster_doctor.py runs it across nodes)"),
    "make test": Run(emulate="make-test", why="it is this test suite: `make -n test` must show it runs pytest on "
                     "tests/"),
}


def _tokens(text: str) -> List[str]:
    return shlex.split(text, comments=True)


def _key(tokens: List[str]) -> str:
    return shlex.join(tokens)


def documented_commands() -> Dict[str, str]:
    """Normalised command -> where the docs show it."""
    found: Dict[str, str] = {}
    readme = (ROOT / "README.md").read_text()
    in_block, pending, prose = False, "", []
    for n, line in enumerate(readme.splitlines(), 1):
        if line.startswith("```"):
            in_block = not in_block
            prose.append("")
            continue
        prose.append("" if in_block else line)
        if in_block:
            pending += line[:-1] + " " if line.endswith("\\") else line
            if not line.endswith("\\"):
                if _tokens(pending):
                    found.setdefault(_key(_tokens(pending)), f"README.md:{n}")
                pending = ""
    text = "\n".join(prose)
    for m in re.finditer(r"`([^`]+)`", text):  # inline spans, a line break inside one included
        span, where = " ".join(m.group(1).split()), f"README.md:{text[:m.start()].count(chr(10)) + 1}"
        if span.startswith("from megallama import"):
            found.setdefault(_key([span]), where)
        elif len(span.split()) > 1 and span.split()[0] in COMMAND_WORDS:
            found.setdefault(_key(_tokens(span)), where)
    for path in sorted((ROOT / "examples").iterdir()):
        rel = path.relative_to(ROOT)
        if path.suffix in (".sh", ".sbatch"):
            found.setdefault(f"script {rel}", str(rel))
            continue
        for n, line in enumerate(path.read_text().splitlines(), 1):
            text = line.lstrip()[1:].strip().strip("`") if line.lstrip().startswith("#") else ""
            if text.split(" ", 1)[0] in COMMAND_WORDS and len(text.split()) > 1:
                found.setdefault(_key(_tokens(text)), f"{rel}:{n}")
    return found


def test_every_documented_command_is_known_and_every_entry_documented():
    docs = documented_commands()
    unknown = sorted(f"{where}: {cmd}" for cmd, where in docs.items() if cmd not in RUNS)
    assert not unknown, "documented commands this test does not know how to run (add them to RUNS):\n" + \
        "\n".join(unknown)
    stale = sorted(set(RUNS) - set(docs))
    assert not stale, f"RUNS entries no longer in the docs: {stale}"
    for cmd, run in RUNS.items():
        assert not run.emulate or run.why, f"an emulated command must say why: {cmd}"


@pytest.fixture(scope="module")
def box(tmp_path_factory, data_cache):
    """The scratch directory every command runs in, with the inputs the docs name by placeholder."""
    from tests.test_hf_interop import hf_model, write_meta_layout

    root = tmp_path_factory.mktemp("docs")
    for name in ("examples", "ds_configs", "tools", "Makefile"):
        (root / name).symlink_to(ROOT / name)
    write_jsonl(root / "pile.jsonl", sample_texts(300, seed=11))
    with open(root / "task.jsonl", "w") as f:
        for i in range(40):
            f.write(json.dumps({"text": ["def return import", "while for yield"][i % 2], "label": i % 2}) + "\n")
    rng = random.Random(5)
    with open(root / "reverse_train.jsonl", "w") as f:  # the README's reverse task: letters in, reversed out
        for _ in range(400):
            word = [rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(3, 6))]
            f.write(json.dumps({"source": " ".join(word), "target": " ".join(reversed(word))}) + "\n")
    (root / "rev.yaml").write_text(yaml.safe_dump({
        "run_dir": "runs/rev", "model": {"preset": "tiny-encdec", "vocab_size": 312},
        "train": {"steps": 50, "seq_len": 32, "micro_batch_size": 4, "global_batch_size": 8, "warmup_steps": 1},
        "data": {"prefixes": ["data/reverse"], "tokenizer": "rev.model", "split": "90,5,5"},
        "checkpoint": {"every": 50}, "deepspeed": "ds_configs/zero2.json"}))
    write_meta_layout(hf_model(gqa=True, intermediate=176), root / "llama-7b")  # Meta's FFN rule at dim 64
    cache = data_cache
    cfg = (ROOT / "examples" / "tiny.yaml").read_text().replace("run_dir: runs/tiny", "run_dir: runs/x")
    cfg = cfg.replace("deepspeed: ../ds_configs/", "deepspeed: ds_configs/")  # beside ds_configs/, not in examples/
    (root / "cfg.yaml").write_text(cfg.replace("data: {}", f"data: {{cache_dir: {cache}, embedded_max_files: 40, "
                                                            "split: '90,5,5'}"))
    e = env()
    e["PATH"] = f"{root / 'bin'}{os.pathsep}{e['PATH']}"
    (root / "bin").mkdir()
    return {"root": root, "cache": str(cache), "env": e}


def _argv(cmd: str, run: Run, cache: str) -> List[str]:
    argv = []
    for tok in _tokens(cmd):
        tok = PLACEHOLDERS.get(tok.strip("[]"), tok.strip("[]"))  # [--optional flags] are given
        argv.append(tok)
    sets = list(run.sets)
    if "train" in argv or "profile" in argv:
        sets.append(f"data.cache_dir={cache}")
        if not any(a.startswith("run_dir=") for a in argv + sets) and ("train" in argv):
            sets.append(f"run_dir=runs/doc-{list(RUNS).index(cmd)}")  # each run its own, so none resumes another
    return argv + list(run.extra) + [x for s in sets for x in ("--set", s)]


def _launch(argv: List[str], box, extra_env=None, timeout=600):
    e = dict(box["env"], MASTER_PORT=str(free_port()), PET_MASTER_PORT=str(free_port()), **(extra_env or {}))
    if argv[0] == "deepspeed":  # the launcher's default port 29500 may be another test's
        argv = argv[:1] + ["--master_port", e["MASTER_PORT"]] + argv[1:]
    if argv[0] == "megallama" and argv[1] not in AS_TYPED:
        proc = run_forked(argv[1:], None, e, box["root"], timeout)  # a fresh process, without the imports' start-up
    else:
        if argv[0] in ("megallama", "torchrun", "deepspeed", "mpiexec", "python"):
            argv = [str(BIN / argv[0]) if (BIN / argv[0]).exists() else argv[0]] + argv[1:]
        proc = subprocess.run(argv, cwd=box["root"], env=e, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{shlex.join(argv)} failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n" \
                                 f"{proc.stderr[-4000:]}"
    return proc


def _after(cmd: str, box) -> None:
    """What a user does between the documented steps: give DIR and tok.model the run's tokenizer."""
    root = box["root"]
    if cmd.startswith("megallama convert --from hf --input hf_out"):
        tok = next(Path(box["cache"]).rglob("tokenizer.model"))
        shutil.copyfile(tok, root / "tok.model")
        shutil.copyfile(tok, root / "ours" / "tokenizer.model")


@pytest.mark.parametrize("cmd", list(RUNS))
def test_documented_command_runs(cmd, box):
    run, root = RUNS[cmd], box["root"]
    argv = _argv(cmd, run, box["cache"])
    if run.emulate == "covered" or run.emulate == "make-test":
        if run.emulate == "make-test":
            dry = _launch(["make", "-n", "test", f"VENV={sys.prefix}", "-o", f"{sys.prefix}/.installed"], box)
            assert "pytest" in dry.stdout and "tests" in dry.stdout, dry.stdout
        return
    if run.emulate == "python":
        code = re.sub(r"\bDIR\b", repr(PLACEHOLDERS["DIR"]), argv[0]) + "; print(type(model).__name__)"
        assert "LlamaForCausalLM" in _launch(["python", "-c", code], box).stdout
    elif run.emulate == "make-demo":
        dry = _launch(["make", "-n", "demo", f"VENV={sys.prefix}", "-o", f"{sys.prefix}/.installed"], box)
        assert "bash examples/demo.sh" in dry.stdout, dry.stdout
        sets = run.sets + (f"data.cache_dir={box['cache']}",)
        _launch(["bash", "examples/demo.sh"] + [x for s in sets for x in ("--set", s)], box,
                {"RUN_DIR": "runs/demo"})
        assert (root / "runs" / "demo" / "report.json").is_file() and (root / "runs" / "demo" / "metrics.png").is_file()
    elif run.emulate == "sbatch":
        srun = root / "bin" / "srun"
        srun.write_text("#!/bin/bash\n# stand-in for srun: SLURM_NTASKS tasks here, with srun's per-task variables\n"
                        "while [[ $1 == --* ]]; do shift; done\npids=()\n"
                        "for ((i = 0; i < SLURM_NTASKS; i++)); do\n"
                        "  SLURM_PROCID=$i SLURM_LOCALID=$i \"$@\" & pids+=($!)\ndone\n"
                        "rc=0; for p in \"${pids[@]}\"; do wait $p || rc=$?; done; exit $rc\n")
        srun.chmod(0o755)
        scontrol = root / "bin" / "scontrol"  # stand-in: our own nodelist expander as `show hostnames`
        scontrol.write_text(f"#!/bin/bash\n[[ $1 == show && $2 == hostnames ]] || exit 1\nexec {sys.executable} -c "
                            "'import sys; from megallama.train.launchers import expand_nodelist; "
                            "print(*expand_nodelist(sys.argv[1]), sep=chr(10))' \"$3\"\n")
        scontrol.chmod(0o755)
        script = argv[1]
        _launch(["bash", script] + argv[2:], box, {"SLURM_JOB_ID": "4242", "SLURM_NTASKS": "1",
                                                    "SLURM_CPUS_PER_TASK": "1", "SLURM_JOB_NODELIST": "localhost"})
        assert (root / "runs" / "llama-7b" / "report.json").is_file()  # not keyed by the job: a requeue resumes
    elif run.emulate == "hostfile":
        hostfile = root / "hostfile.localhost"
        hostfile.write_text("localhost slots=1\n")
        i = argv.index("--hostfile")
        argv[i + 1:i + 2] = [str(hostfile)] + (["--no_ssh_check", "--master_addr", "127.0.0.1"]
                                               if argv[0] == "deepspeed" else [])
        _launch(argv, box)
    else:
        proc = _launch(argv, box)
        if "--json" in argv:
            json.loads(proc.stdout)  # stdout is the JSON alone
    _after(cmd, box)
