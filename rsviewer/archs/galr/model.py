"""GaLR (Yuan et al., TGRS 2022): global + local visual encoder, BiGRU text, triplet loss.

    image ─ backbone ─┬─ s8 (low) + s16/s32 (high) ─ MVSA mask ─⊙─ pooled s32 ─ v_g  (eq. 3)
                      └─ objects ─ DREA (merge, boosted adjacency) ─ GCN ─ v_l     (eqs. 4–5, 11–18)
                         v = MIDF(v_g, v_l): SA, GA, v_g⊙σ(v_l), v_l+v_g, softmax weights (eqs. 19–24)
    text  ─ word embedding (300-d) ─ BiGRU ─ mean (h_f+h_b)/2 ─ MLP ─ t          (eqs. 7–10)
    score = cos(v, t) (eq. 2); loss = triplet, margin 0.2 (eq. 31)

What is faithful and what is substituted:

- **Backbone**: frozen and pluggable (EfficientNet-Lite0 ImageNet by default; ResNet /
  ViT with user weights). The paper fine-tunes ResNet-18; here the backbone is frozen
  and its maps cached (CPU training), so MVSA, GCN, MIDF and the text encoder train.
- **MVSA** follows AMFMN/GaLR's released ``VSA_Module``: low-level map (stride 8 here;
  stride 4+8 in the release) through a 3×3 stride-2 conv, high-level maps (stride 16 +
  upsampled stride 32) through a 1×1 conv, concatenated with the residual channel-mean
  of the high-level map; one 1×1 conv gives the feature, one the sigmoid mask; the
  masked map (16×16) → linear → sigmoid gates the pooled global vector channel-wise.
  A ReLU after the two input convs is added (the release is linear up to the sigmoid).
  The pooled global vector is mean‖max of the stride-32 map (``global_pool``; the
  release uses the mean of ResNet's last map).
- **Objects**: no DOTA-trained detector exists here → ``objects.py``: a detector-free
  source (clustering of the stride-16 feature grid into regions, categorised by the
  backbone's ImageNet classifier) or detections from a file. Which one is used is in
  the config (``object_source``) and in ``explain_maps``.
- **Graph / DREA / GCN**: eqs. 11–18 exactly (``graph.py``); node input = embedding of
  position, category, probability and area (the paper's list). ``node_appearance``
  optionally adds the region's mean stride-16 feature (off by default; an extension).
  GCN: three layers as released, flatten readout over the area-ranked node slots.
- **MIDF**: eqs. 19–24 with the MCAN SA/SGA blocks of the release (each branch is a
  single token, as in the release, so attention reduces to its value path). The
  release computes *both* dynamic weights from column 0 of the softmax
  (``dynamic_weight[:, 0]`` twice — a bug); here γ1 = column 0 and γ2 = column 1, so
  they sum to 1 (eq. 23–24).
- **Text**: word embedding 300-d + BiGRU + MLP (eqs. 7–10; the release actually uses
  skip-thoughts). No GloVe/skip-thought vectors exist here: the embedding table is
  random-init (``word_init="random"``) or initialised from MiniLM's input word-piece
  embeddings (mean over a word's pieces) projected to 300-d by PCA
  (``word_init="minilm"``); the vocabulary comes from the training captions and is
  saved in the checkpoint (``extra``).
- **Loss**: triplet, margin 0.2 (eq. 31). Eq. 31 and the release (``max_violation: 0``)
  sum over all negatives — the default; VSE++'s hardest negative is ``hardest=True``
  (from scratch it collapses here: with the random-init text encoder every embedding
  went to one point, loss = 2·margin, val mR ≈ 4; ``hardest_from_epoch`` warms up with
  the sum first). Identical captions of other images are never negatives. ``loss="both"`` adds label-aware
  InfoNCE (an extension, off unless set).
- **MR rerank** lives in ``rsviewer/retrieval/rerank.py`` (``rsviewer eval --rerank mr``).
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ...errors import ModelError
from ...nets.factory import create_backbone
from ...nets.efficientnet_lite import EfficientNetLite
from ...train.losses import info_nce, positive_masks, soft_targets, vse_triplet
from ..base import BaseConfig, ExplainMaps, RetrievalModel, backbone_cam_layers, check_query, l2n
from ..registry import register
from . import objects as objsrc
from .graph import GCN, Obj, build_graph, normalize_adjacency
from .vocab import Vocab, split_words


@dataclass
class GaLRConfig(BaseConfig):
    embed_dim: int = 256  # paper: 512 (halved to keep the checkpoint small)
    # ---- objects (local branch input) ----
    object_source: str = "cluster"  # "cluster" (no detector needed) | "file"
    detections: Optional[str] = None  # file source: folder of DOTA .txt or a JSON file
    detections_images: Optional[str] = None  # where the images named there are
    object_category: str = "auto"  # cluster source: "auto" | "imagenet" | "lsh"
    n_clusters: int = 16
    cluster_spatial: float = 1.0  # weight of (x, y) against the unit feature in k-means
    cluster_smooth: int = 3  # box filter on the grid before clustering (1: none)
    category_groups: int = 32  # imagenet: pool the 1000 classes into this many groups (0: raw classes)
    lsh_bits: int = 6
    max_objects: int = 20  # nodes kept after DREA (largest first), as in the release
    drea: bool = True  # False: the paper's "LF w/o DREA" ablation
    merge_threshold: float = 0.8  # š, eq. 13
    boost: float = 1.15  # 𝔇, eq. 18
    # ---- local branch ----
    node_dim: int = 64
    gcn_out: int = 32
    gcn_readout: str = "flatten"  # "flatten" (release) | "mean"
    node_appearance: bool = False
    # ---- global branch ----
    mvsa_channels: int = 64
    mvsa_grid: int = 16
    global_pool: str = "mean_max"  # "mean" | "mean_max"
    global_head: str = "linear"  # "linear" (release) | "mlp"
    global_hidden: int = 1024
    # ---- fusion ----
    fusion: str = "midf"  # "midf" | "add" (ablation f2) | "global" (g2) | "local" (l2)
    midf_heads: int = 8
    midf_ff: int = 512
    dynamic_dim: int = 256
    dropout: float = 0.1
    # ---- text ----
    word_dim: int = 300
    gru_hidden: int = 256
    word_init: str = "random"  # "random" | "minilm"
    word_dropout: float = 0.0
    # ---- loss ----
    loss: str = "triplet"  # "triplet" | "both" (+ InfoNCE) | "infonce"
    margin: float = 0.2
    hardest: bool = False  # False: eq. 31 / the release (sum over negatives); True: VSE++ hardest
    hardest_from_epoch: int = 0  # with hardest: sum over negatives before this epoch (warm-up)
    label_alpha: float = 0.5
    temperature: float = 0.05


# ---- MCAN blocks used by MIDF (as in the release's GaLR_utils) --------------------------------
class MHAtt(nn.Module):
    def __init__(self, dim: int, heads: int, dropout: float):
        super().__init__()
        if dim % heads:
            raise ModelError(f"embed_dim {dim} is not divisible by midf_heads {heads}")
        self.h = heads
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))
        self.drop = nn.Dropout(dropout)

    def forward(self, v: torch.Tensor, k: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        b, nq, d = q.shape
        split = lambda x: x.view(b, -1, self.h, d // self.h).transpose(1, 2)  # noqa: E731
        qh, kh, vh = split(self.q(q)), split(self.k(k)), split(self.v(v))
        att = self.drop((qh @ kh.transpose(-2, -1) / math.sqrt(d // self.h)).softmax(-1))
        return self.o((att @ vh).transpose(1, 2).reshape(b, nq, d))


class FFN(nn.Module):
    def __init__(self, dim: int, ff: int, dropout: float):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim, ff), nn.ReLU(), nn.Dropout(dropout), nn.Linear(ff, dim))

    def forward(self, x):
        return self.net(x)


class SA(nn.Module):
    """Self-attention block: LN(x + MHA(x, x, x)), LN(x + FFN(x))."""

    def __init__(self, dim: int, heads: int, ff: int, dropout: float):
        super().__init__()
        self.att, self.ffn = MHAtt(dim, heads, dropout), FFN(dim, ff, dropout)
        self.n1, self.n2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.drop = nn.Dropout(dropout)

    def forward(self, x):
        x = self.n1(x + self.drop(self.att(x, x, x)))
        return self.n2(x + self.drop(self.ffn(x)))


class GA(nn.Module):
    """Guided attention (the release's SGA): self-attention on x, then x attends to y."""

    def __init__(self, dim: int, heads: int, ff: int, dropout: float):
        super().__init__()
        self.att1, self.att2 = MHAtt(dim, heads, dropout), MHAtt(dim, heads, dropout)
        self.ffn = FFN(dim, ff, dropout)
        self.n1, self.n2, self.n3 = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.drop = nn.Dropout(dropout)

    def forward(self, x, y):
        x = self.n1(x + self.drop(self.att1(x, x, x)))
        x = self.n2(x + self.drop(self.att2(y, y, x)))
        return self.n3(x + self.drop(self.ffn(x)))


class MIDF(nn.Module):
    """Multi-level information dynamic fusion, eqs. 19–24."""

    def __init__(self, dim: int, heads: int, ff: int, dyn: int, dropout: float):
        super().__init__()
        self.sa_g, self.sa_l = SA(dim, heads, ff, dropout), SA(dim, heads, ff, dropout)
        self.ga_g, self.ga_l = GA(dim, heads, ff, dropout), GA(dim, heads, ff, dropout)
        # eq. 23: softmax(σ(v_mix W_α) W_β)
        self.w_alpha = nn.Linear(dim, dyn)
        self.w_beta = nn.Linear(dyn, 2)
        self.drop = nn.Dropout(2 * dropout)

    def forward(self, vg: torch.Tensor, vl: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        g, l = vg[:, None], vl[:, None]  # one token per level (as released)
        g_sa, l_sa = self.sa_g(g), self.sa_l(l)  # eq. 19
        g_sga, l_sga = self.ga_g(g_sa, l_sa)[:, 0], self.ga_l(l_sa, g_sa)[:, 0]  # eq. 20
        g2 = g_sga * torch.sigmoid(l_sga)  # eq. 21: local corrects global
        l2 = l_sga + g_sga  # eq. 21: global supplements local
        mix = g2 + l2  # eq. 22
        gamma = self.w_beta(self.drop(torch.sigmoid(self.w_alpha(mix)))).softmax(-1)  # eq. 23
        # eq. 24 — γ1 is column 0 and γ2 column 1. (The released code takes column 0 for
        # both weights, so its two weights neither differ nor sum to 1; not copied.)
        v = gamma[:, 0:1] * g2 + gamma[:, 1:2] * l2
        return v, gamma


class MVSA(nn.Module):
    """Multi-level visual self-attention (AMFMN's VSA module, as used by GaLR, eq. 3)."""

    def __init__(self, c_low: int, c_high: int, channels: int, grid: int, embed_dim: int):
        super().__init__()
        self.lf_conv = nn.Conv2d(c_low, channels, 3, stride=2, padding=1)
        self.hf_conv = nn.Conv2d(c_high, channels, 1)
        self.main = nn.Conv2d(2 * channels, 1, 1)
        self.mask = nn.Conv2d(2 * channels, 1, 1)
        self.grid = grid
        self.gate = nn.Linear(grid * grid, embed_dim)

    def forward(self, low, s16, s32) -> tuple[torch.Tensor, torch.Tensor]:
        """→ channel gate (B, embed_dim) and the spatial mask (B, h, w)."""
        high = torch.cat([s16, F.interpolate(s32, size=s16.shape[-2:], mode="nearest")], 1)
        hf = F.relu(self.hf_conv(high))
        lf = F.relu(self.lf_conv(low))
        if lf.shape[-2:] != hf.shape[-2:]:
            lf = F.interpolate(lf, size=hf.shape[-2:], mode="bilinear", align_corners=False)
        cat = torch.cat([lf, hf], 1)
        cat = cat + hf.mean(1, keepdim=True)  # the release's residual
        mask = torch.sigmoid(self.mask(cat))
        atted = F.adaptive_avg_pool2d(self.main(cat) * mask, self.grid).flatten(1)
        return torch.sigmoid(self.gate(atted)), mask[:, 0]


class BiGRUText(nn.Module):
    """Eqs. 7–10: embedding → bidirectional GRU → mean over words of (h_f + h_b)/2 → MLP."""

    def __init__(self, vocab_size: int, word_dim: int, hidden: int, embed_dim: int, word_dropout: float):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, word_dim, padding_idx=0)
        self.gru = nn.GRU(word_dim, hidden, batch_first=True, bidirectional=True)
        self.mlp = nn.Sequential(nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, embed_dim))
        self.word_dropout = word_dropout
        self.hidden = hidden

    def resize_vocab(self, n: int) -> None:
        self.embed = nn.Embedding(n, self.embed.embedding_dim, padding_idx=0)

    def forward(self, ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        ids = ids.long()
        if self.training and self.word_dropout > 0:  # replace words by <unk> (1)
            drop = (torch.rand(ids.shape, device=ids.device) < self.word_dropout) & (ids > 0)
            ids = ids.masked_fill(drop, 1)
        lengths = lengths.long().clamp_min(1)
        e = self.embed(ids)
        packed = nn.utils.rnn.pack_padded_sequence(e, lengths.cpu(), batch_first=True, enforce_sorted=False)
        out, _ = self.gru(packed)
        out, _ = nn.utils.rnn.pad_packed_sequence(out, batch_first=True)  # (B, L', 2H), zeros past length
        h = (out[..., : self.hidden] + out[..., self.hidden :]) / 2  # (h_f + h_b) / 2
        h = h.sum(1) / lengths.to(h.dtype)[:, None]  # (1/n) Σ_i
        return self.mlp(h)


@register
class GaLR(RetrievalModel):
    arch = "galr"
    Config = GaLRConfig
    feature_version = "1"
    feature_keys = {
        "image": (
            "image_backbone", "image_weights", "image_size", "object_source", "detections",
            "object_category", "n_clusters", "cluster_spatial", "cluster_smooth", "category_groups", "lsh_bits", "max_objects", "drea",
            "merge_threshold", "boost",
        ),
        "text": ("max_tokens",),
    }  # fmt: skip
    train_defaults = {"epochs": 40, "lr": 5e-4, "views": 4, "batch_size": 128}

    def __init__(self, cfg: GaLRConfig, extra: Optional[dict] = None):
        super().__init__(cfg, extra)
        extra = extra or {}
        for name, val, ok in (
            ("object_source", cfg.object_source, ("cluster", "file")),
            ("object_category", cfg.object_category, ("auto", "imagenet", "lsh")),
            ("fusion", cfg.fusion, ("midf", "add", "global", "local")),
            ("global_pool", cfg.global_pool, ("mean", "mean_max")),
            ("global_head", cfg.global_head, ("linear", "mlp")),
            ("word_init", cfg.word_init, ("random", "minilm")),
            ("loss", cfg.loss, ("triplet", "both", "infonce")),
        ):
            if val not in ok:
                raise ModelError(f"galr: {name} must be one of {', '.join(ok)}, not {val!r}")
        self.backbone, bref = create_backbone(cfg.image_backbone, cfg.image_weights)
        self.bases = {"backbone": bref}
        self.backbone.eval()  # frozen: BatchNorm uses its running statistics
        self.mean, self.std = self.backbone.mean, self.backbone.std
        bb = self.backbone
        self._lite = isinstance(bb, EfficientNetLite)
        c8, c16 = bb.feature_info[0].channels, bb.feature_info[1].channels
        c32_pre = bb.feature_info[2].channels  # lite: 320 (before the 1280-d head conv)
        c32 = bb.num_features

        # ---- object source ----
        self._detections: Optional[objsrc.DetectionIndex] = None
        self._categorize = None
        if cfg.object_source == "file":
            if not cfg.detections:
                raise ModelError("galr: object_source='file' needs detections=PATH (DOTA .txt folder or JSON)")
            names = extra.get("categories") or objsrc.category_names(objsrc.load_detections(cfg.detections))
            self.category_names = list(names)
            self.category_source = "file"
        else:
            cat = cfg.object_category
            if cat == "auto":
                cat = "imagenet" if (self._lite and cfg.image_weights is None) else "lsh"
            self.category_source = cat
            if cat == "imagenet":
                if not hasattr(bb, "_fc") and not hasattr(bb, "fc"):
                    raise ModelError(f"galr: {cfg.image_backbone} has no ImageNet classifier; use object_category='lsh'")
                fc = bb._fc if hasattr(bb, "_fc") else bb.fc
                n_cat = cfg.category_groups if cfg.category_groups > 0 else fc.out_features
                prefix = "imagenet-group-" if cfg.category_groups > 0 else "imagenet-"
                self.category_names = [f"{prefix}{i}" for i in range(n_cat)]
            else:
                self.category_names = [f"lsh-{i}" for i in range(2**cfg.lsh_bits)]

        # ---- global branch (eq. 3) ----
        self.mvsa = MVSA(c8, c16 + c32_pre, cfg.mvsa_channels, cfg.mvsa_grid, cfg.embed_dim)
        dpool = c32 * (2 if cfg.global_pool == "mean_max" else 1)
        if cfg.global_head == "linear":
            self.global_proj = nn.Linear(dpool, cfg.embed_dim)
        else:
            self.global_proj = nn.Sequential(
                nn.LayerNorm(dpool), nn.Linear(dpool, cfg.global_hidden), nn.GELU(), nn.Dropout(cfg.dropout),
                nn.Linear(cfg.global_hidden, cfg.embed_dim),
            )  # fmt: skip
        # ---- local branch (eqs. 5, 11) ----
        self.node_geo = nn.Linear(4, cfg.node_dim)  # (cx, cy, probability, area)
        self.node_cat = nn.Embedding(len(self.category_names), cfg.node_dim)
        self.node_app = nn.Linear(c16, cfg.node_dim) if cfg.node_appearance else None
        self.gcn = GCN(cfg.node_dim, cfg.gcn_out, cfg.max_objects, cfg.embed_dim, cfg.gcn_readout)
        # ---- fusion (eq. 6) ----
        self.midf = MIDF(cfg.embed_dim, cfg.midf_heads, cfg.midf_ff, cfg.dynamic_dim, cfg.dropout) if cfg.fusion == "midf" else None
        # ---- text (eqs. 7–10) ----
        self.vocab = Vocab(extra.get("vocab"))
        self.text = BiGRUText(len(self.vocab), cfg.word_dim, cfg.gru_hidden, cfg.embed_dim, cfg.word_dropout)
        if cfg.loss in ("both", "infonce"):
            self.logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / cfg.temperature)))

    # ---- objects -------------------------------------------------------------------------------
    def _categorizer(self, dim: int):
        if self.category_source == "imagenet":
            bb = self.backbone
            if self._categorize is None:  # class groups are computed once
                self._categorize = objsrc.imagenet_categorizer(bb._fc if hasattr(bb, "_fc") else bb.fc, self.cfg.category_groups)
            return self._categorize
        return objsrc.lsh_categorizer(dim, self.cfg.lsh_bits)

    def _raw_objects(self, pixels: torch.Tensor, s16: torch.Tensor, s32: torch.Tensor) -> list[tuple[list[Obj], list[np.ndarray]]]:
        cfg = self.cfg
        if cfg.object_source == "cluster":
            return objsrc.cluster_objects(
                s16, s32, self._categorizer(s32.shape[1]), cfg.n_clusters, cfg.cluster_spatial,
                names=self.category_names, smooth=cfg.cluster_smooth,
            )
        if self._detections is None:
            idx = objsrc.DetectionIndex(cfg.detections, cfg.detections_images, self.category_names)
            idx.build(lambda ims: self.preprocess(ims), self.mean, self.std)
            self._detections = idx
        h, w = s16.shape[-2:]
        out = []
        for x in pixels:
            objs = self._detections.lookup(x, self.mean, self.std) or []
            out.append((objs, [objsrc.box_mask(o.box, h, w) for o in objs]))
        return out

    @torch.no_grad()
    def _object_graph(self, pixels, s16, s32) -> tuple[dict[str, torch.Tensor], list[dict]]:
        """DREA graph per image as padded tensors, plus the python records (explain)."""
        cfg = self.cfg
        n, b = cfg.max_objects, pixels.shape[0]
        dev = s16.device
        geo = torch.zeros(b, n, 4)
        box = torch.zeros(b, n, 4)
        cat = torch.zeros(b, n, dtype=torch.long)
        mask = torch.zeros(b, n)
        adj = torch.zeros(b, n, n)
        app = torch.zeros(b, n, s16.shape[1])
        feats16 = s16.float().flatten(2).cpu()  # (B, C, P)
        records = []
        for i, (raw, masks) in enumerate(self._raw_objects(pixels, s16, s32)):
            nodes, a = build_graph(raw, n, cfg.drea, cfg.merge_threshold, cfg.boost)
            k = len(nodes)
            for j, o in enumerate(nodes):
                geo[i, j] = torch.tensor([o.cx, o.cy, o.prob, o.area])
                box[i, j] = torch.tensor(o.box)
                cat[i, j] = o.category
                cells = np.any([masks[r] for r in o.merged_from], axis=0).reshape(-1)
                app[i, j] = feats16[i][:, torch.from_numpy(cells)].mean(1)
            mask[i, :k] = 1
            adj[i, :k, :k] = torch.from_numpy(a)
            records.append({"raw": len(raw), "nodes": nodes, "adjacency": a})
        t = {"obj_geo": geo, "obj_box": box, "obj_cat": cat, "obj_mask": mask, "adj": adj, "obj_app": app}
        return {k: v.to(dev) for k, v in t.items()}, records

    # ---- image -------------------------------------------------------------------------------
    def _maps(self, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        bb = self.backbone
        if self._lite:
            m = bb.forward_features(pixels, head=False)
            s32pre = m["s32"]
            s32 = F.relu6(bb._bn1(bb._conv_head(s32pre)))
        else:
            m = bb.forward_features(pixels)
            s32pre = s32 = m["s32"]
        return {"s8": m["s8"], "s16": m["s16"], "s32pre": s32pre, "s32": s32}

    def _features(self, pixels: torch.Tensor) -> tuple[dict[str, torch.Tensor], list[dict]]:
        m = self._maps(pixels)
        s32 = m["s32"]
        pooled = torch.cat([s32.mean((2, 3)), s32.amax((2, 3))], 1)
        graph, records = self._object_graph(pixels, m["s16"], s32)
        feats = {"low": m["s8"], "s16": m["s16"], "s32": m["s32pre"], "pooled": pooled, **graph}
        return feats, records

    def image_features(self, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        return self._features(pixels)[0]

    def _global(self, feats) -> tuple[torch.Tensor, torch.Tensor]:
        pooled = feats["pooled"]
        if self.cfg.global_pool == "mean":
            pooled = pooled[:, : pooled.shape[1] // 2]
        gate, mask = self.mvsa(feats["low"], feats["s16"], feats["s32"])
        return l2n(self.global_proj(pooled) * gate), mask  # v_g (eq. 3), as released: l2-normalised

    def _local(self, feats) -> torch.Tensor:
        mask = feats["obj_mask"]
        x = self.node_geo(feats["obj_geo"]) + self.node_cat(feats["obj_cat"].long())
        if self.node_app is not None:
            x = x + self.node_app(feats["obj_app"])
        x = x * mask[:, :, None]
        return l2n(self.gcn(x, normalize_adjacency(feats["adj"], mask), mask))  # v_l (eq. 5)

    def _fuse(self, feats) -> dict[str, torch.Tensor]:
        fusion = self.cfg.fusion
        out: dict[str, torch.Tensor] = {}
        vg, mask = self._global(feats) if fusion != "local" else (None, None)
        vl = self._local(feats) if fusion != "global" else None
        if fusion == "midf":
            v, out["gamma"] = self.midf(vg, vl)
        elif fusion == "add":
            v = vg + vl
        else:
            v = vg if fusion == "global" else vl
        out["emb"] = l2n(v)
        if mask is not None:
            out["mvsa"] = mask
        return out

    def image_head(self, feats: dict[str, torch.Tensor]) -> torch.Tensor:
        return self._fuse(feats)["emb"]

    # ---- text ---------------------------------------------------------------------------------
    def tokenize(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        return self.vocab.tokenize(texts, self.cfg.max_tokens)

    def text_features(self, tokens: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {"ids": tokens["ids"], "lengths": tokens["lengths"]}  # word ids are the frozen part

    def text_head(self, feats: dict[str, torch.Tensor]) -> torch.Tensor:
        return l2n(self.text(feats["ids"], feats["lengths"]))

    def feature_signature(self, side: str) -> dict:
        sig = super().feature_signature(side)
        if side == "text":
            sig["vocab"] = self.vocab.digest()
            sig.pop("bases", None)  # word ids do not depend on the image backbone
        elif self.cfg.object_source == "file":
            sig["detections_digest"] = objsrc.detections_digest(self.cfg.detections)
        return sig

    # ---- training -------------------------------------------------------------------------------
    def prepare_training(self, captions: Sequence[str], labels: Sequence[Optional[str]]) -> None:
        """Vocabulary from the training captions; word vectors random or from MiniLM."""
        self.vocab = Vocab.build(captions)
        self.text.resize_vocab(len(self.vocab))
        if self.cfg.word_init == "minilm":
            with torch.no_grad():
                self.text.embed.weight[2:] = minilm_word_vectors(self.vocab.words, self.cfg.word_dim, self.cfg.text_weights)

    def extra_config(self) -> Optional[dict]:
        out: dict[str, Any] = {"vocab": self.vocab.words}
        if self.cfg.object_source == "file":
            out["categories"] = self.category_names
        return out

    def training_loss(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        img = self.image_head(batch["image_feats"])
        txt = self.text_head(batch["text_feats"])
        same, same_label = positive_masks(batch["image_index"], batch.get("label_index"), batch.get("captions"))
        out: dict[str, torch.Tensor] = {}
        if self.cfg.loss in ("triplet", "both"):
            hardest = self.cfg.hardest and batch.get("epoch", 0) >= self.cfg.hardest_from_epoch
            out["triplet"] = vse_triplet(img, txt, self.cfg.margin, positives=same, hardest=hardest)  # eq. 31
        if self.cfg.loss in ("both", "infonce"):
            scale = self.logit_scale.exp().clamp(max=100.0)
            out["infonce"] = info_nce(img, txt, scale, soft_targets(same, same_label, self.cfg.label_alpha))
        out["loss"] = sum(out.values())
        return out

    # ---- explanations ---------------------------------------------------------------------------
    def gradcam_layers(self) -> dict[str, nn.Module]:
        return backbone_cam_layers(self.backbone, ("head", "s32", "s16"))

    @torch.no_grad()
    def explain_maps(self, pixels: torch.Tensor, text: str) -> ExplainMaps:
        """``image_maps["mvsa"]``: the MVSA mask over the stride-16 grid; ``extra``: the
        DREA object graph (``objects``: centre, box, area, category, confidence,
        merged_from — ranked by area; ``adjacency``: the boosted d̂_A matrix, eq. 18),
        the object source, the MIDF weights (γ_global, γ_local) and the score."""
        text = check_query(text)
        was = self.training
        self.eval()
        pixels = pixels[:1].to(self.device)
        feats, records = self._features(pixels)
        parts = self._fuse(feats)
        t = self.text_states([text])["emb"]
        rec = records[0]
        extra: dict[str, Any] = {
            "object_source": self.cfg.object_source,
            "category_source": self.category_source,
            "drea": self.cfg.drea,
            "raw_objects": rec["raw"],
            "objects": [o.to_dict() for o in rec["nodes"]],
            "adjacency": np.round(rec["adjacency"], 5).tolist(),
            "score": float(parts["emb"][0] @ t[0]),
        }
        if "gamma" in parts:
            extra["midf_weights"] = {"global": float(parts["gamma"][0, 0]), "local": float(parts["gamma"][0, 1])}
        maps = {"mvsa": parts["mvsa"][0].float().cpu().numpy()} if "mvsa" in parts else {}
        words = [w if w in self.vocab.stoi else f"{w} (unknown)" for w in split_words(text)][: self.cfg.max_tokens]
        self.train(was)
        return ExplainMaps(image_maps=maps, words=words, extra=extra)


@functools.lru_cache(maxsize=1)
def _text_encoder(text_weights: Optional[str]):
    from ...nets.text import TextEncoder

    return TextEncoder(text_weights)


def minilm_word_vectors(words: Sequence[str], dim: int, text_weights: Optional[str] = None) -> torch.Tensor:
    """(len(words), dim) initial word vectors: MiniLM's input embedding of each word (mean of
    its word pieces), PCA-projected to ``dim`` and scaled to unit variance per entry like
    ``nn.Embedding``'s N(0, 1) init. Deterministic."""
    enc = _text_encoder(text_weights)
    table = enc.bert.embeddings.word_embeddings.weight.detach().float()
    vecs = []
    for w in words:
        ids = enc.tokenizer(w, add_special_tokens=False)["input_ids"] or [enc.tokenizer.unk_token_id]
        vecs.append(table[ids].mean(0))
    x = torch.stack(vecs)
    x = x - x.mean(0, keepdim=True)
    k = min(dim, x.shape[0], x.shape[1])
    _, _, v = torch.linalg.svd(x, full_matrices=False)
    sign = torch.sign(v[:k].sum(1, keepdim=True)).clamp_min(0) * 2 - 1  # fix SVD sign ambiguity
    y = x @ (v[:k] * sign).T
    out = torch.zeros(len(words), dim)
    out[:, :k] = y / y.std().clamp_min(1e-6)
    return out
