"""The raster layer (rasterio/GDAL): every scene rsviewer reads — for localization, the
Scene view and tile indexes — goes through :func:`open_raster`.

- :mod:`.reader`    — :class:`Raster`: block-wise region reads, overviews, band choice,
  8-bit stretch, nodata/alpha masks; PNG/JPEG decoded once under a pixel limit.
- :mod:`.georef`    — :class:`Georef`: CRS, transform, pixel ↔ map ↔ lon/lat.
- :mod:`.overviews` — :func:`build_overviews`: a sidecar ``.ovr`` with progress/cancel.
- :mod:`.write`     — :func:`write_cog`, :func:`write_geojson`: georeferenced outputs.

Never imports Qt.
"""
from .georef import WGS84, Georef, GeorefError
from .overviews import build_overviews, needs_overviews, overview_path
from .reader import Raster, max_scene_pixels, open_raster, resize_rgb
from .write import check_output_path, write_cog, write_geojson

__all__ = ["Raster", "open_raster", "resize_rgb", "max_scene_pixels", "Georef", "GeorefError", "WGS84",
           "build_overviews", "needs_overviews", "overview_path", "write_cog", "write_geojson", "check_output_path"]
