"""GaLR's word vocabulary: built from the training captions, saved in the checkpoint.

GaLR embeds words with its own trainable table (eq. 7) — no sub-word tokenizer. The
released code lower-cases, tokenizes with NLTK and drops punctuation; we do the same
with a regular expression (no NLTK dependency): runs of letters/digits are words.

Index 0 is padding, 1 is ``<unk>`` (unknown words at query time).
"""
from __future__ import annotations

import hashlib
import re
from collections import Counter
from typing import Iterable, Optional, Sequence

import torch

PAD, UNK = "<pad>", "<unk>"
_WORD = re.compile(r"[a-z0-9]+")


def split_words(text: str) -> list[str]:
    """Lower-cased words of ``text``, punctuation removed."""
    return _WORD.findall(text.lower())


class Vocab:
    def __init__(self, words: Optional[Sequence[str]] = None):
        words = [w for w in (words or []) if w not in (PAD, UNK)]
        self.itos: list[str] = [PAD, UNK, *words]
        self.stoi: dict[str, int] = {w: i for i, w in enumerate(self.itos)}

    @classmethod
    def build(cls, captions: Iterable[str], min_count: int = 1) -> "Vocab":
        """Words of the captions by decreasing frequency (ties alphabetical): deterministic."""
        c = Counter(w for cap in captions for w in split_words(cap))
        words = sorted((w for w, n in c.items() if n >= min_count), key=lambda w: (-c[w], w))
        return cls(words)

    def __len__(self) -> int:
        return len(self.itos)

    @property
    def words(self) -> list[str]:
        return self.itos[2:]

    def digest(self) -> str:
        return hashlib.sha256("\n".join(self.itos).encode()).hexdigest()[:16]

    def encode(self, text: str, max_len: int) -> list[int]:
        ids = [self.stoi.get(w, 1) for w in split_words(text)][:max_len]
        return ids or [1]  # an empty caption is one unknown word

    def tokenize(self, texts: Sequence[str], max_len: int) -> dict[str, torch.Tensor]:
        """``{"ids": (B, L) int64 padded with 0, "lengths": (B,) int64}``."""
        seqs = [self.encode(t, max_len) for t in texts]
        L = max(len(s) for s in seqs) if seqs else 1
        ids = torch.zeros(len(seqs), L, dtype=torch.long)
        for i, s in enumerate(seqs):
            ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        return {"ids": ids, "lengths": torch.tensor([len(s) for s in seqs], dtype=torch.long)}

    def decode(self, ids: Sequence[int]) -> list[str]:
        return [self.itos[i] if 0 <= i < len(self.itos) else UNK for i in ids if i != 0]
