"""Text tokenizers for the text encoders: a byte-level one shipped with the code, and Hugging Face
`tokenizers` JSON files (CLIP BPE, T5 SentencePiece-converted, ...).

Both have the same interface:

  ids, mask = tok.encode(["digit 3", "a moving 7"], max_length=16)
  # ids int32 (B, max_length), mask bool (B, max_length) (True = real token, False = padding)
  texts = tok.decode(ids, mask)

Sequences are `[bos] tokens... [eos] pad pad ...` (right padding). Text longer than
`max_length` is truncated and still ends with its eos token, so a text tower that pools at the
eos token (CLIP) always finds it. Truncation suits training captions (`ByteTokenizer.fits` says
which are cut); a prompt cut short silently changes the sample, so `ByteTokenizer.check_fits`
refuses it.
Texts must be valid Unicode: a lone surrogate (what Python makes of a non-UTF-8 byte in argv,
e.g. '\\udcff') is a `UserError` naming the text, never a `UnicodeEncodeError`.
"""

from __future__ import annotations

import os
from typing import Any, Sequence

import numpy as np

from genjax.errors import check, fail


def _short(text: str, keep: int = 48) -> str:
    """`text`, or its first `keep` characters and the count of the rest (one readable error line)."""
    return text if len(text) <= keep + 16 else f"{text[:keep]}... ({len(text) - keep} more characters)"


def _check_texts(texts: Any, max_length: Any, min_length: int, field: str = "texts") -> None:
    check(isinstance(texts, (list, tuple)) and len(texts) > 0, field,
          type(texts).__name__ if not isinstance(texts, (list, tuple)) else texts,
          "must be a non-empty list of str (wrap a single text in a list)")
    for i, t in enumerate(texts):
        check(isinstance(t, str), f"{field}[{i}]", t, "must be a str")
        _check_utf8(f"{field}[{i}]", t)
    check(isinstance(max_length, (int, np.integer)) and max_length >= min_length, "max_length", max_length,
          f"must be an int >= {min_length} (room for the special tokens)")


