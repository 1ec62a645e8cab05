"""Writing outputs so that a reader (or a crash) sees the old file or the whole new one, never
part, and a failed write leaves no folders it made behind: folders made for a write, a model file
saved under a temporary name, a slide's output folder published whole (:class:`OutputFolder`), and
the one-line error for a write the disk refused (:func:`write_error`)."""

from __future__ import annotations

import errno
import functools
import hashlib
import io
import logging
import os
import re
import shutil
import socket
import uuid
from pathlib import Path
from types import TracebackType
from typing import Any

from .errors import OutputExistsError, OutputWriteError

log = logging.getLogger(__name__)


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
    remove_stale_temps(path)  # left by a save killed outright on this host
    tmp = temp_path(path)
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


# errnos that mean "cannot write here"
_WRITE_ERRNOS = {errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EPERM, errno.EDQUOT}


def _is_write_error(err: OSError, *roots: Path) -> bool:
    """An OSError that means "cannot write here": no space, read-only, no permission, on one of our
    output paths (or with no path, as a failed write() reports)."""
    if err.errno not in _WRITE_ERRNOS:
        return False
    if err.filename is None:
        return True
    name = os.path.abspath(os.fsdecode(err.filename))
    return any(name == str(r) or name.startswith(str(r) + os.sep) for r in roots)


def write_error(err: OSError, fallback: str | os.PathLike[str]) -> OutputWriteError:
    """The one-line error for an OSError met writing an output (its own path, else ``fallback``)."""
    where = os.fsdecode(err.filename) if err.filename else str(fallback)
    reason = err.strerror or str(err)
    return OutputWriteError(f"cannot write output {where}: {reason}")


def _fsync(p: Path) -> None:
    try:
        fd = os.open(p, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems cannot fsync a directory; the rename is still atomic
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    """Flush the files and the folder to disk so the rename publishes complete data."""
    for p in [*root.rglob("*"), root]:
        _fsync(p)


def _remove(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p, ignore_errors=True)
    else:
        p.unlink(missing_ok=True)


def check_writable(final: str | os.PathLike[str]) -> None:
    """Fail now, before hours of work, if ``final`` (a folder or file to be written later) could
    not be created: a probe folder is made beside it and removed, as are any parent folders it
    needed (they are made again when the output is written). OutputWriteError (one line) if not."""
    final = Path(os.path.abspath(final))
    made: list[Path] = []
    probe = final.parent / f".{final.name}.probe-{uuid.uuid4().hex[:12]}"
    try:
        made = make_dirs(final.parent)
        probe.mkdir()
        probe.rmdir()
    except OSError as err:
        if err.filename is not None and os.fsdecode(err.filename) == str(probe):
            err.filename = None  # name the user's path, not the probe's
        raise write_error(err, final) from err
    finally:
        remove_made(made)


@functools.cache
def host_tag() -> str:
    """This host, as temporary folder names carry it: the start of its name, and a hash of its
    whole name and of this process's PID namespace (containers that share a host name and a disk
    have separate PIDs: a PID of one means nothing in another)."""
    name = socket.gethostname()
    try:
        ns = os.readlink("/proc/self/ns/pid")  # Linux: e.g. "pid:[4026531836]"
    except OSError:
        ns = ""
    digest = hashlib.sha1(f"{name}\0{ns}".encode()).hexdigest()[:8]
    return f"{re.sub(r'[^A-Za-z0-9-]', '', name)[:24] or 'host'}-{digest}"


def temp_path(final: Path, kind: str = "tmp") -> Path:
    """Where to write ``final`` before renaming it into place: the hidden sibling
    ``.<name>.tmp-<hex>-<pid>@<host>``, its owner in its name, so that a later run can tell one
    left by a process that is gone (:func:`remove_stale_temps`) from one still being written.
    ``kind`` "old": where an output being replaced waits until its replacement is in place."""
    return final.parent / f".{final.name}.{kind}-{uuid.uuid4().hex[:12]}-{os.getpid()}@{host_tag()}"


def process_gone(pid: int) -> bool:
    """Whether no process ``pid`` runs on this host any more (POSIX; an exited child that its
    parent has not reaped yet counts as gone)."""
    try:
        os.kill(pid, 0)  # signal 0: asks only whether the process exists
    except ProcessLookupError:
        return True
    except (OSError, OverflowError):  # another user's process (it exists); not a PID at all
        return False
    try:  # Linux: a zombie has finished all it will do
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] == "Z"
    except (OSError, IndexError):
        return False


# a temporary name of :func:`temp_path`: output name, kind, owner PID and host
_OWNED = re.compile(r"\.(.+)\.(tmp|old)-[0-9a-f]{12}-(\d{1,10})@([A-Za-z0-9-]+)")


