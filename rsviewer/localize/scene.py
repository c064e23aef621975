"""Large scenes for the localizer: the raster layer (:mod:`rsviewer.raster`) under the
names the localize code has always used. ``Scene`` *is* :class:`rsviewer.raster.Raster`
and ``open_scene`` *is* :func:`rsviewer.raster.open_raster` — one reader for
localization, the Scene view and tile indexes (GeoTIFF/COG/JP2/VRT by block through
rasterio; PNG/JPEG decoded once under the pixel limit)."""
from __future__ import annotations

from ..raster.reader import Raster as Scene
from ..raster.reader import open_raster as open_scene
from ..raster.reader import resize_rgb

__all__ = ["Scene", "open_scene", "resize_rgb"]
