"""Run a model's frozen towers in ONNX Runtime, or in PyTorch when that is not possible.

    tw = towers(model, "auto")          # memoised per (model, runtime)
    st = tw.image_states(pixels)        # dict of CPU float tensors, like model.image_states
    st = tw.text_states(["a river"])    # like model.text_states (one short query: 1 thread)
    tw.info()                           # which runtime each tower uses, and why

Threads: batch work (index building, windows) runs in a session with ``intra_op`` =
the cores torch uses; a single short text query runs in its own 1-thread session (on a
2-core CPU one thread is faster for a ~10-token query and leaves the other core to
whatever else runs — bench/query.py measures both). Sessions have their own thread
pools, so nothing here changes ``torch.set_num_threads`` for work in other threads.
"""
from __future__ import annotations

import logging
import os
import threading
import weakref
from typing import Optional, Sequence

import numpy as np
import torch

from ..archs.base import check_query
from ..errors import RsviewerError
from ..utils.altstack import keep_sigaltstack

log = logging.getLogger("rsviewer.runtime")

RUNTIMES = ("auto", "torch", "onnx", "openvino")
GRAPH_RUNTIMES = ("onnx", "openvino")  # run the exported graphs (ONNX Runtime / OpenVINO)
QUERY_THREADS = 1  # threads of the single-query text session (measured: bench/query.py)
QUERY_BATCH = 4  # texts up to this many use the query session

_towers: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
_lock = threading.Lock()


class RuntimeError_(RsviewerError):
    """``--runtime onnx`` asked for but ONNX Runtime is not installed."""


def ort_available() -> bool:
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return True


def openvino_available() -> bool:
    try:
        import openvino  # noqa: F401
    except ImportError:
        return False
    return True


def providers(device: torch.device) -> list[str]:
    """TensorRT / CUDA providers when installed and the model is on a GPU, then CPU."""
    import onnxruntime as ort

    have = set(ort.get_available_providers())
    out = []
    if device.type == "cuda":
        out += [p for p in ("TensorrtExecutionProvider", "CUDAExecutionProvider") if p in have]
    return out + ["CPUExecutionProvider"]


def resolve_runtime(runtime: str, model) -> str:
    """``auto`` → ``onnx`` when ONNX Runtime is installed and the model is on the CPU (or on a
    GPU with ORT's CUDA provider), else ``torch``; ``$RSVIEWER_RUNTIME`` changes what ``auto``
    means. ``openvino`` runs the same graphs in OpenVINO (faster here, docs/runtime.md) but
    only when asked: its thread-local state crashes PySide6 worker threads at exit (the GUI).
    ``onnx`` / ``openvino`` without their package is an error. The export and its parity check
    always use ONNX Runtime."""
    if runtime == "auto":  # the user's standing choice for "auto" (e.g. RSVIEWER_RUNTIME=torch)
        runtime = os.environ.get("RSVIEWER_RUNTIME", "auto") or "auto"
    if runtime not in RUNTIMES:
        raise RuntimeError_(f"unknown runtime {runtime!r}; use {', '.join(RUNTIMES)}")
    if runtime == "torch":
        return "torch"
    if not ort_available():
        if runtime in GRAPH_RUNTIMES:
            raise RuntimeError_(f"--runtime {runtime} needs ONNX Runtime for the export: pip install onnxruntime")
        return "torch"
    dev = model.device
    if runtime == "openvino" and not openvino_available():
        raise RuntimeError_("--runtime openvino needs OpenVINO: pip install openvino")
    if runtime == "openvino":
        return "openvino"
    if runtime == "auto" and dev.type != "cpu" and len(providers(dev)) == 1:
        return "torch"  # a GPU model and no GPU provider: torch on the GPU is faster
    return "onnx"


def default_threads() -> int:
    return max(1, torch.get_num_threads())


class _OVSession:
    """An OpenVINO compiled model with ONNX Runtime's ``run(names, feed)`` (fp32: this CPU
    would otherwise run it in bf16); one infer request per thread."""

    # Every call into OpenVINO keeps the thread's alternate signal stack as it was: its
    # CPU plugin installs its own per thread and can leave it dangling (utils/altstack.py).

    def __init__(self, path, threads: int):
        import openvino as ov

        with keep_sigaltstack():
            self.cm = ov.Core().compile_model(str(path), "CPU", {"INFERENCE_NUM_THREADS": int(threads),
                                                                 "INFERENCE_PRECISION_HINT": "f32"})
        self._local = threading.local()

    def run(self, names, feed):
        with keep_sigaltstack():
            req = getattr(self._local, "req", None)
            if req is None:
                req = self._local.req = self.cm.create_infer_request()
            res = req.infer(feed)
            return [np.array(res[self.cm.output(n)]) for n in names]  # copies: the request reuses its buffers

    def __del__(self):
        with keep_sigaltstack():
            self._local = self.cm = None


