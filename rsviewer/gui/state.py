"""Models and galleries for the app (no Qt): loading, index caching, ground truth.

Galleries: a dataset file or an image folder is indexed once per model and the index is
kept in ``$RSVIEWER_CACHE/indexes/`` (default ``~/.cache/rsviewer/indexes/``), keyed by
the model fingerprint and the gallery's path and modification time; an index folder is
used as it is (after the fingerprint check). The demo gallery also accepts the prebuilt
``assets/gallery/index/`` when its fingerprint matches the model. Loaded models and
indexes are kept in memory for the session, so switching back is instant.
"""
from __future__ import annotations

import hashlib
import json
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple, Optional

import numpy as np

from ..checkpoint import PACKAGE_ROOT, list_models, load_model, resolve_model_dir
from ..runtime import warm_up as warm_towers
from ..errors import IndexError_, RsviewerError
from ..retrieval.index import GalleryIndex, build_index, is_index, load_index

DEMO_GALLERY = PACKAGE_ROOT / "assets" / "gallery" / "gallery.json"
DEMO_INDEX = PACKAGE_ROOT / "assets" / "gallery" / "index"
DEMO_SCENES = [
    PACKAGE_ROOT.parent / "shared" / "scenes" / "ucm-mosaics" / "images" / "scene0.jpg",
    PACKAGE_ROOT / "assets" / "scenes" / "scene0.jpg",
]

_lock = threading.Lock()
_models: dict[str, object] = {}
_indexes: dict[tuple[str, str], GalleryIndex] = {}


def cache_root() -> Path:
    return Path(os.environ.get("RSVIEWER_CACHE", Path.home() / ".cache" / "rsviewer"))


def model_choices() -> list[Path]:
    try:
        return list_models()
    except OSError:
        return []


def get_model(spec: str, device=None, progress=None):
    """Load (or reuse) a model; ``spec`` as for ``load_model``."""
    from ..utils.device import pick_device

    folder = str(resolve_model_dir(spec).resolve())
    device = pick_device(device or "auto")
    key = f"{folder}@{device}"
    with _lock:
        if key in _models:
            return _models[key]
    if progress:
        progress(0, 0, f"loading model {Path(folder).name}")
    model = load_model(folder, device=device)
    warm_towers(model)  # rsviewer.runtime: towers exported/loaded and run once, so the first query is warm
    with _lock:
        _models[key] = model
    return model


def gallery_label(spec: Optional[str]) -> str:
    if not spec or Path(spec) == DEMO_GALLERY:
        return "demo gallery (UCM val, 210 images)"
    p = Path(spec)
    return p.name if p.name not in ("gallery.json", "index", "images") else f"{p.parent.name}/{p.name}"


def _mtime(p: Path) -> float:
    try:
        return p.stat().st_mtime
    except OSError:
        return 0.0


def index_cache_dir(model, source: Path) -> Path:
    src = source.resolve()
    payload = {"fp": getattr(model, "fingerprint", "untrained"), "src": str(src), "mtime": _mtime(src)}
    key = hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]
    name = "".join(c if c.isalnum() or c in "-_." else "_" for c in src.stem)[:40]
    return cache_root() / "indexes" / f"{name}-{key}"


def open_gallery(spec: Optional[str], model, progress=None, cancel=None) -> GalleryIndex:
    """An index for ``spec`` (dataset JSON/CSV, precomp folder, image folder or index)
    under ``model``: reused from memory, the shipped demo index or the disk cache,
    else built (with progress/cancel) and cached."""
    src = Path(spec).expanduser() if spec else DEMO_GALLERY
    fp = getattr(model, "fingerprint", "untrained")
    key = (fp, str(src.resolve()) if src.exists() else str(src))
    with _lock:
        if key in _indexes:
            return _indexes[key]
    if not src.exists():
        raise RsviewerError(f"gallery {src} does not exist")
    if src.is_dir() and is_index(src):
        index = load_index(src)
        if index.fingerprint != fp:
            source = Path(index.meta.get("source", ""))
            if source.exists():  # rebuild the same gallery for this model, cached
                index = _cached_or_build(source, model, progress, cancel)
            else:
                load_index(src, model)  # raises the clear "built with another model" error
    else:
        index = None
        if src.resolve() == DEMO_GALLERY.resolve() and is_index(DEMO_INDEX):
            try:
                index = load_index(DEMO_INDEX, model)
            except IndexError_:
                index = None  # shipped for another model: index it ourselves
        if index is None:
            index = _cached_or_build(src, model, progress, cancel)
    with _lock:
        _indexes[key] = index
    return index


