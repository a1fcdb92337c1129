"""Byte-level tokenizer for the built-in models: ids 0-255 are the UTF-8 bytes, then pad/bos/eos.

It round-trips any UTF-8 text (decoding an invalid byte sequence uses errors="replace") and speaks
the part of the HuggingFace tokenizer API the trainers use (`__call__` with padding / truncation /
return_tensors, `encode`, `decode`, `batch_decode`, `save_pretrained`, `from_pretrained`), so code
written against an HF tokenizer works with it unchanged. No files are needed to build one, which is
why the built-in names (`tiny-opt`, `opt-1.3b`, ...) use it: nothing is downloaded, ever.
"""
from __future__ import annotations

import json
import os
from typing import Any, Iterable

import torch
from transformers import BatchEncoding

NUM_BYTES = 256
PAD_ID, BOS_ID, EOS_ID = 256, 257, 258
TOKENIZER_CONFIG = "tokenizer_config.json"
MARKER = "hybrid_rlhf_byte_tokenizer"
"""Key in tokenizer_config.json that marks a directory as holding this tokenizer."""


class ByteTokenizer:
    """UTF-8 bytes as tokens; `vocab_size` == 259 (256 bytes + pad, bos, eos)."""

    pad_token, bos_token, eos_token = "<pad>", "<s>", "</s>"
    pad_token_id, bos_token_id, eos_token_id = PAD_ID, BOS_ID, EOS_ID
    unk_token, unk_token_id = None, None
    vocab_size = NUM_BYTES + 3
    model_input_names = ["input_ids", "attention_mask"]

    def __init__(
        self,
        padding_side: str = "right",
        truncation_side: str = "right",
        model_max_length: int = 1024,
        name_or_path: str = "byte-tokenizer",
    ) -> None:
        self.padding_side = padding_side
        self.truncation_side = truncation_side
        self.model_max_length = model_max_length
        self.name_or_path = name_or_path

    # ----------------------------------------------------------------------------- encoding
    def __len__(self) -> int:
        return self.vocab_size

    @property
    def all_special_ids(self) -> list[int]:
        return [PAD_ID, BOS_ID, EOS_ID]

    def encode(
        self,
        text: str,
        add_special_tokens: bool = True,
        truncation: bool = False,
        max_length: int | None = None,
        return_tensors: str | None = None,
    ) -> list[int] | torch.Tensor:
        ids = self._encode_one(text, add_special_tokens, truncation, max_length)
        if return_tensors == "pt":
            return torch.tensor([ids], dtype=torch.long)  # [1, L]
        return ids

    def _encode_one(
        self, text: str, add_special_tokens: bool, truncation: bool | str, max_length: int | None
    ) -> list[int]:
        if not isinstance(text, str):
            raise TypeError(f"ByteTokenizer encodes str, got {type(text).__name__}")
        ids = list(text.encode("utf-8"))
        if add_special_tokens:
            ids = [BOS_ID] + ids
        if truncation and truncation != "do_not_truncate":
            limit = max_length if max_length is not None else self.model_max_length
            if len(ids) > limit:
                ids = ids[:limit] if self.truncation_side == "right" else ids[len(ids) - limit :]
        return ids

    def __call__(
        self,
        text: str | list[str],
        padding: bool | str = False,
        truncation: bool | str = False,
        max_length: int | None = None,
        return_tensors: str | None = None,
        add_special_tokens: bool = True,
        return_attention_mask: bool = True,
        **unused: Any,
    ) -> BatchEncoding:
        single = isinstance(text, str)
        texts = [text] if single else list(text)
        rows = [self._encode_one(t, add_special_tokens, truncation, max_length) for t in texts]
        masks = [[1] * len(r) for r in rows]
        if padding and padding != "do_not_pad":
            if padding == "max_length":
                if max_length is None:
                    raise ValueError("padding='max_length' needs max_length")
                target = max_length
            else:  # True / "longest"
                target = max((len(r) for r in rows), default=0)
            rows, masks = zip(*(self._pad(r, m, target) for r, m in zip(rows, masks))) if rows else ([], [])
            rows, masks = list(rows), list(masks)
        if return_tensors == "pt":
            if len({len(r) for r in rows}) > 1:
                raise ValueError("rows differ in length: pass padding=True to return tensors")
            data: dict[str, Any] = {
                "input_ids": torch.tensor(rows, dtype=torch.long),  # [B, L]
                "attention_mask": torch.tensor(masks, dtype=torch.long),  # [B, L]
            }
        elif return_tensors is not None:
            raise ValueError(f"return_tensors={return_tensors!r}: only None and 'pt' are supported")
        else:
            data = {"input_ids": rows[0] if single else rows, "attention_mask": masks[0] if single else masks}
        if not return_attention_mask:
            data.pop("attention_mask")
        return BatchEncoding(data)

    def _pad(self, ids: list[int], mask: list[int], target: int) -> tuple[list[int], list[int]]:
        n = max(0, target - len(ids))
        if self.padding_side == "left":
            return [PAD_ID] * n + ids, [0] * n + mask
        return ids + [PAD_ID] * n, mask + [0] * n

    # ----------------------------------------------------------------------------- decoding
    def convert_ids_to_tokens(self, ids: int | Iterable[int]) -> str | list[str]:
        names = {PAD_ID: self.pad_token, BOS_ID: self.bos_token, EOS_ID: self.eos_token}
        one = lambda i: names.get(i, f"<0x{i:02X}>" if 0 <= i < NUM_BYTES else f"<unused_{i}>")  # noqa: E731
        return one(int(ids)) if isinstance(ids, int) else [one(int(i)) for i in ids]

    def decode(self, ids: Iterable[int] | torch.Tensor, skip_special_tokens: bool = True, **unused: Any) -> str:
        """Bytes back to text; ids >= 256 are special (or unused rows of a larger model vocabulary)."""
        if isinstance(ids, torch.Tensor):
            ids = ids.reshape(-1).tolist()
        out, buf = [], bytearray()
        for i in ids:
            i = int(i)
            if 0 <= i < NUM_BYTES:
                buf.append(i)
                continue
            if skip_special_tokens:
                continue
            out.append(buf.decode("utf-8", errors="replace"))
            buf = bytearray()
            out.append(self.convert_ids_to_tokens(i))
        out.append(buf.decode("utf-8", errors="replace"))
        return "".join(out)

    def batch_decode(self, sequences: Iterable[Iterable[int]] | torch.Tensor, skip_special_tokens: bool = True, **kw: Any) -> list[str]:
        if isinstance(sequences, torch.Tensor):
            sequences = sequences.tolist()
        return [self.decode(s, skip_special_tokens=skip_special_tokens) for s in sequences]

    # ----------------------------------------------------------------------------- persistence
    def save_pretrained(self, save_directory: str | os.PathLike, **unused: Any) -> tuple[str]:
        os.makedirs(save_directory, exist_ok=True)
        path = os.path.join(save_directory, TOKENIZER_CONFIG)
        cfg = {
            MARKER: True,
            "tokenizer_class": "ByteTokenizer",
            "padding_side": self.padding_side,
            "truncation_side": self.truncation_side,
            "model_max_length": self.model_max_length,
            "pad_token": self.pad_token, "bos_token": self.bos_token, "eos_token": self.eos_token,
            "vocab_size": self.vocab_size,
        }
        with open(path, "w") as f:
            json.dump(cfg, f, indent=2)
        return (path,)

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, **unused: Any) -> "ByteTokenizer":
        path = os.path.join(directory, TOKENIZER_CONFIG)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no {TOKENIZER_CONFIG} in {directory}")
        with open(path) as f:
            cfg = json.load(f)
        if not cfg.get(MARKER):
            raise ValueError(f"{path} does not describe a ByteTokenizer")
        return cls(
            padding_side=cfg.get("padding_side", "right"),
            truncation_side=cfg.get("truncation_side", "right"),
            model_max_length=cfg.get("model_max_length", 1024),
            name_or_path=str(directory),
        )

    @staticmethod
    def is_byte_tokenizer_dir(directory: str | os.PathLike) -> bool:
        path = os.path.join(directory, TOKENIZER_CONFIG)
        if not os.path.isfile(path):
            return False
        try:
            with open(path) as f:
                return bool(json.load(f).get(MARKER))
        except (OSError, json.JSONDecodeError):
            return False

    def __repr__(self) -> str:
        return f"ByteTokenizer(vocab_size={self.vocab_size}, padding_side={self.padding_side!r})"
