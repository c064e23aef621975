"""Explanations: every method on the default model (shapes, [0, 1] ranges, query
dependence), every method on every architecture either works or says NotAvailable,
a constructed mosaic where the map must find the tennis court, overlays/PNGs, the CLI
and the faithfulness evaluation's JSON. Fast: small inputs, few channels, few steps."""
from __future__ import annotations

import importlib
import json
import threading

import numpy as np
import pytest
import torch
from PIL import Image

from rsviewer.errors import Cancelled, ImageError, NotAvailable, QueryError
from rsviewer.explain import (
    METHODS,
    Explanation,
    available_methods,
    explain,
    gradcam_layer_names,
    map_stats,
)
from rsviewer.explain.overlay import COLORMAPS, overlay, render_png

from conftest import REPO, UCM_JSON, needs_shared

UCM_IMAGES = UCM_JSON.parent / "images"
DEFAULT_DIR = REPO / "models" / "default"
needs_default = pytest.mark.skipif(not (DEFAULT_DIR / "config.json").exists(), reason="models/default not available")
FAST = {"scorecam": {"channels": 4, "batch_size": 4}, "words": {"steps": 8}}


def _opts(method: str) -> dict:
    return dict(FAST.get(method, {}))


@pytest.fixture(scope="module")
def default_model():
    if not (DEFAULT_DIR / "config.json").exists():
        pytest.skip("models/default not available")
    from rsviewer.checkpoint import load_model

    return load_model(DEFAULT_DIR)


