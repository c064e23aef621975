"""Per-query evaluation (issue 15): ranks that average back to ``rsviewer eval`` exactly."""
from __future__ import annotations

import csv
import json
import threading
from pathlib import Path

import numpy as np
import pytest

from conftest import GALLERY_JSON, UCM_JSON, needs_shared
from rsviewer.cli.main import main
from rsviewer.errors import Cancelled, RsviewerError
from rsviewer.retrieval.metrics import ranks_i2t, ranks_t2i, retrieval_metrics
from rsviewer.retrieval.per_query import (KS, Scores, caption_ceiling, class_recall, compare_table, confusion,
                                          per_query, per_query_table, score_dataset, score_index, write_table)


def _recall_from_row(direction: str, rank: int, ties: int, own_ties: int, k: int) -> float:
    """The documented hit@K formula, from the integer columns only."""
    d = k - (rank - 1)
    if d <= 0:
        return 0.0
    if direction == "t2i":
        return min(1.0, d / (ties + 1))
    if d > ties:
        return 1.0
    miss = 1.0  # P(none of own_ties own items in the first d of own_ties + ties slots)
    for t in range(own_ties):
        miss *= max(0, own_ties + ties - d - t) / (own_ties + ties - t)
    return 1.0 - miss


@needs_shared(GALLERY_JSON)
def test_cli_per_query_csv_reproduces_eval(capsys, small_gallery, tmp_path):
    data, images = small_gallery
    common = ["--model", "default", "--data", str(data), "--images", str(images), "--split", "val",
              "--rerank", "mr", "--quiet", "--json"]
    assert main(["eval", *common]) == 0
    ref = json.loads(capsys.readouterr().out)
    out = tmp_path / "pq.csv"
    assert main(["eval", *common, "--per-query", str(out), "--compare", "default"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert {k: res[k] for k in ref} == ref  # the printed numbers are eval's
    with open(out, encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    by_dir = {d: [r for r in rows if r["direction"] == d] for d in ("t2i", "i2t")}
    assert len(by_dir["t2i"]) == ref["n_captions"] and len(by_dir["i2t"]) == ref["n_images"]
    for d, rs in by_dir.items():
        for k in KS:
            from_cols = 100 * np.mean([float(r[f"a_hit@{k}"]) for r in rs])
            from_ranks = 100 * np.mean([_recall_from_row(d, int(r["a_rank"]), int(r["a_ties"]), int(r["a_own_ties"]), k)
                                        for r in rs])
            assert round(from_cols, 2) == ref[d][f"R@{k}"]
            assert round(from_ranks, 2) == ref[d][f"R@{k}"]
    # a model compared with itself: identical columns, zero difference
    assert all(float(r["rank_diff"]) == 0.0 for r in rows)
    assert all(r["a_rank"] == r["b_rank"] and r["a_top1"] == r["b_top1"] for r in rows)
    # a file rsviewer did not write is never overwritten (checked before encoding)
    foreign = tmp_path / "mine.csv"
    foreign.write_text("my,own,data\n")
    assert main(["eval", *common, "--per-query", str(foreign)]) == 2
    assert "was not written by rsviewer" in capsys.readouterr().err
    assert foreign.read_text() == "my,own,data\n"


def _scores(sim, ci, captions=None, labels=None):
    n, m = sim.shape
    captions = captions or [f"c{j}" for j in range(m)]
    labels = labels or [f"L{i % 3}" for i in range(n)]
    return Scores("m", "none", sim, sim, sim, captions, np.asarray(ci), [f"i{i}" for i in range(n)], labels,
                  [f"/x/i{i}.jpg" for i in range(n)])


@pytest.mark.parametrize("seed", range(6))
def test_rows_average_to_retrieval_metrics_with_ties(seed):
    rng = np.random.default_rng(seed)
    n = 12
    ci = np.sort(rng.integers(0, n, 50))
    ci[:n] = np.arange(n)  # every image has a caption
    ci = np.sort(ci)
    sim = rng.integers(0, 4, (n, ci.size)).astype(np.float64)  # many ties
    pq = per_query(_scores(sim, ci))
    ref = retrieval_metrics(sim, caption_image=ci)
    for d in ("i2t", "t2i"):
        for k in KS:
            assert pq.recall(d, k) == pytest.approx(ref[d][f"R@{k}"], abs=1e-9)
    assert np.array_equal(pq.t2i["rank"], ranks_t2i(sim, ci) + 1)
    assert np.array_equal(pq.i2t["rank"], ranks_i2t(sim, ci) + 1)
    # top-1 is the ground truth exactly when it ranks first
    assert np.array_equal(pq.t2i["top1"] == ci, pq.t2i["rank"] == 1)
    assert np.array_equal(ci[pq.i2t["top1"]] == np.arange(n), pq.i2t["rank"] == 1)
    assert np.all(ci[pq.i2t["best_caption"]] == np.arange(n))


def test_ceiling_and_duplicate_groups():
    caps = ["a", "a", "b", "c", "d", "d  ", "e", "f"]
    ci = np.array([0, 1, 0, 1, 2, 3, 2, 3])
    ce = caption_ceiling(caps, ci, 4)
    assert ce["n_distinct"] == 6
    assert 0 < ce["mR"] < 100
    # t2i: the four captions of the strings "a" and "d" tie two images each (0.5), the other four are sure
    assert ce["t2i"]["R@1"] == pytest.approx(75.0)
    distinct = caption_ceiling([str(j) for j in range(8)], ci, 4)
    assert distinct["mR"] == 100.0
    pq = per_query(_scores(np.random.default_rng(0).random((4, 8)), ci, caps))
    assert pq.dup_group.tolist() == [0, 0, 1, 2, 3, 3, 4, 5]
    assert pq.dup_size.tolist() == [2, 2, 1, 1, 2, 2, 1, 1]


@needs_shared()
def test_ucm_val_ceiling_is_73_05():
    from rsviewer.data import load_dataset

    sub = load_dataset(UCM_JSON).split("val")
    caps, ci = sub.flat_captions()
    ce = caption_ceiling(caps, ci, len(sub))
    assert ce["n_distinct"] == 391 and round(ce["mR"], 2) == 73.05


def test_class_recall_confusion_and_compare():
    rng = np.random.default_rng(3)
    n = 9
    ci = np.repeat(np.arange(n), 5)
    sim = rng.random((n, 5 * n))
    a = per_query(_scores(sim, ci))
    b = per_query(_scores(sim + rng.normal(0, 0.3, sim.shape), ci))
    labels = [f"L{i % 3}" for i in range(n)]
    for d in ("t2i", "i2t"):
        rec = class_recall(a, d, 5)
        weights = [labels.count(lab) for lab in rec]
        assert np.average(list(rec.values()), weights=weights) == pytest.approx(a.recall(d, 5))
        names, mat = confusion(a, d)
        assert names == ["L0", "L1", "L2"] and mat.sum() == (5 * n if d == "t2i" else n)
    t = compare_table(a, b)
    assert np.allclose(t["rank_diff"], np.asarray(t["b_exp_rank"]) - np.asarray(t["a_exp_rank"]))
    assert np.all(np.asarray(compare_table(a, a)["rank_diff"]) == 0)
    single = per_query_table(a)
    assert len(single["direction"]) == 5 * n + n and "rank_diff" not in single


def test_parquet_roundtrip_and_guard(tmp_path):
    import pyarrow.parquet as pq_

    rng = np.random.default_rng(1)
    ci = np.repeat(np.arange(4), 5)
    table = per_query_table(per_query(_scores(rng.random((4, 20)), ci)))
    out = write_table(table, tmp_path / "pq.parquet", {"models": ["m"]})
    back = pq_.read_table(out)
    assert back.column_names == list(table) and back.num_rows == 24
    assert back.column("rank").to_pylist() == table["rank"]
    assert json.loads(back.schema.metadata[b"models"]) == ["m"]
    write_table(table, out)  # ours: may be replaced
    (tmp_path / "x.parquet").write_bytes(b"not parquet")
    with pytest.raises(RsviewerError, match="not written by rsviewer"):
        write_table(table, tmp_path / "x.parquet")
    with pytest.raises(RsviewerError, match=".csv or .parquet"):
        write_table(table, tmp_path / "x.xlsx")


@needs_shared(GALLERY_JSON)
def test_index_scores_equal_dataset_scores(default_model, small_gallery, small_index):
    data, images = small_gallery
    a = score_dataset(default_model, str(data), "val", images=str(images))
    b = score_index(default_model, small_index)
    assert a.ids == [it["id"] for it in small_index.items] and a.captions == b.captions
    assert np.allclose(a.sim, b.sim, atol=1e-5)
    import rsviewer as rv

    pa, pb = per_query(a.reranked("smr")), rv.evaluate_per_query(default_model, small_index, rerank="smr")
    assert pa.metrics["mR"] == pytest.approx(pb.metrics["mR"], abs=0.01)


@needs_shared(GALLERY_JSON)
def test_pairwise_model_scores_every_pair_with_progress_and_cancel(small_gallery, tmp_path):
    import torch

    from rsviewer.archs.registry import create_model
    from rsviewer.retrieval.evaluate import similarity_matrix
    from rsviewer.retrieval.index import build_index, state_tensors
    from test_mssa import TINY

    torch.manual_seed(0)
    model = create_model("mssa", **TINY).eval()
    data, images = small_gallery
    tiny = tmp_path / "tiny.json"
    tiny.write_text(json.dumps({"images": json.loads(data.read_text())["images"][:6]}))
    index = build_index(model, tiny, tmp_path / "idx", images=images)
    seen = []
    s = score_index(model, index, "mr", progress=lambda d, t, m: seen.append(m))
    assert "scoring every image-caption pair" in seen
    from rsviewer.retrieval.evaluate import encode_texts

    ref = similarity_matrix(model, state_tensors(index, np.arange(len(index))), encode_texts(model, index.captions))
    assert np.allclose(s.sim, ref, atol=1e-6)
    assert per_query(s).metrics["mR"] >= 0
    # the app keeps a pairwise model's full matrix on disk (scoring every pair is the slow part)
    from rsviewer.gui import evaluate_view

    assert evaluate_view._pairwise_from_disk(model, index) is None
    evaluate_view._pairwise_to_disk(model, index, s)
    again = evaluate_view._pairwise_from_disk(model, index)
    assert np.array_equal(again.sim, s.sim) and again.captions == s.captions
    stop = threading.Event()

    def progress(d, t, m):
        if m.startswith("scoring"):
            stop.set()

    with pytest.raises(Cancelled):
        score_index(model, index, progress=progress, cancel=stop)


def test_no_captions_is_a_clear_error():
    from rsviewer.retrieval.per_query import _check_truth

    with pytest.raises(RsviewerError, match="no captions"):
        _check_truth(3, [], np.zeros(0, np.int64), "this gallery")
    with pytest.raises(RsviewerError, match="1 of 3 images have no caption"):
        _check_truth(3, ["a", "b"], np.array([0, 1]), "this gallery")


def test_seen_in_training_reads_the_models_train_split(tmp_path):
    import json
    from types import SimpleNamespace

    from rsviewer.retrieval.per_query import seen_in_training, trained_splits

    (tmp_path / "metrics.json").write_text(json.dumps({"train_split": "train+val"}))
    model = SimpleNamespace(model_dir=tmp_path)
    assert trained_splits(model) == {"train", "val"}
    assert seen_in_training(model, ["val", "val", None]) == ["val"]
    assert seen_in_training(model, ["test"]) == []
    (tmp_path / "metrics.json").write_text(json.dumps({"train_split": "train", "saw_val": False}))
    assert seen_in_training(model, ["val"]) == []
    assert seen_in_training(SimpleNamespace(model_dir=None), ["train"]) == []  # unknown: no claim


def test_eval_warns_when_the_split_was_trained_on(tmp_path):
    import subprocess
    import sys

    gallery = Path(__file__).resolve().parents[1] / "assets" / "gallery"
    meta = json.loads((gallery / "gallery.json").read_text())
    meta["images"] = meta["images"][:12]  # a few val images of the demo gallery are enough
    (tmp_path / "val12.json").write_text(json.dumps(meta))
    out = subprocess.run([sys.executable, "-m", "rsviewer", "eval", "--model", "default", "--data",
                          str(tmp_path / "val12.json"), "--images", str(gallery / "images"),
                          "--split", "val", "--json"], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    assert "warning: default was trained on train+val: its val figures are not held-out" in out.stderr
