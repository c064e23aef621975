"""ONNX export of a model's frozen towers, cached per model fingerprint.

    $RSVIEWER_CACHE/onnx/<arch>-<fingerprint>-<tower>[-<size>].onnx   the graph (weights inside)
    $RSVIEWER_CACHE/onnx/<arch>-<fingerprint>-<tower>[-<size>].json   sidecar: sha256, parity, versions

The two towers are the gradient-free halves every architecture already has
(``archs/base.py``): ``image`` = ``pixels -> image_states`` (``image_features`` then
``image_head``, or the richer states of a pairwise model) at a fixed input size, and
``text`` = ``token tensors -> text_states`` with dynamic batch and length. Tokenizing
stays in Python. A third graph, ``maps`` = ``pixels -> feature_maps`` with dynamic
height and width, serves localization's shared-map mode for models that have one; it
is traced at a multiple of 32 px and valid for inputs that are multiples of 32 (TF
"SAME" padding is the same for every such size; the parity check runs another size).

Export is TorchScript-traced (``torch.onnx.export(dynamo=False)``: no onnxscript
dependency), then checked against PyTorch on inputs of a *different* batch size and
text length than the trace saw, so a shape the tracer froze shows up as a mismatch.
A tower whose export fails or does not match is recorded in the sidecar with the
reason (so it is not retried on every start) and runs in PyTorch.

The app exports in a child process (:func:`isolate_exports`): the tracer and
torch.onnx's C++ passes hold the GIL for seconds at a time, and a window whose worker
thread exports cannot repaint meanwhile. The child reloads the model from its folder,
checks it has the same fingerprint, exports, and exits; the parent reads the cache.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from ..errors import Cancelled
from ..utils.atomic import atomic_file, write_json

log = logging.getLogger("rsviewer.runtime")

EXPORT_VERSION = 1  # bump when the wrapper graphs change meaning
OPSET = 17
# parity thresholds on unit-norm embeddings / states (float32 graphs)
MAX_ABS = 2e-3
MIN_COS = 0.9999


def cache_root() -> Path:
    return Path(os.environ.get("RSVIEWER_CACHE", Path.home() / ".cache" / "rsviewer")) / "onnx"


def model_key(model) -> str:
    from ..localize.encode import model_fingerprint

    return f"{model.arch}-{model_fingerprint(model)}"


def tower_paths(model, tower: str, size: Optional[int] = None) -> tuple[Path, Path]:
    stem = f"{model_key(model)}-{tower}" + (f"-{size}" if size else "")
    root = cache_root()
    return root / f"{stem}.onnx", root / f"{stem}.json"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def _versions() -> dict:
    import onnx

    return {"export": EXPORT_VERSION, "torch": torch.__version__, "onnx": onnx.__version__, "opset": OPSET}


# ---- wrappers: one nn.Module per tower with positional tensor inputs and outputs ------------
class ImageTower(torch.nn.Module):
    def __init__(self, model, names: Sequence[str]):
        super().__init__()
        self.model, self.names = model, list(names)

    def forward(self, pixels):
        st = self.model.image_states(pixels)
        return tuple(st[k].float() for k in self.names)


class MapsTower(torch.nn.Module):
    """``pixels -> feature_maps`` of a fully convolutional backbone (the shared-map
    localization mode), with dynamic height and width."""

    def __init__(self, model, names: Sequence[str]):
        super().__init__()
        self.model, self.names = model, list(names)
        # EfficientNet-Lite's eager "SAME" padding is computed in Python from the input size
        # (a trace freezes it); the fused inference copy pads inside its convolutions
        from ..localize.fused import fused_backbone

        fb = fused_backbone(model, torch.float32) if model.device.type == "cpu" else None
        self.fn = fb.forward_features if fb is not None else model.feature_maps

    def forward(self, pixels):
        maps = self.fn(pixels)
        return tuple(maps[k].float() for k in self.names)


class TextTower(torch.nn.Module):
    def __init__(self, model, inputs: Sequence[str], names: Sequence[str]):
        super().__init__()
        self.model, self.inputs, self.names = model, list(inputs), list(names)

    def forward(self, *tensors):
        tokens = dict(zip(self.inputs, tensors))
        st = self.model.text_states_from(self.model.text_features(tokens))
        return tuple(st[k].float() for k in self.names)


# ---- example inputs ------------------------------------------------------------------------------
TRACE_TEXTS = ("many planes are parked next to the runway", "a river")
# another batch size, and texts both shorter and longer than the trace's (a frozen length fails)
CHECK_TEXTS = ("three tennis courts", "dense residential area with houses",
               "some white storage tanks stand near the road, next to a large parking lot with many cars "
               "and a few green trees along a river that goes through the forest")


def image_example(model, batch: int, size: int, seed: int) -> torch.Tensor:
    """Normalised pixels of real-looking smooth noise (a pure random field saturates ReLUs less
    like real images do); deterministic."""
    g = np.random.default_rng(seed)
    arr = g.integers(0, 256, (batch, size // 8, size // 8, 3)).astype(np.uint8)
    arr = np.repeat(np.repeat(arr, 8, 1), 8, 2)
    return model.preprocess_array(arr)


def _tokens(model, texts) -> dict[str, torch.Tensor]:
    return {k: v.cpu() for k, v in model.tokenize(list(texts)).items()}


def _parity(ref: dict[str, torch.Tensor], got: Sequence[np.ndarray]) -> dict:
    out = {}
    for (k, r), g in zip(ref.items(), got):
        r = r.float().cpu().numpy()
        diff = float(np.abs(r - g).max()) if r.size else 0.0
        a, b = r.reshape(r.shape[0], -1).astype(np.float64), g.reshape(g.shape[0], -1).astype(np.float64)
        na, nb = np.linalg.norm(a, axis=1), np.linalg.norm(b, axis=1)
        cos = float(np.min((a * b).sum(1) / np.maximum(na * nb, 1e-12))) if r.size else 1.0
        out[k] = {"max_abs": diff, "min_cos": cos, "scale": float(np.abs(r).max()) if r.size else 0.0}
    return out


def _parity_ok(par: dict) -> bool:
    # absolute on unit embeddings; relative to the largest value on raw feature maps
    return all(v["max_abs"] <= MAX_ABS * max(1.0, v.get("scale", 1.0)) and v["min_cos"] >= MIN_COS for v in par.values())


# ---- export ------------------------------------------------------------------------------------
def export_tower(model, tower: str, size: Optional[int] = None) -> dict:
    """Export one tower to the cache and parity-check it; returns the sidecar dict
    (``status`` "ok" | "failed" | "mismatch", with ``reason``). Writes both files atomically."""
    import onnxruntime as ort

    path, side = tower_paths(model, tower, size)
    meta: dict = {"tower": tower, "arch": model.arch, "key": model_key(model), "size": size, **_versions(),
                  "pid": os.getpid()}
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            if tower == "image":
                x = image_example(model, 2, size, 0).to(model.device)
                names = list(model.image_states(x).keys())
                wrapper, args = ImageTower(model, names), (x,)
                input_names, dyn = ["pixels"], {"pixels": {0: "batch"}}
            elif tower == "maps":
                x = image_example(model, 1, 256, 0)[..., :, :224].contiguous().to(model.device)
                wrapper = MapsTower(model, sorted(model.feature_maps(x).keys()))
                names, args = wrapper.names, (x,)
                input_names, dyn = ["pixels"], {"pixels": {0: "batch", 2: "height", 3: "width"}}
            else:
                toks = {k: v.to(model.device) for k, v in _tokens(model, TRACE_TEXTS).items()}
                names = list(model.text_states_from(model.text_features(toks)).keys())
                input_names = list(toks)
                wrapper, args = TextTower(model, input_names, names), tuple(toks[k] for k in input_names)
                dyn = {k: ({0: "batch", 1: "length"} if toks[k].dim() > 1 else {0: "batch"}) for k in input_names}
            dyn.update({n: ({0: "batch", 2: f"{n}_h", 3: f"{n}_w"} if tower == "maps" else {0: "batch"}) for n in names})
            meta.update(inputs=input_names, outputs=names)
            path.parent.mkdir(parents=True, exist_ok=True)
            with atomic_file(path) as fh, warnings.catch_warnings():
                warnings.simplefilter("ignore")  # TracerWarnings: the parity check below is the judge
                with _EXPORT_LOCK:  # the exporter keeps global state: one export at a time per process
                    torch.onnx.export(wrapper, args, fh, dynamo=False, input_names=input_names, output_names=names,
                                      dynamic_axes=dyn, opset_version=OPSET, do_constant_folding=True)
    except Exception as e:  # noqa: BLE001 — any tracer/exporter failure means "runs in torch"
        _reset_exporter()
        meta.update(status="failed", reason=f"export failed: {type(e).__name__}: {str(e).splitlines()[0][:200]}")
        write_json(side, meta)
        return meta
    finally:
        model.train(was_training)
    # parity on inputs the trace did not see (another batch size and text length)
    try:
        with torch.no_grad():
            if tower == "image":
                x = image_example(model, 3, size, 1)
                ref = model.image_states(x.to(model.device))
                feed = {"pixels": x.numpy()}
            elif tower == "maps":
                x = image_example(model, 2, 320, 1)[..., :288, :].contiguous()
                ref = model.feature_maps(x.to(model.device))
                feed = {"pixels": x.numpy()}
            else:
                toks = _tokens(model, CHECK_TEXTS)
                ref = model.text_states_from(model.text_features({k: v.to(model.device) for k, v in toks.items()}))
                feed = {k: toks[k].numpy() for k in meta["inputs"]}
        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        got = sess.run(meta["outputs"], feed)
        par = _parity({k: ref[k] for k in meta["outputs"]}, got)
    except Exception as e:  # noqa: BLE001
        par, meta["reason"] = None, f"exported graph does not run: {type(e).__name__}: {str(e).splitlines()[0][:200]}"
    meta["parity"] = par
    if par is not None and _parity_ok(par):
        meta.update(status="ok", sha256=_sha256(path), bytes=path.stat().st_size)
    else:
        meta["status"] = "mismatch"
        meta.setdefault("reason", f"ONNX differs from PyTorch beyond max |Δ| {MAX_ABS} / cos {MIN_COS}: {par}")
        path.unlink(missing_ok=True)  # never leave a graph that gives other answers
    write_json(side, meta)
    return meta


_isolated = False


def isolate_exports(on: bool = True) -> None:
    """Export in a child process from now on (the GUI sets it: see the module docstring)."""
    global _isolated
    _isolated = on


def _export_in_child(model, specs: Sequence[tuple[str, Optional[int]]]) -> dict[tuple, dict]:
    """:func:`export_tower` for each ``(tower, size)`` in ``specs``, run by one child Python
    (:func:`_child_main`) on the model's folder at a lower CPU priority. Returns the
    sidecars it wrote, by spec; empty when a child cannot stand in for this model (no
    folder, not on the CPU, other weights than the folder's, or the child failed), and
    the caller exports in this process instead."""
    folder = getattr(model, "model_dir", None)
    if folder is None or getattr(model.device, "type", "cpu") != "cpu" or not specs:
        return {}
    code = "import sys; from rsviewer.runtime.export import _child_main; sys.exit(_child_main(sys.argv[1:]))"
    cmd = [sys.executable, "-c", code, str(folder), model_key(model)] + [f"{t}:{s or 0}" for t, s in specs]
    env = dict(os.environ)  # the same cache; and this rsviewer, installed or not
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).resolve().parents[2])] +
                                        ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    try:
        proc = _run_child(cmd, env)
    except (OSError, subprocess.SubprocessError) as e:
        log.warning("rsviewer: export in a child process failed to run (%s); exporting here", e)
        return {}
    if proc.returncode != 0:
        tail = (proc.stderr or "").strip().splitlines()[-1:] or [f"exit {proc.returncode}"]
        log.warning("rsviewer: export in a child process failed (%s); exporting here", tail[0][:200])
        return {}
    out = {}
    for tower, size in specs:
        try:
            meta = json.loads(tower_paths(model, tower, size)[1].read_text())
        except (OSError, ValueError):
            continue
        if isinstance(meta, dict) and meta.get("key") == model_key(model):
            out[(tower, size)] = meta
    return out


_children: set = set()  # export children running now (stop_export_children ends them)
_stopped: set = set()  # ... and those it ended: their parent gives up instead of exporting itself
_children_lock = threading.Lock()


def _run_child(cmd: list[str], env: dict) -> subprocess.CompletedProcess:
    """``subprocess.run`` with the child registered, so that an app leaving while a first
    load exports can stop it (:func:`stop_export_children`) instead of leaving it running."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            stdin=subprocess.DEVNULL, env=env)
    with _children_lock:
        _children.add(proc)
    try:
        out, err = proc.communicate(timeout=1800)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise
    finally:
        with _children_lock:
            _children.discard(proc)
            stopped = proc in _stopped
            _stopped.discard(proc)
    if stopped:  # the app is leaving: no fallback export in this process
        raise Cancelled("the export was stopped")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def stop_export_children(wait_s: float = 0.5) -> int:
    """Terminate every running export child and wait up to ``wait_s`` for them; returns
    how many were stopped. A stopped child leaves no partial export: it exits through its
    SIGTERM handler, so the atomic writers remove their temporary files, and the cache
    keeps what it had (the next load exports again)."""
    with _children_lock:
        procs = [p for p in _children if p.poll() is None]
        _stopped.update(procs)
    for p in procs:
        try:
            p.terminate()
        except OSError:
            pass
    deadline = time.monotonic() + wait_s
    for p in procs:
        try:
            p.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
    return len(procs)


def _child_main(argv: Sequence[str]) -> int:
    """The child of :func:`_export_in_child` (argv: folder, key, tower:size…): exit 0 with
    the sidecars written, 3 when the folder's weights are not the parent's model (another
    fingerprint), 1 on an error."""
    folder, key, specs = argv[0], argv[1], [(a.split(":")[0], int(a.split(":")[1]) or None) for a in argv[2:]]
    import signal

    # stopped by the app (stop_export_children): leave through Python, so atomic writes clean up
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        os.setpriority(os.PRIO_PROCESS, 0, max(os.getpriority(os.PRIO_PROCESS, 0), 10))  # under the GUI
    except (AttributeError, OSError):  # Windows, or not permitted
        pass
    from ..checkpoint import load_model

    model = load_model(folder)
    if model_key(model) != key:
        print(f"{folder}: fingerprint {model_key(model)} is not {key}", file=sys.stderr)
        return 3
    for tower, size in specs:
        meta = export_tower(model, tower, size)
        print(tower, size, meta.get("status"), meta.get("reason", ""))
    return 0


def _cached(model, tower: str, size: Optional[int], verify: bool) -> tuple[Optional[Path], Optional[dict]]:
    """The valid cached export (path, sidecar); (None, sidecar) when it is known not to
    export; (None, None) when it must be exported (absent, another exporter, or damaged)."""
    path, side = tower_paths(model, tower, size)
    meta = None
    if side.exists():
        try:
            meta = json.loads(side.read_text())
            if not isinstance(meta, dict) or meta.get("export") != EXPORT_VERSION or meta.get("torch") != torch.__version__:
                meta = None  # another exporter: redo
        except (OSError, ValueError):
            meta = None
    if meta is not None and meta.get("status") in ("failed", "mismatch"):
        return None, meta  # known not to export: do not retry on every start
    if meta is not None and meta.get("status") == "ok":
        try:
            ok = path.exists() and path.stat().st_size == meta.get("bytes") and (not verify or _sha256(path) == meta.get("sha256"))
        except OSError:
            ok = False
        if ok:
            meta["cache_hit"] = True
            return path, meta
        log.warning("rsviewer: cached ONNX export %s is damaged; rebuilding it", path.name)
    return None, None


def prepare_towers(model, specs: Sequence[tuple[str, Optional[int]]]) -> None:
    """Export, in one child process when exports are isolated, every ``(tower, size)`` of
    ``specs`` not validly cached yet (one interpreter start and model load for all of
    them); the sessions then find them in the cache. Nothing to do when not isolated."""
    if not _isolated:
        return
    todo = [(t, s) for t, s in specs if _cached(model, t, s, verify=False) == (None, None)]
    _export_in_child(model, todo)


def cached_tower(model, tower: str, size: Optional[int] = None, verify: bool = True) -> tuple[Optional[Path], dict]:
    """The cached export of ``tower`` if it is valid (sidecar ok, file present, sha256 matches),
    exporting it first when absent or corrupt. Returns (path or None, sidecar)."""
    path, meta = _cached(model, tower, size, verify)
    if path is not None or meta is not None:
        return path, meta
    meta = (_export_in_child(model, [(tower, size)]).get((tower, size)) if _isolated else None) or \
        export_tower(model, tower, size)
    meta["cache_hit"] = False
    return (tower_paths(model, tower, size)[0] if meta["status"] == "ok" else None), meta


_EXPORT_LOCK = threading.Lock()


def _reset_exporter() -> None:
    """A failed TorchScript export (e.g. galr's ``diag_embed``) can leave the exporter's
    ``in_onnx_export`` flag set, and every later export then fails; clear it."""
    try:
        from torch.onnx._internal.torchscript_exporter._globals import GLOBALS
    except ImportError:  # other torch versions keep it elsewhere; nothing to reset there
        return
    with _EXPORT_LOCK:  # never while another thread's export runs
        GLOBALS.in_onnx_export = False
