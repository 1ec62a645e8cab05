"""Writing outputs so that a reader (or a crash) sees the old file or the whole new one, never
part, and a failed write leaves no folders it made behind."""

from __future__ import annotations

import errno
import io
import os
import uuid
from pathlib import Path
from typing import Any


def make_dirs(folder: str | os.PathLike[str]) -> list[Path]:
    """Create ``folder`` and any missing parents; return the folders made, outermost first (for
    :func:`remove_made` when the write they were made for fails)."""
    missing, p = [], Path(os.path.abspath(folder))
    while not p.exists():
        missing.append(p)
        p = p.parent
    made: list[Path] = []
    try:
        for d in reversed(missing):
            d.mkdir()
            made.append(d)
    except FileExistsError:  # made meanwhile by another process: theirs, not ours to remove
        Path(folder).mkdir(parents=True, exist_ok=True)
    except BaseException:
        remove_made(made)
        raise
    if not Path(folder).is_dir():
        raise NotADirectoryError(errno.ENOTDIR, "it is a file, not a folder", os.fspath(folder))
    return made


def remove_made(made: list[Path]) -> None:
    """Remove the folders :func:`make_dirs` made, innermost first, where still empty."""
    for d in reversed(made):
        try:
            d.rmdir()
        except OSError:  # not empty (something else wrote there) or gone: keep going
            pass


def torch_save_atomic(payload: Any, path: str | Path) -> Path:
    """``torch.save(payload)`` to a temporary file beside ``path``, then rename it over ``path``
    (a rename within one folder is atomic); the temporary file, and any folders made for it, are
    removed on any failure."""
    import torch  # here: the folder helpers above serve torch-free worker processes too

    path = Path(path)
    # serialised in memory first (models are a few MB): torch's zip writer reports a full disk as
    # a RuntimeError ("unexpected pos"), a plain write as the OSError (ENOSPC) it is
    buf = io.BytesIO()
    torch.save(payload, buf)
    made = make_dirs(path.parent)
    tmp = path.parent / f".{path.name}.{uuid.uuid4().hex[:12]}.tmp"
    try:
        # mode 0o666 under the umask, as any other output gets (mkstemp's 0o600 hid models from a group)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        with os.fdopen(fd, "wb") as fh:
            fh.write(buf.getbuffer())
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        remove_made(made)
        raise
    return path
