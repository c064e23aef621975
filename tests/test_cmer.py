"""CMER: Focus-Adapter, LoRA, scene prompts, negative recycling queue (fast, tiny configs)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from rsviewer.archs.cmer import (
    CMER,
    FocusAdapter,
    FocusLayer,
    LoRALinear,
    NegativeQueue,
    augment,
    difficulty_weighted_hinge,
    readable_label,
)
from rsviewer.archs.registry import create_model

from conftest import UCM_JSON, assert_split_matches_frozen, needs_shared

TINY = dict(
    embed_dim=32,
    hidden=64,
    adapter_hidden=32,
    adapter_heads=2,
    image_size=64,
    lora_layers=1,
    lora_rank=4,
)


@pytest.fixture(scope="module")
def tiny_model() -> CMER:
    torch.manual_seed(0)
    return create_model("cmer", **TINY)


# ---- LoRA ---------------------------------------------------------------------------------
def test_lora_starts_as_identity_update_and_merges_exactly():
    torch.manual_seed(0)
    base = torch.nn.Linear(12, 7)
    lora = LoRALinear(base, rank=3, alpha=6.0)
    x = torch.randn(5, 12)
    ref = base(x).detach().clone()
    assert torch.equal(lora(x), ref)  # B = 0 at init: nothing changes
    with torch.no_grad():
        lora.lora_B.normal_()
    unmerged = lora(x).detach().clone()
    assert not torch.allclose(unmerged, ref)
    assert torch.allclose(unmerged, ref + x @ (lora.lora_B @ lora.lora_A).T * 2.0, atol=1e-5)
    lora.merge()
    merged = lora(x).detach()
    assert torch.allclose(merged, unmerged, atol=1e-5, rtol=1e-5)
    lora.unmerge()
    assert torch.allclose(lora(x), unmerged, atol=1e-5, rtol=1e-5)


def test_lora_merge_equivalence_on_the_text_encoder(tiny_model):
    m = tiny_model
    m.eval()
    loras = [mod for mod in m.modules() if isinstance(mod, LoRALinear)]
    assert loras and all(".lora_" in f for f in m.finetuned)
    torch.manual_seed(1)
    with torch.no_grad():
        for mod in loras:
            mod.lora_B.normal_(std=0.05)
    texts = ["many buildings and green trees", "a river runs through the forest"]
    with torch.no_grad():
        before = m.encode_text(texts)
        m.merge_lora()
        merged = m.encode_text(texts)
        m.unmerge_lora()
        after = m.encode_text(texts)
        for mod in loras:
            mod.lora_B.zero_()
    assert torch.allclose(before, merged, atol=1e-5)
    assert torch.allclose(before, after, atol=1e-5)


def test_only_lora_and_heads_are_trained(tiny_model):
    m = tiny_model
    m.freeze_bases()
    trainable = {n for n, p in m.named_parameters() if p.requires_grad}
    text_trainable = {n for n in trainable if n.startswith("text.")}
    assert text_trainable and all(".lora_" in n for n in text_trainable)
    assert not any(n.startswith("backbone.") for n in trainable)
    saved = set(m.trained_state_dict())
    assert text_trainable <= saved
    assert not any(k.startswith("backbone.") for k in saved)


# ---- focus layer ----------------------------------------------------------------------------
@pytest.mark.parametrize("size,field", [(8, 2), (5, 2), (6, 3)])
def test_focus_field_attention_stays_inside_the_field(size, field):
    torch.manual_seed(0)
    layer = FocusLayer(dim=16, heads=4, field=field).eval()
    x = torch.randn(1, 16, size, size)
    y0 = layer(x)
    for (i, j) in [(0, 0), (size - 1, size - 1), (size // 2, 1)]:
        x2 = x.clone()
        x2[0, :, i, j] = 3 * torch.randn(16)  # (a constant shift would vanish in the LayerNorm)
        changed = (layer(x2) - y0).abs().amax(1)[0] > 1e-6  # (H, W)
        wi, wj = i // field, j // field
        inside = torch.zeros(size, size, dtype=torch.bool)
        inside[wi * field : (wi + 1) * field, wj * field : (wj + 1) * field] = True
        assert not changed[~inside].any(), "a cell outside the focus field was affected"
        assert changed[i, j]


def test_focus_attention_mass_is_per_field():
    torch.manual_seed(0)
    layer = FocusLayer(dim=16, heads=4, field=2).eval()
    layer.keep_attention = True
    x = torch.randn(2, 16, 5, 5)
    y = layer(x)
    layer.keep_attention = False
    assert torch.allclose(y, layer(x), atol=1e-5)  # explicit and SDPA paths agree
    attn = layer.last_attention  # (B·nW, heads, 4, 4)
    assert attn.shape == (2 * 9, 4, 4, 4)
    assert torch.allclose(attn.sum(-1), torch.ones(()), atol=1e-5)
    mass = layer.attention_mass(2, 5, 5)
    assert mass.shape == (2, 5, 5)
    # each full 2×2 field hands out 4 queries' worth of attention over its own cells
    assert torch.allclose(mass[:, :2, :2].sum((1, 2)), torch.full((2,), 4.0), atol=1e-4)
    # the 1×1 corner field (padded) gives its only cell all the attention of its one query
    assert torch.allclose(mass[:, 4, 4], torch.ones(2), atol=1e-5)


def test_focus_adapter_ladder_shapes():
    torch.manual_seed(0)
    a16, a32 = FocusAdapter(24, 32, 2, 2), FocusAdapter(40, 32, 2, 2)
    f16 = a16(torch.randn(2, 24, 8, 8))
    f32 = a32(torch.randn(2, 40, 4, 4), f16)
    assert f16.shape == (2, 32, 8, 8) and f32.shape == (2, 32, 4, 4)


# ---- queue and hinge ------------------------------------------------------------------------
def test_difficulty_weighted_hinge_hand_numbers():
    l = torch.tensor([0.0, 0.5, 1.0, 2.0])
    out = difficulty_weighted_hinge(l, beta=2.0)
    expect = [0.0, 0.5 * math.exp(-1.0), 1.0 * math.exp(-2.0), 2.0 * math.exp(-4.0)]
    assert torch.allclose(out, torch.tensor(expect))


def test_queue_loss_hand_numbers():
    # anchor pair: image (1, 0), text (0.6, 0.8) → S(pos) = 0.6
    img = torch.tensor([[1.0, 0.0]])
    txt = torch.tensor([[0.6, 0.8]])
    q = NegativeQueue(4)
    q.push(torch.tensor([[0.0, 1.0]]), torch.tensor([[1.0, 0.0]]), torch.tensor([3]), torch.tensor([9]))
    alpha, beta = 0.2, 1.5
    lv = alpha - 0.6 + 0.8  # S(text, queued image (0,1)) = 0.8  → 0.4
    ls = alpha - 0.6 + 1.0  # S(image, queued text (1,0)) = 1.0  → 0.6
    expect = lv * math.exp(-beta * lv) + ls * math.exp(-beta * ls)
    got = q.loss(img, txt, torch.tensor([0]), torch.tensor([0]), alpha, beta, "sum")
    assert got.item() == pytest.approx(expect, rel=1e-6)
    # a negative below the margin costs nothing
    q2 = NegativeQueue(4)
    q2.push(torch.tensor([[0.0, -1.0]]), torch.tensor([[-1.0, 0.0]]), torch.tensor([3]), torch.tensor([9]))
    assert q2.loss(img, txt, torch.tensor([0]), torch.tensor([0]), alpha, beta, "sum").item() == 0.0


def test_queue_never_uses_same_scene_negatives():
    torch.manual_seed(0)
    img = torch.nn.functional.normalize(torch.randn(3, 8), dim=1)
    txt = torch.nn.functional.normalize(torch.randn(3, 8), dim=1)
    labels, index = torch.tensor([0, 1, 2]), torch.tensor([10, 11, 12])
    q = NegativeQueue(16)
    q_img = torch.nn.functional.normalize(torch.randn(6, 8), dim=1)
    q_txt = torch.nn.functional.normalize(torch.randn(6, 8), dim=1)
    q_lab = torch.tensor([0, 1, 2, 0, 5, -1])
    q.push(q_img, q_txt, q_lab, torch.tensor([20, 21, 22, 23, 24, 10]))
    mask = q.negative_mask(labels, index)
    # anchor i never sees a queued sample of its own label
    for i in range(3):
        for j in range(6):
            if q.labels[j] == labels[i]:
                assert not mask[i, j]
    # unknown queued label: only another source image counts (row 5 is image 10 = anchor 0)
    assert not mask[0, 5] and mask[1, 5] and mask[2, 5]
    # moving anchor 0's same-scene queue entries (rows 0 and 3) anywhere leaves its loss alone
    a = slice(0, 1)
    base = q.loss(img[a], txt[a], labels[a], index[a], 0.2, 1.0, "sum")
    for j in (0, 3):  # made maximally "hard": the anchor's own pair
        q.img[j], q.txt[j] = txt[0], img[0]
    assert torch.allclose(q.loss(img[a], txt[a], labels[a], index[a], 0.2, 1.0, "sum"), base)
    # ... while a hard negative of another scene raises it
    q.img[4], q.txt[4] = txt[0], img[0]
    assert q.loss(img[a], txt[a], labels[a], index[a], 0.2, 1.0, "sum") > base


def test_queue_is_fifo_with_four_batches(tiny_model):
    m = tiny_model
    m.train()
    m.queue = NegativeQueue(0)
    b = 4
    torch.manual_seed(0)
    feats_img = {
        "s16": torch.randn(b, 112, 4, 4),
        "s32": torch.randn(b, 320, 2, 2),
        "pooled": torch.randn(b, 2 * 1280 + 112),
    }
    tok = m.tokenize(["a plane on the runway"] * b)
    text_feats = {k: v for k, v in m.text_features(tok).items()}
    for step in range(6):
        batch = {
            "image_feats": feats_img,
            "text_feats": text_feats,
            "image_index": torch.arange(b) + 100 * step,
            "label_index": torch.tensor([0, 1, 2, 3]),
            "captions": ["a plane on the runway"] * b,
        }
        m.training_loss(batch)
        m.after_step(batch)
        assert m.queue.size == 4 * b
        assert len(m.queue) == min(4 * b, (step + 1) * b)
    # newest first, oldest batches dropped
    assert m.queue.index.tolist() == [
        *range(500, 504), *range(400, 404), *range(300, 304), *range(200, 204)
    ]


# ---- scene prompts ----------------------------------------------------------------------------
def test_readable_labels_and_prompt():
    vocab = frozenset({"dense", "residential", "storage", "tanks", "tennis", "court", "mobile", "home", "park"})
    assert readable_label("denseresidential", vocab) == "dense residential"
    assert readable_label("mobilehomepark", vocab) == "mobile home park"
    assert readable_label("storage_tanks") == "storage tanks"
    assert readable_label("TennisCourt") == "tennis court"
    assert readable_label("chaparral", vocab) == "chaparral"  # unknown word stays whole
    assert augment("Many planes.", "airport") == "a remote sensing image of airport. Many planes."


def test_scene_prompt_only_in_training(tiny_model):
    m = tiny_model
    m.prepare_training([], ["airplane", "beach", None, "airplane"])
    assert m.label_names == ["airplane", "beach"]
    assert m.extra_config() == {"labels": ["airplane", "beach"]}
    caps = ["some planes are parked", "waves on the sand"]
    tok = m.tokenize(caps)
    tf = m.text_features(tok)
    batch = {"text_feats": tf, "label_index": torch.tensor([0, 1]), "captions": caps}
    old = m.cfg.scene_prompt_prob
    try:
        m.cfg.scene_prompt_prob = 1.0
        aug = m._augment_batch(batch)
        ref = m.text_features(m.text.tokenize(m.prompted(caps, [0, 1]), max_tokens=64))
        n = int(ref["mask"].sum(1).max())
        assert torch.equal(aug["mask"][:, :n], ref["mask"][:, :n])
        assert torch.allclose(aug["hidden"][0, : int(ref["mask"][0].sum())], ref["hidden"][0, : int(ref["mask"][0].sum())], atol=2e-2)
        m.cfg.scene_prompt_prob = 0.0
        assert m._augment_batch(batch) is tf
    finally:
        m.cfg.scene_prompt_prob = old
    # inference never sees labels: encode_text is the plain caption
    m.eval()
    with torch.no_grad():
        plain = m.text_head(m.text_features(m.tokenize(caps[:1])))
        assert torch.allclose(m.encode_text(caps[:1]), plain)


# ---- explanations -------------------------------------------------------------------------------
def test_explain_maps_and_gradcam_layers(tiny_model):
    m = tiny_model.eval()
    x = torch.randn(1, 3, 64, 64)
    ex = m.explain_maps(x, "a bridge over the river")
    assert set(ex.image_maps) == {"focus/s16", "focus/s32", "similarity"}
    assert ex.image_maps["focus/s16"].shape == (4, 4) and ex.image_maps["focus/s32"].shape == (2, 2)
    assert all((v >= 0).all() for v in ex.image_maps.values())
    assert "bridge" in ex.words and "[CLS]" not in ex.words
    layers = m.gradcam_layers()
    assert next(iter(layers)) == "focus.s32"
    loc = m.local_embeddings(x)
    assert loc.shape == (1, 32, 2, 2)
    assert torch.allclose(loc.norm(dim=1), torch.ones(1, 2, 2), atol=1e-5)


# ---- training and checkpoints ---------------------------------------------------------------------
@needs_shared()
def test_tiny_training_loss_falls(tmp_path):
    from rsviewer.train.trainer import TrainConfig, train

    torch.set_num_threads(1)
    res = train(
        "cmer",
        UCM_JSON,
        tmp_path / "m",
        model_config={**TINY, "image_weights": "random", "scene_prompt_prob": 0.5},
        config=TrainConfig(epochs=4, batch_size=16, lr=2e-3, max_train_images=48, max_val_images=16, views=1),
        log=lambda msg: None,
    )
    losses = [h["loss"] for h in res.history]
    assert losses[-1] < losses[0]
    assert (tmp_path / "m" / "config.json").exists()


@needs_shared()
def test_save_load_round_trip_is_exact(tmp_path):
    from PIL import Image

    from rsviewer.checkpoint import load_model, save_model
    from rsviewer.data import load_dataset

    torch.manual_seed(0)
    m = create_model("cmer", **TINY)
    m.prepare_training([], ["airplane", "beach"])
    with torch.no_grad():  # make every trained tensor non-trivial
        for n, p in m.named_parameters():
            if ".lora_B" in n:
                p.normal_(std=0.05)
    m.eval()
    ds = load_dataset(UCM_JSON).split("val")
    items = ds.items[:3]
    pixels = m.preprocess([Image.open(it.image) for it in items])
    texts = [it.captions[0] for it in items]
    with torch.no_grad():
        s0 = m.score(m.image_states(pixels), m.text_states(texts))
    save_model(m, tmp_path / "cmer")
    m2 = load_model(tmp_path / "cmer", expect_arch="cmer")
    assert m2.label_names == ["airplane", "beach"]
    with torch.no_grad():
        s1 = m2.score(m2.image_states(pixels), m2.text_states(texts))
    assert torch.equal(s0, s1)
    assert np.isfinite(s1.numpy()).all()


def test_partial_backbone_finetuning_matches_the_frozen_path():
    # image_train_from="s16": features stop at the stride-16 map and the head runs the
    # rest of the backbone; with the weights untouched the embedding is the frozen model's
    assert_split_matches_frozen("cmer", TINY, torch.randn(2, 3, 64, 64), {"s16"})
    with pytest.raises(ValueError, match="from s16 only"):
        create_model("cmer", **TINY, image_train_from="s8")
