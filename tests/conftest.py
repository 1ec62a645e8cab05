"""Shared test fixtures: where the real data lives, and skipping cleanly when it is absent."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("WSI_PSM_DATA", ROOT.parent / "shared" / "data"))


def data_path(*parts: str) -> Path:
    """A path under the shared data folder; skips the test with a reason when it is absent."""
    p = DATA.joinpath(*parts)
    if not p.exists():
        pytest.skip(f"real data not available: {p} (set WSI_PSM_DATA to the shared data folder)")
    return p


@pytest.fixture
def cmu_svs() -> Path:
    return data_path("wsi", "aperio-svs", "CMU-1-Small-Region.svs")


@pytest.fixture
def fixtures_dir() -> Path:
    return data_path("wsi", "synthetic-openslide-python-fixtures")


@pytest.fixture
def monuseg_dir() -> Path:
    return data_path("monuseg-train")


@pytest.fixture
def bcdata_dir() -> Path:
    return data_path("bcdata-sample")
