"""``cmer`` — CMER (computation and memory-efficient retrieval, 2024) over pluggable backbones.

What the paper does (§3) and what this module does:

- **Visual encoder with a Focus-Adapter side branch** (§3.2, eqs. 10–13; ``focus.py``).
  The paper's main branch is a frozen CLIP ViT; the side branch takes every block's
  output ``v_d``, adds it (through ``W_down``) to the previous adapter's output, and
  refines it with a *focus layer*: multi-head attention restricted to small regions
  ("focus fields") of the token grid. Best setting (Table 5): hidden 192, 6 heads of
  32, field 2. Because no gradient enters the frozen main branch, the stage outputs
  ``v_d`` are cacheable features here: EfficientNet-Lite's s8/s16/s32 maps (before the
  1280-d head conv) by default, ResNet/ViT stages with user weights.
- **Text encoder with LoRA** (§4.4.1 "the LoRA modules and the BERT model"; ``lora.py``):
  LoRA on the query/value projections (configurable) of the top ``lora_layers`` MiniLM
  layers; the layers below are frozen and their token states are cached.
- **Scene-label prompt augmentation** (§3.3, eqs. 14–15; ``prompts.py``): in training,
  a caption is prefixed with ``"a remote sensing image of {label}."`` (with probability
  ``scene_prompt_prob``; the rest stay plain so the encoder also sees queries as they
  come at inference). Never at inference by default: the label of the wanted image is
  ground truth a real query does not have.
- **Negative-sample recycling** (§3.4, eqs. 16–18; ``queue.py``): FIFO queues of the
  last ``queue_factor`` batches of image and text embeddings (4× batch, Table 6); a
  queued sample is a negative only for anchors of *another* scene label; loss
  difficulty-weighted hinge ``Σ l·e^{−βl}``, plus in-batch InfoNCE (eqs. 19–21);
  total L = L_batch + L_queue (eq. 22).

Substitutions (honest, and why):

- **CLIP is optional.** ``--set clip=PATH`` (an OpenAI/open_clip ViT file) runs the paper's
  own setting — frozen CLIP towers, one shared ``W_down``, LoRA on CLIP's text, CLIP's
  projections as the joint space (``archs/clip_branch.py``). Without it (the default, as
  no CLIP weights ship): the paper's CLIP ViT/BERT come with a joint embedding space and
  frozen projections, so it trains only adapters and LoRA. Here the frozen bases are
  EfficientNet-Lite (ImageNet) and MiniLM-L6 (sentence embeddings), which share no
  space, so both sides need a *trained projection*: the image embedding is
  ``MLP(pooled frozen main-branch features) + Linear(pooled side-branch output)``
  (the side branch "provides complementary region information to the backbone",
  §4.4.1); the text embedding is ``MLP(mean-pooled LoRA-tuned MiniLM states)``.
- **Adapters per stage, not per block** — a CNN has three useful taps (s8/s16/s32) of
  different widths, so ``W_down`` is per stage, not shared (see ``focus.py``).
- **Identical captions** (UCM repeats strings across images) are never in-batch
  negatives of each other (soft InfoNCE targets as in ``train/losses.py``); optional
  ``label_alpha`` soft same-scene targets (0 = the paper's plain InfoNCE).
- ``queue_reduce="mean"`` normalises eq. 18's sum by the number of valid queue
  negatives so its scale does not depend on the queue length; ``"sum"`` is literal.

Explanations: ``explain_maps`` gives ``image_maps["focus/<stage>"]`` — the focus
layer's region attention (the attention mass each cell receives from the queries of
its focus field, averaged over heads) — and ``image_maps["similarity"]`` (text vector
vs the local embedding of every cell). Grad-CAM (the paper's Fig. 5) targets the
Focus-Adapter outputs first (``gradcam_layers``); t-SNE (Fig. 6) is the app's
embedding view.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ...nets.factory import create_backbone
from ...nets.text import TextEncoder
from ...train.losses import info_nce, positive_masks, soft_targets
from ..base import BaseConfig, ExplainMaps, RetrievalModel, backbone_cam_layers, check_query, l2n, make_head
from ..registry import register
from ..clip_branch import ClipBranch
from .focus import FocusAdapter, pool_to
from .lora import LoRALinear, apply_lora
from .prompts import DEFAULT_TEMPLATE, augment, readable_label
from .queue import NegativeQueue

STAGES = ("s8", "s16", "s32")
PROMPT_EXTRA_TOKENS = 24  # room for the scene prompt in front of a caption


@dataclass
class CMERConfig(BaseConfig):
    # Focus-Adapter side branch (§3.2; Table 5 best: 192 / 6 heads / field 2)
    stages: str = "s16,s32"  # frozen stage outputs v_d feeding the adapters, in order (s8 too: ~5x slower on CPU)
    adapter_hidden: int = 192
    adapter_heads: int = 6
    focus_field: int = 2  # side of the square region (in grid cells) the focus layer attends in
    # main-branch pooling of the frozen features ("mean" | "mean_max" | "mean_max_s16" | "none")
    pool: str = "mean_max_s16"
    head: str = "mlp"  # projection heads: "linear" | "mlp"
    hidden: int = 1024
    dropout: float = 0.2
    # LoRA on the text encoder
    lora_layers: int = 2  # top MiniLM layers with LoRA (the ones below are frozen, cached)
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_targets: str = "query,value"
    # partial fine-tuning of the main branch (beyond the paper, whose CLIP stays frozen):
    # "" = frozen; "s16" = train the layers past the stride-16 map (see lite.LiteConfig)
    image_train_from: str = ""
    backbone_lr_scale: float = 0.1
    # scene-label prompt augmentation (training only)
    scene_prompt: str = DEFAULT_TEMPLATE
    scene_prompt_prob: float = 0.5  # fraction of training captions that get the prompt
    # negative-sample recycling + difficulty-weighted hinge
    queue_factor: int = 4  # queue length = queue_factor × batch size (0 disables)
    queue_margin: float = 0.2  # α of eqs. 16–17
    queue_beta: float = 1.0  # β of eq. 18
    queue_weight: float = 1.0
    queue_reduce: str = "mean"  # "sum" (eq. 18 literally) | "mean" over valid negatives
    # in-batch InfoNCE (eqs. 19–21)
    label_alpha: float = 0.0
    temperature: float = 0.05  # initial τ; learned
    # the paper's main branch: a frozen CLIP ViT (OpenAI/open_clip checkpoint file). When set,
    # its towers replace EfficientNet-Lite and MiniLM (archs/clip_branch.py); image_size, embed_dim
    # and max_tokens become the CLIP's own, and stages/pool/head/hidden/image_* are unused
    clip: str = ""
    clip_blocks: str = ""  # ViT blocks feeding the adapters: "" = 4 evenly spaced | "all" (paper) | "3,7,11" | "none"


@register
class CMER(RetrievalModel):
    arch = "cmer"
    Config = CMERConfig
    feature_version = "1"
    feature_keys = {
        "image": ("image_backbone", "image_weights", "image_size", "stages", "pool", "image_train_from"),
        "text": ("text_weights", "max_tokens", "lora_layers"),
    }
    # the recipe of models/cmer-ucm (with --set label_alpha=0.5 --set image_train_from='"s16"'):
    # with the backbone frozen, the weight EMA and 8 views gave val mR 49.59 against 48.94 without them
    train_defaults = {"epochs": 15, "lr": 1e-3, "views": 8, "batch_size": 128, "ema": 0.98}

    def __init__(self, cfg: CMERConfig, extra: Optional[dict] = None):
        super().__init__(cfg, extra)
        self.clip: Optional[ClipBranch] = None
        self.shared_down: Optional[nn.Module] = None  # one W_down for all adapters (CLIP ViT)
        if cfg.clip:
            self._init_clip(cfg)
        else:
            self._init_cnn(cfg)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / cfg.temperature)))

        # ---- training state (never saved) ---------------------------------------------
        self.label_names: list[str] = list((extra or {}).get("labels", []))
        self._readable: list[str] = []
        self.queue = NegativeQueue(0)
        self._pending: Optional[tuple] = None
        self._prompt_memo: dict[str, torch.Tensor] = {}

    def _init_cnn(self, cfg: CMERConfig) -> None:
        """EfficientNet-Lite (or another backbone) + MiniLM, with trained projection heads."""
        # ---- image: frozen backbone + Focus-Adapter side branch ------------------------
        self.backbone, bref = create_backbone(cfg.image_backbone, cfg.image_weights)
        self.mean, self.std = self.backbone.mean, self.backbone.std
        # an empty list switches the side branch off (the paper's ablation "v1", Table 4)
        self.stages = [s.strip() for s in cfg.stages.split(",") if s.strip()]
        if any(s not in STAGES for s in self.stages):
            raise ValueError(f"stages must be a comma list of {', '.join(STAGES)}; got {cfg.stages!r}")
        chans = {f"s{fi.stride}": fi.channels for fi in self.backbone.feature_info}
        self.adapters = nn.ModuleDict(
            {s: FocusAdapter(chans[s], cfg.adapter_hidden, cfg.adapter_heads, cfg.focus_field) for s in self.stages}
        )
        self.side_proj = (
            nn.Sequential(nn.LayerNorm(2 * cfg.adapter_hidden), nn.Linear(2 * cfg.adapter_hidden, cfg.embed_dim))
            if self.stages
            else None
        )
        c_head = self.backbone.num_features
        c16 = chans["s16"]
        din = {"none": 0, "mean": c_head, "mean_max": 2 * c_head, "mean_max_s16": 2 * c_head + c16}.get(cfg.pool)
        if din is None:
            raise ValueError(f"unknown pool {cfg.pool!r}")
        self.image_proj = make_head(din, cfg.embed_dim, cfg.head, cfg.hidden, cfg.dropout) if din else None
        if self.image_proj is None and not self.stages:
            raise ValueError("cmer needs the side branch (stages) or the main branch (pool), or both")

        # ---- text: MiniLM, frozen lower layers, LoRA on the top ones ---------------------
        self.text = TextEncoder(cfg.text_weights, cfg.max_tokens)
        n_text = self.text.num_layers
        k = max(0, min(cfg.lora_layers, n_text))
        self.text_prefix = n_text - k
        targets = [t.strip() for t in cfg.lora_targets.split(",") if t.strip()]
        wrapped = apply_lora(list(self.text.bert.encoder.layer)[self.text_prefix :], targets, cfg.lora_rank, cfg.lora_alpha)
        paths = sorted(set(wrapped))
        self.finetuned = [f"text.bert.encoder.layer.{i}.{p}.lora_" for i in range(self.text_prefix, n_text) for p in paths]
        self.bases = {"backbone": bref, "text": self.text.weights_ref}
        if cfg.image_train_from and (cfg.image_train_from != "s16" or "s8" in self.stages):
            raise ValueError("cmer fine-tunes the backbone from s16 only, with stages among s16,s32")
        self.tune_backbone_from(cfg.image_train_from)
        self.text_proj = make_head(self.text.width, cfg.embed_dim, cfg.head, cfg.hidden, cfg.dropout)

    def _init_clip(self, cfg: CMERConfig) -> None:
        """The paper's setting: frozen CLIP ViT + Focus-Adapters over its blocks, LoRA on
        CLIP's text transformer; CLIP's projections give the joint space (no new heads)."""
        if cfg.image_train_from:
            raise ValueError("cmer over a CLIP keeps the ViT frozen (image_train_from must be empty)")
        targets = [t.strip() for t in cfg.lora_targets.split(",") if t.strip()]
        self.clip = ClipBranch(cfg.clip, cfg.clip_blocks, cfg.lora_layers, targets, cfg.lora_rank, cfg.lora_alpha)
        self.clip.adopt(self)
        cfg.embed_dim = int(self.clip.clip_cfg.embed_dim)  # no new heads: CLIP's space is the one
        self.backbone = self.image_proj = self.text_proj = None
        self.stages = [f"b{i}" for i in self.clip.blocks]
        self.shared_down = nn.Conv2d(self.clip.width, cfg.adapter_hidden, 1) if self.stages else None
        self.adapters = nn.ModuleDict(
            {s: FocusAdapter(None, cfg.adapter_hidden, cfg.adapter_heads, cfg.focus_field) for s in self.stages}
        )
        self.side_proj = None
        if self.stages:
            self.side_proj = nn.Sequential(nn.LayerNorm(2 * cfg.adapter_hidden), nn.Linear(2 * cfg.adapter_hidden, cfg.embed_dim))
            # residual on CLIP's embedding, starting at zero: training starts from CLIP's zero-shot space
            nn.init.zeros_(self.side_proj[1].weight)
            nn.init.zeros_(self.side_proj[1].bias)
        root = "clip.tower.clip.text_model.encoder.layers"
        self.finetuned = [f"{root}.{i}.{p}.lora_" for i in range(self.clip.text_prefix, self.clip.num_text_layers)
                          for p in self.clip.lora_paths]
        self.freeze_bases()

    def tune_end_to_end(self, image_from: str = "all", text_from: str = "all") -> dict[str, list[str]]:
        if self.clip is not None and (image_from not in ("none", "") or text_from not in ("none", "")):
            raise ValueError("cmer over a CLIP keeps the CLIP frozen, as the paper (only adapters and LoRA train); "
                             "train it on cached features, without --end-to-end")
        return super().tune_end_to_end(image_from, text_from)

    @property
    def _text_api(self):
        """Tokenizer-side calls shared by both text towers (tokenize, tokenizer, words)."""
        return self.clip if self.clip is not None else self.text

    def feature_signature(self, side: str) -> dict:
        sig = super().feature_signature(side)
        if self.clip is not None:  # the CNN signature stays as it was (its caches stay valid)
            sig["config"].update({"clip": self.cfg.clip, "clip_blocks": self.clip.blocks} if side == "image"
                                 else {"clip": self.cfg.clip})
        return sig

    # ---- image ----------------------------------------------------------------------------
    def _head_map(self, s32: torch.Tensor) -> torch.Tensor:
        bb = self.backbone
        if hasattr(bb, "_conv_head"):  # EfficientNet-Lite: the 1280-d head conv on the last block
            return F.relu6(bb._bn1(bb._conv_head(s32)))
        return s32

    def _pool(self, head: torch.Tensor, s16: torch.Tensor) -> torch.Tensor:
        parts = [head.mean((2, 3))]
        if self.cfg.pool in ("mean_max", "mean_max_s16"):
            parts.append(head.amax((2, 3)))
        if self.cfg.pool == "mean_max_s16":
            parts.append(s16.mean((2, 3)))
        return torch.cat(parts, 1)

    def image_features(self, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        """Frozen stage outputs ``v_d`` for the side branch + the pooled main-branch vector
        (with ``image_train_from``: only the frozen part's stride-16 map; over a CLIP: its
        image embedding and the tapped blocks' patch grids)."""
        if self.clip is not None:
            return self.clip.image_features(pixels)
        if self.image_split:
            return {"s16": self.backbone.forward_features(pixels, upto="s16")["s16"]}
        maps = self.backbone.forward_features(pixels, head=False)
        out = {s: maps[s] for s in self.stages}
        if self.image_proj is not None:
            out["pooled"] = self._pool(self._head_map(maps["s32"]), maps["s16"])
        return out

    def _finish_features(self, feats: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """With a fine-tuned top, run it on the cached stride-16 map: the same dict as
        ``image_features`` of a frozen model."""
        if not self.image_split:
            return feats
        s16 = feats["s16"].float()
        s32 = self.backbone.forward_from(s16, "s16", head=False)["s32"]
        out = {s: m for s, m in (("s16", s16), ("s32", s32)) if s in self.stages}
        if self.image_proj is not None:
            out["pooled"] = self._pool(self._head_map(s32), s16)
        return out

    def side_branch(self, feats: dict[str, torch.Tensor]) -> Optional[torch.Tensor]:
        """Run the Focus-Adapters stage to stage (eq. 10: f_{d−1} feeds adapter d); returns f_D."""
        f = None
        for s in self.stages:
            v = feats[s].float()
            if self.shared_down is not None:
                v = self.shared_down(v)
            f = self.adapters[s](v, f)
        return f

    def image_head(self, feats: dict[str, torch.Tensor]) -> torch.Tensor:
        if self.clip is not None:
            return self._clip_image_head(feats)
        feats = self._finish_features(feats)
        emb = 0.0
        if self.stages:
            f = self.side_branch(feats)
            emb = self.side_proj(torch.cat([f.mean((2, 3)), f.amax((2, 3))], 1))
        if self.image_proj is not None:
            emb = emb + self.image_proj(feats["pooled"].float())
        return l2n(emb)

    def _clip_image_head(self, feats: dict[str, torch.Tensor]) -> torch.Tensor:
        """CLIP's frozen embedding + the side branch (residual, zero at initialisation)."""
        emb = l2n(feats["pooled"].float())
        if self.stages:
            f = self.side_branch(feats)
            emb = emb + self.side_proj(torch.cat([f.mean((2, 3)), f.amax((2, 3))], 1))
        return l2n(emb)

    def _clip_local_embeddings(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, D, g, g): CLIP's projection of the last block's patch tokens plus the side
        branch cell (the same residual as the pooled embedding)."""
        out = self.clip.vision(pixel_values=pixels, output_hidden_states=True)
        emb = self.clip.dense_embeddings(self.clip.grid(out.hidden_states[-1]))
        if self.stages:
            f = self.side_branch({f"b{i}": self.clip.grid(out.hidden_states[i + 1]) for i in self.clip.blocks})
            b, c, h, w = f.shape
            cells = f.permute(0, 2, 3, 1).reshape(-1, c)
            side = self.side_proj(torch.cat([cells, cells], 1)).reshape(b, h, w, -1).permute(0, 3, 1, 2)
            emb = l2n(emb.permute(0, 2, 3, 1)).permute(0, 3, 1, 2) + side
        return l2n(emb.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)

    def local_embeddings(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, D, h, w) on the last adapter's grid: the heads applied to every cell
        (side branch cell + main-branch features of that cell), i.e. patch similarity."""
        if self.clip is not None:
            return self._clip_local_embeddings(pixels)
        maps = self.backbone.forward_features(pixels, head=False)
        emb = 0.0
        if self.stages:
            f = self.side_branch({s: maps[s] for s in self.stages})
            b, c, h, w = f.shape
            cells = f.permute(0, 2, 3, 1).reshape(-1, c)
            emb = self.side_proj(torch.cat([cells, cells], 1))
        else:
            b, _, h, w = maps["s32"].shape
        if self.image_proj is not None:
            head = self._head_map(maps["s32"])
            parts = [head]
            if self.cfg.pool in ("mean_max", "mean_max_s16"):
                parts.append(head)
            if self.cfg.pool == "mean_max_s16":
                parts.append(pool_to(maps["s16"], head.shape[-2:]))
            x = torch.cat(parts, 1)
            if x.shape[-2:] != (h, w):
                x = F.interpolate(x, size=(h, w), mode="nearest")
            emb = emb + self.image_proj(x.permute(0, 2, 3, 1).reshape(b * h * w, -1))
        return l2n(emb).reshape(b, h, w, -1).permute(0, 3, 1, 2)

    # ---- text -----------------------------------------------------------------------------
    def tokenize(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        return self._text_api.tokenize(texts)

    def text_features(self, tokens: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        # no LoRA layers: the sentence vector is cached; otherwise the frozen prefix's token states
        if self.clip is not None:
            return self.clip.text_features(tokens)
        return self.text.prefix_features(tokens, self.text_prefix)

    def text_head(self, feats: dict[str, torch.Tensor]) -> torch.Tensor:
        if self.clip is not None:  # CLIP's own text_projection: already the joint space
            return l2n(self.clip.text_pooled(feats))
        return l2n(self.text_proj(self.text.pooled_from(feats, self.text_prefix)))

    def merge_lora(self) -> None:
        """Fold the LoRA updates into the frozen text weights (faster inference; do not
        train or save afterwards — the saved tensors are the unmerged A, B)."""
        for m in self.modules():
            if isinstance(m, LoRALinear):
                m.merge()

    def unmerge_lora(self) -> None:
        for m in self.modules():
            if isinstance(m, LoRALinear):
                m.unmerge()

    # ---- scene-label prompts (training only) -------------------------------------------------
    def prepare_training(self, captions: Sequence[str], labels: Sequence[Optional[str]]) -> None:
        # the trainer numbers labels as sorted(set of train labels)
        self.label_names = sorted({lab for lab in labels if lab})

    def extra_config(self) -> Optional[dict]:
        return {"labels": list(self.label_names)} if self.label_names else None

    def readable_labels(self) -> list[str]:
        if len(self._readable) != len(self.label_names):
            vocab = frozenset(w for w in self._text_api.tokenizer.get_vocab() if w.isalpha())
            self._readable = [readable_label(lab, vocab) for lab in self.label_names]
        return self._readable

    def prompted(self, captions: Sequence[str], label_index: Sequence[int]) -> list[str]:
        """Captions with their scene prompt (eq. 14) — what training sees."""
        names = self.readable_labels()
        return [augment(c, names[int(i)], self.cfg.scene_prompt) for c, i in zip(captions, label_index)]

    @torch.no_grad()
    def _prompt_features(self, texts: list[str], device) -> list[torch.Tensor]:
        """Frozen-prefix features of prompted captions (memoised; each row unpadded)."""
        missing = sorted({t for t in texts if t not in self._prompt_memo})
        if missing:
            tok = self._text_api.tokenize(missing, max_tokens=self.cfg.max_tokens + PROMPT_EXTRA_TOKENS)
            tok = {k: v.to(device) for k, v in tok.items()}
            feats = self.text_features(tok)
            lens = tok["attention_mask"].sum(1).tolist()
            for i, t in enumerate(missing):
                if "pooled" in feats:
                    self._prompt_memo[t] = feats["pooled"][i].half().cpu()
                else:
                    self._prompt_memo[t] = feats["hidden"][i, : int(lens[i])].half().cpu()
        return [self._prompt_memo[t] for t in texts]

    def _augment_batch(self, batch: dict) -> dict[str, torch.Tensor]:
        feats = batch["text_feats"]
        p = self.cfg.scene_prompt_prob
        lab = batch["label_index"]
        if p <= 0 or not self.label_names or lab is None:
            return feats
        lab_cpu = lab.detach().cpu()
        choose = ((torch.rand(len(lab_cpu)) < p) & (lab_cpu >= 0) & (lab_cpu < len(self.label_names))).nonzero()[:, 0]
        if len(choose) == 0:
            return feats
        rows = choose.tolist()
        texts = self.prompted([batch["captions"][i] for i in rows], lab_cpu[rows].tolist())
        device = next(iter(feats.values())).device
        pf = self._prompt_features(texts, device)
        if "pooled" in feats:
            pooled = feats["pooled"].clone()
            pooled[choose.to(device)] = torch.stack(pf).to(device, pooled.dtype)
            return {"pooled": pooled}
        hidden, mask = feats["hidden"], feats["mask"]
        n_old = int(mask.sum(1).max().item())
        n = max(n_old, max(t.shape[0] for t in pf))
        new_h = hidden.new_zeros(hidden.shape[0], n, hidden.shape[2])
        new_m = mask.new_zeros(mask.shape[0], n)
        m = min(n_old, hidden.shape[1])
        new_h[:, :m], new_m[:, :m] = hidden[:, :m], mask[:, :m]
        for r, t in zip(rows, pf):
            new_h[r].zero_()
            new_m[r].zero_()
            new_h[r, : t.shape[0]] = t.to(device, new_h.dtype)
            new_m[r, : t.shape[0]] = 1
        return {"hidden": new_h, "mask": new_m}

    # ---- training ---------------------------------------------------------------------------
    def training_loss(self, batch):
        text_feats = self._augment_batch(batch) if self.training else batch["text_feats"]
        img = self.image_head(batch["image_feats"])
        txt = self.text_head(text_feats)
        scale = self.logit_scale.exp().clamp(max=100.0)
        index, labels = batch["image_index"], batch.get("label_index")
        if labels is None:
            labels = torch.full_like(index, -1)
        same, same_label = positive_masks(index, labels, batch.get("captions"))
        out = {"batch": info_nce(img, txt, scale, soft_targets(same, same_label, self.cfg.label_alpha))}  # eqs. 19–21
        if self.cfg.queue_factor > 0:
            if self.queue.size == 0:
                self.queue.size = self.cfg.queue_factor * img.shape[0]
            out["queue"] = self.cfg.queue_weight * self.queue.loss(  # eqs. 16–18
                img, txt, labels, index, self.cfg.queue_margin, self.cfg.queue_beta, self.cfg.queue_reduce
            )
            if self.training:
                self._pending = (img.detach(), txt.detach(), labels.detach(), index.detach())
        out["loss"] = sum(out.values())  # eq. 22
        return out

    def after_step(self, batch) -> None:
        """Recycle the batch just trained on into the negative queues (FIFO)."""
        if self._pending is not None:
            self.queue.push(*self._pending)
            self._pending = None

    # ---- explanations ---------------------------------------------------------------------
    def gradcam_layers(self) -> dict[str, nn.Module]:
        layers = {f"focus.{s}": self.adapters[s] for s in reversed(self.stages)}
        if self.clip is not None:  # the last ViT blocks, as the clip arch offers them
            blocks = self.clip.vision.encoder.layers
            for i in range(len(blocks) - 1, max(-1, len(blocks) - 3), -1):
                layers[f"clip.tower.clip.vision_model.encoder.layers.{i}"] = blocks[i]
            return layers
        layers.update(backbone_cam_layers(self.backbone, ("head", "s16")))
        return layers

    @torch.no_grad()
    def explain_maps(self, pixels: torch.Tensor, text: str) -> ExplainMaps:
        text = check_query(text)
        was_training = self.training
        self.eval()
        pixels = pixels[:1].to(self.device)
        try:
            maps = self.image_features(pixels) if self.clip is not None else self.backbone.forward_features(pixels, head=False)
            focus_maps: dict = {}
            f = None
            for s in self.stages:
                ad = self.adapters[s]
                ad.focus.keep_attention = True
                try:
                    v = maps[s].float()
                    f = ad(self.shared_down(v) if self.shared_down is not None else v, f)
                    h, w = f.shape[-2:]
                    focus_maps[f"focus/{s}"] = ad.focus.attention_mass(1, h, w)[0].cpu().numpy()
                finally:
                    ad.focus.keep_attention = False
                    ad.focus.last_attention = None
            tokens = {k: v.to(self.device) for k, v in self.tokenize([text]).items()}
            t = self.text_head(self.text_features(tokens))
            local = self.local_embeddings(pixels)[0]  # (D, h, w)
            sim = torch.einsum("d,dhw->hw", t[0], local).clamp_min(0)
            image_maps = {**focus_maps, "similarity": sim.cpu().numpy()}
            special = set(self._text_api.tokenizer.all_special_tokens)
            words = [w for w in self._text_api.words(tokens["input_ids"])[0] if w not in special]
        finally:
            self.train(was_training)
        return ExplainMaps(
            image_maps=image_maps,
            words=words,
            extra={"focus_field": self.cfg.focus_field, "stages": list(self.stages)},
        )
