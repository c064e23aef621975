"""Scene-label prompt augmentation (paper §3.3, eqs. 14–15).

The scene category is metadata prepended to the caption as a prompt,
``t = Concat(t_meta, t_cont)`` (eq. 14), then embedded by the (frozen) word embeddings
(eq. 15). The prompt itself has no trained parameters.

**Training only.** At query time the scene label of the wanted image is exactly what a
retrieval system does not know (it would leak ground truth), so inference encodes the
plain query. :func:`augment` is public so a user who *does* have trusted metadata can
encode prompted queries, and so the leaky setting can be measured separately.
"""
from __future__ import annotations

import re
from functools import lru_cache
from typing import Optional

DEFAULT_TEMPLATE = "a remote sensing image of {label}."


def readable_label(label: str, vocab: Optional[frozenset] = None) -> str:
    """``"denseresidential"`` → ``"dense residential"``; ``"storage_tanks"`` → ``"storage tanks"``.

    Separators and camelCase are split; a run-together lowercase name is segmented into
    at most three whole words of ``vocab`` (the text encoder's word list), each ≥ 3
    letters, when the name itself is not a word.
    """
    s = re.sub(r"[_\-]+", " ", label.strip())
    s = re.sub(r"(?<=[a-z])(?=[A-Z])", " ", s).lower()
    if vocab is None:
        return " ".join(s.split())
    return " ".join(_segment(w, vocab) for w in s.split())


def _segment(word: str, vocab: frozenset) -> str:
    if word in vocab or len(word) < 6:
        return word

    @lru_cache(maxsize=None)
    def best(i: int) -> Optional[tuple[str, ...]]:
        if i == len(word):
            return ()
        found: Optional[tuple[str, ...]] = None
        for j in range(len(word), i + 2, -1):  # longest piece first, pieces ≥ 3 letters
            piece = word[i:j]
            if piece in vocab:
                rest = best(j)
                if rest is not None and (found is None or len(rest) + 1 < len(found)):
                    found = (piece, *rest)
        return found

    parts = best(0)
    return " ".join(parts) if parts and len(parts) <= 3 else word


def augment(caption: str, label: str, template: str = DEFAULT_TEMPLATE) -> str:
    """The prompted caption: scene prompt first, then the content (eq. 14)."""
    return f"{template.format(label=label).strip()} {caption.strip()}"
