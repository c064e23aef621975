"""OpenAI / open_clip-layout checkpoints: read safely, infer the configuration from
tensor shapes, build the towers (SPEC §11).

    sd = read_state_dict("RemoteCLIP-ViT-B-32.pt")     # never unpickles code
    cfg = infer_config(sd, name="RemoteCLIP-ViT-B-32.pt")
    tower = build_tower(cfg, sd)                        # ViT → transformers' CLIPModel

What cannot be read from shapes comes from a table of the published configurations:
head counts (ViT-H-14: 16 heads of width 80, not width/64) and the activation
(QuickGELU for OpenAI-initialised models, GELU for LAION-initialised ones).
"""
from __future__ import annotations

import pickle
import re
import zipfile
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from ...errors import ModelError

SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".ckpt")
MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)

# vision width → (name, heads) of the published ViTs; text width → heads
VIT_TABLE = {768: ("ViT-B", 12), 1024: ("ViT-L", 16), 1280: ("ViT-H", 16), 1408: ("ViT-g", 16), 1664: ("ViT-bigG", 16)}
TEXT_HEADS = {512: 8, 768: 12, 1024: 16, 1280: 20}
RN_TABLE = {(3, 4, 6, 3): "RN50", (3, 4, 23, 3): "RN101", (4, 6, 10, 6): "RN50x4", (6, 8, 18, 8): "RN50x16", (3, 15, 36, 10): "RN50x64"}
ACTIVATIONS = ("quick_gelu", "gelu")


