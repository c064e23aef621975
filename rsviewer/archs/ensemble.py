"""``ensemble`` — a weighted mean of trained models' similarities, as one model.

    rsviewer ensemble --models default cmer-ucm --out models/ens    # weights by CV when it can

score(image, text) = Σ_m w_m · score_m(image, text),  Σ w_m = 1, w_m ≥ 0.

For dual-encoder members the ensemble is itself a dual encoder: its embedding is the
concatenation of the members' unit embeddings scaled by √w_m, so the dot product of two
ensemble embeddings is exactly the weighted mean of the members' cosines and the vector
has unit norm. Indexes, search, classification and the GUI therefore need nothing new.
With a pairwise member (MSSA) the ensemble is pairwise: the concatenated embedding
ranks candidates, ``score`` combines the members' own scores.

The folder holds no member weights: ``config.json`` lists each member by name (looked
up like ``--model NAME``) or absolute path with its fingerprint, checked on load; the
safetensors file holds the mixing weights and a digest of the members' fingerprints, so
the ensemble's own fingerprint changes whenever a member or a weight does.

Inputs: every member normalises the [0, 1] pixels itself (the ensemble's mean/std are
0/1), so members trained with different normalisations combine correctly; their input
sizes must match. Explanations: Grad-CAM on a member's layers (of the combined score);
the members' own attention maps are not combined (NotAvailable).
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

import torch
from torch import nn

from ..errors import ModelError
from .base import BaseConfig, RetrievalModel
from .registry import register

# (member index, member input) -> that member's states: how an ensemble reaches its members' towers
MemberEncoder = Callable[[int, Any], dict]


@dataclass
class EnsembleConfig(BaseConfig):
    # [{"model": name-or-absolute-path, "fingerprint": "…"}]; order = weight order
    members: list = field(default_factory=list)
    weights: list = field(default_factory=list)  # non-negative, normalised to sum 1
    # test-time augmentation: an image's embedding is the mean of the unit embeddings of
    # its first ``views`` dihedral views (8 = all rotations and flips), renormalised
    views: int = 1


def member_digest(members: Sequence[dict], weights: Sequence[float], views: int = 1) -> torch.Tensor:
    h = hashlib.sha256(repr(([(m["fingerprint"], round(float(w), 6)) for m, w in zip(members, weights)], views)).encode())
    return torch.frombuffer(bytearray(h.digest()), dtype=torch.uint8).clone()


@register
class Ensemble(RetrievalModel):
    arch = "ensemble"
    Config = EnsembleConfig
    trainable = False  # built from trained models by `rsviewer ensemble`

    def __init__(self, cfg: EnsembleConfig, extra=None, members: Sequence[RetrievalModel] | None = None):
        super().__init__(cfg, extra)
        if not cfg.members:
            raise ModelError("an ensemble needs at least one member model")
        if len(cfg.weights) != len(cfg.members):
            raise ModelError(f"an ensemble of {len(cfg.members)} members needs as many weights, got {len(cfg.weights)}")
        w = torch.tensor([float(x) for x in cfg.weights], dtype=torch.float64)
        if (w < 0).any() or w.sum() <= 0:
            raise ModelError(f"ensemble weights must be non-negative and not all zero, got {cfg.weights}")
        w = w / w.sum()
        if members is None:
            members = [self._load_member(m) for m in cfg.members]
        self.members = nn.ModuleList(members)
        sizes = {m.image_size for m in self.members}
        if len(sizes) != 1:
            raise ModelError(f"ensemble members take different input sizes {sorted(sizes)}")
        self.register_buffer("mix", w.float())
        if not 1 <= int(cfg.views) <= 8:
            raise ModelError(f"ensemble views must be 1..8 (dihedral transforms), got {cfg.views}")
        if cfg.views > 1 and any(m.pairwise for m in self.members):
            raise ModelError("test-time views apply to dual encoders; a pairwise member's states cannot be averaged")
        self.register_buffer("members_digest", member_digest(cfg.members, w.tolist(), int(cfg.views)))
        self.cfg.image_size = sizes.pop()
        self.cfg.embed_dim = sum(m.embed_dim for m in self.members)
        self.pairwise = any(m.pairwise for m in self.members)  # type: ignore[misc]
        self.mean, self.std = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)  # members normalise themselves

    @staticmethod
    def _load_member(spec: dict) -> RetrievalModel:
        from ..checkpoint import load_model

        model = load_model(spec["model"])
        if spec.get("fingerprint") and model.fingerprint != spec["fingerprint"]:
            raise ModelError(
                f"ensemble member {spec['model']!r} changed since the ensemble was built "
                f"(fingerprint {model.fingerprint} ≠ {spec['fingerprint']}); rebuild it with rsviewer ensemble"
            )
        if getattr(model, "arch", "") == "ensemble":
            raise ModelError("an ensemble member cannot itself be an ensemble")
        return model

    # ---- inputs ----------------------------------------------------------------------------
    def _member_pixels(self, m: RetrievalModel, pixels: torch.Tensor) -> torch.Tensor:
        mean = torch.tensor(m.mean, device=pixels.device, dtype=pixels.dtype).view(1, 3, 1, 1)
        std = torch.tensor(m.std, device=pixels.device, dtype=pixels.dtype).view(1, 3, 1, 1)
        return (pixels - mean) / std

    def tokenize(self, texts):
        raise ModelError("an ensemble has no tokenizer of its own; use text_states")

    # ---- states and scores -------------------------------------------------------------------
    def _combine(self, per_member: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        root = self.mix.sqrt()
        out = {"emb": torch.cat([root[i] * st["emb"].float() for i, st in enumerate(per_member)], -1)}
        for i, st in enumerate(per_member):
            if self.members[i].pairwise:
                out.update({f"m{i}.{k}": v for k, v in st.items()})
        return out

    def _split(self, states: dict[str, torch.Tensor], i: int) -> dict[str, torch.Tensor]:
        """Member ``i``'s own states out of the combined ones."""
        prefix = f"m{i}."
        own = {k[len(prefix):]: v for k, v in states.items() if k.startswith(prefix)}
        if "emb" not in own:
            start = sum(m.embed_dim for m in self.members[:i])
            own["emb"] = states["emb"][..., start : start + self.members[i].embed_dim] / self.mix[i].sqrt().clamp_min(1e-12)
        return own

    def _member_image_states(self, i: int, pixels: torch.Tensor, encode: MemberEncoder) -> dict[str, torch.Tensor]:
        x = self._member_pixels(self.members[i], pixels)
        if self.cfg.views <= 1:
            return encode(i, x)
        from ..train.cache import dihedral

        embs = torch.stack([torch.nn.functional.normalize(encode(i, dihedral(x, v))["emb"].float(), dim=-1)
                            for v in range(int(self.cfg.views))])
        return {"emb": torch.nn.functional.normalize(embs.mean(0), dim=-1)}

    @property
    def runtime_members(self) -> list[RetrievalModel]:
        """The models whose towers the runtime runs for this one (:mod:`rsviewer.runtime`):
        an ensemble has no graph of its own; each member's export serves it."""
        return list(self.members)

    def image_states(self, pixels: torch.Tensor, member_states: Optional[MemberEncoder] = None) -> dict[str, torch.Tensor]:
        """``member_states(i, member_pixels)``: member i's image states (default: its own
        ``image_states``; the runtime passes its exported towers)."""
        encode = member_states or (lambda i, x: self.members[i].image_states(x))
        return self._combine([self._member_image_states(i, pixels, encode) for i in range(len(self.members))])

    def text_states(self, texts: Sequence[str], member_states: Optional[MemberEncoder] = None) -> dict[str, torch.Tensor]:
        encode = member_states or (lambda i, t: self.members[i].text_states(t))
        return self._combine([encode(i, texts) for i in range(len(self.members))])

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.image_states(pixels)["emb"]

    def encode_text(self, texts: Sequence[str]) -> torch.Tensor:
        return self.text_states(texts)["emb"]

    def score(self, image_states, text_states) -> torch.Tensor:
        if not self.pairwise:
            return image_states["emb"] @ text_states["emb"].T
        total = None
        for i, m in enumerate(self.members):
            s = self.mix[i] * m.score(self._split(image_states, i), self._split(text_states, i)).float()
            total = s if total is None else total + s
        return total

    # ---- no training, no frozen/trained split -----------------------------------------------
    def image_features(self, pixels):
        raise ModelError("an ensemble is not trained; build it with rsviewer ensemble")

    def text_features(self, tokens):
        raise ModelError("an ensemble is not trained; build it with rsviewer ensemble")

    def training_loss(self, batch):
        raise ModelError("an ensemble is not trained; build it with rsviewer ensemble")

    def trained_state_dict(self) -> dict[str, torch.Tensor]:
        return {"mix": self.mix.detach().cpu().contiguous(), "members_digest": self.members_digest.detach().cpu().contiguous()}

    def parameter_counts(self) -> dict[str, int]:
        total = sum(m.parameter_counts()["total"] for m in self.members)
        return {"total": int(total), "trained": 0}

    def feature_signature(self, side: str) -> dict:
        return {"class": "ensemble", "side": side, "members": [m["fingerprint"] for m in self.cfg.members]}

    # ---- explanations -------------------------------------------------------------------------
    def gradcam_layers(self) -> dict[str, nn.Module]:
        """The members' Grad-CAM layers, heaviest member first (its preset is the preset)."""
        order = sorted(range(len(self.members)), key=lambda i: -float(self.mix[i]))
        out: dict[str, nn.Module] = {}
        for i in order:
            for k, v in self.members[i].gradcam_layers().items():
                out[f"members.{i}.{k}"] = v
        return out


def build_ensemble(specs: Sequence[str], weights: Sequence[float] | None = None, views: int = 1) -> Ensemble:
    """An ensemble of the model folders/names ``specs`` (equal weights unless given)."""
    from ..checkpoint import load_model, resolve_model_dir

    members, entries = [], []
    for spec in specs:
        folder = resolve_model_dir(spec)
        model = load_model(folder)
        if model.arch == "ensemble":
            raise ModelError(f"{spec}: an ensemble member cannot itself be an ensemble")
        bare = "/" not in str(spec) and "\\" not in str(spec)
        entries.append({"model": str(spec) if bare else str(folder.resolve()), "fingerprint": model.fingerprint})
        members.append(model)
    w = list(weights) if weights is not None else [1.0] * len(members)
    if len(w) != len(members) or sum(w) <= 0:
        raise ModelError(f"{len(members)} members need {len(members)} non-negative weights, got {list(w)}")
    cfg = EnsembleConfig(members=entries, weights=[float(x) / sum(w) for x in w], views=int(views))
    return Ensemble(cfg, members=members)
