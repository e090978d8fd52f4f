"""Tokenizers: byte round trip (unicode, truncation at character boundaries), HFTokenizer == the
`tokenizers` library on a BPE trained here, bad input."""

import numpy as np
import pytest

from genjax.errors import UserError
from genjax.models.tokenizer import ByteTokenizer, HFTokenizer

TEXTS = ["digit 7", "", "naïve café — 数字 🙂", "a moving 3 bounces off the left wall"]


def test_byte_round_trip_unicode_and_layout():
    tok = ByteTokenizer()
    ids, mask = tok.encode(TEXTS, max_length=64)
    assert ids.shape == mask.shape == (4, 64) and ids.dtype == np.int32 and mask.dtype == bool
    assert tok.decode(ids, mask) == TEXTS and tok.decode(ids) == TEXTS
    for row, m, text in zip(ids, mask, TEXTS):
        n = len(text.encode("utf-8")) + 2
        assert m.sum() == n and m[:n].all()  # right padding
        assert row[0] == tok.bos_id and row[n - 1] == tok.eos_id and np.argmax(row) == n - 1
        np.testing.assert_array_equal(row[1:n - 1], np.frombuffer(text.encode("utf-8"), np.uint8) + 1)
        assert (row[n:] == tok.pad_id).all()
    assert ids.max() < tok.vocab_size


def test_byte_truncation_keeps_eos_and_whole_characters():
    tok = ByteTokenizer()
    text = "ab🙂cd"  # the emoji is 4 bytes: a cut at 3 or 4 bytes must drop it whole
    for max_length, want in [(4, "ab"), (5, "ab"), (7, "ab"), (8, "ab🙂"), (9, "ab🙂c")]:
        ids, mask = tok.encode([text], max_length)
        assert mask.sum() == len(want.encode()) + 2 and ids[0, mask[0].sum() - 1] == tok.eos_id
        assert tok.decode(ids, mask) == [want]


def _train_bpe(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.BpeTrainer(vocab_size=60, special_tokens=["<pad>", "<unk>", "<sot>", "<eot>"])
    tok.train_from_iterator(["digit one moving left", "digit two moving right", "two digits bounce"] * 5, trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<sot> $A <eot>", special_tokens=[("<sot>", 2), ("<eot>", 3)])
    path = tmp_path / "tokenizer.json"
    tok.save(str(path))
    return path


def test_hf_tokenizer_matches_tokenizers_library(tmp_path):
    from tokenizers import Tokenizer

    path = _train_bpe(tmp_path)
    ref = Tokenizer.from_file(str(path))
    tok = HFTokenizer.from_file(tmp_path, pad_token="<pad>")  # the folder works too
    texts = ["digit one", "two digits bounce left right moving one two", "digit"]
    ids, mask = tok.encode(texts, max_length=8)
    assert len(ref.encode(texts[1]).ids) > 8  # the truncation branch below runs
    for row, m, text in zip(ids, mask, texts):
        want = ref.encode(text).ids  # untruncated, unpadded, with <sot> ... <eot>
        n = min(len(want), 8)
        assert m.sum() == n and m[:n].all()
        if len(want) <= 8:
            np.testing.assert_array_equal(row[:n], want)
        else:  # truncated: content cut, <eot> kept
            np.testing.assert_array_equal(row[:7], want[:7])
            assert row[7] == ref.token_to_id("<eot>")
        assert (row[n:] == ref.token_to_id("<pad>")).all()
    assert tok.decode(ids, mask)[0] == ref.decode(ref.encode("digit one").ids)
    assert tok.vocab_size == ref.get_vocab_size()


def test_bad_input_raises_user_error(tmp_path):
    tok = ByteTokenizer()
    for texts in (["ok", 3], "a bare string", [], None):
        with pytest.raises(UserError, match="texts"):
            tok.encode(texts, 8)
    with pytest.raises(UserError, match="max_length"):
        tok.encode(["x"], 1)
    with pytest.raises(UserError, match="tokenizer path"):
        HFTokenizer.from_file(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(UserError, match="tokenizer path"):
        HFTokenizer.from_file(tmp_path / "bad.json")
    hf = HFTokenizer.from_file(_train_bpe(tmp_path))
    with pytest.raises(UserError, match="pad_token"):
        HFTokenizer.from_file(tmp_path / "tokenizer.json", pad_token="<nope>")
    with pytest.raises(UserError, match="max_length"):
        hf.encode(["digit"], 2)  # <sot> + <eot> leave no room
    with pytest.raises(UserError, match=r"texts\[0\]"):
        hf.encode([b"bytes"], 8)


def test_prompt_longer_than_the_limit_is_refused_not_cut():
    """Issue 21, defect 7: `encode` cuts at max_length - 2 bytes, so two prompts differing only
    after byte 30 gave identical videos; `check_fits` refuses them with one line naming the
    index, the length in bytes and the limit."""
    tok = ByteTokenizer()
    a, b = "digit 3 " + "x" * 22 + " moving up", "digit 3 " + "x" * 22 + " moving down"
    assert tok.encode([a], 32)[0].tolist() == tok.encode([b], 32)[0].tolist()  # what a cut does
    assert tok.fits("x" * 30, 32) and not tok.fits("x" * 31, 32) and not tok.fits("é" * 16, 32)
    tok.check_fits(["digit 3", "x" * 30], 32)
    with pytest.raises(UserError, match=r"^prompts\[1\]='digit 3 x.*: is 40 bytes of UTF-8; the model reads "
                                        r"at most 30 \(text_length 32"):
        tok.check_fits(["digit 3", a], 32)
    with pytest.raises(UserError, match=r"more characters\)': is 10000 bytes") as e:
        tok.check_fits(["y" * 10_000], 32, "--prompt")
    assert len(str(e.value)) < 200 and "\n" not in str(e.value)


def test_non_utf8_text_is_a_user_error_not_unicode_encode_error():
    """A non-UTF-8 byte of argv arrives as a lone surrogate ('\\udcff'): `str.encode` raised
    UnicodeEncodeError; now one line naming the text and the character."""
    tok = ByteTokenizer()
    for call in (lambda: tok.encode(["ok", "digit \udcff"], 16), lambda: tok.check_fits(["digit \udcff"], 16)):
        with pytest.raises(UserError, match=r"\[\d\]='digit \\udcff': is not valid UTF-8 text \(character 6"):
            call()


def test_training_captions_cut_are_reported_once(capsys):
    """Training keeps cutting long captions, but says so once, on one line of stderr."""
    from genjax.tasks.clip import tokenize_fn

    tokenize = tokenize_fn(ByteTokenizer(), 10, None)
    tokenize({"caption": "digit 3"})
    assert capsys.readouterr().err == ""
    for caption in ("digits 3 and 5", "digits 1 and 2"):
        assert tokenize({"caption": caption})["mask"].all()
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "longer than 8 bytes" in err and "'digits 3 and 5' (14 bytes)" in err
