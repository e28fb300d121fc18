"""The tokenizer half of a Hugging Face export: the files ``AutoTokenizer.from_pretrained`` and
``GenerationConfig.from_pretrained`` read, written so that the export tokenizes exactly as
megallama does (BOS prepended, no EOS) and generation starts and stops on megallama's ids.

A SentencePiece model is written as ``tokenizer.model`` with ``LlamaTokenizer`` settings (as
Meta's Llama 2 exports are); ``tokenizer.json`` and tiktoken-format files as ``tokenizer.json``
for ``PreTrainedTokenizerFast`` (as Meta's Llama 3 exports are), its post-processor adding BOS.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, Optional, Union

from megallama.data.tokenizer import SentencePieceTokenizer, Tokenizer
from megallama.errors import UserError


def load_for_export(path, vocab_size: int) -> Tokenizer:
    """The tokenizer at ``path``, refused when its ids do not fit the model's vocabulary (a padded
    vocabulary, larger than the tokenizer, is fine)."""
    tok = Tokenizer(path)
    if tok.vocab_size > vocab_size:
        raise UserError(f"{tok.path}: tokenizer has {tok.vocab_size} tokens but the model's vocab_size is "
                        f"{vocab_size}; pass the tokenizer the model was trained with")
    return tok


def write_hf_tokenizer(tok: Union[Tokenizer, str, Path], out_dir, max_seq_len: Optional[int] = None) -> None:
    """Write the tokenizer file, ``tokenizer_config.json``, ``special_tokens_map.json`` and
    ``generation_config.json`` into ``out_dir`` (a directory being assembled: the caller makes
    it appear atomically), and set the special ids in its ``config.json`` when present."""
    tok = tok if isinstance(tok, Tokenizer) else Tokenizer(tok)
    out = Path(out_dir)
    special = {name: tok.piece(i) for name, i in (("bos_token", tok.bos_id), ("eos_token", tok.eos_id),
                                                  ("pad_token", tok.pad_id), ("unk_token", tok.unk_id))
               if i >= 0}
    if isinstance(tok, SentencePieceTokenizer):
        (out / "tokenizer.model").write_bytes(tok.data)
        config = {"tokenizer_class": "LlamaTokenizer", "add_bos_token": tok.bos_id >= 0, "add_eos_token": False,
                  "legacy": False, "add_prefix_space": None}
    else:
        (out / "tokenizer.json").write_text(tok.hf_json(), encoding="utf-8")
        config = {"tokenizer_class": "PreTrainedTokenizerFast"}
    config.update(special, clean_up_tokenization_spaces=False)
    if max_seq_len:
        config["model_max_length"] = int(max_seq_len)
    _write(out / "tokenizer_config.json", config)
    _write(out / "special_tokens_map.json", special)
    ids = {f"{name}_id": i for name, i in (("bos_token", tok.bos_id), ("eos_token", tok.eos_id),
                                           ("pad_token", tok.pad_id)) if i >= 0}
    _write(out / "generation_config.json", {**ids, "do_sample": False})  # megallama generate's default: greedy
    model_config = out / "config.json"
    if model_config.is_file():
        cfg = json.loads(model_config.read_text())
        cfg.update({k: ids.get(k) for k in ("bos_token_id", "eos_token_id", "pad_token_id")})
        _write(model_config, cfg)


def _write(path: Path, obj: Dict) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
