"""Where a raster's pixels lie on the Earth: CRS, affine transform, pixel ↔ map ↔ lon/lat.

A raster without a CRS works in pixel space (``Georef.crs is None``); everything that
needs a map (GeoJSON, lon/lat read-outs) says so in one line instead of guessing.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

from ..errors import RsviewerError

__all__ = ["Georef", "GeorefError", "WGS84"]

WGS84 = "EPSG:4326"


class GeorefError(RsviewerError):
    """A raster without a CRS where one is needed, or a CRS that cannot reach WGS 84."""


def compose(a, b):
    """``a`` then ``b`` as one affine (``@`` on affine ≥ 3, ``*`` before)."""
    try:
        return a @ b
    except TypeError:
        return a * b


@dataclass
class Georef:
    crs: Optional[object]  # rasterio.crs.CRS or None (pixel space)
    transform: object  # affine.Affine; identity in pixel space
    size: tuple[int, int]
    name: str = "scene"

    @property
    def has_crs(self) -> bool:
        return self.crs is not None

    def crs_label(self) -> str:
        if self.crs is None:
            return "no CRS (pixel space)"
        epsg = self.crs.to_epsg()
        if epsg:
            return f"EPSG:{epsg}"
        name = self.crs.to_wkt().split('"')[1] if '"' in self.crs.to_wkt() else "custom CRS"
        return name

    def pixel_to_map(self, x: float, y: float) -> tuple[float, float]:
        t = self.transform
        x, y = float(x), float(y)
        return float(t.a * x + t.b * y + t.c), float(t.d * x + t.e * y + t.f)

    def map_to_pixel(self, mx: float, my: float) -> tuple[float, float]:
        t = ~self.transform
        mx, my = float(mx), float(my)
        return float(t.a * mx + t.b * my + t.c), float(t.d * mx + t.e * my + t.f)

    def box_bounds(self, x0: float, y0: float, x1: float, y1: float) -> list[float]:
        """Map bounds ``[minx, miny, maxx, maxy]`` of a pixel box (any rotation-free transform)."""
        xs, ys = zip(*(self.pixel_to_map(a, b) for a, b in ((x0, y0), (x1, y0), (x1, y1), (x0, y1))))
        return [min(xs), min(ys), max(xs), max(ys)]

    def require_crs(self, what: str) -> None:
        if self.crs is None:
            raise GeorefError(f"{self.name} has no CRS, so {what} cannot be placed on a map; "
                              f"it works in pixel space (write a .tif/.png map instead, or georeference the scene)")

    def check_wgs84(self, what: str = "lon/lat output") -> None:
        """Raise :class:`GeorefError` (one line) unless the scene's CRS transforms to WGS 84."""
        self.require_crs(what)
        W, H = self.size
        pts = [(0, 0), (W, 0), (W, H), (0, H), (W / 2, H / 2)]
        try:
            lon, lat = self.to_lonlat([p[0] for p in pts], [p[1] for p in pts])
        except Exception as e:  # PROJ raises several types; its message may embed the CRS as PROJJSON
            why = " ".join(str(e).split(" from ")[0].split())[:80]
            raise GeorefError(f"the CRS of {self.name} ({self.crs_label()}) cannot be transformed to WGS 84 "
                              f"({why}); use the scene's CRS instead (CLI --geojson-crs scene)") from None
        bad = [v for v in list(lon) + list(lat) if not math.isfinite(v)]
        if bad or any(abs(v) > 90 for v in lat) or any(abs(v) > 540 for v in lon):
            raise GeorefError(f"the CRS of {self.name} ({self.crs_label()}) does not transform to valid "
                              f"WGS 84 coordinates for this scene; use the scene's CRS instead")

    def to_lonlat(self, xs: Sequence[float], ys: Sequence[float]) -> tuple[list[float], list[float]]:
        """Pixel coordinates → (lon, lat) lists. Raises if the CRS has no path to WGS 84."""
        from rasterio.warp import transform as warp

        self.require_crs("lon/lat")
        mx, my = zip(*(self.pixel_to_map(x, y) for x, y in zip(xs, ys)))
        lon, lat = warp(self.crs, WGS84, list(mx), list(my))
        return list(lon), list(lat)

    def lonlat_or_none(self, x: float, y: float) -> Optional[tuple[float, float]]:
        if self.crs is None:
            return None
        try:
            lon, lat = self.to_lonlat([x], [y])
        except Exception:
            return None
        if not (math.isfinite(lon[0]) and math.isfinite(lat[0])):
            return None
        return lon[0], lat[0]

    def to_json(self) -> dict:
        t = self.transform
        return {"crs": self.crs.to_wkt() if self.crs is not None else None,
                "crs_label": self.crs_label(),
                "transform": [t.a, t.b, t.c, t.d, t.e, t.f]}