def _session(path, device, threads: int, backend: str = "onnx"):
    if backend == "openvino":
        return _OVSession(path, threads)
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads == 1:
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), so, providers=providers(device))


class Towers:
    """The frozen towers of one model in one runtime (see the module docstring)."""

    def __init__(self, model, runtime: str = "auto", precision: str = "fp32"):
        self.model = model
        self.runtime = resolve_runtime(runtime, model)
        self.precision = check_runtime_precision(self.runtime, precision)
        self.reasons: dict[str, str] = {}
        self.parity: dict[str, dict] = {}
        self.int8: dict[str, dict] = {}  # tower → the int8 graph's fidelity, or why it runs float32
        self._sessions: dict[tuple, object] = {}
        self._meta: dict[str, dict] = {}
        self._lock = threading.Lock()

    # -- sessions ------------------------------------------------------------------------
    def _get(self, tower: str, size: Optional[int], threads: int):
        """The ORT session for a tower (exported/loaded on first use), or None → torch."""
        if self.runtime not in GRAPH_RUNTIMES:
            return None
        key = (tower, size)
        if key in self.reasons:
            return None
        skey = (tower, size, threads)
        sess = self._sessions.get(skey)
        if sess is not None:
            return sess
        with self._lock:
            if skey in self._sessions:
                return self._sessions[skey]
            from .export import cached_tower

            try:
                path, meta = cached_tower(self.model, tower, size)
            except ImportError as e:  # onnx itself missing
                path, meta = None, {"reason": f"export needs the onnx package ({e.name})"}
            if path is None:
                self.reasons[key] = meta.get("reason", "export unavailable")
                if self.precision == "int8":
                    self.int8[tower] = {"precision": "fp32", "reason": f"runs in PyTorch: {self.reasons[key]}"}
                log.warning("rsviewer: %s %s tower runs in PyTorch: %s", self.model.arch, tower, self.reasons[key])
                return None
            self._meta[tower] = meta
            self.parity[tower] = meta.get("parity") or {}
            if self.precision == "int8" and tower in ("image", "text"):
                path = self._int8(tower, size, path, meta)
            try:
                sess = _session(path, self.model.device, threads, self.runtime)
            except Exception as e:  # noqa: BLE001 — a graph the runtime cannot load: torch
                self.reasons[key] = f"{self.runtime} cannot load the export: {str(e).splitlines()[0][:160]}"
                log.warning("rsviewer: %s %s tower runs in PyTorch: %s", self.model.arch, tower, self.reasons[key])
                return None
            self._sessions[skey] = sess
            return sess

    def _int8(self, tower: str, size: Optional[int], path, meta: dict):
        """The int8 graph derived from the float32 export ``path`` (runtime/quantize.py), or
        ``path`` itself, with one logged line, when it does not quantize or is not faithful."""
        from .quantize import cached_int8

        q, qmeta = cached_int8(self.model, tower, size, path, meta)
        if q is None:
            self.int8[tower] = {"precision": "fp32", "reason": qmeta.get("reason", "int8 unavailable")}
            log.warning("rsviewer: %s %s tower runs in float32: %s", self.model.arch, tower, self.int8[tower]["reason"])
            return path
        self.int8[tower] = {"precision": "int8", "fidelity": qmeta.get("fidelity", {})}
        return q

    def workers(self, tower: str, size: Optional[int] = None) -> int:
        """How many threads batch work should call this tower from at once, each through the
        tower's 1-thread session (``threads=1``). Measured on the demo index (2-core EPYC,
        docs/runtime.md): two threads sharing a 1-thread session ran the image tower in
        1.1–1.2 s, one 2-thread session in 1.5–2.5 s; ORT sessions take concurrent calls.
        Only for ONNX Runtime on the CPU with the graph loaded; else 1 (torch, OpenVINO)."""
        if self.runtime != "onnx" or self.model.device.type != "cpu" or default_threads() < 2:
            return 1
        return default_threads() if self._get(tower, size, 1) is not None else 1

    def precisions(self) -> dict[str, str]:
        """The precision each tower ran at so far: ``{"image": "int8"|"fp32", "text": ...}``."""
        return {t: self.int8.get(t, {}).get("precision", "fp32") for t in ("image", "text")}

    # -- towers --------------------------------------------------------------------------
    @torch.no_grad()
    def image_states(self, pixels: torch.Tensor, threads: Optional[int] = None) -> dict[str, torch.Tensor]:
        """``model.image_states(pixels)`` as CPU float tensors; square inputs of any side
        (one export per side)."""
        b, c, h, w = pixels.shape
        sess = self._get("image", int(h), threads or default_threads()) if h == w else None
        if sess is None:
            from ..utils.device import autocast

            with autocast(self.model.device):
                st = self.model.image_states(pixels.to(self.model.device))
            return {k: v.float().cpu() for k, v in st.items()}
        names = self._meta["image"]["outputs"]
        out = sess.run(names, {"pixels": np.ascontiguousarray(pixels.detach().cpu().numpy(), np.float32)})
        return {k: torch.from_numpy(v) for k, v in zip(names, out)}

    def maps_available(self) -> bool:
        """Is the ``feature_maps`` graph (shared-map localization) running in ONNX Runtime?"""
        if self.runtime not in GRAPH_RUNTIMES or not callable(getattr(self.model, "feature_maps", None)):
            return False
        return self._get("maps", None, default_threads()) is not None

    @torch.no_grad()
    def feature_maps(self, pixels: torch.Tensor, threads: Optional[int] = None) -> dict[str, torch.Tensor]:
        """``model.feature_maps(pixels)`` for inputs whose sides are multiples of 32 (what the
        graph is valid for); other sizes, or no graph, run in PyTorch."""
        h, w = pixels.shape[-2:]
        sess = self._get("maps", None, threads or default_threads()) if h % 32 == 0 and w % 32 == 0 else None
        if sess is None:
            return {k: v.float() for k, v in self.model.feature_maps(pixels.float().to(self.model.device)).items()}
        names = self._meta["maps"]["outputs"]
        out = sess.run(names, {"pixels": np.ascontiguousarray(pixels.detach().float().cpu().numpy())})
        return {k: torch.from_numpy(v) for k, v in zip(names, out)}

    @torch.no_grad()
    def text_states(self, texts: Sequence[str], threads: Optional[int] = None) -> dict[str, torch.Tensor]:
        """``model.text_states(texts)`` as CPU float tensors; a few texts (a query) run
        with ``QUERY_THREADS``, batches with the torch thread count."""
        texts = [check_query(t) for t in texts]
        th = threads or (QUERY_THREADS if len(texts) <= QUERY_BATCH else default_threads())
        sess = self._get("text", None, th)
        if sess is None:
            from ..utils.device import autocast

            with autocast(self.model.device):
                st = self.model.text_states(texts)
            return {k: v.float().cpu() for k, v in st.items()}
        meta = self._meta["text"]
        toks = self.model.tokenize(texts)
        out = sess.run(meta["outputs"], {k: toks[k].cpu().numpy() for k in meta["inputs"]})
        return {k: torch.from_numpy(v) for k, v in zip(meta["outputs"], out)}

    def prepare(self, specs) -> None:
        """Export (once per fingerprint) the ``(tower, size)`` graphs ``specs`` ahead of use."""
        from .export import prepare_towers

        prepare_towers(self.model, specs)

    def info(self) -> dict:
        """What runs where: ``{"runtime", "image": "onnx"|"torch (reason)", "text": ..., "parity"}``."""
        def where(tower):
            bad = [r for (t, _), r in self.reasons.items() if t == tower]
            if self.runtime not in GRAPH_RUNTIMES:
                return "torch"
            if bad:
                return f"torch ({bad[0]})"
            return self.runtime if tower in self._meta else f"{self.runtime} (not loaded yet)"

        out = {"runtime": self.runtime, "image": where("image"), "text": where("text")}
        if "maps" in self._meta or any(t == "maps" for t, _ in self.reasons):
            out["maps"] = where("maps")
        if self.precision != "fp32":
            out.update(precision=self.precisions(), int8=self.int8)
        return {**out, "parity": self.parity}


