"""Loaders and listings that name what is wrong in one line, and an index that finds its model."""
from __future__ import annotations

import json
import shutil

import pytest

from rsviewer.archs.registry import create_model
from rsviewer.checkpoint import load_model, model_summaries, read_config, read_metrics, save_model
from rsviewer.errors import IndexError_, ModelError
from rsviewer.retrieval.index import index_model_dir, model_identity


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("models") / "tiny"
    save_model(create_model("lite", hidden=32, embed_dim=16), folder)
    return folder


def test_json_that_is_not_an_object_is_one_line(tiny_dir, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(tiny_dir, bad)
    (bad / "config.json").write_text("[1, 2]")
    with pytest.raises(ModelError, match="holds a JSON list"):
        read_config(bad)
    (bad / "metrics.json").write_text('"just a string"')
    with pytest.raises(ModelError, match="holds a JSON str"):
        read_metrics(bad)
    (bad / "metrics.json").write_text("{broken")
    with pytest.raises(ModelError, match="not valid JSON"):
        read_metrics(bad)


def test_model_summaries_skip_a_broken_folder_and_name_it(tiny_dir, tmp_path, monkeypatch):
    root = tmp_path / "models"
    shutil.copytree(tiny_dir, root / "good")
    shutil.copytree(tiny_dir, root / "broken")
    (root / "broken" / "metrics.json").write_text("{oops")
    monkeypatch.setenv("RSVIEWER_MODELS", str(root))
    warned = []
    names = {r["name"] for r in model_summaries(warn=warned.append)}
    assert "good" in names and "broken" not in names
    assert len(warned) == 1 and "broken" in warned[0] and "metrics.json" in warned[0]


def test_index_finds_its_model_by_path_then_fingerprint(tiny_dir, tmp_path, monkeypatch):
    meta = model_identity(load_model(tiny_dir))
    assert meta["model_path"] == str(tiny_dir.resolve()) and meta["model"] == "tiny"
    assert index_model_dir(meta) == tiny_dir.resolve()
    # moved into a models folder under another name: found by its fingerprint
    root = tmp_path / "models"
    shutil.copytree(tiny_dir, root / "renamed")
    monkeypatch.setenv("RSVIEWER_MODELS", str(root))
    moved = dict(meta, model_path=str(tmp_path / "gone" / "tiny"))
    assert index_model_dir(moved).name == "renamed"
    # nowhere: the one line names the model, the path and the fingerprint
    shutil.rmtree(root / "renamed")
    with pytest.raises(IndexError_) as e:
        index_model_dir(moved)
    msg = str(e.value)
    assert "'tiny'" in msg and str(tmp_path / "gone" / "tiny") in msg and meta["fingerprint"] in msg and "\n" not in msg


def test_index_json_that_is_not_an_object_is_damaged(small_index, tmp_path):
    from rsviewer.retrieval.index import load_index

    bad = tmp_path / "idx"
    shutil.copytree(small_index.folder, bad)
    (bad / "index.json").write_text(json.dumps(["not", "an", "object"]))
    with pytest.raises(IndexError_, match="must hold an object"):
        load_index(bad)
    (bad / "index.json").write_text((small_index.folder / "index.json").read_text())
    (bad / "items.json").write_text("[1, 2]")
    with pytest.raises(IndexError_, match="list of objects"):
        load_index(bad)