def _check_utf8(field: str, text: str) -> None:
    """UserError unless `text` encodes as UTF-8 (a lone surrogate does not: Python decodes a
    non-UTF-8 byte of argv to one, '\\udcff' for byte 0xff)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        fail(field, _short(text), f"is not valid UTF-8 text (character {e.start}, {text[e.start]!r}, is a lone "
             "surrogate, e.g. a non-UTF-8 byte in the command line)")


class ByteTokenizer:
    """Byte-level tokenizer: UTF-8 bytes, no vocabulary file, works offline.

    Ids: `pad_id = 0`, byte b -> `b + 1` (1..256), `bos_id = 257` (CLIP's "start of text"),
    `eos_id = 258` ("end of text"); `vocab_size = 259`. As in OpenAI CLIP the eos id is the
    largest id, so "pool at argmax(ids)" and "pool at the first eos" agree.

    `encode` truncates at a character boundary (a multi-byte UTF-8 character is never split), so
    `decode(*encode(texts, L))` returns each text, or its longest prefix that fits in L - 2 bytes.

    Source: byte-level inputs as ByT5 (Xue et al. 2022), with CLIP's sot/eot framing
    (Radford et al. 2021, sec. 2.4).
    """

    pad_id = 0
    offset = 1
    bos_id = 257
    eos_id = 258
    vocab_size = 259

    def encode(self, texts: Sequence[str], max_length: int) -> tuple[np.ndarray, np.ndarray]:
        """Texts -> `(ids int32 (B, max_length), mask bool (B, max_length))`.

        Raises:
          UserError: `texts` not a non-empty list of valid UTF-8 str, or `max_length` < 2.
        """
        _check_texts(texts, max_length, 2)
        ids = np.full((len(texts), max_length), self.pad_id, np.int32)
        for i, text in enumerate(texts):
            data = text.encode("utf-8")[: max_length - 2].decode("utf-8", "ignore").encode("utf-8")
            row = [self.bos_id, *(b + self.offset for b in data), self.eos_id]
            ids[i, : len(row)] = row
        return ids, ids != self.pad_id

    @staticmethod
    def fits(text: str, max_length: int) -> bool:
        """Whether `encode([text], max_length)` keeps all of `text` (max_length - 2 UTF-8 bytes)."""
        return len(text.encode("utf-8", "surrogatepass")) <= max_length - 2

    def check_fits(self, texts: Sequence[str], max_length: int, field: str = "prompts") -> None:
        """Refuse texts that `encode` would cut: a prompt cut short silently changes the sample.

        Raises:
          UserError: `texts` not a non-empty list of valid UTF-8 str, or `field[i]` longer than
            max_length - 2 bytes (the message names the index, the length in bytes and the limit).
        """
        _check_texts(texts, max_length, 2, field)
        for i, text in enumerate(texts):
            n = len(text.encode("utf-8"))
            check(n <= max_length - 2, f"{field}[{i}]", _short(text),
                  f"is {n} bytes of UTF-8; the model reads at most {max_length - 2} (text_length "
                  f"{max_length} minus bos and eos): shorten it")

    @staticmethod
    def limit(max_length: int) -> str:
        """What `max_length` holds, in words (for messages about cut texts)."""
        return f"{max_length - 2} bytes (text_length {max_length} minus bos and eos)"

    @staticmethod
    def size(text: str) -> str:
        """The length of `text` in the unit of `limit`, in words."""
        return f"{len(text.encode('utf-8', 'replace'))} bytes"

    def decode(self, ids: np.ndarray, mask: np.ndarray | None = None) -> list[str]:
        """`ids (B, L)` int (and optional mask) -> texts; special and padding ids are dropped."""
        ids = np.asarray(ids)
        keep = (ids >= self.offset) & (ids < self.offset + 256)
        if mask is not None:
            keep &= np.asarray(mask, bool)
        return [bytes(int(t) - self.offset for t in row[k]).decode("utf-8", "replace")
                for row, k in zip(ids, keep)]


class HFTokenizer:
    """A Hugging Face `tokenizers` tokenizer (a `tokenizer.json`), with the `ByteTokenizer` interface.

    Special tokens (CLIP's `<|startoftext|>` / `<|endoftext|>`, T5's `</s>`) are added by the
    file's post-processor; truncation to `max_length` is the library's, which keeps them (so a
    truncated CLIP text still ends with `<|endoftext|>`). Padding uses `pad_id`.

    `fits` / `check_fits` count tokens as `ByteTokenizer`'s count bytes. Build with
    `HFTokenizer.from_file(path)`. The `tokenizers` library (a dependency of
    transformers) is imported only here.
    """

    def __init__(self, tokenizer: Any, pad_id: int = 0):
        self.tokenizer = tokenizer
        self.pad_id = int(pad_id)
        self.vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)

    @classmethod
    def from_file(cls, path: str | os.PathLike, pad_token: str | None = None) -> "HFTokenizer":
        """Load a `tokenizer.json` (or a folder holding one).

        The pad id is, in order: `pad_token`'s id if given; the file's own padding id; 0
        (OpenAI CLIP pads with 0 — the mask, not the pad id, says what is padding).

        Raises:
          UserError: no such file, not a tokenizers JSON, or `pad_token` not in the vocabulary.
        """
        from tokenizers import Tokenizer

        path = os.fspath(path)
        if os.path.isdir(path):
            path = os.path.join(path, "tokenizer.json")
        check(os.path.isfile(path), "tokenizer path", path, "no such file (want a tokenizers tokenizer.json)")
        try:
            tok = Tokenizer.from_file(path)
        except Exception as e:  # noqa: BLE001 - the library raises plain Exception on bad JSON
            check(False, "tokenizer path", path, f"not a tokenizers JSON file ({' '.join(str(e).split())})")
        pad_id = 0
        if pad_token is not None:
            pad_id = tok.token_to_id(pad_token)
            check(pad_id is not None, "pad_token", pad_token, "not in the tokenizer's vocabulary")
        elif tok.padding is not None:
            pad_id = tok.padding["pad_id"]
        return cls(tok, pad_id)

    def encode(self, texts: Sequence[str], max_length: int) -> tuple[np.ndarray, np.ndarray]:
        """Texts -> `(ids int32 (B, max_length), mask bool (B, max_length))`, special tokens added.

        Raises:
          UserError: `texts` not a non-empty list of valid UTF-8 str, or `max_length` < 1 + the number of
            special tokens the post-processor adds.
        """
        specials = self.tokenizer.num_special_tokens_to_add(False)
        _check_texts(texts, max_length, specials + 1)
        self.tokenizer.enable_truncation(int(max_length))
        self.tokenizer.enable_padding(pad_id=self.pad_id, length=int(max_length))
        encodings = self.tokenizer.encode_batch(list(texts))
        ids = np.array([e.ids for e in encodings], np.int32)
        mask = np.array([e.attention_mask for e in encodings], bool)
        return ids, mask

    def num_tokens(self, text: str) -> int:
        """Tokens of `text` with the special tokens, untruncated."""
        self.tokenizer.no_truncation()
        self.tokenizer.no_padding()
        return len(self.tokenizer.encode(text).ids)

    def fits(self, text: str, max_length: int) -> bool:
        """Whether `encode([text], max_length)` keeps all of `text` (special tokens included)."""
        return self.num_tokens(text) <= max_length

    @staticmethod
    def limit(max_length: int) -> str:
        """What `max_length` holds, in words (for messages about cut texts)."""
        return f"{max_length} tokens (text_length, special tokens included)"

    def size(self, text: str) -> str:
        """The length of `text` in the unit of `limit`, in words."""
        return f"{self.num_tokens(text)} tokens"

    def check_fits(self, texts: Sequence[str], max_length: int, field: str = "prompts") -> None:
        """Refuse texts that `encode` would cut: a prompt cut short silently changes the sample.

        Raises:
          UserError: `texts` not a non-empty list of valid UTF-8 str, or `field[i]` longer than
            max_length tokens (the message names the index, its token count and the limit).
        """
        _check_texts(texts, max_length, self.tokenizer.num_special_tokens_to_add(False) + 1, field)
        for i, text in enumerate(texts):
            n = self.num_tokens(text)
            check(n <= max_length, f"{field}[{i}]", _short(text),
                  f"is {n} tokens; the model reads at most {self.limit(max_length)}: shorten it")

    def decode(self, ids: np.ndarray, mask: np.ndarray | None = None) -> list[str]:
        """`ids (B, L)` (and optional mask) -> texts, special tokens skipped."""
        ids = np.asarray(ids)
        mask = np.ones(ids.shape, bool) if mask is None else np.asarray(mask, bool)
        return self.tokenizer.decode_batch([row[m].tolist() for row, m in zip(ids, mask)],
                                           skip_special_tokens=True)
