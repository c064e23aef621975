"""Zero-shot classification from sub-folder names."""
from __future__ import annotations

import json
import shutil

import pytest

from conftest import GALLERY_JSON
from rsviewer.errors import DatasetError
from rsviewer.retrieval.classify import classify, split_words


def test_split_words():
    vocab = frozenset({"storage", "tanks", "tennis", "court", "parking", "lot", "mobile", "home", "park", "dense", "residential"})
    assert split_words("storagetanks", vocab) == "storage tanks"
    assert split_words("mobilehomepark", vocab) == "mobile home park"
    assert split_words("dense_residential", vocab) == "dense residential"
    assert split_words("chaparral", vocab) == "chaparral"  # no segmentation: kept
    assert split_words("ParkingLot") == "parking lot"


def test_zero_shot_on_class_folders(default_model, tmp_path):
    d = json.loads(GALLERY_JSON.read_text())
    want = ["airplane", "beach", "forest", "harbor", "runway", "tenniscourt"]
    for im in d["images"]:
        if im["label"] in want and len(list((tmp_path / im["label"]).glob("*"))) < 3:
            (tmp_path / im["label"]).mkdir(exist_ok=True)
            shutil.copy(GALLERY_JSON.parent / "images" / im["filename"], tmp_path / im["label"])
    res = classify(default_model, tmp_path)
    assert res["n"] == 18 and set(res["per_class"]) == set(want)
    assert res["prompts"]["tenniscourt"] == "tennis court"
    assert res["accuracy"] > 100 / 6 * 2  # well above chance (16.7 %)


def test_classify_needs_class_folders(default_model, tmp_path):
    shutil.copy(next((GALLERY_JSON.parent / "images").glob("*.jpg")), tmp_path / "a.jpg")
    with pytest.raises(DatasetError, match="sub-folder per class"):
        classify(default_model, tmp_path)
