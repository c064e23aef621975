"""The CLIP byte-pair tokenizer, offline (SPEC §11).

Vocabulary 49,408 = 256 byte symbols + their end-of-word forms + 48,894 merges + the
start/end tokens (49406/49407); context 77; pad 0; lower-cased. Truncation keeps the end
token, because CLIP's text feature is read at the end token (the arg-max id).

The merge list is OpenAI's ``bpe_simple_vocab_16e6.txt.gz`` shipped in ``assets/clip/``
(provenance and MIT licence next to it). This is our own implementation of the published
algorithm: bytes → printable unicode symbols, greedy lowest-rank pair merging per word.
"""
from __future__ import annotations

import gzip
import html
from functools import lru_cache
from pathlib import Path
from typing import Sequence

import regex
import torch

VOCAB_FILE = Path(__file__).resolve().parents[3] / "assets" / "clip" / "bpe_simple_vocab_16e6.txt.gz"
VOCAB_SIZE = 49408
CONTEXT = 77
SOT, EOT, PAD = 49406, 49407, 0
N_MERGES = VOCAB_SIZE - 2 * 256 - 2  # 48,894

# words, single digits, runs of other non-space symbols, English contractions
_SPLIT = regex.compile(
    r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+",
    regex.IGNORECASE,
)


def byte_symbols() -> dict[int, str]:
    """Each byte → one printable unicode character (printable Latin-1 bytes map to
    themselves; the rest to code points from 256 up, in byte order). The dict's order
    (printable bytes first) is the order of the first 256 vocabulary ids."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    table = {b: chr(b) for b in keep}
    rest = [b for b in range(256) if b not in table]
    table.update({b: chr(256 + i) for i, b in enumerate(rest)})
    return table


def clean(text: str) -> str:
    text = html.unescape(html.unescape(text))
    return " ".join(text.split()).strip().lower()


class ClipTokenizer:
    def __init__(self, vocab_file: str | Path = VOCAB_FILE, context: int = CONTEXT):
        self.context = context
        self.bytes = byte_symbols()
        lines = gzip.open(vocab_file, "rt", encoding="utf-8").read().split("\n")
        merges = [tuple(line.split()) for line in lines[1 : 1 + N_MERGES]]
        symbols = list(self.bytes.values())
        vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges]
        vocab += ["<|startoftext|>", "<|endoftext|>"]
        self.encoder = {tok: i for i, tok in enumerate(vocab)}
        self.decoder = {i: tok for tok, i in self.encoder.items()}
        self.rank = {m: i for i, m in enumerate(merges)}
        self.sot, self.eot = self.encoder["<|startoftext|>"], self.encoder["<|endoftext|>"]
        assert len(self.encoder) == VOCAB_SIZE and (self.sot, self.eot) == (SOT, EOT)
        self._cache: dict[str, list[str]] = {}

    def bpe(self, word: str) -> list[str]:
        """One pre-split word (already byte-mapped) → its BPE pieces."""
        if word in self._cache:
            return self._cache[word]
        parts = list(word[:-1]) + [word[-1] + "</w>"]
        while len(parts) > 1:
            pairs = [(self.rank.get((a, b), 1 << 30), i) for i, (a, b) in enumerate(zip(parts, parts[1:]))]
            best, _ = min(pairs)
            if best == 1 << 30:
                break
            a, b = next((parts[i], parts[i + 1]) for r, i in pairs if r == best)
            merged, i = [], 0
            while i < len(parts):  # merge every occurrence of the pair, left to right
                if i + 1 < len(parts) and parts[i] == a and parts[i + 1] == b:
                    merged.append(a + b)
                    i += 2
                else:
                    merged.append(parts[i])
                    i += 1
            parts = merged
        self._cache[word] = parts
        return parts

    def encode(self, text: str) -> list[int]:
        ids = []
        for word in _SPLIT.findall(clean(text)):
            mapped = "".join(self.bytes[b] for b in word.encode("utf-8"))
            ids.extend(self.encoder[p] for p in self.bpe(mapped))
        return ids

    def pieces(self, text: str) -> list[str]:
        """Display strings of the BPE pieces of ``text`` (for word attributions)."""
        inv = {v: k for k, v in self.bytes.items()}
        out = []
        for i in self.encode(text):
            tok = self.decoder[i].replace("</w>", "")
            out.append(bytes(inv.get(ch, 63) for ch in tok).decode("utf-8", "replace"))
        return out

    def __call__(self, texts: Sequence[str], context: int | None = None) -> tuple[torch.Tensor, list[bool]]:
        """(B, context) int64 ids ``[SOT, ..., EOT, 0...]`` and, per text, whether it was
        truncated (the last kept position is then EOT)."""
        n = context or self.context
        out = torch.zeros(len(texts), n, dtype=torch.long)
        truncated = []
        for row, t in enumerate(texts):
            ids = [self.sot] + self.encode(t) + [self.eot]
            truncated.append(len(ids) > n)
            if len(ids) > n:
                ids = ids[: n - 1] + [self.eot]
            out[row, : len(ids)] = torch.tensor(ids)
        return out, truncated


@lru_cache(maxsize=2)
def get_tokenizer(context: int = CONTEXT) -> ClipTokenizer:
    return ClipTokenizer(context=context)


def write_hf_files(folder: str | Path, tok: ClipTokenizer | None = None) -> tuple[Path, Path]:
    """Write ``vocab.json`` + ``merges.txt`` (the files transformers' ``CLIPTokenizer``
    reads) from the shipped merge list — to build a Hugging Face CLIP folder offline."""
    import json

    tok = tok or get_tokenizer()
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocab, merges = folder / "vocab.json", folder / "merges.txt"
    vocab.write_text(json.dumps(tok.encoder, ensure_ascii=False), encoding="utf-8")
    ordered = sorted(tok.rank, key=tok.rank.get)
    merges.write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in ordered) + "\n", encoding="utf-8")
    return vocab, merges
