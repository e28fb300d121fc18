"""``megallama plan`` / ``estimate`` from a shell: bad arguments are one line and exit 2."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _run(*args):
    return subprocess.run([sys.executable, "-m", "megallama", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)


def _stderr_lines(proc):
    # DeepSpeed may log an accelerator warning on import; the error itself must be one line
    return [ln for ln in proc.stderr.splitlines() if ln.strip() and "[WARNING]" not in ln]


@pytest.mark.parametrize("args, needle", [
    (["plan", "--model", "llama-7b", "--gpus", "8", "--gpu", "a100-40gb", "--tp", "3"], "does not divide --gpus 8"),
    (["plan", "--model", "llama-7b", "--gpus", "8", "--gpu", "a10"], "unknown GPU type 'a10'; did you mean"),
    (["plan", "--model", "llama-33b", "--gpus", "16", "--gpu", "h100", "--tp", "8"], "n_heads=52"),
    (["plan", "--model", "llama-7b", "--gpus", "16", "--gpu", "h100", "--tp", "2", "--pp", "2", "--dp", "2"],
     "not --gpus 16"),
    (["plan", "--model", "llama-7", "--gpus", "8", "--gpu", "h100"], "did you mean 'llama-7b'"),
    (["estimate", "--model", "llama-7b", "--tp", "5"], "not divisible by tp"),
    (["estimate", "--model", "llama-7b", "--seq", "-5"], "--seq: expected a positive integer, got -5"),
    (["estimate", "--model", "llama-7b", "--seq", "0"], "--seq: expected a positive integer, got 0"),
    (["estimate", "--model", "llama-7b", "--gpus-per-node", "0"], "--gpus-per-node: expected a positive integer"),
    (["plan", "--model", "llama-7b", "--gpus", "8", "--gpu", "h100", "--seq", "-5"], "--seq: expected a positive"),
    (["plan", "--model", "llama-7b", "--gpus", "8", "--gpu", "h100", "--seq", "0"], "--seq: expected a positive"),
    (["plan", "--model", "llama-7b", "--gpus", "8", "--gpu", "h100", "--gpus-per-node", "0"], "--gpus-per-node"),
    (["plan", "--model", "llama-7b", "--gpus", "8", "--gpu", "h100", "--global-batch-tokens", "-1"],
     "--global-batch-tokens: expected a positive integer, got -1"),
    (["plan", "--model", "llama-7b", "--gpus", "8", "--gpu", "a100-80gb", "--dtype", "fp8"],
     "--dtype fp8: GPU profile 'a100-80gb' has no fp8 peak"),
    (["plan", "--model", "llama-7b", "--gpus", "64", "--gpu", "h100", "--tp", "1", "--pp", "1", "--zero", "1",
      "--mbs", "4", "--recompute", "full", "--global-batch-tokens", "8192"],
     "--global-batch-tokens 8,192: the pinned layout runs dp 64 x mbs 4 x seq 2048 = 524,288 tokens"),
    # no abbreviations: argparse would have read this as --gpus-per-node 8 and costed one GPU
    (["estimate", "--model", "llama-7b", "--gpus", "8", "--gpu", "h100"], "unrecognized arguments: --gpus 8"),
])
def test_bad_arguments_are_one_clear_line(args, needle):
    proc = _run(*args)
    lines = _stderr_lines(proc)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert len(lines) == 1 and needle in lines[0], proc.stderr


def test_estimate_json_breakdown(tmp_path):
    arch = tmp_path / "gpt.yaml"
    arch.write_text("arch_family: gpt\ndim: 2304\nn_layers: 24\nn_heads: 24\nvocab_size: 51200\n")
    proc = _run("estimate", "--config", str(arch), "--tp", "1", "--dp", "32", "--zero", "1", "--mbs", "2",
                "--recompute", "full", "--dtype", "fp16", "--gpu", "a100-80gb", "--json")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert abs(out["parameters"] / 1e9 - 1.7) < 0.1                    # Megatron's "1.7B"
    stage = out["stages"]["0"]
    assert {"params", "grads", "optimizer", "activations.blocks"} <= set(stage)
    assert out["prediction"]["fits"] and out["communication_per_step"]["dp"]["calls"] > 0


def test_plan_states_what_it_assumed_of_the_links_between_nodes(tmp_path, capsys):
    """A best layout across nodes says whether the NICs were costed at their nominal bandwidth or
    at the profile's measured share (and the share changes the costing); inside one node, nothing."""
    import yaml

    from tests.conftest_data import cli

    argv = ["plan", "--model", "llama-7b", "--gpus", "64", "--top", "1", "--zero", "3"]
    rc, out, err = cli(capsys, *argv, "--gpu", "h100-sxm")
    assert rc == 0, err
    assert "best spans nodes: NICs costed at their nominal bandwidth" in out and "megallama network" in out
    data = yaml.safe_load((ROOT / "megallama" / "configs" / "hardware" / "h100-sxm.yaml").read_text())
    data.pop("aliases")
    (tmp_path / "slow.yaml").write_text(yaml.safe_dump({**data, "name": "h100-slow", "cross_node_share": 0.2}))
    rc, slow, err = cli(capsys, *argv, "--gpu", tmp_path / "slow.yaml")
    assert rc == 0, err
    assert "NICs costed at 0.2 of their nominal bandwidth (the profile's measured cross_node_share)" in slow

    def dp_comm(text):
        return float(text.split("DP comm ")[1].split(" s")[0])
    assert dp_comm(slow) > dp_comm(out)
    rc, out, err = cli(capsys, "plan", "--model", "llama-7b", "--gpus", "8", "--top", "1", "--gpu", "h100-sxm")
    assert rc == 0 and "spans nodes" not in out, err
