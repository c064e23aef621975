"""Gallery index and search: exact top-K, fingerprints, atomic writes, query modes."""
from __future__ import annotations

import json
from pathlib import Path
import threading

import numpy as np
import pytest

from rsviewer.errors import Cancelled, IndexError_, QueryError
from rsviewer.retrieval.index import build_index, load_index
from rsviewer.retrieval.search import ground_truth_rows, search_image, search_text, topk


def test_topk_matches_brute_force(monkeypatch):
    import rsviewer.retrieval.search as s

    monkeypatch.setattr(s, "CHUNK", 1000)  # force several chunks
    rng = np.random.default_rng(0)
    emb = rng.standard_normal((5003, 16)).astype(np.float32)
    q = rng.standard_normal(16).astype(np.float32)
    idx, sc = topk(emb, q, 25)
    ref = np.argsort(-(emb @ q), kind="stable")[:25]
    assert idx.tolist() == ref.tolist()
    assert np.allclose(sc, (emb @ q)[ref])
    allowed = np.zeros(5003, bool)
    allowed[::7] = True
    idx2, _ = topk(emb, q, 5, allowed)
    assert all(i % 7 == 0 for i in idx2)
    assert len(topk(emb, q, 0)[0]) == 0


def test_index_round_trip_and_memmap(small_index):
    idx = small_index
    again = load_index(idx.folder)
    assert isinstance(again.image_emb, np.memmap)
    assert np.array_equal(np.asarray(again.image_emb), idx.image_emb)
    assert len(again) == 24 and again.caption_emb.shape[0] == 120
    norms = np.linalg.norm(np.asarray(again.image_emb), axis=1)
    assert np.allclose(norms, 1.0, atol=1e-4)
    meta = json.loads((idx.folder / "index.json").read_text())
    assert meta["fingerprint"] == idx.fingerprint and meta["n_images"] == 24


def test_text_search_finds_ground_truth(default_model, small_index):
    # query with one of the gallery's own captions: its image must come back near the top
    item = small_index.items[3]
    res = search_text(default_model, small_index, item["captions"][0], k=5)
    assert res.mode == "text→image" and len(res.hits) == 5
    assert [h.rank for h in res.hits] == [1, 2, 3, 4, 5]
    assert all(res.hits[i].score >= res.hits[i + 1].score for i in range(4))
    gt = ground_truth_rows(small_index, item["captions"][0])
    assert 3 in gt.tolist()
    labels = {h.label for h in res.hits[:3]}
    assert item["label"] in labels


def test_label_filter_and_rerank(default_model, small_index):
    lab = small_index.items[0]["label"]
    res = search_text(default_model, small_index, "a photo", k=10, labels=[lab])
    assert res.hits and all(h.label == lab for h in res.hits)
    for method in ("mr", "smr"):
        r = search_text(default_model, small_index, "many planes parked at the airport", k=5, rerank=method)
        assert len(r.hits) == 5 and r.rerank == method


def test_image_search_returns_itself_first(default_model, small_index):
    path = small_index.items[5]["path"]
    res = search_image(default_model, small_index, path, k=3)
    assert res.hits[0].row == 5 and res.hits[0].score == pytest.approx(1.0, abs=1e-3)
    caps = search_image(default_model, small_index, path, k=4, target="captions")
    assert caps.mode == "image→text" and all(h.text for h in caps.hits)


def test_bad_queries(default_model, small_index):
    with pytest.raises(QueryError, match="empty"):
        search_text(default_model, small_index, "   ", k=3)
    with pytest.raises(QueryError, match="limit is"):
        search_text(default_model, small_index, "x" * 10_000, k=3)


def test_index_from_another_model_is_refused(default_model, small_index, tmp_path):
    from rsviewer.archs.registry import create_model

    other = create_model("lite", hidden=32, embed_dim=16)
    with pytest.raises(IndexError_, match="rebuild it"):
        load_index(small_index.folder, other)
    with pytest.raises(IndexError_, match="rebuild it"):
        search_text(other, small_index, "a river", k=3)


