"""Why one model's mR differs a little between surfaces: the same model and gallery scored
through an index built with torch, one built with ONNX Runtime, and the dataset split.

    python bench/eval_paths.py --model mssa-ucm [--threads 1] [--json]

Near-tied scores swap ranks when the float summation order changes (runtime, thread count);
this prints the spread. Not a speed benchmark: no reference is needed."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rsviewer.checkpoint import load_model  # noqa: E402
from rsviewer.gui import state  # noqa: E402  (Qt-free: the demo gallery's path)
from rsviewer.retrieval.index import build_index  # noqa: E402
from rsviewer.retrieval.per_query import per_query, score_index  # noqa: E402

DATA = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "ucm-captions" / "dataset_ucm.json"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="mssa-ucm")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model = load_model(args.model)
    out = {"model": args.model, "threads": args.threads, "mR": {}}
    for rt in ("torch", "onnx"):
        idx = build_index(model, state.DEMO_GALLERY, runtime=rt)
        out["mR"][f"demo gallery, index runtime={rt}"] = round(per_query(score_index(model, idx)).metrics["mR"], 2)
    if DATA.exists():
        idx = build_index(model, DATA, split="val", runtime="torch")
        out["mR"]["dataset val split, runtime=torch"] = round(per_query(score_index(model, idx)).metrics["mR"], 2)
    print(json.dumps(out) if args.json else "\n".join(f"{k}: {v}" for k, v in out["mR"].items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
