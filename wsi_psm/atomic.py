"""Writing a file so that a reader (or a crash) sees the old file or the whole new one, never part."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch


def torch_save_atomic(payload: Any, path: str | Path) -> Path:
    """``torch.save(payload)`` to a temporary file beside ``path``, then rename it over ``path``
    (a rename within one folder is atomic); the temporary file is removed on any failure."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            torch.save(payload, fh)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
