"""int8 copies of a model's exported float32 towers (``precision="int8"``).

Index building over a large gallery is the one place where a measured, small loss of
fidelity buys a lot of time on any CPU (ORT's int8 kernels use VNNI where the CPU has it
and AVX2's ``vpmaddubsw`` otherwise). So ``precision="int8"`` derives, from the parity-
checked float32 export and once per model fingerprint:

- the **image** graph, statically quantized (QDQ, int8 weights per output channel, uint8
  activations with min/max ranges calibrated on ``assets/calibration``: 42 UCM *train*
  images, two per class — never an image of a split anyone evaluates on);
- the **text** graph, dynamically quantized (int8 MatMul weights per channel; activations
  are quantized per call, so it needs no calibration).

An int8 graph cannot pass the float32 parity (cosine ≥ 0.9999), so it gets its own,
looser fidelity check against the float32 graph on inputs it was not calibrated on (the
demo gallery's val images; check texts): mean cosine ≥ ``MIN_MEAN_COS`` and every row ≥
``MIN_ROW_COS``, recorded in the sidecar. A graph that fails, or does not quantize, is
refused: the tower runs its float32 graph and says why (one logged line). Queries, and
everything else, stay float32; the index records the precision it was built with.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from ..utils.atomic import atomic_file, write_json

log = logging.getLogger("rsviewer.runtime")

PRECISIONS = ("fp32", "int8")
QUANT_VERSION = 2  # bump when the recipe below changes what a cached int8 graph is
MIN_MEAN_COS = 0.99  # measured on real images: mean 0.996, so this catches a broken recipe, not noise
MIN_ROW_COS = 0.95
ASSETS = Path(__file__).resolve().parents[2] / "assets"
CALIBRATION = ASSETS / "calibration"
CHECK_GALLERY = ASSETS / "gallery" / "images"
CHECK_IMAGES = 16
CALIBRATION_BATCH = 8


def check_precision(precision: str) -> str:
    from ..errors import RsviewerError

    if precision not in PRECISIONS:
        raise RsviewerError(f"unknown precision {precision!r}; use {', '.join(PRECISIONS)}")
    return precision


def int8_paths(fp32_path: Path) -> tuple[Path, Path]:
    stem = fp32_path.with_suffix("")
    return Path(f"{stem}-int8.onnx"), Path(f"{stem}-int8.json")


def _images(folder: Path, limit: Optional[int] = None) -> list[Path]:
    files = sorted(p for p in folder.glob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png", ".tif", ".tiff"))
    return files[:limit] if limit else files


def _pixels(model, files: Sequence[Path], size: int) -> np.ndarray:
    from ..data import load_image

    x = model.preprocess([load_image(p) for p in files])
    if x.shape[-1] != size:  # a tower exported for another side than the model's own
        import torch.nn.functional as F

        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    return np.ascontiguousarray(x.numpy(), np.float32)


def _check_texts(model) -> list[str]:
    from .export import CHECK_TEXTS, TRACE_TEXTS

    return list(CHECK_TEXTS) + list(TRACE_TEXTS) + [
        "a baseball diamond surrounded by green grass", "two white planes at the airport",
        "many buildings and some green trees are on two sides of a railway", "a large ship in the harbour"]


def _feeds(model, tower: str, size: Optional[int], meta: dict) -> tuple[list[dict], list[dict]]:
    """(calibration feeds, check feeds) for ``tower``; the check inputs are never calibrated on."""
    if tower == "image":
        cal = _pixels(model, _images(CALIBRATION), size)
        chk = _pixels(model, _images(CHECK_GALLERY, CHECK_IMAGES), size)
        return ([{"pixels": cal[k : k + CALIBRATION_BATCH]} for k in range(0, len(cal), CALIBRATION_BATCH)],
                [{"pixels": chk}])
    toks = {k: v.cpu().numpy() for k, v in model.tokenize(_check_texts(model)).items()}
    return [], [{k: toks[k] for k in meta["inputs"]}]


def _fidelity(ref: Sequence[np.ndarray], got: Sequence[np.ndarray], names: Sequence[str]) -> dict:
    out = {}
    for n, r, g in zip(names, ref, got):
        a = r.reshape(r.shape[0], -1).astype(np.float64)
        b = g.reshape(g.shape[0], -1).astype(np.float64)
        cos = (a * b).sum(1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-12)
        # an all-zero row on both sides (a padded mask) agrees exactly
        cos = np.where((np.abs(a).max(1) == 0) & (np.abs(b).max(1) == 0), 1.0, cos)
        out[n] = {"mean_cos": float(cos.mean()), "min_cos": float(cos.min()), "rows": int(len(cos))}
    return out


def _fidelity_ok(fid: dict) -> bool:
    return all(v["mean_cos"] >= MIN_MEAN_COS and v["min_cos"] >= MIN_ROW_COS for v in fid.values())


def _quantize(tower: str, src: Path, dst: Path, calibration: list[dict], tmp: Path) -> None:
    from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType,
                                          quantize_dynamic, quantize_static)
    from onnxruntime.quantization.shape_inference import quant_pre_process

    pre = tmp / "pre.onnx"
    # ONNX shape inference + ORT's graph optimisation first (the quantizer's advice). Not
    # ORT's symbolic shape inference: where it cannot finish (the text graph's dynamic
    # lengths) it saves a temporary model into the current directory, the user's folder;
    # on the default image graph it made no difference (same cosines, same speed)
    quant_pre_process(str(src), str(pre), skip_symbolic_shape=True)
    if tower == "image":
        class Reader(CalibrationDataReader):
            def __init__(self):
                self.it = iter(calibration)

            def get_next(self):
                return next(self.it, None)

        quantize_static(str(pre), str(dst), Reader(), quant_format=QuantFormat.QDQ,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, per_channel=True,
                        calibrate_method=CalibrationMethod.MinMax)
    else:
        quantize_dynamic(str(pre), str(dst), weight_type=QuantType.QInt8, per_channel=True)


@contextlib.contextmanager
def _root_logger_quiet():
    root = logging.getLogger()
    was, root.disabled = root.disabled, True  # only records logged on the root logger itself
    try:
        yield
    finally:
        root.disabled = was


def _run(path: Path, feeds: list[dict], names: Sequence[str]) -> list[np.ndarray]:
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    parts = [sess.run(list(names), f) for f in feeds]
    return [np.concatenate([p[i] for p in parts]) for i in range(len(names))]


def build_int8(model, tower: str, size: Optional[int], fp32_path: Path, fp32_meta: dict) -> dict:
    """Quantize the float32 graph at ``fp32_path`` and check it; returns the sidecar dict
    (``status`` "ok" | "failed" | "mismatch", with ``reason``). Writes both files atomically."""
    from .export import _sha256

    path, side = int8_paths(fp32_path)
    names = fp32_meta["outputs"]
    meta = {"tower": tower, "precision": "int8", "quant": QUANT_VERSION, "source_sha256": fp32_meta.get("sha256"),
            "recipe": ("static QDQ, per-channel int8 weights, uint8 activations, min/max over "
                       f"{len(_images(CALIBRATION))} calibration images" if tower == "image" else
                       "dynamic, per-channel int8 MatMul weights"), "pid": os.getpid()}
    try:
        import onnxruntime

        meta["onnxruntime"] = onnxruntime.__version__
        calibration, check = _feeds(model, tower, size, fp32_meta)
        if tower == "image" and not calibration:
            raise FileNotFoundError(f"no calibration images in {CALIBRATION}")
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=path.parent, prefix=".int8-") as tmp, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            q = Path(tmp) / "int8.onnx"
            with _root_logger_quiet():  # the quantizer logs a line per node through the root logger
                _quantize(tower, fp32_path, q, calibration, Path(tmp))
            fid = _fidelity(_run(fp32_path, check, names), _run(q, check, names), names)
            meta["fidelity"] = fid
            if not _fidelity_ok(fid):
                meta.update(status="mismatch", reason=f"int8 differs from float32 beyond mean cos {MIN_MEAN_COS} / "
                                                      f"row cos {MIN_ROW_COS}: {fid}")
            else:
                with atomic_file(path) as fh, open(q, "rb") as src:
                    shutil.copyfileobj(src, fh)
                meta.update(status="ok", sha256=_sha256(path), bytes=path.stat().st_size)
    except Exception as e:  # noqa: BLE001 — a graph that does not quantize runs in float32
        meta.update(status="failed", reason=f"int8 quantization failed: {type(e).__name__}: {str(e).splitlines()[0][:200]}")
    if meta["status"] != "ok":
        path.unlink(missing_ok=True)
    write_json(side, meta)
    return meta


def cached_int8(model, tower: str, size: Optional[int], fp32_path: Path, fp32_meta: dict) -> tuple[Optional[Path], dict]:
    """The int8 graph derived from the float32 export at ``fp32_path`` (built once: a sidecar
    for another float32 graph or recipe, or a damaged file, is rebuilt; a refusal is kept)."""
    from .export import _sha256

    path, side = int8_paths(fp32_path)
    meta = None
    try:
        meta = json.loads(side.read_text()) if side.exists() else None
    except (OSError, ValueError):
        meta = None
    if not isinstance(meta, dict) or meta.get("quant") != QUANT_VERSION or meta.get("source_sha256") != fp32_meta.get("sha256"):
        meta = None
    if meta is not None and meta.get("status") in ("failed", "mismatch"):
        return None, meta
    if meta is not None and meta.get("status") == "ok":
        try:
            if path.stat().st_size == meta.get("bytes") and _sha256(path) == meta.get("sha256"):
                return path, {**meta, "cache_hit": True}
        except OSError:
            pass
        log.warning("rsviewer: cached int8 graph %s is damaged; rebuilding it", path.name)
    meta = build_int8(model, tower, size, fp32_path, fp32_meta)
    return (path if meta["status"] == "ok" else None), {**meta, "cache_hit": False}
