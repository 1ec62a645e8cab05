"""summary.json, and the JSON Schemas shipped in ``wsi_psm/schemas`` that it and the cells are
checked against: a summary is validated before it is written, so a run never leaves one that breaks
its contract (DESIGN.md "Outputs")."""

from __future__ import annotations

import importlib.metadata
import importlib.resources
import json
import os
import platform
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import numpy as np

from wsi_psm import __version__
from wsi_psm.config import RunConfig

JSON_SCHEMA_DRAFT = "https://json-schema.org/draft/2020-12/schema"
SUMMARY_SCHEMA_VERSION = "1.0"


@cache
def load_schema(name: str) -> dict[str, Any]:
    """A shipped JSON Schema by short name: "cells", "summary" or "config" (cached: do not mutate)."""
    text = importlib.resources.files("wsi_psm.schemas").joinpath(f"{name}.schema.json").read_text()
    return json.loads(text)


@cache
def config_json_schema() -> dict[str, Any]:
    """The run-config schema as generated from :class:`RunConfig` (what config.schema.json holds;
    runs validate against this live one, a test keeps the file equal to it)."""
    return {"$schema": JSON_SCHEMA_DRAFT, **RunConfig.model_json_schema()}


def write_config_schema(path: str | os.PathLike[str] | None = None) -> Path:
    """Regenerate schemas/config.schema.json after RunConfig changes (a test checks they agree)."""
    target = (
        Path(path)
        if path
        else Path(__file__).resolve().parents[1] / "schemas" / "config.schema.json"
    )
    target.write_text(json.dumps(config_json_schema(), indent=2, ensure_ascii=False) + "\n")
    return target


def software_versions() -> dict[str, str | None]:
    """Versions for summary.json, read from package metadata (nothing heavy is imported);
    ``openslide`` is the OpenSlide C library as shipped by openslide-bin."""
    dists = {
        "numpy": "numpy",
        "scipy": "scipy",
        "scikit-image": "scikit-image",
        "scikit-learn": "scikit-learn",
        "torch": "torch",
        "dask": "dask",
        "shapely": "shapely",
        "geopandas": "geopandas",
        "pyarrow": "pyarrow",
        "rasterio": "rasterio",
        "openslide-python": "openslide-python",
        "openslide": "openslide-bin",
        "tiffslide": "tiffslide",
        "tifffile": "tifffile",
        "pillow": "pillow",
        "pydantic": "pydantic",
    }
    out: dict[str, str | None] = {"wsi_psm": __version__, "python": platform.python_version()}
    for key, dist in dists.items():
        try:
            out[key] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[key] = None
    return out


def utc_now_iso() -> str:
    """The current time as ISO 8601 with offset, as summary.json's ``created`` wants."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def class_counts_summary(
    counts: Mapping[str, int],
    colors: Mapping[str, Sequence[int]],
    tissue_area_mm2: float,
) -> dict[str, dict[str, Any]]:
    """summary.json's ``class_counts``: per class its count, fraction of all cells, density per mm²
    of tissue (0 when there is no tissue area) and colour."""
    total = sum(counts.values())
    return {
        name: {
            "count": int(n),
            "fraction": n / total if total else 0.0,
            "density_per_mm2": n / tissue_area_mm2 if tissue_area_mm2 > 0 else 0.0,
            "color": [int(v) for v in colors[name]],
        }
        for name, n in counts.items()
    }


def _schema_error(what: str, err: jsonschema.ValidationError) -> ValueError:
    where = "/".join(str(p) for p in err.absolute_path) or "(top level)"
    return ValueError(f"{what} does not match its schema at {where}: {err.message}")


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def write_summary(path: str | os.PathLike[str], summary: Mapping[str, Any]) -> Path:
    """Validate ``summary`` against schemas/summary.schema.json (and its ``config`` against
    config.schema.json) and write it as indented JSON. ``schema_version`` is filled in when absent;
    numpy scalars and arrays, tuples and paths are accepted and written as plain JSON.

    Raises ValueError (a programming error, not a user's) when the content breaks the schema, when
    ``created`` is not ISO 8601 with an offset, or when the class counts do not add up to
    ``cells_total``.
    """
    try:
        text = json.dumps(
            {"schema_version": SUMMARY_SCHEMA_VERSION, **summary},
            indent=2,
            ensure_ascii=False,
            allow_nan=False,
            default=_json_default,
        )
    except (TypeError, ValueError) as err:
        raise ValueError(f"summary.json cannot be written as JSON: {err}") from None
    data = json.loads(text)
    err = jsonschema.exceptions.best_match(
        jsonschema.Draft202012Validator(load_schema("summary")).iter_errors(data)
    )
    if err is not None:
        raise _schema_error("summary.json", err)
    err = jsonschema.exceptions.best_match(
        jsonschema.Draft202012Validator(config_json_schema()).iter_errors(data["config"])
    )
    if err is not None:
        raise _schema_error("summary.json config", err)
    try:
        datetime.fromisoformat(data["created"].replace("Z", "+00:00"))
    except ValueError:
        raise ValueError(f"summary.json created={data['created']!r} is not ISO 8601") from None
    counted = sum(c["count"] for c in data["class_counts"].values())
    if counted != data["cells_total"]:
        raise ValueError(
            f"summary.json class counts add up to {counted}, cells_total is {data['cells_total']}"
        )
    out = Path(path)
    out.write_text(text + "\n", encoding="utf-8")
    return out


__all__ = [
    "class_counts_summary",
    "config_json_schema",
    "load_schema",
    "software_versions",
    "utc_now_iso",
    "write_config_schema",
    "write_summary",
]
