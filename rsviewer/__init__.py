"""rsviewer — a workbench for remote-sensing image–text retrieval.

The public Python API lives in :mod:`rsviewer.api` and is re-exported here lazily, so
``import rsviewer`` stays cheap (torch loads on first use). ``explain``, ``localize``
and ``project`` are sub-packages: use ``rsviewer.api.explain`` or
``from rsviewer.explain import explain``.
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

_SUBPACKAGES = {"explain", "localize", "project", "api"}


def __getattr__(name: str):
    if name.startswith("_") or name in _SUBPACKAGES:
        raise AttributeError(name)  # let the import system load sub-packages normally
    api = importlib.import_module("rsviewer.api")
    if name in api.__all__:
        return getattr(api, name)
    raise AttributeError(f"module 'rsviewer' has no attribute {name!r}")
