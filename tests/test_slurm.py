"""SLURM: nodelists expanded as SLURM does (``scontrol show hostnames`` where installed), a bad
one refused in one line, and the example sbatch script current, requeue-friendly and resumable."""
import re
import subprocess
import sys
from itertools import groupby
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from megallama.errors import PREEMPTED_EXIT, UserError
from megallama.train.launchers import detect_launcher, expand_nodelist, first_slurm_host
from tests.train_utils import ROOT, env, tiny_run_config

SBATCH = ROOT / "examples" / "slurm_llama7b.sbatch"


@pytest.mark.parametrize("nodelist,hosts", [
    ("rack[1-2]-node[01-04]", [f"rack{r}-node0{n}" for r in (1, 2) for n in (1, 2, 3, 4)]),
    ("gpu[1-2]-ib", ["gpu1-ib", "gpu2-ib"]),
    ("a[1,3-4],b7", ["a1", "a3", "a4", "b7"]),
    ("node[08-11]", ["node08", "node09", "node10", "node11"]),
    ("node[003-005,07],other", ["node003", "node004", "node005", "node07", "other"]),
    ("single", ["single"]),
    ("n[9-10].cluster", ["n9.cluster", "n10.cluster"]),
])
def test_named_nodelists(nodelist, hosts):
    assert expand_nodelist(nodelist) == hosts


def _compress(hosts):
    """A SLURM-style compressor (as ``scontrol show hostlist``, order kept): adjacent hosts that
    differ only in their last number (same width) share one bracket, consecutive numbers a range."""
    def key(host):
        m = re.fullmatch(r"(.*?)(\d+)(\D*)", host)
        return (m.group(1), len(m.group(2)), m.group(3)) if m else (host, None, "")

    items = []
    for (prefix, width, suffix), group in groupby(hosts, key):
        if width is None:
            items += [prefix for _ in group]
            continue
        nums = [int(re.fullmatch(r".*?(\d+)\D*", h).group(1)) for h in group]
        runs = []
        for n in nums:
            if runs and n == runs[-1][1] + 1:
                runs[-1][1] = n
            else:
                runs.append([n, n])
        text = ",".join(f"{a:0{width}d}" + (f"-{b:0{width}d}" if b > a else "") for a, b in runs)
        items.append(f"{prefix}[{text}]{suffix}")
    return ",".join(items)


_name = st.from_regex(r"[a-z][a-z0-9.-]{0,5}", fullmatch=True).filter(lambda s: not s[-1].isdigit())
_host = st.builds(lambda p, n, w, s: f"{p}{n:0{w}d}{s}" if n is not None else p + s,
                  _name, st.none() | st.integers(0, 300), st.integers(1, 4),
                  st.sampled_from(["", "-ib", ".x", "-eth0"]))


@settings(deadline=None, max_examples=300)
@given(st.lists(_host, min_size=1, max_size=40))
def test_expander_inverts_a_compressor(hosts):
    assert expand_nodelist(_compress(hosts)) == hosts


@settings(deadline=None, max_examples=200)
@given(_name, st.sets(st.integers(0, 40), min_size=1, max_size=6), st.sets(st.integers(0, 40), min_size=1, max_size=6),
       st.integers(1, 3), st.sampled_from(["", "-ib"]))
def test_several_brackets_expand_as_a_cartesian_product_last_fastest(prefix, outer, inner, width, suffix):
    def group(nums):
        return ",".join(f"{n:0{width}d}" for n in sorted(nums))

    text = f"{prefix}[{group(outer)}]-n[{group(inner)}]{suffix}"
    assert expand_nodelist(text) == [f"{prefix}{a:0{width}d}-n{b:0{width}d}{suffix}"
                                     for a in sorted(outer) for b in sorted(inner)]


@pytest.mark.parametrize("bad", ["node[1-", "node]1[", "node[2-1]", "a,,b", "", "n[x]", "a b", "n[[1]]", "a;b",
                                 "n[0-99999999]"])
def test_bad_nodelist_is_one_line_naming_the_variable(bad):
    with pytest.raises(UserError) as exc:
        detect_launcher({"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_JOB_NODELIST": bad})
    assert str(exc.value).startswith("SLURM_JOB_NODELIST: ") and "\n" not in str(exc.value)


