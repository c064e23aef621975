"""rsviewer ensemble --models A B [C ...] --out models/NAME [--weights cv|equal|w1 w2 ...] [--tta 8]"""
from __future__ import annotations

import shlex
import sys

from ..errors import RsviewerError
from .common import add_json_arg, emit


def register(sub) -> None:
    p = sub.add_parser("ensemble", help="combine trained models: weighted mean of their similarities (weights by CV)")
    p.add_argument("--models", nargs="+", required=True, help="member models (names under models/ or folders)")
    p.add_argument("--out", required=True, help="output model folder, e.g. models/ens")
    p.add_argument("--weights", nargs="+", default=["cv"],
                   help="'cv' (default: chosen on the members' stored CV held-out scores, see train --cv), "
                        "'equal', or one non-negative number per member")
    p.add_argument("--step", type=float, default=0.1, help="with --weights cv: grid step on the weight simplex")
    p.add_argument("--tta", type=int, default=1, metavar="VIEWS",
                   help="embed images as the mean of VIEWS dihedral views (1 = off, 8 = all); dual encoders only")
    add_json_arg(p)
    p.set_defaults(func=run)


def _weights(args) -> tuple[list[float] | None, dict | None]:
    """(weights, CV report or None)."""
    from ..checkpoint import resolve_model_dir
    from ..train.cv import ensemble_cv, load_cv_sims

    mode = args.weights
    if mode == ["equal"]:
        return None, None
    if mode == ["cv"]:
        members = [load_cv_sims(resolve_model_dir(m)) for m in args.models]
        rep = ensemble_cv(members, step=args.step, tta=args.tta > 1)
        return rep["weights"], rep
    try:
        w = [float(x) for x in mode]
    except ValueError:
        raise RsviewerError(f"--weights: expected cv, equal or numbers, got {' '.join(mode)}") from None
    if len(w) != len(args.models) or any(x < 0 for x in w) or sum(w) <= 0:
        raise RsviewerError(f"--weights: {len(args.models)} non-negative numbers needed, got {' '.join(mode)}")
    return w, None


def run(args) -> int:
    import time

    from ..archs.ensemble import build_ensemble
    from ..checkpoint import save_model

    if not 1 <= args.tta <= 8:
        raise RsviewerError(f"--tta must be 1..8, got {args.tta}")
    if len(args.models) == 1 and args.weights == ["cv"]:
        args.weights = ["equal"]
    weights, cv = _weights(args)
    model = build_ensemble(args.models, weights, views=args.tta)
    metrics = {
        "arch": "ensemble",
        "members": model.cfg.members,
        "weights": model.cfg.weights,
        "views": model.cfg.views,
        "weights_from": "cross-validation" if cv else ("given" if weights else "equal"),
        "command": "rsviewer " + " ".join(shlex.quote(a) for a in sys.argv[1:]),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "saw_val": any(_saw_val(m) for m in model.members if getattr(m, "model_dir", None)),
    }
    if cv:
        metrics["cv"] = cv
    save_model(model, args.out, metrics=metrics)
    line = f"saved {args.out}: {len(args.models)} members, weights {[round(w, 3) for w in model.cfg.weights]}"
    if cv:
        line += (f"; CV mR {cv['mR_mean']:.2f} ± {cv['mR_se']:.2f} (weights chosen on these folds), "
                 f"nested {cv['nested']['mR_mean']:.2f} ± {cv['nested']['mR_se']:.2f}")
    emit(args, {"out": args.out, **{k: metrics[k] for k in ("members", "weights", "views", "weights_from")}, "cv": cv}, line)
    return 0


def _saw_val(model) -> bool:
    from ..checkpoint import read_metrics

    return bool(read_metrics(model.model_dir).get("saw_val"))
