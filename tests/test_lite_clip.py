"""``lite`` over a frozen CLIP (``--set clip=PATH``): MLP heads trained on the CLIP's cached
embeddings — on a tiny random OpenAI-layout ViT (no CLIP weights exist here)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from conftest import UCM_JSON, needs_shared
from rsviewer.archs.registry import create_model
from rsviewer.checkpoint import load_model, read_config
from rsviewer.errors import RsviewerError
from rsviewer.train.trainer import TrainConfig, train
from test_clip import images, make_ref, save_as


@pytest.fixture(scope="module")
def vit_file(tmp_path_factory):
    ref = make_ref("vit")
    return ref, save_as(ref.state_dict(), tmp_path_factory.mktemp("vit") / "RemoteCLIP-tiny-ViT.pt", "plain")


def test_the_cached_features_are_the_clip_embeddings(vit_file):
    _, path = vit_file
    lite = create_model("lite", clip=str(path), hidden=32, embed_dim=16)
    plain = load_model(path)
    imgs = images(2)
    x = lite.preprocess(imgs)
    assert x.shape[-1] == plain.image_size and lite.mean == plain.mean  # the CLIP's own preprocessing
    with torch.no_grad():
        fi = lite.image_features(x)["pooled"]
        ft = lite.text_features({k: v for k, v in lite.tokenize(["a road", "many planes"]).items()})["pooled"]
        torch.testing.assert_close(F.normalize(fi, dim=-1), plain.encode_image(x), atol=1e-5, rtol=0)
        torch.testing.assert_close(F.normalize(ft, dim=-1), plain.encode_text(["a road", "many planes"]), atol=1e-5, rtol=0)
        assert lite.encode_image(x).shape == (2, 16)
        assert lite.local_embeddings(x).shape[:2] == (2, 16)
    assert lite.gradcam_layers()
    with pytest.raises(ValueError, match="--arch clip --end-to-end"):
        lite.tune_end_to_end()


@needs_shared()
def test_heads_train_on_the_frozen_clip_and_reload(vit_file, tmp_path):
    _, path = vit_file
    out = tmp_path / "lite-clip"
    cfg = TrainConfig(epochs=3, batch_size=16, max_train_images=32, max_val_images=8, views=1, lr=2e-3)
    res = train("lite", UCM_JSON, out, config=cfg, model_config={"clip": str(path), "hidden": 32, "embed_dim": 16},
                log=lambda m: None)
    assert res.history[-1]["loss"] < res.history[0]["loss"]
    saved = load_file(str(out / "model.safetensors"))
    assert saved and not any(k.startswith("clip.") for k in saved)  # the CLIP is referenced, not copied
    assert read_config(out)["bases"]["clip.tower"]["path"] == str(path.resolve())
    m = load_model(out)
    before = load_model(path)
    x = m.preprocess(images(1))
    with torch.no_grad():
        again = load_model(out).encode_image(x)
        torch.testing.assert_close(m.encode_image(x), again)
        torch.testing.assert_close(m.clip.image_features(x)["pooled"], before.image_features(x)["pooled"])  # frozen


def test_bad_settings_are_one_line(vit_file):
    _, path = vit_file
    with pytest.raises((ValueError, RsviewerError), match="leave image_train_from"):
        create_model("lite", clip=str(path), image_train_from="s16")


def test_gradcam_on_the_vit_block_before_the_last_follows_the_text(vit_file):
    import numpy as np
    from PIL import Image

    from rsviewer.explain import explain

    _, path = vit_file
    m = create_model("lite", clip=str(path), hidden=32, embed_dim=16)
    assert next(iter(m.gradcam_layers())).endswith("layers.0")  # 2 blocks: the one before the last
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    a = explain(m, img, "a bridge over the river", "gradcam").heatmap
    b = explain(m, img, "many planes at the airport", "gradcam").heatmap
    assert a.shape == (64, 64) and np.isfinite(a).all() and a.max() > 0
    assert not np.allclose(a, b)