def _tile(name: str = "2081.jpg") -> Image.Image:
    p = UCM_IMAGES / name
    if p.exists():
        return Image.open(p).convert("RGB")
    g = np.random.default_rng(0)  # no shared data: a textured stand-in
    return Image.fromarray(g.integers(0, 256, (256, 256, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def image() -> Image.Image:
    # non-square on purpose: maps must come back at the image's own (W, H)
    return _tile().crop((0, 0, 256, 200))


def _check(ex: Explanation, img: Image.Image, method: str) -> None:
    assert ex.method == method
    assert ex.image.size == img.size and ex.image.mode == "RGB"
    assert np.isfinite(ex.score)
    if method == "words":
        assert ex.heatmap is None
        assert ex.words and ex.word_weights is not None
        ww = np.asarray(ex.word_weights)
        assert ww.shape[-1] == len(ex.words)
        if ww.ndim == 2:
            assert ex.word_rows is not None and len(ex.word_rows) == ww.shape[0]
        assert np.all(np.isfinite(ww)) and ww.min() >= 0 and ww.max() <= 1.0 + 1e-6
        assert not any(w in ("[CLS]", "[SEP]", "[PAD]") for w in ex.words)
        return
    h = ex.heatmap
    assert isinstance(h, np.ndarray) and h.dtype == np.float32
    assert h.shape == (img.size[1], img.size[0])
    assert np.all(np.isfinite(h)) and h.min() >= 0.0 and h.max() <= 1.0
    for name, g in ex.grids.items():
        assert g.ndim == 3 and g.min() >= 0.0 and g.max() <= 1.0, name
    for name, ws in ex.grid_words.items():
        assert len(ws) == len(ex.grids[name])


# ---- the default model ---------------------------------------------------------------------------
def test_available_methods_default(default_model):
    av = available_methods(default_model)
    assert set(av) <= set(METHODS)
    assert {"gradcam", "gradcam++", "scorecam", "patch", "words"} <= set(av)
    assert gradcam_layer_names(default_model)[0] == "backbone.head"


@pytest.mark.parametrize("method", METHODS)
def test_every_method_on_default(default_model, image, method):
    if method not in available_methods(default_model):
        with pytest.raises(NotAvailable, match=r"\w"):
            explain(default_model, image, "three tennis courts", method)
        return
    ex = explain(default_model, image, "three tennis courts surrounded by trees", method, **_opts(method))
    _check(ex, image, method)
    if method in ("gradcam", "gradcam++", "scorecam", "patch"):
        assert ex.heatmap.max() == pytest.approx(1.0)
        assert ex.info["grid"] == [8, 8]


def test_maps_change_with_the_text(default_model):
    img = _mosaic()
    a = explain(default_model, img, "two tennis courts", "gradcam")
    b = explain(default_model, img, "a dense forest with green trees", "gradcam")
    assert a.score != b.score
    assert np.abs(a.heatmap - b.heatmap).mean() > 0.02
    pa = explain(default_model, img, "two tennis courts", "patch")
    pb = explain(default_model, img, "a dense forest with green trees", "patch")
    assert np.abs(pa.heatmap - pb.heatmap).mean() > 0.02


def test_layer_choice_and_errors(default_model, image, tmp_path):
    ex = explain(default_model, image, "tennis court", "gradcam", layer="backbone.s16")
    assert ex.layer == "backbone.s16" and ex.info["grid"] == [16, 16]
    ex = explain(default_model, image, "tennis court", "gradcam", layer="backbone._blocks.10")  # any module path
    assert ex.layer == "backbone._blocks.10"
    with pytest.raises(QueryError, match="unknown layer"):
        explain(default_model, image, "tennis court", "gradcam", layer="nope")
    with pytest.raises(QueryError, match="unknown method"):
        explain(default_model, image, "tennis court", "lime")
    with pytest.raises(QueryError, match="empty"):
        explain(default_model, image, "   ", "gradcam")
    with pytest.raises(QueryError):
        explain(default_model, image, None, "gradcam")
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"not an image")
    with pytest.raises(ImageError):
        explain(default_model, bad, "tennis court", "gradcam")


def test_image_path_and_image_query(default_model):
    p = UCM_IMAGES / "2081.jpg"
    if not p.exists():
        pytest.skip("UCM images not available")
    ex = explain(default_model, p, None, "gradcam", query_image=UCM_IMAGES / "2082.jpg")
    assert ex.text is None and ex.info["query"] == "image"
    assert ex.heatmap.shape == (256, 256)
    same = explain(default_model, p, None, "patch", query_image=p)
    assert same.score == pytest.approx(1.0, abs=1e-4)  # an image against itself
    with pytest.raises(NotAvailable, match="text query"):
        explain(default_model, p, None, "words", query_image=p)


def test_words_integrated_gradients_complete(default_model, image):
    ex = explain(default_model, image, "three tennis courts", "words")
    assert ex.words == ["three", "tennis", "courts"]
    total, expected = ex.info["completeness"]
    assert total == pytest.approx(expected, abs=0.02)  # IG attributions sum to s(x) - s(baseline)
    gxi = explain(default_model, image, "three tennis courts", "words", attribution="gxi")
    assert gxi.info["attribution"] == "gxi" and len(gxi.word_weights) == 3


def test_cancel(default_model, image):
    ev = threading.Event()
    ev.set()
    with pytest.raises(Cancelled):
        explain(default_model, image, "tennis court", "gradcam", cancel=ev)
    calls = []

    class After:  # cancels once Score-CAM has started scoring masked images
        def is_set(self):
            return len(calls) > 0

    with pytest.raises(Cancelled):
        explain(default_model, image, "tennis court", "scorecam", channels=8, batch_size=2,
                progress=lambda d, t, m: calls.append(m) if "score-cam" in m else None, cancel=After())


# ---- a map for a text about a region highlights that region --------------------------------------
def _mosaic(cell=(0, 2), tennis="2082.jpg") -> Image.Image:
    """3×3 mosaic of UCM forest tiles with one real tennis-court tile at ``cell``."""
    data = json.loads(UCM_JSON.read_text()) if UCM_JSON.exists() else None
    if data is None:
        pytest.skip("UCM-Captions not available")
    forests = [i["filename"] for i in data["images"] if i.get("label") == "forest" and i["split"] == "val"][:8]
    out = Image.new("RGB", (768, 768))
    k = 0
    for r in range(3):
        for c in range(3):
            if (r, c) == cell:
                im = _tile(tennis)
            else:
                im = _tile(forests[k])
                k += 1
            out.paste(im.resize((256, 256)), (c * 256, r * 256))
    return out


@needs_shared()
@pytest.mark.parametrize("cell", [(0, 2), (1, 1), (2, 0)])
def test_map_finds_the_tennis_court(default_model, cell):
    """A real UCM tennis-court tile in a 3×3 mosaic of forest tiles: for "tennis court"
    the Grad-CAM and patch maps put their peak and well over chance (1/9) of their mass
    in that cell. Run at 512 px so each tile covers about 5×5 cells of the stride-32 grid."""
    img = _mosaic(cell)
    r, c = cell
    for method in ("gradcam", "patch"):
        h = explain(default_model, img, "tennis court", method, input_size=512).heatmap
        inside = h[r * 256 : (r + 1) * 256, c * 256 : (c + 1) * 256]
        mass = float(inside.sum() / h.sum())
        assert mass > 2 / 9, f"{method}: {mass:.2f} of the map's mass in the tennis-court cell (chance 0.11)"
        st = map_stats(h)
        assert (st["peak"][1] // 256, st["peak"][0] // 256) == cell, method


# ---- every architecture -----------------------------------------------------------------------------
def _model_dirs():
    """The shipped checkpoints; an exception here is an engine bug and must fail collection,
    not turn into zero cases."""
    from rsviewer.checkpoint import list_models

    dirs = list_models()
    assert dirs, "no model folders found (models/ should ship at least models/default)"
    return dirs


def _check_all_methods(model, img, **extra):
    av = available_methods(model)
    for method in METHODS:
        if method in av:
            ex = explain(model, img, "two tennis courts next to a road", method, **_opts(method), **extra)
            _check(ex, img, method)
        else:
            with pytest.raises(NotAvailable) as e:
                explain(model, img, "two tennis courts next to a road", method, **_opts(method), **extra)
            msg = str(e.value)
            assert msg and "\n" not in msg


@pytest.mark.slow
@pytest.mark.parametrize("folder", _model_dirs(), ids=lambda p: p.name)
def test_every_method_on_every_checkpoint(folder, image, request):
    from rsviewer.checkpoint import load_model

    if folder.resolve() == DEFAULT_DIR.resolve():
        model = request.getfixturevalue("default_model")
    else:  # writes are atomic (a folder swap), so a listed checkpoint that fails to load is a bug
        model = load_model(folder)
    _check_all_methods(model, image, input_size=128)  # small input: the contract, not the quality


TINY_FROM = {"mssa": "test_mssa", "cmer": "test_cmer", "galr": "test_galr", "cmpagl": "test_cmpagl"}


@pytest.mark.slow
@pytest.mark.parametrize("arch", sorted(TINY_FROM))
def test_every_method_on_tiny_architectures(arch, image):
    """Untrained tiny models of each architecture (the configs their own tests use), so
    that the contract holds even before a checkpoint exists."""
    from rsviewer.archs.registry import create_model, list_archs

    assert arch in list_archs(), f"{arch} is missing from the registry"
    tiny = dict(importlib.import_module(TINY_FROM[arch]).TINY)  # the config its own tests use
    torch.manual_seed(0)
    model = create_model(arch, **tiny).eval()
    if arch == "galr":
        model.prepare_training(["two tennis courts next to a road", "a dense forest"], [None, None])
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # IGTA's output projection starts at zero: make every path matter
        for name, p in model.named_parameters():
            if not name.startswith(("backbone.", "text.")):
                p.add_(torch.randn(p.shape, generator=g) * 0.05)
    _check_all_methods(model, image)
    if "tokens" in available_methods(model):
        ex = explain(model, image, "two tennis courts next to a road", "tokens")
        assert set(ex.grids) == {"s8", "s16", "s32"}
        assert all(len(ws) <= 3 for v in ex.grid_words.values() for ws in v)


# ---- overlays and PNGs ------------------------------------------------------------------------------
def test_overlay_colormaps_alpha_contour():
    img = Image.fromarray(np.full((40, 60, 3), 128, np.uint8))
    hm = np.tile(np.linspace(0, 1, 15, dtype=np.float32), (10, 1))  # smaller grid: resized
    assert {"jet", "viridis", "inferno", "gray"} <= set(COLORMAPS)
    for cmap in ("jet", "viridis", "inferno", "gray"):
        out = overlay(img, hm, cmap=cmap, alpha=0.5)
        assert out.size == img.size and out.mode == "RGB"
    a0 = np.asarray(overlay(img, hm, alpha=0.0))
    assert np.array_equal(a0, np.asarray(img))  # opacity 0: the image unchanged
    a1 = np.asarray(overlay(img, hm, cmap="gray", alpha=1.0)).astype(int)
    assert a1[:, 0].max() < 20 and a1[:, -1].min() > 235  # gray: dark → bright
    c = np.asarray(overlay(img, hm, contour=True))
    assert not np.array_equal(c, np.asarray(overlay(img, hm)))
    with pytest.raises(QueryError):
        overlay(img, hm, cmap="nope")
    with pytest.raises(QueryError):
        overlay(img, hm, alpha=1.5)


def _fake(method: str, img: Image.Image) -> Explanation:
    g = np.random.default_rng(0)
    words = ["two", "tennis", "courts"]
    ex = Explanation(method=method, text="two tennis courts", image=img, heatmap=None, score=0.42, layer="x")
    if method == "words":
        ex.words, ex.word_weights = words, np.array([0.1, 1.0, 0.6], np.float32)
        ex.info["signed_word_weights"] = [-0.1, 1.0, 0.6]
    elif method == "words2d":
        ex.method = "words"
        ex.words, ex.word_weights = words, g.random((3, 3)).astype(np.float32)
        ex.word_rows = ["1/1", "1/2", "1/4"]
    else:
        ex.heatmap = g.random((img.size[1], img.size[0])).astype(np.float32)
    if method == "tokens":
        ex.grids = {s: g.random((20, n, n)).astype(np.float32) for s, n in (("s8", 8), ("s16", 4), ("s32", 2))}
        ex.grid_words = {s: [words[:2]] * 20 for s in ex.grids}
    return ex


@pytest.mark.parametrize("method", ["gradcam", "tokens", "words", "words2d"])
def test_render_png(tmp_path, method):
    img = _tile().resize((128, 96))
    ex = _fake(method, img)
    out = render_png(ex, tmp_path / f"{method}.png", cmap="viridis", alpha=0.6, contour=True)
    im = Image.open(out)
    assert im.format == "PNG" and im.mode == "RGB"
    if method == "gradcam":
        assert im.width >= img.width and im.height > img.height  # caption band under the image
    assert not list(tmp_path.glob(".*tmp"))  # written atomically


# ---- CLI ------------------------------------------------------------------------------------------
@pytest.fixture
def cli(monkeypatch, default_model, capsys):
    import rsviewer.cli.explain as cx
    from rsviewer.cli.main import main

    monkeypatch.setattr(cx, "load", lambda args: default_model)

    def run(*argv):
        rc = main(list(argv))
        out = capsys.readouterr()
        return rc, out.out, out.err

    return run


def test_cli_explain_json(cli, tmp_path):
    p = UCM_IMAGES / "2081.jpg"
    if not p.exists():
        pytest.skip("UCM images not available")
    png = tmp_path / "x.png"
    rc, out, _ = cli("explain", "--image", str(p), "--text", "three tennis courts", "--method", "gradcam",
                     "--out", str(png), "--cmap", "inferno", "--alpha", "0.4", "--json", "--quiet")
    assert rc == 0
    obj = json.loads(out)
    assert obj["method"] == "gradcam" and obj["layer"] == "backbone.head"
    assert set(obj["map"]) >= {"min", "max", "mean", "peak", "entropy"} and 0 <= obj["map"]["entropy"] <= 1
    assert isinstance(obj["score"], float)
    assert Image.open(png).format == "PNG"
    rc, out, _ = cli("explain", "--image", str(p), "--text", "three tennis courts", "--method", "words",
                     "--out", str(tmp_path / "w.png"), "--json", "--quiet")
    obj = json.loads(out)
    assert obj["words"] == ["three", "tennis", "courts"] and len(obj["word_weights"]) == 3
    rc, out, _ = cli("explain", "--list", "--json")
    assert "gradcam" in json.loads(out)["methods"]
    rc, _, err = cli("explain", "--image", str(p), "--text", "x", "--method", "tokens", "--out", str(tmp_path / "t.png"), "--quiet")
    assert rc == 2 and err.startswith("error: ") and len(err.strip().splitlines()) == 1


@needs_shared()
def test_cli_explain_eval_structure(cli, tmp_path):
    rc, out, _ = cli("explain-eval", "--data", str(UCM_JSON), "--split", "val", "--n", "4", "--methods", "gradcam", "patch",
                     "--steps", "2", "--input-size", "128", "--json", "--quiet", "--out", str(tmp_path / "f.json"))
    assert rc == 0
    obj = json.loads(out)
    assert obj["n"] == 4 and obj["split"] == "val" and obj["model"] == "default"
    assert set(obj["methods"]) == {"gradcam", "patch", "random"}
    for v in obj["methods"].values():
        assert 0 < v["deletion_auc"] < 2 and 0 < v["insertion_auc"] < 2
        assert len(v["deletion_curve"]) == len(v["insertion_curve"]) == 3
        assert v["deletion_curve"][0] == pytest.approx(1.0) and v["insertion_curve"][-1] == pytest.approx(1.0)
    assert json.loads((tmp_path / "f.json").read_text())["methods"].keys() == obj["methods"].keys()


# ---- faithfulness pieces ----------------------------------------------------------------------------
def test_ranks_auc_baselines():
    from rsviewer.explain.faithfulness import _auc, baseline_images, pixel_ranks

    rng = np.random.default_rng(0)
    h = np.array([[0.1, 0.9], [0.5, 0.5]], np.float32)
    r = pixel_ranks(h, rng)
    assert r[0, 1] == 0 and r[0, 0] == 3 and {r[1, 0], r[1, 1]} == {1, 2}
    assert _auc(np.ones(17)) == pytest.approx(1.0)
    assert _auc(np.linspace(1, 0, 17)) == pytest.approx(0.5)
    arr = rng.integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    for kind in ("blur", "mean"):
        b = baseline_images(arr, kind)
        assert b.shape == arr.shape and b.dtype == np.uint8
        assert b.std() < arr.std()
    with pytest.raises(QueryError):
        baseline_images(arr, "zeros")


# ---- a crash in an architecture's explain_maps is a bug, shown as such -------------------------------
def _lite_with_explain_maps(fn):
    from rsviewer.archs.registry import create_model

    model = create_model("lite", hidden=32, embed_dim=16).eval()
    model.__class__ = type("ProbedLite", (type(model),), {"explain_maps": fn})
    return model


def test_crashing_explain_maps_is_listed_as_broken_with_the_reason(image, monkeypatch, capsys):
    from rsviewer.cli.main import main
    from rsviewer.explain import broken_methods

    def crash(self, pixels, text):
        raise ValueError("shape mismatch in the attention head")

    model = _lite_with_explain_maps(crash)
    assert "attention" not in available_methods(model)
    broken = broken_methods(model)
    assert "attention" in broken and "ValueError: shape mismatch in the attention head" in broken["attention"]
    with pytest.raises(RuntimeError, match="attention is broken"):  # never a quiet NotAvailable
        explain(model, image, "a road", "attention")
    import rsviewer.cli.explain as cli_explain

    monkeypatch.setattr(cli_explain, "load", lambda args: model)
    assert main(["explain", "--list"]) == 0
    out = capsys.readouterr().out
    assert "broken:" in out and "shape mismatch" in out


def test_explain_maps_saying_not_available_is_not_broken(image):
    from rsviewer.explain import broken_methods

    def none(self, pixels, text):
        raise NotAvailable("no maps for this configuration")

    model = _lite_with_explain_maps(none)
    assert broken_methods(model) == {}
    with pytest.raises(NotAvailable):
        explain(model, image, "a road", "attention")
