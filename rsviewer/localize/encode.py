"""Window embeddings: the exact per-crop mode and the shared-feature-map ("fast") mode.

**crops** (SeLo, faithful): every window is read from the scene, resized to the model
input (area averaging when shrinking) and encoded on its own, in batches, through the
generic ``model.image_states`` (any architecture).

**fast** (fully convolutional sliding window): for each window size the scene is
resampled once so that a window spans exactly the model input (256 px for the default
model), the backbone runs over it in tiles, and each window's embedding is obtained by
applying the model's own pooling to the window's region of the feature maps, then its
image head: ``model.image_head({key: model.pool(maps[window])})``. The overlapping
windows of both SeLo grids then share the backbone work, which is where the time goes.
It needs a model that exposes ``feature_maps(pixels) -> {"s8"|"s16"|"s32": map}`` and
``pool(maps)`` such that ``image_features(x) == {key: pool(feature_maps(x))}`` (checked
numerically on a random input, once per model); other architectures fall back to crops.
What differs from crops: a window's features see the neighbouring scene instead of the
crop's zero padding, and a window that SeLo places flush with the border is snapped to
the nearest 32 px (model input scale) feature cell.

Tiles are ``tile`` × ``tile`` stride-32 cells (1024 px at model scale) plus a ``halo``
of cells of context on each side, so memory does not grow with the scene: only a band
of feature-map rows tall enough for one window is kept.

Runtime (``runtime="auto"``, :mod:`rsviewer.runtime`): on a CPU without bf16 support
(``precision`` resolves to fp32), with ONNX Runtime installed, the backbone's feature maps (shared-map mode, tiles whose sides are multiples of 32 px;
others in PyTorch) and the image states (crops) run as exported ONNX graphs, in fp32;
pooling and heads stay in PyTorch. ``runtime="torch"`` is the path described next.

Speed on CPU (``runtime="torch"``): bf16 with channels-last inputs (oneDNN) when the CPU has AVX512-BF16/AMX
(``precision="auto"``), fp32 otherwise; for an EfficientNet-Lite backbone an inference
copy with BatchNorm folded and the padding done inside the convolutions
(:mod:`.fused`) replaces ``model.feature_maps`` (same function); CUDA uses the
project's autocast. Only the backbone runs in reduced precision; pooling and heads run
in fp32.
"""
from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import threading
import weakref
from typing import Callable, Optional

import numpy as np
import torch

from ..errors import Cancelled
from ..utils.progress import check, report
from .scene import Scene

__all__ = ["encode_windows", "fast_support", "model_fingerprint", "resolve_precision", "cancel_hooks"]

_fast_cache: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
_fp_cache: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


