"""Heatmap overlays and PNG export (Pillow + OpenCV's colormap tables; no Qt, no matplotlib).

- :func:`overlay` blends a [0, 1] map over an image through a colormap, with optional
  iso-contours at 25/50/75 %;
- :func:`render_png` writes an explanation as a figure: the overlay with the method,
  score and query written under it; a sheet of small maps with their words for
  ``tokens``; a bar chart (or a scale × word table for MSSA's IGTA) for ``words``.
"""
from __future__ import annotations

import os
import textwrap
from functools import lru_cache
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from ..errors import QueryError

_CV2_MAPS = {
    "jet": "COLORMAP_JET",
    "viridis": "COLORMAP_VIRIDIS",
    "inferno": "COLORMAP_INFERNO",
    "turbo": "COLORMAP_TURBO",
    "magma": "COLORMAP_MAGMA",
    "plasma": "COLORMAP_PLASMA",
    "hot": "COLORMAP_HOT",
}


def _build_luts() -> dict[str, np.ndarray]:
    import cv2

    ramp = np.arange(256, dtype=np.uint8)[None]
    luts = {}
    for name, attr in _CV2_MAPS.items():
        code = getattr(cv2, attr, None)
        if code is not None:
            luts[name] = cv2.applyColorMap(ramp, code)[0, :, ::-1].copy()  # BGR → RGB
    luts["gray"] = np.repeat(np.arange(256, dtype=np.uint8)[:, None], 3, 1)
    return luts


COLORMAPS: dict[str, np.ndarray] = _build_luts()  # name → (256, 3) uint8 RGB lookup table


def colorize(heatmap: np.ndarray, cmap: str = "jet") -> np.ndarray:
    """[0, 1] map → (H, W, 3) uint8 RGB."""
    lut = _lut(cmap)
    idx = np.clip(np.nan_to_num(np.asarray(heatmap, dtype=np.float32)) * 255.0 + 0.5, 0, 255).astype(np.uint8)
    return lut[idx]


def _lut(cmap: str) -> np.ndarray:
    try:
        return COLORMAPS[cmap]
    except KeyError:
        raise QueryError(f"unknown colormap {cmap!r}; choose from {', '.join(COLORMAPS)}") from None


