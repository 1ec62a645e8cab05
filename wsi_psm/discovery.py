"""Finding the slides a user pointed at: files, folders of slides, and DICOM WSI folders."""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from .errors import SlideOpenError

log = logging.getLogger(__name__)

# Whole-slide and image formats the readers open (OpenSlide, tiffslide, Pillow/tifffile).
SLIDE_SUFFIXES = {
    ".svs", ".tif", ".tiff", ".ndpi", ".vms", ".vmu", ".scn", ".mrxs", ".svslide", ".bif",
    ".qptiff", ".png", ".jpg", ".jpeg",
}  # fmt: skip
# Image tiles that ``segment`` takes from a folder (a whole slide there would be read whole).
TILE_SUFFIXES = {".png", ".jpg", ".jpeg", ".tif", ".tiff"}


@dataclass(frozen=True)
class SlideInput:
    path: Path  # the file, or a DICOM WSI folder
    name: str  # output folder name

    def __str__(self) -> str:
        return str(self.path)


def _safe_name(stem: str) -> str:
    """A folder name that is safe on every file system but keeps the stem readable."""
    return re.sub(r"[^\w.\-() ]+", "_", stem).strip() or "slide"


def _has_dicom(d: Path) -> bool:
    return d.is_dir() and any(p.suffix.lower() == ".dcm" for p in d.iterdir())


def _is_dicom_folder(d: Path) -> bool:
    """A folder that is one DICOM WSI series: .dcm files and no other slide files."""
    return _has_dicom(d) and not any(p.suffix.lower() in SLIDE_SUFFIXES for p in d.iterdir())


def _is_segment_output(q: Path) -> bool:
    """``<stem>_labels.tif`` beside ``<stem>.geojson``: what ``segment`` wrote, not an input (so
    ``segment DIR -o DIR`` can be run again)."""
    stem = q.name.removesuffix("_labels.tif")
    return stem != q.name and q.with_name(stem + ".geojson").is_file()


def _is_part_or_output(d: Path) -> bool:
    """A folder that is no one's slide folder: a MIRAX slide's data (beside its ``.mrxs``), or a
    slide's output folder from ``run`` (its ``summary.json``)."""
    return d.with_name(d.name + ".mrxs").is_file() or (d / "summary.json").is_file()


def _some(names: list[str], most: int = 3) -> str:
    shown = ", ".join(names[:most])
    return shown if len(names) <= most else f"{shown} and {len(names) - most} more"


def find_slides(inputs: Iterable[str | Path], *, tiles: bool = False) -> list[SlideInput]:
    """Slides named by ``inputs``: files as given; in a folder, its slide files and DICOM subfolders.

    A folder holding ``.dcm`` files is one DICOM slide (each file of the series opens the whole
    pyramid), beside any other slide files in it; ``segment``'s own label images in a folder are
    skipped. With ``tiles`` (``segment``'s inputs) a folder yields only its image tiles
    (TILE_SUFFIXES), no DICOM, and errors speak of images. Raises SlideOpenError for a missing
    path, a folder without slides, or two slides that would write to the same output folder name.
    """
    suffixes = TILE_SUFFIXES if tiles else SLIDE_SUFFIXES
    noun = "images" if tiles else "slides"
    found: list[SlideInput] = []
    for raw in inputs:
        p = Path(raw)
        if not p.exists():
            what = (
                "a broken or looping symbolic link" if p.is_symlink() else "no such file or folder"
            )
            raise SlideOpenError(f"cannot open '{p}': {what}")
        if p.is_file():
            if p.suffix.lower() == ".dcm":
                found.append(SlideInput(p.parent, _safe_name(p.parent.name)))
            else:
                found.append(SlideInput(p, _safe_name(p.stem)))
            continue
        if not tiles and _is_dicom_folder(p):
            found.append(SlideInput(p, _safe_name(p.name)))
            continue
        inner, subfolders, slides = [], [], []
        for q in sorted(p.iterdir()):
            if q.name.startswith(".") or _is_segment_output(q):
                continue
            if q.is_file() and q.suffix.lower() in suffixes:
                inner.append(SlideInput(q, _safe_name(q.stem)))
            elif not tiles and _is_dicom_folder(q):
                inner.append(SlideInput(q, _safe_name(q.name)))
            elif q.is_dir():
                if _is_dicom_folder(q):  # (segment reads no whole slide)
                    slides.append(q.name + "/")
                elif not _is_part_or_output(q):
                    subfolders.append(q.name)
            elif q.suffix.lower() in SLIDE_SUFFIXES:  # a whole slide among segment's tiles
                slides.append(q.name)
        if not tiles and _has_dicom(p):  # a DICOM series beside other slides in the same folder
            inner.append(SlideInput(p, _safe_name(p.name)))
        # what a user may have expected to be found says so, in one line each
        sub = (
            f"subfolders are not searched ({_some(subfolders)}): name them, e.g. {p / '*'}"
            if subfolders
            else ""
        )
        whole = (
            f"whole slides are not read as tiles ({_some(slides)}): `wsi-psm run` takes them"
            if slides
            else ""
        )
        if not inner:
            dicom = "" if tiles else " and DICOM folders"
            why = "; ".join(w for w in (sub, whole) if w)
            raise SlideOpenError(
                f"{p}: no {noun} in this folder (looked for {', '.join(sorted(suffixes))}{dicom})"
                + (f"; {why}" if why else "")
            )
        for w in (sub, whole):
            if w:
                log.warning("%s: %s", p, w)
        found.extend(inner)
    seen: dict[str, Path] = {}
    unique = []
    for s in found:
        if s.name in seen:
            if seen[s.name].resolve() == s.path.resolve():  # one file, named twice (a.png ./a.png)
                continue
            raise SlideOpenError(
                f"two {noun} would write to one output {'name' if tiles else 'folder'} {s.name!r}: "
                f"{seen[s.name]} and {s.path}"
            )
        seen[s.name] = s.path
        unique.append(s)
    return unique