# ---- reading -------------------------------------------------------------------------------
def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of an OpenAI/open_clip checkpoint (plain, ``{"state_dict": …}``-wrapped,
    ``module.``-prefixed; .pt/.bin/.safetensors). Pickles are read with
    ``weights_only=True``: a file that would run code is refused, never executed."""
    p = Path(path)
    if not p.is_file():
        raise ModelError(f"checkpoint not found: {p}")
    if p.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            sd: Any = load_file(str(p))
        except (SafetensorError, OSError, ValueError, RuntimeError) as e:
            raise ModelError(f"{p.name} is not a readable safetensors file (truncated or corrupt: {_first_line(e)})") from None
    else:
        sd = _torch_load(p)
    return unwrap(sd, p.name)


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:160]


def is_torchscript(p: Path) -> bool:
    try:
        with zipfile.ZipFile(p) as z:
            return any(n.split("/", 1)[-1].startswith(("code/", "constants.pkl")) for n in z.namelist())
    except (zipfile.BadZipFile, OSError):
        return False


def _torch_load(p: Path) -> Any:
    if is_torchscript(p):  # OpenAI's original files: read the tensors, never the code
        from .torchscript import read_torchscript

        return read_torchscript(p)
    try:
        return torch.load(str(p), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise ModelError(
            f"{p.name} was refused: it is a pickle that would run code or build objects other than tensors "
            f"({_first_line(e).split('. ')[0]}); rsviewer only reads tensors"
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile) as e:
        raise ModelError(f"{p.name} cannot be read (truncated or corrupt: {_first_line(e)})") from None


def unwrap(obj: Any, name: str = "checkpoint") -> dict[str, torch.Tensor]:
    for key in ("state_dict", "model", "module"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict) and key not in ("visual",):
            obj = obj[key]
    if not isinstance(obj, dict) or not obj:
        raise ModelError(f"{name} holds no state dict (found {type(obj).__name__})")
    sd = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if sd and all(k.startswith("module.") for k in sd):
        sd = {k[len("module."):]: v for k, v in sd.items()}
    return sd


# ---- the configuration ----------------------------------------------------------------------------
def layout_of(sd: dict) -> Optional[str]:
    if "visual.proj" in sd and "visual.conv1.weight" in sd:
        return "openai-vit"
    if "visual.attnpool.c_proj.weight" in sd:
        return "openai-rn"
    return None


def _count(sd: dict, prefix: str) -> int:
    pat = re.compile(re.escape(prefix) + r"(\d+)\.")
    return len({int(m.group(1)) for k in sd for m in [pat.match(k)] if m})


def infer_config(sd: dict, name: str = "", overrides: Optional[dict] = None) -> dict:
    """Everything needed to rebuild the towers, from the tensor shapes and the table of
    published configurations; ``overrides`` (``--set k=v``) win. ``"why"`` records where
    the head counts and the activation came from."""
    overrides = dict(overrides or {})
    layout = layout_of(sd)
    if layout is None:
        keys = ", ".join(sorted(sd)[:4])
        raise ModelError(
            f"{name or 'the file'} is in neither the OpenAI/open_clip layout nor another known one: found keys like {keys}; "
            f"expected visual.conv1.weight + visual.proj (ViT) or visual.attnpool.* (ResNet) and token_embedding.weight"
        )
    for k in ("token_embedding.weight", "positional_embedding", "ln_final.weight", "text_projection"):
        if k not in sd:
            raise ModelError(f"{name}: the text tower is incomplete ({k} missing)")
    tw = sd["ln_final.weight"].shape[0]
    cfg: dict[str, Any] = {
        "layout": layout,
        "embed_dim": int(sd["text_projection"].shape[1]),
        "context_length": int(sd["positional_embedding"].shape[0]),
        "vocab_size": int(sd["token_embedding.weight"].shape[0]),
        "text_width": int(tw),
        "text_layers": _count(sd, "transformer.resblocks."),
        "text_heads": TEXT_HEADS.get(int(tw), max(1, tw // 64)),
    }
    why = {"text_heads": "published table" if tw in TEXT_HEADS else "width/64 (not a published width)"}
    if layout == "openai-vit":
        vw = int(sd["visual.conv1.weight"].shape[0])
        patch = int(sd["visual.conv1.weight"].shape[-1])
        grid = int(round((sd["visual.positional_embedding"].shape[0] - 1) ** 0.5))
        family, heads = VIT_TABLE.get(vw, (f"ViT-w{vw}", max(1, vw // 64)))
        cfg.update({
            "vision_width": vw, "vision_layers": _count(sd, "visual.transformer.resblocks."),
            "vision_heads": heads, "patch_size": patch, "image_size": patch * grid,
            "vision_mlp": int(sd["visual.transformer.resblocks.0.mlp.c_fc.weight"].shape[0]),
            "text_mlp": int(sd["transformer.resblocks.0.mlp.c_fc.weight"].shape[0]),
        })
        cfg["name"] = f"{family}-{patch}"
        why["vision_heads"] = "published table" if vw in VIT_TABLE else "width/64 (not a published width)"
    else:
        layers = tuple(_count(sd, f"visual.layer{i}.") for i in range(1, 5))
        width = int(sd["visual.layer1.0.conv1.weight"].shape[0])
        grid = int(round((sd["visual.attnpool.positional_embedding"].shape[0] - 1) ** 0.5))
        cfg.update({
            "vision_layers": list(layers), "vision_width": width,
            "vision_heads": width * 32 // 64,  # OpenAI: attention-pool heads = embed width / 64
            "image_size": grid * 32,
            "text_mlp": int(sd["transformer.resblocks.0.mlp.c_fc.weight"].shape[0]),
        })
        cfg["name"] = RN_TABLE.get(layers, f"RN{layers}")
        why["vision_heads"] = "OpenAI rule: width·32/64"
    act, why["activation"] = default_activation(cfg, name)
    cfg["activation"] = act
    for k, v in overrides.items():
        if k not in cfg or k in ("layout",):
            raise ModelError(f"--set {k}: not a setting of this model; choose from activation, vision_heads, text_heads")
        cfg[k] = type(cfg[k])(v) if not isinstance(cfg[k], list) else v
        why[k] = "--set"
    if cfg["activation"] not in ACTIVATIONS:
        raise ModelError(f"activation must be one of {', '.join(ACTIVATIONS)}, not {cfg['activation']!r}")
    for side, w in (("vision", cfg.get("vision_width")), ("text", tw)):
        h = cfg[f"{side}_heads"]
        if layout == "openai-vit" or side == "text":
            if w % h:
                raise ModelError(f"{side}_heads={h} does not divide the {side} width {w}")
    if layout == "openai-rn" and (cfg["vision_width"] * 32) % cfg["vision_heads"]:
        raise ModelError(f"vision_heads={cfg['vision_heads']} does not divide the attention-pool width")
    cfg["why"] = why
    return cfg


def default_activation(cfg: dict, name: str) -> tuple[str, str]:
    """QuickGELU for OpenAI-initialised models, GELU for LAION-initialised ones (SPEC §11).
    Shapes cannot tell them apart, so: ViT-H/g/bigG exist only from LAION → GELU; a file
    name saying LAION or SkyCLIP's ViT-B-32 (LAION-initialised) → GELU; everything else
    (RemoteCLIP, GeoRSCLIP-B-32, SkyCLIP-L-14, OpenAI's own) → QuickGELU."""
    n = name.lower()
    fam = cfg.get("name", "")
    if fam.startswith(("ViT-H", "ViT-g", "ViT-bigG")):
        return "gelu", f"{fam} exists only LAION-initialised"
    if "laion" in n or "datacomp" in n:
        return "gelu", "file name says LAION/DataComp-initialised"
    if "skyclip" in n and not fam.startswith("ViT-L"):
        return "gelu", "SkyCLIP ViT-B-32 is LAION-initialised (its L-14 is OpenAI's)"
    return "quick_gelu", "OpenAI-initialised (RemoteCLIP, GeoRSCLIP-B-32, SkyCLIP-L-14, OpenAI)"


def describe(cfg: dict) -> str:
    why = cfg.get("why", {})
    vis = (f"vision {cfg['vision_width']}×{cfg['vision_layers']} layers, {cfg['vision_heads']} heads, patch {cfg['patch_size']}"
           if cfg["layout"] == "openai-vit" else f"ResNet layers {cfg['vision_layers']} width {cfg['vision_width']}, "
           f"attention-pool {cfg['vision_heads']} heads")
    return (f"{cfg['name']}: {vis}, {cfg['image_size']} px; text {cfg['text_width']}×{cfg['text_layers']} layers, "
            f"{cfg['text_heads']} heads, context {cfg['context_length']}, vocab {cfg['vocab_size']}; embed {cfg['embed_dim']}; "
            f"activation {cfg['activation']} ({why.get('activation', '')})")


# ---- building ----------------------------------------------------------------------------------------
def hf_text_config(cfg: dict) -> dict:
    return dict(
        vocab_size=cfg["vocab_size"], hidden_size=cfg["text_width"], intermediate_size=cfg["text_mlp"],
        num_hidden_layers=cfg["text_layers"], num_attention_heads=cfg["text_heads"],
        max_position_embeddings=cfg["context_length"], hidden_act=cfg["activation"], layer_norm_eps=1e-5,
        projection_dim=cfg["embed_dim"],
        # eos id 2 selects transformers' legacy pooling at the arg-max id: OpenAI's rule
        bos_token_id=0, eos_token_id=2, pad_token_id=1,
    )


def _block_map(src: str, dst: str) -> list[tuple[str, str]]:
    return [
        (f"{src}.ln_1", f"{dst}.layer_norm1"), (f"{src}.ln_2", f"{dst}.layer_norm2"),
        (f"{src}.attn.out_proj", f"{dst}.self_attn.out_proj"),
        (f"{src}.mlp.c_fc", f"{dst}.mlp.fc1"), (f"{src}.mlp.c_proj", f"{dst}.mlp.fc2"),
    ]


def convert_text(sd: dict, cfg: dict, dst: str = "text_model") -> dict[str, torch.Tensor]:
    out = {
        f"{dst}.embeddings.token_embedding.weight": sd["token_embedding.weight"],
        f"{dst}.embeddings.position_embedding.weight": sd["positional_embedding"],
        f"{dst}.final_layer_norm.weight": sd["ln_final.weight"],
        f"{dst}.final_layer_norm.bias": sd["ln_final.bias"],
        "text_projection.weight": sd["text_projection"].t(),
    }
    for i in range(cfg["text_layers"]):
        out.update(_convert_block(sd, f"transformer.resblocks.{i}", f"{dst}.encoder.layers.{i}"))
    return out


def _convert_block(sd: dict, src: str, dst: str) -> dict[str, torch.Tensor]:
    out = {}
    for a, b in _block_map(src, dst):
        out[f"{b}.weight"] = sd[f"{a}.weight"]
        out[f"{b}.bias"] = sd[f"{a}.bias"]
    w, bias = sd[f"{src}.attn.in_proj_weight"], sd[f"{src}.attn.in_proj_bias"]
    for part, wq, bq in zip(("q", "k", "v"), w.chunk(3), bias.chunk(3)):
        out[f"{dst}.self_attn.{part}_proj.weight"] = wq
        out[f"{dst}.self_attn.{part}_proj.bias"] = bq
    return out


def convert_vit(sd: dict, cfg: dict) -> dict[str, torch.Tensor]:
    """OpenAI/open_clip ViT keys → transformers ``CLIPModel`` keys."""
    v = "vision_model"
    out = convert_text(sd, cfg)
    out.update({
        f"{v}.embeddings.class_embedding": sd["visual.class_embedding"],
        f"{v}.embeddings.patch_embedding.weight": sd["visual.conv1.weight"],
        f"{v}.embeddings.position_embedding.weight": sd["visual.positional_embedding"],
        f"{v}.pre_layrnorm.weight": sd["visual.ln_pre.weight"], f"{v}.pre_layrnorm.bias": sd["visual.ln_pre.bias"],
        f"{v}.post_layernorm.weight": sd["visual.ln_post.weight"], f"{v}.post_layernorm.bias": sd["visual.ln_post.bias"],
        "visual_projection.weight": sd["visual.proj"].t(),
        "logit_scale": sd.get("logit_scale", torch.tensor(4.6052)).reshape(()),
    })
    for i in range(cfg["vision_layers"]):
        out.update(_convert_block(sd, f"visual.transformer.resblocks.{i}", f"{v}.encoder.layers.{i}"))
    return out


def load_checked(module: nn.Module, tensors: dict[str, torch.Tensor], name: str, optional: tuple[str, ...] = ()) -> None:
    """Strict load with one clear line for a missing or shape-mismatched tensor."""
    want = module.state_dict()
    for k, t in tensors.items():
        if k in want and tuple(t.shape) != tuple(want[k].shape):
            raise ModelError(f"{name}: tensor for {k} has shape {tuple(t.shape)}, the inferred model expects {tuple(want[k].shape)}")
    missing = [k for k in want if k not in tensors and not k.endswith(optional)]
    if missing:
        raise ModelError(f"{name}: {len(missing)} tensors missing, e.g. {missing[:2]}")
    # assign: the module takes the loaded tensors as they are (no second 600 MB copy for a ViT-B)
    module.load_state_dict({k: v.float().contiguous() for k, v in tensors.items() if k in want}, strict=False, assign=True)


class OpenAIViT(nn.Module):
    """A converted ViT: transformers' ``CLIPModel`` (eager attention, so maps are kept)."""

    kind = "vit"

    def __init__(self, cfg: dict):
        super().__init__()
        from transformers import CLIPConfig, CLIPModel

        vis = dict(hidden_size=cfg["vision_width"], intermediate_size=cfg["vision_mlp"], num_hidden_layers=cfg["vision_layers"],
                   num_attention_heads=cfg["vision_heads"], image_size=cfg["image_size"], patch_size=cfg["patch_size"],
                   hidden_act=cfg["activation"], layer_norm_eps=1e-5, projection_dim=cfg["embed_dim"])
        conf = CLIPConfig(text_config=hf_text_config(cfg), vision_config=vis, projection_dim=cfg["embed_dim"])
        self.clip = CLIPModel._from_config(conf, attn_implementation="eager")

    def load(self, sd: dict, cfg: dict, name: str) -> None:
        load_checked(self.clip, convert_vit(sd, cfg), name, optional=("position_ids",))


class OpenAIResNet(nn.Module):
    """ModifiedResNet image tower + transformers' CLIP text tower with projection."""

    kind = "resnet"

    def __init__(self, cfg: dict):
        super().__init__()
        from transformers import CLIPTextConfig, CLIPTextModelWithProjection

        from .resnet import ModifiedResNet

        self.visual = ModifiedResNet(tuple(cfg["vision_layers"]), cfg["vision_width"], cfg["embed_dim"], cfg["vision_heads"], cfg["image_size"])
        self.text = CLIPTextModelWithProjection._from_config(CLIPTextConfig(**hf_text_config(cfg)), attn_implementation="eager")
        self.logit_scale = nn.Parameter(torch.tensor(4.6052))

    def load(self, sd: dict, cfg: dict, name: str) -> None:
        vis = {k[len("visual."):]: v for k, v in sd.items() if k.startswith("visual.")}
        load_checked(self.visual, vis, name, optional=("num_batches_tracked",))
        load_checked(self.text, convert_text(sd, cfg), name, optional=("position_ids",))
        if "logit_scale" in sd:
            self.logit_scale.data.copy_(sd["logit_scale"].reshape(()))


def _no_init():
    """Skip random initialisation of tensors the checkpoint overwrites anyway (seconds for a ViT-B)."""
    try:
        from transformers.initialization import no_init_weights  # transformers ≥ 5
    except ImportError:  # pragma: no cover — transformers 4
        from transformers.modeling_utils import no_init_weights
    return no_init_weights()


def build_tower(cfg: dict, sd: dict, name: str = "checkpoint") -> nn.Module:
    with _no_init():
        tower = OpenAIViT(cfg) if cfg["layout"] == "openai-vit" else OpenAIResNet(cfg)
    tower.load(sd, cfg, name)
    return tower.eval()
