#!/usr/bin/env python
"""Benchmark semantic localization on a large scene: seconds and peak memory.

Builds a SIZE×SIZE scene (default 10240, a 40×40 mosaic of real UCM-Captions tiles,
JPEG q90) in a temporary folder, then runs the work in a **child process** that loads
the default model and localizes a first query (window embeddings computed and cached in
a fresh temporary cache) and a second query on the same scene (embeddings from the
cache). The peak memory is the child's ``ru_maxrss`` (``resource.getrusage``), i.e. the
process that does the work, model and decoded scene included.

    python bench/localize.py --json                      # CPU, default model, fast mode
    python bench/localize.py --json --device cuda        # on a GPU
    python bench/localize.py --json --mode crops --size 4096
    python bench/localize.py --json --fidelity           # fast-vs-crops embedding agreement
    python bench/localize.py --json --geotiff --size 30000   # tiled GeoTIFF with overviews (raster layer),
                                                              # with the 10,240 px figure in the same run

``--geotiff``: the mosaic is written as a tiled (512 px), JPEG-compressed GeoTIFF in
EPSG:32633 at 0.3 m with internal overviews, block row by block row (the builder never
holds the whole scene either), and localized through the raster layer; the 10,240 px
GeoTIFF is built and timed in the same run as the reference. Also records the load
average before/after and the CPU model, because the machine may be shared.
    python bench/localize.py --json --no-reference       # skip the same-run torch reference

The timing mode runs the child twice on the same scene, each with a fresh window cache:
with ``--runtime`` (default ``auto``: the ONNX feature-map graph ``maps``,
:mod:`rsviewer.runtime`) and with ``--runtime eager`` (the reference: the same shared-map
work through plain ``model.feature_maps`` in torch eager, the fused inference copy of
:mod:`rsviewer.localize.fused` switched off, at rsviewer's precision — ``auto``: bf16
autocast on a CPU with AVX512-BF16, fp32 elsewhere; ``--reference-precision fp32`` makes
it torch's default fp32), and prints both first- and second-query
seconds, their ratios (reference / rsviewer) and the CPU (:mod:`bench.common`).
``--reference torch`` compares with rsviewer's own PyTorch path instead (fused backbone).
The one-off ONNX export/load (``runtime_setup_s``; in the user cache after a first run)
is timed before the first query and reported apart.

Prints one JSON object. Skips (exit 0, with a message) when the UCM images are absent.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

def _shared() -> Path:
    """$RSVIEWER_SHARED, ../shared next to the checkout, or /work/shared (as the tests do)."""
    for cand in (os.environ.get("RSVIEWER_SHARED"), REPO.parent / "shared", "/work/shared"):
        if cand and (Path(cand) / "datasets").is_dir():
            return Path(cand)
    return REPO.parent / "shared"


UCM = _shared() / "datasets" / "ucm-captions"
QUERIES = ("Many boats docked in lines at the harbor", "a tennis court surrounded by lawn")


def build_scene(path: Path, size: int, tile: int = 256, seed: int = 0) -> dict:
    """A size×size mosaic of UCM images (all splits, shuffled), saved as JPEG q90."""
    import numpy as np
    from PIL import Image

    files = sorted((UCM / "images").glob("*.jpg"))
    rng = np.random.default_rng(seed)
    n = -(-size // tile)
    order = rng.choice(len(files), size=n * n, replace=n * n > len(files))
    canvas = Image.new("RGB", (size, size))
    for k, idx in enumerate(order):
        with Image.open(files[idx]) as im:
            t = im.convert("RGB").resize((tile, tile))
        canvas.paste(t, ((k % n) * tile, (k // n) * tile))
    canvas.save(path, quality=90)
    return {"tiles": int(n * n), "file_mb": round(path.stat().st_size / 1e6, 1)}


def build_geotiff(path: Path, size: int, tile: int = 256, seed: int = 0, block: int = 512) -> dict:
    """A size×size tiled GeoTIFF of UCM images (like build_scene), written strip by strip,
    with internal overviews; EPSG:32633, 0.3 m pixels."""
    import numpy as np
    import rasterio
    from PIL import Image
    from rasterio.crs import CRS
    from rasterio.enums import Resampling
    from rasterio.transform import from_origin
    from rasterio.windows import Window

    files = sorted((UCM / "images").glob("*.jpg"))
    rng = np.random.default_rng(seed)
    n = -(-size // tile)
    order = rng.choice(len(files), size=n * n, replace=n * n > len(files))
    cache: dict = {}

    def tile_px(idx):
        if idx not in cache:
            with Image.open(files[idx]) as im:
                cache[idx] = np.asarray(im.convert("RGB").resize((tile, tile)))
        return cache[idx]

    prof = dict(driver="GTiff", width=size, height=size, count=3, dtype="uint8", crs=CRS.from_epsg(32633),
                transform=from_origin(500000.0, 5000000.0, 0.3, 0.3), tiled=True, blockxsize=block,
                blockysize=block, compress="jpeg", photometric="ycbcr", jpeg_quality=90, BIGTIFF="YES")
    t = time.perf_counter()
    with rasterio.Env(GDAL_CACHEMAX=512), rasterio.open(path, "w", **prof) as dst:
        rows_per = block // tile
        for r0 in range(0, n, rows_per):
            r1 = min(n, r0 + rows_per)
            y0, y1 = r0 * tile, min(size, r1 * tile)
            strip = np.zeros((y1 - y0, size, 3), np.uint8)
            for r in range(r0, r1):
                for c in range(n):
                    px = tile_px(int(order[r * n + c]))
                    ys, xs = (r - r0) * tile, c * tile
                    hh, ww = min(tile, y1 - y0 - ys), min(tile, size - xs)
                    strip[ys:ys + hh, xs:xs + ww] = px[:hh, :ww]
            dst.write(strip.transpose(2, 0, 1), window=Window(0, y0, size, y1 - y0))
        t_write = time.perf_counter() - t
        factors = [f for f in (2, 4, 8, 16, 32, 64, 128) if size / f >= 256]
        dst.build_overviews(factors, Resampling.average)
    return {"tiles": int(n * n), "file_mb": round(path.stat().st_size / 1e6, 1), "write_s": round(t_write, 1),
            "overviews": factors, "build_s": round(time.perf_counter() - t, 1)}


def run_child(args, scene: str, tmp: str) -> dict:
    env = dict(os.environ, RSVIEWER_CACHE=str(Path(tmp) / f"cache-{Path(scene).stem}"), PYTHONPATH=str(REPO))
    cmd = [sys.executable, __file__, "--child", "--scene", scene, "--model", args.model, "--device", args.device,
           "--mode", args.mode, "--precision", args.precision, "--windows", args.windows,
           "--threads", str(args.threads), "--tile", str(args.tile), "--runtime", args.runtime]
    if args.input_size:
        cmd += ["--input-size", str(args.input_size)]
    if args.two_stage:
        cmd.append("--two-stage")
    load0 = os.getloadavg()
    t = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    out = {"child_wall_s": round(time.perf_counter() - t, 1)}
    if proc.returncode != 0:
        print(proc.stderr, file=sys.stderr)
        raise SystemExit(proc.returncode)
    out.update(json.loads(proc.stdout.strip().splitlines()[-1]))
    out["loadavg_before"] = [round(v, 2) for v in load0]
    out["loadavg_after"] = [round(v, 2) for v in os.getloadavg()]
    return out


def geotiff_main(args) -> int:
    """Both sizes in one run: the reference 10,240 px GeoTIFF, then --size."""
    if not (UCM / "images").is_dir():
        print(json.dumps({"skipped": f"{UCM / 'images'} not available"}))
        return 0
    from bench.common import cpu_model

    info: dict = {"cpu": cpu_model(), "cores": os.cpu_count(), "geotiff": True, "runs": {}}
    sizes = [10240] + ([args.size] if args.size != 10240 else [])
    with tempfile.TemporaryDirectory(prefix="rsv-bench-geo-") as tmp:
        for size in sizes:
            path = Path(args.keep or tmp) / f"mosaic_{size}.tif"
            run: dict = {}
            if not path.exists():
                run["build"] = build_geotiff(path, size)
            run.update(run_child(args, str(path), tmp))
            info["runs"][str(size)] = run
            if not args.keep:
                path.unlink()
    big = info["runs"][str(sizes[-1])]
    info["target_peak_le_2gb"] = big["peak_rss_mb"] <= 2048
    print(json.dumps(info) if args.json else json.dumps(info, indent=2))
    return 0


def child(args) -> None:
    """Runs in the child process: load the model, two queries, report."""
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    from rsviewer.checkpoint import load_model
    from rsviewer.localize import localize, open_scene
    from rsviewer.utils.device import describe, pick_device

    dev = pick_device(args.device)
    model = load_model(args.model, device=dev)
    t_load = time.perf_counter() - t0
    from rsviewer.runtime import towers

    runtime = args.runtime
    if runtime == "eager":  # the reference: plain model.feature_maps, no fused inference copy
        import rsviewer.localize.fused as fused_mod

        fused_mod.fused_backbone = lambda *a, **k: None
        runtime = "torch"
    t0 = time.perf_counter()
    tw = towers(model, runtime)
    if tw.runtime != "torch":
        tw.maps_available()  # export (fresh cache) or load the feature-map graph
    t_setup = time.perf_counter() - t0
    sizes = [int(s) for s in args.windows.split(",")]
    opts = {"mode": args.mode, "precision": args.precision, "runtime": runtime}
    if args.tile:
        opts["tile"] = args.tile
    if args.input_size:
        opts["input_size"] = args.input_size
    out = {"device": describe(dev), "threads": torch.get_num_threads(), "model": args.model, "mode": args.mode,
           "runtime_arg": args.runtime,
           "model_load_s": round(t_load, 2), "runtime": tw.info(), "runtime_setup_s": round(t_setup, 2)}
    cpu0 = time.process_time()
    with open_scene(args.scene) as sc:
        out["scene"] = {"backend": sc.backend, "format": sc.format, "size": list(sc.size),
                        "overviews": list(getattr(sc, "overviews", []))}
        r1 = localize(model, sc, QUERIES[0], window_sizes=sizes, two_stage=args.two_stage, **opts)
        cpu1 = time.process_time()
        rss1 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        r2 = localize(model, sc, QUERIES[1], window_sizes=sizes, two_stage=args.two_stage, **opts)
        cpu2 = time.process_time()
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    out.update(
        windows=r1.n_windows,
        grid=list(r1.prob.shape),
        cell=r1.cell,
        effective_mode=r1.info.get("mode"),
        precision=r1.info.get("precision"),
        encode_runtime=r1.info.get("runtime"),
        fused=r1.info.get("fused"),
        maps=r1.info.get("maps"),
        first_query_s=round(r1.seconds, 2),
        first_query_cpu_s=round(cpu1 - cpu0, 2),
        first_cached=r1.cached,
        second_query_s=round(r2.seconds, 3),
        second_query_cpu_s=round(cpu2 - cpu1, 3),
        second_cached=r2.cached,
        peak_rss_mb_after_first=round(rss1 / 1024, 1),
        peak_rss_mb=round(rss / 1024, 1),
    )
    if dev.type == "cuda":
        out["cuda_peak_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    print(json.dumps(out))


def fidelity(args) -> dict:
    """How close the fast (shared-map) embeddings are to per-crop embeddings, and bf16 to
    fp32, per window size, on the ucm-mosaics scenes: mean / 5th percentile / min cosine."""
    import numpy as np
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from rsviewer.checkpoint import load_model
    from rsviewer.localize import open_scene, sliding_windows
    from rsviewer.localize.encode import encode_windows

    scenes = sorted((_shared() / "scenes" / "ucm-mosaics" / "images").glob("*.jpg"))
    if not scenes:
        return {"skipped": "ucm-mosaics not available"}
    model = load_model(args.model)
    sizes = [int(s) for s in args.windows.split(",")]
    acc: dict = {}
    for p in scenes:
        with open_scene(p) as sc:
            b = sliding_windows(sc.size, sizes)
            e = {}
            for mode, prec in (("crops", "fp32"), ("fast", "fp32"), ("fast", "bf16"), ("crops", "bf16")):
                e[mode, prec] = encode_windows(model, sc, b, mode=mode, precision=prec)[0]
        for s in sizes:
            sel = b[:, 2] == s
            for name, (x, y) in {"fast_vs_crops": (("fast", "bf16"), ("crops", "fp32")),
                                 "fast_fp32_vs_crops_fp32": (("fast", "fp32"), ("crops", "fp32")),
                                 "bf16_vs_fp32_crops": (("crops", "bf16"), ("crops", "fp32"))}.items():
                acc.setdefault(name, {}).setdefault(s, []).append(np.sum(e[x][sel] * e[y][sel], 1))
    out = {"scenes": len(scenes), "model": args.model}
    for name, per in acc.items():
        out[name] = {str(s): {"mean": round(float(np.concatenate(v).mean()), 4),
                              "p5": round(float(np.percentile(np.concatenate(v), 5)), 4),
                              "min": round(float(np.concatenate(v).min()), 4), "n": int(np.concatenate(v).size)}
                     for s, v in per.items()}
    return out


def _run_child(args, scene: str, cache: Path, runtime: str, precision: str):
    """One child process (fresh window cache) at ``runtime``; its JSON, or None on failure."""
    env = dict(os.environ, RSVIEWER_CACHE=str(cache), PYTHONPATH=str(REPO))
    cmd = [sys.executable, __file__, "--child", "--scene", scene, "--model", args.model, "--device", args.device,
           "--mode", args.mode, "--precision", precision, "--windows", args.windows,
           "--threads", str(args.threads), "--tile", str(args.tile), "--runtime", runtime]
    if args.input_size:
        cmd += ["--input-size", str(args.input_size)]
    if args.two_stage:
        cmd.append("--two-stage")
    t = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        print(proc.stderr, file=sys.stderr)
        return None
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    out["child_wall_s"] = round(time.perf_counter() - t, 1)
    out["child_maxrss_mb"] = round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, 1)
    try:
        out["loadavg_1min"] = os.getloadavg()[0]
    except OSError:
        pass
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", action="store_true", help="print only the JSON object")
    ap.add_argument("--size", type=int, default=10240, help="scene side in px (default 10240)")
    ap.add_argument("--model", default="default")
    ap.add_argument("--device", default="cpu", help="cpu | cuda | auto (default cpu)")
    ap.add_argument("--mode", default="fast", choices=["fast", "crops"])
    ap.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"])
    ap.add_argument("--input-size", type=int, default=None)
    ap.add_argument("--windows", default="256,512,768")
    ap.add_argument("--two-stage", action="store_true")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    ap.add_argument("--runtime", default="auto", choices=["auto", "onnx", "openvino", "torch", "eager"],
                    help="rsviewer's runtime (default auto); eager: plain torch, no fused backbone")
    ap.add_argument("--reference-precision", default=None, choices=["auto", "fp32", "bf16"],
                    help="the reference's precision (default: --precision; fp32: torch's default)")
    ap.add_argument("--reference", default="eager", choices=["eager", "torch"],
                    help="the same-run reference: eager (plain torch fp32, default) or torch (the fused backbone)")
    ap.add_argument("--no-reference", action="store_true", help="do not also run the same-run reference")
    ap.add_argument("--scene", help="use this scene instead of building the mosaic")
    ap.add_argument("--keep", help="build the mosaic at this path and keep it")
    ap.add_argument("--fidelity", action="store_true",
                    help="instead of timing: cosine of fast vs crop embeddings (and bf16 vs fp32) on ucm-mosaics")
    ap.add_argument("--tile", type=int, default=0, help="fast-mode tile in stride-32 cells (default: localize's 32)")
    ap.add_argument("--geotiff", action="store_true",
                    help="a tiled GeoTIFF with overviews through the raster layer; also times 10,240 px in the same run")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.fidelity:
        res = fidelity(args)
        print(json.dumps(res) if args.json else json.dumps(res, indent=2))
        return 0
    if args.child:
        child(args)
        return 0
    if args.geotiff:
        return geotiff_main(args)
    info: dict = {"size": args.size}
    with tempfile.TemporaryDirectory(prefix="rsv-bench-loc-") as tmp:
        scene = args.scene
        if scene is None:
            if not (UCM / "images").is_dir():
                print(json.dumps({"skipped": f"{UCM / 'images'} not available"}))
                return 0
            path = Path(args.keep) if args.keep else Path(tmp) / f"mosaic_{args.size}.jpg"
            if not path.exists():
                t = time.perf_counter()
                info.update(build_scene(path, args.size))
                info["build_s"] = round(time.perf_counter() - t, 1)
            scene = str(path)
        info["scene"] = scene
        from bench.common import cpu_flags, cpu_model, loadavg

        info.update(cpu=cpu_model(), cpu_flags=cpu_flags(), cores=os.cpu_count(), loadavg=loadavg())
        ref = f"reference_{args.reference}"
        ref_prec = args.reference_precision or args.precision
        runs = [("rsviewer", args.runtime, args.precision)] + ([] if args.no_reference else [(ref, args.reference, ref_prec)])
        for name, rt, prec in runs:
            res = _run_child(args, scene, Path(tmp) / f"cache-{name}", rt, prec)
            if res is None:
                return 1
            if name == "rsviewer":
                info.update(res)  # the figures at the top level, as before
            else:
                info[name] = {k: res[k] for k in ("runtime_arg", "encode_runtime", "fused", "effective_mode",
                                                  "precision", "first_query_s", "first_query_cpu_s",
                                                  "second_query_s", "peak_rss_mb", "loadavg_1min") if k in res}
        if ref in info:
            r = info[ref]
            info["ratio_first_query"] = round(r["first_query_s"] / info["first_query_s"], 2)
            info["ratio_second_query"] = round(r["second_query_s"] / max(info["second_query_s"], 1e-9), 2)
            info["target_first_query_ge_2_5x_eager"] = args.reference == "eager" and info["ratio_first_query"] >= 2.5
        info["loadavg_end"] = loadavg()
    print(json.dumps(info) if args.json else json.dumps(info, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
