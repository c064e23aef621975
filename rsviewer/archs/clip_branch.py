"""A frozen CLIP ViT as the base of another architecture (``--set clip=PATH``): ``cmer``
(the paper's own setting, §3, Table 2) and ``lite`` (MLP heads on its embeddings).

The CLIP towers replace EfficientNet-Lite and MiniLM. This module holds the *frozen*
part (:class:`ClipBranch`): the OpenAI/open_clip-layout ViT built by ``archs/clip.py``,
its tokenizer, and the cacheable splits of both towers:

- image: CLIP's own embedding (pooled class token + ``visual_projection``) and the
  patch-token grids (class token dropped, (B, width, g, g)) of the tapped ViT blocks
  that feed the Focus-Adapters;
- text: the token states after the frozen lower layers (causal mask, as CLIP), the
  top ``lora_layers`` layers carry LoRA on q/v; pooling at the end token, then CLIP's
  final layer norm and frozen ``text_projection`` — CLIP already has a joint space, so
  no text head is trained (the paper trains only adapters and LoRA).

The trained parts live with each architecture (cmer: shared ``W_down``, adapters, the
residual side projection, LoRA A/B, the logit scale; lite: its MLP heads).
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import torch
from torch import nn

from ..errors import ModelError
from ..nets.weights import WeightsRef
from .cmer.lora import CLIP_TARGETS, apply_lora

DEFAULT_TAPS = 4  # evenly spaced blocks when clip_blocks is "": keeps the feature cache small


def parse_blocks(spec: str, n: int) -> list[int]:
    """ViT blocks (0-based) whose outputs feed the adapters: "" → ``DEFAULT_TAPS`` evenly
    spaced ending at the last block; "all" → every block (the paper); "3,7,11" → those;
    "none" → no side branch."""
    spec = (spec or "").strip().lower()
    if spec == "none":
        return []
    if spec == "all":
        return list(range(n))
    if not spec:
        k = min(DEFAULT_TAPS, n)
        return sorted({round((j + 1) * n / k) - 1 for j in range(k)})
    try:
        blocks = sorted({int(b) for b in spec.split(",") if b.strip()})
    except ValueError:
        raise ValueError(f"clip_blocks must be all, none or a comma list of block numbers, got {spec!r}") from None
    if not blocks or blocks[0] < 0 or blocks[-1] >= n:
        raise ValueError(f"clip_blocks must lie in 0..{n - 1} (this ViT has {n} blocks), got {spec!r}")
    return blocks


def causal_mask(n: int, dtype: torch.dtype, device) -> torch.Tensor:
    """(1, 1, n, n) additive mask: a token sees itself and the tokens before it (CLIP)."""
    return torch.full((n, n), torch.finfo(dtype).min, dtype=dtype, device=device).triu(1)[None, None]


class ClipBranch(nn.Module):
    """The frozen CLIP ViT of a cmer or lite model (``tower`` is the base, referenced by ``ref``)."""

    def __init__(self, path: str, blocks: str, lora_layers: int, targets: Sequence[str], rank: int, alpha: float):
        super().__init__()
        from ..nets.clip.hashing import sha256_cached
        from ..nets.clip.tokenizer import get_tokenizer
        from .clip import HFStyleTokenizer, build_tower, config_for

        p = Path(path).expanduser()
        if not p.exists():
            raise ModelError(f"the CLIP weights {p} are missing")
        if p.is_dir():
            raise ModelError(f"{p.name}: --set clip takes an OpenAI/open_clip ViT checkpoint file; Hugging Face folders are not supported yet")
        self.path = p.resolve()
        ccfg, _ = config_for(self.path)
        if ccfg.layout != "openai-vit":
            raise ModelError(f"{p.name} is a {ccfg.layout} CLIP; --set clip needs a ViT (openai-vit layout)")
        self.clip_cfg = ccfg
        self.tower = build_tower(ccfg, self.path)
        self.ref = WeightsRef(path=str(self.path), sha256=sha256_cached(self.path))
        self.context = int(ccfg.max_tokens)
        self.tokenizer_fn = get_tokenizer(self.context)
        self.tokenizer = HFStyleTokenizer(self.tokenizer_fn)  # what readable_labels/explain read
        vm, tm = self.vision, self.text_model
        self.width = int(vm.config.hidden_size)
        self.blocks = parse_blocks(blocks, len(vm.encoder.layers))
        n = len(tm.encoder.layers)
        self.num_text_layers = n
        self.text_prefix = n - max(0, min(int(lora_layers), n))
        wrapped = apply_lora(list(tm.encoder.layers)[self.text_prefix :], targets, rank, alpha, where=CLIP_TARGETS)
        self.lora_paths = sorted(set(wrapped))

    def adopt(self, model) -> None:
        """Give ``model`` this CLIP's settings: its absolute path (the saved model finds it from
        any folder), input size, context, normalisation, the ``model.text`` the explain engine
        reads, and the CLIP as the one frozen base."""
        from .clip import TextInfo

        cc, cfg = self.clip_cfg, model.cfg
        cfg.clip = str(self.path)
        cfg.image_size, cfg.max_tokens = int(cc.image_size), int(cc.max_tokens)
        model.mean, model.std = tuple(cc.mean), tuple(cc.std)
        model.text = TextInfo(self.tokenizer, self.text_model.embeddings.token_embedding)
        model.bases = {"clip.tower": self.ref}

    @property
    def clip(self):
        return self.tower.clip

    @property
    def vision(self):
        return self.tower.clip.vision_model

    @property
    def text_model(self):
        return self.tower.clip.text_model

    # ---- image ------------------------------------------------------------------------
    def image_features(self, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        """``{"pooled": CLIP's image embedding, "b<i>": (B, width, g, g) block i's patch tokens}``."""
        out = self.vision(pixel_values=pixels, output_hidden_states=True)
        feats = {"pooled": self.clip.visual_projection(out.pooler_output)}
        hs = out.hidden_states  # embeddings, then each block's output
        for i in self.blocks:
            feats[f"b{i}"] = self.grid(hs[i + 1])
        return feats

    @staticmethod
    def grid(tokens: torch.Tensor) -> torch.Tensor:
        """(B, 1 + g², C) block output → (B, C, g, g) patch grid (class token dropped)."""
        t = tokens[:, 1:]
        b, n, c = t.shape
        g = int(round(n**0.5))
        if g * g != n:
            raise ModelError(f"the ViT's {n} patch tokens do not form a square grid")
        return t.transpose(1, 2).reshape(b, c, g, g)

    def dense_embeddings(self, grid: torch.Tensor) -> torch.Tensor:
        """(B, C, g, g) last-block patch tokens → (B, D, g, g) through CLIP's post layer
        norm and projection (a crude patch similarity for the explain view)."""
        b, c, h, w = grid.shape
        x = self.clip.visual_projection(self.vision.post_layernorm(grid.permute(0, 2, 3, 1).reshape(b, h * w, c)))
        return x.reshape(b, h, w, -1).permute(0, 3, 1, 2)

    # ---- text -------------------------------------------------------------------------
    def tokenize(self, texts: Sequence[str], max_tokens: Optional[int] = None) -> dict[str, torch.Tensor]:
        """CLIP BPE ids cut after the batch's last end token, and a mask up to each end token."""
        from .clip import trim_pads

        ctx = min(int(max_tokens or self.context), self.context)  # positions beyond CLIP's context do not exist
        ids = trim_pads(self.tokenizer_fn(list(texts), ctx)[0])
        end = ids.argmax(1)  # the end token has the highest id (OpenAI's pooling rule)
        mask = (torch.arange(ids.shape[1])[None] <= end[:, None]).long()
        return {"input_ids": ids, "attention_mask": mask}

    def words(self, input_ids: torch.Tensor) -> list[list[str]]:
        return [self.tokenizer.convert_ids_to_tokens(row.tolist()) for row in input_ids]

    def run_layers(self, hidden: torch.Tensor, start: int, stop: Optional[int]) -> torch.Tensor:
        mask = causal_mask(hidden.shape[1], hidden.dtype, hidden.device)
        for layer in list(self.text_model.encoder.layers)[start:stop]:
            out = layer(hidden, mask)
            hidden = out[0] if isinstance(out, tuple) else out
        return hidden

    def pool_text(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Final layer norm, the end-token state (last masked position), text_projection."""
        h = self.text_model.final_layer_norm(hidden)
        end = (mask.sum(1) - 1).clamp_min(0).long()
        return self.clip.text_projection(h[torch.arange(h.shape[0], device=h.device), end])

    def text_features(self, tokens: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Frozen part: token states after the lower layers (or the embedding, no LoRA)."""
        mask = tokens["attention_mask"]
        hidden = self.run_layers(self.text_model.embeddings(input_ids=tokens["input_ids"]), 0, self.text_prefix)
        if self.text_prefix == self.num_text_layers:
            return {"pooled": self.pool_text(hidden, mask)}
        return {"hidden": hidden, "mask": mask}

    def text_pooled(self, feats: dict[str, torch.Tensor]) -> torch.Tensor:
        """Trained part: the LoRA layers on the cached states, then pooling and projection."""
        if "pooled" in feats:
            return feats["pooled"].float()
        mask, hidden = feats["mask"], feats["hidden"].float()
        if not torch.jit.is_tracing():  # drop all-padding columns (the causal mask keeps them inert anyway)
            n = int(mask.sum(1).max().item()) if mask.numel() else 1
            mask, hidden = mask[:, :n], hidden[:, :n]
        return self.pool_text(self.run_layers(hidden, self.text_prefix, None), mask)