# ---- model facts ---------------------------------------------------------------------------
def model_fingerprint(model) -> str:
    """The checkpoint fingerprint when loaded from a model folder, else a hash of the
    trained tensors (models built in code, tests)."""
    fp = getattr(model, "fingerprint", None)
    if fp:
        return str(fp)
    if model in _fp_cache:
        return _fp_cache[model]
    h = hashlib.sha256(f"{type(model).__module__}.{type(model).__name__}".encode())
    for k, v in sorted(model.trained_state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    fp = "h" + h.hexdigest()[:16]
    _fp_cache[model] = fp
    return fp


def resolve_precision(precision: str, device: torch.device) -> str:
    """``auto`` → ``bf16`` on a CPU with AVX512-BF16 or AMX, ``amp`` on CUDA, else ``fp32``."""
    if precision != "auto":
        if precision not in ("fp32", "bf16", "amp"):
            raise ValueError(f"unknown precision {precision!r}; use auto, fp32, bf16 or amp")
        return precision
    if device.type == "cuda":
        return "amp"
    try:
        ok = bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    except Exception:
        ok = False
    return "bf16" if ok else "fp32"


def _autocast(precision: str, device: torch.device):
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    if precision == "amp" and device.type == "cuda":
        from ..utils.device import autocast

        return autocast(device)
    return contextlib.nullcontext()


def _prep(model, arr: np.ndarray, precision: str, bf16_input: bool = False) -> torch.Tensor:
    """(B, H, W, 3) uint8 → normalised (B, 3, H, W) in channels-last layout.

    With the base class's ``preprocess_array`` (mean/std normalisation) this is done in
    one pass on the NHWC data (which *is* channels-last), in bf16 when ``bf16_input``
    (the fused bf16 backbone consumes it); a model that overrides ``preprocess_array``
    gets its own."""
    from ..archs.base import RetrievalModel

    dev = model.device
    if type(model).preprocess_array is RetrievalModel.preprocess_array:
        std = torch.tensor(model.std, dtype=torch.float32)
        mean = torch.tensor(model.mean, dtype=torch.float32)
        x = torch.from_numpy(np.ascontiguousarray(arr)).to(dev).float()
        # one fp32 multiply-add over the NHWC data (the channel is the innermost axis), then
        # one rounding to bf16: 3.7 ms for a 1,088² tile against 11–12 ms for a bf16 mul_ and
        # sub_ over the permuted tensor (docs/runtime.md)
        x = torch.addcmul((-mean / std).to(dev), x, (1.0 / (255.0 * std)).to(dev))
        if bf16_input and precision == "bf16":
            x = x.to(torch.bfloat16)
        return x.permute(0, 3, 1, 2)  # channels-last strides (the permuted NHWC buffer)
    x = model.preprocess_array(arr).to(dev)
    return x.contiguous(memory_format=torch.channels_last)


@contextlib.contextmanager
def cancel_hooks(model, cancel, *extra):
    """Check ``cancel`` before every sub-module's forward (this thread only), so a long
    batch or tile stops within a fraction of a second."""
    if cancel is None:
        yield
        return
    tid = threading.get_ident()

    def hook(_mod, _args):
        if threading.get_ident() == tid:
            check(cancel)

    mods = [m for root in (model, *[e for e in extra if e is not None]) for m in root.modules()]
    handles = [m.register_forward_pre_hook(hook) for m in mods]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def fast_support(model, input_size: int, probe: bool = True) -> tuple[bool, str, tuple[str, ...]]:
    """Can ``model`` run the shared-feature-map mode? Returns (ok, feats key or reason,
    map names ``pool`` needs). Checked once per model by comparing with
    ``image_features`` on a random input. ``probe=False``: the memoised answer if there
    is one, else the structural answer only (no forward pass; for cache look-ups)."""
    key = (input_size,)
    cached = _fast_cache.get(model, {}).get(key)
    if cached is not None:
        return cached
    res: tuple[bool, str, tuple[str, ...]]
    structural = (
        not getattr(model, "pairwise", False)
        and callable(getattr(model, "feature_maps", None))
        and callable(getattr(model, "pool", None))
        and input_size % 32 == 0
    )
    if not probe:
        return (structural, "" if structural else "not supported", ())
    if getattr(model, "pairwise", False):
        res = (False, "pairwise architecture", ())
    elif not (callable(getattr(model, "feature_maps", None)) and callable(getattr(model, "pool", None))):
        res = (False, f"{getattr(model, 'arch', type(model).__name__)} has no feature_maps()/pool()", ())
    elif input_size % 32:
        res = (False, "input size is not a multiple of 32", ())
    else:
        try:
            g = torch.Generator().manual_seed(0)
            x = torch.randn(2, 3, 96, 96, generator=g).to(model.device)
            with torch.inference_mode():
                ref = model.image_features(x)
                maps = model.feature_maps(x)
                pooled = model.pool(maps)
                names = [k for k in maps if _stride(k)]
                if len(ref) != 1 or len(names) != len(maps):
                    raise ValueError("unexpected feature layout")
                fkey = next(iter(ref))
                if not torch.allclose(ref[fkey], pooled, atol=1e-4, rtol=1e-4):
                    raise ValueError("pool(feature_maps(x)) != image_features(x)")
                needed = []
                for k in names:  # the maps pool actually reads
                    try:
                        model.pool({kk: v for kk, v in maps.items() if kk != k})
                    except (KeyError, IndexError, RuntimeError):
                        needed.append(k)
                if not needed:
                    needed = names
            res = (True, fkey, tuple(needed))
        except Cancelled:
            raise  # not a verdict on the model: nothing is memoised
        except Exception as e:  # noqa: BLE001 — any mismatch: use crops, and say why (info["fallback"] too)
            res = (False, f"shared-map check failed ({type(e).__name__}: {e})", ())
            logging.getLogger("rsviewer.localize").warning(
                "%s: shared-map mode unavailable, using crops: %s", getattr(model, "arch", type(model).__name__), res[1])
    _fast_cache.setdefault(model, {})[key] = res
    return res


def _features_fn(model, precision: str, tw=None):
    """``pixels -> feature maps`` for the shared-map and crop paths: the ONNX graph when
    ``tw`` (the model's :class:`~rsviewer.runtime.Towers`) has one (fp32; the PyTorch path
    below for tile sizes the graph does not take), else the fused inference copy of an
    EfficientNet-Lite backbone on CPU (see :mod:`.fused`), else ``model.feature_maps``
    under the precision's autocast. Returns (fn, fused module)."""
    dev = model.device
    if tw is not None and tw.maps_available():
        torch_fn, fused = _features_fn(model, "fp32")

        def fn(x):
            if x.shape[-2] % 32 == 0 and x.shape[-1] % 32 == 0:
                return tw.feature_maps(x)
            return torch_fn(x.float())

        return fn, fused
    if dev.type == "cpu":
        from .fused import fused_backbone

        fb = fused_backbone(model, torch.bfloat16 if precision == "bf16" else torch.float32)
        if fb is not None:
            return fb.forward_features, fb

    def fn(x):
        with _autocast(precision, dev):
            return model.feature_maps(x)

    return fn, None


def _stride(name: str) -> int:
    if name.startswith("s") and name[1:].isdigit():
        return int(name[1:])
    return 0


# ---- crops -------------------------------------------------------------------------------------
def _encode_crops(model, scene: Scene, boxes: np.ndarray, input_size: int, precision: str,
                  batch_size: int, tick: Callable[[int], None], cancel,
                  score_fn: Optional[Callable] = None, features=None, feats_key: Optional[str] = None,
                  bf16_input: bool = False, tw=None):
    n = len(boxes)
    embs: list[np.ndarray] = []
    scores: list[np.ndarray] = []
    S = int(input_size)
    for a in range(0, n, batch_size):
        check(cancel)
        chunk = boxes[a : a + batch_size]
        arr = np.stack([scene.read_region(int(x), int(y), int(s), int(s), (S, S)) for x, y, s in chunk])
        check(cancel)
        use_features = features is not None and score_fn is None
        x = _prep(model, arr, precision, bf16_input and use_features)
        if use_features:  # same function as image_states, faster
            with torch.inference_mode():
                maps = {k: v.float() for k, v in features(x).items()}
                states = {"emb": model.image_head({feats_key: model.pool(maps)})}
        elif tw is not None:  # ONNX image tower (falls back to torch by itself)
            states = tw.image_states(x)
        else:
            with torch.inference_mode(), _autocast(precision, model.device):
                states = model.image_states(x)
        states = {k: v.float() for k, v in states.items()}
        embs.append(torch.nn.functional.normalize(states["emb"], dim=-1).cpu().numpy())
        if score_fn is not None:
            with torch.inference_mode():
                scores.append(np.asarray(score_fn(states), dtype=np.float64))
        tick(len(chunk))
    emb = np.concatenate(embs) if embs else np.zeros((0, 0), np.float32)
    return emb.astype(np.float32), (np.concatenate(scores) if score_fn is not None and scores else None)


# ---- shared feature maps ---------------------------------------------------------------------
def _fast_geometry(scene_size, side: int, input_size: int):
    W, H = scene_size
    f = input_size / side
    Ws, Hs = max(input_size, round(W * f)), max(input_size, round(H * f))
    return Ws, Hs, Ws / W, Hs / H


def fast_tile_count(scene_size, side: int, input_size: int, tile: int) -> int:
    Ws, Hs, _, _ = _fast_geometry(scene_size, side, input_size)
    return math.ceil(math.ceil(Ws / 32) / tile) * math.ceil(math.ceil(Hs / 32) / tile)


def _encode_fast_scale(model, scene: Scene, boxes: np.ndarray, input_size: int, precision: str,
                       feats_key: str, names: tuple[str, ...], tile: int, halo: int,
                       tick: Callable[[int], None], tile_tick: Callable[[], None], cancel,
                       features: Callable, bf16_input: bool = False, pool_batch: int = 128) -> np.ndarray:
    """Embeddings of windows that all have the same side, from shared feature maps."""
    W, H = scene.size
    side = int(boxes[0, 2])
    k = input_size // 32
    Ws, Hs, sx, sy = _fast_geometry((W, H), side, input_size)
    ncx, ncy = math.ceil(Ws / 32), math.ceil(Hs / 32)
    c0 = np.clip(np.rint(boxes[:, 0] * sx / 32).astype(np.int64), 0, max(0, ncx - k))
    r0 = np.clip(np.rint(boxes[:, 1] * sy / 32).astype(np.int64), 0, max(0, ncy - k))
    order = np.argsort(r0, kind="stable")
    out = np.zeros((len(boxes), 0), np.float32)
    emb_parts: dict[int, np.ndarray] = {}
    done = 0  # windows of `order` already encoded
    hp = halo * 32
    bands: list[tuple[int, int, dict[str, torch.Tensor]]] = []  # (row0, row1, maps)
    dev = model.device
    for b0 in range(0, ncy, tile):
        b1 = min(ncy, b0 + tile)
        band = _read_band(scene, model, names, b0, b1, ncx, tile, hp, (Ws, Hs), (sx, sy), precision,
                          bf16_input, features, tile_tick, cancel)
        bands.append((b0, b1, band))
        # windows whose rows are all available now
        ready_end = done
        while ready_end < len(order) and r0[order[ready_end]] + k <= b1:
            ready_end += 1
        if ready_end > done:
            buf_r0, buf = _band_buffer(bands, int(r0[order[done:ready_end]].min()), names)
            for a in range(done, ready_end, pool_batch):
                check(cancel)
                idx = order[a : min(ready_end, a + pool_batch)]
                sel = {}
                for name in names:
                    st = _stride(name)
                    fac = 32 // st
                    kk = k * fac
                    m = buf[name]  # (rows, cols, C): each gathered cell is one contiguous run of C
                    rr = (torch.as_tensor((r0[idx] - buf_r0) * fac)[:, None] + torch.arange(kk)).to(m.device)
                    cc = (torch.as_tensor(c0[idx] * fac)[:, None] + torch.arange(kk)).to(m.device)
                    sel[name] = m[rr[:, :, None], cc[:, None, :]].permute(0, 3, 1, 2)  # (n, C, k, k), channels-last
                with torch.inference_mode():
                    emb = model.image_head({feats_key: model.pool(sel)})
                emb = torch.nn.functional.normalize(emb.float(), dim=-1).cpu().numpy()
                for j, i in enumerate(idx):
                    emb_parts[int(i)] = emb[j]
                tick(len(idx))
            done = ready_end
            del buf
        # drop the rows no remaining window needs (memory: at most one window's height of rows stays)
        if done < len(order):
            bands = _trim_bands(bands, int(r0[order[done:]].min()), names)
        else:
            bands.clear()
    if len(emb_parts) != len(boxes):  # pragma: no cover - geometry guarantees this
        raise RuntimeError(f"fast mode encoded {len(emb_parts)} of {len(boxes)} windows")
    out = np.stack([emb_parts[i] for i in range(len(boxes))]).astype(np.float32)
    return out


def _read_band(scene, model, names, b0: int, b1: int, ncx: int, tile: int, hp: int, scaled, scale,
               precision: str, bf16_input: bool, features: Callable, tile_tick, cancel) -> dict:
    """Feature-map rows ``b0:b1`` (stride-32 cells) of the resampled scene, tile by tile.

    Memory: each tile's maps are copied into one preallocated band per map (no list of
    tiles plus a concatenated copy), and the tile's full maps are freed before the next
    read, so the band plus one tile is the peak. A band is ``(rows, cols, C)``: the
    backbone's channels-last maps copy into it without a transpose, and a window's cells
    gather as contiguous runs of channels (measured: docs/runtime.md)."""
    Ws, Hs = scaled
    sx, sy = scale
    band: dict[str, torch.Tensor] = {}
    for t0 in range(0, ncx, tile):
        check(cancel)
        t1 = min(ncx, t0 + tile)
        px0, px1 = max(0, t0 * 32 - hp), min(Ws, t1 * 32 + hp)
        py0, py1 = max(0, b0 * 32 - hp), min(Hs, b1 * 32 + hp)
        X0, X1 = int(round(px0 / sx)), int(round(px1 / sx))
        Y0, Y1 = int(round(py0 / sy)), int(round(py1 / sy))
        arr = scene.read_region(X0, Y0, max(1, X1 - X0), max(1, Y1 - Y0), (px1 - px0, py1 - py0))
        check(cancel)
        x = _prep(model, arr[None], precision, bf16_input)
        del arr
        with torch.inference_mode():
            maps = features(x)
        del x
        for name in names:
            st = _stride(name)
            fac = 32 // st
            m = maps[name][0]
            if name not in band:  # zeros: a partial cell at the scene border stays zero-padded
                band[name] = torch.zeros(((b1 - b0) * fac, ncx * fac, m.shape[0]), dtype=torch.float32, device=m.device)
            oy, ox = (b0 * 32 - py0) // st, (t0 * 32 - px0) // st
            hh, ww = (b1 - b0) * fac, (t1 - t0) * fac
            m = m[:, oy : oy + hh, ox : ox + ww]
            band[name][: m.shape[1], t0 * fac : t0 * fac + m.shape[2]] = m.permute(1, 2, 0)
        del maps, m
        tile_tick()
    return band


def _band_buffer(bands: list, row0: int, names) -> tuple[int, dict]:
    """Rows ``row0:`` of the kept bands as one map per name (no copy when one band holds them)."""
    bands[:] = _trim_bands(bands, row0, names)
    if len(bands) == 1:
        return bands[0][0], bands[0][2]
    return bands[0][0], {name: torch.cat([bd[2][name] for bd in bands], 0) for name in names}


def _trim_bands(bands: list, need: int, names) -> list:
    """Drop bands that end above row ``need`` and cut the first kept one to start at it
    (a view copied out, so the rows above are freed)."""
    kept = [bd for bd in bands if bd[1] > need]
    if kept and kept[0][0] < need:
        b0, b1, maps = kept[0]
        cut = {}
        for name in names:
            fac = 32 // _stride(name)
            cut[name] = maps[name][(need - b0) * fac :].clone()
        kept[0] = (need, b1, cut)
    return kept


# ---- entry point ----------------------------------------------------------------------------
def encode_windows(model, scene: Scene, boxes: np.ndarray, *, mode: str = "fast", input_size: Optional[int] = None,
                   precision: str = "auto", batch_size: Optional[int] = None, tile: int = 32, halo: int = 1,
                   progress=None, cancel=None, message: str = "encoding windows",
                   score_fn: Optional[Callable] = None,
                   runtime: str = "auto") -> tuple[np.ndarray, Optional[np.ndarray], dict]:
    """Unit embeddings (N, D) of the windows ``boxes`` (N, 3) ``(x, y, side)``.

    ``mode``: ``"fast"`` (shared feature maps; falls back to crops when the model cannot)
    or ``"crops"``. ``score_fn(states) -> (B,)`` (crops only): also score each batch of
    image states directly (pairwise architectures). ``runtime``: ``auto`` | ``onnx`` |
    ``torch`` (module docstring). Returns (emb, scores or None, info).
    """
    from ..runtime import resolve_runtime, towers

    dev = model.device
    S = int(input_size or model.image_size)
    prec = resolve_precision(precision, dev)
    tw = towers(model, runtime) if resolve_runtime(runtime, model) != "torch" else None
    if tw is not None and runtime == "auto" and prec == "bf16":
        # measured (docs/runtime.md): on a CPU with AVX512-BF16/AMX the fused bf16 torch backbone
        # beats the fp32 graph (10,240 px first query 18.8 s vs 22.9 s); without bf16 the graph wins
        tw = None
    if tw is not None:
        prec = "fp32"  # the ONNX graphs are fp32; so is the PyTorch path for the tiles they skip
    bs = int(batch_size or (64 if dev.type == "cuda" else 16))
    info: dict = {"mode": mode, "input_size": S, "precision": prec, "runtime": tw.runtime if tw is not None else "torch"}
    if mode not in ("fast", "crops"):
        raise ValueError(f"unknown mode {mode!r}; use fast or crops")
    use_fast = False
    if mode == "fast" and score_fn is None:
        check(cancel)
        with cancel_hooks(model, cancel):  # the first call per model probes with a forward pass
            ok, key_or_reason, names = fast_support(model, S)
        use_fast = ok
        if not ok:
            info["fallback"] = key_or_reason
            info["mode"] = "crops"
    elif mode == "fast":
        info["fallback"] = "pairwise scoring needs crops"
        info["mode"] = "crops"
    boxes = np.asarray(boxes, dtype=np.int64).reshape(-1, 3)
    n = len(boxes)
    state = {"done": 0, "tiles": 0}
    sides = sorted(set(int(s) for s in boxes[:, 2]), reverse=True)
    if use_fast:
        total_tiles = sum(fast_tile_count(scene.size, s, S, tile) for s in sides)
        total = total_tiles + n
        info.update(tile=tile, halo=halo, tiles=total_tiles)
    else:
        total = n

    def tick(k: int) -> None:
        state["done"] += k
        report(progress, state["done"] + state["tiles"], total, message)

    def tile_tick() -> None:
        state["tiles"] += 1
        report(progress, state["done"] + state["tiles"], total, message)

    report(progress, 0, total, message)
    features, fused = (None, None)
    check(cancel)
    # the one-off set-up per model (shared-map probe, fused backbone and its check) runs
    # forward passes too: under the cancel hooks, so a cancel during it stops at once
    with cancel_hooks(model, cancel):
        if use_fast or (mode == "crops" and score_fn is None and fast_support(model, S)[0]):
            features, fused = _features_fn(model, prec, tw)
            key_or_reason, names = fast_support(model, S)[1:]
            info["fused"] = fused is not None
            if tw is not None:
                info["maps"] = tw.info().get("maps", "torch")
    check(cancel)
    with cancel_hooks(model, cancel, fused):
        if use_fast:
            emb = None
            for s in sides:
                sel = np.flatnonzero(boxes[:, 2] == s)
                e = _encode_fast_scale(model, scene, boxes[sel], S, prec, key_or_reason, names, tile, halo,
                                       tick, tile_tick, cancel, features, fused is not None and tw is None)
                if emb is None:
                    emb = np.zeros((n, e.shape[1]), np.float32)
                emb[sel] = e
            return emb if emb is not None else np.zeros((0, model.embed_dim), np.float32), None, info
        emb, scores = _encode_crops(model, scene, boxes, S, prec, bs, tick, cancel, score_fn,
                                    features, key_or_reason if features is not None else None,
                                    fused is not None and tw is None, tw)
        return emb, scores, info
