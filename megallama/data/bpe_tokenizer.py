"""Byte-level BPE tokenizers run by Hugging Face ``tokenizers``: ``tokenizer.json`` files, and
Meta's tiktoken-format ``tokenizer.model`` (Llama 3).

A tiktoken file is rebuilt as the equivalent ``tokenizers`` BPE, the way transformers converts
Llama 3 (every split of a token into two tokens is a merge, ranked by the token's rank; a
pre-token that is itself a token is kept whole, as tiktoken does), so one engine runs both kinds
and an export can write either as ``tokenizer.json``.
"""
from __future__ import annotations

import base64
import binascii
import json
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from megallama.data.tokenizer import Tokenizer
from megallama.errors import UserError

# Llama 3's pre-tokenizer split (Meta's llama3/tokenizer.py) and its 256 special tokens (3.1 names)
LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                  r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_NAMED = ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>", "<|reserved_special_token_1|>",
          "<|finetune_right_pad_id|>", "<|step_id|>", "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>",
          "<|eot_id|>", "<|python_tag|>"]
LLAMA3_SPECIAL_TOKENS = _NAMED + [f"<|reserved_special_token_{2 + i}|>" for i in range(256 - len(_NAMED))]
# Without a tokenizer_config.json or a post-processor saying otherwise, these names are BOS / EOS.
BOS_NAMES = ("<|begin_of_text|>", "<s>", "<bos>", "<|startoftext|>")
EOS_NAMES = ("<|end_of_text|>", "</s>", "<eos>", "<|endoftext|>")


