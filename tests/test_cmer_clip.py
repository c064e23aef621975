"""CMER over a frozen CLIP ViT (issue 11 item 5), on a tiny random OpenAI-layout ViT:
it starts as the plain clip model, its cached split is exact, it trains only adapters,
LoRA and its own scale, and reloads from a checkpoint that does not copy the CLIP."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from rsviewer.archs.cmer import LoRALinear
from rsviewer.archs.registry import create_model
from rsviewer.checkpoint import load_model
from rsviewer.errors import ModelError

from conftest import UCM_JSON, needs_shared
from test_clip import make_ref, save_as

TINY_CLIP = dict(adapter_hidden=32, adapter_heads=2, lora_layers=1, lora_rank=4, queue_factor=2)
TEXTS = ["many planes parked at the airport", "two tennis courts next to a road", "a river!"]


@pytest.fixture(scope="module")
def clip_file(tmp_path_factory):
    return save_as(make_ref("vit").state_dict(), tmp_path_factory.mktemp("cmerclip") / "RemoteCLIP-tiny-ViT.pt", "plain")


def build(path, **kw):
    torch.manual_seed(0)
    return create_model("cmer", **{**TINY_CLIP, "clip": str(path), **kw}).eval()


def perturb(model, seed=1):
    """Make every trained tensor non-trivial (at init the adapters and LoRA add nothing)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn(p.shape, generator=g))


def test_starts_as_the_plain_clip_model(clip_file):
    m, c = build(clip_file), load_model(clip_file).eval()
    assert m.image_size == c.image_size and m.embed_dim == c.embed_dim and m.mean == c.mean
    x = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(m.encode_image(x), c.encode_image(x), atol=1e-5)
        assert torch.allclose(m.encode_text(TEXTS), c.encode_text(TEXTS), atol=1e-5)
        perturb(m)  # ... and it is the trained part that moves it away
        assert (m.encode_image(x) - c.encode_image(x)).abs().max() > 1e-3
        assert (m.encode_text(TEXTS) - c.encode_text(TEXTS)).abs().max() > 1e-3


@pytest.mark.parametrize("lora_layers,blocks", [(1, ""), (0, "all"), (2, "1")])
def test_cached_split_is_exact(clip_file, lora_layers, blocks):
    m = build(clip_file, lora_layers=lora_layers, clip_blocks=blocks)
    perturb(m)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        feats = m.image_features(x)
        assert set(feats) == {"pooled"} | {f"b{i}" for i in m.clip.blocks}
        assert all(v.shape[1:] == (64, 4, 4) for k, v in feats.items() if k != "pooled")
        # the uncached reference: CLIP's vision tower run here, the adapters over its blocks
        out = m.clip.vision(pixel_values=x, output_hidden_states=True)
        ref = {"pooled": m.clip.clip.visual_projection(out.pooler_output)}
        ref.update({f"b{i}": m.clip.grid(out.hidden_states[i + 1]) for i in m.clip.blocks})
        assert torch.allclose(m.image_head(feats), m.image_head(ref), atol=1e-6)
        # text: cached lower layers + LoRA layers == the whole text tower with LoRA in place
        tok = m.tokenize(TEXTS)
        tf = m.text_features(tok)
        assert ("pooled" in tf) == (lora_layers == 0)
        whole = m.clip.pool_text(m.clip.run_layers(m.clip.text_model.embeddings(input_ids=tok["input_ids"]), 0, None),
                                 tok["attention_mask"])
        assert torch.allclose(m.text_head(tf), torch.nn.functional.normalize(whole, dim=-1), atol=1e-6)
        # the fp16 cache round trip stays close
        half = {k: v.half() if v.is_floating_point() else v for k, v in tf.items()}
        assert torch.allclose(m.text_head(half), m.text_head(tf), atol=5e-3)


def test_lora_sits_on_the_top_text_layers_only(clip_file):
    m = build(clip_file, lora_layers=1)
    layers = m.clip.text_model.encoder.layers
    assert isinstance(layers[1].self_attn.q_proj, LoRALinear) and isinstance(layers[1].self_attn.v_proj, LoRALinear)
    assert not isinstance(layers[0].self_attn.q_proj, LoRALinear)
    assert not isinstance(layers[1].self_attn.k_proj, LoRALinear)
    trainable = {n for n, p in m.named_parameters() if p.requires_grad}
    assert all(".lora_" in n for n in trainable if n.startswith("clip."))
    assert any(n.startswith("shared_down.") for n in trainable)


