"""20 SIGKILLs at random moments of checkpoint saves never leave `latest` on an incomplete
checkpoint; a flipped byte or a missing shard is refused on load with a line naming the file."""
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import pytest

from megallama.train.checkpoint import LATEST, verify
from tests.dist_utils import forkserver_context
from tests.train_utils import ROOT, env, run_train, tiny_run_config

def _saver(out: str, ready) -> None:
    """Child: build a tiny ZeRO-1 engine, then save checkpoints back to back until killed."""
    from pathlib import Path

    import torch

    from megallama.config import load_run_config
    from megallama.parallel import initialize
    from megallama.train import checkpoint as ckpt
    from megallama.train.distributed import init_distributed
    from megallama.train.ds_config import build_ds_config
    from megallama.train.engine import build_engine

    torch.set_num_threads(1)
    out = Path(out)
    cfg = load_run_config(data={"model": "tiny", "deepspeed": {"zero_optimization": {"stage": 1}},
                                "train": {"seq_len": 32, "micro_batch_size": 2}})
    init_distributed()
    state = initialize()
    built = build_engine(cfg, state, build_ds_config(cfg, 1), torch.device("cpu"))
    tokens = torch.randint(0, 2048, (2, 33))
    loss = built.engine(tokens[:, :-1], labels=tokens[:, 1:])
    built.engine.backward(loss)
    built.engine.step()
    start = int((out / "latest").read_text()[4:]) if (out / "latest").exists() else 0
    ready.set()
    for step in range(start + 1, start + 100_000):
        ckpt.save(built.engine, built.module, state, out, step, {"consumed_samples": step, "step": step}, 2,
                  {"model": cfg.model.model_dump(), "tp": 1, "pp": 1, "dp": 1})


def test_ten_kills_mid_save_never_break_latest(tmp_path):
    # a fork server imports torch and DeepSpeed once; each saver forks from it in about a second
    ctx = forkserver_context()
    out = tmp_path / "ckpts"
    rng = random.Random(1234)
    seen_tags = set()
    for kill in range(10):
        ready = ctx.Event()
        proc = ctx.Process(target=_saver, args=(str(out), ready))
        proc.start()
        assert ready.wait(timeout=120), f"saver {kill} never became ready (exit code {proc.exitcode})"
        time.sleep(rng.uniform(0.0, 1.0))
        os.kill(proc.pid, signal.SIGKILL)
        proc.join()
        if (out / LATEST).exists():
            tag = out / (out / LATEST).read_text().strip()
            assert verify(tag) is None, f"kill {kill}: latest -> {tag}: {verify(tag)}"
            seen_tags.add(tag.name)
    assert len(seen_tags) >= 3  # saves did complete between kills: the kills landed at varied moments


@pytest.fixture(scope="module")
def one_checkpoint(tmp_path_factory, data_cache):
    tmp = tmp_path_factory.mktemp("corrupt")
    cfg = tiny_run_config(tmp, data_cache)
    run_train(cfg, ["train.exit_at_step=2", "checkpoint.every=2", f"run_dir={tmp / 'run'}"])
    return cfg, tmp / "run"


@pytest.mark.parametrize("damage", ["flip", "missing"])
def test_damaged_checkpoint_is_refused_naming_the_file(one_checkpoint, tmp_path, damage):
    cfg, trained = one_checkpoint
    run_dir = tmp_path / "run"
    shutil.copytree(trained, run_dir)
    shard = run_dir / "checkpoints" / "step00000002" / "universal" / "pp00-tp00.safetensors"
    if damage == "flip":
        data = bytearray(shard.read_bytes())
        data[-10] ^= 0x01
        shard.write_bytes(bytes(data))
    else:
        shard.unlink()
    r = subprocess.run([sys.executable, "-m", "megallama", "train", str(cfg), "--set", f"run_dir={run_dir}",
                        "--set", "checkpoint.every=2"], capture_output=True, text=True, env=env(), cwd=ROOT)
    assert r.returncode == 2, r.stderr[-2000:]
    line = [x for x in r.stderr.splitlines() if "megallama train: error" in x]
    assert len(line) == 1 and str(shard) in line[0], r.stderr[-2000:]
    assert ("checksum mismatch" if damage == "flip" else "missing shard") in line[0]
    assert "Traceback" not in r.stderr
