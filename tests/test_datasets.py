"""Dataset loaders on the real public files in ../shared, plus small written ones."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from rsviewer.data import Dataset, Item, load_dataset
from rsviewer.errors import DatasetError

from conftest import SHARED  # noqa: E402  (finds the shared data wherever the clone is)
DATASETS = SHARED / "datasets"
UCM = DATASETS / "ucm-captions" / "dataset_ucm.json"
FORMATS = DATASETS / "caption-formats"

needs_shared = pytest.mark.skipif(not DATASETS.is_dir(), reason="shared data not available")


def _one_line(info) -> str:
    msg = str(info.value)
    assert "\n" not in msg and "Traceback" not in msg
    return msg


def _write_json(path: Path, images) -> Path:
    path.write_text(json.dumps({"images": images}))
    return path


def _entry(name, split="train", caps=("a caption",), label=None):
    e = {"filename": name, "split": split, "sentences": [{"raw": c} for c in caps]}
    if label is not None:
        e["label"] = label
    return e


# --- real files -----------------------------------------------------------------------

@needs_shared
def test_ucm_karpathy():
    ds = load_dataset(UCM)
    assert isinstance(ds, Dataset) and ds.format == "karpathy" and ds.name == "dataset_ucm"
    assert len(ds) == 1890 and ds.splits() == {"train": 1680, "val": 210}
    assert len(set(ds.labels())) == 21 and None not in ds.labels()
    first = ds[0]
    assert isinstance(first, Item) and first.id == "1.jpg" and first.label == "agricultural"
    assert first.captions[0] == "There is a piece of formland"
    assert all(len(it.captions) == 5 for it in ds)
    assert first.image == (UCM.parent / "images" / "1.jpg").resolve()  # <json>/images/
    assert first.image.is_absolute() and ds.images_dir == UCM.parent.resolve() / "images"
    caps, idx = ds.flat_captions()
    assert len(caps) == 9450 and idx.shape == (9450,) and idx.dtype == np.int64
    assert idx[0] == 0 and idx[5] == 1 and idx[-1] == 1889
    assert ds["1.jpg"] is first
    ds.check_images()  # the real images are all there


@needs_shared
def test_ucm_split():
    # (load speed is not asserted here: a timed test fails on a busy machine)
    ds = load_dataset(UCM, split="val")
    assert len(ds) == 210 and set(ds.splits()) == {"val"}
    assert load_dataset(UCM).split("all").splits() == {"train": 1680, "val": 210}
    with pytest.raises(DatasetError, match=r"no 'test' split \(available: train 1680, val 210\)") as info:
        load_dataset(UCM, split="test")
    _one_line(info)


@needs_shared
def test_sydney_karpathy_tokens_and_three_splits():
    ds = load_dataset(FORMATS / "dataset_sydney.json")
    assert ds.format == "karpathy" and len(ds) == 613
    assert ds.splits() == {"train": 497, "val": 58, "test": 58}
    assert ds[0].id == "1.tif" and ds[0].label is None
    assert ds[0].captions[0] == "A residential area with houses arranged neatly ."
    # no images/ next to it: the JSON's own folder
    assert ds[0].image == FORMATS.resolve() / "1.tif"
    with pytest.raises(DatasetError, match=r"613 of 613 images listed in dataset_sydney.json are missing"):
        ds.check_images()


@needs_shared
@pytest.mark.parametrize("target", ["", "train_caps.txt", "test_filename.txt", "rsitmd_splits_vocab.json"])
def test_rsitmd_precomp(target):
    ds = load_dataset(FORMATS / "rsitmd_precomp" / target)
    assert ds.format == "precomp" and ds.name == "rsitmd_precomp"
    assert ds.splits() == {"train": 4291, "test": 452} and len(ds) == 4743
    test = ds.split("test")
    assert test[0].id == "boat_0.tif" and test[0].label == "boat"  # test: a line per caption
    assert test[0].captions[0] == ("Two large ships loaded with cargo were moored on both "
                                   "sides of the gray port.")
    assert ds[0].id == "baseballfield_452.tif" and ds[0].label == "baseballfield"
    assert all(len(it.captions) == 5 for it in ds)  # blank caption lines keep their place
    assert len(set(ds.labels())) == 33 and ds[0].image is None
    caps, idx = ds.flat_captions()
    assert len(caps) == 23715 and idx.shape == (23715,)
    with pytest.raises(DatasetError, match="pass --images DIR"):
        ds.check_images()


@needs_shared
def test_rsicd_precomp():
    ds = load_dataset(FORMATS / "rsicd_precomp")
    assert ds.splits() == {"train": 9828, "test": 1093}
    assert ds[0].id == "airport_1.jpg" and ds[0].label == "airport"
    assert ds[0].captions[0] == "many planes are parked next to a long building in an airport ."
    assert ds["00001.jpg"].label is None  # no "<class>_<n>" pattern → no label
    caps, idx = ds.flat_captions()
    assert idx.shape == (54605,) and idx[-1] == len(ds) - 1


@needs_shared
def test_rsitmd_csv():
    ds = load_dataset(FORMATS / "RSITMD.csv")
    assert ds.format == "csv" and ds.name == "RSITMD" and len(ds) == 4743
    assert ds.splits() == {"train": 3432, "val": 859, "test": 452}
    first = ds[0]
    assert first.id == "stadium_4272.tif" and first.label == "stadium" and len(first.captions) == 5
    assert first.captions[0].startswith("Many buildings and some green trees are surrounded")
    assert len(set(ds.labels())) == 33
    assert ds.flat_captions()[1].shape == (23715,)


@needs_shared
def test_folder_of_real_images():
    ds = load_dataset(UCM.parent / "images")
    assert ds.format == "folder" and ds.name == "images" and len(ds) == 1890
    assert [it.id for it in ds.items[:3]] == ["1.jpg", "2.jpg", "3.jpg"]  # numeric order
    assert ds.splits() == {"": 1890} and ds[0].captions == [] and ds[0].label is None
    assert ds.flat_captions()[1].shape == (0,)


# --- image folder resolution ------------------------------------------------------------

def test_images_resolution_order(tmp_path):
    js = _write_json(tmp_path / "d.json", [_entry("a.jpg")])
    assert load_dataset(js)[0].image == tmp_path.resolve() / "a.jpg"  # 3. the JSON's folder
    (tmp_path / "images").mkdir()
    assert load_dataset(js)[0].image == tmp_path.resolve() / "images" / "a.jpg"  # 2. images/
    other = tmp_path / "elsewhere"
    other.mkdir()
    ds = load_dataset(js, images=other)  # 1. the argument
    assert ds[0].image == other.resolve() / "a.jpg" and ds.images_dir == other.resolve()
    with pytest.raises(DatasetError, match="image folder not found"):
        load_dataset(js, images=tmp_path / "nope")


def test_check_images_and_with_images(tmp_path):
    imgs = tmp_path / "images"
    imgs.mkdir()
    names = [f"{i}.jpg" for i in range(6)]
    for n in names[:2]:
        Image.new("RGB", (4, 4)).save(imgs / n)
    js = _write_json(tmp_path / "mine.json", [_entry(n) for n in names])
    ds = load_dataset(js)
    with pytest.raises(DatasetError) as info:
        ds.check_images()
    msg = _one_line(info)
    assert msg.startswith("4 of 6 images listed in mine.json are missing")
    assert "(first: 2.jpg, 3.jpg, 4.jpg, …); pass --images DIR" in msg
    full = tmp_path / "full"
    full.mkdir()
    for n in names:
        (full / n).write_bytes(b"x")
    moved = ds.with_images(full)
    moved.check_images()
    assert moved[5].image == full.resolve() / "5.jpg" and ds[5].image == imgs.resolve() / "5.jpg"


def test_karpathy_filepath_tokens_and_label(tmp_path):
    js = _write_json(tmp_path / "k.json", [
        {"filepath": "val2014", "filename": "x.jpg", "split": "val", "label": "port",
         "sentences": [{"tokens": ["a", "port"]}, {"raw": " two ships \n"}]},
    ])
    it = load_dataset(js)[0]
    assert it.id == "val2014/x.jpg" and it.image == tmp_path.resolve() / "val2014" / "x.jpg"
    assert it.captions == ["a port", "two ships"] and it.label == "port" and it.split == "val"


# --- precomp / csv written here -----------------------------------------------------------

def test_precomp_images_folder_and_label_rule(tmp_path):
    d = tmp_path / "pre"
    (d / "images").mkdir(parents=True)
    (d / "train_caps.txt").write_text("a\nb\nc\nd\n")
    (d / "train_filename.txt").write_text("dense_residential_3.jpg\nphoto.jpg\n")
    (d / "val_caps.txt").write_text("v1\nv2\nv3\n")
    (d / "val_filename.txt").write_text("x_1.jpg\nx_1.jpg\ny_2.jpg\n\n")
    ds = load_dataset(d)
    assert ds.splits() == {"train": 2, "val": 2}
    assert ds[0].captions == ["a", "b"] and ds[0].label == "dense_residential"
    assert ds[1].label is None and ds[0].image == (d / "images").resolve() / "dense_residential_3.jpg"
    assert ds["x_1.jpg"].captions == ["v1", "v2"] and ds["y_2.jpg"].captions == ["v3"]


def test_precomp_errors(tmp_path):
    d = tmp_path / "pre"
    d.mkdir()
    (d / "train_caps.txt").write_text("a\nb\nc\n")
    with pytest.raises(DatasetError, match="no train_filename.txt"):
        load_dataset(d)
    (d / "train_filename.txt").write_text("p_1.jpg\nq_2.jpg\n")
    with pytest.raises(DatasetError, match="not a multiple"):
        load_dataset(d)
    (d / "train_caps.txt").write_text("a\nb\nc\nd\n")
    (d / "train_filename.txt").write_text("p_1.jpg\np_1.jpg\n")
    with pytest.raises(DatasetError, match="duplicate image id 'p_1.jpg'") as info:
        load_dataset(d)
    _one_line(info)


def test_csv_written(tmp_path):
    p = tmp_path / "t.csv"
    p.write_text(
        ",filename,img_id,split,label,sent_id,sentence\n"
        "0,a_1.tif,0,train,a,\"[0, 1]\",\"['one, with comma', \"\"it's two\"\"]\"\n"
        "1,b_1.tif,1,test,b,\"[2]\",\"['three']\"\n"
    )
    ds = load_dataset(p)
    assert ds.format == "csv" and ds.splits() == {"train": 1, "test": 1}
    assert ds[0].captions == ["one, with comma", "it's two"] and ds[1].label == "b"


def test_csv_never_evaluates(tmp_path):
    p = tmp_path / "evil.csv"
    p.write_text("filename,sentence\nx.jpg,\"[__import__('os').system('echo hi')]\"\n")
    with pytest.raises(DatasetError, match="cannot parse the caption list"):
        load_dataset(p)


def test_csv_missing_columns(tmp_path):
    p = tmp_path / "bad.csv"
    p.write_text("name,text\nx.jpg,hello\n")
    with pytest.raises(DatasetError, match="lacks the columns filename, sentence") as info:
        load_dataset(p)
    _one_line(info)


# --- folder of images -----------------------------------------------------------------------

def test_folder_with_class_subfolders(tmp_path):
    root = tmp_path / "scenes"
    for cls, names in {"forest": ["2.png", "10.png"], "beach": ["a.jpg"]}.items():
        (root / cls).mkdir(parents=True)
        for n in names:
            Image.new("RGB", (4, 4)).save(root / cls / n)
    (root / "beach" / "deep").mkdir()
    Image.new("RGB", (4, 4)).save(root / "beach" / "deep" / "b.TIF")
    Image.new("RGB", (4, 4)).save(root / "loose.png")
    (root / ".hidden").mkdir()
    Image.new("RGB", (4, 4)).save(root / ".hidden" / "h.png")
    Image.new("RGB", (4, 4)).save(root / "forest" / ".dot.png")
    (root / "readme.txt").write_text("not an image")
    ds = load_dataset(root)
    assert ds.format == "folder" and ds.name == "scenes"
    assert [it.id for it in ds] == ["beach/a.jpg", "beach/deep/b.TIF", "forest/2.png",
                                    "forest/10.png", "loose.png"]
    assert ds.labels() == ["beach", "beach", "forest", "forest", None]
    assert all(it.image.is_file() and it.captions == [] and it.split == "" for it in ds)
    ds.check_images()


def test_empty_folder(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.txt").write_text("x")
    with pytest.raises(DatasetError, match="no images found in") as info:
        load_dataset(tmp_path / "docs")
    _one_line(info)


# --- errors -----------------------------------------------------------------------------------

def test_missing_path(tmp_path):
    with pytest.raises(DatasetError, match="dataset not found: .*nope.json"):
        load_dataset(tmp_path / "nope.json")


def test_invalid_json_says_line_and_column(tmp_path):
    p = tmp_path / "broken.json"
    p.write_text('{"images": [\n  {"filename": "a.jpg",,}\n]}')
    with pytest.raises(DatasetError, match=r"broken.json is not valid JSON \(.* line 2, column \d+\)") as info:
        load_dataset(p)
    _one_line(info)


def test_binary_json(tmp_path):
    p = tmp_path / "bin.json"
    p.write_bytes(b"\xff\xfe\x00garbage\x80")
    with pytest.raises(DatasetError, match="bin.json"):
        load_dataset(p)


def test_json_without_images(tmp_path):
    p = tmp_path / "anno.json"
    p.write_text('[{"caption": "x", "jpg_name": "a.jpg"}]')
    with pytest.raises(DatasetError, match='anno.json has no "images" list'):
        load_dataset(p)


def test_item_without_filename(tmp_path):
    p = _write_json(tmp_path / "nofile.json", [_entry("a.jpg"), {"split": "train", "sentences": []}])
    with pytest.raises(DatasetError, match="item 1 of nofile.json has no filename"):
        load_dataset(p)


def test_duplicate_ids(tmp_path):
    p = _write_json(tmp_path / "dup.json", [_entry("a.jpg"), _entry("b.jpg"), _entry("a.jpg", "val")])
    with pytest.raises(DatasetError, match=r"duplicate image id 'a.jpg' in dup.json \(items 0 and 2\)"):
        load_dataset(p)


def test_unknown_format(tmp_path):
    p = tmp_path / "notes.txt"
    p.write_text("just some text\n")
    with pytest.raises(DatasetError, match="not a known dataset format"):
        load_dataset(p)


def test_empty_split_name_lists_available(tmp_path):
    ds = load_dataset(_write_json(tmp_path / "s.json", [_entry("a.jpg"), _entry("b.jpg", "")]))
    assert ds.splits() == {"train": 1, "": 1}
    with pytest.raises(DatasetError, match=r"available: train 1, unsplit 1"):
        ds.split("val")
