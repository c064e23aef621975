#!/usr/bin/env python
"""Render docs/localize/geotiff_outputs.png: the README's GeoTIFF commands on the real
mosaic assets/scenes/scene0.jpg, and their outputs re-opened with rasterio (the COG
heatmap) and read as GeoJSON (the regions, lon/lat → the scene's CRS → pixels), drawn
over the scene with Pillow — i.e. what QGIS shows when both files are dropped on it.

    python docs/localize/make_geotiff_figure.py [OUTDIR]
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import rasterio
from PIL import Image, ImageDraw
from rasterio.crs import CRS
from rasterio.enums import Resampling
from rasterio.transform import from_origin
from rasterio.warp import transform as warp

REPO = Path(__file__).resolve().parents[2]
QUERY = "There are three airplanes stopped at the airport"


def main() -> int:
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else Path("/tmp/rsv-geo-figure")
    out.mkdir(parents=True, exist_ok=True)
    scene = out / "scene0_utm33.tif"
    arr = np.asarray(Image.open(REPO / "assets/scenes/scene0.jpg").convert("RGB"))
    prof = dict(driver="GTiff", width=arr.shape[1], height=arr.shape[0], count=3, dtype="uint8",
                crs=CRS.from_epsg(32633), transform=from_origin(500000.0, 5000000.0, 0.3, 0.3), tiled=True,
                blockxsize=256, blockysize=256, compress="deflate", photometric="RGB")
    with rasterio.open(scene, "w", **prof) as d:
        d.write(arr.transpose(2, 0, 1))
        d.build_overviews([2, 4, 8], Resampling.average)
    cog, gj = out / "airplanes_prob.tif", out / "airplanes.geojson"
    cmd = [sys.executable, "-m", "rsviewer", "localize", "--scene", str(scene), "--text", QUERY,
           "--out", str(cog), "--out", str(gj), "--quiet"]
    print(" ".join(cmd[1:]))
    subprocess.run(cmd, check=True, cwd=REPO)
    # the scene at 1/2 from its overview, the COG resampled onto it
    side = 1024
    with rasterio.open(scene) as s:
        base = s.read(out_shape=(3, side, side), resampling=Resampling.average).transpose(1, 2, 0)
        scale = s.width / side
        to_px = ~s.transform
        crs = s.crs
    with rasterio.open(cog) as c:
        heat = c.read(1, out_shape=(side, side), resampling=Resampling.bilinear).astype(np.float32) / 255.0
        assert c.crs == crs
    import cv2

    jet = cv2.cvtColor(cv2.applyColorMap(np.rint(heat * 255).astype(np.uint8), cv2.COLORMAP_JET), cv2.COLOR_BGR2RGB)
    img = Image.fromarray(cv2.addWeighted(base, 0.65, jet, 0.35, 0)).convert("RGB")
    draw = ImageDraw.Draw(img)
    fc = json.loads(gj.read_text())
    for f in fc["features"][:3]:
        g = f["geometry"]
        polys = [g["coordinates"]] if g["type"] == "Polygon" else g["coordinates"]
        for rings in polys:
            lon, lat = zip(*rings[0])
            xs, ys = warp("EPSG:4326", crs, list(lon), list(lat))
            pts = [tuple(np.array(to_px * (x, y)) / scale) for x, y in zip(xs, ys)]
            draw.line(pts + [pts[0]], fill=(255, 255, 255), width=3)
        p = f["properties"]
        x0, y0 = p["bbox_px"][0] / scale, p["bbox_px"][1] / scale
        lo, la = p["peak_lonlat"]
        draw.rectangle([x0, y0 - 18, x0 + 300, y0], fill=(0, 0, 0))
        draw.text((x0 + 4, y0 - 15), f"#{p['rank']} max {p['score_max']:.2f}  {lo:.5f}E {la:.5f}N", fill=(255, 255, 255))
    # ground truth of anno.json in red
    for a in json.loads((REPO / "assets/scenes/anno.json").read_text()):
        if a["caption"] == QUERY:
            for poly in a["points"]:
                pts = [(x / scale, y / scale) for x, y in poly]
                draw.line(pts + [pts[0]], fill=(255, 0, 0), width=2)
    dst = REPO / "docs/localize/geotiff_outputs.png"
    img.save(dst)
    print(f"wrote {dst}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
