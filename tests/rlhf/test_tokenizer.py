"""ByteTokenizer: round-trips any text, HF-like padding / truncation / tensors, save + reload."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rlhf.tokenizer import BOS_ID, EOS_ID, PAD_ID, ByteTokenizer


@settings(max_examples=200, deadline=None)
@given(st.text())
def test_round_trip_any_text(text):
    tok = ByteTokenizer()
    ids = tok.encode(text)
    assert ids[0] == BOS_ID
    assert all(0 <= i < 256 for i in ids[1:])
    assert len(ids) == 1 + len(text.encode("utf-8"))
    assert tok.decode(ids) == text
    assert tok.decode(tok.encode(text, add_special_tokens=False)) == text


@settings(max_examples=50, deadline=None)
@given(st.lists(st.integers(0, 255), max_size=40))
def test_invalid_bytes_decode_with_replacement(byte_ids):
    tok = ByteTokenizer()
    assert tok.decode(byte_ids) == bytes(byte_ids).decode("utf-8", errors="replace")


def test_special_tokens_and_sizes():
    tok = ByteTokenizer()
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (256, 257, 258)
    assert len(tok) == tok.vocab_size == 259
    ids = [BOS_ID] + list(b"hi") + [EOS_ID, PAD_ID]
    assert tok.decode(ids) == "hi"
    assert tok.decode(ids, skip_special_tokens=False) == "<s>hi</s><pad>"
    assert tok.decode(torch.tensor(ids)) == "hi"


@pytest.mark.parametrize("side", ["right", "left"])
def test_batch_padding_sides_and_tensors(side):
    tok = ByteTokenizer(padding_side=side)
    texts = ["a", "héllo", "xyz"]
    enc = tok(texts, padding=True, return_tensors="pt")
    ids, mask = enc["input_ids"], enc["attention_mask"]
    width = 1 + len("héllo".encode())
    assert ids.shape == mask.shape == (3, width)
    for row, m, t in zip(ids, mask, texts):
        n = 1 + len(t.encode())
        assert int(m.sum()) == n
        real = row[-n:] if side == "left" else row[:n]
        pads = row[: width - n] if side == "left" else row[n:]
        assert tok.decode(real) == t and torch.all(pads == PAD_ID)
        assert torch.equal(m.bool(), row != PAD_ID)
    assert tok.batch_decode(ids) == texts
    assert enc.input_ids is ids  # attribute access like HF's BatchEncoding


def test_truncation_and_max_length_padding():
    tok = ByteTokenizer()
    enc = tok(["abcdefgh", "ab"], padding="max_length", truncation=True, max_length=5, return_tensors="pt")
    assert enc["input_ids"].shape == (2, 5)
    assert tok.decode(enc["input_ids"][0]) == "abcd"
    assert enc["attention_mask"][1].tolist() == [1, 1, 1, 0, 0]
    tok.truncation_side = "left"
    assert tok.decode(tok("abcdefgh", truncation=True, max_length=3)["input_ids"]) == "fgh"
    single = tok("ab", return_tensors="pt")
    assert single["input_ids"].shape == (1, 3)
    with pytest.raises(ValueError):
        tok(["a", "abc"], return_tensors="pt")  # ragged without padding


def test_save_and_reload(tmp_path):
    tok = ByteTokenizer(padding_side="left", model_max_length=77)
    tok.save_pretrained(tmp_path)
    assert ByteTokenizer.is_byte_tokenizer_dir(tmp_path)
    again = ByteTokenizer.from_pretrained(tmp_path)
    assert again.padding_side == "left" and again.model_max_length == 77
    assert again.encode("ok ✓") == tok.encode("ok ✓")
