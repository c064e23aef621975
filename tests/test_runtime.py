"""The ONNX runtime for the frozen towers (rsviewer.runtime) and the compressed scan.

The six shipped models are exported once each into the session's private cache
(conftest sets ``RSVIEWER_CACHE``); the cache tests use a tiny model that exports in
well under a second.
"""
from __future__ import annotations

import dataclasses
import json
import logging

import numpy as np
import pytest
import torch
from torch import nn

from rsviewer.archs.base import BaseConfig, RetrievalModel, l2n
from rsviewer.runtime import export as rexport
from rsviewer.runtime import towers, warm_up
from rsviewer.runtime.towers import Towers

from conftest import GALLERY_JSON, REPO

# which towers of each shipped model run in ONNX Runtime; the others fall back with a reason
SHIPPED = {
    "default": {"image", "text"},
    "lite-ft-ucm": {"image", "text"},
    "galr-ucm": {"text"},  # image: the object graph uses aten::diag_embed (no ONNX op)
    "mssa-ucm": {"image", "text"},  # pairwise: image states and the image-independent text states
    "cmpagl-ucm": {"image", "text"},
    "cmer-ucm": {"image", "text"},
}
CAPTIONS = ["many planes parked at the airport", "a river goes through the dense green forest with a road beside it"]


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    a, b = a.reshape(a.shape[0], -1), b.double().reshape(b.shape[0], -1)
    return float(torch.nn.functional.cosine_similarity(a, b, dim=1).min())


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_shipped_towers_match_torch(name):
    from rsviewer.checkpoint import load_model
    from rsviewer.data import load_image

    model = load_model(name)
    tw = Towers(model, "onnx")  # a fresh object: nothing memoised from other tests
    imgs = json.loads(GALLERY_JSON.read_text())["images"][:2]
    pixels = model.preprocess([load_image(GALLERY_JSON.parent / "images" / im["filename"]) for im in imgs])
    with torch.no_grad():
        ref_i = model.image_states(pixels)
        ref_t = model.text_states(CAPTIONS)
    got_i, got_t = tw.image_states(pixels), tw.text_states(CAPTIONS)
    info = tw.info()
    ran = {t for t in ("image", "text") if info[t] == "onnx"}
    assert ran == SHIPPED[name], info
    for tower in {"image", "text"} - ran:
        assert info[tower].startswith("torch (") and len(info[tower]) > 12  # a stated reason
    for ref, got in ((ref_i, got_i), (ref_t, got_t)):
        assert set(got) == set(ref)
        for k in ref:
            assert got[k].shape == ref[k].shape
            if ref[k].is_floating_point() and ref[k].numel():
                assert _cos(got[k], ref[k]) >= 0.9999, (name, k)
    for tower in ran:  # the sidecar recorded the export-time parity
        assert all(v["min_cos"] >= 0.9999 for v in info["parity"][tower].values())