def test_cancelled_and_failed_writes_keep_old_index(default_model, small_gallery, small_index, tmp_path, monkeypatch):
    data, images = small_gallery
    out = tmp_path / "idx"
    import shutil

    shutil.copytree(small_index.folder, out)
    before = (out / "image_emb.npy").read_bytes()
    ev = threading.Event()
    calls = []

    def progress(done, total, msg):
        calls.append(done)
        if len(calls) == 1:
            ev.set()  # cancel after the first batch

    with pytest.raises(Cancelled):
        build_index(default_model, data, out, images=str(images), progress=progress, cancel=ev, batch_size=8,
                    overwrite=True)
    assert (out / "image_emb.npy").read_bytes() == before
    # a full disk in the middle of the write: the previous index survives intact
    import rsviewer.retrieval.index as ix

    real_save = np.save

    def full_disk(path, arr, *a, **k):
        if str(path).endswith("caption_emb.npy"):
            raise OSError(28, "No space left on device")
        return real_save(path, arr, *a, **k)

    monkeypatch.setattr(ix.np, "save", full_disk)
    with pytest.raises(OSError):
        build_index(default_model, data, out, images=str(images), overwrite=True)
    assert (out / "image_emb.npy").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["idx"]  # no temp folders left
    load_index(out)


def test_damaged_index_is_reported(small_index, tmp_path):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(small_index.folder, bad)
    (bad / "image_emb.npy").write_bytes(b"garbage")
    with pytest.raises(IndexError_, match="damaged"):
        load_index(bad)
    with pytest.raises(IndexError_, match="not an rsviewer index"):
        load_index(tmp_path)


def test_index_next_to_its_images_moves_with_them(default_model, small_gallery, tmp_path):
    """An index inside the gallery folder stores relative paths: copy both, search still finds files."""
    import shutil

    data, images = small_gallery
    root = tmp_path / "gallery"
    shutil.copytree(images, root / "images")
    shutil.copy(data, root / "g.json")
    idx = build_index(default_model, root / "g.json", root / "index", images=root / "images")
    stored = json.loads((root / "index" / "items.json").read_text())
    assert all(not Path(it["path"]).is_absolute() for it in stored)
    moved = tmp_path / "moved"
    shutil.copytree(root, moved)
    shutil.rmtree(root)
    again = load_index(moved / "index", default_model)
    assert all(Path(p).exists() and str(p).startswith(str(moved.resolve())) for p in (it["path"] for it in again.items))
    hit = search_text(default_model, again, "an airport", k=3).hits[0]
    assert Path(hit.path).exists()


def test_encode_texts_encodes_each_distinct_caption_once_in_order(default_model, monkeypatch):
    """Duplicates are encoded once (bit-identical states), the rest in the caller's order,
    each equal to encoding it alone; an empty list gives zero rows."""
    import torch

    from rsviewer.retrieval.evaluate import encode_texts

    texts = ["a long caption about many planes parked at the airport", "a river", "",
             "a river", "four tennis courts next to a parking lot", "a river"]
    seen = []
    real = default_model.text_states
    monkeypatch.setattr(default_model, "text_states", lambda chunk: (seen.extend(chunk), real(chunk))[1])
    out = encode_texts(default_model, texts, batch_size=2, runtime="torch")["emb"]
    assert sorted(seen) == sorted({t or "." for t in texts}) and len(seen) == 4  # "a river" once
    assert torch.equal(out[1], out[3]) and torch.equal(out[1], out[5])
    with torch.no_grad():
        for i, t in enumerate(texts):
            alone = real([t or "."])["emb"][0]
            assert torch.allclose(out[i], alone, atol=1e-5), t
    assert encode_texts(default_model, [], runtime="torch")["emb"].shape == (0, default_model.embed_dim)


def test_encode_images_feeds_the_cpu_tower_micro_batches(default_model, monkeypatch):
    """A batch of 10 goes through the image tower 4 + 4 + 2 on the CPU (cache-sized
    micro-batches), and the states equal those of each image alone."""
    import torch

    from rsviewer.retrieval import evaluate

    paths = sorted((Path(__file__).resolve().parents[1] / "assets" / "gallery" / "images").glob("*.jpg"))[:10]
    sizes = []
    real = default_model.image_states
    monkeypatch.setattr(default_model, "image_states", lambda px: (sizes.append(len(px)), real(px))[1])
    out = evaluate.encode_images(default_model, paths, batch_size=10, runtime="torch")["emb"]
    assert evaluate.CPU_MICRO_BATCH == 4 and sizes == [4, 4, 2]
    with torch.no_grad():
        alone = real(default_model.preprocess([evaluate.load_image(paths[7])]))["emb"][0]
    assert out.shape == (10, default_model.embed_dim) and torch.allclose(out[7], alone, atol=1e-5)