class _BPETokenizer(Tokenizer):
    """Shared by both kinds: a ``tokenizers.Tokenizer`` (``self.tk``) and the special ids."""

    FILE_NAME = "tokenizer.json"
    bos_id = eos_id = pad_id = unk_id = -1

    def _build(self, data: bytes):
        """The ``tokenizers.Tokenizer`` the file describes, as Hugging Face would load it."""
        raise NotImplementedError

    def _setup(self, data: bytes) -> None:
        self.data = data
        self.tk = self._build(data)
        self.tk.encode_special_tokens = True  # "<|eot_id|>" in the text is text (see Tokenizer)
        self._set_special_ids()

    def _set_special_ids(self) -> None:
        raise NotImplementedError

    @property
    def vocab_size(self) -> int:
        return self.tk.get_vocab_size(with_added_tokens=True)

    def _encode(self, text: str) -> List[int]:
        return self.tk.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int]) -> str:
        return self.tk.decode([int(i) for i in ids], skip_special_tokens=False)

    def piece_id(self, piece: str) -> Optional[int]:
        return self.tk.token_to_id(piece)

    def piece(self, i: int) -> Optional[str]:
        return self.tk.id_to_token(i) if i >= 0 else None

    def hf_json(self) -> str:
        """This tokenizer as a ``tokenizer.json`` whose post-processor adds BOS exactly as
        ``encode(text, bos=True)`` does (and nothing else), for ``AutoTokenizer``."""
        from tokenizers import processors

        tk = self._build(self.data)
        if self.bos_id < 0:
            obj = json.loads(tk.to_str())
            obj["post_processor"] = None
            return json.dumps(obj, ensure_ascii=False)
        if tk.encode("a", add_special_tokens=True).ids != [self.bos_id] + tk.encode("a", add_special_tokens=False).ids:
            bos = self.piece(self.bos_id)
            tk.post_processor = processors.TemplateProcessing(
                single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1", special_tokens=[(bos, self.bos_id)])
        return tk.to_str()


class TokenizerJson(_BPETokenizer):
    """A Hugging Face ``tokenizer.json``. BOS/EOS/pad come from a ``tokenizer_config.json``
    beside it when there is one (as for ``AutoTokenizer``), else BOS/EOS from what the
    post-processor puts around a text, else from the usual names among the added tokens."""

    def _build(self, data: bytes):
        from tokenizers import Tokenizer as HFTokenizer

        try:
            return HFTokenizer.from_str(data.decode("utf-8"))
        except Exception as exc:  # tokenizers raises plain Exception; UnicodeDecodeError too
            msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise UserError(f"{self.path}: not a Hugging Face tokenizer.json ({msg})") from None

    def _set_special_ids(self) -> None:
        cfg = _sibling_config(Path(self.path).parent / "tokenizer_config.json")
        with_special = self.tk.encode("a", add_special_tokens=True).ids
        plain = self.tk.encode("a", add_special_tokens=False).ids
        start = next((i for i in range(len(with_special)) if with_special[i:i + len(plain)] == plain), 0)
        before, after = with_special[:start], with_special[start + len(plain):]
        self.bos_id = self._pick(cfg.get("bos_token"), before[-1] if len(before) == 1 else None, BOS_NAMES)
        self.eos_id = self._pick(cfg.get("eos_token"), after[0] if len(after) == 1 else None, EOS_NAMES)
        self.pad_id = self._pick(cfg.get("pad_token"), None, ())
        model = json.loads(self.data).get("model")
        self.unk_id = self._pick(model.get("unk_token") if isinstance(model, dict) else None, None, ())

    def _pick(self, configured, templated: Optional[int], names: Sequence[str]) -> int:
        if isinstance(configured, dict):  # {"content": "<s>", ...} in newer tokenizer_config.json files
            configured = configured.get("content")
        if isinstance(configured, str) and self.tk.token_to_id(configured) is not None:
            return self.tk.token_to_id(configured)
        if templated is not None:
            return templated
        return next((self.tk.token_to_id(n) for n in names if self.tk.token_to_id(n) is not None), -1)


def _sibling_config(path: Path) -> Dict:
    if not path.is_file():
        return {}
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise UserError(f"{path}: not a readable tokenizer_config.json ({exc})") from None
    return cfg if isinstance(cfg, dict) else {}


class TiktokenTokenizer(_BPETokenizer):
    """Meta's tiktoken-format ``tokenizer.model``: one ``base64(token) rank`` line per token,
    ranks 0..N-1; Llama 3's split pattern and its 256 special tokens at ids N..N+255
    (BOS ``<|begin_of_text|>``, EOS ``<|end_of_text|>``, no pad), as Meta's ``Tokenizer`` sets."""

    def _build(self, data: bytes):
        from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
        from tokenizers import Tokenizer as HFTokenizer

        ranks = self._ranks(data)
        table = str.maketrans({chr(b): c for b, c in _bytes_to_unicode().items()})
        name = {t: t.decode("latin-1").translate(table) for t in ranks}  # vocabulary entries as GPT-2 writes them
        merges = []
        for token, rank in ranks.items():
            merges += [(rank, ranks[token[:i]], ranks[token[i:]], token[:i], token[i:]) for i in range(1, len(token))
                       if token[:i] in ranks and token[i:] in ranks]
        merges.sort(key=lambda m: m[:3])
        tk = HFTokenizer(models.BPE({name[t]: r for t, r in ranks.items()}, [(name[a], name[b]) for *_, a, b in merges],
                                    ignore_merges=True))
        tk.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(LLAMA3_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
        tk.decoder = decoders.ByteLevel()
        tk.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in LLAMA3_SPECIAL_TOKENS])
        return tk

    def _ranks(self, data: bytes) -> Dict[bytes, int]:
        ranks: Dict[bytes, int] = {}
        for n, line in enumerate(data.splitlines(), 1):
            if not line.strip():
                continue
            parts = line.split()
            try:
                if len(parts) != 2 or not parts[1].isdigit():
                    raise ValueError
                token = base64.b64decode(parts[0], validate=True)
            except (ValueError, binascii.Error):
                raise UserError(f"{self.path}: line {n}: expected a base64 token and its rank (tiktoken format)") \
                    from None
            if token in ranks or not token:
                raise UserError(f"{self.path}: line {n}: token {parts[0].decode()!r} "
                                f"{'is empty' if not token else 'appears twice'} (tiktoken format)")
            ranks[token] = int(parts[1])
        if sorted(ranks.values()) != list(range(len(ranks))):
            raise UserError(f"{self.path}: the ranks must be 0..{len(ranks) - 1}, each once (tiktoken format)")
        missing = [b for b in range(256) if bytes([b]) not in ranks]
        if missing:
            raise UserError(f"{self.path}: byte 0x{missing[0]:02X} is not a token ({len(missing)} of the 256 bytes "
                            "missing); a tiktoken vocabulary must hold every byte")
        return ranks

    def _set_special_ids(self) -> None:
        n = self.vocab_size - len(LLAMA3_SPECIAL_TOKENS)
        self.bos_id, self.eos_id = n, n + 1


def _bytes_to_unicode() -> Dict[int, str]:
    """GPT-2's byte-to-character table, which byte-level BPE vocabularies are written in."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table