# ---- the cache, on a tiny model ----------------------------------------------------------------
class Tiny(RetrievalModel):
    arch = "tiny-rt"

    def __init__(self, seed: int = 0):
        super().__init__(BaseConfig(image_size=32, embed_dim=8))
        torch.manual_seed(seed)
        self.conv = nn.Conv2d(3, 6, 8, stride=8)
        self.iproj = nn.Linear(6, 8)
        self.emb = nn.Embedding(256, 6)
        self.tproj = nn.Linear(6, 8)
        self.eval()

    def tokenize(self, texts):
        n = max(len(t) for t in texts)
        ids = torch.zeros(len(texts), n, dtype=torch.long)
        mask = torch.zeros(len(texts), n, dtype=torch.long)
        for i, t in enumerate(texts):
            b = list(t.encode()[:n])
            ids[i, : len(b)], mask[i, : len(b)] = torch.tensor(b), 1
        return {"input_ids": ids, "attention_mask": mask}

    def image_features(self, pixels):
        return {"pooled": torch.relu(self.conv(pixels)).mean((2, 3))}

    def image_head(self, feats):
        return l2n(self.iproj(feats["pooled"]))

    def text_features(self, tokens):
        m = tokens["attention_mask"].unsqueeze(-1).float()
        return {"pooled": (self.emb(tokens["input_ids"]) * m).sum(1) / m.sum(1).clamp_min(1)}

    def text_head(self, feats):
        return l2n(self.tproj(feats["pooled"]))


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("RSVIEWER_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "onnx"


def _pixels(model, n=3):
    return rexport.image_example(model, n, model.image_size, 5)


def test_cache_hit_skips_export(cache, monkeypatch):
    m = Tiny()
    path, meta = rexport.cached_tower(m, "image", 32)
    assert path is not None and meta["status"] == "ok" and not meta["cache_hit"]
    side = json.loads(path.with_suffix(".json").read_text())
    assert side["parity"]["emb"]["max_abs"] < 1e-4 and side["sha256"]

    def boom(*a, **k):
        raise AssertionError("exported again on a cache hit")

    monkeypatch.setattr(rexport, "export_tower", boom)
    path2, meta2 = rexport.cached_tower(m, "image", 32)
    assert path2 == path and meta2["cache_hit"]
    tw = Towers(m, "onnx")
    got = tw.image_states(_pixels(m))["emb"]
    assert _cos(got, m.image_states(_pixels(m))["emb"]) >= 0.9999 and tw.info()["image"] == "onnx"


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_corrupt_cached_export_is_rebuilt(cache, damage, caplog):
    m = Tiny()
    path, _ = rexport.cached_tower(m, "text")
    data = bytearray(path.read_bytes())
    if damage == "truncate":
        bad = bytes(data[: len(data) // 2])
    else:  # same size, one weight byte changed: only the sha256 sees it
        data[-10] ^= 0xFF
        bad = bytes(data)
    path.write_bytes(bad)
    with caplog.at_level(logging.WARNING, logger="rsviewer.runtime"):
        tw = Towers(m, "onnx")
        got = tw.text_states(["a river", "three tennis courts"])["emb"]
    assert any("damaged" in r.getMessage() for r in caplog.records)
    assert tw.info()["text"] == "onnx"
    with torch.no_grad():
        ref = m.text_states(["a river", "three tennis courts"])["emb"]
    assert _cos(got, ref) >= 0.9999
    assert path.read_bytes() != bad and rexport.cached_tower(m, "text")[1]["cache_hit"]


def test_mismatch_is_refused_and_falls_back(cache, monkeypatch, caplog):
    m = Tiny(seed=1)
    monkeypatch.setattr(rexport, "_parity_ok", lambda par: False)
    with caplog.at_level(logging.WARNING, logger="rsviewer.runtime"):
        tw = Towers(m, "onnx")
        got = tw.image_states(_pixels(m))
    assert tw.info()["image"].startswith("torch (ONNX differs")
    assert len([r for r in caplog.records if "runs in PyTorch" in r.getMessage()]) == 1
    assert torch.allclose(got["emb"], m.image_states(_pixels(m))["emb"])
    path, side = rexport.tower_paths(m, "image", 32)
    assert not path.exists() and json.loads(side.read_text())["status"] == "mismatch"
    # known not to match: not exported again on the next start
    monkeypatch.setattr(rexport, "export_tower", lambda *a, **k: pytest.fail("re-exported a refused tower"))
    assert rexport.cached_tower(m, "image", 32)[0] is None


def test_auto_and_torch_runtimes(cache):
    from rsviewer.runtime import resolve_runtime
    from rsviewer.runtime.towers import RuntimeError_

    m = Tiny()
    assert resolve_runtime("auto", m) == "onnx" and resolve_runtime("torch", m) == "torch"
    with pytest.raises(RuntimeError_):
        resolve_runtime("tensorflow", m)
    assert towers(m, "auto") is towers(m, "onnx")  # memoised per model and resolved runtime
    info = warm_up(m)
    assert info["image"] == "onnx" and info["text"] == "onnx"
    import os

    os.environ["RSVIEWER_RUNTIME"] = "torch"  # the user's standing choice for auto
    try:
        assert resolve_runtime("auto", m) == "torch"
    finally:
        del os.environ["RSVIEWER_RUNTIME"]
    assert towers(m, "torch").info()["image"] == "torch" and not list(cache.glob("*.tmp"))


def test_encoding_workers_give_the_sequential_results_in_order(default_model, small_gallery, monkeypatch):
    """ORT batch work runs in one thread per core through the 1-thread sessions; the states
    must be those of the one-session path, row for row, and progress must still arrive."""
    from rsviewer.data import load_dataset
    from rsviewer.retrieval import evaluate
    import importlib

    rtowers = importlib.import_module("rsviewer.runtime.towers")  # the module (the package exports a function of that name)

    data, images = small_gallery
    ds = load_dataset(data, images=str(images))
    paths = [it.image for it in ds.items]
    texts = [c for it in ds.items for c in it.captions]
    monkeypatch.setattr(rtowers, "default_threads", lambda: 2)
    tw = towers(default_model, "onnx")
    assert tw.workers("image", default_model.image_size) == 2 and tw.workers("text") == 2
    assert towers(default_model, "torch") is not None and Towers(default_model, "torch").workers("image") == 1
    seen, threads = [], set()
    image_states = Towers.image_states

    def spy(self, *a, **kw):
        import threading

        threads.add(threading.current_thread().name.split("_")[0])
        return image_states(self, *a, **kw)

    monkeypatch.setattr(Towers, "image_states", spy)
    par_i = evaluate.encode_images(default_model, paths, batch_size=8, runtime="onnx",
                                   progress=lambda d, n, m: seen.append(d))
    par_t = evaluate.encode_texts(default_model, texts, batch_size=8, runtime="onnx")
    assert seen == [8, 16, 24] and threads == {"rsviewer-encode"}  # ran in the workers
    monkeypatch.setattr(Towers, "workers", lambda self, tower, size=None: 1)
    seq_i = evaluate.encode_images(default_model, paths, batch_size=8, runtime="onnx")
    seq_t = evaluate.encode_texts(default_model, texts, batch_size=8, runtime="onnx")
    for par, seq in ((par_i, seq_i), (par_t, seq_t)):
        assert set(par) == set(seq)
        for k in seq:
            assert par[k].shape == seq[k].shape and float((par[k] - seq[k]).abs().max()) < 1e-5, k


# ---- the compressed scan -------------------------------------------------------------------------
def test_compressed_scan_top10_matches_float32_on_real_embeddings():
    """The shipped demo index (a float32 index from before the codes existed): its 210 image
    and 1,050 caption embeddings as one gallery of real vectors, every one of them as a
    query; only 40 candidates re-scored, so the 8-bit scan itself must rank well. UCM's
    templated captions repeat, so equal scores are common: the top-10 must have the same
    scores, and the same rows wherever the score is not tied with another row's."""
    from rsviewer.retrieval.index import load_index
    from rsviewer.retrieval.search import CompressedScan, topk

    idx = load_index(REPO / "assets" / "gallery" / "index")
    gallery = np.concatenate([np.asarray(idx.image_emb), np.asarray(idx.caption_emb)]).astype(np.float32)
    cs = CompressedScan.build(gallery)
    assert cs.nbytes == gallery.size  # one byte a dimension: a quarter of float32
    for q in gallery:
        full = gallery @ q
        exact, exact_s = topk(gallery, q, 10)
        rows, scores = cs.topk(q, 10, rescore=40)
        np.testing.assert_allclose(scores, full[rows], rtol=1e-6)  # the exact float32 scores
        np.testing.assert_allclose(scores, exact_s, rtol=0, atol=1e-7)  # the same ranking
        untied = [r for r in exact.tolist() if np.sum(full == full[r]) == 1]
        assert set(untied) <= set(rows.tolist())


def test_index_stores_codes_and_search_uses_faiss(small_index, default_model, monkeypatch, tmp_path):
    from rsviewer.retrieval import search as S
    from rsviewer.retrieval.index import SQ_FILE, load_index, save_index

    assert not (small_index.folder / SQ_FILE).exists()  # small: the float32 scan, no codes
    monkeypatch.setattr(S, "COMPRESSED_MIN_ROWS", 10)  # "large" for this test: codes written, auto picks faiss
    copy = dataclasses.replace(small_index, folder=None, meta=dict(small_index.meta), _compressed=None)
    save_index(copy, tmp_path / "idx")  # a copy: the session fixture stays as it is
    assert (tmp_path / "idx" / SQ_FILE).exists() and copy.meta["compressed"]["file"] == SQ_FILE
    idx = load_index(tmp_path / "idx", default_model)
    exact = S.search_text(default_model, idx, "a baseball field", k=10, scan="exact")
    assert idx._compressed is None
    auto = S.search_text(default_model, idx, "a baseball field", k=10, scan="auto")
    assert idx._compressed is not None and idx._compressed.fi.ntotal == len(idx)  # loaded from the file
    assert [h.row for h in auto.hits] == [h.row for h in exact.hits]
    assert np.allclose([h.score for h in auto.hits], [h.score for h in exact.hits], atol=1e-5)
    img = S.search_image(default_model, idx, idx.path(0), k=5, scan="compressed")
    assert img.hits[0].row == 0


def test_openvino_runs_the_same_graphs():
    """OpenVINO (``runtime="openvino"``) on the default model's cached exports."""
    from rsviewer.checkpoint import load_model

    model = load_model("default")
    tw = Towers(model, "openvino")
    pixels = rexport.image_example(model, 2, model.image_size, 3)
    with torch.no_grad():
        ref_i, ref_t = model.image_states(pixels)["emb"], model.text_states(CAPTIONS)["emb"]
        x = torch.randn(1, 3, 320, 288)
        ref_m = model.feature_maps(x)
    assert _cos(tw.image_states(pixels)["emb"], ref_i) >= 0.9999
    assert _cos(tw.text_states(CAPTIONS)["emb"], ref_t) >= 0.9999
    assert _cos(tw.text_states(CAPTIONS[:1])["emb"], ref_t[:1]) >= 0.9999  # the 1-thread query session
    got_m = tw.feature_maps(x)
    assert all(_cos(got_m[k], ref_m[k]) >= 0.9999 for k in ref_m)
    assert tw.info()["image"] == tw.info()["text"] == "openvino"


def test_openvino_leaves_the_threads_signal_stack_as_it_was():
    """OpenVINO's CPU plugin installs an alternate signal stack per thread and, once its
    four compiled models were freed, left this thread pointing at an unmapped one: the next
    signal with a handler (a DataLoader's SIGCHLD) killed the whole test run with SIGSEGV."""
    import gc

    from rsviewer.checkpoint import load_model
    from rsviewer.utils import altstack

    before = altstack.current()
    model = load_model("default")
    tw = Towers(model, "openvino")
    tw.image_states(rexport.image_example(model, 2, model.image_size, 3))
    tw.text_states(CAPTIONS), tw.text_states(CAPTIONS[:1])
    tw.feature_maps(torch.randn(1, 3, 320, 288))
    assert altstack.current() == before
    del tw
    gc.collect()
    assert altstack.current() == before


# ---- localization windows through the `maps` graph (what bench/localize.py compares) ------------
from conftest import SHARED, needs_shared  # noqa: E402

SCENE0 = SHARED / "scenes" / "ucm-mosaics" / "images" / "scene0.jpg"


@needs_shared(SCENE0)
def test_localize_windows_onnx_maps_match_torch_eager(default_model, tmp_path, monkeypatch):
    """``runtime="onnx"`` reaches the window encoder (the ``maps`` graph runs) and gives the
    embeddings of plain torch eager fp32 (the fused copy switched off, as the bench's
    reference does) on a real scene crop."""
    from PIL import Image

    import rsviewer.localize.fused as fused_mod
    from rsviewer.localize import open_scene, sliding_windows
    from rsviewer.localize.encode import encode_windows

    path = tmp_path / "crop.png"
    with Image.open(SCENE0) as im:
        im.convert("RGB").crop((0, 0, 512, 512)).save(path)
    with open_scene(path) as sc:
        boxes = sliding_windows(sc.size, [256])
        e_onnx, _, info = encode_windows(default_model, sc, boxes, mode="fast", precision="fp32", runtime="onnx")
        monkeypatch.setattr(fused_mod, "fused_backbone", lambda *a, **k: None)
        e_eager, _, info_t = encode_windows(default_model, sc, boxes, mode="fast", precision="fp32", runtime="torch")
    assert info["runtime"] == "onnx" and info["maps"] == "onnx" and info["mode"] == "fast"
    assert info_t["runtime"] == "torch" and info_t["fused"] is False
    assert len(boxes) > 1 and e_onnx.shape == e_eager.shape
    assert float(np.sum(e_onnx * e_eager, 1).min()) >= 0.9999


def test_isolated_export_runs_in_one_child_and_matches_torch(cache, tmp_path, monkeypatch):
    """The app's path: both towers exported by one child process (the exporter holds the
    GIL for seconds; in the app's process the window could not repaint)."""
    import os

    from rsviewer.checkpoint import load_model
    from test_clip import make_ref, save_as

    m = load_model(save_as(make_ref("vit").state_dict(), tmp_path / "RemoteCLIP-tiny-ViT.pt", "plain"))
    monkeypatch.setattr(rexport, "_isolated", True)
    warm_up(m, "onnx")
    metas = [json.loads(p.read_text()) for p in sorted(cache.glob("*.json"))]
    assert {d["tower"] for d in metas} == {"image", "text"} and all(d["status"] == "ok" for d in metas)
    pids = {d["pid"] for d in metas}
    assert len(pids) == 1 and os.getpid() not in pids  # one child for both
    tw = towers(m, "onnx")
    assert tw.info()["image"] == "onnx" and tw.info()["text"] == "onnx"
    px = rexport.image_example(m, 3, m.image_size, 5)
    assert _cos(tw.image_states(px)["emb"], m.image_states(px)["emb"]) >= 0.9999
    assert _cos(tw.text_states(CAPTIONS)["emb"], m.text_states(CAPTIONS)["emb"]) >= 0.9999


def test_isolated_export_of_a_model_unlike_its_folder_runs_here(cache, tmp_path, monkeypatch):
    """A model whose fingerprint the child cannot reproduce from the folder (here: the file
    changed after loading) is exported in this process, never from other weights."""
    import os

    from rsviewer.checkpoint import load_model
    from test_clip import make_ref, save_as

    path = save_as(make_ref("vit").state_dict(), tmp_path / "RemoteCLIP-tiny-ViT.pt", "plain")
    m = load_model(path)
    save_as(make_ref("vit", seed=1).state_dict(), path, "plain")  # other weights in the folder now
    monkeypatch.setattr(rexport, "_isolated", True)
    p, meta = rexport.cached_tower(m, "text")
    assert p is not None and meta["status"] == "ok" and meta["pid"] == os.getpid()
    tw = Towers(m, "onnx")
    assert _cos(tw.text_states(CAPTIONS)["emb"], m.text_states(CAPTIONS)["emb"]) >= 0.9999
