"""Writing a file so that a reader (or a crash) sees the old file or the whole new one, never part."""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Any

import torch


def torch_save_atomic(payload: Any, path: str | Path) -> Path:
    """``torch.save(payload)`` to a temporary file beside ``path``, then rename it over ``path``
    (a rename within one folder is atomic); the temporary file is removed on any failure."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{uuid.uuid4().hex[:12]}.tmp"
    # mode 0o666 under the umask, as any other output gets (mkstemp's 0o600 hid models from a group)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as fh:
            torch.save(payload, fh)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
