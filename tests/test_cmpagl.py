"""CMPAGL: Gswin pieces (windows, shifted mask, GWG), momentum queue, optimized triplet,
a tiny training run on real UCM data, save/load round trip, from-pixels variant."""
from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from rsviewer.archs.registry import create_model
from rsviewer.archs.cmpagl.gswin import (
    GlobalWindowGenerator,
    Gswin,
    GswinBlock,
    effective_window,
    gwg_layers_needed,
    shifted_window_mask,
    window_partition,
    window_reverse,
)
from rsviewer.archs.cmpagl.objectives import (
    MomentumQueue,
    mask_tokens,
    momentum_update,
    optimized_triplet,
    sample_hard_negatives,
)

from conftest import UCM_JSON, assert_split_matches_frozen, needs_shared

TINY = dict(width=16, depths=[1, 1, 2, 1], head_dim=16, image_size=128, embed_dim=32, queue_size=32, fusion_batch=4)


# ---- windows ---------------------------------------------------------------------------------
@pytest.mark.parametrize("h,w,ws", [(8, 8, 4), (16, 24, 8), (6, 9, 3)])
def test_window_partition_reverse_round_trip(h, w, ws):
    x = torch.randn(2, h, w, 5)
    win = window_partition(x, ws)
    assert win.shape == (2 * (h // ws) * (w // ws), ws * ws, 5)
    # the first window is the top-left ws×ws block, row-major
    assert torch.equal(win[0], x[0, :ws, :ws].reshape(-1, 5))
    assert torch.equal(window_reverse(win, ws, h, w), x)


@pytest.mark.parametrize("h,w,ws,shift", [(8, 8, 4, 2), (8, 12, 4, 2), (12, 12, 6, 3)])
def test_shifted_window_mask_matches_brute_force(h, w, ws, shift):
    """Two tokens of a window of the rolled map may attend iff they were neighbours
    (closer than a window) in the original map, i.e. neither wrapped around the border."""
    mask = shifted_window_mask(h, w, ws, shift)
    # original coordinates of every position of the map rolled by (-shift, -shift)
    rr, cc = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    orig = torch.stack([(rr + shift) % h, (cc + shift) % w], -1).float()  # (h, w, 2)
    wins = window_partition(orig[None], ws)  # (nW, N, 2)
    for k in range(wins.shape[0]):
        d = (wins[k][:, None, :] - wins[k][None, :, :]).abs().amax(-1)  # Chebyshev distance
        expected_blocked = d >= ws
        assert torch.equal(mask[k], expected_blocked), f"window {k}"
    # windows away from the wrapped border are not masked at all
    assert not mask[0].any()


def test_gswin_block_shapes_and_ablations():
    x = torch.randn(2, 16, 16, 32)
    g = torch.randn(2, 8, 8, 32)
    for use_shift, use_global in itertools.product([True, False], [True, False]):
        blk = GswinBlock(32, 2, 8, use_shift=use_shift, use_global=use_global)
        assert blk(x, g if use_global else None).shape == x.shape
    # a map that is not a multiple of the window is padded and cropped back
    blk = GswinBlock(32, 2, 8)
    y = torch.randn(1, 12, 20, 32)
    assert blk(y, torch.randn(1, 8, 8, 32)).shape == y.shape


# ---- GWG -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("size", [8, 12, 16, 20, 32, 64, 4, 6])
def test_gwg_output_equals_local_window(size):
    window = 8
    gwg = GlobalWindowGenerator(24, resolution=size, window=window)
    out = gwg(torch.randn(2, 24, size, size))
    ws = effective_window(size, size, window)
    assert out.shape == (2, 24, ws, ws)
    assert len(gwg.layers) == gwg_layers_needed(size, window)


def test_gwg_layer_count_and_other_sizes_at_run_time():
    assert [gwg_layers_needed(s, 8) for s in (4, 8, 16, 32, 64, 24)] == [0, 0, 1, 2, 3, 2]
    gwg = GlobalWindowGenerator(8, resolution=32, window=8)
    for h, w in [(32, 32), (28, 28), (40, 24), (64, 64)]:  # other image sizes than planned
        assert gwg(torch.randn(1, 8, h, w)).shape == (1, 8, 8, 8)


def test_gswin_stage_grids():
    net = Gswin(16, [1, 1, 3, 1], resolution=32, window=8, head_dim=16)
    outs = net(torch.randn(2, 32, 32, 16))
    assert [tuple(o.shape) for o in outs] == [(2, 32, 32, 16), (2, 16, 16, 32), (2, 8, 8, 64), (2, 4, 4, 128)]
    assert len(net.stages[2].blocks) == 3
    assert [len(s.gwg.layers) for s in net.stages] == [2, 1, 0, 0]


# ---- momentum + queue ----------------------------------------------------------------------------
def test_momentum_queue_fifo_wraparound():
    q = MomentumQueue(5, {"img": 2})

    def push(ids):
        t = torch.tensor(ids)
        q.enqueue({"img": torch.stack([t.float(), -t.float()], 1)}, t, t + 100, t % 2)

    push([0, 1, 2])
    assert q.ptr == 3 and q.valid().sum() == 3
    assert q.image_index[q.ordered()].tolist() == [0, 1, 2]
    push([3, 4, 5])  # wraps: 5 overwrites slot 0 (the oldest entry, 0)
    assert q.ptr == 1
    assert q.image_index.tolist() == [5, 1, 2, 3, 4]
    assert q.image_index[q.ordered()].tolist() == [1, 2, 3, 4, 5]  # oldest → newest
    feats, idx, cap, lab = q.keys()
    assert feats["img"][:, 0].tolist() == [5.0, 1.0, 2.0, 3.0, 4.0]
    assert cap.tolist() == [105, 101, 102, 103, 104] and lab.tolist() == [1, 1, 0, 1, 0]
    push([6, 7, 8, 9, 10, 11, 12])  # longer than the queue: only the newest 5 stay
    assert sorted(q.image_index.tolist()) == [8, 9, 10, 11, 12]
    assert q.image_index[q.ordered()].tolist() == [8, 9, 10, 11, 12]


def test_momentum_update_formula():
    online = [torch.tensor([1.0, 2.0]), torch.tensor([[4.0]])]
    mom = [torch.tensor([0.0, 2.0]), torch.tensor([[0.0]])]
    momentum_update(online, mom, 0.995)
    assert torch.allclose(mom[0], torch.tensor([0.005, 2.0]))
    assert torch.allclose(mom[1], torch.tensor([[0.02]]))
    momentum_update(online, mom, 0.5)  # θ_m ← 0.5 θ_m + 0.5 θ
    assert torch.allclose(mom[0], torch.tensor([0.5025, 2.0]))


# ---- losses on hand numbers ------------------------------------------------------------------------
def test_optimized_triplet_hand_numbers():
    s = torch.tensor([[0.5, 0.6], [0.2, 0.9]])
    # image anchors: [0.2 − 0.5 + 0.6]_+ = 0.3, [0.2 − 0.9 + 0.2]_+ = 0
    # text anchors:  [0.2 − 0.5 + 0.2]_+ = 0,   [0.2 − 0.9 + 0.6]_+ = 0
    # intra-pair:    (1 − 0.5) + (1 − 0.9) = 0.6
    assert optimized_triplet(s, 0.2).item() == pytest.approx(0.9)
    assert optimized_triplet(s, 0.2, reduction="mean").item() == pytest.approx(0.45)
    s3 = torch.tensor([[0.7, 0.6, 0.1], [0.5, 0.4, 0.3], [0.0, 0.9, 0.8]])
    # image anchors: i0: [.2-.7+.6]=.1, [.2-.7+.1]=0; i1: [.2-.4+.5]=.3, [.2-.4+.3]=.1; i2: 0, [.2-.8+.9]=.3
    # text anchors:  t0: [.2-.7+.5]=0, [.2-.7+0]=0; t1: [.2-.4+.6]=.4, [.2-.4+.9]=.7; t2: [.2-.8+.1]=0, [.2-.8+.3]=0
    # intra: .3 + .6 + .2 = 1.1
    assert optimized_triplet(s3, 0.2).item() == pytest.approx(0.1 + 0.3 + 0.1 + 0.3 + 0.4 + 0.7 + 1.1)
    # hardest: image anchors .1 + .3 + .3, text anchors 0 + .7 + 0
    assert optimized_triplet(s3, 0.2, hardest=True).item() == pytest.approx(0.7 + 0.7 + 1.1)
    # identical-caption positives are not negatives: excluding (1, 0)/(0, 1) removes .1, .3 and .4 (t1 anchor, i0)
    pos = torch.zeros(3, 3, dtype=torch.bool)
    pos[0, 1] = pos[1, 0] = True
    assert optimized_triplet(s3, 0.2, positives=pos).item() == pytest.approx(0.1 + 0.3 + 0.7 + 1.1)


def test_hard_negatives_never_positive():
    g = torch.Generator().manual_seed(0)
    sim = torch.randn(6, 6)
    pos = torch.zeros(6, 6, dtype=torch.bool)
    pos[0, 1] = pos[1, 0] = True
    for _ in range(20):
        neg_img, neg_txt, ok = sample_hard_negatives(sim, pos, g)
        assert ok.all()
        r = torch.arange(6)
        assert not (neg_img == r).any() and not (neg_txt == r).any()
        assert neg_txt[0] != 1 and neg_img[1] != 0 and neg_txt[1] != 0 and neg_img[0] != 1


def test_mask_tokens_masks_only_real_tokens():
    ids = torch.tensor([[101, 5, 6, 7, 102, 0], [101, 8, 102, 0, 0, 0]])
    att = (ids != 0).long()
    g = torch.Generator().manual_seed(1)
    out, labels = mask_tokens(ids, att, 103, 1000, [101, 102, 0], 0.15, g)
    assert (labels[:, 0] == -100).all() and (labels[ids == 102] == -100).all() and (labels[ids == 0] == -100).all()
    assert ((labels != -100).sum(1) >= 1).all()  # at least one masked token per caption
    assert torch.equal(labels[labels != -100], ids[labels != -100])


# ---- the model --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_model():
    from rsviewer.archs.registry import create_model

    torch.manual_seed(0)
    return create_model("cmpagl", **TINY)


def _batch(model, n=8):
    caps = ["many planes are parked near the runway", "a baseball diamond", "two tennis courts", "a dense residential area"]
    caps = (caps * n)[:n]
    with torch.no_grad():
        fi = model.image_features(torch.randn(n, 3, model.image_size, model.image_size))
        ft = model.text_features(model.tokenize(caps))
    return {
        "image_feats": fi,
        "text_feats": ft,
        "image_index": torch.arange(n),
        "label_index": torch.arange(n) % 4,
        "captions": caps,
        "epoch": 0,
        "step": 0,
        "total_steps": 1,
    }


def test_training_step_queue_and_momentum(tiny_model):
    m = tiny_model
    m.freeze_bases()
    m.train()
    batch = _batch(m)
    out = m.training_loss(batch)
    assert set(out) == {"itc", "triplet", "itm", "mlm", "loss"}
    out["loss"].backward()
    # only trained parts get gradients; the frozen text half / backbone do not
    assert m.gswin.stages[0].blocks[0].attn_l.qkv.weight.grad is not None
    assert m.fusion.cross[0].query.weight.grad is not None
    assert all(p.grad is None for p in m.text.bert.encoder.layer[0].parameters())
    assert all(p.grad is None for p in m.backbone.parameters())
    with torch.no_grad():
        for p in m.image_proj.parameters():
            p.add_(1.0)  # an "optimizer step"
    mom_before = m._momentum["image_proj"].weight.clone()
    m.after_step(batch)
    assert m._queue.count == 8 and m._queue.ptr == 8
    expected = 0.995 * mom_before + 0.005 * m.image_proj.weight
    assert torch.allclose(m._momentum["image_proj"].weight, expected)
    # the momentum copies and queue are not part of the saved state
    assert not any(k.startswith("_") for k in m.state_dict())


def test_explain_maps_and_gradcam_layers(tiny_model):
    m = tiny_model
    em = m.explain_maps(torch.randn(1, 3, m.image_size, m.image_size), "planes near the runway")
    assert {"gswin/last", "gswin/last/global-local", "gswin/stage1", "cross/text", "similarity"} <= set(em.image_maps)
    assert em.image_maps["gswin/stage1"].shape == (16, 16)  # 128 px / 8
    assert em.image_maps["gswin/last"].shape == (2, 2)
    for v in em.image_maps.values():
        assert np.isfinite(v).all() and (v >= 0).all()
    assert em.words[:2] == ["planes", "near"]
    assert em.token_maps["cross/words"].shape == (len(em.words), 2, 2)
    assert 0.0 <= em.extra["itm"] <= 1.0
    layers = m.gradcam_layers()
    assert list(layers)[0] == "gswin.stage3" and "backbone.s8" in layers
    assert m.local_embeddings(torch.randn(1, 3, 128, 128)).shape == (1, 32, 2, 2)


def test_from_pixels_variant_forward_backward():
    from rsviewer.archs.registry import create_model

    m = create_model("cmpagl", **{**TINY, "stem": "pixels", "image_size": 32, "inject": ""})
    assert "backbone" not in m.bases and m.backbone is None
    m.freeze_bases()
    m.train()
    batch = _batch(m, 4)
    assert set(batch["image_feats"]) == {"pixels"}
    out = m.training_loss(batch)
    out["loss"].backward()
    assert m.patch_embed.weight.grad is not None and torch.isfinite(m.patch_embed.weight.grad).all()
    # paper geometry: 4-px patches → 8 → 4 → 2 → 1 at 32 px (64 → 32 → 16 → 8 at 256 px)
    outs = m._tokens(batch["image_feats"])
    assert [o.shape[1] for o in outs] == [8, 4, 2, 1]


def test_save_load_round_trip_bit_exact(tmp_path):
    from rsviewer.archs.registry import create_model
    from rsviewer.checkpoint import load_model, save_model

    torch.manual_seed(1)
    m = create_model("cmpagl", **TINY).eval()
    m.freeze_bases()
    with torch.no_grad():  # make the trained tensors differ from any fresh init
        for name, p in m.named_parameters():
            if p.requires_grad:
                p.add_(0.01 * torch.randn_like(p))
    save_model(m, tmp_path / "cm")
    m2 = load_model(tmp_path / "cm", expect_arch="cmpagl")
    pix = torch.randn(3, 3, 128, 128)
    caps = ["a plane", "green trees around a building", "a river"]
    with torch.no_grad():
        s1 = m.score(m.image_states(pix), m.text_states(caps))
        s2 = m2.score(m2.image_states(pix), m2.text_states(caps))
    assert torch.equal(s1, s2)
    # the pretrained bases are referenced, not copied; the momentum copies are not saved
    from safetensors.torch import load_file

    keys = load_file(str(tmp_path / "cm" / "model.safetensors")).keys()
    assert not any(k.startswith(("backbone.", "text.bert.embeddings")) for k in keys)
    assert not any("layer.3." in k for k in keys)  # multimodal BERT layers frozen by default


@needs_shared()
def test_tiny_training_run_loss_falls(tmp_path):
    from rsviewer.checkpoint import load_model
    from rsviewer.train.trainer import TrainConfig, train

    torch.manual_seed(0)
    cfg = TrainConfig(epochs=4, batch_size=16, lr=2e-3, max_train_images=32, max_val_images=16, views=1, warmup=0.0)
    small = {**TINY, "image_size": 64, "depths": [1, 1, 1, 1]}
    res = train("cmpagl", UCM_JSON, tmp_path / "run", model_config=small, config=cfg, log=lambda m: None)
    losses = [h["loss"] for h in res.history]
    assert losses[-1] < losses[0], losses
    assert 0.0 <= res.val["mR"] <= 100.0
    m = load_model(tmp_path / "run", expect_arch="cmpagl")
    assert m.cfg.width == TINY["width"]


def test_partial_backbone_finetuning_matches_the_frozen_path():
    assert_split_matches_frozen("cmpagl", TINY, torch.randn(2, 3, 128, 128), {"s8", "s16"})
    with pytest.raises(ValueError, match="from s16 only"):
        create_model("cmpagl", **TINY, image_train_from="s16", inject="s16")


@needs_shared()
def test_partial_finetuning_trains_with_its_momentum_copy(tmp_path):
    from rsviewer.train.trainer import TrainConfig, train

    torch.set_num_threads(1)
    res = train("cmpagl", UCM_JSON, tmp_path / "m", model_config={**TINY, "image_train_from": "s16"},
                config=TrainConfig(epochs=2, batch_size=8, lr=2e-3, max_train_images=24, max_val_images=8, views=1),
                log=lambda msg: None)
    assert res.history[-1]["loss"] < res.history[0]["loss"]