def remove_stale_temps(*finals: str | os.PathLike[str]) -> list[Path]:
    """Remove the temporary files or folders of the outputs ``finals`` (:func:`temp_path`) that
    processes of this host left when they were killed outright (SIGKILL, out of memory, a batch's
    worker taken down with its cluster), i.e. whose owner process no longer exists; returns them.
    One listing per folder, however many outputs it holds.

    An overwrite killed between its two renames (the old output set aside as ``.old-``, the new
    one not yet renamed in: the output missing, both left by one process) is finished: the new
    output, complete since it is synced before the renames, goes in, and the old one is removed.
    Entries of other hosts (a shared file system), of running processes, or without an owner in
    their name are left. POSIX only (elsewhere nothing is removed: Windows has no harmless
    existence probe)."""
    if os.name != "posix":
        return []
    wanted: dict[Path, set[str]] = {}
    for f in finals:
        p = Path(os.path.abspath(f))
        wanted.setdefault(p.parent, set()).add(p.name)
    host, removed = host_tag(), []
    for folder, names in wanted.items():
        try:
            entries = sorted(e.name for e in os.scandir(folder) if e.name.startswith("."))
        except OSError:  # no folder yet, or unreadable: nothing of ours to clean
            continue
        # per output: (kind, owner PID) -> its entries left by processes that are gone
        stale: dict[str, dict[tuple[str, int], list[Path]]] = {}
        for entry in entries:
            m = _OWNED.fullmatch(entry)
            if m and m.group(1) in names and m.group(4) == host and process_gone(int(m.group(3))):
                key = (m.group(2), int(m.group(3)))
                stale.setdefault(m.group(1), {}).setdefault(key, []).append(folder / entry)
        for name, left in stale.items():
            _finish_overwrite(folder / name, left)
            for path in (p for paths in left.values() for p in paths):
                _remove(path)
                if not os.path.lexists(path):
                    removed.append(path)
                    log.info("removed %s: left by a stopped run", path)
    return removed


def _finish_overwrite(final: Path, stale: dict[tuple[str, int], list[Path]]) -> None:
    """The new output of an overwrite killed between its two renames, renamed in (and taken out
    of ``stale``); nothing when ``final`` is there or the leftovers are not that case."""
    if os.path.lexists(final):
        return
    for pid in sorted({pid for kind, pid in stale if kind == "old"}):
        new = stale.get(("tmp", pid), [])
        if len(new) != 1:  # (not the kill between the two renames, or not only that)
            continue
        try:
            os.rename(new[0], final)
        except OSError as err:  # e.g. another run got there first: theirs stands
            log.warning("cannot finish the stopped overwrite of %s: %s", final, err)
            return
        stale.pop(("tmp", pid))
        log.warning("%s: a stopped overwrite finished (its new output renamed in)", final)
        return


class OutputFolder:
    """One slide's output folder, written under a temporary name and renamed when complete.

    ``with OutputFolder(out_dir, overwrite) as tmp:`` checks at entry (before any work) that
    ``out_dir`` does not exist unless ``overwrite`` (OutputExistsError), creates the hidden sibling
    ``.<name>.tmp-<hex>-<pid>@<host>`` (same file system, so the rename is atomic) and yields it. On a clean exit
    the files are fsynced and the folder renamed to ``out_dir``; with ``overwrite`` the old output is
    first renamed aside, then deleted once the new one is in place (restored if the swap fails). On
    any exception the temporary folder is removed and an existing output is left untouched.
    OSErrors meaning a full, read-only or forbidden disk on the output paths become OutputWriteError
    (one line naming the path). A process killed outright can leave a ``.<name>.tmp-*`` folder
    (and, killed between the two renames of an overwrite, a ``.<name>.old-*`` one) behind; neither
    has the final name, and the next ``OutputFolder`` of the same output on the same host cleans
    them up (:func:`remove_stale_temps`: an overwrite stopped between its renames is finished).
    """

    def __init__(self, out_dir: str | os.PathLike[str], overwrite: bool = False) -> None:
        self.final = Path(os.path.abspath(out_dir))
        self.overwrite = overwrite
        self.tmp: Path | None = None
        self.made: list[Path] = []  # parent folders made for it: removed again if it fails

    def __enter__(self) -> Path:
        final = self.final
        remove_stale_temps(
            final
        )  # (first: it may put back an output a stopped overwrite set aside)
        if (final.exists() or final.is_symlink()) and not self.overwrite:
            raise OutputExistsError(
                f"output exists: {final} (use --overwrite to replace it, or choose another folder)"
            )
        tmp = temp_path(final)
        try:
            self.made = make_dirs(final.parent)
            tmp.mkdir()
        except OSError as err:
            remove_made(self.made)
            raise write_error(err, final) from err
        self.tmp = tmp
        return tmp

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        tmp, final = self.tmp, self.final
        assert tmp is not None
        self.tmp = None
        if exc is not None:
            _remove(tmp)
            remove_made(self.made)
            if isinstance(exc, OSError) and _is_write_error(exc, tmp, final):
                raise write_error(exc, final) from exc
            return  # re-raised by the with statement
        try:
            self._commit(tmp, final)
        except BaseException as err:
            _remove(tmp)
            remove_made(self.made)
            if isinstance(err, OSError) and _is_write_error(err, tmp, final, final.parent):
                raise write_error(err, final) from err
            raise

    def _commit(self, tmp: Path, final: Path) -> None:
        _fsync_tree(tmp)
        exists = final.exists() or final.is_symlink()
        if exists and not self.overwrite:  # appeared while we worked
            raise OutputExistsError(f"output exists: {final} (another run wrote it meanwhile)")
        aside = None
        if exists:
            aside = temp_path(final, "old")
            os.rename(final, aside)
        try:
            os.rename(tmp, final)
        except BaseException:
            if aside is not None:
                os.rename(aside, final)
            raise
        _fsync(final.parent)
        if aside is not None:
            _remove(aside)