def _cached_or_build(src: Path, model, progress, cancel) -> GalleryIndex:
    out = index_cache_dir(model, src)
    if is_index(out):
        try:
            return load_index(out, model)
        except IndexError_:
            pass  # damaged or stale: rebuild below
    return build_index(model, src, out=out, progress=progress, cancel=cancel, overwrite=True)  # our cache


def forget_gallery(index: GalleryIndex) -> None:
    with _lock:
        for k, v in list(_indexes.items()):
            if v is index:
                del _indexes[k]


@dataclass
class GroundTruth:
    rows: np.ndarray  # gallery rows that count as correct
    rule: str  # how they were found (tooltip text)

    def __bool__(self) -> bool:
        return len(self.rows) > 0


def text_ground_truth(index: GalleryIndex, text: str) -> Optional[GroundTruth]:
    from ..retrieval.search import ground_truth_rows

    rows = ground_truth_rows(index, text)
    if len(rows) == 0:
        return None
    return GroundTruth(rows, "ground truth: the query is one of this gallery's captions; correct = the image(s) it "
                             "describes")


def gallery_row_of(index: GalleryIndex, path) -> Optional[int]:
    try:
        p = str(Path(path).resolve())
    except OSError:
        return None
    for i, it in enumerate(index.items):
        try:
            if it["path"] == p or str(Path(it["path"]).resolve()) == p:
                return i
        except OSError:
            continue
    return None


def image_ground_truth(index: GalleryIndex, path) -> Optional[GroundTruth]:
    """An image query taken from the gallery: correct = same scene label."""
    row = gallery_row_of(index, path) if path is not None else None
    if row is None:
        return None
    label = index.items[row].get("label")
    if not label:
        return None
    rows = np.array([i for i, it in enumerate(index.items) if it.get("label") == label], np.int64)
    return GroundTruth(rows, f"ground truth: the query image is in this gallery; correct = same scene label "
                             f"({label})")


def recall_at(hit_rows: list[int], gt: GroundTruth, ks=(1, 5, 10)) -> dict[str, float]:
    """Per-query R@K: 100 if any ground-truth image is within the top K, else 0."""
    g = set(int(r) for r in gt.rows)
    return {f"R@{k}": 100.0 * any(r in g for r in hit_rows[:k]) for k in ks}


def precision_at(hit_rows: list[int], gt: GroundTruth, ks=(1, 5, 10), exclude: Optional[int] = None) -> dict[str, float]:
    """Per-query P@K (label agreement), the query image itself excluded."""
    g = set(int(r) for r in gt.rows)
    rows = [r for r in hit_rows if r != exclude]
    return {f"P@{k}": 100.0 * sum(r in g for r in rows[:k]) / k for k in ks if len(rows) >= 1}


# ---------------------------------------------------------------------- queries


class Query(NamedTuple):
    kind: str  # "text" | "image"
    value: str  # the text, or the image path

    @property
    def label(self) -> str:
        return f"“{self.value}”" if self.kind == "text" else Path(self.value).name

    @property
    def short(self) -> str:
        return self.value if self.kind == "text" else Path(self.value).name


def _text_tokenizer(model):
    """The model's text tokenizer: a Hugging Face tokenizer or rsviewer's word ``Vocab``."""
    vocab = getattr(model, "vocab", None)
    if vocab is not None and hasattr(vocab, "stoi"):
        return vocab
    for _, mod in getattr(model, "named_modules", lambda: [])():
        tok = getattr(mod, "tokenizer", None)
        if tok is not None and hasattr(tok, "unk_token_id"):
            return tok
    return None


