"""The command line: JSON outputs and one-line errors (exit 2, no traceback)."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import GALLERY_JSON, REPO, UCM_JSON, needs_shared
from rsviewer.cli.main import main


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_help_lists_commands(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    for cmd in ("train", "eval", "index", "search", "classify", "models"):
        assert cmd in out


@needs_shared()
def test_eval_json_schema(capsys, small_gallery):
    data, images = small_gallery
    code, out, _ = run(capsys, "eval", "--model", "default", "--data", str(data), "--images", str(images),
                       "--split", "val", "--json", "--quiet")
    assert code == 0
    res = json.loads(out)
    assert set(res) == {"model", "data", "split", "n_images", "n_captions", "rerank", "i2t", "t2i", "mR"}
    assert set(res["i2t"]) == set(res["t2i"]) == {"R@1", "R@5", "R@10"}
    assert res["n_images"] == 24 and res["n_captions"] == 120
    vals = list(res["i2t"].values()) + list(res["t2i"].values())
    assert res["mR"] == pytest.approx(sum(vals) / 6, abs=0.01)


def test_index_search_classify_json(capsys, tmp_path, small_gallery):
    data, images = small_gallery
    code, out, _ = run(capsys, "index", "--model", "default", "--data", str(data), "--image-dir", str(images),
                       "--out", str(tmp_path / "idx"), "--json", "--quiet")
    assert code == 0 and json.loads(out)["n_images"] == 24
    code, out, _ = run(capsys, "search", "--index", str(tmp_path / "idx"), "--text", "a tennis court", "-k", "4", "--json")
    res = json.loads(out)
    assert code == 0 and len(res["hits"]) == 4 and res["hits"][0]["rank"] == 1
    code, out, _ = run(capsys, "search", "--index", str(tmp_path / "idx"), "--image",
                       res["hits"][0]["path"], "-k", "2", "--json")
    assert code == 0 and json.loads(out)["hits"][0]["path"] == res["hits"][0]["path"]


def test_errors_are_one_line(capsys, tmp_path):
    code, out, err = run(capsys, "eval", "--model", "default", "--data", str(tmp_path / "missing.json"), "--json")
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1
    code, _, err = run(capsys, "search", "--index", str(tmp_path), "--text", "x")
    assert code == 2 and "not an rsviewer index" in err
    code, _, err = run(capsys, "eval", "--model", "nope-model", "--data", str(GALLERY_JSON), "--split", "val")
    assert code == 2 and "not found" in err


@needs_shared()
def test_withheld_test_split_is_a_clear_error(capsys):
    code, _, err = run(capsys, "eval", "--model", "default", "--data", str(UCM_JSON), "--split", "test")
    assert code == 2 and "no 'test' split" in err and "val 210" in err


def test_module_entry_point_no_traceback(tmp_path):
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"")
    p = subprocess.run([sys.executable, "-m", "rsviewer", "search", "--index", str(tmp_path), "--image", str(bad)],
                       capture_output=True, text=True, cwd=REPO, timeout=300)
    assert p.returncode == 2 and "Traceback" not in p.stderr and p.stderr.startswith("error:")


def test_dataset_with_missing_images(capsys, tmp_path):
    d = json.loads(GALLERY_JSON.read_text())
    d["images"] = d["images"][:3] + [{"filename": "not-there.jpg", "split": "val", "sentences": [{"raw": "x"}]}]
    (tmp_path / "d.json").write_text(json.dumps(d))
    code, _, err = run(capsys, "eval", "--model", "default", "--data", str(tmp_path / "d.json"),
                       "--images", str(GALLERY_JSON.parent / "images"), "--split", "val")
    assert code == 2 and "1 of 4 images" in err and "not-there.jpg" in err and err.count("\n") == 1


def test_models_lists_the_cv_estimate_of_a_retrained_model(capsys, tmp_path, monkeypatch):
    """A model retrained on train+val after CV has no val figure; the listing shows its CV
    mR ± SE instead (and a val-selected model keeps its val mR)."""
    import shutil

    root = tmp_path / "models"
    shutil.copytree(REPO / "models" / "default", root / "cvmodel")
    cfg_only = root / "valmodel"
    cfg_only.mkdir()
    shutil.copy(REPO / "models" / "default" / "config.json", cfg_only / "config.json")
    (cfg_only / "metrics.json").write_text(json.dumps({"val": {"mR": 47.25}}))
    met = json.loads((root / "cvmodel" / "metrics.json").read_text())
    met["cv"].update(mR_mean=51.234, mR_se=0.567)
    (root / "cvmodel" / "metrics.json").write_text(json.dumps(met))
    monkeypatch.setenv("RSVIEWER_MODELS", str(root))
    code, out, _ = run(capsys, "models")
    assert code == 0
    lines = {ln.split()[0]: ln for ln in out.splitlines()}
    assert "CV mR  51.23 ± 0.57" in lines["cvmodel"] and "val mR" not in lines["cvmodel"]
    assert "val mR  47.25" in lines["valmodel"]
    code, out, _ = run(capsys, "models", "--json")
    rows = {r["name"]: r for r in json.loads(out)}
    assert rows["cvmodel"]["cv_mR"] == 51.234 and rows["valmodel"]["cv_mR"] is None
