"""Test set-up: headless Qt, a private feature cache, and the shared data when present."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]


def _find_shared() -> Path:
    """The project's shared data: $RSVIEWER_SHARED, ../shared next to the checkout, or
    /work/shared (where this project's machines keep it, so a clone elsewhere still tests
    against the real data). Tests that need it are skipped when none exists."""
    for cand in (os.environ.get("RSVIEWER_SHARED"), REPO.parent / "shared", "/work/shared"):
        if cand and (Path(cand) / "datasets").is_dir():
            return Path(cand)
    return REPO.parent / "shared"


SHARED = _find_shared()
UCM_JSON = SHARED / "datasets" / "ucm-captions" / "dataset_ucm.json"


@pytest.fixture(scope="session", autouse=True)
def _limit_threads():
    # CI has 2 cores; keep torch from oversubscribing them
    import torch

    torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(autouse=True)
def _private_cache(tmp_path_factory, monkeypatch):
    # feature caches of tests never mix with the user's
    monkeypatch.setenv("RSVIEWER_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


def needs_shared(path: Path = UCM_JSON):
    return pytest.mark.skipif(not path.exists(), reason=f"{path} not available")

GALLERY_JSON = REPO / "assets" / "gallery" / "gallery.json"


@pytest.fixture(scope="session")
def default_model():
    """The shipped default model (models/default), loaded once."""
    from rsviewer.checkpoint import load_model

    return load_model("default")


@pytest.fixture(scope="session")
def small_gallery(tmp_path_factory):
    """A 24-image gallery (2 per label for 12 labels) from the bundled demo gallery."""
    import json

    d = json.loads(GALLERY_JSON.read_text())
    seen: dict[str, int] = {}
    keep = []
    for im in d["images"]:
        if seen.get(im["label"], 0) < 2 and len(seen) <= 12:
            seen[im["label"]] = seen.get(im["label"], 0) + 1
            keep.append(im)
        if len(keep) >= 24:
            break
    out = tmp_path_factory.mktemp("gallery") / "small.json"
    out.write_text(json.dumps({"images": keep}))
    return out, GALLERY_JSON.parent / "images"


@pytest.fixture(scope="session")
def small_index(default_model, small_gallery, tmp_path_factory):
    from rsviewer.retrieval.index import build_index

    data, images = small_gallery
    out = tmp_path_factory.mktemp("index") / "idx"
    return build_index(default_model, data, out, images=str(images))


def assert_split_matches_frozen(arch: str, config: dict, x, cached: set[str]) -> None:
    """Partial fine-tuning (``image_train_from``) starts as the frozen model: with equal
    weights the embedding is the same; only the layers past the split train (at 0.1 × lr),
    and ``image_features`` (what the trainer caches) holds just ``cached``."""
    import torch

    from rsviewer.archs.registry import create_model

    torch.manual_seed(0)
    frozen = create_model(arch, **config)
    tuned = create_model(arch, **config, image_train_from="s16")
    tuned.load_state_dict(frozen.state_dict())
    tuned.freeze_bases()
    trained = {n for n, p in tuned.named_parameters() if p.requires_grad}
    assert any(n.startswith("backbone._blocks.15.") for n in trained)
    assert not any(n.startswith("backbone._blocks.10.") for n in trained)
    assert tuned.lr_scales() == {"backbone.": 0.1}
    frozen.eval(), tuned.eval()
    with torch.no_grad():
        assert set(tuned.image_features(x)) == cached
        assert torch.allclose(frozen.encode_image(x), tuned.encode_image(x), atol=1e-5)
