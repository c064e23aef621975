"""The one registry of architectures (timm's ``register_model`` + open_clip's config factory).

    @register
    class Lite(RetrievalModel):
        arch = "lite"
        Config = LiteConfig

    model = create_model("lite", embed_dim=256)

Architectures live in their own modules and register on import; ``_ensure_loaded``
imports the built-in ones lazily so ``import rsviewer`` stays cheap.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from ..errors import ModelError

if TYPE_CHECKING:
    from .base import RetrievalModel

_REGISTRY: dict[str, type["RetrievalModel"]] = {}
# arch name -> module that defines it (imported on first use)
BUILTIN = {
    "lite": "rsviewer.archs.lite",
    "galr": "rsviewer.archs.galr",
    "mssa": "rsviewer.archs.mssa",
    "cmpagl": "rsviewer.archs.cmpagl",
    "cmer": "rsviewer.archs.cmer",
    "clip": "rsviewer.archs.clip",
    "ensemble": "rsviewer.archs.ensemble",  # built from trained models, not trained
}


def register(cls: type["RetrievalModel"]) -> type["RetrievalModel"]:
    if not cls.arch:
        raise ValueError(f"{cls.__name__} has no arch name")
    _REGISTRY[cls.arch] = cls
    return cls


def _ensure_loaded(name: str) -> None:
    if name not in _REGISTRY and name in BUILTIN:
        try:
            importlib.import_module(BUILTIN[name])
        except ModuleNotFoundError as e:
            if e.name == BUILTIN[name]:
                return  # not built yet
            raise


def list_archs() -> list[str]:
    for name in BUILTIN:
        _ensure_loaded(name)
    return sorted(_REGISTRY)


def arch_class(name: str) -> type["RetrievalModel"]:
    _ensure_loaded(name)
    if name not in _REGISTRY:
        raise ModelError(f"unknown architecture {name!r}; available: {', '.join(list_archs())}")
    return _REGISTRY[name]


def create_model(arch: str, **config) -> "RetrievalModel":
    """Build an untrained model of ``arch`` from keyword hyper-parameters."""
    cls = arch_class(arch)
    try:
        cfg = cls.Config.from_dict(config)
    except (TypeError, ValueError) as e:
        raise ModelError(f"bad config for {arch}: {e}") from e
    return cls(cfg)