def _fit(heatmap: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    from .core import upsample

    h = np.asarray(heatmap, dtype=np.float32)
    if h.ndim != 2:
        raise QueryError(f"a heatmap must be 2-D, not {h.shape}")
    return upsample(h, size) if (h.shape[1], h.shape[0]) != tuple(size) else h


def overlay(
    image: Image.Image,
    heatmap: np.ndarray,
    cmap: str = "jet",
    alpha: float = 0.5,
    contour: bool = False,
) -> Image.Image:
    """The image with the map blended over it: ``(1 − alpha)·image + alpha·colormap(map)``.
    The map is resized (bilinear) to the image if needed; ``contour`` draws iso-lines at
    25, 50 and 75 % of the map's range."""
    if not 0.0 <= float(alpha) <= 1.0:
        raise QueryError(f"alpha must be between 0 and 1, not {alpha}")
    img = image.convert("RGB")
    h = np.clip(_fit(heatmap, img.size), 0.0, 1.0)
    base = np.asarray(img, dtype=np.float32)
    col = colorize(h, cmap).astype(np.float32)
    out = ((1.0 - alpha) * base + alpha * col).round().clip(0, 255).astype(np.uint8)
    if contour:
        out = _draw_contours(out, h)
    return Image.fromarray(out)


def _draw_contours(rgb: np.ndarray, h: np.ndarray, levels: Sequence[float] = (0.25, 0.5, 0.75)) -> np.ndarray:
    import cv2

    out = np.ascontiguousarray(rgb)
    t = max(1, int(round(min(h.shape) / 256)))
    for lv in levels:
        mask = (h >= lv).astype(np.uint8)
        cs, _ = cv2.findContours(mask, cv2.RETR_LIST, cv2.CHAIN_APPROX_SIMPLE)
        cv2.drawContours(out, cs, -1, (0, 0, 0), t + 1, lineType=cv2.LINE_AA)
        cv2.drawContours(out, cs, -1, (255, 255, 255), t, lineType=cv2.LINE_AA)
    return out


# ---- text helpers -----------------------------------------------------------------------------
@lru_cache(maxsize=16)
def font(size: int) -> ImageFont.ImageFont:
    """Pillow's default font at ``size`` px (scalable with FreeType, else the bitmap one)."""
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1
        return ImageFont.load_default()


def _text_w(f, s: str) -> float:
    try:
        return f.getlength(s)
    except AttributeError:
        return len(s) * 6


def _wrap(s: str, f, width: int) -> list[str]:
    """Greedy word wrap to ``width`` pixels."""
    lines: list[str] = []
    for para in s.splitlines() or [""]:
        cur = ""
        for word in para.split(" "):
            cand = f"{cur} {word}" if cur else word
            if _text_w(f, cand) <= width or not cur:
                cur = cand
            else:
                lines.append(cur)
                cur = word
        lines.append(cur)
    out = []
    for ln in lines:  # a single over-long word: hard-wrap by characters
        while _text_w(f, ln) > width and len(ln) > 1:
            n = max(1, int(len(ln) * width / max(_text_w(f, ln), 1)))
            out.append(ln[:n])
            ln = ln[n:]
        out.append(ln)
    return out


def _caption_band(width: int, lines: list[tuple[str, bool]], size: int) -> Image.Image:
    """White band with lines of text (``(text, bold)``; bold = darker and one size up)."""
    f, fb = font(size), font(size + 2)
    pad = max(4, size // 2)
    wrapped: list[tuple[str, ImageFont.ImageFont]] = []
    for s, bold in lines:
        ff = fb if bold else f
        wrapped += [(w, ff) for w in _wrap(s, ff, width - 2 * pad)]
    line_h = int(size * 1.35) + 2
    band = Image.new("RGB", (width, pad * 2 + line_h * len(wrapped)), "white")
    d = ImageDraw.Draw(band)
    y = pad
    for s, ff in wrapped:
        d.text((pad, y), s, fill=(0, 0, 0) if ff is fb else (40, 40, 40), font=ff)
        y += line_h
    return band


def _colorbar(width: int, cmap: str, size: int) -> Image.Image:
    h = max(8, size // 2 + 2)
    pad = max(4, size // 2)
    bar = colorize(np.tile(np.linspace(0, 1, max(2, width - 2 * pad - 2 * size * 2))[None], (h, 1)), cmap)
    im = Image.new("RGB", (width, h + size + 6), "white")
    f = font(size)
    d = ImageDraw.Draw(im)
    d.text((pad, 2), "low", fill=(60, 60, 60), font=f)
    x0 = pad + int(_text_w(f, "low ")) + 2
    x1 = width - pad - int(_text_w(f, " high")) - 2
    bar_img = Image.fromarray(bar).resize((max(2, x1 - x0), h))
    im.paste(bar_img, (x0, 4))
    d.text((x1 + 4, 2), "high", fill=(60, 60, 60), font=f)
    return im


def _stack(parts: list[Image.Image], bg="white") -> Image.Image:
    w = max(p.width for p in parts)
    out = Image.new("RGB", (w, sum(p.height for p in parts)), bg)
    y = 0
    for p in parts:
        out.paste(p, (0, y))
        y += p.height
    return out


def _display_scale(img: Image.Image, min_side: int = 384, max_side: int = 2048) -> Image.Image:
    w, h = img.size
    s = 1.0
    if max(w, h) < min_side:
        s = min_side / max(w, h)
    elif max(w, h) > max_side:
        s = max_side / max(w, h)
    if s == 1.0:
        return img
    return img.resize((max(1, round(w * s)), max(1, round(h * s))), Image.BICUBIC)


def _title(expl) -> str:
    m = expl.method
    if expl.layer and m != "words":
        m += f" · {expl.layer}"
    model = expl.info.get("model")
    return f"{m}   score {expl.score:+.3f}" + (f"   model {model}" if model else "")


def _query_line(expl) -> str:
    return f'query: "{expl.text}"' if expl.text is not None else f"query: {expl.query}"


# ---- figures -------------------------------------------------------------------------------------
def render_overlay_figure(expl, cmap: str = "jet", alpha: float = 0.5, contour: bool = False) -> Image.Image:
    if expl.heatmap is None:
        raise QueryError(f"{expl.method} has no heatmap to overlay")
    ov = _display_scale(overlay(expl.image, expl.heatmap, cmap, alpha, contour))
    size = max(12, min(28, ov.width // 34))
    return _stack([ov, _colorbar(ov.width, cmap, size), _caption_band(ov.width, [(_title(expl), True), (_query_line(expl), False)], size)])


def render_tokens_figure(expl, cmap: str = "jet", alpha: float = 0.5, cell: int = 112, cols: int = 10) -> Image.Image:
    """A sheet: header (image, combined map, query) then, per scale, every semantic
    token's map over the image with the words it attends to most."""
    small = expl.image.convert("RGB").resize((cell, cell), Image.BICUBIC)
    fs = max(10, cell // 10)
    f = font(fs)
    blocks: list[Image.Image] = []
    hdr_side = 2 * cell
    head = Image.new("RGB", (max(hdr_side * 2 + 12, cols * (cell + 4)), hdr_side), "white")
    head.paste(expl.image.convert("RGB").resize((hdr_side, hdr_side), Image.BICUBIC), (0, 0))
    if expl.heatmap is not None:
        head.paste(overlay(expl.image, expl.heatmap, cmap, alpha).resize((hdr_side, hdr_side), Image.BICUBIC), (hdr_side + 12, 0))
    x0 = hdr_side * 2 + 28
    if head.width - x0 > 120:  # the query next to the pictures
        d = ImageDraw.Draw(head)
        y = 4
        for text, ff in ((_title(expl), font(fs + 4)), (_query_line(expl), font(fs + 2))):
            for ln in _wrap(text, ff, head.width - x0 - 8):
                d.text((x0, y), ln, fill=(0, 0, 0), font=ff)
                y += int((fs + 4) * 1.35)
    blocks.append(head)
    text_h = int(fs * 1.3) * 2 + 4
    for name, stack in expl.grids.items():
        n = len(stack)
        rows = -(-n // cols)
        words = expl.grid_words.get(name, [])
        sheet = Image.new("RGB", (cols * (cell + 4), int(fs * 1.6) + rows * (cell + text_h)), "white")
        d = ImageDraw.Draw(sheet)
        d.text((2, 2), f"scale {name}: {n} semantic tokens (map over the image · top words)", fill=(0, 0, 0), font=font(fs + 2))
        y0 = int(fs * 1.6)
        for i in range(n):
            r, c = divmod(i, cols)
            x, y = c * (cell + 4), y0 + r * (cell + text_h)
            sheet.paste(overlay(small, stack[i], cmap, alpha), (x, y))
            ws = " ".join(words[i]) if i < len(words) else ""
            lines = _wrap(f"{i + 1}: {ws}", f, cell)[:2]
            for j, ln in enumerate(lines):
                d.text((x + 1, y + cell + 1 + j * int(fs * 1.3)), ln, fill=(30, 30, 30), font=f)
        blocks.append(sheet)
    width = max(b.width for b in blocks)
    size = max(12, min(20, width // 60))
    blocks.append(_caption_band(width, [(_title(expl), True), (_query_line(expl), False), (_token_note(expl), False)], size))
    return _stack(blocks)


def _token_note(expl) -> str:
    return "heatmap (top right) = attention received per position, mean over tokens and scales; each cell is one token, scaled to its own range"


def _merged(expl) -> tuple[list[str], np.ndarray, bool]:
    """Words and weights for display: word pieces merged; signed weights where known."""
    from .maps import _merge_pieces

    words = list(expl.words or [])
    ww = np.asarray(expl.word_weights, dtype=np.float32)
    signed = expl.info.get("signed_word_weights")
    if ww.ndim == 1 and signed is not None and len(signed) == len(words):
        mw, mv = _merge_pieces(words, np.asarray(signed, dtype=np.float32))
        s = float(np.abs(mv).max()) if mv.size else 0.0
        return mw, (mv / s if s > 0 else mv), True
    if ww.ndim == 1:
        mw, mv = _merge_pieces(words, ww)
        return mw, mv, False
    rows = []
    mw = words
    for r in ww:
        mw, mv = _merge_pieces(words, r)
        rows.append(mv)
    return mw, np.stack(rows) if rows else ww, False


def render_words_figure(expl, cmap: str = "jet", width: int = 640) -> Image.Image:
    """Bars (signed where the attribution is signed) or, for 2-D weights such as
    MSSA's IGTA (scale × word), a table of coloured cells."""
    if not expl.words or expl.word_weights is None:
        raise QueryError("this explanation has no word weights")
    words, vals, signed = _merged(expl)
    fs = 14
    f = font(fs)
    row_h = fs + 10
    label_w = int(min(max((_text_w(f, w) for w in words), default=40) + 16, width * 0.35))
    parts: list[Image.Image] = []
    if vals.ndim == 1:
        im = Image.new("RGB", (width, 10 + row_h * len(words) + 10), "white")
        d = ImageDraw.Draw(im)
        x0, x1 = label_w, width - 60
        zero = (x0 + x1) // 2 if signed else x0
        span = (x1 - zero) if signed else (x1 - x0)
        lut = _lut(cmap)
        for i, (w, v) in enumerate(zip(words, vals)):
            y = 10 + i * row_h
            d.text((label_w - 8 - _text_w(f, w), y + 3), w, fill=(0, 0, 0), font=f)
            end = zero + int(round(float(v) * span))
            if signed:
                color = (200, 40, 40) if v >= 0 else (40, 90, 200)
            else:
                color = tuple(int(c) for c in lut[int(np.clip(v, 0, 1) * 255)])
            d.rectangle([min(zero, end), y + 3, max(zero, end), y + row_h - 4], fill=color)
            d.text((x1 + 6, y + 3), f"{v:+.2f}" if signed else f"{v:.2f}", fill=(60, 60, 60), font=f)
        d.line([zero, 6, zero, im.height - 6], fill=(120, 120, 120), width=1)
        parts.append(im)
        note = (
            "bars: contribution of each word to the similarity (integrated gradients on the word embeddings; "
            "red raises, blue lowers; scaled by the largest)"
            if signed
            else "bars: word weights"
        )
        if expl.info.get("source") and not signed:
            note += f" ({expl.info['source']})"
    else:
        rows = expl.word_rows or [f"row {i}" for i in range(len(vals))]
        cw = int((width - label_w - 10) / max(1, len(rows)))
        im = Image.new("RGB", (width, 10 + row_h * (len(words) + 1) + 10), "white")
        d = ImageDraw.Draw(im)
        for j, r in enumerate(rows):
            for k, ln in enumerate(_wrap(r, font(11), cw - 4)[:2]):
                d.text((label_w + j * cw + 2, 4 + k * 12), ln, fill=(0, 0, 0), font=font(11))
        lo, top = (float(vals.min()), float(vals.max())) if vals.size else (0.0, 1.0)
        for i, w in enumerate(words):
            y = 10 + (i + 1) * row_h
            d.text((label_w - 8 - _text_w(f, w), y + 3), w, fill=(0, 0, 0), font=f)
            for j in range(len(rows)):
                v = (float(vals[j, i]) - lo) / (top - lo) if top > lo else 0.0
                col = tuple(int(c) for c in _lut(cmap)[int(np.clip(v, 0, 1) * 255)])
                x = label_w + j * cw
                d.rectangle([x + 1, y + 1, x + cw - 2, y + row_h - 2], fill=col)
                txt = f"{float(vals[j, i]):.2f}"
                tc = (255, 255, 255) if sum(col) < 380 else (0, 0, 0)
                d.text((x + cw // 2 - _text_w(f, txt) / 2, y + 4), txt, fill=tc, font=f)
        parts.append(im)
        note = f"cells: {expl.info.get('source', 'word weights')} (colour from the smallest to the largest value)"
    parts.append(_caption_band(width, [(_title(expl), True), (_query_line(expl), False), (note, False)], 13))
    return _stack(parts)


def render_figure(expl, cmap: str = "jet", alpha: float = 0.5, contour: bool = False) -> Image.Image:
    """The figure :func:`render_png` writes, as a PIL image."""
    _lut(cmap)
    if expl.method == "words":
        return render_words_figure(expl, cmap)
    if expl.method == "tokens" and expl.grids:
        return render_tokens_figure(expl, cmap, alpha)
    return render_overlay_figure(expl, cmap, alpha, contour)


def render_png(expl, path, cmap: str = "jet", alpha: float = 0.5, contour: bool = False) -> Path:
    """Write the explanation as a PNG (overlay + method, score and query under it;
    token sheet for ``tokens``; chart for ``words``). Written atomically; returns the path."""
    fig = render_figure(expl, cmap, alpha, contour)
    from ..errors import RsviewerError
    from ..utils.atomic import atomic_file

    path = Path(path)
    try:
        with atomic_file(path) as fh:
            fig.save(fh, format="PNG")
    except OSError as e:
        raise RsviewerError(f"cannot write {path}: {e.strerror or e}") from None
    return path