def unknown_words(model, text: str) -> Optional[tuple[int, int]]:
    """``(tokens, unknown tokens)`` of ``text`` for this model, or None when the
    model's tokenizer cannot be inspected. All-unknown text (emoji, another script)
    encodes to the same vector whatever it says, so its results mean nothing."""
    tok = _text_tokenizer(model)
    if tok is None:
        return None
    if hasattr(tok, "stoi"):  # rsviewer Vocab: 1 is <unk>
        from ..archs.galr.vocab import split_words

        ids = [tok.stoi.get(w, 1) for w in split_words(text)]
        return len(ids), sum(i == 1 for i in ids)
    ids = tok(text, add_special_tokens=False)["input_ids"]
    return len(ids), sum(i == tok.unk_token_id for i in ids)


def check_text_query(model, text: str) -> None:
    """Refuse a text query the model cannot read (every token unknown)."""
    from ..errors import QueryError

    counts = unknown_words(model, text)
    if counts is not None and counts[0] > 0 and counts[1] == counts[0]:
        raise QueryError(f"none of the words in “{text[:40]}” are known to this model (all [UNK]): "
                         "every such query gives the same arbitrary results; use plain English words")


# ---------------------------------------------------------------------- the session model


class Events:
    """Plain-Python events: ``connect(name, fn)``, ``emit(name, *args)`` (no Qt)."""

    def __init__(self):
        self._handlers: dict[str, list] = {}

    def connect(self, name: str, fn) -> None:
        self._handlers.setdefault(name, []).append(fn)

    def emit(self, name: str, *args) -> None:
        for fn in list(self._handlers.get(name, [])):
            fn(*args)


@dataclass(frozen=True)
class Ticket:
    """A job in flight: its kind and the identity of what it computes."""

    kind: str
    key: tuple
    serial: int


@dataclass(frozen=True)
class Localization:
    """A localization on the Scene tab and what it was computed for: saving it names
    this text, these windows and this model, whatever the widgets show by then."""

    result: Any  # localize.LocalizationResult
    heat: np.ndarray  # its probability map at the scene thumbnail's size
    metrics: Optional[dict]  # SeLo figures when the scene's annotations have this text
    text: str
    windows: tuple
    model_name: Optional[str]
    key: tuple  # Session.localize_key when it was started: (model, scene, text, windows)


