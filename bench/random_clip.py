"""Write a randomly initialised CLIP with a published model's shapes, in OpenAI layout.

    python bench/random_clip.py --arch ViT-B-32 --out /tmp/RandomCLIP-ViT-B-32.pt
    python bench/index.py --model /tmp/RandomCLIP-ViT-B-32.pt --json
    python bench/query.py --model /tmp/RandomCLIP-ViT-B-32.pt --json

No CLIP weights exist on this machine; speed depends on shapes, not on trained values, so
a random model with RemoteCLIP/GeoRSCLIP/SkyCLIP's ViT-B-32 (or ViT-L-14) shapes gives the
figures a user of those checkpoints will see. Its embeddings mean nothing.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

# published open_clip configs (model_configs/*.json): image size, patch, vision width/layers,
# text width/layers/heads, embed dim
SHAPES = {
    "ViT-B-32": dict(size=224, patch=32, vw=768, vl=12, tw=512, tl=12, embed=512),
    "ViT-B-16": dict(size=224, patch=16, vw=768, vl=12, tw=512, tl=12, embed=512),
    "ViT-L-14": dict(size=224, patch=14, vw=1024, vl=24, tw=768, tl=12, embed=768),
}


def _block(sd: dict, prefix: str, d: int, g: torch.Generator) -> None:
    def rnd(*shape, std=0.02):
        return torch.randn(*shape, generator=g) * std

    sd[f"{prefix}.ln_1.weight"], sd[f"{prefix}.ln_1.bias"] = torch.ones(d), torch.zeros(d)
    sd[f"{prefix}.attn.in_proj_weight"], sd[f"{prefix}.attn.in_proj_bias"] = rnd(3 * d, d), torch.zeros(3 * d)
    sd[f"{prefix}.attn.out_proj.weight"], sd[f"{prefix}.attn.out_proj.bias"] = rnd(d, d), torch.zeros(d)
    sd[f"{prefix}.ln_2.weight"], sd[f"{prefix}.ln_2.bias"] = torch.ones(d), torch.zeros(d)
    sd[f"{prefix}.mlp.c_fc.weight"], sd[f"{prefix}.mlp.c_fc.bias"] = rnd(4 * d, d), torch.zeros(4 * d)
    sd[f"{prefix}.mlp.c_proj.weight"], sd[f"{prefix}.mlp.c_proj.bias"] = rnd(d, 4 * d), torch.zeros(d)


def state_dict(arch: str, seed: int = 0) -> dict[str, torch.Tensor]:
    s = SHAPES[arch]
    g = torch.Generator().manual_seed(seed)
    vw, tw, grid = s["vw"], s["tw"], s["size"] // s["patch"]
    sd = {
        "visual.conv1.weight": torch.randn(vw, 3, s["patch"], s["patch"], generator=g) * 0.02,
        "visual.class_embedding": torch.randn(vw, generator=g) * 0.02,
        "visual.positional_embedding": torch.randn(grid * grid + 1, vw, generator=g) * 0.01,
        "visual.ln_pre.weight": torch.ones(vw), "visual.ln_pre.bias": torch.zeros(vw),
        "visual.ln_post.weight": torch.ones(vw), "visual.ln_post.bias": torch.zeros(vw),
        "visual.proj": torch.randn(vw, s["embed"], generator=g) * vw**-0.5,
        "token_embedding.weight": torch.randn(49408, tw, generator=g) * 0.02,
        "positional_embedding": torch.randn(77, tw, generator=g) * 0.01,
        "ln_final.weight": torch.ones(tw), "ln_final.bias": torch.zeros(tw),
        "text_projection": torch.randn(tw, s["embed"], generator=g) * tw**-0.5,
        "logit_scale": torch.tensor(4.6052),
    }
    for i in range(s["vl"]):
        _block(sd, f"visual.transformer.resblocks.{i}", vw, g)
    for i in range(s["tl"]):
        _block(sd, f"transformer.resblocks.{i}", tw, g)
    return sd


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", choices=sorted(SHAPES), default="ViT-B-32")
    ap.add_argument("--out", required=True, help="a .pt file (must not exist)")
    args = ap.parse_args(argv)
    out = Path(args.out)
    if out.exists():
        raise SystemExit(f"error: {out} exists")
    sd = state_dict(args.arch)
    tmp = out.with_name(f".{out.name}.tmp")
    torch.save(sd, tmp)
    tmp.replace(out)
    n = sum(v.numel() for v in sd.values())
    print(f"wrote {out}: random {args.arch}, {n / 1e6:.1f} M parameters")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
