"""Fuzzing every file format megallama reads, under a memory and a time limit.

hypothesis mutates real files (a training checkpoint's manifest, meta, layout, index and
safetensors files, consolidated / Hugging Face / Meta checkpoints, safetensors headers rewritten
with consistent lengths, ``.idx`` headers, a SentencePiece tokenizer, a run-config YAML): bytes
flipped, overwritten, truncated, extended, and JSON values replaced with huge, negative, wrong-type
or missing ones. Each case runs in a forked child under ``RLIMIT_AS`` (address space: what it
had plus ``LIMIT_MB``) and a wall-clock limit, and must end in success or one
:class:`~megallama.errors.UserError` line: never a traceback, never over a limit.

Derandomized in CI (``tests/conftest.py``); ``HYPOTHESIS_PROFILE=explore FUZZ_EXAMPLES=N`` explores
afresh, and ``FUZZ_REPORT=path`` appends each target's tallies (cases, clean, over a limit) there.
"""
from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import struct
import tempfile
import time
from collections import Counter
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, Phase, example, given, settings
from hypothesis import strategies as st

from megallama.errors import UserError

LIMIT_MB = 1536  # beyond what the process already maps: a tiny checkpoint needs a few MB
LIMIT_S = 20
EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "12"))
FUZZ = settings(deadline=None, max_examples=EXAMPLES, database=None, phases=[Phase.explicit, Phase.generate],
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
TALLY: dict = {}


# ------------------------------------------------------------------------------- the files
@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """One of each file kind, all tiny and real (written by megallama's own writers)."""
    import yaml

    from megallama import LlamaForCausalLM, ModelConfig
    from megallama.checkpoint import save_consolidated
    from megallama.checkpoint.hf import save_hf
    from megallama.checkpoint.meta import half_to_interleaved
    from megallama.checkpoint.reshard import from_consolidated
    from megallama.data.tokenizer import Tokenizer
    from megallama.parallel import ParallelState
    from tests.conftest_data import sample_texts, tokenizer_path, write_docs

    from megallama.train import checkpoint, ds_config, universal, unpickle_gate  # noqa: F401 - imported once, before the forks
    import deepspeed  # noqa: F401

    unpickle_gate.deepspeed_record_types()
    root = tmp_path_factory.mktemp("fuzz")
    cfg = ModelConfig.preset("tiny", vocab_size=320, n_layers=1, max_seq_len=64)
    state = LlamaForCausalLM(cfg, ParallelState(), seed=0).state_dict()
    save_consolidated(state, cfg, root / "cons")
    save_hf(state, cfg, root / "hf")
    from_consolidated(root / "cons", root / "train", tp=2, pp=1)
    meta = root / "meta"
    meta.mkdir()
    (meta / "params.json").write_text(json.dumps({"dim": cfg.dim, "n_layers": 1, "n_heads": cfg.n_heads,
                                                  "vocab_size": 320, "multiple_of": cfg.multiple_of}))
    q, kv, hidden = cfg.n_heads * cfg.head_dim, cfg.kv_heads * cfg.head_dim, cfg.ffn_hidden_size
    wq, wk, wv = state["layers.0.attention.wqkv.weight"].split([q, kv, kv])
    w1, w3 = state["layers.0.feed_forward.w13.weight"].split([hidden, hidden])
    torch.save({"tok_embeddings.weight": state["tok_embeddings.weight"], "norm.weight": state["norm.weight"],
                "output.weight": state["output.weight"],
                "layers.0.attention.wq.weight": half_to_interleaved(wq, cfg.n_heads),
                "layers.0.attention.wk.weight": half_to_interleaved(wk, cfg.kv_heads),
                "layers.0.attention.wv.weight": wv,
                "layers.0.attention.wo.weight": state["layers.0.attention.wo.weight"],
                "layers.0.feed_forward.w1.weight": w1, "layers.0.feed_forward.w3.weight": w3,
                "layers.0.feed_forward.w2.weight": state["layers.0.feed_forward.w2.weight"],
                "layers.0.attention_norm.weight": state["layers.0.attention_norm.weight"],
                "layers.0.ffn_norm.weight": state["layers.0.ffn_norm.weight"]}, meta / "consolidated.00.pth")
    shutil.copyfile(tokenizer_path(320), root / "tok.model")
    t = Tokenizer(root / "tok.model")
    write_docs(str(root / "tokens"), [t.encode(x, eos=True) for x in sample_texts(20, seed=1)])
    (root / "run.yaml").write_text(yaml.safe_dump({
        "model": {"preset": "tiny", "vocab_size": 320, "max_seq_len": 64}, "parallel": {"tp": 1, "pp": 1},
        "train": {"steps": 2, "seq_len": 32, "micro_batch_size": 2, "global_batch_size": 4},
        "data": {"prefixes": [str(root / "tokens")], "tokenizer": str(root / "tok.model")},
        "checkpoint": {"every": 0}}))
    return root


def _tag(root: Path) -> Path:
    return next((root / "train").glob("step*"))


# ------------------------------------------------------------------------------ the readers
def _load_checkpoint(path):
    from megallama.checkpoint.pretrained import from_pretrained

    from_pretrained(path)


def _resume_training(root):
    """What `train` reads resuming from a training checkpoint (any layout), then consolidation."""
    from megallama.checkpoint.pretrained import from_pretrained
    from megallama.train import checkpoint as ckpt
    from megallama.train.universal import UniversalReader
    from megallama.train.unpickle_gate import check_safe_to_unpickle

    found = ckpt.find_resumable(root / "train")
    check_safe_to_unpickle(found)
    ckpt.read_meta(found)
    reader = UniversalReader(found / "universal")
    for name in reader.names():
        reader.full(name, "exp_avg")
    from_pretrained(root / "train")


def _read_tokens(root):
    from megallama.data import IndexedTokens

    ds = IndexedTokens(str(root / "tokens"))
    ds.verify()
    for d in range(min(len(ds), 3)):
        ds[d].sum()
    ds.max_token_id()


def _read_tokenizer(root):
    from megallama.data.tokenizer import Tokenizer

    t = Tokenizer(root / "tok.model")
    t.decode(t.encode("hello world, fuzz", eos=True))


def _read_yaml(root):
    from megallama.config import load_run_config
    from megallama.train.ds_config import build_ds_config

    cfg = load_run_config(root / "run.yaml")
    build_ds_config(cfg, 1)


# target -> (file under the corpus, how its bytes are mutated, the reader, rewrite the manifest)
TARGETS = {
    "manifest.json": (lambda r: _tag(r) / "manifest.json", "json", _resume_training, False),
    "meta.json": (lambda r: _tag(r) / "meta.json", "json", _resume_training, True),
    "layout.json": (lambda r: _tag(r) / "universal" / "layout.json", "json", _resume_training, True),
    "universal index": (lambda r: _tag(r) / "universal" / "pp00-tp01.index.json", "json", _resume_training, True),
    "universal safetensors header": (lambda r: _tag(r) / "universal" / "pp00-tp00.safetensors", "header",
                                     _resume_training, True),
    "universal safetensors bytes": (lambda r: _tag(r) / "universal" / "pp00-tp01.safetensors", "bytes",
                                    _resume_training, True),
    "consolidated config.json": (lambda r: r / "cons" / "config.json", "json", lambda r: _load_checkpoint(r / "cons"),
                                 False),
    "consolidated safetensors header": (lambda r: r / "cons" / "model.safetensors", "header",
                                        lambda r: _load_checkpoint(r / "cons"), False),
    "hf config.json": (lambda r: r / "hf" / "config.json", "json", lambda r: _load_checkpoint(r / "hf"), False),
    "hf safetensors header": (lambda r: r / "hf" / "model.safetensors", "header",
                              lambda r: _load_checkpoint(r / "hf"), False),
    "meta params.json": (lambda r: r / "meta" / "params.json", "json", lambda r: _load_checkpoint(r / "meta"), False),
    "meta .pth bytes": (lambda r: r / "meta" / "consolidated.00.pth", "bytes", lambda r: _load_checkpoint(r / "meta"),
                        False),
    ".idx header": (lambda r: r / "tokens.idx", "idx", _read_tokens, False),
    ".idx bytes": (lambda r: r / "tokens.idx", "bytes", _read_tokens, False),
    "tokenizer": (lambda r: r / "tok.model", "bytes", _read_tokenizer, False),
    "run config YAML": (lambda r: r / "run.yaml", "bytes", _read_yaml, False),
}


# ---------------------------------------------------------------------------- the mutations
HOSTILE = st.one_of(st.sampled_from([0, -1, 1, 2, 10**9, 2**31, 2**31 - 1, 2**40, 2**63, 2**64 + 1, -2**63, 1e308,
                                     float("nan"), "abc", "", None, True, [], {}, [10**9], [2**40, 2**40]]),
                    st.integers(), st.text(max_size=8), st.lists(st.integers(-4, 2**34), max_size=4))
BYTE_EDITS = st.lists(st.tuples(st.sampled_from(["flip", "overwrite", "truncate", "extend", "zero"]),
                                st.integers(0, 2**31), st.binary(min_size=1, max_size=16)), min_size=1, max_size=3)
JSON_EDITS = st.lists(st.tuples(st.integers(0, 10**6), HOSTILE, st.booleans()), min_size=1, max_size=3)


def _edit_bytes(b: bytes, edits) -> bytes:
    b = bytearray(b)
    for kind, pos, junk in edits:
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
            b[i:i + 64] = bytes(min(64, max(len(b) - i, 0)))
    return bytes(b)


def _slots(node, path=()):
    """Every (container, key) in a JSON document, depth first."""
    if isinstance(node, dict):
        for k, v in node.items():
            yield node, k
            yield from _slots(v, path + (k,))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield node, i
            yield from _slots(v, path + (i,))


def _edit_json(doc, edits):
    for pick, value, delete in edits:
        slots = list(_slots(doc))
        if not slots:
            return value
        node, key = slots[pick % len(slots)]
        if delete and isinstance(node, dict):
            node.pop(key, None)
        else:
            node[key] = value
    return doc


def mutate(path: Path, mode: str, json_edits, byte_edits) -> None:
    raw = path.read_bytes()
    if mode == "bytes":
        path.write_bytes(_edit_bytes(raw, byte_edits))
    elif mode == "json":
        path.write_text(json.dumps(_edit_json(json.loads(raw), json_edits)))
    elif mode == "header":  # a rewritten safetensors header, its length kept consistent
        n = struct.unpack("<Q", raw[:8])[0]
        header = _edit_json(json.loads(raw[8:8 + n]), json_edits)
        text = json.dumps(header).encode()
        path.write_bytes(struct.pack("<Q", len(text)) + text + raw[8 + n:])
    elif mode == "idx":  # hostile counts in the header, the rest as it was
        values = list(struct.unpack("<QBQQ", raw[9:34]))
        for pick, value, _ in json_edits:
            if isinstance(value, int) and not isinstance(value, bool):
                values[pick % 4] = value % (2**8 if pick % 4 == 1 else 2**64)
        path.write_bytes(raw[:9] + struct.pack("<QBQQ", *values) + _edit_bytes(raw[34:], byte_edits[:1]))


# ------------------------------------------------------------------------------ one case
def run_limited(fn, *args) -> tuple:
    """``fn(*args)`` in a forked child under the memory and time limits: ``(outcome, detail)``
    with outcome 'ok', 'one-line', 'traceback', 'memory' or 'time'."""
    rd, wr = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns
        os.close(rd)
        code, text = 0, ""
        try:
            with open("/proc/self/statm") as fh:
                mapped = int(fh.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
            resource.setrlimit(resource.RLIMIT_AS, (mapped + (LIMIT_MB << 20),) * 2)
            # the parent's OpenMP pool did not survive the fork (earlier tests in this process ran
            # torch ops on it); a parallel region would wait on it forever, so run ops inline
            torch.set_num_threads(1)
            signal.alarm(LIMIT_S)
            fn(*args)
        except UserError as exc:
            code, text = 3, str(exc)
        except MemoryError:
            code, text = 5, "MemoryError"
        except BaseException as exc:  # noqa: BLE001 - any other escape is the failure being looked for
            import traceback

            code = 5 if "alloc" in str(exc).lower() else 4
            text = "".join(traceback.format_exception(exc))[-3000:]
        os.write(wr, text.encode(errors="replace")[:60000])
        os._exit(code)
    os.close(wr)
    deadline = time.time() + LIMIT_S + 10
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if time.time() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            os.close(rd)
            return "time", f"over {LIMIT_S}s"
        time.sleep(0.01)
    with os.fdopen(rd, "rb") as fh:
        text = fh.read().decode(errors="replace")
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        return ("time" if sig == signal.SIGALRM else "traceback"), f"killed by signal {sig}"
    code = os.WEXITSTATUS(status)
    return {0: "ok", 3: "one-line", 4: "traceback", 5: "memory"}.get(code, "traceback"), text


def _record(target: str, outcome: str) -> None:
    TALLY.setdefault(target, Counter())[outcome] += 1


@pytest.fixture(scope="module", autouse=True)
def report():
    yield
    path = os.environ.get("FUZZ_REPORT")
    if path and TALLY:
        with open(path, "a") as fh:
            fh.write(json.dumps({"profile": os.environ.get("HYPOTHESIS_PROFILE", "ci"), "examples": EXAMPLES,
                                 "limits": {"address_space_mb_over_start": LIMIT_MB, "seconds": LIMIT_S},
                                 "targets": {k: dict(v) for k, v in TALLY.items()}}) + "\n")


@pytest.mark.parametrize("target", sorted(TARGETS))
def test_fuzzed_file_is_read_or_refused_in_one_line(corpus, target):
    where, mode, reader, remanifest = TARGETS[target]

    @FUZZ
    @example(json_edits=[(0, 1, False)], byte_edits=[("overwrite", 1984709, b"n\x9cB")])  # tokenizer: eos_id -1
    @given(json_edits=JSON_EDITS, byte_edits=BYTE_EDITS)
    def case(json_edits, byte_edits):
        with tempfile.TemporaryDirectory() as tmp:
            root = Path(tmp) / "c"
            shutil.copytree(corpus, root, symlinks=True)
            mutate(where(root), mode, json_edits, byte_edits)
            if remanifest:  # whoever crafts the files can write a matching manifest
                from megallama.train.checkpoint import write_manifest

                write_manifest(_tag(root))
            outcome, detail = run_limited(reader, root)
            _record(target, outcome)
            assert outcome in ("ok", "one-line"), f"{target}: {outcome}\n{detail}"
            if outcome == "one-line":
                assert detail.strip() and "\n" not in detail and "Traceback" not in detail, detail

    case()


def test_the_limits_catch_what_they_are_for():
    """Controls: an allocation past the memory limit, a traceback and a hang are each caught."""
    assert run_limited(lambda: torch.empty(2 * (LIMIT_MB << 20), dtype=torch.uint8).fill_(1))[0] == "memory"
    assert run_limited(lambda: {}["model"])[0] == "traceback"
    assert run_limited(lambda: (_ for _ in ()).throw(UserError("x: bad")))[0] == "one-line"
    global LIMIT_S
    saved, LIMIT_S = LIMIT_S, 1
    try:
        assert run_limited(time.sleep, 30)[0] == "time"
    finally:
        LIMIT_S = saved