class MemberTowers:
    """The towers of a model made of other models (an ensemble: ``model.runtime_members``).
    Each member runs in its own memoised :class:`Towers` — its own export, parity check and
    fallback — and the model combines their states, so an ensemble of exportable models
    runs in ONNX Runtime without a graph of its own. Same interface as :class:`Towers`."""

    def __init__(self, model, runtime: str = "auto", precision: str = "fp32"):
        self.model = model
        self.runtime = resolve_runtime(runtime, model)
        self.precision = check_runtime_precision(self.runtime, precision)
        self.members = [towers(m, runtime, precision) for m in model.runtime_members]

    def workers(self, tower: str, size: Optional[int] = None) -> int:
        """As :meth:`Towers.workers`, when every member's tower runs in ONNX Runtime."""
        return min(tw.workers(tower, size) for tw in self.members)

    def precisions(self) -> dict[str, str]:
        """Per tower: the precision every member ran at, or ``mixed``."""
        per = [tw.precisions() for tw in self.members]
        return {t: (per[0][t] if len({p[t] for p in per}) == 1 else "mixed") for t in ("image", "text")}

    @torch.no_grad()
    def image_states(self, pixels: torch.Tensor, threads: Optional[int] = None) -> dict[str, torch.Tensor]:
        st = self.model.image_states(pixels.cpu(), member_states=lambda i, x: self.members[i].image_states(x, threads))
        return {k: v.float().cpu() for k, v in st.items()}

    @torch.no_grad()
    def text_states(self, texts: Sequence[str], threads: Optional[int] = None) -> dict[str, torch.Tensor]:
        st = self.model.text_states(list(texts), member_states=lambda i, t: self.members[i].text_states(t, threads))
        return {k: v.float().cpu() for k, v in st.items()}

    def maps_available(self) -> bool:
        return False  # no shared feature maps of its own: localization encodes windows

    def feature_maps(self, pixels: torch.Tensor, threads: Optional[int] = None) -> dict[str, torch.Tensor]:
        return self.model.feature_maps(pixels)

    def prepare(self, specs) -> None:
        for tw in self.members:
            tw.prepare(specs)

    def info(self) -> dict:
        """Like :meth:`Towers.info`, each tower as ``member: where`` for every member."""
        infos = [(getattr(tw.model, "name", tw.model.arch), tw.info()) for tw in self.members]
        out = {"runtime": self.runtime}
        for tower in ("image", "text"):
            out[tower] = "; ".join(f"{name}: {i[tower]}" for name, i in infos)
        if self.precision != "fp32":
            out.update(precision=self.precisions(), int8={name: i.get("int8", {}) for name, i in infos})
        return {**out, "parity": {name: i["parity"] for name, i in infos}}


