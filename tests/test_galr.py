"""GaLR: DREA graph rules, d_A, MIDF weights, object sources, vocabulary, training, checkpoints."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from conftest import UCM_JSON, needs_shared, SHARED

from rsviewer.archs.galr import objects as O
from rsviewer.archs.galr.graph import Obj, boost_factors, build_graph, d_A, drea_adjacency, drea_merge, normalize_adjacency
from rsviewer.archs.galr.model import MIDF
from rsviewer.archs.galr.vocab import Vocab
from rsviewer.archs.registry import create_model
from rsviewer.errors import ModelError

@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # these tests run many tiny ops; on a shared 2-core machine one thread is several
    # times faster than two competing ones
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# a tiny model: small input (8×8 stride-16 grid), small heads
TINY = dict(
    image_size=128, embed_dim=32, mvsa_channels=8, mvsa_grid=8, node_dim=16, gcn_out=8, max_objects=8,
    midf_heads=4, midf_ff=64, dynamic_dim=16, word_dim=24, gru_hidden=32, global_hidden=64, n_clusters=6,
)


# ---- d_A, eq. 12 ----------------------------------------------------------------------------------
def test_d_A_known_values():
    assert d_A((0.3, 0.4), (0.3, 0.4)) == pytest.approx(1.0)
    assert d_A((0, 0), (1, 0)) == pytest.approx(0.0)  # ‖x−y‖² = 1 → (1 − 1) = 0
    assert d_A((0, 0), (0.5, 0)) == pytest.approx(math.exp(-0.25) * 0.75)
    assert d_A((0.1, 0.2), (0.4, 0.6)) == pytest.approx(math.exp(-0.25) * 0.75)  # 3-4-5 triangle, ‖·‖² = .25
    assert d_A((0, 0), (1, 1)) == pytest.approx(-math.exp(-2.0))  # beyond distance 1 it turns negative
    # the merge threshold 0.8 is reached at ‖x−y‖² ≈ 0.1084 (distance ≈ 0.33)
    assert d_A((0, 0), (math.sqrt(0.108), 0)) > 0.8 > d_A((0, 0), (math.sqrt(0.109), 0))


# ---- DREA merge, eqs. 13–16 --------------------------------------------------------------------------
def _obj(x, y, area, prob, cat, i):
    return Obj(x, y, area, prob, cat, (x - 0.05, y - 0.05, x + 0.05, y + 0.05), (i,), f"c{cat}")


def test_drea_merge_hand_made_graph():
    objs = [
        _obj(0.10, 0.10, 0.02, 0.6, 1, 0),  # near #1, same category → merge
        _obj(0.20, 0.10, 0.03, 0.9, 1, 1),
        _obj(0.15, 0.15, 0.05, 0.7, 2, 2),  # near both but another category → stays
        _obj(0.90, 0.90, 0.04, 0.5, 1, 3),  # same category but far (d_A ≈ 0.14 < 0.8) → stays
    ]
    out = drea_merge(objs, threshold=0.8)
    assert len(out) == 3
    z = next(o for o in out if o.merged_from == (0, 1))
    assert (z.cx, z.cy) == pytest.approx((0.15, 0.10))  # eq. 14: average position
    assert z.area == pytest.approx(0.05)  # eq. 15: summed area
    assert z.prob == pytest.approx(0.9)  # eq. 16: maximum probability
    assert z.category == 1
    assert z.box == pytest.approx((0.05, 0.05, 0.25, 0.15))  # union of the boxes
    others = sorted(o.merged_from for o in out if o is not z)
    assert others == [(2,), (3,)]


def test_drea_merge_chains_and_is_deterministic():
    # three close same-category objects collapse into one; order of merging: closest first
    objs = [_obj(0.5, 0.5, 0.01, 0.2, 0, 0), _obj(0.52, 0.5, 0.01, 0.3, 0, 1), _obj(0.6, 0.5, 0.01, 0.4, 0, 2)]
    out = drea_merge(objs)
    assert len(out) == 1 and out[0].merged_from == (0, 1, 2)
    # pair (0,1) first → (0.51, 0.5), then with #2 → (0.555, 0.5)
    assert out[0].cx == pytest.approx(0.555)
    assert out[0].area == pytest.approx(0.03) and out[0].prob == pytest.approx(0.4)
    assert drea_merge(objs) == out


# ---- boosted adjacency, eqs. 17–18 ---------------------------------------------------------------------
def test_adjacency_boost_formula():
    g = boost_factors(3, 1.15)
    for m in range(1, 4):
        for n in range(1, 4):
            assert g[m - 1, n - 1] == pytest.approx(1.15 * math.exp(1 - math.sqrt(m * n)))
    assert g[0, 0] == pytest.approx(1.15)
    assert g[0, 1] == pytest.approx(1.15 * math.exp(1 - math.sqrt(2)))  # ≈ 0.7603
    # two objects 0.5 apart: A_12 = 𝔇·e^{1−√2}·d_A
    a = drea_adjacency([_obj(0.2, 0.5, 0.3, 1, 0, 0), _obj(0.7, 0.5, 0.1, 1, 1, 1)], boost=1.15)
    expect = 1.15 * math.exp(1 - math.sqrt(2)) * math.exp(-0.25) * 0.75
    assert a[0, 1] == pytest.approx(expect, rel=1e-6) and a[1, 0] == pytest.approx(expect, rel=1e-6)
    assert a[0, 0] == 0 and a[1, 1] == 0  # the GCN adds I (eq. 11)
    plain = drea_adjacency([_obj(0.2, 0.5, 0.3, 1, 0, 0), _obj(0.7, 0.5, 0.1, 1, 1, 1)], boost=None)
    assert plain[0, 1] == pytest.approx(math.exp(-0.25) * 0.75, rel=1e-6)


def test_build_graph_ranks_by_area_and_caps():
    objs = [_obj(0.1 * i + 0.05, 0.5, 0.01 * (i + 1), 0.5, i, i) for i in range(6)]  # distinct categories
    nodes, adj = build_graph(objs, max_objects=4)
    assert [o.merged_from for o in nodes] == [(5,), (4,), (3,), (2,)]  # eq. 17: largest first
    assert adj.shape == (4, 4)
    assert adj[0, 1] == pytest.approx(boost_factors(4)[0, 1] * d_A((0.55, 0.5), (0.45, 0.5)), rel=1e-5)
    nodes2, _ = build_graph(objs, max_objects=10, drea=False)
    assert len(nodes2) == 6


def test_normalized_adjacency_masks_padding():
    adj = torch.zeros(1, 3, 3)
    adj[0, 0, 1] = adj[0, 1, 0] = 1.0
    adj[0, 0, 2] = adj[0, 2, 0] = 5.0  # node 2 is padding: ignored
    a = normalize_adjacency(adj, torch.tensor([[1.0, 1.0, 0.0]]))
    assert torch.allclose(a[0, :2, :2], torch.full((2, 2), 0.5))  # (A + I) / 2 for two linked nodes
    assert a[0, 2].abs().sum() == 0 and a[0, :, 2].abs().sum() == 0


# ---- MIDF, eqs. 19–24 ---------------------------------------------------------------------------------
def test_midf_weights_sum_to_one_and_use_both_columns():
    torch.manual_seed(0)
    midf = MIDF(dim=16, heads=4, ff=32, dyn=8, dropout=0.0).eval()
    with torch.no_grad():
        midf.w_beta.weight.zero_()
        midf.w_beta.bias.copy_(torch.tensor([math.log(3.0), 0.0]))  # softmax → (0.75, 0.25)
    vg, vl = torch.randn(5, 16), torch.randn(5, 16)
    v, gamma = midf(vg, vl)
    assert torch.allclose(gamma.sum(1), torch.ones(5))
    assert torch.allclose(gamma, torch.tensor([[0.75, 0.25]]).expand(5, 2))
    # recompute eqs. 19–22 and check eq. 24 uses γ1 for global′ and γ2 (column 1) for local′
    with torch.no_grad():
        g_sa, l_sa = midf.sa_g(vg[:, None]), midf.sa_l(vl[:, None])
        g_sga, l_sga = midf.ga_g(g_sa, l_sa)[:, 0], midf.ga_l(l_sa, g_sa)[:, 0]
        g2, l2 = g_sga * torch.sigmoid(l_sga), l_sga + g_sga
    assert torch.allclose(v, 0.75 * g2 + 0.25 * l2, atol=1e-6)
    assert not torch.allclose(v, 0.75 * g2 + 0.75 * l2, atol=1e-3)  # the released code's column-0 bug


# ---- object sources ------------------------------------------------------------------------------------
DOTA_TEXT = """imagesource:GoogleEarth
gsd:0.146
10 10 30 10 30 20 10 20 small-vehicle 0
50 50 70 50 70 90 50 90 plane 1 0.87
"""


def test_parse_dota_and_objects():
    dets = O.parse_dota(DOTA_TEXT)
    assert [d["name"] for d in dets] == ["small-vehicle", "plane"]
    assert dets[0]["poly"] == [(10, 10), (30, 10), (30, 20), (10, 20)]
    assert dets[0]["score"] == 1.0 and dets[1]["score"] == pytest.approx(0.87) and dets[1]["difficult"] == 1
    names = O.category_names({"a": dets})
    objs = O.detection_objs(dets, 100, 100, names)
    assert (objs[0].cx, objs[0].cy) == pytest.approx((0.2, 0.15))
    assert objs[0].area == pytest.approx(200 / 10000)  # polygon area / image area
    assert objs[0].box == pytest.approx((0.1, 0.1, 0.3, 0.2))
    assert objs[0].category == O.DOTA_CLASSES.index("small-vehicle") and objs[1].name == "plane"
    assert objs[1].prob == pytest.approx(0.87)
    with pytest.raises(ModelError):
        O.parse_dota("1 2 3 ship")


def test_parse_json_layouts():
    a = O.parse_json_detections({"1.jpg": [{"box": [0, 0, 10, 10], "category": "ship", "score": 0.5}]})
    b = O.parse_json_detections([{"image": "1.jpg", "objects": [{"bbox": [0, 0, 10, 10], "class": "ship", "score": 0.5}]}])
    c = O.parse_json_detections([{"image": "1.jpg", "poly": [[0, 0], [10, 0], [10, 10], [0, 10]], "category": "ship", "score": 0.5}])
    assert a == b == c
    assert O.parse_json_detections({"normalized": True, "images": {"x": [{"box": [0, 0, 0.5, 0.5]}]}})["x"][0]["normalized"]
    names = O.category_names({**a, "2.jpg": [{"poly": [(0, 0)] * 4, "name": "zebra-crossing", "score": 1.0}]})
    assert names[: len(O.DOTA_CLASSES)] == list(O.DOTA_CLASSES) and names[-1] == "zebra-crossing"


@needs_shared(SHARED / "scenes" / "real" / "P1888.labels.txt")
def test_parse_real_dota_file():
    dets = O.load_detections(SHARED / "scenes" / "real" / "P1888.labels.txt")
    (name, lst), = dets.items()
    assert name == "P1888" and len(lst) > 0
    assert {d["name"] for d in lst} <= set(O.DOTA_CLASSES)


def test_dihedral_points_follow_the_cache_views():
    from rsviewer.train.cache import dihedral

    h = w = 8
    img = torch.zeros(1, 1, h, w)
    r, c = 1, 5  # row, column of a marked cell
    img[0, 0, r, c] = 1
    for v in range(8):
        out = dihedral(img, v)[0, 0]
        rr, cc = (int(i) for i in torch.nonzero(out)[0])
        x, y = O.dihedral_point((c + 0.5) / w, (r + 0.5) / h, v)
        assert (x, y) == pytest.approx(((cc + 0.5) / w, (rr + 0.5) / h)), v
        assert torch.equal(O.undo_dihedral(out, v), img[0, 0])


def test_clustering_source_is_deterministic():
    torch.manual_seed(1)
    grid, reg = torch.randn(2, 16, 8, 8), torch.rand(2, 24, 4, 4)
    cat = O.lsh_categorizer(24, bits=3)
    a = O.cluster_objects(grid, reg, cat, n_clusters=5)
    b = O.cluster_objects(grid.clone(), reg.clone(), cat, n_clusters=5)
    assert [[o.to_dict() for o in objs] for objs, _ in a] == [[o.to_dict() for o in objs] for objs, _ in b]
    for objs, masks in a:
        assert sum(o.area for o in objs) == pytest.approx(1.0)  # regions tile the grid
        assert all(m.sum() / m.size == pytest.approx(o.area) for o, m in zip(objs, masks))
        assert all(0 <= o.category < 8 and 0 < o.prob <= 1 for o in objs)


def test_model_objects_deterministic_and_explain():
    torch.manual_seed(0)
    m = create_model("galr", **TINY).eval()
    assert m.category_source == "imagenet"
    x = torch.randn(2, 3, 128, 128)
    f1, f2 = m.image_features(x), m.image_features(x.clone())
    assert f1.keys() == f2.keys() and all(torch.equal(f1[k], f2[k]) for k in f1)
    assert f1["obj_mask"].sum() > 0 and f1["adj"].shape == (2, 8, 8)
    ex = m.explain_maps(x[:1], "many buildings and a road")
    assert ex.image_maps["mvsa"].shape == (8, 8)
    objs, adj = ex.extra["objects"], ex.extra["adjacency"]
    assert ex.extra["object_source"] == "cluster" and len(adj) == len(objs) > 0
    assert [o["area"] for o in objs] == sorted((o["area"] for o in objs), reverse=True)
    assert {"centre", "box", "area", "category", "confidence", "merged_from"} <= set(objs[0])
    assert abs(sum(ex.extra["midf_weights"].values()) - 1) < 1e-5
    assert "galr" in [n for n in __import__("rsviewer.archs.registry", fromlist=["list_archs"]).list_archs()]


def test_file_object_source(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(tmp_path / "a.png")
    dets = {"a.png": [{"box": [0, 0, 16, 32], "category": "ship", "score": 0.7},
                      {"box": [48, 48, 64, 64], "category": "harbor"}]}  # fmt: skip
    (tmp_path / "det.json").write_text(json.dumps(dets))
    m = create_model("galr", **{**TINY, "object_source": "file", "detections": str(tmp_path / "det.json")}).eval()
    assert m.extra_config()["categories"][:2] == ["plane", "ship"]
    x = m.preprocess([Image.open(tmp_path / "a.png")])
    g = m.image_features(x)
    assert g["obj_mask"][0].tolist()[:3] == [1, 1, 0]
    # ranked by area: the ship (16×32 px = 1/8 of the image) first
    assert g["obj_cat"][0, 0].item() == O.DOTA_CLASSES.index("ship")
    assert g["obj_geo"][0, 0].tolist() == pytest.approx([0.125, 0.25, 0.7, 0.125])
    from rsviewer.train.cache import dihedral

    g1 = m.image_features(dihedral(x, 1))  # a cached view: objects rotate with the pixels
    assert g1["obj_geo"][0, 0, :2].tolist() == pytest.approx(list(O.dihedral_point(0.125, 0.25, 1)))
    none = m.image_features(torch.zeros_like(x))  # an image without detections: empty graph
    assert none["obj_mask"].sum() == 0 and torch.isfinite(m.image_head(none)).all()
    assert "detections_digest" in m.feature_signature("image")


# ---- text ----------------------------------------------------------------------------------------------
def test_vocab_and_text_encoder():
    v = Vocab.build(["Two planes, parked.", "two cars", "a plane"])
    assert v.words[0] == "two" and v.itos[:2] == ["<pad>", "<unk>"]
    tok = v.tokenize(["two zebras", ""], max_len=5)
    assert tok["ids"].tolist() == [[v.stoi["two"], 1], [1, 0]] and tok["lengths"].tolist() == [2, 1]
    m = create_model("galr", **TINY)
    m.prepare_training(["many green trees", "a road"], [None, None])
    assert len(m.vocab) == 2 + 5 and m.text.embed.num_embeddings == 7
    e = m.encode_text(["green trees", "a road and unknownword"])
    assert e.shape == (2, 32) and torch.allclose(e.norm(dim=1), torch.ones(2))
    sig = m.feature_signature("text")
    m.prepare_training(["other words"], [None])
    assert m.feature_signature("text") != sig  # the vocabulary is part of the text cache key


# ---- training and checkpoints --------------------------------------------------------------------------
@needs_shared()
def test_tiny_training_loss_falls(tmp_path):
    from rsviewer.train.trainer import TrainConfig, train

    res = train(
        "galr", UCM_JSON, tmp_path / "m", model_config=dict(TINY),
        config=TrainConfig(epochs=5, max_train_images=48, max_val_images=16, views=1, batch_size=24, lr=2e-3, warmup=0.0),
    )  # fmt: skip
    losses = [h["loss"] for h in res.history]
    assert losses[-1] < losses[0]
    assert (tmp_path / "m" / "model.safetensors").exists() and 0 <= res.val["mR"] <= 100
    metrics = json.loads((tmp_path / "m" / "metrics.json").read_text())
    assert metrics["arch"] == "galr" and metrics["parameters"]["trained"] > 0


def test_save_load_round_trip(tmp_path):
    from rsviewer.checkpoint import load_model, read_config, save_model

    torch.manual_seed(0)
    m = create_model("galr", **{**TINY, "loss": "both"})
    m.prepare_training(["a plane on the runway", "many cars are parked", "green trees"], [None] * 3)
    m.freeze_bases()
    with torch.no_grad():  # move the trained tensors away from their init
        for p in m.parameters():
            if p.requires_grad:
                p.add_(0.01 * torch.randn_like(p))
    m.eval()
    save_model(m, tmp_path / "galr")
    cfg = read_config(tmp_path / "galr")
    assert cfg["extra"]["vocab"] == m.vocab.words and "backbone" in cfg["bases"]
    m2 = load_model(tmp_path / "galr")
    x = torch.randn(2, 3, 128, 128)
    texts = ["a plane on the runway", "trees and cars", "nothing known here"]
    with torch.no_grad():
        s1 = m.score(m.image_states(x), m.text_states(texts))
        s2 = m2.score(m2.image_states(x), m2.text_states(texts))
    assert torch.equal(s1, s2)
    with pytest.raises(ModelError):
        load_model(tmp_path / "galr", expect_arch="lite")


def test_bad_config_is_refused():
    with pytest.raises(ModelError):
        create_model("galr", **{**TINY, "fusion": "concat"})
    with pytest.raises(ModelError):
        create_model("galr", **{**TINY, "object_source": "file"})  # no detections given


def test_minilm_word_init_is_deterministic():
    from rsviewer.archs.galr.model import minilm_word_vectors

    words = ["plane", "runway", "trees", "parking", "cars"]
    a = minilm_word_vectors(words, 4)
    assert a.shape == (5, 4) and torch.isfinite(a).all() and a.std() == pytest.approx(1.0, rel=1e-4)
    m = create_model("galr", **{**TINY, "word_init": "minilm"})
    m.prepare_training(["plane runway trees parking cars"], [None])
    assert m.vocab.words == sorted(words)  # equal counts: alphabetical
    b = minilm_word_vectors(m.vocab.words, TINY["word_dim"])
    assert torch.equal(m.text.embed.weight[2:].detach(), b)
