"""Tokenizer files beyond SentencePiece: Hugging Face ``tokenizer.json`` and Meta's tiktoken-format
``tokenizer.model`` (Llama 3), told apart by content; token-for-token agreement with transformers
(and tiktoken) over real text (the stdlib's json package); Hugging Face exports that AutoTokenizer
and a loglikelihood through AutoModelForCausalLM read exactly as megallama does. No downloads: the
byte-level BPE is trained here with ``tokenizers``."""
import base64
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from megallama.data.bpe_tokenizer import LLAMA3_PATTERN, LLAMA3_SPECIAL_TOKENS, TiktokenTokenizer, TokenizerJson, \
    _bytes_to_unicode
from megallama.data.tokenizer import SentencePieceTokenizer, Tokenizer
from megallama.errors import UserError
from tests.conftest_data import cli, tokenizer_path, write_jsonl

EXTRA = "\ncafé naïve über ñ 日本語 😀 \t\t  tabs, 12345678 digits, \r\n CRLF, <|begin_of_text|> </s> as text\n"


@pytest.fixture(scope="module")
def corpus():
    src = Path(json.__file__).parent
    return [p.read_text(encoding="utf-8") for p in sorted(src.glob("*.py"))] + [EXTRA]


@pytest.fixture(scope="module")
def files(tmp_path_factory, corpus):
    """A byte-level BPE (Llama 3's split) as tokenizer.json, and the same vocabulary as a tiktoken file."""
    from tokenizers import Regex, decoders, models, pre_tokenizers, trainers
    from tokenizers import Tokenizer as HFTokenizer

    root = tmp_path_factory.mktemp("tok")
    tk = HFTokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(LLAMA3_PATTERN), behavior="isolated"),
                                                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tk.decoder = decoders.ByteLevel()
    tk.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=600, special_tokens=["<s>", "</s>"],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                       show_progress=False))
    (root / "json").mkdir()
    tk.save(str(root / "json" / "tokenizer.json"))
    byte = {c: b for b, c in _bytes_to_unicode().items()}
    plain = sorted((i, t) for t, i in tk.get_vocab().items() if t not in ("<s>", "</s>"))
    ranks = {bytes(byte[c] for c in t): r for r, (_, t) in enumerate(plain)}
    (root / "tiktoken.model").write_text("".join(f"{base64.b64encode(t).decode()} {r}\n" for t, r in ranks.items()))
    return {"json": root / "json" / "tokenizer.json", "tiktoken": root / "tiktoken.model", "ranks": ranks,
            "json_to_tiktoken": {i: r for r, (i, _) in enumerate(plain)}, "sp": Path(tokenizer_path())}


def test_kind_is_read_from_the_content(files, tmp_path):
    for key, kind in (("json", TokenizerJson), ("tiktoken", TiktokenTokenizer), ("sp", SentencePieceTokenizer)):
        renamed = tmp_path / f"{key}.bin"  # names say nothing
        renamed.write_bytes(files[key].read_bytes())
        assert type(Tokenizer(renamed)) is kind


def test_tokenizer_json_agrees_with_transformers(files, corpus):
    from transformers import PreTrainedTokenizerFast

    tok, hf = Tokenizer(files["json"]), PreTrainedTokenizerFast(tokenizer_file=str(files["json"]))
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.vocab_size) == (0, 1, -1, 600)  # <s>, </s> by name
    for text in corpus[:-1]:  # special-token strings aside (EXTRA), megallama reads them as text
        ids = tok.encode(text)
        assert ids == hf(text, add_special_tokens=False)["input_ids"] and len(ids) > 100
        assert tok.decode(ids) == text == hf.decode(ids)
    assert tok.encode("a</s>", bos=True, eos=True)[0] == 0 and tok.encode("a</s>", eos=True).count(1) == 1


def test_tokenizer_config_beside_the_json_names_the_special_tokens(files, tmp_path):
    (tmp_path / "tokenizer.json").write_bytes(files["json"].read_bytes())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": {"content": "<s>"}, "pad_token": "</s>"}))
    tok = Tokenizer(tmp_path / "tokenizer.json")
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (0, 0, 1)


