"""The output guard of rsviewer/utils/atomic.py: what may be replaced, and clean-up on every exit."""
from __future__ import annotations

import json
import os

import pytest

from rsviewer.errors import OutputError
from rsviewer.utils.atomic import (
    MANIFEST,
    atomic_dir,
    check_output_dir,
    check_output_file,
    claim_output_dir,
    rsviewer_kind,
)


def _entries(folder):
    return sorted(p.name for p in folder.iterdir())


def test_absent_and_empty_folders_are_written_and_marked(tmp_path):
    with atomic_dir(tmp_path / "new", kind="overlays") as tmp:
        (tmp / "a.png").write_bytes(b"x")
    assert rsviewer_kind(tmp_path / "new") == "overlays"
    (tmp_path / "empty").mkdir()
    with atomic_dir(tmp_path / "empty") as tmp:
        (tmp / "a.png").write_bytes(b"x")
    assert (tmp_path / "empty" / "a.png").exists()
    assert _entries(tmp_path) == ["empty", "new"]


def test_a_users_folder_is_never_replaced(tmp_path):
    keep = tmp_path / "keep"
    keep.mkdir()
    (keep / "notes.txt").write_text("mine")
    for overwrite in (False, True):
        with pytest.raises(OutputError, match="not written by rsviewer"):
            with atomic_dir(keep, overwrite=overwrite) as tmp:
                (tmp / "x").write_text("y")
    assert _entries(keep) == ["notes.txt"] and (keep / "notes.txt").read_text() == "mine"
    assert _entries(tmp_path) == ["keep"]


def test_rsviewers_own_folder_needs_permission(tmp_path):
    out = tmp_path / "idx"
    out.mkdir()
    (out / "index.json").write_text(json.dumps({"format": "rsviewer-index/1"}))
    with pytest.raises(OutputError, match="already holds an rsviewer index; pass overwrite=True"):
        check_output_dir(out)
    with pytest.raises(OutputError, match="pass --force"):
        check_output_dir(out, flag="--force")
    with atomic_dir(out, overwrite=True) as tmp:
        (tmp / "index.json").write_text(json.dumps({"format": "rsviewer-index/1", "n": 2}))
    assert json.loads((out / "index.json").read_text())["n"] == 2
    with pytest.raises(OutputError, match="holds an rsviewer index, not model"):
        check_output_dir(out, overwrite=True, kind="model")  # --force replaces like with like
    # a tagged file of another format is not rsviewer's
    (out / "index.json").write_text(json.dumps({"format": "someone-else/3"}))
    with pytest.raises(OutputError, match="not written by rsviewer"):
        check_output_dir(out, overwrite=True)


def test_dot_parents_files_and_inputs_are_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "imgs").mkdir()
    (tmp_path / "f.txt").write_text("x")
    with pytest.raises(OutputError, match="current folder"):
        check_output_dir(".", overwrite=True)
    with pytest.raises(OutputError, match="current folder"):
        check_output_dir("..", overwrite=True)
    with pytest.raises(OutputError, match="is a file"):
        check_output_dir("f.txt", overwrite=True)
    with pytest.raises(OutputError, match="not a folder"):
        check_output_dir("f.txt/sub")
    with pytest.raises(OutputError, match="would replace the input"):
        check_output_dir("imgs", overwrite=True, inputs=["imgs"])
    with pytest.raises(OutputError, match="would replace the input"):
        check_output_dir(tmp_path / "elsewhere", inputs=[tmp_path / "elsewhere" / "data.json"])
    with pytest.raises(OutputError, match="inside the input folder"):
        check_output_dir("imgs/idx", inputs=["imgs"])
    with pytest.raises(OutputError, match="not writable"):
        check_output_dir("/proc/rsviewer-test")  # as root, chmod would not stop a write; /proc does
    assert list(tmp_path.glob(".*")) == []  # not even a probe file left


def test_files_overwrite_only_with_permission_and_never_an_input(tmp_path):
    img = tmp_path / "a.png"
    img.write_bytes(b"png")
    with pytest.raises(OutputError, match="already exists; pass --force"):
        check_output_file(img)
    assert check_output_file(img, overwrite=True) == img
    with pytest.raises(OutputError, match="is an input"):
        check_output_file(img, overwrite=True, inputs=[img])
    with pytest.raises(OutputError, match="is a folder"):
        check_output_file(tmp_path, overwrite=True)


@pytest.mark.parametrize("exc", [KeyboardInterrupt, OSError, RuntimeError])
def test_every_exit_path_removes_the_temporary_folder(tmp_path, exc):
    with pytest.raises(exc):
        with atomic_dir(tmp_path / "out") as tmp:
            (tmp / "part.npy").write_bytes(b"half")
            raise exc()
    assert _entries(tmp_path) == []


def test_a_folder_that_appears_during_the_work_is_not_replaced(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(OutputError, match="not written by rsviewer"):
        with atomic_dir(out) as tmp:
            (tmp / "index.json").write_text("{}")
            out.mkdir()  # the user made it (and put a file in it) while we were encoding
            (out / "mine.txt").write_text("mine")
    assert _entries(out) == ["mine.txt"]
    assert _entries(tmp_path) == ["out"]


def test_claimed_folder_counts_as_empty_until_filled(tmp_path):
    out = claim_output_dir(tmp_path / "overlays", "localize-overlays")
    assert _entries(out) == [MANIFEST]
    claim_output_dir(out, "localize-overlays")  # only the manifest: still empty, no --force needed
    (out / "q00.png").write_bytes(b"x")
    with pytest.raises(OutputError, match="rsviewer localize-overlays"):
        claim_output_dir(out, "localize-overlays")
    claim_output_dir(out, "localize-overlays", overwrite=True)
    assert os.path.exists(out / "q00.png")


def test_a_symlinked_parent_does_not_hide_an_input(tmp_path):
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    (tmp_path / "link").symlink_to(imgs)
    with pytest.raises(OutputError, match="inside the input folder"):
        check_output_dir(tmp_path / "link" / "idx", inputs=[imgs])
    with pytest.raises(OutputError, match="symbolic link"):
        check_output_dir(tmp_path / "link", overwrite=True)
    with pytest.raises(OutputError, match="inside the input folder"):
        check_output_file(tmp_path / "link" / "map.csv", inputs=[imgs])
