"""MSSA: WRGPA geometry (window shuffle, proxy windows), SCA, IGTA, CMSE, pairwise scoring,
training on real UCM data and the checkpoint round trip. Tiny configs, random image
weights where pretrained features are not needed (MiniLM loads in about a second)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from rsviewer.archs.mssa.layers import (
    SCA,
    WRGPA,
    TokenCrossAttention,
    pool_tokens,
    proxy_windows,
    region_shuffle,
    region_unshuffle,
    shuffle_positions,
    window_merge,
    window_partition,
)
from rsviewer.archs.registry import create_model
from rsviewer.checkpoint import load_model, save_model

from conftest import UCM_JSON, needs_shared

TINY = dict(
    image_weights="random",
    image_size=64,  # maps 8/4/2
    widths=[16, 16, 16],
    text_width=16,
    embed_dim=48,
    head_dim=8,
    sca_groups=4,
    igta_dim=16,
    windows=[2, 1, 1],  # 1/8: 4x4 windows of 2x2; 1/16: 4x4 windows of 1 token (padded parts); 1/32: 2x2 grid
    cand_hard=2,
    cand_random=1,
)


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return create_model("mssa", **TINY).eval()


def _perturb(model: torch.nn.Module, seed: int = 1) -> None:
    """Random non-zero weights everywhere (IGTA's output projection starts at zero)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.startswith(("backbone.", "text.")):
                continue
            p.add_(torch.randn(p.shape, generator=g) * 0.1)


# ---- WRGPA geometry ------------------------------------------------------------------------
@pytest.mark.parametrize("grid,ws", [((4, 4), 8), ((2, 2), 4), ((4, 6), 6), ((2, 4), 2)])
def test_window_shuffle_roundtrip(grid, ws):
    nh, nw = grid
    x = torch.randn(2, nh * ws, nw * ws, 3)
    w = window_partition(x, ws)
    assert torch.equal(window_merge(w, ws), x)
    s = region_shuffle(w)
    nk = (nh // 2) * (nw // 2)
    assert s.shape == (2, 4, nk, ws * ws, 3)
    assert torch.equal(region_unshuffle(s, nh, nw), w)
    # a permutation: every token appears exactly once
    assert torch.equal(s.flatten(1, 3).sort(1).values, w.flatten(1, 3).sort(1).values)


def test_window_shuffle_gathers_one_part_of_every_window_in_its_quadrant():
    # 32x32 map, 8x8 windows: a 4x4 window grid, 4 quadrants of 2x2 windows (N_k = 4);
    # each window's 64 tokens are cut into 4 parts of 16 (= 2 rows of the window).
    nh = nw = 4
    ws = 8
    pos = shuffle_positions(nh, nw, ws)  # (4 quadrants, 4 shuffled windows, 64 tokens, (row, col))
    assert pos.shape == (4, 4, 64, 2)
    for k in range(4):
        qr, qc = divmod(k, 2)  # quadrant row/col
        seen = set()
        for j in range(4):
            toks = pos[k, j]
            for i in range(4):  # segment i of shuffled window j comes from window i of the quadrant
                part = toks[i * 16 : (i + 1) * 16]
                wr, wc = qr * 2 + i // 2, qc * 2 + i % 2  # window i (row-major inside the quadrant)
                assert ((part[:, 0] // ws) == wr).all() and ((part[:, 1] // ws) == wc).all()
                rows_in_window = sorted({int(r) % ws for r in part[:, 0]})
                assert rows_in_window == [2 * j, 2 * j + 1]  # part j = rows 2j, 2j+1 of the window
            # one window from each position of the quadrant
            owners = {(int(r) // ws, int(c) // ws) for r, c in toks}
            assert owners == {(qr * 2 + a, qc * 2 + b) for a in range(2) for b in range(2)}
            seen |= {(int(r), int(c)) for r, c in toks}
        # the shuffled windows of quadrant k tile exactly that quadrant
        assert seen == {(r, c) for r in range(qr * 16, qr * 16 + 16) for c in range(qc * 16, qc * 16 + 16)}


def test_proxy_windows_are_the_four_central_windows():
    assert proxy_windows(4, 4) == [(1, 1), (1, 2), (2, 1), (2, 2)]
    assert proxy_windows(2, 2) == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert proxy_windows(4, 6) == [(1, 2), (1, 3), (2, 2), (2, 3)]
    with pytest.raises(ValueError):
        proxy_windows(3, 4)
    # hand-made map: an 8x8 map of 2x2 windows, each pixel holds its window id (row-major)
    ids = torch.arange(16).reshape(4, 4).repeat_interleave(2, 0).repeat_interleave(2, 1)
    w = window_partition(ids[None, :, :, None].float(), 2)
    got = sorted(int(w[0, r, c, 0, 0]) for r, c in proxy_windows(4, 4))
    assert got == [5, 6, 9, 10]  # one window per quadrant, each touching the map centre


def test_wrgpa_global_stage_only_touches_proxy_windows():
    torch.manual_seed(0)
    m = WRGPA(8, 2, window=2)
    with torch.no_grad():  # switch the window and region stages off: only Global-Attention acts
        for att in (m.win, m.reg):
            att.proj.weight.zero_()
            att.proj.bias.zero_()
    x = torch.randn(1, 8, 8, 8)
    changed = (m(x) - x).abs().sum(-1)[0] > 0
    expect = torch.zeros(8, 8, dtype=torch.bool)
    expect[2:6, 2:6] = True  # windows (1,1), (1,2), (2,1), (2,2) of the 4x4 window grid
    assert torch.equal(changed, expect)


def test_wrgpa_pads_odd_maps_and_keeps_shape():
    torch.manual_seed(0)
    m = WRGPA(8, 2, window=7)  # the paper's 7x7 windows on a 14x14 map: 49 tokens into 1 part
    assert m(torch.randn(2, 14, 14, 8)).shape == (2, 14, 14, 8)
    m3 = WRGPA(8, 2, window=3)  # 7x7 map → 3x3 windows padded to a 4x4 grid, 9 tokens into 4 parts
    out = m3(torch.randn(1, 7, 7, 8))
    assert out.shape == (1, 7, 7, 8) and torch.isfinite(out).all()


# ---- SCA, IGTA, CMSE ----------------------------------------------------------------------
def test_sca_groups_shapes_and_locality():
    torch.manual_seed(0)
    sca = SCA(16, groups=4)
    x = torch.randn(2, 10, 16)
    assert sca.segment(x).shape == (2, 4, 10, 4)
    assert sca(x).shape == (2, 10, 16)
    with torch.no_grad():  # q = k = v = x and no output mixing: channel attention stays in its group
        sca.qkv.weight.copy_(torch.cat([torch.eye(16)] * 3))
        sca.qkv.bias.zero_()
        sca.proj.weight.copy_(torch.eye(16))
        sca.proj.bias.zero_()
    y = sca(x)
    x2 = x.clone()
    x2[..., 1] += 1.0  # a channel of group 0
    d = (sca(x2) - y).abs().amax((0, 1))
    assert d[:4].sum() > 0 and torch.all(d[4:] == 0)


def test_igta_shapes(tiny):
    keys = torch.randn(3, 16, 16)  # 3 images, 16 image tokens
    t = torch.randn(1, 5, 7, 16)  # 5 captions of 7 tokens shared by all images
    out, logits = tiny._igta(0, keys, t, need_weights=True)
    assert out.shape == (3, 5, 7, 16)
    assert logits.shape == (3, 5, tiny.cfg.igta_heads, 7, 16)
    per_image = torch.randn(3, 4, 7, 16)  # 4 candidate captions per image (training)
    assert tiny._igta(1, keys, per_image).shape == (3, 4, 7, 16)
    # IGTA's output projection starts at zero: at init T*_n = T_n
    assert torch.equal(tiny._igta(2, keys, t), t.expand(3, -1, -1, -1))


def test_cmse_token_count_and_pooled_fast_path():
    torch.manual_seed(0)
    cm = TokenCrossAttention(16, 20, 4)
    assert cm.tokens.shape == (20, 16)
    x = torch.randn(2, 3, 9, 16)
    mask = torch.rand(2, 3, 9) > 0.3
    mask[..., 0] = True
    full, att = cm(x, mask, need_weights=True)
    assert full.shape == (2, 3, 20, 16) and att.shape == (2, 3, 20, 9)
    assert torch.allclose(cm.pooled(x, mask), full.mean(-2), atol=1e-5)


def test_token_pooling_masks():
    x = torch.arange(10, dtype=torch.float32).reshape(1, 5, 2)
    mask = torch.tensor([[True, True, True, False, False]])
    p, m = pool_tokens(x, mask)
    assert p.shape == (1, 3, 2) and m.tolist() == [[True, True, False]]
    assert torch.allclose(p[0, 1], x[0, 2])  # the pooled pair (2, 3) has only token 2 valid


# ---- pairwise scoring ------------------------------------------------------------------------
def _states(model, n_images=3, captions=None):
    torch.manual_seed(3)
    pixels = torch.randn(n_images, 3, model.image_size, model.image_size)
    captions = captions or [
        "many planes are parked at the airport",
        "a river",
        "there are some green trees and a white building next to a road with cars",
        "two tennis courts",
        "dense residential area with houses and roads",
    ]
    with torch.no_grad():
        return model.image_states(pixels), model.text_states(captions)


def test_pairwise_score_equals_scoring_pairs_one_at_a_time(tiny):
    _perturb(tiny)
    img, txt = _states(tiny)
    with torch.no_grad():
        full = tiny.score(img, txt)
        single = torch.tensor(
            [
                [
                    float(tiny.score({k: v[i : i + 1] for k, v in img.items()}, {k: v[j : j + 1] for k, v in txt.items()}))
                    for j in range(txt["emb"].shape[0])
                ]
                for i in range(img["emb"].shape[0])
            ]
        )
        small_chunks = tiny.score(img, txt, max_elems=1)  # one image per chunk
    assert full.shape == (3, 5)
    assert torch.allclose(full, single, atol=1e-5)
    assert torch.allclose(full, small_chunks, atol=1e-6)
    # the image-guided score differs from the image-independent stage-1 score
    assert not torch.allclose(full, tiny.stage1_score(img, txt), atol=1e-4)


def test_stage1_emb_is_image_independent_and_equals_full_score_at_init():
    torch.manual_seed(0)
    model = create_model("mssa", **TINY).eval()
    img, txt = _states(model)
    assert img["emb"].shape == (3, 48) and txt["emb"].shape == (5, 48)
    assert torch.allclose(img["emb"].norm(dim=1), torch.ones(3), atol=1e-5)
    with torch.no_grad():  # IGTA starts as the identity, so the full score starts as the stage-1 score
        assert torch.allclose(model.score(img, txt), img["emb"] @ txt["emb"].T, atol=1e-5)


def test_explain_maps_shapes(tiny):
    pixels = torch.randn(1, 3, 64, 64)
    ex = tiny.explain_maps(pixels, "a white plane parked next to the runway")
    n = len(ex.words)
    assert n >= 6 and "[CLS]" not in ex.words and "[SEP]" not in ex.words
    assert set(ex.token_maps) == {"s8", "s16", "s32"}
    assert ex.token_maps["s8"].shape == (20, 8, 8)
    assert ex.token_maps["s16"].shape == (20, 4, 4)
    assert ex.token_maps["s32"].shape == (20, 2, 2)
    for name in ("s8", "s16", "s32"):
        assert ex.token_words[name].shape == (20, n)
        assert ex.image_maps[f"pscja/{name}"].ndim == 2
    assert ex.word_weights["igta"].shape == (3, n)
    assert np.allclose(ex.word_weights["igta"].sum(1), 1.0, atol=1e-5)
    assert np.allclose(ex.token_maps["s16"].sum((1, 2)), 1.0, atol=1e-5)  # attention over the grid
    with torch.no_grad():
        img = tiny.image_states(pixels)
        txt = tiny.text_states(["a white plane parked next to the runway"])
        assert ex.extra["score"] == pytest.approx(float(tiny.score(img, txt)), abs=1e-5)
    assert "backbone.head" in tiny.gradcam_layers()


# ---- checkpoint round trip, training on real data ---------------------------------------------
def test_save_load_roundtrip_reproduces_scores_bit_for_bit(tmp_path, tiny):
    _perturb(tiny, seed=5)
    # the random test backbone is a frozen base (not saved): score from the same frozen features
    torch.manual_seed(4)
    pixels = torch.randn(3, 3, 64, 64)
    captions = ["a river", "many planes are parked at the airport", "two tennis courts next to a road"]
    with torch.no_grad():
        feats = tiny.image_features(pixels)
        before = tiny.score(tiny.image_states_from(feats), tiny.text_states(captions))
    save_model(tiny, tmp_path / "m")
    loaded = load_model(tmp_path / "m", expect_arch="mssa")
    assert loaded.cfg == tiny.cfg
    with torch.no_grad():
        after = loaded.score(loaded.image_states_from(feats), loaded.text_states(captions))
    assert torch.equal(before, after)
    counts = loaded.parameter_counts()
    assert 0 < counts["trained"] < counts["total"]


@needs_shared()
def test_tiny_training_run_on_ucm_loss_falls(tmp_path):
    from rsviewer.train.trainer import TrainConfig, train

    cfg = TrainConfig(epochs=3, batch_size=16, lr=2e-3, max_train_images=32, max_val_images=8, views=1, warmup=0.0)
    res = train("mssa", UCM_JSON, tmp_path / "run", model_config=TINY, config=cfg, log=lambda m: None)
    losses = [h["loss"] for h in res.history]
    assert losses[-1] < losses[0]
    assert (tmp_path / "run" / "metrics.json").exists()
    model = load_model(tmp_path / "run", expect_arch="mssa")
    assert model.pairwise and model.cfg.widths == [16, 16, 16]


def test_two_stage_search_on_an_index(tiny, small_gallery, tmp_path):
    """search_text/search_image on a pairwise model: stage 2 rescoring runs without autograd."""
    from rsviewer.retrieval.index import build_index
    from rsviewer.retrieval.search import search_image, search_text

    _perturb(tiny)
    data, images = small_gallery
    index = build_index(tiny, data, tmp_path / "idx", images=images)
    res = search_text(tiny, index, "many planes parked at the airport", k=5)
    scores = [h.score for h in res.hits]
    assert len(scores) == 5 and all(a >= b - 1e-6 for a, b in zip(scores, scores[1:]))
    img = search_image(tiny, index, res.hits[0].path, k=3)
    assert len(img.hits) == 3
