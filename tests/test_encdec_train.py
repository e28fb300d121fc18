"""The encoder-decoder as a first-class model: every parallel layout reproduces the single-process
loss trajectory (fp32, span corruption on the embedded corpus), resumes continue it at the same
and at another layout, and eval / generate / convert take its checkpoints."""
import json
import subprocess
import sys

import pytest

from tests.train_utils import ROOT, env, run_train, tiny_run_config, train_together

RTOL = 1e-5
# the layout matrix (tests/test_layout_matrix.py) runs the encoder-decoder at ZeRO 0-3, TP2 with
# sequence parallelism and every recompute mode; plain TP2 is here because only it splits the
# cross-attention K/V projections without sequence shards
LAYOUTS = {
    "tp2": (2, ["parallel.tp=2"]),
}


def _config(tmp, data_cache):
    return tiny_run_config(tmp, data_cache, steps=4, seq_len=32)


def _encdec(run_dir, *more):
    return ["model.preset=tiny-encdec", f"run_dir={run_dir}", *more]


def _close(got, want):
    return len(got) == len(want) and all(abs(a - b) <= RTOL * abs(b) for a, b in zip(got, want))


def _cli(*args, world=1):
    cmd = [sys.executable, "-m", "megallama", *map(str, args)]
    if world > 1:
        from tests.train_utils import launch_cmd

        cmd = launch_cmd("torchrun", world) + list(map(str, args))
    return subprocess.run(cmd, capture_output=True, text=True, env=env(), cwd=ROOT, timeout=300)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, data_cache):
    tmp = tmp_path_factory.mktemp("encdec_ref")
    cfg = _config(tmp, data_cache)
    # trained with it in one process: another seed's run, for test_parity_check_can_fail
    report, seed8 = train_together([(cfg, _encdec(tmp / "run", "checkpoint.every=2")),
                                    (cfg, _encdec(tmp / "seed8", "train.seed=8"))])
    report["seed8"] = seed8["losses"]
    return cfg, report, tmp / "run" / "checkpoints"


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_layout_matches_single_process(name, reference, tmp_path):
    cfg, ref, _ = reference
    world, overrides = LAYOUTS[name]
    got = run_train(cfg, _encdec(tmp_path / "run", *overrides), world=world)
    assert _close(got["losses"], ref["losses"]), (name, got["losses"], ref["losses"])
    assert ref["losses"][-1] < ref["losses"][0]


def test_parity_check_can_fail(reference):
    """Another seed's trajectory must fall outside the same tolerance."""
    _, ref, _ = reference
    assert not _close(ref["seed8"], ref["losses"])


@pytest.mark.parametrize("world,layout", [(1, []), (2, ["parallel.tp=2"])], ids=["same_layout", "tp2_universal"])
def test_resume_continues_the_trajectory(reference, tmp_path, world, layout):
    cfg, ref, ckpts = reference
    got = run_train(cfg, _encdec(tmp_path / "run", f"checkpoint.load={ckpts / 'step00000002'}", *layout),
                    world=world)
    assert got["start_step"] == 2
    assert _close(got["losses"], ref["losses"][2:]), (got["losses"], ref["losses"])
    assert ("new layout" in got["stderr"]) == bool(layout)


def test_eval_generate_convert_take_the_checkpoint(reference, tmp_path, data_cache):
    cfg, ref, ckpts = reference
    ev = _cli("eval", "--checkpoint", ckpts, "--config", cfg, "--set", "model.preset=tiny-encdec",
              "--split", "train", "--max-samples", "8", "--json")
    assert ev.returncode == 0, ev.stderr
    result = json.loads(ev.stdout.strip().splitlines()[-1])
    assert 0 < result["loss"] < ref["losses"][0] and result["tokens"] > 0

    tok = next(data_cache.glob("embedded-*/tokenizer.model"))
    outs = []  # cached, recomputed, and tensor-parallel generation pick the same tokens
    for world, flag in ((1, []), (1, ["--no-kv-cache"]), (2, [])):
        gen = _cli("generate", "--checkpoint", ckpts, "--tokenizer", tok, "--prompt", "def main(<extra_id_0>):",
                   "--prompt", "import os", "--max-new-tokens", "6", "--temperature", "0.8", "--seed", "3",
                   "--json", *flag, world=world)
        assert gen.returncode == 0, gen.stderr
        got = json.loads(next(x for x in gen.stdout.splitlines() if x.startswith("{")))
        assert got["tp"] == world
        outs.append([r["new_tokens"] for r in got["results"]])
    assert outs[0] == outs[1] == outs[2] and any(outs[0])

    conv = _cli("convert", "--input", ckpts, "--output", tmp_path / "tp2", "--tp", "2")
    assert conv.returncode == 0, conv.stderr
    again = _cli("eval", "--checkpoint", tmp_path / "tp2", "--config", cfg, "--set", "model.preset=tiny-encdec",
                 "--split", "train", "--max-samples", "8", "--json")
    assert again.returncode == 0, again.stderr
    assert abs(json.loads(again.stdout.strip().splitlines()[-1])["loss"] - result["loss"]) <= RTOL * result["loss"]
    hf = _cli("convert", "--input", ckpts, "--output", tmp_path / "hf", "--to", "hf")
    assert hf.returncode == 2 and len(hf.stderr.strip().splitlines()) == 1 and "Hugging Face" in hf.stderr
    assert not (tmp_path / "hf").exists()


@pytest.mark.parametrize("command", ["validate", "train"])
def test_pipeline_is_refused_in_one_line(reference, command):
    cfg, _, _ = reference
    args = [command, cfg, "--set", "model.preset=tiny-encdec", "--set", "parallel.pp=2"]
    proc = _cli(*args, *(["--world-size", "2"] if command == "validate" else []))
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "parallel.pp" in lines[0] and "encoder_decoder" in lines[0], proc.stderr
