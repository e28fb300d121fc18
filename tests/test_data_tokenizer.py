"""Tokenizer: LLaMA conventions, LLaMA-way training, exact round trips, bad model files."""
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from megallama.data.tokenizer import Tokenizer, train_tokenizer
from megallama.errors import UserError
from tests.conftest_data import assert_one_line_error, cli, sample_texts, tokenizer_path, write_jsonl


@pytest.fixture(scope="module")
def tok():
    return Tokenizer(tokenizer_path())


def test_llama_special_ids(tok):
    # LLaMA's tokenizer.model: <unk>=0, <s>=1, </s>=2, no pad (-1); encode adds <s>/</s> only on request
    assert (tok.unk_id, tok.bos_id, tok.eos_id, tok.pad_id) == (0, 1, 2, -1)
    assert tok.eod_id == 2 and tok.vocab_size == 320
    ids = tok.encode("hello world")
    assert tok.encode("hello world", bos=True, eos=True) == [1] + ids + [2]
    assert tok.decode([1] + ids + [2]) == "hello world"


def test_trained_the_llama_way(tok):
    from sentencepiece import sentencepiece_model_pb2 as pb

    proto = pb.ModelProto.FromString(tok.proto)
    spec, norm = proto.trainer_spec, proto.normalizer_spec
    assert spec.model_type == pb.TrainerSpec.BPE and spec.byte_fallback and spec.split_digits
    assert norm.name == "identity" and norm.add_dummy_prefix and not norm.remove_extra_whitespaces
    pieces = [tok.sp.id_to_piece(i) for i in tok.encode("31415")]
    assert "".join(pieces).replace("\u2581", "") == "31415" and len(pieces) >= 5  # one piece per digit
    assert "<0xE2>" in [tok.sp.id_to_piece(i) for i in tok.encode("\u2603")]  # unseen char: UTF-8 bytes


@settings(max_examples=150, deadline=None)
@given(st.text(st.characters(blacklist_categories=("Cs",)), max_size=80))
def test_round_trip_any_text(tok, text):
    assert tok.decode(tok.encode(text)) == text


def test_round_trip_documents(tok):
    for text in sample_texts(50, seed=5):
        assert tok.decode(tok.encode(text)) == text


def test_bad_model_files(tmp_path):
    junk = tmp_path / "junk.model"
    junk.write_bytes(b"\x08\x96\x01 this is not a protobuf")
    for path in (junk, tmp_path / "missing.model"):
        with pytest.raises(UserError, match=str(path)):
            Tokenizer(str(path))


def test_vocab_check(tok):
    tok.check_vocab(320)
    with pytest.raises(UserError, match=r"tok320\.model: tokenizer has 320 tokens but model\.vocab_size is 2048"):
        tok.check_vocab(2048)


def test_train_tokenizer_cli_from_jsonl_and_text(tmp_path, capsys):
    src = write_jsonl(tmp_path / "c.jsonl", sample_texts(200))
    rc, out, err = cli(capsys, "preprocess", "--train-tokenizer", "--vocab-size", 340, "--input", src,
                       "--tokenizer", tmp_path / "a.model")
    assert rc == 0, err
    assert Tokenizer(str(tmp_path / "a.model")).vocab_size == 340
    txt = tmp_path / "c.txt"
    txt.write_text("\n".join(sample_texts(200)))
    rc, out, err = cli(capsys, "preprocess", "--train-tokenizer", "--vocab-size", 340, "--input", txt,
                       "--tokenizer", tmp_path / "b.model", "--output-prefix", tmp_path / "b", "--workers", 1)
    assert rc == 0, err
    assert (tmp_path / "b.bin").is_file() and (tmp_path / "b.idx").is_file()
    # existing tokenizer is not replaced without --overwrite
    before = (tmp_path / "a.model").read_bytes()
    rc, _, err = cli(capsys, "preprocess", "--train-tokenizer", "--vocab-size", 330, "--input", src,
                     "--tokenizer", tmp_path / "a.model")
    assert_one_line_error(rc, err, "a.model", "--overwrite")
    assert (tmp_path / "a.model").read_bytes() == before


def test_vocab_too_large_for_text_is_one_line(tmp_path, capsys):
    src = write_jsonl(tmp_path / "c.jsonl", ["tiny text"] * 5)
    rc, _, err = cli(capsys, "preprocess", "--train-tokenizer", "--vocab-size", 5000, "--input", src,
                     "--tokenizer", tmp_path / "t.model")
    assert_one_line_error(rc, err, "t.model", "5000")
    assert not list(tmp_path.glob("*.model")) and not list(tmp_path.glob(".*"))


def test_tokenizer_training_is_atomic_and_deterministic(tmp_path):
    # a model only appears under its name when complete; helper files are gone
    a = train_tokenizer(sample_texts(100), str(tmp_path / "x.model"), 330)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.model"]
    b = train_tokenizer(sample_texts(100), str(tmp_path / "sub" / "y.model"), 330, max_sentences=200)
    c = train_tokenizer(sample_texts(100), str(tmp_path / "z.model"), 330, max_sentences=200)
    assert b.proto == c.proto != a.proto  # same inputs and seed: byte-identical files