class Session:
    """The app's session state, owned here and nowhere else (napari's model/view split).

    Widgets render it and send intents; background jobs are registered with
    :meth:`begin` and their result is applied only if :meth:`accepts` says the ticket
    is still the newest of its kind *and* its identity still matches what the user is
    looking at (model, gallery, query, options, selection, map parameters). Anything
    else is dropped silently. A failed query never becomes :attr:`query`.

    Events (``session.events.connect(name, fn)``): ``model`` (model and gallery
    loaded), ``result`` (a query's result, or None when it was cleared), ``selection``,
    ``map`` (the gallery's embedding map, or None), ``map_filter``, ``error`` (a
    one-line message), ``scene`` (a scene opened on the Scene tab), ``anno`` (its SeLo
    annotations replaced), ``localization`` (a localization, or None when cleared).
    """

    def __init__(self, model_spec: str = "default", gallery_spec: Optional[str] = None):
        self.events = Events()
        self.model = None
        self.index: Optional[GalleryIndex] = None
        self.model_spec = model_spec
        self.gallery_spec = gallery_spec
        self.query: Optional[Query] = None  # the query whose result is shown; never a failed one
        self.pending: Optional[Query] = None  # asked for before a model and gallery were loaded
        self.result = None  # SearchResult of ``query`` (all the hits fetched, possibly > K)
        self.gt: Optional[GroundTruth] = None
        self.qrow: Optional[int] = None
        self.options: dict = {"k": 20, "rerank": "none", "labels": None}
        self.selection = None  # the selected Hit
        self.map = None  # the embedding map (Projection) of ``index`` in the Map tab
        self.map_filter: Optional[frozenset[int]] = None
        self.map_filter_desc = ""
        self.error = ""
        # the Scene tab: one large scene, its annotations and a localization on it (not tied to the gallery)
        self.scene = None  # the scene reader (raster.Scene, or a Pillow stand-in)
        self.scene_path: Optional[Path] = None
        self.anno: list[dict] = []  # SeLo annotations of any scenes; scene_anno() picks this one's
        self.localization: Optional[Localization] = None
        self.jobs: dict[str, Ticket] = {}  # kind → the newest job of that kind
        self._serial = 0

    # ---- jobs ------------------------------------------------------------------
    def begin(self, kind: str, key: tuple) -> Ticket:
        """Register a job; the previous one of ``kind`` is replaced (its result will be dropped)."""
        self._serial += 1
        t = Ticket(kind, key, self._serial)
        self.jobs[kind] = t
        return t

    def accepts(self, ticket: Ticket, current_key: tuple) -> bool:
        """True if ``ticket`` is the newest job of its kind and still computes ``current_key``."""
        return self.jobs.get(ticket.kind) is ticket and ticket.key == current_key

    def end(self, ticket: Ticket) -> None:
        if self.jobs.get(ticket.kind) is ticket:
            del self.jobs[ticket.kind]

    def in_flight(self) -> list[str]:
        return sorted(self.jobs)

    # ---- identities ------------------------------------------------------------
    def _context(self) -> tuple:
        return (id(self.model), id(self.index))

    def search_key(self, q: Query) -> tuple:
        o = self.options
        return (*self._context(), q, o["k"], o["rerank"], tuple(o["labels"] or ()), self.map_filter is not None)

    def selection_key(self) -> tuple:
        sel = self.selection
        return (*self._context(), self.query, sel.row if sel is not None else None,
                sel.path if sel is not None else None)

    def explain_key(self, method: str, layer: Optional[str]) -> tuple:
        return (*self.selection_key(), method, layer)

    def map_key(self, method: str, n: int) -> tuple:
        return (id(self.index), method, n)

    def localize_key(self, text: str, windows) -> tuple:
        return (id(self.model), id(self.scene), text, tuple(windows))

    # ---- intents ---------------------------------------------------------------
    def loaded(self, model, index, model_spec: str, gallery_spec: Optional[str]) -> Optional[Query]:
        """A model and gallery are in: clear what belonged to the old ones; returns the
        query to run again (the current one, or the one asked for while loading)."""
        self.model, self.index = model, index
        self.model_spec, self.gallery_spec = model_spec, gallery_spec
        self.result, self.gt, self.qrow = None, None, None
        self.selection = None
        self.map = None
        self.map_filter, self.map_filter_desc = None, ""
        self.error = ""
        again = self.pending or self.query
        self.pending = None
        self.events.emit("model")
        self.events.emit("result", None)
        self.events.emit("selection", None)
        if self.localization is not None and self.localization.key[0] != id(model):  # the scene stays; its map was another model's
            self.clear_localization()
        return again

    def ready(self) -> bool:
        return self.model is not None and self.index is not None

    def ask(self, q: Query) -> bool:
        """A query is asked for: True if it can run now, else it waits for the load
        (none yet, or a new model/gallery is on its way: its result would be dropped)."""
        if not self.ready() or "load" in self.jobs:
            self.pending = q
            return False
        return True

    def load_failed(self) -> Optional[Query]:
        """The load in flight failed: the old model and gallery stay; returns the query
        that waited for it (to run on them), if any."""
        again, self.pending = self.pending, None
        return again if self.ready() else None

    def search_succeeded(self, q: Query, result, gt, qrow) -> None:
        self.query, self.result, self.gt, self.qrow = q, result, gt, qrow
        self.error = ""
        self.events.emit("result", result)

    def search_failed(self, q: Query, message: str) -> None:
        """The query stays what it was: the shown result is still the previous query's."""
        if self.pending == q:
            self.pending = None
        self.fail(message)

    def fail(self, message: str) -> None:
        self.error = message
        self.events.emit("error", message)

    def select(self, hit) -> None:
        self.selection = hit
        self.events.emit("selection", hit)

    def set_options(self, options: dict) -> None:
        self.options = dict(options)

    def show_index(self, index) -> None:
        """A gallery shown without a model (a map on its own: scripts, benches): its old map goes."""
        self.index, self.map = index, None
        self.map_filter, self.map_filter_desc = None, ""
        self.events.emit("map", None)

    def map_ready(self, proj) -> None:
        """The embedding map of the current gallery was computed (or read from its cache)."""
        self.map = proj
        self.events.emit("map", proj)

    def set_map_filter(self, rows, desc: str = "") -> None:
        """Restrict the results to these image rows; None or an empty set clears it."""
        self.map_filter = frozenset(rows) if rows else None
        self.map_filter_desc = desc if rows else ""
        self.events.emit("map_filter", self.map_filter)

    # ---- the Scene tab
    def scene_opened(self, path: Path, scene) -> None:
        """A scene is open: the localization on the previous one goes."""
        self.scene, self.scene_path = scene, Path(path)
        self.localization = None
        self.events.emit("scene", scene)
        self.events.emit("localization", None)

    def set_anno(self, entries) -> None:
        self.anno = list(entries)
        self.events.emit("anno")

    def scene_anno(self) -> list[dict]:
        """The annotations of the open scene (matched by file name, as SeLo's anno.json does)."""
        if self.scene_path is None:
            return []
        return [a for a in self.anno if a.get("jpg_name") == self.scene_path.name]

    def polygons_for(self, caption: str) -> list:
        t = caption.strip().lower()
        return [poly for a in self.scene_anno() if a["caption"].strip().lower() == t for poly in a["points"]]

    def localized(self, loc: Localization) -> None:
        self.localization = loc
        self.events.emit("localization", loc)

    def clear_localization(self) -> None:
        self.localization = None
        self.events.emit("localization", None)

    def visible_hits(self) -> list:
        """The hits the results grid shows: the top K, inside the map selection if any."""
        if self.result is None:
            return []
        hits = list(self.result.hits)
        if self.map_filter is not None:
            hits = [h for h in hits if h.row in self.map_filter]
        return hits[: self.options["k"]]


