"""Test set-up: headless Qt, a private feature cache, and the shared data when present."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
UCM_JSON = SHARED / "datasets" / "ucm-captions" / "dataset_ucm.json"


@pytest.fixture(scope="session", autouse=True)
def _limit_threads():
    # CI has 2 cores; keep torch from oversubscribing them
    import torch

    torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(autouse=True)
def _private_cache(tmp_path_factory, monkeypatch):
    # feature caches of tests never mix with the user's
    monkeypatch.setenv("RSVIEWER_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


def needs_shared(path: Path = UCM_JSON):
    return pytest.mark.skipif(not path.exists(), reason=f"{path} not available")