def test_bad_input_is_one_clear_error(clip_file, tmp_path):
    with pytest.raises(ModelError, match="missing"):
        create_model("cmer", clip=str(tmp_path / "nope.pt"))
    with pytest.raises(ValueError, match="clip_blocks"):
        build(clip_file, clip_blocks="7")
    with pytest.raises(ValueError, match="clip_blocks"):
        build(clip_file, clip_blocks="x")
    with pytest.raises(ValueError, match="without --end-to-end"):
        build(clip_file).tune_end_to_end()
    rn = save_as(make_ref("rn").state_dict(), tmp_path / "tiny-rn.pt", "plain")
    with pytest.raises(ModelError, match="ViT"):
        create_model("cmer", clip=str(rn))


def test_explain_and_gradcam_do_not_crash(clip_file):
    m = build(clip_file)
    ex = m.explain_maps(torch.randn(1, 3, 64, 64), "a bridge over the river")
    assert set(ex.image_maps) == {"focus/b0", "focus/b1", "similarity"}
    assert all(v.shape == (4, 4) and (v >= 0).all() for v in ex.image_maps.values())
    assert ex.words == ["a", "bridge", "over", "the", "river"]
    assert next(iter(m.gradcam_layers())) == "focus.b1"
    # through the explain engine: Grad-CAM on the preset adapter, the focus maps, word attributions
    from PIL import Image

    from rsviewer.explain import explain

    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    cam = explain(m, img, "a bridge over the river", "gradcam")
    assert cam.heatmap.shape == (64, 64) and np.isfinite(cam.heatmap).all()
    att = explain(m, img, "a bridge over the river", "attention")
    assert np.isfinite(att.heatmap).all()
    words = explain(m, img, "a bridge over the river", "words")
    assert words.words == ["a", "bridge", "over", "the", "river"] and len(words.word_weights) == 5
    total, expected = words.info["completeness"]
    assert total == pytest.approx(expected, abs=0.02)  # IG sums to s(x) - s(baseline)


@needs_shared()
def test_training_saves_only_the_trained_part_and_reloads(clip_file, tmp_path, monkeypatch):
    from rsviewer.archs.cmer import CMER
    from rsviewer.train.trainer import TrainConfig, train

    trained: list = []  # the trainer's own model, caught at its optimiser steps
    step = CMER.after_step
    monkeypatch.setattr(CMER, "after_step", lambda self, batch: (trained.append(self), step(self, batch))[1])
    torch.manual_seed(0)
    frozen_before = {k: v.clone() for k, v in build(clip_file).state_dict().items() if k.startswith("clip.") and ".lora_" not in k}
    out = tmp_path / "m"
    res = train(
        "cmer", UCM_JSON, out,
        config=TrainConfig(epochs=2, batch_size=8, lr=3e-3, max_train_images=16, max_val_images=8, views=1),
        model_config={**TINY_CLIP, "clip": str(clip_file), "scene_prompt_prob": 0.5},
        log=lambda msg: None,
    )
    losses = [h["loss"] for h in res.history]
    assert losses[-1] < losses[0]
    saved = load_file(str(out / "model.safetensors"))
    clip_keys = [k for k in saved if k.startswith("clip.")]
    assert clip_keys and all(".lora_" in k for k in clip_keys)  # the CLIP itself is referenced, not copied
    assert not any(k.startswith(("tower.", "backbone.", "text.")) for k in saved)
    assert sum(v.numel() for v in saved.values()) < 0.5 * sum(v.numel() for v in frozen_before.values())
    m = load_model(out, expect_arch="cmer")
    assert m.bases["clip.tower"].sha256 and m.cfg.clip == str(clip_file.resolve())
    # the CLIP weights are frozen: unchanged in the model that was trained (and in the file)
    assert len(trained) >= 4 and all(t is trained[0] for t in trained)
    now = trained[0].state_dict()
    assert all(torch.equal(now[k], v) for k, v in frozen_before.items())
    assert any(not torch.equal(now[k], v) for k, v in build(clip_file).state_dict().items() if ".lora_B" in k)
    # the LoRA and adapters did learn, and the reloaded model gives the saved model's numbers
    assert any(saved[k].abs().max() > 0 for k in saved if k.endswith("lora_B"))
    assert saved["side_proj.1.weight"].abs().max() > 0
    x = torch.randn(2, 3, 64, 64)
    # a model built from the CLIP file alone plus the saved tensors is the loaded model
    m2 = build(clip_file)
    missing, unexpected = m2.load_state_dict(saved, strict=False)
    assert not unexpected and all(k.startswith("clip.") and ".lora_" not in k for k in missing)
    with torch.no_grad():
        assert torch.equal(m.encode_image(x), m2.encode_image(x))
        assert torch.equal(m.encode_text(TEXTS), m2.encode_text(TEXTS))
        c = load_model(clip_file).eval()
        assert (m.encode_image(x) - c.encode_image(x)).abs().max() > 1e-4
