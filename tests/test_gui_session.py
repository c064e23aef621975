"""The Qt-free session model (``rsviewer.gui.state.Session``): no display, no Qt import."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

from rsviewer.gui.state import Query, Session

REPO = Path(__file__).resolve().parents[1]


def _hit(row, path=None):
    return SimpleNamespace(row=row, path=path or f"/img/{row}.jpg", rank=row + 1, score=1.0 - row / 100)


def _result(query, n):
    return SimpleNamespace(query=query, hits=[_hit(i) for i in range(n)])


def _loaded():
    s = Session()
    s.loaded(object(), object(), "default", None)
    return s


def test_state_module_does_not_import_qt():
    code = "import sys, rsviewer.gui.state; print('PySide6' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO,
                         env={"PYTHONPATH": str(REPO), "PATH": ""})
    assert out.stdout.strip() == "False", out.stderr


def test_result_of_a_replaced_or_stale_job_is_not_accepted():
    s = _loaded()
    q1, q2 = Query("text", "a beach"), Query("text", "a river")
    t1 = s.begin("search", s.search_key(q1))
    t2 = s.begin("search", s.search_key(q2))  # replaces t1
    assert not s.accepts(t1, s.search_key(q1))
    assert s.accepts(t2, s.search_key(q2))
    s.set_options(dict(s.options, k=5))  # options changed while t2 ran: its result is stale
    assert not s.accepts(t2, s.search_key(q2))


def test_explanation_is_tied_to_the_selection():
    s = _loaded()
    s.search_succeeded(Query("text", "planes"), _result("planes", 20), None, None)
    s.select(s.result.hits[0])
    t = s.begin("explain", s.explain_key("gradcam", None))
    s.select(s.result.hits[1])  # J before the explanation came back
    assert not s.accepts(t, s.explain_key("gradcam", None))


def test_failed_query_never_becomes_current_nor_reruns():
    s = _loaded()
    good, bad = Query("text", "planes"), Query("image", "/tmp/broken.jpg")
    s.search_succeeded(good, _result("planes", 20), None, None)
    events = []
    s.events.connect("error", events.append)
    s.search_failed(bad, "not an image")
    assert s.query == good and s.result.query == "planes" and events == ["not an image"]
    again = s.loaded(object(), object(), "default", "/other/gallery.json")
    assert again == good and s.result is None and s.selection is None


def test_query_asked_before_load_waits_and_runs_after():
    s = Session()
    q = Query("text", "a beach")
    assert not s.ask(q)
    assert s.loaded(object(), object(), "default", None) == q


def test_visible_hits_top_k_inside_the_map_filter():
    s = _loaded()
    s.search_succeeded(Query("text", "x"), _result("x", 210), None, None)
    assert len(s.visible_hits()) == 20
    s.set_map_filter({1, 3, 5}, "sel")
    assert [h.row for h in s.visible_hits()] == [1, 3, 5]
    s.set_map_filter(set(), "empty lasso")  # an empty selection clears the filter: back to top K
    assert s.map_filter is None and len(s.visible_hits()) == 20


def test_query_asked_during_a_model_switch_runs_on_the_new_model():
    s = _loaded()
    s.begin("load", ("other", None))
    q = Query("text", "a beach")
    assert not s.ask(q)  # its result on the old model would be dropped: it waits
    assert s.loaded(object(), object(), "other", None) == q


def test_query_waiting_for_a_failed_load_runs_on_the_old_model():
    s = _loaded()
    t = s.begin("load", ("broken", None))
    q = Query("text", "a beach")
    assert not s.ask(q)
    s.end(t)
    assert s.load_failed() == q and s.ask(q)


def test_the_embedding_map_belongs_to_the_session_and_to_its_gallery():
    """The map is session state: a map job for the old gallery is dropped, a new gallery
    clears the map, and every change is an event the Map tab renders."""
    s = _loaded()
    seen = []
    s.events.connect("map", seen.append)
    t = s.begin("map", s.map_key("pca", 2000))
    s.loaded(s.model, object(), "default", "another gallery")  # the gallery changed while it ran
    assert not s.accepts(t, s.map_key("pca", 2000))
    t2 = s.begin("map", s.map_key("tsne", 2000))
    assert not s.accepts(t2, s.map_key("pca", 2000))  # computes another method than asked now
    proj = object()
    s.map_ready(proj)
    assert s.map is proj and seen == [proj]
    s.loaded(s.model, object(), "default", "a third gallery")
    assert s.map is None
    s.show_index(None)
    assert s.map is None and seen[-1] is None
