"""The one checkpoint format: a model folder (SPEC §9).

    models/NAME/
      config.json        {"format", "arch", "config", "bases", "finetuned", "fingerprint", ...}
      model.safetensors  trained tensors only (frozen pretrained bases are referenced in
                         config.json by package/path and sha256, never copied)
      metrics.json       how it was trained: data, split, command, seed, device, val numbers

Loading rebuilds the architecture from ``config.json`` through the registry (which
loads and verifies the bases), then loads the trained tensors strictly. Writes are
atomic (a folder swap), so an interrupted save never corrupts an existing model.

What ``--model`` accepts is a small registry of **model formats** (``@model_format``):
the rsviewer folder above, a Hugging Face dual-encoder folder, an OpenAI/open_clip
checkpoint file. Each entry says how to recognise a path and how to open it; foreign
formats open as the ``clip`` architecture without writing anything (``rsviewer import``
turns one into a named rsviewer folder that references the weights by sha256).
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch

from .archs.base import RetrievalModel
from .archs.registry import arch_class
from .errors import ModelError
from .nets.weights import WeightsRef, resolve_ref
from .utils.atomic import atomic_dir, write_json

FORMAT = "rsviewer-model/1"
CONFIG = "config.json"
WEIGHTS = "model.safetensors"
METRICS = "metrics.json"

# where `--model NAME` looks: $RSVIEWER_MODELS, then ./models, then the models/ shipped
# next to the package (a source checkout or an editable install)
PACKAGE_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_MODEL = "default"


def model_dirs() -> list[Path]:
    dirs = []
    if os.environ.get("RSVIEWER_MODELS"):
        dirs += [Path(p) for p in os.environ["RSVIEWER_MODELS"].split(os.pathsep) if p]
    dirs += [Path.cwd() / "models", PACKAGE_ROOT / "models"]
    out: list[Path] = []
    for d in dirs:
        if d not in out:
            out.append(d)
    return out


def resolve_model_dir(spec: str | os.PathLike) -> Path:
    """``default`` | ``NAME`` (looked up in :func:`model_dirs`) | a folder path | a foreign
    model (Hugging Face folder, OpenAI/open_clip file: returned as is, see :data:`FORMATS`)."""
    s = str(spec)
    p = Path(s).expanduser()
    if p.is_dir() and (p / CONFIG).exists() and _is_rsviewer_folder(p):
        return p
    if p.exists() and format_of(p) is not None:
        return p
    if os.sep not in s and "/" not in s:
        for d in model_dirs():
            cand = d / s
            if (cand / CONFIG).exists():
                return cand
    if p.exists() and p.is_dir():
        raise ModelError(f"{p} is not a model folder (no {CONFIG})")
    names = sorted({c.name for d in model_dirs() if d.is_dir() for c in d.iterdir() if (c / CONFIG).exists()})
    raise ModelError(f"model {s!r} not found; available: {', '.join(names) or 'none'}")


# ---- the format registry -----------------------------------------------------------------------
@dataclass(frozen=True)
class ModelFormat:
    name: str
    detect: Callable[[Path], bool]
    open: Callable[..., RetrievalModel]


FORMATS: list[ModelFormat] = []


def model_format(name: str, detect: Callable[[Path], bool]):
    """Register ``open(path, device) -> RetrievalModel`` for paths ``detect`` accepts
    (checked in registration order; the rsviewer folder first)."""

    def deco(fn):
        FORMATS.append(ModelFormat(name, detect, fn))
        return fn

    return deco


def format_of(path: str | os.PathLike) -> Optional[ModelFormat]:
    p = Path(path).expanduser()
    return next((f for f in FORMATS if p.exists() and f.detect(p)), None)


def _is_rsviewer_folder(p: Path) -> bool:
    if not (p.is_dir() and (p / CONFIG).exists()):
        return False
    try:
        return json.loads((p / CONFIG).read_text()).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return True  # let read_config report the broken file in one line


def _is_hf_folder(p: Path) -> bool:
    from .nets.clip.hf import is_hf_folder

    return not _is_rsviewer_folder(p) and is_hf_folder(p)


def _is_openai_file(p: Path) -> bool:
    from .nets.clip.openai import SUFFIXES

    return p.is_file() and p.suffix.lower() in SUFFIXES


def list_models() -> list[Path]:
    seen: dict[str, Path] = {}
    for d in model_dirs():
        try:
            children = sorted(d.iterdir()) if d.is_dir() else []
        except OSError:  # an unreadable models folder hides nothing else
            children = []
        for c in children:
            if (c / CONFIG).exists() and c.name not in seen:
                seen[c.name] = c
    return list(seen.values())


def model_summaries(warn=None) -> list[dict]:
    """One row per listed model (name, path, arch, embed_dim, parameters, val_mR, cv_mR,
    cv_se, dataset). ``cv_mR`` ± ``cv_se``: the cross-validation estimate of a model
    retrained on train+val (which has no val figure: val was training data for it), the
    nested one for an ensemble whose weights CV chose."""
    return [{"name": d.name, "path": str(d), "arch": cfg["arch"], "embed_dim": cfg.get("embed_dim"),
             "parameters": cfg.get("parameters"), **model_figures(met), "dataset": met.get("dataset")}
            for d, cfg, met in _read_listed(warn)]


def model_figures(metrics) -> dict:
    """``val_mR``, ``cv_mR`` and ``cv_se`` (None where absent) from a ``metrics.json``: the
    val figure of a val-selected model, the CV estimate of one retrained after CV (the
    nested one for an ensemble, whose weights CV chose on the same folds)."""
    met = metrics if isinstance(metrics, dict) else {}
    val = met.get("val") or met.get("metrics") or {}
    cv = met.get("cv") if isinstance(met.get("cv"), dict) else {}
    cv = cv["nested"] if isinstance(cv.get("nested"), dict) else cv
    num = lambda v: v if isinstance(v, (int, float)) else None  # noqa: E731
    return {"val_mR": num(val.get("mR")) if isinstance(val, dict) else None,
            "cv_mR": num(cv.get("mR_mean")), "cv_se": num(cv.get("mR_se"))}


def _read_listed(warn=None):
    """(folder, config, metrics) of every listed model.
    A folder whose config.json or metrics.json is broken is left out, and ``warn``
    (default: a line on stderr) is told which and why, so one bad folder never hides the rest."""
    import sys

    warn = warn or (lambda msg: print(f"warning: {msg}", file=sys.stderr))
    out = []
    for d in list_models():
        try:
            out.append((d, read_config(d), read_metrics(d)))
        except ModelError as e:
            warn(f"skipping model {d.name}: {e}")
    return out


def _fingerprint(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


def _combined_fingerprint(model: RetrievalModel, weights: Path) -> str:
    fp = _fingerprint(weights)
    tower = getattr(model, "tower_fingerprint", None)  # clip: the foreign weights + settings
    return hashlib.sha256((fp + tower).encode()).hexdigest()[:16] if tower else fp


def save_model(
    model: RetrievalModel,
    folder: str | os.PathLike,
    metrics: Optional[dict[str, Any]] = None,
    extra_files: Optional[dict[str, bytes]] = None,
    overwrite: bool = False,
) -> Path:
    """Write ``model`` to ``folder`` atomically; returns the folder. ``folder`` must be
    absent or empty, or (with ``overwrite``) a model folder rsviewer wrote; anything
    else is refused (:class:`~rsviewer.errors.OutputError`) and left untouched."""
    from safetensors.torch import save_file

    folder = Path(folder)
    tensors = model.trained_state_dict()
    with atomic_dir(folder, overwrite=overwrite, kind="model") as tmp:
        save_file(tensors, str(tmp / WEIGHTS), metadata={"format": FORMAT, "arch": model.arch})
        cfg = {
            "format": FORMAT,
            "arch": model.arch,
            "config": model.cfg.to_dict(),
            "bases": {k: (v.to_json() if v else None) for k, v in model.bases.items()},
            "finetuned": list(model.finetuned),
            "embed_dim": model.embed_dim,
            "image_size": model.image_size,
            "pairwise": model.pairwise,
            # input normalisation the model was trained with; restored on load so a
            # changed library default can never silently change a trained model
            "preprocess": {"mean": list(model.mean), "std": list(model.std), "image_size": model.image_size},
            "parameters": model.parameter_counts(),
            "fingerprint": _combined_fingerprint(model, tmp / WEIGHTS),
        }
        extra = model.extra_config()
        if extra is not None:
            cfg["extra"] = extra
        write_json(tmp / CONFIG, cfg)
        if metrics is not None:
            write_json(tmp / METRICS, metrics)
        elif (folder / METRICS).exists():
            (tmp / METRICS).write_bytes((folder / METRICS).read_bytes())
        for name, data in (extra_files or {}).items():
            (tmp / name).write_bytes(data)
    return folder


def read_config(folder: str | os.PathLike) -> dict:
    path = Path(folder) / CONFIG
    try:
        cfg = json.loads(path.read_text())
    except FileNotFoundError:
        raise ModelError(f"{folder} is not a model folder (no {CONFIG})") from None
    except json.JSONDecodeError as e:
        raise ModelError(f"{path} is not valid JSON (line {e.lineno})") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ModelError(f"{path} cannot be read: {e}") from None
    if not isinstance(cfg, dict):
        raise ModelError(f"{path} holds a JSON {type(cfg).__name__}, not an rsviewer model config")
    if cfg.get("format") != FORMAT or "arch" not in cfg:
        raise ModelError(f"{path} is not an rsviewer model config (format {cfg.get('format')!r})")
    return cfg


def read_metrics(folder: str | os.PathLike) -> dict:
    p = Path(folder) / METRICS
    if not p.exists():
        return {}
    try:
        met = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise ModelError(f"{p} is not valid JSON (line {e.lineno})") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ModelError(f"{p} cannot be read: {e}") from None
    if not isinstance(met, dict):
        raise ModelError(f"{p} holds a JSON {type(met).__name__}, not an object")
    return met


def model_fingerprint(folder: str | os.PathLike) -> str:
    return read_config(folder)["fingerprint"]


def build_from_config(cfg: dict) -> RetrievalModel:
    cls = arch_class(cfg["arch"])
    try:
        conf = cls.Config.from_dict(cfg["config"])
    except (TypeError, ValueError) as e:
        raise ModelError(f"config does not fit architecture {cfg['arch']}: {e}") from e
    model = cls(conf, extra=cfg.get("extra"))
    pre = cfg.get("preprocess")
    if pre:
        model.mean, model.std = tuple(pre["mean"]), tuple(pre["std"])
    # the bases were loaded by the constructor; check they are the ones trained with
    for prefix, ref in cfg.get("bases", {}).items():
        if ref and cfg["arch"] != "clip":  # clip checks its foreign weights itself, hash cached on disk
            resolve_ref(WeightsRef.from_json(ref), verify=True)
    return model


def load_model(
    spec: str | os.PathLike = DEFAULT_MODEL,
    device: str | torch.device = "cpu",
    expect_arch: Optional[str] = None,
    overrides: Optional[dict] = None,
) -> RetrievalModel:
    """Open a model ready for inference: ``default``, a name under models/, an rsviewer
    model folder, a Hugging Face dual-encoder folder or an OpenAI/open_clip checkpoint file.
    ``overrides``: settings that replace what was inferred from a foreign checkpoint
    (``{"activation": "gelu"}``); refused for rsviewer folders, whose config is fixed."""
    p = Path(str(spec)).expanduser()
    fmt = format_of(p) if (p.is_file() or (p.is_dir() and not _is_rsviewer_folder(p))) else None
    if fmt is not None and fmt.name != "rsviewer":
        model = _open_foreign(p, device, overrides) if overrides else fmt.open(p, device)
    else:
        if overrides:
            raise ModelError(f"--set applies to checkpoint files and Hugging Face folders, not to the model folder {spec}")
        model = _load_rsviewer(resolve_model_dir(spec), device)
    if expect_arch and model.arch != expect_arch:
        raise ModelError(f"{model.name} is a {model.arch} model, not {expect_arch}")
    return model


@model_format("rsviewer", detect=_is_rsviewer_folder)
def _load_rsviewer(folder: Path, device: str | torch.device = "cpu") -> RetrievalModel:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    cfg = read_config(folder)
    model = build_from_config(cfg)
    # fine-tuned parts of the bases as trained (end-to-end training adds whole towers); the
    # constructor derives the same list for models trained on cached features
    model.finetuned = list(dict.fromkeys(list(model.finetuned) + list(cfg.get("finetuned") or [])))
    try:
        tensors = load_file(str(folder / WEIGHTS))
    except FileNotFoundError:
        raise ModelError(f"{folder} has no {WEIGHTS}") from None
    except (SafetensorError, OSError, ValueError) as e:
        raise ModelError(f"{folder / WEIGHTS} is corrupt: {str(e).splitlines()[0][:160]}") from None
    expected = model.trained_state_dict()
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise ModelError(
            f"{folder.name}: weights do not match a {cfg['arch']} model "
            f"({len(missing)} missing, {len(unexpected)} unexpected, e.g. {(missing + unexpected)[:2]})"
        )
    for k, v in tensors.items():
        if tuple(v.shape) != tuple(expected[k].shape):
            raise ModelError(f"{folder.name}: tensor {k} has shape {tuple(v.shape)}, expected {tuple(expected[k].shape)}")
    model.load_state_dict(tensors, strict=False)
    model.model_dir, model.fingerprint, model.name = folder, cfg["fingerprint"], folder.name
    model.model_format = "rsviewer"
    return model.to(device).eval()


def _open_foreign(path: Path, device: str | torch.device = "cpu", overrides: Optional[dict] = None) -> RetrievalModel:
    from .archs.clip import Clip, config_for

    path = path.resolve()
    cfg, desc = config_for(path, overrides)
    model = Clip(cfg)
    model.model_dir, model.fingerprint = path, model.tower_fingerprint
    model.name = path.stem if path.is_file() else path.name
    model.model_format = "openai-clip" if path.is_file() else "huggingface"
    model.description = desc  # what was inferred, printed by the CLI
    return model.to(device).eval()


@model_format("huggingface", detect=_is_hf_folder)
def _load_hf(path: Path, device: str | torch.device = "cpu") -> RetrievalModel:
    return _open_foreign(path, device)


@model_format("openai-clip", detect=_is_openai_file)
def _load_openai(path: Path, device: str | torch.device = "cpu") -> RetrievalModel:
    return _open_foreign(path, device)
