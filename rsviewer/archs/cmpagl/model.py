"""``cmpagl`` — Cross-Modal Pre-Aligned retrieval with Global and Local information
(Sun et al., TGRS 2024; paper file 001 in SPEC §0), over pluggable frozen backbones.

What is built, against the paper (§III):

- **Image encoder = Gswin** (:mod:`.gswin`): window 8, GWG global windows, blocks of
  LW-MSA → SLW-MSA → two GLW-CA branches (eq. 6), patch merging between stages
  (eq. 2), four stages with depths (1, 1, 3, 1) (§IV-B: "third stage 3 layers, the
  others 1"). Width doubles per stage.
- **Patch embedding** (eq. 1), two variants (``stem``):

  * ``"cnn"`` (default, the honest substitute for 1,680 training images on a CPU): a
    Swin-style encoder cannot be learnt from scratch on UCM, so the frozen pretrained
    CNN up to stride 8 (EfficientNet-Lite0's stride-8 map, 40 ch, 32×32 at 256 px)
    *is* the patch embedding; a trainable LN + linear (eq. 1's W_e) maps it to the
    Gswin width. The four stages then run at 32×32 → 16 → 8 → 4 (the paper's run at
    64 → 32 → 16 → 8 from 4-px patches; ours start one merge later, as the CNN already
    downsampled ×8). With ``inject`` (default ``"s16+s32"``) the deeper frozen CNN
    maps at strides 16 and 32 (before the 1280-d head) are added, through LN +
    linear, to the inputs of stages 2 and 3 (same grid) — a lateral connection that
    is not in the paper; ``--set inject=''`` turns it off (the pure form);
  * ``"pixels"``: the paper's own form — a trainable 4×4/stride-4 patch embedding on the
    raw pixels and four stages at 64 → 32 → 16 → 8 (for users with data and a GPU).
    The trainer caches ``image_features``, so here they are the normalised pixels
    themselves (a deterministic function; use few ``views``).
- **Image feature**: the paper takes "the 0-th token" (eq. 3), but a Swin-type
  encoder has no class token (its windows could not carry one), so the final tokens
  are mean-pooled (Swin's own pooling) and projected linearly to ``embed_dim``.
- **Text / multimodal split** (§III-C/D): the first half of the BERT layers is the
  text encoder, the second half the multimodal encoder with cross-attention to the
  image tokens (MiniLM-L6: 3 + 3; BERT-base: 6 + 6). The text half is frozen and
  its token states cached by default (``text_train_layers`` = 0): 8,400 templated
  captions do not need a re-trained language model, and a frozen half keeps the
  momentum copy and the MLM re-encoding cheap; the top ``text_train_layers`` of it
  can be fine-tuned instead. The text feature is the masked mean of the text
  half's tokens (``text_pool="mean"``; MiniLM was trained with mean pooling, its
  [CLS] after three layers carries little — ``"cls"`` is the paper's eq. 9 form),
  projected linearly. The multimodal layers are MiniLM's layers 3–5 with new
  cross-attention sub-layers (ALBEF); image tokens for them are the pooled token and
  the last-stage tokens, linearly projected to the text width. By default only the
  new cross-attention sub-layers are trained and the pretrained self-attention/FFN
  of layers 3–5 stay frozen (``fusion_finetune=False``: half the CPU cost of the
  fusion passes and a 20 MB instead of 43 MB checkpoint; retrieval never uses
  them); ``fusion_finetune=True`` trains them too, as ALBEF does.
- **Losses** (eq. 17): ITC with a momentum encoder (m = 0.995) and a queue (eq. 18),
  the optimized triplet loss (eq. 19), ITM on hard negatives drawn from the ITC
  similarity (eq. 21), MLM with 15 % masking predicted through the tied (frozen)
  word embeddings (eq. 20). Deviations: the queue holds ``queue_size`` = 1,024
  entries, not 65,536 (the whole UCM train set is 8,400 pairs; a longer queue
  would mostly hold stale copies of the batch itself), and keys of the query's own
  image or with an identical caption count as positives, with ``label_alpha`` = 0.5
  of the target spread over keys of the same scene label (labels of the training
  JSON; UCM's templated captions repeat within a class — the project's default
  ``lite`` model does the same; 0 gives eq. 18's one-hot targets); ITM/MLM run on the first ``fusion_batch``
  pairs of each batch (CPU budget; 0 = the whole batch). The eq. 19 sum is divided
  by the batch size (``reduction="mean"``) so its scale does not depend on it.
- **Retrieval** uses the unimodal encoders only (cosine of the projected
  features); the multimodal encoder serves training and explanations.

The momentum copies and the queue are training state kept outside the module's
state dict (checkpoints hold the online model only); ``after_step`` enqueues the
step's momentum features and moves the momentum weights.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ...nets.factory import create_backbone
from ...nets.text import TextEncoder, mean_pool
from ...train.losses import positive_masks
from ..base import BaseConfig, ExplainMaps, RetrievalModel, check_query, l2n
from ..registry import register
from .fusion import FusionEncoder, MLMHead
from .gswin import Gswin, effective_window
from .objectives import (
    MomentumQueue,
    caption_ids,
    itc_loss,
    mask_tokens,
    mlm_loss,
    momentum_update,
    optimized_triplet,
    sample_hard_negatives,
    soft_positive_targets,
)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_INJECT_STAGE = {"s16": 1, "s32": 2}  # frozen CNN map → Gswin stage index whose input it joins


@dataclass
class CMPAGLConfig(BaseConfig):
    # image encoder (Gswin)
    stem: str = "cnn"  # "cnn": frozen backbone stride-8 map is the patch embedding | "pixels": 4-px patches
    patch_size: int = 4  # pixels stem
    window: int = 8
    width: int = 32  # channels of stage 1 (doubles per stage); Swin-T uses 96
    depths: Sequence[int] = (1, 1, 3, 1)
    head_dim: int = 32
    mlp_ratio: float = 4.0
    drop_path: float = 0.1
    use_global: bool = True  # GW: global windows + GLW-CA (ablation switch)
    use_shift: bool = True  # SLW: shifted local windows (ablation switch)
    inject: str = "s16+s32"  # cnn stem: deeper frozen maps added to stage inputs ("" = pure Gswin)
    # cnn stem with s32 injected: "s16" fine-tunes the CNN past its stride-16 map (the
    # stride-32 stage feeding stage 3), at backbone_lr_scale × lr; "" keeps it frozen
    image_train_from: str = ""
    backbone_lr_scale: float = 0.1
    # text / multimodal
    text_train_layers: int = 0  # top layers of the text half fine-tuned (0 = frozen, cached)
    text_pool: str = "mean"  # "mean" | "cls"
    fusion_finetune: bool = False  # also fine-tune the BERT layers of the multimodal half (else only the new cross-attention)
    # objectives
    momentum: float = 0.995
    queue_size: int = 1024
    temperature: float = 0.07  # initial, learned
    label_alpha: float = 0.5  # same-scene-label weight in the ITC targets (0 = the paper's form)
    margin: float = 0.2  # α of eq. 19
    triplet_hardest: bool = False  # eq. 19 sums all negatives; True keeps the hardest only
    w_itc: float = 1.0
    w_triplet: float = 1.0
    w_itm: float = 1.0
    w_mlm: float = 1.0
    mlm_prob: float = 0.15
    fusion_batch: int = 16  # pairs per step that go through the multimodal encoder (0 = all)


@register
class CMPAGL(RetrievalModel):
    arch = "cmpagl"
    Config = CMPAGLConfig
    feature_version = "1"
    feature_keys = {
        "image": ("image_backbone", "image_weights", "image_size", "stem", "inject", "image_train_from"),
        "text": ("text_weights", "max_tokens", "text_train_layers"),
    }
    train_defaults = {"epochs": 20, "lr": 5e-4, "batch_size": 64, "views": 4, "weight_decay": 0.05, "warmup": 0.1}

    def __init__(self, cfg: CMPAGLConfig, extra: Optional[dict] = None):
        super().__init__(cfg, extra)
        if cfg.stem not in ("cnn", "pixels"):
            raise ValueError(f"unknown stem {cfg.stem!r}; use cnn or pixels")
        if cfg.text_pool not in ("mean", "cls"):
            raise ValueError(f"unknown text_pool {cfg.text_pool!r}; use mean or cls")
        depths = [int(d) for d in cfg.depths]
        self.text = TextEncoder(cfg.text_weights, cfg.max_tokens)
        self.bases = {"text": self.text.weights_ref}
        self.inject = [s for s in (cfg.inject or "").replace(",", "+").split("+") if s] if cfg.stem == "cnn" else []
        for s in self.inject:
            if s not in _INJECT_STAGE or _INJECT_STAGE[s] >= len(depths):
                raise ValueError(f"cannot inject {s!r} into a {len(depths)}-stage Gswin; use s16 and/or s32")

        # ---- image: patch embedding (eq. 1) + Gswin stages ----
        if cfg.stem == "cnn":
            self.backbone, bref = create_backbone(cfg.image_backbone, cfg.image_weights)
            self.bases["backbone"] = bref
            self.mean, self.std = self.backbone.mean, self.backbone.std
            chans = {f"s{fi.stride}": fi.channels for fi in self.backbone.feature_info}
            if cfg.image_backbone.startswith("efficientnet"):
                chans["s32"] = self.backbone.feature_info[2].channels  # last block, before the 1280-d head
            stride = 8
            self.patch_embed = nn.Sequential(nn.LayerNorm(chans["s8"]), nn.Linear(chans["s8"], cfg.width))
        else:
            self.backbone = None
            self.mean, self.std = IMAGENET_MEAN, IMAGENET_STD  # trained from scratch: any fixed normalisation
            stride = cfg.patch_size
            self.patch_embed = nn.Conv2d(3, cfg.width, cfg.patch_size, stride=cfg.patch_size)
            self.patch_norm = nn.LayerNorm(cfg.width)
            chans = {}
        resolution = math.ceil(cfg.image_size / stride)
        self.gswin = Gswin(
            cfg.width, depths, resolution, cfg.window, cfg.head_dim, cfg.mlp_ratio, cfg.drop_path,
            use_shift=cfg.use_shift, use_global=cfg.use_global,
        )
        self.lateral = nn.ModuleDict(
            {
                s: nn.Sequential(nn.LayerNorm(chans[s]), nn.Linear(chans[s], self.gswin.dims[_INJECT_STAGE[s]]))
                for s in self.inject
            }
        )
        self.image_proj = nn.Linear(self.gswin.num_features, cfg.embed_dim)

        # ---- text half / multimodal half ----
        n = self.text.num_layers
        self.split = n // 2  # first half: text encoder; second half: multimodal encoder
        k = max(0, min(int(cfg.text_train_layers), self.split))
        self.text_prefix = self.split - k  # frozen, cached layers
        width = self.text.width
        bcfg = self.text.bert.config
        self.text_proj = nn.Linear(width, cfg.embed_dim)
        heads = int(bcfg.num_attention_heads)
        eps = float(getattr(bcfg, "layer_norm_eps", 1e-12))
        self.fusion = FusionEncoder(width, heads, n - self.split, eps)
        self.fusion_image = nn.Sequential(nn.Linear(self.gswin.num_features, width), nn.LayerNorm(width, eps=eps))
        self.itm_head = nn.Linear(width, 2)
        self.mlm_head = MLMHead(width, int(bcfg.vocab_size), eps)
        top = n if cfg.fusion_finetune else self.split
        self.finetuned = [f"text.bert.encoder.layer.{i}." for i in range(self.text_prefix, top)]
        if cfg.image_train_from and (cfg.image_train_from != "s16" or "s32" not in self.inject):
            raise ValueError("cmpagl fine-tunes the CNN from s16 only, with the cnn stem and s32 injected")
        self.tune_backbone_from(cfg.image_train_from)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / cfg.temperature)))

        tok = self.text.tokenizer
        self._special_ids = [i for i in (tok.cls_token_id, tok.sep_token_id, tok.pad_token_id) if i is not None]
        self._mask_id = tok.mask_token_id
        # training state, deliberately not registered (not saved, not moved by .to())
        object.__setattr__(self, "_momentum", None)
        object.__setattr__(self, "_queue", None)
        object.__setattr__(self, "_pending", None)
        object.__setattr__(self, "_gen", torch.Generator().manual_seed(0))

    # ---- image ----------------------------------------------------------------------------
    def image_features(self, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        if self.cfg.stem == "pixels":
            return {"pixels": pixels}
        if self.image_split:  # the fine-tuned stride-32 stage runs in _tokens
            maps = self.backbone.forward_features(pixels, upto="s16")
            return {"s8": maps["s8"], "s16": maps["s16"]}
        maps = self.backbone.forward_features(pixels, head=False)
        return {"s8": maps["s8"], **{s: maps[s] for s in self.inject}}

    @staticmethod
    def _grid(x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) → (B, H, W, C)
        return x.permute(0, 2, 3, 1)

    def _tokens(self, feats: dict[str, torch.Tensor], mods: Optional[dict] = None) -> list[torch.Tensor]:
        """Stage outputs of Gswin (list of (B, H, W, C)) from frozen features."""
        m = mods or self._online()
        if self.cfg.stem == "pixels":
            x = m["patch_norm"](self._grid(m["patch_embed"](feats["pixels"])))
            return m["gswin"](x)
        x = m["patch_embed"](self._grid(feats["s8"]))
        if self.image_split and "s32" not in feats:  # (the momentum copy has its own CNN top)
            feats = {**feats, "s32": m["backbone"].forward_from(feats["s16"].float(), "s16", head=False)["s32"]}
        lateral = {}
        res = x.shape[1:3]
        for i, s in enumerate(self.inject):
            mp = feats[s]
            st = _INJECT_STAGE[s]
            # the stage-st grid is ⌈res / 2^st⌉; the CNN's SAME padding gives the same size
            size = (math.ceil(res[0] / 2**st), math.ceil(res[1] / 2**st))
            if tuple(mp.shape[-2:]) != size:
                mp = F.adaptive_avg_pool2d(mp, size)
            lateral[st] = m["lateral"][s](self._grid(mp))
        return m["gswin"](x, lateral)

    def _online(self) -> dict[str, nn.Module]:
        d = {"gswin": self.gswin, "patch_embed": self.patch_embed, "lateral": self.lateral, "image_proj": self.image_proj}
        if self.cfg.stem == "pixels":
            d["patch_norm"] = self.patch_norm
        if self.image_split:
            d["backbone"] = self.backbone
        return d

    def _image_embed(self, feats, mods: Optional[dict] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(unit image feature (B, D), final tokens (B, h·w, C))."""
        m = mods or self._online()
        last = self._tokens(feats, m)[-1]
        toks = last.flatten(1, 2)
        return l2n(m["image_proj"](toks.mean(1))), toks

    def image_head(self, feats: dict[str, torch.Tensor]) -> torch.Tensor:
        return self._image_embed(feats)[0]

    def local_embeddings(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, D, h, w): the image projection at every last-stage token (patch similarity)."""
        last = self._tokens(self.image_features(pixels))[-1]
        return l2n(self.image_proj(last)).permute(0, 3, 1, 2)

    # ---- text -----------------------------------------------------------------------------
    def tokenize(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        return self.text.tokenize(texts)

    def text_features(self, tokens: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        mask = tokens["attention_mask"]
        hidden = self.text.embed_prefix(tokens["input_ids"], mask, self.text_prefix)
        return {"hidden": hidden, "mask": mask}

    def _text_hidden(self, feats: dict[str, torch.Tensor], layers=None) -> torch.Tensor:
        """Token states at the end of the text half (B, L, W)."""
        hidden, mask = feats["hidden"], feats["mask"]
        if self.text_prefix < self.split:
            if layers is None:
                hidden = self.text.forward_layers(hidden, mask, self.text_prefix, self.split)
            else:
                hidden = self.text.forward_layers(hidden, mask, 0, None, layers=layers)
        return hidden

    def _text_embed(self, feats, layers=None, proj: Optional[nn.Module] = None) -> tuple[torch.Tensor, torch.Tensor]:
        hidden = self._text_hidden(feats, layers)
        pooled = mean_pool(hidden, feats["mask"]) if self.cfg.text_pool == "mean" else hidden[:, 0]
        return l2n((proj or self.text_proj)(pooled)), hidden

    def text_head(self, feats: dict[str, torch.Tensor]) -> torch.Tensor:
        return self._text_embed(feats)[0]

    # ---- multimodal encoder ----------------------------------------------------------------
    def _fusion_image(self, toks: torch.Tensor) -> torch.Tensor:
        """Image tokens for cross-attention: [pooled ; last-stage tokens] → text width."""
        return self.fusion_image(torch.cat([toks.mean(1, keepdim=True), toks], 1))

    def fuse(self, hidden: torch.Tensor, mask: torch.Tensor, img_tokens: torch.Tensor) -> torch.Tensor:
        """Multimodal encoder: BERT layers ``split..`` with cross-attention to ``img_tokens``."""
        ext = self.text.additive_mask(mask, hidden.dtype)
        layers = list(self.text.bert.encoder.layer)[self.split :]
        return self.fusion(layers, hidden, ext, img_tokens)

    def itm_logits(self, hidden, mask, img_tokens) -> torch.Tensor:
        return self.itm_head(self.fuse(hidden, mask, img_tokens)[:, 0])

    # ---- training -------------------------------------------------------------------------------
    def _trainable_text_layers(self) -> list[nn.Module]:
        return list(self.text.bert.encoder.layer)[self.text_prefix : self.split]

    def _ensure_momentum(self, device) -> None:
        if self._momentum is not None:
            return
        online = self._online()
        mom = {k: copy.deepcopy(v).to(device) for k, v in online.items()}
        mom["text_layers"] = nn.ModuleList(copy.deepcopy(l) for l in self._trainable_text_layers()).to(device)
        mom["text_proj"] = copy.deepcopy(self.text_proj).to(device)
        for mod in mom.values():
            mod.eval()
            for p in mod.parameters():
                p.requires_grad_(False)
        object.__setattr__(self, "_momentum", mom)
        q = MomentumQueue(self.cfg.queue_size, {"img": self.embed_dim, "txt": self.embed_dim}, device=device)
        object.__setattr__(self, "_queue", q)

    def _momentum_pairs(self):
        online = self._online()
        online["text_layers"] = nn.ModuleList(self._trainable_text_layers())
        online["text_proj"] = self.text_proj
        for k, mod in online.items():
            yield from zip(mod.parameters(), self._momentum[k].parameters())

    def training_loss(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        cfg = self.cfg
        fi, ft = batch["image_feats"], batch["text_feats"]
        device = next(iter(fi.values())).device
        self._ensure_momentum(device)
        b = batch["image_index"].shape[0]
        idx = batch["image_index"].long()
        lab = batch.get("label_index")
        lab = lab.long() if lab is not None else torch.full_like(idx, -1)
        captions = batch.get("captions") or [str(i) for i in idx.tolist()]
        cap = caption_ids(captions).to(device)

        img, toks = self._image_embed(fi)  # online unimodal features
        txt, hidden = self._text_embed(ft)
        with torch.no_grad():  # momentum features (eq. 18's Î, T̂)
            mom = self._momentum
            img_m, _ = self._image_embed(fi, mom)
            txt_m, _ = self._text_embed(ft, mom["text_layers"] if self.text_prefix < self.split else None, mom["text_proj"])
        q_feats, q_idx, q_cap, q_lab = self._queue.keys()
        k_idx = torch.cat([idx, q_idx])
        k_cap = torch.cat([cap, q_cap])
        k_lab = torch.cat([lab, q_lab])
        pos = (idx[:, None] == k_idx[None, :]) | (cap[:, None] == k_cap[None, :])
        same_label = (lab[:, None] == k_lab[None, :]) & (lab[:, None] >= 0)
        targets = soft_positive_targets(pos, same_label, cfg.label_alpha)
        scale = self.logit_scale.exp().clamp(max=100.0)
        out: dict[str, torch.Tensor] = {}
        if cfg.w_itc:
            out["itc"] = itc_loss(
                img, txt, torch.cat([img_m, q_feats["img"]]), torch.cat([txt_m, q_feats["txt"]]), targets, scale
            )
        same, _ = positive_masks(idx, None, captions)
        sim = img @ txt.T
        if cfg.w_triplet:
            out["triplet"] = optimized_triplet(
                sim, cfg.margin, positives=same, reduction="mean", hardest=cfg.triplet_hardest
            )
        nf = b if cfg.fusion_batch <= 0 else min(b, cfg.fusion_batch)
        if (cfg.w_itm or cfg.w_mlm) and nf > 0:
            img_tok = self._fusion_image(toks)
            mask = ft["mask"]
            if cfg.w_itm and b > 1:
                neg_img, neg_txt, ok = sample_hard_negatives((scale * sim).detach(), same, self._gen)
                r = torch.arange(nf, device=device)[ok[:nf]]
                if r.numel():
                    hid = torch.cat([hidden[r], hidden[r], hidden[neg_txt[r]]])
                    msk = torch.cat([mask[r], mask[r], mask[neg_txt[r]]])
                    im = torch.cat([img_tok[r], img_tok[neg_img[r]], img_tok[r]])
                    logits = self.itm_logits(hid, msk, im)
                    y = torch.cat([torch.ones(r.numel()), torch.zeros(2 * r.numel())]).long().to(device)
                    out["itm"] = F.cross_entropy(logits.float(), y)  # eq. 21
            if cfg.w_mlm:
                out["mlm"] = self._mlm(captions[:nf], img_tok[:nf], device)
        weights = {"itc": cfg.w_itc, "triplet": cfg.w_triplet, "itm": cfg.w_itm, "mlm": cfg.w_mlm}
        out["loss"] = sum(weights[k] * v for k, v in out.items())
        object.__setattr__(self, "_pending", (img_m.detach(), txt_m.detach(), idx.detach(), cap, lab.detach()))
        return out

    def _mlm(self, captions: Sequence[str], img_tok: torch.Tensor, device) -> torch.Tensor:
        tok = self.text.tokenize(list(captions))
        ids, labels = mask_tokens(
            tok["input_ids"], tok["attention_mask"], self._mask_id, int(self.text.bert.config.vocab_size),
            self._special_ids, self.cfg.mlm_prob, self._gen,
        )
        ids, labels, mask = ids.to(device), labels.to(device), tok["attention_mask"].to(device)
        with torch.no_grad():
            hidden = self.text.embed_prefix(ids, mask, self.text_prefix)
        if self.text_prefix < self.split:
            hidden = self.text.forward_layers(hidden, mask, self.text_prefix, self.split)
        h = self.fuse(hidden, mask, img_tok)
        sel = labels >= 0  # predict only the masked positions (the others carry no loss)
        logits = self.mlm_head(h[sel], self.text.bert.embeddings.word_embeddings.weight)
        return mlm_loss(logits, labels[sel])

    @torch.no_grad()
    def after_step(self, batch: dict[str, Any]) -> None:
        """Enqueue this step's momentum features, then θ_m ← m·θ_m + (1 − m)·θ."""
        if self._pending is None or self._momentum is None:
            return
        img_m, txt_m, idx, cap, lab = self._pending
        self._queue.enqueue({"img": img_m, "txt": txt_m}, idx, cap, lab)
        on, mo = zip(*self._momentum_pairs())
        momentum_update(on, mo, self.cfg.momentum)
        object.__setattr__(self, "_pending", None)

    # ---- explanations ---------------------------------------------------------------------
    def gradcam_layers(self) -> dict[str, nn.Module]:
        # preset: the second-to-last stage (8×8 at 256 px with the cnn stem, like a CNN's
        # stride-32 CAM); then the last stage and the finer ones
        taps = [(f"gswin.stage{i + 1}", st.tap) for i, st in enumerate(self.gswin.stages)]
        order = ([taps[-2]] if len(taps) > 1 else []) + [taps[-1]] + list(reversed(taps[:-2]))
        layers = dict(order)
        bb = self.backbone
        if bb is not None and hasattr(bb, "_blocks"):
            layers["backbone.s8"] = bb._blocks[bb.feature_info[0].block_index]
        elif bb is not None and hasattr(bb, "layer2"):
            layers["backbone.s8"] = bb.layer2
        return layers

    @staticmethod
    def _received(attn: torch.Tensor, h: int, w: int, ws: int, shift: int = 0) -> np.ndarray:
        """Mean attention each position *receives* in window attention (B·nW, heads, N, N) → (h, w)."""
        from .gswin import window_reverse

        hp, wp = math.ceil(h / ws) * ws, math.ceil(w / ws) * ws
        rec = attn[: (hp // ws) * (wp // ws)].mean(1).mean(1)  # (nW, N): mean over heads, then queries
        grid = window_reverse(rec[..., None], ws, hp, wp)[0, ..., 0]
        if shift:
            grid = torch.roll(grid, (shift, shift), dims=(0, 1))
        return grid[:h, :w].float().cpu().numpy()

    @torch.no_grad()
    def explain_maps(self, pixels: torch.Tensor, text: str) -> ExplainMaps:
        """Gswin last-layer attention (paper Fig. 7) and the multimodal encoder's grounding.

        - ``image_maps["gswin/last"]``: mean attention received per position in the last
          Gswin block (local + shifted-window self-attention), on the last stage's grid;
        - ``image_maps["gswin/last/global-local"]``: attention the local windows pay to
          each global-window position (GLW-CA) of that block; the global window is a
          pooled view of the whole map, so it lies over the image;
        - ``image_maps["gswin/stageK"]``: the same received attention at every stage's
          last block (stage 1 is the finest grid);
        - ``image_maps["cross/text"]``: the multimodal encoder's [CLS] cross-attention
          over the image tokens (text-conditioned); ``token_maps["cross/words"]``: the
          same per word piece; ``image_maps["similarity"]``: cosine of the text feature
          with the projected last-stage tokens (shifted to ≥ 0);
        - ``extra``: ``score`` (retrieval cosine) and ``itm`` (match probability).
        """
        text = check_query(text)
        was_training = self.training
        self.eval()
        pixels = pixels[:1].to(self.device)
        self.gswin.set_keep_attention(True)
        self.fusion.set_keep_attention(True)
        try:
            feats = self.image_features(pixels)
            outs = self._tokens(feats)
            maps: dict[str, np.ndarray] = {}
            for si, (stage, o) in enumerate(zip(self.gswin.stages, outs)):
                h, w = o.shape[1:3]
                ws = effective_window(h, w, self.cfg.window)
                shift = ws // 2 if (self.cfg.use_shift and min(h, w) > ws) else 0
                blk = stage.blocks[-1]
                parts = [self._received(blk.attn_l.last_attention, h, w, ws)]
                if self.cfg.use_shift and blk.attn_s.last_attention is not None:
                    parts.append(self._received(blk.attn_s.last_attention, h, w, ws, shift))
                recv = np.mean(parts, 0)
                maps[f"gswin/stage{si + 1}"] = recv
                if si == len(outs) - 1:
                    maps["gswin/last"] = recv
                    if self.cfg.use_global and blk.ca1.last_attention is not None:
                        g = [blk.ca1.last_attention]
                        if self.cfg.use_shift:
                            g.append(blk.ca2.last_attention)
                        # (1, nW, heads, N, N) → mean over windows, heads, queries → (N,) over the global window
                        gw = torch.stack([a[0].mean((0, 1, 2)) for a in g]).mean(0)
                        maps["gswin/last/global-local"] = gw.reshape(ws, ws).float().cpu().numpy()
            last = outs[-1]
            toks = last.flatten(1, 2)
            img = l2n(self.image_proj(toks.mean(1)))
            tok = {k: v.to(self.device) for k, v in self.tokenize([text]).items()}
            tfeats = self.text_features(tok)
            txt, hidden = self._text_embed(tfeats)
            h, w = last.shape[1:3]
            local = l2n(self.image_proj(last))[0]  # (h, w, D)
            sim = (local @ txt[0]).float().cpu().numpy()
            maps["similarity"] = sim - sim.min()
            logits = self.itm_logits(hidden, tfeats["mask"], self._fusion_image(toks))
            ca = torch.stack([c.last_attention[0].mean(0) for c in self.fusion.cross]).mean(0)  # (L, 1 + h·w)
            ca = ca[:, 1:].reshape(-1, h, w).float().cpu().numpy()
            maps["cross/text"] = ca[0]
            ids = tok["input_ids"][0]
            pieces = self.text.words(ids[None])[0]
            keep = [i for i, t in enumerate(ids.tolist()) if t not in self._special_ids]
            return ExplainMaps(
                image_maps=maps,
                token_maps={"cross/words": ca[keep]},
                words=[pieces[i] for i in keep],
                extra={
                    "score": float(img[0] @ txt[0]),
                    "itm": float(logits.float().softmax(-1)[0, 1]),
                    "grid": [int(h), int(w)],
                },
            )
        finally:
            self.gswin.set_keep_attention(False)
            self.fusion.set_keep_attention(False)
            self.train(was_training)
