"""rsviewer train --arch NAME --data JSON --out models/NAME"""
from __future__ import annotations

import json
import shlex
import sys

from ..errors import RsviewerError
from .common import (
    add_force_arg, add_json_arg, check_out_dir, emit, nonneg_float, positive_float, positive_int, probability,
    progress_bar, views_int,
)


def register(sub) -> None:
    p = sub.add_parser("train", help="train a model (select on val; the test split is never read)")
    p.add_argument("--arch", required=True, help="lite | galr | mssa | cmpagl | cmer")
    p.add_argument("--data", required=True, help="dataset (Karpathy JSON, precomp folder, CSV)")
    p.add_argument("--images", default=None, help="image folder (default: next to the dataset)")
    p.add_argument("--out", required=True, help="output model folder, e.g. models/my-model (new, empty, or with "
                                                "--force/--resume one rsviewer wrote)")
    add_force_arg(p)
    p.add_argument("--epochs", type=positive_int, default=None)
    p.add_argument("--batch-size", type=positive_int, default=None)
    p.add_argument("--lr", type=positive_float, default=None)
    p.add_argument("--weight-decay", type=nonneg_float, default=None)
    p.add_argument("--views", type=views_int, default=None, help="dihedral augmentations per image (1-8)")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--ema", type=probability, default=None, help="weight EMA decay per step (e.g. 0.98; 0 = off)")
    p.add_argument("--eval-every", type=positive_int, default=None,
                   help="validate (and maybe save) every N epochs and after the last (pairwise archs: val is costly)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--loss", default=None, help="lite, galr: infonce | triplet | both (see each architecture's config)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="architecture hyper-parameter (JSON value), e.g. --set embed_dim=512; repeatable")
    p.add_argument("--resume", action="store_true", help="continue from OUT/train_state.pt")
    p.add_argument("--train-split", default=None, help="split(s) to train on, e.g. train+val (then --val-split '')")
    p.add_argument("--val-split", default=None, help="split to select the epoch on ('' = none: keep the last epoch)")
    p.add_argument("--snapshots", action="store_true", help="without a val split: also save every epoch to OUT.epochs/eNN")
    p.add_argument("--no-cache", action="store_true", help="do not read/write the feature cache")
    p.add_argument("--max-train-images", type=positive_int, default=None, help="train on a random subset (quick runs)")
    p.add_argument("--cv", type=positive_int, default=None, metavar="K",
                   help="K-fold cross-validation over train+val (folds by image): mean ± SE of mR per epoch; "
                        "the epoch count is the CV choice and the model is retrained on train+val (it saw val)")
    p.add_argument("--cv-only", action="store_true",
                   help="with --cv: write OUT/cv.json and the held-out scores, no final model (compare recipes)")
    p.add_argument("--folds", choices=("blocked", "random"), default="blocked",
                   help="with --cv: contiguous blocks of each label in dataset order (default; UCM neighbours are "
                        "near-duplicates and its splits are such blocks) or a seeded shuffle")
    p.add_argument("--cv-folds", default=None, metavar="LIST",
                   help="with --cv-only: run only these folds (e.g. 1,5,9; split a CV over several runs); "
                        "the report says which folds it covers")
    p.add_argument("--cv-merge", nargs="+", default=None, metavar="DIR",
                   help="with --cv K: merge --cv-only --cv-folds runs of this recipe that together cover every fold "
                        "(run in parallel, e.g. one per core or machine) and train the final model; no fold is rerun")
    p.add_argument("--fold-seed", type=int, default=0, help="with --cv --folds random: seed of the fold assignment")
    e2e = p.add_argument_group("end-to-end training (the pretrained towers learn too; GPUs, or slowly on CPU)")
    e2e.add_argument("--end-to-end", action="store_true",
                     help="fine-tune the image backbone and text encoder on augmented pixels each step instead of "
                          "training heads on cached features; under torchrun: DistributedDataParallel")
    e2e.add_argument("--image-from", choices=("all", "s8", "s16", "none"), default=None,
                     help="backbone layers trained: all (default), after the stride-8/16 map, or none")
    e2e.add_argument("--text-from", default=None, metavar="all|N|none",
                     help="text encoder layers trained: all (default, embeddings too), layers N.., or none")
    e2e.add_argument("--image-lr-scale", type=nonneg_float, default=None, help="lr multiplier of the backbone (default 0.1)")
    e2e.add_argument("--text-lr-scale", type=nonneg_float, default=None, help="lr multiplier of the text encoder (default 0.1)")
    e2e.add_argument("--accum", type=positive_int, default=None, help="micro-batches per optimizer step (gradient accumulation)")
    e2e.add_argument("--augment", default=None, help="crop,dihedral,jitter (default all three) or none")
    e2e.add_argument("--ram-gb", type=nonneg_float, default=None,
                     help="hold decoded training images in memory up to this size (default 4); beyond it, DataLoader workers decode")
    e2e.add_argument("--workers", type=int, default=None, help="decoding threads / DataLoader workers (default 2)")
    add_json_arg(p)
    p.set_defaults(func=run)


def _parse_sets(items: list[str]) -> dict:
    out = {}
    for it in items:
        if "=" not in it:
            raise RsviewerError(f"--set expects KEY=VALUE, got {it!r}")
        k, v = it.split("=", 1)
        try:
            out[k.strip()] = json.loads(v)
        except json.JSONDecodeError:
            out[k.strip()] = v
    return out


def _run_cv(args, defaults: dict, model_cfg: dict, command: str) -> int:
    from ..train.cv import cross_validate, cv_summary, train_with_cv
    from ..train.trainer import TrainConfig

    if args.resume:
        raise RsviewerError("--resume does not apply to --cv (each fold is a short run on cached features)")
    cfg = TrainConfig.from_dict(defaults)
    log = (lambda m: None) if args.quiet else None
    kw = dict(images=args.images, model_config=model_cfg, config=cfg, fold_seed=args.fold_seed, folds=args.folds, log=log,
              command=command, progress=progress_bar(args))
    if args.cv_folds and not args.cv_only:
        raise RsviewerError("--cv-folds needs --cv-only (the final model is chosen from all folds)")
    if args.cv_merge and args.cv_only:
        raise RsviewerError("--cv-merge trains the final model from fold runs; --cv-only would train nothing")
    if args.cv_only:
        try:
            only = [int(x) for x in args.cv_folds.split(",")] if args.cv_folds else None
        except ValueError:
            raise RsviewerError(f"--cv-folds expects numbers like 1,5,9, got {args.cv_folds!r}") from None
        report = cross_validate(args.arch, args.data, args.cv, out=args.out, only_folds=only, **kw)
        res = None
    else:
        report, res = train_with_cv(args.arch, args.data, args.out, args.cv, merge=args.cv_merge, **kw)
    summary = {"out": args.out, "cv": cv_summary(report)}
    line = (f"cv {args.cv} folds: mR {report['mR_mean']:.2f} ± {report['mR_se']:.2f} (SE) at epoch {report['chosen_epoch']}"
            + (f", TTA {report['tta']['mR_mean']:.2f} ± {report['tta']['mR_se']:.2f}" if "tta" in report else ""))
    if res is not None:
        summary["seconds"] = round(res.seconds, 1)
        line += f"; saved {res.out} (trained on train+val for {report['chosen_epoch']} epochs)"
    else:
        line += f"; report in {args.out}"
    emit(args, summary, line)
    return 0


def run(args) -> int:
    # before feature caching and training (minutes): --resume continues in a folder rsviewer wrote
    # (under torchrun every rank checks, read-only; rank 0 claims the folder in the trainer)
    check_out_dir(args, args.out, [args.data, args.images, *(args.cv_merge or [])], force=args.force or args.resume,
                  kind="model")
    e2e_only = [f"--{k.replace('_', '-')}" for k in ("image_from", "text_from", "image_lr_scale", "text_lr_scale",
                                                     "accum", "augment", "ram_gb", "workers") if getattr(args, k) is not None]
    if e2e_only and not args.end_to_end:
        raise RsviewerError(f"{' '.join(e2e_only)} apply to --end-to-end training")
    if args.end_to_end and args.cv:
        raise RsviewerError("--cv runs on cached features; choose the epochs of an end-to-end recipe with a val split")
    from ..data import load_dataset

    load_dataset(args.data, images=args.images)  # a bad dataset fails in a second, not after the imports
    from ..archs.registry import arch_class
    from ..train.trainer import TrainConfig, train

    cls = arch_class(args.arch)
    defaults = dict(getattr(cls, "train_defaults", {}))
    for key in ("epochs", "batch_size", "lr", "weight_decay", "views", "seed", "ema", "eval_every", "image_from",
                "text_from", "image_lr_scale", "text_lr_scale", "accum", "augment", "ram_gb", "workers"):
        v = getattr(args, key)
        if v is not None:
            defaults[key] = v
    for key in ("train_split", "val_split"):
        if getattr(args, key) is not None:
            defaults[key] = getattr(args, key)
    defaults["snapshots"] = args.snapshots
    defaults["end_to_end"] = args.end_to_end or bool(defaults.get("end_to_end"))
    defaults["device"] = args.device
    defaults["cache"] = not args.no_cache
    defaults["max_train_images"] = args.max_train_images
    model_cfg = _parse_sets(args.set)
    if args.loss:
        model_cfg["loss"] = args.loss
    command = "rsviewer " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    if (args.cv_only or args.cv_merge) and not args.cv:
        raise RsviewerError(f"{'--cv-only' if args.cv_only else '--cv-merge'} needs --cv K")
    if args.cv:
        return _run_cv(args, defaults, model_cfg, command)
    res = train(
        args.arch, args.data, args.out, images=args.images, model_config=model_cfg,
        config=TrainConfig.from_dict(defaults), resume=args.resume, overwrite=args.force,
        progress=progress_bar(args), log=(lambda m: None) if args.quiet else None, command=command,
    )
    from ..train.distributed import env_info

    if not env_info().main:  # torchrun: rank 0 speaks for the run
        return 0
    summary = {"out": str(res.out), "best_epoch": res.best_epoch, "val": res.val, "seconds": round(res.seconds, 1)}
    emit(args, summary, f"saved {res.out} (best val mR {res.val.get('mR', float('nan')):.2f} at epoch {res.best_epoch})")
    return 0