_warmed = threading.Event()


# imported once by the first load's worker, before it loads anything: the text tower's
# transformers modules (≈3 s, among them torch._dynamo and sympy), ONNX Runtime, cv2 (it
# decodes thumbnails and previews), the explain and localize engines (the details dock
# and the Scene tab import them on the GUI thread, ≈1 s for explain), and the map's
# scikit-learn / openTSNE. Optional ones that are missing are skipped (the map lists only
# the methods it has).
PRELOAD = ("transformers", "transformers.models.bert.modeling_bert", "transformers.models.auto.modeling_auto",
           "transformers.models.auto.tokenization_auto", "onnxruntime", "cv2", "rsviewer.explain",
           "rsviewer.localize", "sklearn.decomposition", "sklearn.neighbors", "openTSNE")


def warm_up(progress=None) -> None:
    """Import the app's heavy libraries once, in the first load's worker, before the model.

    Done on the GUI thread (first map, first explanation) they froze it for up to a
    second. In a worker they still paused it: the imports create ~200,000 objects, and
    each full garbage collection they triggered held the GIL 100–300 ms. So automatic
    collection waits until they are done and what they leave is frozen
    (``utils.gc_pause``); the model is loaded after, with collection back on, because a
    model holds reference cycles and must stay collectable."""
    if _warmed.is_set():
        return
    _warmed.set()
    from ..utils.gc_pause import import_all

    if progress:
        progress(0, 0, "importing libraries")
    import_all(PRELOAD)
