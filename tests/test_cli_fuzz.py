"""Every sub-command, run as a user runs it (``python -m rsviewer ...`` in a subprocess), over a
table of bad inputs: missing, empty, zero-byte, corrupt, wrong-type and absurd arguments, and
outputs that would lose data (a user's folder, a file, ``.``, an input, an unwritable path).

Each case must exit 2 with exactly one ``error:`` line, no traceback, and leave every file in
the workspace byte for byte as it was (and no new ones: no ``.*.tmp`` left behind).

Tests run as root here, so a chmod-ed read-only folder would not stop a write: the unwritable
outputs are a path under a regular file and a path in ``/proc`` instead.

Most cases fail in argparse or in the checks that run before torch is imported (well under a
second each); the few that need the engine or a model say so in their id (``engine``).
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import GALLERY_JSON, REPO

IMAGES = GALLERY_JSON.parent / "images"
SUBCOMMANDS = {"train", "eval", "index", "search", "classify", "explain", "explain-eval", "localize", "project",
               "models", "import", "ensemble"}


# ---- the workspace: inputs, a user's folder, files that must survive ----------------------------
@pytest.fixture(scope="module")
def ws(tmp_path_factory) -> Path:
    w = tmp_path_factory.mktemp("fuzz")
    imgs = w / "imgs"
    imgs.mkdir()
    for p in sorted(IMAGES.glob("*.jpg"))[:2]:
        shutil.copy(p, imgs / p.name)
    (w / "data.json").write_text(json.dumps({"images": [
        {"filename": p.name, "split": "val", "sentences": [{"raw": "a picture"}]} for p in sorted(imgs.iterdir())]}))
    keep = w / "keep"  # the user's own folder
    keep.mkdir()
    (keep / "notes.txt").write_text("my notes, not rsviewer's\n")
    (keep / "photo.jpg").write_bytes((imgs / sorted(os.listdir(imgs))[0]).read_bytes())
    (w / "afile.txt").write_text("a user's file\n")
    (w / "empty.json").write_bytes(b"")
    (w / "corrupt.json").write_text("{not json")
    (w / "list.json").write_text("[1, 2, 3]")
    (w / "notimg.jpg").write_text("this is text, not a JPEG")
    (w / "anno.json").write_text(json.dumps([{"caption": "a road", "jpg_name": "x.jpg",
                                              "points": [[0, 0], [10, 0], [10, 10]]}]))
    _fake_index(w / "idx")
    _fake_index(w / "notobj_idx", meta="[1, 2]")
    return w


def _fake_index(folder: Path, meta: str | None = None) -> None:
    """An index rsviewer wrote, for a model nobody has (no model needs to load to use it)."""
    folder.mkdir()
    np.save(folder / "image_emb.npy", np.eye(2, 4, dtype=np.float32))
    np.save(folder / "caption_emb.npy", np.eye(2, 4, dtype=np.float32))
    np.save(folder / "caption_image.npy", np.arange(2, dtype=np.int64))
    (folder / "items.json").write_text(json.dumps([
        {"id": f"{i}", "path": str(p), "label": None, "captions": ["a picture"], "split": "val"}
        for i, p in enumerate(sorted(IMAGES.glob("*.jpg"))[:2])]))
    (folder / "index.json").write_text(meta or json.dumps({
        "format": "rsviewer-index/1", "model": "gone-model", "model_path": "/nowhere/gone-model", "arch": "lite",
        "fingerprint": "0123456789abcdef", "embed_dim": 4, "pairwise": False, "n_images": 2, "n_captions": 2}))


def snapshot(root: Path) -> dict[str, str]:
    out = {}
    for dirpath, dirnames, files in os.walk(root):
        for name in dirnames:
            out[os.path.relpath(os.path.join(dirpath, name), root) + "/"] = "dir"
        for name in files:
            p = os.path.join(dirpath, name)
            out[os.path.relpath(p, root)] = hashlib.sha256(Path(p).read_bytes()).hexdigest()
    return out


def rsviewer(ws: Path, *argv: str, env: dict | None = None) -> subprocess.CompletedProcess:
    e = {**os.environ, "PYTHONPATH": str(REPO), "RSVIEWER_CACHE": str(ws.parent / "cache"), **(env or {})}
    return subprocess.run([sys.executable, "-m", "rsviewer", *argv], cwd=ws, env=e, capture_output=True, text=True,
                          timeout=300)


def assert_one_line_error(p: subprocess.CompletedProcess, expect: str | None = None) -> None:
    errors = [ln for ln in p.stderr.splitlines() if "error:" in ln]
    assert p.returncode == 2, f"exit {p.returncode}\n{p.stderr}"
    assert "Traceback" not in p.stderr, p.stderr
    assert len(errors) == 1 and errors[0].startswith("error: "), p.stderr
    if expect:
        assert expect in errors[0], errors[0]


G = str(GALLERY_JSON)
# (id, argv, a phrase the error line must contain); "engine" in the id: the case imports torch
CASES = [
    # -- absurd and wrong-type numbers: refused by the parser
    ("train-batch-0", ["train", "--arch", "lite", "--data", G, "--out", "new", "--batch-size", "0"], "--batch-size"),
    ("train-epochs-0", ["train", "--arch", "lite", "--data", G, "--out", "new", "--epochs", "0"], "--epochs"),
    ("train-views-0", ["train", "--arch", "lite", "--data", G, "--out", "new", "--views", "0"], "--views"),
    ("train-views-9", ["train", "--arch", "lite", "--data", G, "--out", "new", "--views", "9"], "between 1 and 8"),
    ("train-eval-every-0", ["train", "--arch", "lite", "--data", G, "--out", "new", "--eval-every", "0"], "--eval-every"),
    ("train-max-images-neg", ["train", "--arch", "lite", "--data", G, "--out", "new", "--max-train-images", "-1"],
     "--max-train-images"),
    ("train-lr-neg", ["train", "--arch", "lite", "--data", G, "--out", "new", "--lr", "-0.1"], "--lr"),
    ("train-lr-nan", ["train", "--arch", "lite", "--data", G, "--out", "new", "--lr", "nan"], "finite"),
    ("train-ema-2", ["train", "--arch", "lite", "--data", G, "--out", "new", "--ema", "2"], "--ema"),
    ("train-epochs-text", ["train", "--arch", "lite", "--data", G, "--out", "new", "--epochs", "ten"], "integer"),
    ("eval-batch-0", ["eval", "--data", G, "--batch-size", "0"], "--batch-size"),
    ("eval-rerank-bogus", ["eval", "--data", G, "--rerank", "bogus"], "--rerank"),
    ("index-batch-0", ["index", "--images", "imgs", "--out", "new", "--batch-size", "0"], "--batch-size"),
    ("index-no-out", ["index", "--images", "imgs"], "--out"),
    ("search-k-0", ["search", "--index", "idx", "--text", "x", "-k", "0"], "-k"),
    ("search-k-huge", ["search", "--index", "idx", "--text", "x", "-k", "1e9"], "integer"),
    ("explain-alpha", ["explain", "--image", "imgs/x.jpg", "--text", "x", "--alpha", "1.5", "--out", "o.png"], "--alpha"),
    ("explain-input-size", ["explain", "--image", "imgs/x.jpg", "--text", "x", "--input-size", "0"], "--input-size"),
    ("explain-method", ["explain", "--image", "imgs/x.jpg", "--text", "x", "--method", "nope"], "--method"),
    ("explain-eval-n-0", ["explain-eval", "--data", G, "--n", "0"], "--n"),
    ("explain-eval-steps-neg", ["explain-eval", "--data", G, "--steps", "-3"], "--steps"),
    ("localize-windows", ["localize", "--scene", "imgs/x.jpg", "--text", "x", "--windows", "0"], "--windows"),
    ("localize-max-side", ["localize", "--scene", "imgs/x.jpg", "--text", "x", "--max-side", "0"], "--max-side"),
    ("project-max-points", ["project", "--index", "idx", "--out", "p.csv", "--max-points", "-1"], "--max-points"),
    ("classify-no-images", ["classify"], "--images"),
    ("models-bogus-flag", ["models", "--bogus"], "--bogus"),
    ("import-missing", ["import", "missing.pt", "--name", "m"], "missing.pt"),
    ("import-zero-byte", ["import", "empty.json", "--name", "m"], "empty.json"),
    ("ensemble-bogus-flag", ["ensemble", "--models", "default", "--out", "ens", "--bogus"], "--bogus"),
    ("ensemble-missing-member", ["ensemble", "--models", "nosuchmodel", "--out", "ens"], "nosuchmodel"),
    # -- missing, empty, corrupt, wrong-type inputs
    ("eval-missing-data", ["eval", "--data", "missing.json"], "missing.json"),
    ("eval-zero-byte", ["eval", "--data", "empty.json"], "empty.json"),
    ("eval-corrupt", ["eval", "--data", "corrupt.json"], "corrupt.json"),
    ("eval-json-list", ["eval", "--data", "list.json"], "list.json"),
    ("eval-no-split", ["eval", "--data", "data.json", "--split", "train"], "train"),
    ("index-missing-images", ["index", "--images", "nothere", "--out", "new"], "nothere"),
    ("index-corrupt-data", ["index", "--data", "corrupt.json", "--out", "new"], "corrupt.json"),
    ("train-corrupt-data", ["train", "--arch", "lite", "--data", "corrupt.json", "--out", "new"], "corrupt.json"),
    ("train-engine-unknown-arch", ["train", "--arch", "nope", "--data", G, "--out", "new"], "nope"),
    ("classify-missing", ["classify", "--images", "nothere"], "nothere"),
    ("classify-a-file", ["classify", "--images", "afile.txt"], "afile.txt"),
    ("explain-missing-image", ["explain", "--image", "nothere.jpg", "--text", "x", "--out", "o.png"], "nothere.jpg"),
    ("explain-no-query", ["explain", "--image", "imgs/x.jpg", "--out", "o.png"], "--text"),
    ("explain-eval-corrupt", ["explain-eval", "--data", "corrupt.json"], "corrupt.json"),
    ("localize-nothing", ["localize"], "--scene"),
    ("localize-engine-corrupt-anno", ["localize", "--anno", "corrupt.json"], "corrupt.json"),
    ("localize-engine-missing-scene", ["localize", "--scene", "nothere.jpg", "--text", "x"], "nothere.jpg"),
    ("search-engine-user-folder", ["search", "--index", "keep", "--text", "x"], "not an rsviewer index"),
    ("search-engine-index-not-object", ["search", "--index", "notobj_idx", "--text", "x"], "object"),
    ("search-engine-model-gone", ["search", "--index", "idx", "--text", "x"], "0123456789abcdef"),
    ("project-engine-user-folder", ["project", "--index", "keep", "--out", "p.csv"], "not an rsviewer index"),
    # -- outputs that would lose data or cannot be written: refused before any work
    ("index-out-users-folder", ["index", "--images", "imgs", "--out", "keep"], "not written by rsviewer"),
    ("index-out-users-folder-force", ["index", "--images", "imgs", "--out", "keep", "--force"],
     "not written by rsviewer"),
    ("index-out-file", ["index", "--images", "imgs", "--out", "afile.txt"], "is a file"),
    ("index-out-dot", ["index", "--images", "imgs", "--out", "."], "current folder"),
    ("index-out-parent", ["index", "--images", "imgs", "--out", "..", "--force"], "current folder"),
    ("index-out-is-input", ["index", "--images", "imgs", "--out", "imgs", "--force"], "input"),
    ("index-out-inside-input", ["index", "--images", "imgs", "--out", "imgs/idx"], "inside the input"),
    ("index-out-ours-no-force", ["index", "--images", "imgs", "--out", "idx"], "--force"),
    ("index-out-under-a-file", ["index", "--images", "imgs", "--out", "afile.txt/idx"], "not a folder"),
    ("index-out-proc", ["index", "--images", "imgs", "--out", "/proc/rsviewer-fuzz"], "not writable"),
    ("train-out-users-folder", ["train", "--arch", "lite", "--data", G, "--out", "keep"], "not written by rsviewer"),
    ("train-out-dot", ["train", "--arch", "lite", "--data", G, "--out", ".", "--force"], "current folder"),
    ("train-out-file", ["train", "--arch", "lite", "--data", G, "--out", "afile.txt"], "is a file"),
    ("train-out-index-no-force", ["train", "--arch", "lite", "--data", G, "--out", "idx"], "not model"),
    ("train-out-index-force", ["train", "--arch", "lite", "--data", G, "--out", "idx", "--force"], "not model"),
    ("explain-out-exists", ["explain", "--image", "imgs/x.jpg", "--text", "x", "--out", "afile.txt"], "--force"),
    ("explain-out-folder", ["explain", "--image", "imgs/x.jpg", "--text", "x", "--out", "keep", "--force"], "folder"),
    ("explain-out-is-input", ["explain", "--image", "imgs/x.jpg", "--text", "x", "--out", "imgs/x.jpg", "--force"],
     "input"),
    ("explain-out-under-file", ["explain", "--image", "imgs/x.jpg", "--text", "x", "--out", "afile.txt/o.png"],
     "not a folder"),
    ("explain-eval-out-folder", ["explain-eval", "--data", G, "--out", "keep"], "folder"),
    ("explain-eval-out-proc", ["explain-eval", "--data", G, "--out", "/proc/rsviewer-fuzz.json"], "not writable"),
    ("project-out-exists", ["project", "--index", "idx", "--out", "afile.txt"], "--force"),
    ("project-out-inside-index", ["project", "--index", "idx", "--out", "idx/map.csv"], "inside the input"),
    ("localize-out-is-scene", ["localize", "--scene", "imgs/x.jpg", "--text", "x", "--out", "imgs/x.jpg", "--force"],
     "input"),
    ("localize-out-bad-suffix", ["localize", "--scene", "imgs/x.jpg", "--text", "x", "--out", "o.txt"], "o.txt"),
    ("localize-out-dir-users-folder", ["localize", "--anno", "anno.json", "--out-dir", "keep"],
     "not written by rsviewer"),
    ("localize-out-dir-file", ["localize", "--anno", "anno.json", "--out-dir", "afile.txt"], "is a file"),
]


def _argv(ws: Path, argv: list[str]) -> list[str]:
    first = sorted(os.listdir(ws / "imgs"))[0]
    return [a.replace("imgs/x.jpg", f"imgs/{first}") for a in argv]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_and_loses_nothing(ws, case):
    _, argv, expect = case
    before = snapshot(ws)
    p = rsviewer(ws, *_argv(ws, argv))
    assert_one_line_error(p, expect)
    assert snapshot(ws) == before, "a refused command changed the workspace"


def test_the_table_covers_every_subcommand():
    from rsviewer.cli.main import build_parser

    sub = next(a for a in build_parser()._actions if a.dest == "command")
    assert set(sub.choices) == SUBCOMMANDS, "a new sub-command needs rows in CASES"
    assert {c[1][0] for c in CASES} == SUBCOMMANDS


def test_index_into_a_users_folder_keeps_every_file(ws, tmp_path, default_model):
    """The data-loss regression: ``rsviewer index --images imgs --out keep`` replaced the user's
    ``keep/`` with the index. Now it is refused before the model loads, and the API refuses it
    too, even with overwrite; an index still goes to a new folder, and over itself only with
    overwrite (--force), leaving no temporary folder behind."""
    from rsviewer.errors import OutputError
    from rsviewer.retrieval.index import build_index

    before = snapshot(ws / "keep")
    p = rsviewer(ws, "index", "--images", "imgs", "--out", "keep", "--quiet")
    assert_one_line_error(p, "keep")
    with pytest.raises(OutputError, match="not written by rsviewer"):
        build_index(default_model, ws / "imgs", ws / "keep", overwrite=True)
    assert snapshot(ws / "keep") == before
    out = tmp_path / "fresh"
    build_index(default_model, ws / "imgs", out)
    with pytest.raises(OutputError, match="overwrite=True"):
        build_index(default_model, ws / "imgs", out)
    build_index(default_model, ws / "imgs", out, overwrite=True)
    assert json.loads((out / "index.json").read_text())["n_images"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fresh"]  # no .fresh.*.tmp / .old left


def test_models_listing_skips_broken_folders(ws, tmp_path):
    good = REPO / "models" / "default"
    root = tmp_path / "models"
    shutil.copytree(good, root / "mine", ignore=shutil.ignore_patterns("*.safetensors"))
    (root / "badjson").mkdir()
    (root / "badjson" / "config.json").write_text("{oops")
    (root / "badmetrics").mkdir()
    shutil.copy(good / "config.json", root / "badmetrics" / "config.json")
    (root / "badmetrics" / "metrics.json").write_text("{oops")
    (root / "notobject").mkdir()
    (root / "notobject" / "config.json").write_text("[1, 2]")
    p = rsviewer(ws, "models", "--json", env={"RSVIEWER_MODELS": str(root)})
    assert p.returncode == 0 and "Traceback" not in p.stderr, p.stderr
    names = {r["name"] for r in json.loads(p.stdout)}
    assert "mine" in names and not names & {"badjson", "badmetrics", "notobject"}
    warnings = [ln for ln in p.stderr.splitlines() if ln.startswith("warning:")]
    for bad in ("badjson", "badmetrics", "notobject"):
        assert sum(bad in ln for ln in warnings) == 1, p.stderr


# ---- the error contract of cli/main.py, in process (no subprocess needed) -------------------------
def test_oserror_is_one_line_naming_the_path(monkeypatch, capsys):
    import rsviewer.checkpoint as ck
    from rsviewer.cli.main import main

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device", "/data/models/m/model.safetensors")

    monkeypatch.setattr(ck, "model_summaries", full)
    assert main(["models"]) == 2
    err = capsys.readouterr().err
    assert err == "error: cannot write /data/models/m/model.safetensors: No space left on device\n"


def test_a_bug_keeps_its_traceback_and_asks_for_a_report(monkeypatch, capsys):
    import rsviewer.checkpoint as ck
    from rsviewer.cli.main import main

    monkeypatch.setattr(ck, "model_summaries", lambda *a, **k: 1 / 0)
    assert main(["models"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and "ZeroDivisionError" in err
    assert err.strip().splitlines()[-1].endswith("please report it with the command line and the traceback above")
    assert "error:" not in err  # a bug is not dressed up as a user error


@pytest.mark.parametrize("argv, expect", [
    (["--screenshot", "{ws}/keep.png"], "already exists; pass --force"),
    (["--screenshot", "{ws}/keep.png/x.png"], "is not a folder"),
    (["--screenshot", "{ws}/x.png", "--tab", "bogus"], "--tab must be"),
    (["--screenshot", "{ws}/x.txt"], "name a .png"),
])
def test_screenshot_is_checked_before_any_work(ws, argv, expect):
    """`rsviewer --screenshot` never replaces a file without --force; bad values are one line."""
    keep = ws / "keep.png"
    keep.write_bytes(b"not rsviewer's")
    p = rsviewer(ws, *[a.format(ws=ws) for a in argv])
    assert_one_line_error(p, expect)
    assert keep.read_bytes() == b"not rsviewer's"
    assert not (ws / "x.png").exists()
