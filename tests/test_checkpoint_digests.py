"""No rank-0 hashing bottleneck: each rank hashes the checkpoint files it wrote, the manifest is
assembled from the gathered digests (a file no rank claims fails loud), and verification on
resume is split over ranks, each reading a disjoint share, all reaching the same verdict."""
import json
import shutil
from pathlib import Path

import pytest

from megallama.train import manifest as mf
from tests.dist_utils import run_distributed
from tests.train_utils import run_train, tiny_run_config


def _entries(sizes):
    return [(f"f{i}", {"bytes": b, "sha256": ""}) for i, b in enumerate(sizes)]


def test_shares_are_disjoint_complete_and_balanced():
    entries = _entries([100, 90, 80, 10, 10, 10, 5, 1])
    shares = mf.share(entries, 3)
    names = [rel for s in shares for rel, _ in s]
    assert sorted(names) == sorted(rel for rel, _ in entries) and len(names) == len(set(names))
    loads = [sum(e["bytes"] for _, e in s) for s in shares]
    assert max(loads) - min(loads) <= 100  # no share holds more than one largest file above another
    assert mf.share(list(reversed(entries)), 3) == shares  # the same split whatever order it came in


def test_a_file_no_rank_claims_or_two_ranks_claim_fails_loud(tmp_path):
    (tmp_path / "a.pt").write_bytes(b"a")
    (tmp_path / "stray.pt").write_bytes(b"s")
    files = mf.digest(tmp_path, [tmp_path / "a.pt"], 3, "nodeA")
    assert files["a.pt"]["rank"] == 3 and files["a.pt"]["host"] == "nodeA"
    problem = mf.coverage_problem(tmp_path, files)
    assert problem and "stray.pt" in problem and "no rank" in problem
    (tmp_path / "stray.pt").unlink()
    assert mf.coverage_problem(tmp_path, files) is None
    with pytest.raises(RuntimeError, match="a.pt claimed by rank 3 and rank 4"):
        mf.merge([files, {"a.pt": {**files["a.pt"], "rank": 4}}])
    (tmp_path / "a.pt").unlink()
    assert "claimed by rank 3 but not on disk" in mf.coverage_problem(tmp_path, files)


def test_single_process_manifest_and_old_format_still_verify(tmp_path):
    (tmp_path / "universal").mkdir()
    (tmp_path / "universal" / "x.safetensors").write_bytes(b"x" * 1000)
    (tmp_path / "meta.json").write_text("{}")
    manifest = mf.write_manifest(tmp_path)  # tools: one process hashes everything
    assert set(manifest["files"]) == {"meta.json", "universal/x.safetensors"}
    assert mf.verify(tmp_path) is None
    data = bytearray((tmp_path / "universal" / "x.safetensors").read_bytes())
    data[500] ^= 1
    (tmp_path / "universal" / "x.safetensors").write_bytes(bytes(data))
    assert "x.safetensors: checksum mismatch" in mf.verify(tmp_path)


def _verify_over_ranks(rank, world, root):
    """Every rank: which files it hashed while verifying, and the verdicts it reached."""
    from megallama.train import checkpoint as ckpt
    from megallama.train import manifest

    hashed = []
    real = manifest.sha256_file

    def counting(path, fsync=True):
        hashed.append(Path(path).name)
        return real(path, fsync)

    manifest.sha256_file = counting
    root = Path(root)
    good = ckpt.verify_all(root / "step00000001")
    mine = list(hashed)
    found = ckpt.find_resumable(root)  # latest (step 2) is corrupted: every rank falls back together
    return {"rank": rank, "good": good, "hashed": mine, "found": str(found)}