def test_bad_nodelist_from_the_cli_exits_2_in_one_line(tmp_path, data_cache):
    cfg = tiny_run_config(tmp_path, data_cache)
    e = {k: v for k, v in env().items() if k != "MASTER_ADDR"}
    e.update(SLURM_PROCID="0", SLURM_NTASKS="2", SLURM_LOCALID="0", SLURM_JOB_NODELIST="gpu[3-1]")
    proc = subprocess.run([sys.executable, "-m", "megallama", "train", str(cfg)], env=e, cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0, proc.stderr
    assert "SLURM_JOB_NODELIST: range '3-1' in 'gpu[3-1]' runs backwards" in proc.stderr
    assert not (tmp_path / "run").exists()


def _scontrol(tmp_path, body):
    path = tmp_path / "bin" / "scontrol"
    path.parent.mkdir(exist_ok=True)
    path.write_text("#!/bin/bash\n" + body)
    path.chmod(0o755)
    return str(path.parent)


def test_scontrol_is_asked_first_and_the_parser_is_the_fallback(tmp_path, monkeypatch):
    # the list reaches scontrol as one argument, unquoted by no shell
    monkeypatch.setenv("PATH", _scontrol(tmp_path, 'echo "first-of-$3"; echo second\n'))
    assert first_slurm_host("odd[1-2]") == "first-of-odd[1-2]"
    monkeypatch.setenv("PATH", _scontrol(tmp_path, "exit 1\n"))
    assert first_slurm_host("rack[2-3]-n[07-08]") == "rack2-n07"


# ------------------------------------------------------------------------------ the sbatch example
def test_sbatch_example_parses_and_is_current():
    text = SBATCH.read_text()
    subprocess.run(["bash", "-n", str(SBATCH)], check=True)
    directives = re.findall(r"^#SBATCH (\S+)", text, re.M)
    assert "--requeue" in directives and any(re.fullmatch(r"--signal=(B:)?TERM@\d+", d) for d in directives)
    assert re.search(r"^export TORCH_NCCL_ASYNC_ERROR_HANDLING=", text, re.M)
    assert not re.search(r"(?<!TORCH_)NCCL_ASYNC_ERROR_HANDLING", text)  # deprecated by torch
    assert not [line for line in text.splitlines() if re.search("run_dir|RUN_DIR", line) and "SLURM_JOB_ID" in line]
    assert "scontrol show hostnames" in text and f"-eq {PREEMPTED_EXIT}" in text
    import torch.distributed.elastic.agent.server.local_elastic_agent as agent  # torch's own name for it

    assert "TORCH_NCCL_ASYNC_ERROR_HANDLING" in Path(agent.__file__).read_text()


@pytest.mark.parametrize("srun_rc,requeued,rc", [(PREEMPTED_EXIT, True, 0), (0, False, 0), (3, False, 3)])
def test_sbatch_requeues_a_preempted_run_only(tmp_path, srun_rc, requeued, rc):
    bindir = _scontrol(tmp_path, f'echo "$@" >> {tmp_path}/scontrol.log\n[[ $1 == show ]] && echo node07\nexit 0\n')
    (tmp_path / "bin" / "srun").write_text(f'#!/bin/bash\necho "$MASTER_ADDR $@" > {tmp_path}/srun.log\n'
                                           f"exit {srun_rc}\n")
    (tmp_path / "bin" / "srun").chmod(0o755)
    e = dict(env(), PATH=f"{bindir}:/usr/bin:/bin", SLURM_JOB_ID="4242", SLURM_JOB_NODELIST="node[07-08]",
             SLURM_CPUS_PER_TASK="1")
    e.pop("MASTER_ADDR", None)
    proc = subprocess.run(["bash", str(SBATCH)], env=e, cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert proc.returncode == rc, proc.stderr
    srun = (tmp_path / "srun.log").read_text()
    assert srun.startswith("node07 ") and "run_dir=runs/llama-7b\n" in srun
    calls = (tmp_path / "scontrol.log").read_text().splitlines()
    assert calls[0] == "show hostnames node[07-08]" and (calls[1:] == ["requeue 4242"]) == requeued