def check_runtime_precision(runtime: str, precision: str) -> str:
    """``precision`` if the resolved ``runtime`` can run it: int8 graphs need ONNX Runtime or
    OpenVINO (they are derived from the ONNX exports)."""
    from .quantize import check_precision

    check_precision(precision)
    if precision == "int8" and runtime not in GRAPH_RUNTIMES:
        raise RuntimeError_("precision int8 runs the quantized ONNX graphs: use --runtime auto or onnx, "
                            "with ONNX Runtime installed and the model on the CPU")
    return precision


def towers(model, runtime: str = "auto", precision: str = "fp32"):
    """The memoised :class:`Towers` of ``model`` for ``runtime`` and ``precision``
    (:class:`MemberTowers` for a model made of members)."""
    name = resolve_runtime(runtime, model)
    key = name if precision == "fp32" else (name, precision)
    with _lock:
        per = _towers.setdefault(model, {})
        tw = per.get(key)
    if tw is None:  # outside the lock: MemberTowers makes its members' towers through towers()
        kind = MemberTowers if hasattr(model, "runtime_members") else Towers
        made = kind(model, name, precision)
        with _lock:
            tw = per.setdefault(key, made)
    return tw


def warm_up(model, runtime: str = "auto", precision: str = "fp32") -> dict:
    """Load (exporting once per model fingerprint, quantizing once for ``int8``) both towers
    and run each once, so the first user query is warm. Returns :meth:`Towers.info`. Safe to
    call from a worker thread."""
    tw = towers(model, runtime, precision)
    if tw.runtime in GRAPH_RUNTIMES:
        tw.prepare([("text", None), ("image", model.image_size)])  # one child for both (the app)
    tw.text_states(["a warm-up query"])
    tw.text_states(["a"] * (QUERY_BATCH + 1))  # the batch session too (index building)
    from .export import image_example

    tw.image_states(image_example(model, 1, model.image_size, 0))
    return tw.info()
