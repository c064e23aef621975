"""Backbones and text encoder: packaged weights load strictly and compute the right thing."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from rsviewer.errors import ModelError
from rsviewer.nets.factory import create_backbone, load_state_dict_file
from rsviewer.nets.weights import packaged_ref, resolve_ref


def _china(size: int, mean, std) -> torch.Tensor:
    from sklearn.datasets import load_sample_image

    im = Image.fromarray(load_sample_image("china.jpg"))  # ships inside scikit-learn
    w, h = im.size
    s = min(w, h)
    im = im.crop(((w - s) // 2, (h - s) // 2, (w + s) // 2, (h + s) // 2)).resize((size, size), Image.BICUBIC)
    x = torch.from_numpy(np.asarray(im, dtype=np.float32) / 255.0).permute(2, 0, 1)[None]
    return (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


@pytest.mark.parametrize("variant", ["efficientnet-lite0", "efficientnet-lite1", "efficientnet-lite2"])
def test_efficientnet_lite_imagenet_top1(variant):
    # A known photo of a Chinese palace: ImageNet class 698 "palace" must be top-1,
    # which only happens when every packaged tensor landed in the right place.
    model, ref = create_backbone(variant)
    assert ref is not None and ref.package.startswith(variant) and len(ref.sha256) == 64
    model.eval()
    with torch.no_grad():
        logits = model(_china(model.native_resolution, model.mean, model.std))
    assert int(logits.argmax()) == 698


def test_efficientnet_feature_maps_strides():
    model, _ = create_backbone("efficientnet-lite0")
    with torch.no_grad():
        f = model.eval().forward_features(torch.zeros(1, 3, 256, 256))
    assert f["s8"].shape == (1, 40, 32, 32)
    assert f["s16"].shape == (1, 112, 16, 16)
    assert f["s32"].shape == (1, 1280, 8, 8)


@pytest.mark.parametrize("name", ["efficientnet-lite0", "resnet18"])
@pytest.mark.parametrize("tap", ["s8", "s16"])
def test_backbone_split_equals_full_forward(name, tap):
    # partial fine-tuning caches forward_features(upto=tap) and runs forward_from(tap) per step
    model, _ = create_backbone(name, None if name.startswith("efficientnet") else "random")
    x = torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        full = model.eval().forward_features(x)
        part = model.forward_features(x, upto=tap)
        rest = model.forward_from(part[tap], tap)
    later = {"s8": {"s16", "s32"}, "s16": {"s32"}}[tap]
    assert set(rest) == later and tap in part and not (later & set(part))
    for k in later:
        assert torch.equal(rest[k], full[k]), k
    prefixes = model.prefixes_after(tap)
    names = [n for n, _ in model.named_parameters()]
    tuned = [n for n in names if n.startswith(tuple(prefixes))]
    assert 0 < len(tuned) < len(names)
    with pytest.raises(ValueError, match="cannot split"):
        model.forward_features(x, upto="s32")


@pytest.mark.parametrize("name,c32", [("resnet18", 512), ("resnet50", 2048), ("vit-b16", 768)])
def test_user_weights_round_trip(tmp_path, name, c32):
    from safetensors.torch import save_file

    src, _ = create_backbone(name, "random")
    path = tmp_path / f"{name}.safetensors"
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(path))
    model, ref = create_backbone(name, str(path))
    assert ref.path == str(path.resolve())
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        a = src.eval().forward_features(x)["s32"]
        b = model.eval().forward_features(x)["s32"]
    assert a.shape[1] == c32
    assert torch.equal(a, b)
    # a .pth file is read with weights_only (no unpickling of code)
    pth = tmp_path / f"{name}.pth"
    torch.save({"state_dict": src.state_dict()}, pth)
    assert set(load_state_dict_file(pth)) == set(src.state_dict())


def test_backbone_errors(tmp_path):
    with pytest.raises(ModelError, match="no bundled weights"):
        create_backbone("resnet18")
    with pytest.raises(ModelError, match="unknown backbone"):
        create_backbone("resnet1000")
    wrong = tmp_path / "wrong.pth"
    torch.save(create_backbone("resnet18", "random")[0].state_dict(), wrong)
    with pytest.raises(ModelError, match="do not fit resnet50"):
        create_backbone("resnet50", str(wrong))
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(ModelError, match="cannot read weights"):
        create_backbone("resnet18", str(junk))


def test_packaged_ref_verifies_sha(monkeypatch):
    ref = packaged_ref("efficientnet-lite0")
    assert resolve_ref(ref).exists()
    bad = type(ref)(sha256="0" * 64, package=ref.package, relpath=ref.relpath)
    with pytest.raises(ModelError, match="sha256 mismatch"):
        resolve_ref(bad)


def test_text_encoder_split_equals_full():
    from rsviewer.nets.text import TextEncoder

    enc = TextEncoder()
    assert enc.num_layers == 6 and enc.width == 384
    tok = enc.tokenize(["a plane parked at the airport", "two tennis courts beside a parking lot"])
    with torch.no_grad():
        full = enc(tok["input_ids"], tok["attention_mask"])
        half = enc.embed_prefix(tok["input_ids"], tok["attention_mask"], 3)
        rest = enc.forward_layers(half, tok["attention_mask"], 3)
        ref = enc.bert(**tok).last_hidden_state
    torch.testing.assert_close(full, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(rest, full, atol=1e-6, rtol=1e-6)
    assert enc.words(tok["input_ids"])[0][:3] == ["[CLS]", "a", "plane"]


def test_text_encoder_rejects_non_hf_folder(tmp_path):
    from rsviewer.nets.text import TextEncoder

    with pytest.raises(ModelError, match="Hugging Face folder"):
        TextEncoder(str(tmp_path))
