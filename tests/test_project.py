"""Embedding maps (rsviewer.project): methods, sampling, cache, query placement, CSV, CLI."""
from __future__ import annotations

import csv
import json
import threading

import numpy as np
import pytest

from rsviewer.errors import Cancelled, RsviewerError
from rsviewer.project import (CAPTION, CSV_COLUMNS, IMAGE, embed_2d, place_query, project_index, resolve_method,
                              write_csv)
from rsviewer.retrieval.index import GalleryIndex, save_index


def fake_index(n_images=60, caps_per_image=2, dim=32, labels=3, seed=0) -> GalleryIndex:
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((labels, dim)).astype(np.float32)
    lab = np.arange(n_images) % labels
    img = centres[lab] + 0.3 * rng.standard_normal((n_images, dim)).astype(np.float32)
    img /= np.linalg.norm(img, axis=1, keepdims=True)
    cap_image = np.repeat(np.arange(n_images), caps_per_image)
    cap = centres[lab[cap_image]] + 0.3 * rng.standard_normal((len(cap_image), dim)).astype(np.float32)
    cap /= np.linalg.norm(cap, axis=1, keepdims=True)
    items = [{"id": f"{i}.jpg", "path": f"/x/{i}.jpg", "label": f"L{lab[i]}",
              "captions": [f"caption {i}-{j}" for j in range(caps_per_image)]} for i in range(n_images)]
    meta = {"format": "rsviewer-index/1", "fingerprint": f"fp{seed}", "model": "fake", "arch": "lite",
            "source": "/x/fake.json", "created": "2025-01-01T00:00:00", "embed_dim": dim}
    return GalleryIndex(None, meta, items, img, cap, cap_image.astype(np.int64))


def test_pca_and_tsne_layouts_separate_clusters():
    idx = fake_index()
    for method in ("pca", "tsne"):
        proj = project_index(idx, method, max_points=None, cache=False)
        assert proj.xy.shape == (180, 2) and np.isfinite(proj.xy).all()
        assert (proj.kind == IMAGE).sum() == 60 and (proj.kind == CAPTION).sum() == 120
        assert not proj.sampled
        # points of one label are closer to their own centroid than to the others'
        labs = np.array([idx.items[r]["label"] if k == IMAGE else idx.items[idx.caption_image[r]]["label"]
                         for k, r in zip(proj.kind, proj.row)])
        cents = {lab: proj.xy[labs == lab].mean(0) for lab in set(labs)}
        own = np.mean([np.linalg.norm(p - cents[lab]) for p, lab in zip(proj.xy, labs)])
        other = np.mean([np.linalg.norm(cents[a] - cents[b]) for a in cents for b in cents if a != b])
        assert own < other / 2, method


def test_sampling_cache_and_describe(tmp_path, monkeypatch):
    monkeypatch.setenv("RSVIEWER_CACHE", str(tmp_path))
    idx = fake_index()
    p1 = project_index(idx, "pca", max_points=50, seed=3)
    assert len(p1) == 50 and p1.sampled and not p1.cached
    assert "showing 50 of 180 points (random sample)" in p1.describe()
    files = list((tmp_path / "projections").glob("*.npz"))
    assert len(files) == 1 and not list((tmp_path / "projections").glob(".*tmp"))
    p2 = project_index(idx, "pca", max_points=50, seed=3)
    assert p2.cached and np.array_equal(p1.xy, p2.xy) and np.array_equal(p1.row, p2.row)
    # another seed, another index identity: other cache entries
    assert not project_index(idx, "pca", max_points=50, seed=4).cached
    assert not project_index(fake_index(seed=1), "pca", max_points=50, seed=3).cached


def test_landmarks_place_every_point():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((300, 16)).astype(np.float32)
    y = embed_2d(x, "tsne", landmarks=100, n_iter=250)
    assert y.shape == (300, 2) and np.isfinite(y).all()
    assert len(np.unique(y.round(4), axis=0)) > 250  # not collapsed onto the landmarks


def test_cancel_and_bad_method():
    ev = threading.Event()
    ev.set()
    with pytest.raises(Cancelled):
        embed_2d(np.zeros((50, 8), np.float32), "pca", cancel=ev)
    with pytest.raises(RsviewerError, match="unknown projection method"):
        resolve_method("mds")
    with pytest.raises(RsviewerError, match="empty"):
        project_index(fake_index(n_images=0), "pca")


def test_place_query_near_its_cluster():
    idx = fake_index()
    proj = project_index(idx, "pca", max_points=None, cache=False)
    q = np.asarray(idx.image_emb[0])
    xy, top, w = place_query(proj, idx, q, k=5)
    assert xy.shape == (2,) and len(top) == 5 and abs(w.sum() - 1) < 1e-5
    own = proj.xy[(proj.kind == IMAGE) & (np.arange(len(proj)) < 60) & (np.arange(len(proj)) % 3 == 0)]
    assert np.linalg.norm(xy - own.mean(0)) < np.linalg.norm(xy - proj.xy.mean(0)) + 1e-6


def test_csv_and_cli(tmp_path, capsys):
    from rsviewer.cli.main import main

    idx = fake_index()
    proj = project_index(idx, "pca", max_points=None, cache=False)
    out = write_csv(proj, idx, tmp_path / "map.csv")
    rows = list(csv.DictReader(out.open()))
    assert tuple(rows[0]) == CSV_COLUMNS and len(rows) == 180
    cap = next(r for r in rows if r["kind"] == "caption")
    assert cap["text"].startswith("caption ") and cap["label"].startswith("L")
    save_index(idx, tmp_path / "index")
    rc = main(["project", "--index", str(tmp_path / "index"), "--method", "pca", "--out", str(tmp_path / "cli.csv"),
               "--max-points", "100", "--json", "--quiet"])
    assert rc == 0
    obj = json.loads(capsys.readouterr().out)
    assert obj["n_points"] == 100 and obj["sampled"] and obj["method"] == "pca"
    assert len(list(csv.DictReader((tmp_path / "cli.csv").open()))) == 100
    assert main(["project", "--index", str(tmp_path / "nope"), "--out", str(tmp_path / "x.csv")]) == 2