def test_tiktoken_file_encodes_as_its_bpe_and_as_tiktoken(files, corpus):
    bpe, tik = Tokenizer(files["json"]), Tokenizer(files["tiktoken"])
    n = len(files["ranks"])
    assert (tik.vocab_size, tik.bos_id, tik.eos_id, tik.pad_id) == (n + 256, n, n + 1, -1)
    assert tik.piece_id("<|eot_id|>") == n + 9  # 128009 in Llama 3
    text = "\n".join(corpus)
    ids = tik.encode(text, bos=True, eos=True)
    assert ids[0] == n and ids[-1] == n + 1 and n not in ids[1:-1]  # "<|begin_of_text|>" in the text is text
    assert ids[1:-1] == [files["json_to_tiktoken"][i] for i in bpe.encode(text)]
    assert tik.decode(ids[1:-1]) == text
    tiktoken = pytest.importorskip("tiktoken")
    enc = tiktoken.Encoding("t", pat_str=LLAMA3_PATTERN, mergeable_ranks=files["ranks"],
                            special_tokens={t: n + i for i, t in enumerate(LLAMA3_SPECIAL_TOKENS)})
    assert ids[1:-1] == enc.encode(text, disallowed_special=())  # Meta's Tokenizer.encode: specials as text


def test_bad_files_are_one_line(files, tmp_path, capsys):
    good = files["tiktoken"].read_text().splitlines()
    cases = {
        "broken.json": ('{"version": "1.0", "model": ', "not a Hugging Face tokenizer.json"),
        "wrong.json": ('{"vocab": [1, 2]}', "not a Hugging Face tokenizer.json"),
        "line3.model": ("\n".join(good[:2] + ["QUJD? 2"] + good[3:]), "line 3: expected a base64 token and its rank"),
        "rank.model": ("\n".join(good[:-1] + [good[-1].split()[0] + " 99999"]), "ranks must be 0.."),
        "twice.model": ("\n".join(good + [good[0].split()[0] + f" {len(good)}"]), "appears twice"),
        "bytes.model": ("\n".join(f"{base64.b64encode(bytes([b])).decode()} {b}" for b in range(200)),
                        "byte 0xC8 is not a token"),
        "junk.model": ("\x08\x96\x01 neither protobuf nor text", "expected a SentencePiece model (protobuf), a "
                       "tiktoken-format file"),
    }
    for name, (content, message) in cases.items():
        path = tmp_path / name
        path.write_text(content)
        with pytest.raises(UserError, match=str(path)) as err:
            Tokenizer(path)
        assert message in str(err.value) and "\n" not in str(err.value), str(err.value)
    rc, out, err = cli(capsys, "data-stats", tmp_path / "x", "--tokenizer", tmp_path / "rank.model")
    assert rc == 2 and not out and len(err.strip().splitlines()) == 1


def test_preprocess_with_each_kind(files, corpus, tmp_path, capsys):
    from megallama.data.indexed import IndexedTokens

    src = write_jsonl(tmp_path / "docs.jsonl", corpus)
    for key, workers in (("json", 1), ("tiktoken", 2)):  # 2 workers: the tokenizer travels to spawned processes
        tok = Tokenizer(files[key])
        rc, _, err = cli(capsys, "preprocess", "--input", src, "--tokenizer", files[key], "--output-prefix",
                         tmp_path / key, "--workers", workers, "--prepend-bos", "--no-progress")
        assert rc == 0, err
        docs = IndexedTokens(str(tmp_path / key))
        assert len(docs) == len(corpus)
        for i, text in enumerate(corpus):
            assert np.asarray(docs[i]).tolist() == tok.encode(text, bos=True, eos=True)


def _export(tokenizer: Path, tmp_path, capsys):
    """(tokenizer, a tiny random consolidated model) and its ``convert --to hf`` in tmp_path/hf."""
    from megallama import ModelConfig
    from megallama.checkpoint import save_consolidated
    from megallama.model import LlamaForCausalLM
    from megallama.parallel import ParallelState

    tok = Tokenizer(tokenizer)
    cfg = ModelConfig(dim=32, n_layers=1, n_heads=4, n_kv_heads=2, vocab_size=tok.vocab_size + 8,  # more rows: fine
                      multiple_of=16, max_seq_len=512)
    save_consolidated(LlamaForCausalLM(cfg, ParallelState(), seed=1).state_dict(), cfg, tmp_path / "ours")
    rc, _, err = cli(capsys, "convert", "--to", "hf", "--input", tmp_path / "ours", "--output", tmp_path / "hf",
                     "--tokenizer", tokenizer)
    assert rc == 0, err
    return tok, tmp_path / "ours"


def _loglikelihood(model_dir: Path, ids: list, n_context: int) -> float:
    """megallama's log-probability of ids[n_context:] after ids[:n_context]."""
    from megallama import from_pretrained

    x = torch.tensor([ids])
    with torch.no_grad():
        logp = torch.log_softmax(from_pretrained(model_dir)(x)[0, :-1].float(), -1)
    return logp[n_context - 1:].gather(1, x[0, n_context:, None]).sum().item()


