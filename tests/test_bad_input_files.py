"""Corrupt or mismatched files are one line naming the file, never a traceback, and never touched.

Property-based: hypothesis flips, overwrites, truncates and extends the bytes of Megatron token
files, SentencePiece models and checkpoint weights, and mutates checkpoint ``config.json``
fields, then feeds them to what reads them (``data-stats``, the training data start-up,
``load_checkpoint``/``build_for_inference`` behind eval/generate/convert/finetune). Each case
either works or raises :class:`UserError` in one line naming the file. Fixed cases cover files
that are each fine but do not match (data from another tokenizer, a tokenizer larger than the
model, sequences longer than the model's).
"""
from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from megallama.errors import UserError
from tests.conftest_data import sample_texts, tokenizer_path, write_docs

FAST = settings(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
VOCAB = 320


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A tokenizer, token files made with it, and a matching consolidated + HF checkpoint."""
    from megallama import LlamaForCausalLM, ModelConfig
    from megallama.checkpoint import save_consolidated
    from megallama.checkpoint.hf import save_hf
    from megallama.data.tokenizer import Tokenizer
    from megallama.parallel import ParallelState

    root = tmp_path_factory.mktemp("bad_files")
    tok = root / "tok.model"
    shutil.copyfile(tokenizer_path(VOCAB), tok)
    t = Tokenizer(tok)
    write_docs(str(root / "good"), [t.encode(x, eos=True) for x in sample_texts(60, seed=3)])
    rng = np.random.default_rng(0)
    write_docs(str(root / "oov"), [rng.integers(0, 2000, 40) for _ in range(30)])  # another tokenizer's ids
    cfg = ModelConfig.preset("tiny", vocab_size=VOCAB, n_layers=1, max_seq_len=64)
    state = LlamaForCausalLM(cfg, ParallelState(), seed=2).state_dict()
    save_consolidated(state, cfg, root / "cons")
    shutil.copyfile(tok, root / "cons" / "tokenizer.model")
    save_hf(state, cfg, root / "hf")
    small = ModelConfig.preset("tiny", vocab_size=256, n_layers=1, max_seq_len=64)
    save_consolidated(LlamaForCausalLM(small, ParallelState(), seed=2).state_dict(), small, root / "small")
    shutil.copyfile(tok, root / "small" / "tokenizer.model")  # 320 tokens for a 256-token model
    return root


def one_line(msg: str, *names) -> None:
    assert msg.strip() and "\n" not in msg and "Traceback" not in msg, msg
    assert any(str(n) in msg for n in names), (names, msg)


def snapshot(directory: Path):
    return {p: p.read_bytes() for p in Path(directory).rglob("*") if p.is_file()}


BYTES = st.tuples(st.sampled_from(["flip", "overwrite", "truncate", "extend", "zero"]), st.integers(0, 2**31),
                  st.binary(min_size=1, max_size=16))


def corrupt(path: Path, how) -> None:
    kind, pos, junk = how
    b = bytearray(path.read_bytes())
    i = pos % max(len(b), 1)
    if kind == "flip" and b:
        b[i] ^= 1 << (pos % 8)
    elif kind == "overwrite":
        b[i:i + len(junk)] = junk
    elif kind == "truncate":
        b = b[:i]
    elif kind == "extend":
        b += junk
    else:
        b[i:i + 64] = bytes(min(64, len(b) - i))
    path.write_bytes(bytes(b))


def _cli(capsys, *argv):
    from megallama.cli import main

    capsys.readouterr()
    rc = main([str(a) for a in argv])
    out = capsys.readouterr()
    return rc, out.out, out.err


# ---------------------------------------------------------------------------- token files
@settings(FAST, max_examples=60)
@given(which=st.sampled_from(["idx", "bin"]), how=BYTES)
def test_corrupt_token_files(files, capsys, which, how):
    from megallama.config import load_run_config
    from megallama.data import build_datasets, prepare_data

    with tempfile.TemporaryDirectory() as tmp:
        prefix = Path(tmp) / "data"
        for ext in ("idx", "bin"):
            shutil.copyfile(files / f"good.{ext}", f"{prefix}.{ext}")
        corrupt(Path(f"{prefix}.{which}"), how)
        before = snapshot(tmp)
        rc, out, err = _cli(capsys, "data-stats", prefix, "--tokenizer", files / "tok.model")
        assert rc == 0 or (rc == 2 and not out), (rc, out, err)
        if rc:
            one_line(err.removeprefix("megallama data-stats: error: ").rstrip("\n"), prefix)
        # what `megallama train` does with data.prefixes before any process group exists
        cfg = load_run_config(data={"run_dir": str(Path(tmp) / "run"), "model": {"preset": "tiny", "vocab_size": VOCAB},
                                    "train": {"seq_len": 16},
                                    "data": {"prefixes": [str(prefix)], "tokenizer": str(files / "tok.model"),
                                             "split": "1"}})
        try:
            build_datasets(cfg, prepare_data(cfg))
        except UserError as exc:
            one_line(str(exc), prefix)
            assert rc == 2 or "tokens, fewer than train.seq_len" in str(exc), (err, exc)
        assert {p: b for p, b in snapshot(tmp).items() if "run" not in p.parts[-3:]} == before  # inputs untouched


def test_index_with_a_document_index_out_of_range_is_one_line(files, capsys, tmp_path):
    from megallama.data import IndexedTokens

    n = IndexedTokens(str(files / "good")).num_sequences
    prefix = tmp_path / "data"
    shutil.copyfile(files / "good.bin", f"{prefix}.bin")
    b = bytearray((files / "good.idx").read_bytes())
    doc1 = 9 + 8 + 1 + 8 + 8 + n * 4 + n * 8 + 8  # Megatron MMIDIDX: header, sizes, pointers, doc_idx[1]
    b[doc1:doc1 + 8] = (n + 2000).to_bytes(8, "little")
    Path(f"{prefix}.idx").write_bytes(bytes(b))
    rc, out, err = _cli(capsys, "data-stats", prefix)
    assert rc == 2 and not out
    one_line(err.removeprefix("megallama data-stats: error: ").rstrip("\n"), f"{prefix}.idx")


# ------------------------------------------------------------------------------ tokenizers
@settings(FAST, max_examples=60)
@given(how=BYTES)
def test_corrupt_tokenizer(files, capsys, how):
    with tempfile.TemporaryDirectory() as tmp:
        tok = Path(tmp) / "tok.model"
        shutil.copyfile(files / "tok.model", tok)
        corrupt(tok, how)
        before = tok.read_bytes()
        rc, out, err = _cli(capsys, "data-stats", files / "good", "--tokenizer", tok)
        assert rc == 0 or (rc == 2 and not out), (rc, out, err)
        if rc:
            one_line(err.removeprefix("megallama data-stats: error: ").rstrip("\n"), tok, files / "good")
        assert tok.read_bytes() == before


def test_tokenizer_with_invalid_utf8_piece_is_one_line(files, capsys, tmp_path):
    b = (files / "tok.model").read_bytes()
    assert b"<0x41>" in b  # a byte-fallback piece
    bad = tmp_path / "bad.model"
    bad.write_bytes(b.replace(b"<0x41>", b"<\x86x41>", 1))  # same length: the protobuf stays well-formed
    rc, out, err = _cli(capsys, "data-stats", files / "good", "--tokenizer", bad)
    assert rc == 2 and not out
    one_line(err.removeprefix("megallama data-stats: error: ").rstrip("\n"), bad)


# ----------------------------------------------------------------------------- checkpoints
def load_and_build(path):
    from megallama.checkpoint.pretrained import build_for_inference, load_checkpoint
    cfg, state, _ = load_checkpoint(path)
    build_for_inference(cfg, state)


VALUES = st.one_of(st.none(), st.booleans(), st.integers(-3, 600), st.integers(-2**64, 2**64),
                   st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=6),
                   st.lists(st.integers(0, 3), max_size=2), st.dictionaries(st.text(max_size=4), st.integers(),
                                                                            max_size=2))
CONS_KEYS = ["arch", "dim", "n_layers", "n_encoder_layers", "n_heads", "n_kv_heads", "vocab_size", "multiple_of",
             "ffn_dim_multiplier", "norm_eps", "rope_theta", "max_seq_len", "dropout", "init_std", "num_labels",
             "unknown_key"]
HF_KEYS = ["model_type", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
           "num_key_value_heads", "head_dim", "vocab_size", "max_position_embeddings", "rms_norm_eps", "rope_theta",
           "rope_scaling", "rope_parameters", "hidden_act", "tie_word_embeddings", "attention_bias"]


@settings(FAST, max_examples=80)
@example(kind="cons", edits=[(8, 1.35240059191419e+16, False)])  # an FFN width past int64 (found by CI)
@example(kind="cons", edits=[(1, 2**63, False)])
@example(kind="hf", edits=[(2, 2**62, False)])
@given(kind=st.sampled_from(["cons", "hf"]), edits=st.lists(st.tuples(st.integers(0, 99), VALUES, st.booleans()),
                                                           min_size=1, max_size=2))
def test_mutated_checkpoint_configs(files, kind, edits):
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = Path(tmp) / kind
        shutil.copytree(files / kind, ckpt)
        meta = json.loads((ckpt / "config.json").read_text())
        node, keys = (meta["model"], CONS_KEYS) if kind == "cons" else (meta, HF_KEYS)
        for i, value, delete in edits:
            key = keys[i % len(keys)]
            if delete:
                node.pop(key, None)
            else:
                node[key] = value
        (ckpt / "config.json").write_text(json.dumps(meta))
        before = snapshot(ckpt)
        try:
            load_and_build(ckpt)
        except UserError as exc:
            one_line(str(exc), ckpt)
        assert snapshot(ckpt) == before


@settings(FAST, max_examples=40)
@given(kind=st.sampled_from(["cons", "hf"]), target=st.sampled_from(["model.safetensors", "config.json"]), how=BYTES)
def test_corrupt_checkpoint_bytes(files, kind, target, how):
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = Path(tmp) / kind
        shutil.copytree(files / kind, ckpt)
        corrupt(ckpt / target, how)
        try:
            load_and_build(ckpt)
        except UserError as exc:
            one_line(str(exc), ckpt)


def test_checkpoint_tensor_dtype_and_count_mismatch(files, tmp_path):
    from safetensors.torch import load_file, save_file

    ckpt = tmp_path / "cons"
    shutil.copytree(files / "cons", ckpt)
    state = load_file(str(ckpt / "model.safetensors"))
    save_file({k: v.to(torch.int32) for k, v in state.items()}, str(ckpt / "model.safetensors"))
    with pytest.raises(UserError, match="model.safetensors: tensor '.*' has dtype int32"):
        load_and_build(ckpt)
    save_file(state, str(ckpt / "model.safetensors"))
    meta = json.loads((ckpt / "config.json").read_text())
    meta["model"]["n_layers"] = 10**6  # building a meta model this deep would never finish
    (ckpt / "config.json").write_text(json.dumps(meta))
    with pytest.raises(UserError, match="declares .* parameters .* but the weight files hold only"):
        load_and_build(ckpt)


# ------------------------------------------------------------------------------- mismatches
def test_data_from_another_tokenizer(files, capsys, tmp_path):
    from megallama.config import load_run_config
    from megallama.data import prepare_data

    rc, out, err = _cli(capsys, "data-stats", files / "oov", "--tokenizer", files / "tok.model")
    assert rc == 2 and "oov.bin: token id" in err and "another tokenizer" in err and len(err.splitlines()) == 1
    cfg = load_run_config(data={"run_dir": str(tmp_path / "run"), "model": {"preset": "tiny", "vocab_size": VOCAB},
                                "data": {"prefixes": [str(files / "oov")], "tokenizer": str(files / "tok.model")}})
    with pytest.raises(UserError, match="oov.bin: token id .* is outside the vocabulary"):
        prepare_data(cfg)
    cfg = load_run_config(data={"run_dir": str(tmp_path / "run"), "model": {"preset": "tiny", "vocab_size": 256},
                                "data": {"prefixes": [str(files / "good")], "tokenizer": str(files / "tok.model")}})
    with pytest.raises(UserError, match="tok.model: tokenizer has 320 tokens but model.vocab_size is 256"):
        prepare_data(cfg)


def _cli_single(capsys, monkeypatch, *argv):
    for key, value in dict(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0").items():
        monkeypatch.setenv(key, value)
    return _cli(capsys, *argv)


def test_generate_and_eval_refuse_mismatches_before_start_up(files, capsys, monkeypatch):
    rc, out, err = _cli_single(capsys, monkeypatch, "generate", "--checkpoint", files / "small", "--prompt", "hi")
    assert rc == 2 and "tokenizer has 320 tokens but the model's vocab_size is 256" in err, err
    rc, out, err = _cli_single(capsys, monkeypatch, "eval", "--checkpoint", files / "cons", "--data", files / "good",
                               "--seq-len", 65)
    assert rc == 2 and err.strip() == "megallama eval: error: --seq-len: 65 exceeds the checkpoint's max_seq_len=64"
    rc, out, err = _cli_single(capsys, monkeypatch, "generate", "--checkpoint", files / "cons", "--prompt", "hi",
                               "--max-new-tokens", 70)
    assert rc == 2 and "exceed the model's max_seq_len=64" in err and len(err.splitlines()) == 1


def test_eval_of_data_from_another_tokenizer_is_one_line(files, capsys, monkeypatch):
    """eval starts its process group before reading the data: a one-rank gloo group stands in for
    DeepSpeed's comm start-up (tests/test_eval.py starts it the real way)."""
    import torch.distributed as dist

    def one_process_group(timeout_s=300, info=None):
        from megallama.train.distributed import detect_launcher

        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
        return info or detect_launcher()

    monkeypatch.setattr("megallama.train.distributed.init_distributed", one_process_group)
    try:
        rc, out, err = _cli_single(capsys, monkeypatch, "eval", "--checkpoint", files / "cons", "--data",
                                   files / "oov", "--seq-len", 16)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    lines = err.strip().splitlines()
    assert rc == 2 and len(lines) == 1, err
    assert "oov.bin: token id" in lines[0] and "outside the model's vocabulary (vocab_size 320)" in lines[0]


# ------------------------------------------------------------------------------ atomic writes
@pytest.mark.parametrize("writer", ["consolidated", "hf"])
def test_an_interrupted_checkpoint_write_leaves_the_old_output_and_no_debris(files, tmp_path, monkeypatch, writer):
    """``convert`` writes into a temporary directory renamed into place: Ctrl-C (or any error)
    mid-write leaves the existing output as it was and no partial directory behind."""
    from megallama.checkpoint import streaming
    from megallama.checkpoint.consolidated import load_consolidated, save_consolidated
    from megallama.checkpoint.hf import save_hf

    cfg, state = load_consolidated(files / "cons")
    out = tmp_path / "out"
    out.mkdir()
    (out / "config.json").write_text("the previous output")

    written = []

    def interrupted(fh, name, t):  # Ctrl-C after the first tensor's bytes: a partial file exists
        if written:
            raise KeyboardInterrupt
        written.append(name)
        write_tensor(fh, name, t)

    write_tensor = streaming.write_tensor
    monkeypatch.setattr(streaming, "write_tensor", interrupted)
    with pytest.raises(KeyboardInterrupt):
        (save_consolidated if writer == "consolidated" else save_hf)(state, cfg, out, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert snapshot(out) == {out / "config.json": b"the previous output"}


# ------------------------------------------------------------- hostile sizes, damaged metadata
GIB16 = 16 << 30


def _peak_rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _sparse_safetensors(path: Path, name: str, shape) -> None:
    """A header declaring a huge tensor with consistent offsets over a sparse file (no disk used)."""
    import math
    import struct

    nbytes = math.prod(shape) * 4
    header = json.dumps({name: {"dtype": "F32", "shape": list(shape), "data_offsets": [0, nbytes]}}).encode()
    with open(path, "wb") as fh:
        fh.write(struct.pack("<Q", len(header)) + header)
        fh.truncate(8 + len(header) + nbytes)


@pytest.fixture(scope="module")
def training_ckpt(files, tmp_path_factory):
    """A training checkpoint (universal/ at TP=2) made from the consolidated one, no training run."""
    from megallama.checkpoint.reshard import from_consolidated

    out = tmp_path_factory.mktemp("hostile") / "train"
    from_consolidated(files / "cons", out, tp=2, pp=1)
    return out


def _tag_of(ckpt: Path) -> Path:
    return next(ckpt.glob("step*"))


def _resume_reads(ckpt: Path) -> None:
    from megallama.train import checkpoint as ckpt_mod
    from megallama.train.universal import UniversalReader
    from megallama.train.unpickle_gate import check_safe_to_unpickle

    tag = ckpt_mod.find_resumable(ckpt)
    check_safe_to_unpickle(tag)
    ckpt_mod.read_meta(tag)
    reader = UniversalReader(tag / "universal")
    for name in reader.names():
        reader.full(name)


@pytest.mark.parametrize("kind", ["universal", "hf", "cons"])
def test_a_16_gib_tensor_declared_over_a_sparse_file_is_refused_unallocated(files, training_ckpt, tmp_path, kind):
    from megallama.train.universal import UniversalReader

    if kind == "universal":
        root = tmp_path / "train"
        shutil.copytree(training_ckpt, root)
        target, name = _tag_of(root) / "universal" / "pp00-tp00.safetensors", "tok_embeddings.weight"
    else:
        root = tmp_path / kind
        shutil.copytree(files / kind, root)
        target = root / "model.safetensors"
        name = "model.embed_tokens.weight" if kind == "hf" else "tok_embeddings.weight"
    _sparse_safetensors(target, name, (1 << 20, 4096))
    assert target.stat().st_size > GIB16 and target.stat().st_blocks * 512 < 1 << 20
    before = _peak_rss_mb()
    with pytest.raises(UserError) as exc:  # (hashing 16 GiB for a manifest is slow: the reader directly)
        UniversalReader(target.parent) if kind == "universal" else load_and_build(root)
    one_line(str(exc.value), target.name)
    assert _peak_rss_mb() - before < 1024, "allocated what the header claimed"


@pytest.mark.parametrize("edit,needle", [
    (lambda layout: layout.update(tp=10**9), "'tp' must be an integer in 1..4096"),
    (lambda layout: layout.update(tp="2"), "'tp' must be an integer"),
    (lambda layout: layout["model"].update(dim=2**20, n_heads=8), "needs at least"),
    (lambda layout: layout["model"].update(n_layers=2**30), "needs at least"),
    (lambda layout: layout["model"].update(max_seq_len=2**31 - 1), "needs at least"),
    (lambda layout: layout.update(model=[1]), "'model' must be an object"),
    (lambda layout: layout.pop("model"), "'model' must be an object"),
    (lambda layout: layout["model"].update(norm_eps="abc"), "model.norm_eps"),
])
def test_a_layout_file_with_hostile_sizes_is_one_line(training_ckpt, tmp_path, edit, needle):
    """The layout's model decides what eval/generate build: checked (bounds, memory) first."""
    from megallama.checkpoint.pretrained import from_pretrained
    from megallama.train.checkpoint import write_manifest

    root = tmp_path / "train"
    shutil.copytree(training_ckpt, root)
    path = _tag_of(root) / "universal" / "layout.json"
    layout = json.loads(path.read_text())
    edit(layout)
    path.write_text(json.dumps(layout))
    write_manifest(_tag_of(root))
    before = _peak_rss_mb()
    for load in (_resume_reads, from_pretrained):
        with pytest.raises(UserError) as exc:
            load(root)
        one_line(str(exc.value), "layout.json")
        assert needle in str(exc.value), str(exc.value)
    assert _peak_rss_mb() - before < 1024


@pytest.mark.parametrize("target,content,needle", [
    ("manifest.json", "[1, 2]", "expected a JSON object"),
    ("manifest.json", '{"files": [1]}', "'files' must be an object"),
    ("manifest.json", '{"files": {"meta.json": 3}}', "needs an integer 'bytes'"),
    ("manifest.json", '{"files": {"../../etc/passwd": {"bytes": 1, "sha256": "x"}}}', "not a path inside"),
    ("manifest.json", "{not json", "not valid JSON"),
    ("meta.json", "{not json", "not valid JSON"),
    ("meta.json", '{"step": 1, "consumed_samples": 0}', "'model' must be an object"),
    ("meta.json", '{"model": {}, "step": "1", "consumed_samples": 0}', "'step' must be a non-negative integer"),
    ("universal/pp00-tp00.index.json", '{"nope": {"split_dim": null, "fused_sizes": null}}', "is not in the layout"),
    ("universal/pp00-tp00.index.json", "\xff\xfe", "not valid JSON"),
    ("universal/pp00-tp01.safetensors", "garbage", "not a safetensors file"),
    ("universal/layout.json", "null", "expected a JSON object"),
])
def test_damaged_checkpoint_metadata_is_one_line(training_ckpt, tmp_path, target, content, needle):
    from megallama.train.checkpoint import write_manifest

    root = tmp_path / "train"
    shutil.copytree(training_ckpt, root)
    tag = _tag_of(root)
    (tag / target).write_text(content)
    if target != "manifest.json":
        write_manifest(tag)
    with pytest.raises(UserError) as exc:
        _resume_reads(root)
    one_line(str(exc.value), Path(target).name)
    assert needle in str(exc.value), str(exc.value)


def test_latest_naming_a_path_outside_is_one_line(training_ckpt, tmp_path):
    root = tmp_path / "train"
    shutil.copytree(training_ckpt, root)
    for bad in (b"../../etc", b"", b"\xff", b"a/../.."):
        (root / "latest").write_bytes(bad)
        with pytest.raises(UserError) as exc:
            _resume_reads(root)
        one_line(str(exc.value), "latest")


def test_an_idx_claiming_1e8_documents_over_a_sparse_file_is_refused(files, tmp_path):
    import struct

    from megallama.data import IndexedTokens
    from megallama.data.indexed import HEADER

    n = 10**8
    prefix = tmp_path / "big"
    shutil.copyfile(files / "good.bin", str(prefix) + ".bin")
    with open(str(prefix) + ".idx", "wb") as fh:
        fh.write(HEADER + struct.pack("<QBQQ", 1, 8, n, n + 1))
        fh.truncate(34 + n * 12 + (n + 1) * 8)
    before = _peak_rss_mb()
    with pytest.raises(UserError) as exc:
        IndexedTokens(str(prefix))
    one_line(str(exc.value), "big.idx")
    assert "claims 100000000 sequences" in str(exc.value)
    assert _peak_rss_mb() - before < 256


def test_hf_config_with_a_bad_value_names_the_key_and_value(files, tmp_path):
    root = tmp_path / "hf"
    shutil.copytree(files / "hf", root)
    cfg = json.loads((root / "config.json").read_text())
    cfg["rms_norm_eps"] = "abc"
    (root / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UserError) as exc:
        load_and_build(root)
    one_line(str(exc.value), "config.json")
    assert "rms_norm_eps" in str(exc.value) and "'abc'" in str(exc.value), str(exc.value)


def test_meta_directory_missing_a_shard_names_the_file(files, tmp_path):
    """Meta splits Wq's rows over its files: one file of a two-file release names the other."""
    from megallama.checkpoint.meta import half_to_interleaved  # noqa: F401 - the layout the files use
    from megallama.checkpoint.meta import load_meta

    meta = tmp_path / "meta"
    meta.mkdir()
    (meta / "params.json").write_text(json.dumps({"dim": 128, "n_layers": 1, "n_heads": 4, "vocab_size": 320}))
    torch.save({"layers.0.attention.wq.weight": torch.zeros(64, 128), "tok_embeddings.weight": torch.zeros(320, 64)},
               meta / "consolidated.00.pth")
    with pytest.raises(UserError) as exc:
        load_meta(meta)
    one_line(str(exc.value), "consolidated.01.pth")
    assert "missing" in str(exc.value)
    torch.save({"x": torch.zeros(1)}, meta / "consolidated.02.pth")  # a gap in the numbering
    with pytest.raises(UserError) as exc:
        load_meta(meta)
    one_line(str(exc.value), "consolidated.01.pth")