def test_verification_is_split_over_ranks_and_agrees(tmp_path):
    for step in (1, 2):
        tag = tmp_path / f"step0000000{step}"
        tag.mkdir()
        for i in range(7):
            (tag / f"shard{i}.pt").write_bytes(bytes([i]) * (1000 * (i + 1)))
        mf.write_manifest(tag)
    (tmp_path / "latest").write_text("step00000002")
    bad = tmp_path / "step00000002" / "shard3.pt"
    bad.write_bytes(b"\xff" * bad.stat().st_size)
    results = run_distributed(_gather_results, 3, str(tmp_path))
    hashed = [r["hashed"] for r in results]
    assert all(r["good"] is None for r in results)
    assert sorted(sum(hashed, [])) == sorted(f"shard{i}.pt" for i in range(7))  # each file once, by one rank
    assert all(h for h in hashed)  # and every rank had a share
    assert {r["found"] for r in results} == {str(tmp_path / "step00000001")}


def _gather_results(rank, world, root):
    import torch.distributed as dist

    mine = _verify_over_ranks(rank, world, root)
    every = [None] * world
    dist.all_gather_object(every, mine)
    return every


def test_collective_verdict_names_the_file_on_every_rank(tmp_path):
    tag = tmp_path / "step00000001"
    tag.mkdir()
    for i in range(5):
        (tag / f"shard{i}.pt").write_bytes(bytes([i]) * 100)
    mf.write_manifest(tag)
    (tag / "shard4.pt").write_bytes(b"\0" * 100)
    (tmp_path / "latest").write_text("step00000001")
    verdicts = run_distributed(_no_fallback, 2, str(tmp_path))
    assert len(set(verdicts)) == 1 and "shard4.pt: checksum mismatch" in verdicts[0]
    assert "no earlier complete checkpoint" in verdicts[0]


def _no_fallback(rank, world, root):
    import torch.distributed as dist

    from megallama.errors import UserError
    from megallama.train import checkpoint as ckpt

    try:
        ckpt.find_resumable(Path(root))
        verdict = "found"
    except UserError as exc:
        verdict = str(exc)
    every = [None] * world
    dist.all_gather_object(every, verdict)
    return every


@pytest.fixture(scope="module")
def two_rank_run(tmp_path_factory, data_cache):
    tmp = tmp_path_factory.mktemp("digests")
    cfg = tiny_run_config(tmp, data_cache)
    base = ["deepspeed.zero_optimization.stage=1", "train.steps=3", "checkpoint.every=1", "checkpoint.keep=3"]
    run_train(cfg, base + ["train.exit_at_step=2", f"run_dir={tmp / 'run'}"], world=2)
    return cfg, base, tmp / "run"


def test_each_rank_hashed_the_files_it_wrote(two_rank_run):
    _, _, run_dir = two_rank_run
    tag = run_dir / "checkpoints" / "step00000002"
    files = json.loads((tag / mf.MANIFEST).read_text())["files"]
    assert set(files) == set(mf.on_disk(tag))  # every file claimed, none twice
    assert files["rng_rank00001.pt"]["rank"] == 1 and files["zero_pp_rank_1_mp_rank_00_optim_states.pt"]["rank"] == 1
    assert files["rng_rank00000.pt"]["rank"] == 0 and files["universal/pp00-tp00.safetensors"]["rank"] == 0
    assert {e["rank"] for e in files.values()} == {0, 1} and all(e["host"] for e in files.values())
    assert mf.verify(tag) is None


def test_resume_over_ranks_falls_back_past_a_corrupted_file(two_rank_run, tmp_path):
    cfg, base, trained = two_rank_run
    run_dir = tmp_path / "run"
    shutil.copytree(trained, run_dir)
    bad = run_dir / "checkpoints" / "step00000002" / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    data = bytearray(bad.read_bytes())
    data[-100] ^= 1
    bad.write_bytes(bytes(data))
    report = run_train(cfg, base + [f"run_dir={run_dir}"], world=2)
    assert report["start_step"] == 1
    warned = [x for x in report["stderr"].splitlines() if "falling back to" in x]
    assert warned and all(f"{bad}: checksum mismatch" in x for x in warned), report["stderr"][-3000:]