@pytest.mark.parametrize("kind", ["sp", "json", "tiktoken"])
def test_hf_export_tokenizes_and_scores_as_megallama(files, corpus, tmp_path, capsys, kind):
    """AutoTokenizer on the export adds BOS exactly as megallama does; a continuation's
    loglikelihood, as lm-evaluation-harness's ``hf`` model computes it (AutoTokenizer +
    AutoModelForCausalLM), equals megallama's on its own tokens."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    tok, ours_dir = _export(files[kind], tmp_path, capsys)
    hf_tok = AutoTokenizer.from_pretrained(tmp_path / "hf")
    for text in corpus[:-1] + ["", "x"]:
        assert hf_tok(text)["input_ids"] == tok.encode(text, bos=True)
    gen = GenerationConfig.from_pretrained(tmp_path / "hf")
    ids = (tok.bos_id, tok.eos_id)
    assert (gen.bos_token_id, gen.eos_token_id) == ids == (hf_tok.bos_token_id, hf_tok.eos_token_id)
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["bos_token_id"] == tok.bos_id
    again = Tokenizer(tmp_path / "hf" / ("tokenizer.model" if kind == "sp" else "tokenizer.json"))  # read back
    assert (again.bos_id, again.eos_id, again.encode(corpus[0])) == (tok.bos_id, tok.eos_id, tok.encode(corpus[0]))

    context, continuation = "def loads(s, *, cls=None", "):\n    return decoder.decode(s)"
    whole, ctx = hf_tok(context + continuation)["input_ids"], hf_tok(context)["input_ids"]
    assert whole[:len(ctx)] == ctx  # the split lm-eval makes (context, continuation tokens)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    x = torch.tensor([whole])
    with torch.no_grad():
        logp = torch.log_softmax(model(x).logits[0, :-1].float(), -1)
    theirs = logp[len(ctx) - 1:].gather(1, x[0, len(ctx):, None]).sum().item()
    assert abs(theirs - _loglikelihood(ours_dir, whole, len(ctx))) < 1e-4 and theirs < 0
    assert "tokenizer.json" in os.listdir(tmp_path / "hf") or kind == "sp"


def test_lm_eval_hf_model_reads_the_export(files, tmp_path, capsys):
    """lm-evaluation-harness's own ``hf`` model (HFLM), default settings, on a Llama 3-style export:
    its loglikelihoods are megallama's. Runs where lm_eval is installed (not a test dependency:
    it pulls in datasets, pandas, scikit-learn, ...)."""
    pytest.importorskip("lm_eval.models.huggingface")
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    tok, ours_dir = _export(files["tiktoken"], tmp_path, capsys)
    requests = [("def loads(s, *, cls=None", "):\n    return decoder.decode(s)"), ("The quick brown", " fox jumps")]
    lm = HFLM(pretrained=str(tmp_path / "hf"), device="cpu", batch_size=1, dtype="float32")
    results = lm.loglikelihood([Instance("loglikelihood", {}, r, i) for i, r in enumerate(requests)])
    for (context, continuation), (ll, _) in zip(requests, results):
        ids = tok.encode(context + continuation, bos=True)
        assert abs(ll - _loglikelihood(ours_dir, ids, len(tok.encode(context, bos=True)))) < 1e-4


def test_convert_and_generate_find_the_tokenizer(files, tmp_path, capsys, monkeypatch):
    """A consolidated copy keeps the tokenizer under its kind's name, ``generate`` finds it there;
    a tokenizer convert cannot honour is refused in one line with nothing written."""
    tok, ours = _export(files["json"], tmp_path, capsys)
    rc, _, err = cli(capsys, "convert", "--input", ours, "--output", tmp_path / "copy", "--tokenizer", files["json"])
    assert rc == 0, err
    assert (tmp_path / "copy" / "tokenizer.json").read_bytes() == files["json"].read_bytes()
    for key, value in dict(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0").items():
        monkeypatch.setenv(key, value)  # a single process, whatever launched pytest
    for where in ("copy", "hf"):
        rc, out, err = cli(capsys, "generate", "--checkpoint", tmp_path / where, "--prompt", "def f(",
                           "--max-new-tokens", 3, "--json")
        assert rc == 0, err
        assert json.loads(out)["results"][0]["completion"] == tok.decode(json.loads(out)["results"][0]["new_tokens"])
    too_big = files["tiktoken"]  # 854 tokens for a 608-row model
    for argv, message in ((["--to", "hf", "--tokenizer", too_big], "854 tokens but the model's vocab_size is 608"),
                          (["--tp", 1, "--tokenizer", files["json"]], "--tokenizer: a training checkpoint"),
                          (["--tokenizer", tmp_path / "nope.json"], "nope.json: tokenizer model not found")):
        rc, out, err = cli(capsys, "convert", "--input", ours, "--output", tmp_path / "refused", *argv)
        assert rc == 2 and message in err and len(err.strip().splitlines()) == 1, err
        assert not (tmp_path / "refused").exists()
