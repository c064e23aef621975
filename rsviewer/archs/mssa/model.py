"""``mssa`` — Multi-Scale Semantic-Aware retrieval (He et al., Remote Sens. 2025, 17, 3341).

Pipeline (paper §4, Fig. 1), over pluggable frozen backbones:

- **DBFE** (§4.2): image maps at 1/8, 1/16, 1/32 (EfficientNet-Lite s8/s16/s32-head maps
  by default; ResNet stages or ViT grids when the user gives ``image_backbone`` /
  ``image_weights``), each LayerNorm + Linear-projected (``widths``, default 32/64/128);
  text = the token states of the frozen text encoder (MiniLM-L6 by default, any local
  BERT folder via ``text_weights``) at 1/1, then two masked stride-2 token poolings for
  1/2 and 1/4, each projected to ``text_width`` (128).
- **CMSAM** (§4.3): per scale m, I*_m = PSCJA(I_m) (WRGPA-Block → SCA-Block);
  T*_n = IGTA(T_n, I*_m) with text 1/1 ↔ image 1/8, 1/2 ↔ 1/16, 1/4 ↔ 1/32;
  CMSE: 20 learnable semantic tokens per scale per modality, Ĩ_m = A_cross(Ī_m, I*_m),
  T̃_n = A_cross(T̄_n, T*_n).
- **MSFM** (§4.4): f(X) = Concat(Linear_128(Pool(X))) over the three scales for I*, T*,
  Ĩ, T̃ → Ĭ, T˘, Î, T̂ (3 × 128 each); Î ← A_cross(Î, Ĭ), T̂ ← A_cross(T̂, T˘);
  score = cos(flatten Î, flatten T̂).
- **Loss** (§4.5): bidirectional hinge (triplet) with margin; here the VSE++ hardest
  negative form, plus (``loss="both"``, default) the project's InfoNCE — see below.

Because IGTA makes the text vector depend on the image, the model is ``pairwise``:
image states hold the final image vector ("emb", image-only as in the paper) and the
PSCJA maps IGTA attends to; text states hold the projected token sequences and an
image-independent "emb" = the same text path with IGTA switched off (T*_n = T_n). The
"emb" pair is the stage-1 candidate generator of two-stage search (the paper's §6.2
future-work design); ``score`` is the full pairwise MSSA score.

What is *not* as in the paper, and why (CPU, 1,680 training images, frozen backbones):

- Backbones are frozen and their maps cached (the paper fine-tunes ResNet-50 + BERT).
- Widths: the paper keeps each backbone stage's channels (512/1024/2048 for ResNet-50)
  until MSFM's Linear-128. Here every scale is projected first, to 32/64/128 channels
  at 1/8, 1/16, 1/32 (``widths=[128,128,128]`` gives one common width): PSCJA runs over
  1,024 / 256 / 64 positions per image, so these widths give each scale about the same
  cost on a shared 2-core CPU, and EfficientNet-Lite's 1/8 and 1/16 maps have only 40
  and 112 channels to begin with.
- Heads: IGTA and the text-side CMSE run once per (image, caption) pair — 220,500 pairs
  for UCM val — so they use 1 head by default (``igta_heads``, ``text_cmse_heads``);
  the image-side attentions use width // ``head_dim`` heads (32-d heads: 1, 2, 4 heads
  at widths 32, 64, 128; window attention over 64 tokens costs heads × 64² per window).
- Windows: input 256 px gives 32/16/8 maps; the paper's 7×7 windows on 28/14/7 maps only
  form quadrants at 1/8 (at 1/16 each quadrant is a single window, so the shuffle is the
  identity; at 1/32 the whole map is one window). Default windows are (8, 4, 2): every
  scale is cut into a 4×4 grid of windows, 2×2 per quadrant, so window, region
  (shuffle) and global (proxy) attention all do something at every scale. Any window
  size works (padding + masks), e.g. ``windows=[7,7,7]`` at 224 px reproduces the paper.
- Residual and LayerNorm placement: WRGPA's three stages each add to their input; IGTA,
  CMSE's inputs and MSFM's cross-attention are pre-norm with a residual on the query
  side (T*_n = T_n + A_cross(LN T_n, LN I*_m); the paper writes T*_n = A_cross(T_n, I*_m),
  which would replace every word by image content). IGTA's output projection starts at
  zero, so training starts from the image-independent text path.
- IGTA keys at 1/8 are the PSCJA map 2×2 average-pooled (``igta_pool``): 1,024 keys per
  image × 1,050 captions × 210 images is too slow for full pairwise scoring on a CPU;
  PSCJA and CMSE still run on the full 1/8 map.
- Pooling in MSFM is the mean (tokens/positions; masked for text).
- Loss: hinge + InfoNCE on the full scores of each image's own caption, its hardest
  stage-1 negatives and a few random ones (all B×B pairs would cost 16k IGTA passes per
  step), plus an auxiliary label-aware soft InfoNCE on the stage-1 "emb" pair so that
  candidates are good. Identical caption strings are never negatives.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ...nets.factory import create_backbone
from ...nets.text import TextEncoder
from ...train.losses import info_nce, positive_masks, soft_targets
from ..base import BaseConfig, ExplainMaps, RetrievalModel, backbone_cam_layers, check_query, l2n
from ..registry import register
from .layers import NEG, PSCJA, CrossAttention, TokenCrossAttention, masked_mean, pool_tokens

SCALES = ("s8", "s16", "s32")  # image scales 1/8, 1/16, 1/32
TEXT_SCALES = ("t1", "t2", "t4")  # text scales 1/1, 1/2, 1/4 (paired with SCALES by IGTA)


@dataclass
class MSSAConfig(BaseConfig):
    embed_dim: int = 384  # MSFM output: 3 scales × 128 (must be divisible by 3)
    widths: list = field(default_factory=lambda: [32, 64, 128])  # image width per scale (1/8, 1/16, 1/32)
    text_width: int = 128  # width of every text scale
    depth: int = 1  # PSCJA (WRGPA-Block + SCA-Block) repeats per scale
    head_dim: int = 32  # image-side and MSFM attention: heads = width // head_dim (d_k of §3)
    windows: list = field(default_factory=lambda: [8, 4, 2])  # WRGPA window side per scale; 0 = map/4
    sca_groups: int = 4  # G of SCA
    mlp_ratio: float = 2.0
    n_tokens: int = 20  # CMSE semantic tokens per scale per modality
    igta_dim: int = 64  # IGTA attention width (Q/K/V)
    igta_heads: int = 1  # IGTA heads (softmax over 1,050 × 210 × L × N logits dominates scoring)
    text_cmse_heads: int = 1  # heads of the text-side CMSE (runs once per image-caption pair)
    igta_pool: int = 2  # average-pool the 1/8 map k×k for IGTA keys (1 = full map)
    pool: str = "mean"  # MSFM Pool(I*_m), Pool(T*_n): "mean" | "meanmax" (mean ‖ max, then Linear-128)
    dropout: float = 0.0  # MLP dropout inside PSCJA (costly on 1,024-token maps; off by default)
    loss: str = "both"  # full-score loss: "triplet" (paper) | "infonce" | "both"
    margin: float = 0.2
    label_alpha: float = 0.5  # soft same-label targets of the stage-1 InfoNCE
    full_label_alpha: float = 0.0  # ... and of the full-score InfoNCE
    emb_weight: float = 1.0  # weight of the stage-1 ("emb") InfoNCE
    cand_hard: int = 8  # per image: hardest stage-1 negatives scored with the full model
    cand_random: int = 4  # per image: random negatives scored with the full model
    temperature: float = 0.05  # initial, learned


class _Side(nn.Module):
    """Per-modality MSFM (§4.4): f(X) for features and semantics, then Î = A_cross(Î, Ĭ)."""

    def __init__(self, widths: Sequence[int], fuse: int, heads: int, pool_factor: int = 1):
        super().__init__()
        self.feat = nn.ModuleList(nn.Linear(w * pool_factor, fuse) for w in widths)
        self.sem = nn.ModuleList(nn.Linear(w, fuse) for w in widths)
        self.norm_q, self.norm_kv = nn.LayerNorm(fuse), nn.LayerNorm(fuse)
        self.att = CrossAttention(fuse, fuse, heads)

    def forward(self, feats: Sequence[torch.Tensor], sems: Sequence[torch.Tensor]) -> torch.Tensor:
        """Pooled (…, width) per scale → (…, 3·fuse) unit vector."""
        g = torch.stack([lin(x) for lin, x in zip(self.feat, feats)], -2)  # Ĭ / T˘: (…, 3, F)
        s = torch.stack([lin(x) for lin, x in zip(self.sem, sems)], -2)  # Î / T̂: (…, 3, F)
        s = s + self.att(self.norm_q(s), self.norm_kv(g))  # A_cross(Î, Ĭ)
        return l2n(s.flatten(-2))


@register
class MSSA(RetrievalModel):
    arch = "mssa"
    Config = MSSAConfig
    pairwise = True
    feature_version = "1"
    feature_keys = {
        "image": ("image_backbone", "image_weights", "image_size"),
        "text": ("text_weights", "max_tokens"),
    }
    # the recipe of models/mssa-ucm, chosen by 9-fold CV (52.00 ± 0.65; 4 views: 51.81): the weight EMA
    # steadies the curve; full pairwise validation is the costly part of an epoch, so it runs every 2 epochs
    train_defaults = {"epochs": 12, "lr": 1e-3, "views": 8, "batch_size": 128, "weight_decay": 0.05, "ema": 0.98, "eval_every": 2}

    def __init__(self, cfg: MSSAConfig, extra=None):
        super().__init__(cfg, extra)
        if cfg.embed_dim % 3:
            raise ValueError(f"embed_dim {cfg.embed_dim} must be divisible by 3 (MSFM concatenates 3 scales)")
        if cfg.loss not in ("triplet", "infonce", "both"):
            raise ValueError(f"unknown loss {cfg.loss!r}; choose triplet, infonce or both")
        if len(cfg.windows) != 3:
            raise ValueError("windows needs one window size per scale (1/8, 1/16, 1/32)")
        self.backbone, bref = create_backbone(cfg.image_backbone, cfg.image_weights)
        self.text = TextEncoder(cfg.text_weights, cfg.max_tokens)
        self.bases = {"backbone": bref, "text": self.text.weights_ref}
        self.mean, self.std = self.backbone.mean, self.backbone.std
        if len(cfg.widths) != 3:
            raise ValueError("widths needs one width per image scale (1/8, 1/16, 1/32)")
        dims, dt, fuse = [int(w) for w in cfg.widths], int(cfg.text_width), cfg.embed_dim // 3
        chans = [self.backbone.feature_info[0].channels, self.backbone.feature_info[1].channels, self.backbone.num_features]
        # expected map sides at the configured input size (windows "0" = map/4)
        sides = [max(1, -(-cfg.image_size // s)) for s in (8, 16, 32)]
        self.windows = [int(w) if int(w) > 0 else max(1, -(-sides[i] // 4)) for i, w in enumerate(cfg.windows)]

        # image branch: projection, PSCJA, CMSE image tokens
        self.img_proj = nn.ModuleList(nn.Sequential(nn.LayerNorm(c), nn.Linear(c, d)) for c, d in zip(chans, dims))
        self.pscja = nn.ModuleList(
            PSCJA(d, self._heads(d), self.windows[i], cfg.sca_groups, cfg.mlp_ratio, cfg.dropout, cfg.depth)
            for i, d in enumerate(dims)
        )
        self.img_norm = nn.ModuleList(nn.LayerNorm(d) for d in dims)
        self.img_cmse = nn.ModuleList(TokenCrossAttention(d, cfg.n_tokens, self._heads(d)) for d in dims)
        # text branch: projection, IGTA, CMSE text tokens
        tw = self.text.width
        self.txt_proj = nn.ModuleList(nn.Sequential(nn.LayerNorm(tw), nn.Linear(tw, dt)) for _ in TEXT_SCALES)
        self.igta_tnorm = nn.ModuleList(nn.LayerNorm(dt) for _ in SCALES)
        self.igta_inorm = nn.ModuleList(nn.LayerNorm(d) for d in dims)
        self.igta = nn.ModuleList(
            CrossAttention(dt, d, cfg.igta_heads, attn_dim=cfg.igta_dim, zero_out=True) for d in dims
        )
        self.txt_norm = nn.ModuleList(nn.LayerNorm(dt) for _ in SCALES)
        self.txt_cmse = nn.ModuleList(TokenCrossAttention(dt, cfg.n_tokens, cfg.text_cmse_heads) for _ in SCALES)
        # MSFM
        if cfg.pool not in ("mean", "meanmax"):
            raise ValueError(f"unknown pool {cfg.pool!r}; choose mean or meanmax")
        pf = 2 if cfg.pool == "meanmax" else 1
        self.msfm_img = _Side(dims, fuse, self._heads(fuse), pf)
        self.msfm_txt = _Side([dt] * 3, fuse, self._heads(fuse), pf)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / cfg.temperature)))
        self.logit_scale_emb = nn.Parameter(torch.tensor(math.log(1.0 / cfg.temperature)))

    def _heads(self, width: int) -> int:
        return max(1, width // self.cfg.head_dim) if width % max(1, width // self.cfg.head_dim) == 0 else 1

    def _pool(self, x: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
        """MSFM's Pool over tokens (…, N, C) → (…, C) or (…, 2C) for mean ‖ max."""
        mean = masked_mean(x, mask)
        if self.cfg.pool == "mean":
            return mean
        mx = x if mask is None else x.masked_fill(~mask.unsqueeze(-1), NEG)
        return torch.cat([mean, mx.amax(-2)], -1)

    # ---- frozen part ------------------------------------------------------------------
    def tokenize(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        return self.text.tokenize(texts)

    def image_features(self, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        maps = self.backbone.forward_features(pixels)
        return {k: maps[k] for k in SCALES}

    def text_features(self, tokens: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        mask = tokens["attention_mask"]
        return {"hidden": self.text(tokens["input_ids"], mask), "mask": mask}

    # ---- image path --------------------------------------------------------------------
    def _image_path(self, feats: dict[str, torch.Tensor], need_weights: bool = False) -> dict:
        out: dict = {"maps": [], "keys": [], "sem_attn": []}
        pooled_f, pooled_s = [], []
        for i, name in enumerate(SCALES):
            x = feats[name].permute(0, 2, 3, 1)  # (B, h, w, C)
            x = self.pscja[i](self.img_proj[i](x))  # I*_m = PSCJA(I_m)   (§4.3.1)
            b, h, w, d = x.shape
            tokens = x.reshape(b, h * w, d)
            xs = self.img_norm[i](tokens)
            if need_weights:
                sem, att = self.img_cmse[i](xs, need_weights=True)  # Ĩ_m = A_cross(Ī_m, I*_m)   (§4.3.3)
                out["sem_attn"].append(att.reshape(b, -1, h, w))
                pooled_s.append(sem.mean(-2))
            else:
                pooled_s.append(self.img_cmse[i].pooled(xs))
            pooled_f.append(self._pool(tokens, None))  # Pool(I*_m)   (§4.4)
            kx = x
            if i == 0 and self.cfg.igta_pool > 1 and min(h, w) >= self.cfg.igta_pool:
                kx = F.avg_pool2d(x.permute(0, 3, 1, 2), self.cfg.igta_pool, ceil_mode=True).permute(0, 2, 3, 1)
            out["keys"].append(self.igta_inorm[i](kx.reshape(b, -1, d)))
            out["maps"].append(x)
        out["emb"] = self.msfm_img(pooled_f, pooled_s)
        return out

    def image_states_from(self, feats: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        p = self._image_path(feats)
        return {"emb": p["emb"], **{f"i{n[1:]}": k for n, k in zip(SCALES, p["keys"])}}

    def image_head(self, feats: dict[str, torch.Tensor]) -> torch.Tensor:
        return self._image_path(feats)["emb"]

    # ---- text path ---------------------------------------------------------------------
    def text_states_from(self, feats: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        hidden, mask = feats["hidden"], feats["mask"] > 0
        n = self.cfg.max_tokens  # fixed length so states of separately tokenised batches concatenate
        if hidden.shape[1] < n:
            hidden = F.pad(hidden, (0, 0, 0, n - hidden.shape[1]))
            mask = F.pad(mask, (0, n - mask.shape[1]), value=False)
        hidden, mask = hidden[:, :n], mask[:, :n]
        seqs, masks = [hidden], [mask]
        for _ in range(2):  # two token poolings: 1/1 → 1/2 → 1/4   (§4.1)
            h2, m2 = pool_tokens(seqs[-1], masks[-1])
            seqs.append(h2)
            masks.append(m2)
        ts = [proj(s) for proj, s in zip(self.txt_proj, seqs)]
        states = {"emb": self._text_vector(ts, masks)}
        for name, t, m in zip(TEXT_SCALES, ts, masks):
            states[name] = t
            states["m" + name[1:]] = m.to(t.dtype)
        return states

    def text_head(self, feats: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.text_states_from(feats)["emb"]

    def _text_vector(self, ts: Sequence[torch.Tensor], masks: Sequence[torch.Tensor]) -> torch.Tensor:
        """CMSE (text side) + MSFM on T*_n (…, L_n, D) → (…, 3F) unit vectors."""
        feats, sems = [], []
        for i, (t, m) in enumerate(zip(ts, masks)):
            feats.append(self._pool(t, m))  # Pool(T*_n)
            sems.append(self.txt_cmse[i].pooled(self.txt_norm[i](t), m))  # Pool(A_cross(T̄_n, T*_n))
        return self.msfm_txt(feats, sems)

    def _igta(self, i: int, keys: torch.Tensor, t: torch.Tensor, need_weights: bool = False):
        """T*_n = T_n + A_cross(LN T_n, I*_m)   (§4.3.2) for every (image, text) pair.

        ``keys`` (Ni, N, D) LayerNormed image tokens; ``t`` (Ni or 1, K, L, D) text tokens
        (K texts per image, or shared by all images) → (Ni, K, L, D) [and the attention
        logits (Ni, K, heads, L, N) when ``need_weights``].
        """
        att = self.igta[i]
        ni, nk = keys.shape[0], keys.shape[1]
        _, k_, l_, d = t.shape
        h = att.heads
        dh = att.attn_dim // h
        q = att.q(self.igta_tnorm[i](t)) * (1.0 / math.sqrt(dh))  # (Ni|1, K, L, da), pre-scaled
        q = q.reshape(q.shape[0], k_ * l_, h, dh).transpose(1, 2)  # (Ni|1, h, K·L, dh)
        kk = att.k(keys).reshape(ni, nk, h, dh).transpose(1, 2)  # (Ni, h, N, dh)
        vv = att.v(keys).reshape(ni, nk, h, dh).transpose(1, 2)
        if need_weights:
            logits = q @ kk.transpose(-1, -2)  # (Ni, h, K·L, N) = Q K^T / √d_k
            ctx = logits.softmax(-1) @ vv  # (Ni, h, K·L, dh)
        else:  # fused kernel, same result without materialising the logits
            ctx = F.scaled_dot_product_attention(q.expand(ni, -1, -1, -1), kk, vv, scale=1.0)
        ctx = ctx.transpose(1, 2).reshape(ni, k_, l_, h * dh)
        tstar = t + att.out(ctx)
        if need_weights:
            return tstar, logits.reshape(ni, h, k_, l_, nk).transpose(1, 2)
        return tstar

    def _pair_vectors(self, img: dict, txt_seqs: Sequence[torch.Tensor], txt_masks: Sequence[torch.Tensor]) -> torch.Tensor:
        """Full MSSA text vectors (Ni, K, 3F) for texts (Ni|1, K, L_n, D) against images ``img``."""
        ts = [self._igta(i, img[f"i{n[1:]}"], t) for i, (n, t) in enumerate(zip(SCALES, txt_seqs))]
        return self._text_vector(ts, txt_masks)

    # ---- scoring -----------------------------------------------------------------------
    def score(
        self, image_states: dict[str, torch.Tensor], text_states: dict[str, torch.Tensor], max_elems: int = 1 << 23
    ) -> torch.Tensor:
        """Full pairwise MSSA scores (Ni, Nt): cos(Î_i, T̂(t_j | I*_i)).

        Captions are processed in length-sorted chunks trimmed to their longest caption
        (masked tokens do not change the result); image × text chunks keep the IGTA
        attention tensor under ``max_elems`` elements.
        """
        ni = image_states["emb"].shape[0]
        nt = text_states["emb"].shape[0]
        dev = image_states["emb"].device
        out = torch.empty(ni, nt, dtype=image_states["emb"].dtype, device=dev)
        if ni == 0 or nt == 0:
            return out
        masks = [text_states["m" + n[1:]] > 0.5 for n in TEXT_SCALES]
        lengths = masks[0].sum(1)
        order = torch.argsort(lengths, stable=True)
        heads = self.cfg.igta_heads
        n_keys = max(image_states[f"i{n[1:]}"].shape[1] for n in SCALES)
        t_chunk = 256
        for s in range(0, nt, t_chunk):
            idx = order[s : s + t_chunk]
            lmax = max(1, int(lengths[idx].max()))
            lens = [lmax, -(-lmax // 2), -(-lmax // 4)]
            seqs = [text_states[n][idx, :ln][None] for n, ln in zip(TEXT_SCALES, lens)]  # (1, K, L, D)
            ms = [m[idx, :ln][None] for m, ln in zip(masks, lens)]
            per_image = max(1, len(idx) * lmax * heads * n_keys)
            i_chunk = max(1, min(ni, max_elems // per_image))
            for a in range(0, ni, i_chunk):
                img = {k: v[a : a + i_chunk] for k, v in image_states.items()}
                tv = self._pair_vectors(img, seqs, ms)  # (ni_c, K, 3F)
                out[a : a + i_chunk, idx] = (tv * img["emb"][:, None, :]).sum(-1)
        return out

    def stage1_score(self, image_states: dict[str, torch.Tensor], text_states: dict[str, torch.Tensor]) -> torch.Tensor:
        """Image-independent candidate scores ``img["emb"] @ txt["emb"].T``."""
        return image_states["emb"] @ text_states["emb"].T

    # ---- training ----------------------------------------------------------------------
    def training_loss(self, batch):
        cfg = self.cfg
        img = self._image_path(batch["image_feats"])
        img_states = {"emb": img["emb"], **{f"i{n[1:]}": k for n, k in zip(SCALES, img["keys"])}}
        txt = self.text_states_from(batch["text_feats"])
        b = img["emb"].shape[0]
        dev = img["emb"].device
        same, same_label = positive_masks(batch["image_index"], batch.get("label_index"), batch.get("captions"))
        terms: dict[str, torch.Tensor] = {}

        # stage-1 ("emb") pair: label-aware soft InfoNCE so that candidates are good
        scale_e = self.logit_scale_emb.exp().clamp(max=100.0)
        terms["emb"] = info_nce(img["emb"], txt["emb"], scale_e, soft_targets(same, same_label, cfg.label_alpha))

        # full MSSA scores on candidates: own caption + hardest stage-1 negatives + random ones
        with torch.no_grad():
            s1 = (img["emb"] @ txt["emb"].T).masked_fill(same, -2.0)
            kh = min(cfg.cand_hard, b - 1)
            hard = s1.topk(kh, dim=1).indices if kh > 0 else torch.zeros(b, 0, dtype=torch.long, device=dev)
            taken = same.clone()
            taken.scatter_(1, hard, True)
            kr = min(cfg.cand_random, int((~taken).sum(1).min()))
            if kr > 0:
                noise = torch.rand(b, b, device=dev).masked_fill(taken, -1.0)
                rand = noise.topk(kr, dim=1).indices
            else:
                rand = torch.zeros(b, 0, dtype=torch.long, device=dev)
            cand = torch.cat([torch.arange(b, device=dev)[:, None], hard, rand], 1)  # (B, Kc)
        lens = txt["m1"].sum(1)
        lmax = max(1, int(lens.max()))
        lens3 = [lmax, -(-lmax // 2), -(-lmax // 4)]
        seqs = [txt[n][:, :ln][cand] for n, ln in zip(TEXT_SCALES, lens3)]  # (B, Kc, L, D)
        ms = [(txt["m" + n[1:]] > 0.5)[:, :ln][cand] for n, ln in zip(TEXT_SCALES, lens3)]
        tv = self._pair_vectors(img_states, seqs, ms)  # (B, Kc, 3F)
        sc = (tv * img["emb"][:, None, :]).sum(-1)  # (B, Kc) full scores
        full = torch.full((b, b), NEG, dtype=sc.dtype, device=dev)
        full = full.scatter(1, cand, sc)
        computed = torch.zeros(b, b, dtype=torch.bool, device=dev).scatter(1, cand, True)
        if cfg.loss in ("infonce", "both"):
            scale = self.logit_scale.exp().clamp(max=100.0)
            tgt = soft_targets(same, same_label, cfg.full_label_alpha) * computed
            tgt = tgt / tgt.sum(1, keepdim=True).clamp_min(1e-12)
            logits = (scale * full).masked_fill(~computed, NEG)
            lt = tgt.T * computed.T
            lt = lt / lt.sum(1, keepdim=True).clamp_min(1e-12)
            terms["full_nce"] = 0.5 * (
                -(tgt * logits.log_softmax(1)).sum(1).mean() - (lt * logits.T.log_softmax(1)).sum(1).mean()
            )
        if cfg.loss in ("triplet", "both"):
            pos = sc[:, 0]  # image i with its own caption
            neg_ok = computed & ~same
            cost_t = (cfg.margin + full - pos[:, None]).clamp_min(0).masked_fill(~neg_ok, 0)  # image anchors
            cost_i = (cfg.margin + full - pos[None, :]).clamp_min(0).masked_fill(~neg_ok, 0)  # caption anchors
            terms["triplet"] = cost_t.max(1).values.mean() + cost_i.max(0).values.mean()
        full_terms = [v for k, v in terms.items() if k != "emb"]
        terms["loss"] = sum(full_terms) + cfg.emb_weight * terms["emb"]
        return terms

    # ---- explanations ------------------------------------------------------------------
    def gradcam_layers(self) -> dict[str, nn.Module]:
        return backbone_cam_layers(self.backbone, ("head", "s16", "s8"))

    @torch.no_grad()
    def explain_maps(self, pixels: torch.Tensor, text: str) -> ExplainMaps:
        """Paper-figure maps for one (image, text) pair.

        - ``image_maps["pscja/s8|s16|s32"]``: activation energy of the PSCJA output
          I*_m (L2 norm of each position's deviation from the map's mean feature; Fig. 8);
        - ``token_maps["s8|s16|s32"]``: (20, h, w) attention of each image semantic token
          over the map (Fig. 10, image side);
        - ``token_words["s8|s16|s32"]``: (20, n_words) attention of each text semantic token
          over the words at the text scale IGTA pairs with that image scale (1/1, 1/2, 1/4;
          a pooled token's weight is shared by the words it covers) — Fig. 10, text side;
        - ``word_weights["igta"]``: (3, n_words), rows 1/1, 1/2, 1/4: how strongly each word
          finds matching image content in IGTA (softmax over words of the log-sum-exp of
          its attention logits over image positions, averaged over heads) — Fig. 9;
        - ``extra``: ``score`` (full MSSA), ``stage1_score`` (emb), ``text_scales``.
        """
        was = self.training
        self.eval()
        text = check_query(text)
        dev = self.device
        pixels = pixels[:1].to(dev)
        img = self._image_path(self.image_features(pixels), need_weights=True)
        tokens = {k: v.to(dev) for k, v in self.tokenize([text]).items()}
        txt = self.text_states_from(self.text_features(tokens))
        ids = tokens["input_ids"][0]
        special = set(self.text.tokenizer.all_special_ids)
        keep = [j for j, t in enumerate(ids.tolist()) if t not in special and bool(tokens["attention_mask"][0, j])]
        words = [self.text.words(ids[None])[0][j] for j in keep]
        L = ids.shape[0]

        def to_words(w: torch.Tensor, stride: int) -> np.ndarray:
            """(…, L_n) weights over pooled tokens → (…, n_words), each word takes its token's weight."""
            full = w.repeat_interleave(stride, -1)[..., :L]
            return full[..., keep].float().cpu().numpy()

        ex = ExplainMaps(words=words)
        igta_rows, tstars = [], []
        for i, (name, tname) in enumerate(zip(SCALES, TEXT_SCALES)):
            m = img["maps"][i][0]  # (h, w, D)
            ex.image_maps[f"pscja/{name}"] = (m - m.reshape(-1, m.shape[-1]).mean(0)).norm(dim=-1).cpu().numpy()
            ex.token_maps[name] = img["sem_attn"][i][0].cpu().numpy()
            t = txt[tname][:, :][None]  # (1, 1, Ln, D)
            mask = txt["m" + tname[1:]] > 0.5  # (1, Ln)
            tstar, logits = self._igta(i, img["keys"][i], t, need_weights=True)  # logits (1, 1, h, Ln, N)
            tstars.append(tstar)
            rel = torch.logsumexp(logits[0, 0], -1).mean(0)  # (Ln,)
            rel = rel.masked_fill(~mask[0], float("-inf")).softmax(-1)
            stride = 2**i
            igta_rows.append(to_words(rel, stride))
            _, att = self.txt_cmse[i](self.txt_norm[i](tstar[0]), mask, need_weights=True)  # (1, T, Ln)
            ex.token_words[name] = to_words(att[0], stride)
        rows = np.stack(igta_rows)
        ex.word_weights["igta"] = rows / np.clip(rows.sum(1, keepdims=True), 1e-12, None)
        masks = [txt["m" + n[1:]] > 0.5 for n in TEXT_SCALES]
        full = (self._text_vector([t[0] for t in tstars], masks) * img["emb"]).sum(-1)
        ex.extra = {
            "score": float(full[0]),
            "stage1_score": float((img["emb"] @ txt["emb"].T)[0, 0]),
            "text_scales": dict(zip(SCALES, ("1/1", "1/2", "1/4"))),
            "windows": list(self.windows),
        }
        self.train(was)
        return ex
