"""int8 towers (rsviewer.runtime.quantize): faithful on real images, cached, rebuilt when
damaged, refused when unfaithful, and refused in one line where they cannot run."""
from __future__ import annotations

import json
import logging

import numpy as np
import pytest

from rsviewer.errors import RsviewerError
from rsviewer.runtime import quantize
from rsviewer.runtime import export as rexport
from rsviewer.runtime.towers import Towers

from test_cli import run
from test_runtime import Tiny, _cos, _pixels


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("RSVIEWER_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "onnx"


def test_int8_index_of_real_images_agrees_with_fp32(default_model, small_gallery, tmp_path):
    from rsviewer.retrieval.index import build_index, load_index

    data, images = small_gallery
    ref = build_index(default_model, data, images=str(images), precision="fp32")
    got = build_index(default_model, data, tmp_path / "idx8", images=str(images), precision="int8")
    assert got.meta["precision"] == {"image": "int8", "text": "int8"}
    assert load_index(tmp_path / "idx8").meta["precision"] == {"image": "int8", "text": "int8"}
    assert "precision" not in ref.meta
    cos_i = np.sum(ref.image_emb * got.image_emb, 1)
    cos_t = np.sum(ref.caption_emb * got.caption_emb, 1)
    assert cos_i.mean() >= 0.99 and cos_i.min() >= 0.95, (cos_i.mean(), cos_i.min())
    assert cos_t.mean() >= 0.99 and cos_t.min() >= 0.95, (cos_t.mean(), cos_t.min())
    assert cos_i.max() < 0.99999  # it did run another graph, not the float32 one
    # every caption's top-5 images: nearly the same lists (UCM's templated captions tie a lot)
    top = lambda ix: np.argsort(-(ix.caption_emb @ ix.image_emb.T), 1, kind="stable")[:, :5]
    overlap = np.mean([len(set(a) & set(b)) / 5 for a, b in zip(top(ref), top(got))])
    assert overlap >= 0.9, overlap
    # the sidecars record the recipe and the fidelity checked at quantization
    tw = Towers(default_model, "onnx", "int8")
    tw.text_states(["a river"] * 5)
    fid = tw.info()["int8"]["text"]["fidelity"]["emb"]
    assert fid["mean_cos"] >= quantize.MIN_MEAN_COS and fid["rows"] >= 8


def test_int8_cache_hit_skips_quantizing_and_damage_rebuilds(cache, tmp_path, monkeypatch, caplog):
    work = tmp_path / "cwd"
    work.mkdir()
    monkeypatch.chdir(work)  # quantizing writes into the cache only, never the current folder
    m = Tiny()
    tw = Towers(m, "onnx", "int8")
    x = _pixels(m, 4)
    got = tw.image_states(x)["emb"]
    assert tw.precisions()["image"] == "int8", tw.int8
    assert _cos(got, m.image_states(x)["emb"]) >= 0.95
    fp32, _ = rexport.cached_tower(m, "image", 32)
    path, side = quantize.int8_paths(fp32)
    assert path.exists() and json.loads(side.read_text())["status"] == "ok"

    def boom(*a, **k):
        raise AssertionError("quantized again on a cache hit")

    real = quantize.build_int8
    monkeypatch.setattr(quantize, "build_int8", boom)
    Towers(m, "onnx", "int8").image_states(x)
    monkeypatch.setattr(quantize, "build_int8", real)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size: only the sha256 sees it
    path.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING, logger="rsviewer.runtime"):
        tw2 = Towers(m, "onnx", "int8")
        tw2.image_states(x)
    assert "damaged" in caplog.text and tw2.precisions()["image"] == "int8"
    assert rexport._sha256(path) == json.loads(side.read_text())["sha256"]  # rebuilt, not left damaged
    assert not list(work.iterdir())


def test_unfaithful_int8_is_refused_and_runs_fp32(cache, monkeypatch, caplog):
    m = Tiny(seed=1)
    monkeypatch.setattr(quantize, "MIN_MEAN_COS", 1.0001)  # no int8 graph can pass this
    with caplog.at_level(logging.WARNING, logger="rsviewer.runtime"):
        tw = Towers(m, "onnx", "int8")
        got = tw.text_states(["a river", "two planes", "a farm", "many cars", "a road"])["emb"]
    assert tw.precisions()["text"] == "fp32" and "differs from float32" in tw.int8["text"]["reason"]
    assert "runs in float32" in caplog.text
    assert _cos(got, m.text_states(["a river", "two planes", "a farm", "many cars", "a road"])["emb"]) >= 0.9999
    fp32, _ = rexport.cached_tower(m, "text")
    path, side = quantize.int8_paths(fp32)
    assert not path.exists() and json.loads(side.read_text())["status"] == "mismatch"


def test_int8_needs_a_graph_runtime(default_model, small_gallery, tmp_path, capsys):
    from rsviewer.retrieval.index import build_index

    data, images = small_gallery
    with pytest.raises(RsviewerError, match="int8"):
        build_index(default_model, data, tmp_path / "a", images=str(images), runtime="torch", precision="int8")
    assert not (tmp_path / "a").exists()  # refused before the output folder was claimed
    with pytest.raises(RsviewerError, match="unknown precision"):
        build_index(default_model, data, images=str(images), precision="int4")
    code, out, err = run(capsys, "index", "--model", "default", "--data", str(data), "--image-dir", str(images),
                         "--out", str(tmp_path / "b"), "--runtime", "torch", "--precision", "int8")
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1 and "int8" in err
    assert not (tmp_path / "b").exists()
