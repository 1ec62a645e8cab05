"""One reader interface over OpenSlide, tiffslide and plain images, in level-0 pixel coordinates.

``Slide.open`` picks a backend (OpenSlide first: SVS, NDPI, DICOM WSI, generic tiled TIFF; then
tiffslide; then Pillow/tifffile for plain images), works out the resolution (mpp), checks that a TIFF's
image data lies inside the file and probes one small read, so a broken file fails at open rather than
an hour into a run. Coordinates are level-0 pixels,
x = column, y = row. Level ``L`` pixel ``i`` covers level-0 ``[i*d, (i+1)*d)`` with ``d`` the level's
downsample (OpenSlide's model); ``read_at_mpp`` resamples a level-0 box exactly onto its output grid:
output pixel ``(r, c)`` covers level-0 ``[x + c*w/out_w, x + (c+1)*w/out_w)`` (likewise in y),
whichever level it was read from.

Every error from a decoder is mapped to ``SlideOpenError`` / ``SlideReadError`` (one line, naming the
file). Reads are safe from several threads: OpenSlide is documented thread-safe (and openslide-python
releases the GIL during reads); tiffslide keeps one zarr group per thread and tifffile locks seeks and
reads on the shared file handle; the plain-image backend holds a decoded array. No lock of ours is
needed, so tile decoding runs in parallel.
"""

from __future__ import annotations

import functools
import logging
import math
import os
import sys
import tempfile
import threading
import warnings
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from .errors import InvalidArgumentError, MissingMppError, SlideOpenError, SlideReadError

log = logging.getLogger(__name__)

BACKENDS = ("auto", "openslide", "tiffslide", "image")
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp"}
TIFF_SUFFIXES = {".tif", ".tiff"}

# A TIFF/PNG/JPEG resolution is believed only inside this range of µm/px: microscopy level 0 lies
# within it, while the ubiquitous placeholder 72 / 96 / 300 dpi (352.8 / 264.6 / 84.7 µm/px) do not.
PLAUSIBLE_MPP = (0.05, 20.0)
# A pyramid level whose mpp exceeds the target by less than this fraction still counts as "fine enough"
# (DICOM / Aperio downsamples are often 2.0003 or 4.0011, not exact powers of two).
LEVEL_TOLERANCE = 0.01
# Resampling: Pillow's C resize widens its filter by the downscale factor, i.e. it anti-aliases
# properly, works on uint8 without a float copy, and accepts a sub-pixel source box (exact alignment).
# It is ~15x faster than skimage.transform.resize(anti_aliasing=True), which blurs and then
# interpolates in float64 (2048² -> 1024² RGB: 46 ms vs 730 ms here; mean difference < 1 grey level).
# Bilinear (a triangle filter when reducing) does not ring at nucleus edges as Lanczos does.
RESAMPLE = Image.Resampling.BILINEAR
_FILTER_SUPPORT = 1.0  # half-width of the bilinear filter in output px
_PROBE_PX = 256  # side of the probe read at open
# level px per side of one thumbnail chunk (bounds memory on huge single-level slides)
_THUMB_CHUNK = 4096
WHITE = 255


@dataclass(frozen=True)
class SlideInfo:
    """What ``wsi-psm info`` prints and summary.json records."""

    path: str
    name: str
    width: int
    height: int
    level_count: int
    level_dimensions: tuple[tuple[int, int], ...]
    level_downsamples: tuple[float, ...]
    mpp: float | None
    mpp_source: str  # "metadata" | "tiff-resolution" | "user" | "none"
    vendor: str | None
    backend: str  # "openslide" | "tiffslide" | "image"
    objective_power: float | None
    # the file's own (mpp, source) where a user's --mpp differs from it (warn_mpp_override)
    overridden_mpp: tuple[float, str] | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "name": self.name,
            "width": self.width,
            "height": self.height,
            "level_count": self.level_count,
            "level_dimensions": [list(d) for d in self.level_dimensions],
            "level_downsamples": list(self.level_downsamples),
            "mpp": self.mpp,
            "mpp_source": self.mpp_source,
            "vendor": self.vendor,
            "backend": self.backend,
            "objective_power": self.objective_power,
        }


# --------------------------------------------------------------------------------------------------
# helpers


def _float_or_none(value: Any) -> float | None:
    try:
        v = float(value)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) and v > 0 else None


def _mean_mpp(mx: Any, my: Any) -> float | None:
    vals = [v for v in (_float_or_none(mx), _float_or_none(my)) if v is not None]
    return sum(vals) / len(vals) if vals else None


def _plausible(mpp: float | None) -> bool:
    return mpp is not None and PLAUSIBLE_MPP[0] <= mpp <= PLAUSIBLE_MPP[1]


def _mpp_from_resolution(xres: Any, yres: Any, unit: Any) -> float | None:
    """µm/px from TIFF-style resolution (pixels per unit); None when the unit is not inch/cm."""
    unit = str(unit).lower() if unit is not None else ""
    per_unit_um = {"inch": 25400.0, "2": 25400.0, "centimeter": 1e4, "cm": 1e4, "3": 1e4}.get(unit)
    if per_unit_um is None:
        return None
    res = _mean_mpp(xres, yres)  # mean pixels per unit
    return per_unit_um / res if res else None


def _short(exc: BaseException) -> str:
    """An exception as one short line."""
    msg = " ".join(str(exc).split()) or type(exc).__name__
    return msg if len(msg) <= 200 else msg[:197] + "..."


_QUIET_LOCK = threading.Lock()


class _Held:
    """What a probe printed to the stderr descriptor is written out only if ``keep`` is set."""

    keep = False


@contextmanager
def _held_c_stderr(held: _Held) -> Iterator[None]:
    """Hold what C libraries (libtiff, libjpeg under OpenSlide) print straight to file descriptor 2
    while a format is probed: written out afterwards if the slide opened, dropped if it did not (the
    failure is then reported once, as one line). Only ever entered under ``_QUIET_LOCK``."""
    try:
        sys.stderr.flush()
        buf = tempfile.TemporaryFile()
    except (AttributeError, OSError, ValueError):  # no temporary space: nothing is held
        yield
        return
    try:
        saved = os.dup(2)
    except OSError:  # no stderr descriptor: nothing to hold
        buf.close()
        yield
        return
    with buf:
        os.dup2(buf.fileno(), 2)
        try:
            yield
        finally:
            with suppress(AttributeError, OSError, ValueError):
                sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            if held.keep:
                buf.seek(0)
                data = buf.read()
                if data:
                    os.write(2, data)


@contextmanager
def _quiet() -> Iterator[_Held]:
    """Silence library chatter (tifffile log lines, Pillow / tiffslide warnings, C libraries'
    stderr) while a format is probed: a failure is reported once, as one clear error. Serialised,
    since it touches global state."""
    tlog = logging.getLogger("tifffile")
    held = _Held()
    with _QUIET_LOCK, warnings.catch_warnings(), _held_c_stderr(held):
        warnings.simplefilter("ignore")
        level = tlog.level
        tlog.setLevel(logging.CRITICAL)
        try:
            yield held
        finally:
            tlog.setLevel(level)


_TIFF_MAGIC = (b"II*\0", b"MM\0*", b"II+\0", b"MM\0+")


def _tiff_truncation(path: Path, max_pages: int = 64) -> str | None:
    """Why a TIFF-based file is truncated (image data past the end of the file), else None.

    Cheap (IFDs only), and it catches what a probe of one corner cannot: tiles missing at the end.
    Not a TIFF, or unparseable here: None (the backends have their say).
    """
    import tifffile

    try:
        with open(path, "rb") as fh:
            if fh.read(4) not in _TIFF_MAGIC:
                return None
        size = path.stat().st_size
        with tifffile.TiffFile(path) as tf:
            for i, page in enumerate(tf.pages):
                if i >= max_pages:
                    break
                offsets = np.asarray(tuple(getattr(page, "dataoffsets", ())), dtype=np.int64)
                counts = np.asarray(tuple(getattr(page, "databytecounts", ())), dtype=np.int64)
                n = min(len(offsets), len(counts))
                if n == 0:
                    continue
                end = int((offsets[:n] + counts[:n]).max())
                if end > size:
                    return f"file is truncated: image {i} needs {end} bytes but the file has {size}"
    except Exception:  # unparseable by tifffile: leave the verdict to the backends and the probe
        return None
    return None


def _to_rgb_image(arr: np.ndarray) -> Image.Image:
    """uint8 RGB PIL image from a (h, w[, c]) array of any common sample layout; alpha onto white."""
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[..., 0]
    if arr.dtype != np.uint8:
        if arr.dtype == np.uint16:
            arr = (arr >> 8).astype(np.uint8)
        elif arr.dtype == bool:
            arr = arr.astype(np.uint8) * 255
        else:
            raise ValueError(
                f"unsupported pixel type {arr.dtype} (8- or 16-bit RGB or grey images are read)"
            )
    if arr.ndim == 2:
        return Image.fromarray(arr).convert("RGB")
    if arr.shape[2] == 3:
        return Image.fromarray(arr)
    if arr.shape[2] == 4:
        return _flatten_alpha(Image.fromarray(arr))
    raise ValueError(f"unsupported number of samples per pixel: {arr.shape[2]}")


def _flatten_alpha(img: Image.Image) -> Image.Image:
    """RGB with transparent pixels composited onto white (OpenSlide marks no-data as transparent)."""
    if img.mode == "RGB":
        return img
    if img.mode != "RGBA":
        if img.mode in ("LA", "PA") or (img.mode == "P" and "transparency" in img.info):
            img = img.convert("RGBA")
        elif img.mode.startswith("I;16"):
            return _to_rgb_image(np.asarray(img).astype(np.uint16))
        else:
            return img.convert("RGB")
    if img.getextrema()[3][0] == 255:  # fully opaque: the common case inside tissue
        return img.convert("RGB")
    out = Image.new("RGB", img.size, (WHITE, WHITE, WHITE))
    out.paste(img, mask=img.getchannel("A"))
    return out


# --------------------------------------------------------------------------------------------------
# backends: each exposes the pyramid and ``read(level, ix0, iy0, w, h)`` returning an RGB PIL image
# that covers level pixels [ix0, ix0+w) x [iy0, iy0+h) and its origin (ox, oy) in level pixels,
# with ix0 - 1 < ox <= ix0 (OpenSlide can start at a fractional level pixel). Outside the slide: white.


def warn_mpp_override(info: SlideInfo) -> None:
    """Warn that --mpp overrides the file's own resolution, where it does. Called once the input
    has passed its checks, so that a refused file (fluorescence, greyscale) gets only its error."""
    if info.overridden_mpp is not None and info.mpp is not None:
        _warn_mpp_override(info.path, info.name, info.mpp, *info.overridden_mpp)


@functools.cache
def _warn_mpp_override(path: str, name: str, user_mpp: float, mpp: float, source: str) -> None:
    """Once per file and value: `segment` opens each image up to three times."""
    log.warning(
        "%s: --mpp %.4g overrides the file's own %.4g µm/px (%s)", name, user_mpp, mpp, source
    )


class _Unrecognised(Exception):
    """The backend does not recognise the file's format at all (try the next one)."""


@dataclass
class _Meta:
    vendor: str | None = None
    objective_power: float | None = None
    mpp: float | None = None
    mpp_source: str = "none"


_JPEG_TRANSFER_SYNTAXES = {"1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.4.51"}


def _jpeg_says_ycbcr(jpeg: bytes) -> bool:
    """Whether a JPEG stream's own markers declare YCbCr: a JFIF APP0 marker, an Adobe APP14 marker
    with a colour transform, or subsampled chroma. Bare RGB tiles (Aperio style) declare none."""
    adobe_transform = None
    jfif = subsampled = False
    k = 2
    while k + 4 <= len(jpeg) and jpeg[k] == 0xFF:
        marker = jpeg[k + 1]
        length = int.from_bytes(jpeg[k + 2 : k + 4], "big")
        seg = jpeg[k + 4 : k + 2 + length]
        if marker == 0xE0 and seg.startswith(b"JFIF\0"):
            jfif = True
        elif marker == 0xEE and seg.startswith(b"Adobe") and len(seg) >= 12:
            adobe_transform = seg[11]
        elif marker in (0xC0, 0xC1, 0xC2) and len(seg) >= 15 and seg[5] == 3:
            sampling = {seg[7 + 3 * c] for c in range(3)}
            subsampled = len(sampling) > 1
        elif marker == 0xDA:  # start of scan: the header is over
            break
        k += 2 + length
    if adobe_transform is not None:
        return adobe_transform != 0
    return jfif or subsampled


def _dicom_first_jpeg_header(path: Path, limit: int = 1 << 16) -> bytes | None:
    """The first bytes of the first encapsulated JPEG frame of a DICOM file (after PixelData)."""
    import mmap

    with open(path, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        # (7FE0,0010) PixelData, explicit VR "OB" (encapsulated); the frames follow it
        tag = mm.find(b"\xe0\x7f\x10\x00OB")
        if tag < 0:
            return None
        soi = mm.find(b"\xff\xd8\xff", tag)
        return None if soi < 0 else bytes(mm[soi : soi + limit])


class _OpenSlideBackend:
    name = "openslide"

    def __init__(self, path: Path) -> None:
        import openslide

        try:
            self._s = openslide.OpenSlide(str(path))
        except openslide.OpenSlideUnsupportedFormatError as exc:
            raise _Unrecognised(_short(exc)) from exc
        self.level_dimensions = tuple((int(w), int(h)) for w, h in self._s.level_dimensions)
        self.level_downsamples = tuple(float(d) for d in self._s.level_downsamples)
        p = self._s.properties
        vendor = p.get(openslide.PROPERTY_NAME_VENDOR)
        meta = _Meta(
            vendor=vendor,
            objective_power=_float_or_none(p.get(openslide.PROPERTY_NAME_OBJECTIVE_POWER)),
        )
        mpp = _mean_mpp(p.get(openslide.PROPERTY_NAME_MPP_X), p.get(openslide.PROPERTY_NAME_MPP_Y))
        if mpp is None:
            mpp = _mean_mpp(p.get("aperio.MPP"), None)
        if mpp is not None:
            # OpenSlide's generic-tiff mpp is just the TIFF resolution tags restated
            meta.mpp, meta.mpp_source = (
                mpp,
                ("tiff-resolution" if vendor == "generic-tiff" else "metadata"),
            )
        else:
            meta.mpp = _mpp_from_resolution(
                p.get("tiff.XResolution"), p.get("tiff.YResolution"), p.get("tiff.ResolutionUnit")
            )
            meta.mpp_source = "tiff-resolution" if meta.mpp is not None else "none"
        self.meta = meta
        self._ycbcr = vendor == "dicom" and self._dicom_mislabelled_ycbcr(path, p)

    @staticmethod
    def _dicom_mislabelled_ycbcr(path: Path, p: Any) -> bool:
        """DICOM says RGB but the JPEG frames are YCbCr (seen in wsi2dcm and bfconvert output).

        OpenSlide obeys the DICOM header, as the standard says, and hands back the stored Y, Cb, Cr
        samples as if they were R, G, B (white glass turns salmon); we convert them back.
        """
        if p.get("dicom.PhotometricInterpretation") != "RGB":
            return False
        if p.get("dicom.TransferSyntaxUID") not in _JPEG_TRANSFER_SYNTAXES:
            return False
        try:
            header = _dicom_first_jpeg_header(path)
        except (OSError, ValueError):
            return False
        if header is None or not _jpeg_says_ycbcr(header):
            return False
        log.warning(
            "%s: DICOM PhotometricInterpretation is RGB but the JPEG frames are YCbCr; "
            "converting colours (the file is mislabelled)",
            path,
        )
        return True

    def origin(self, level: int, ix0: int, iy0: int) -> tuple[float, float]:
        """Where a read asked to start at level pixel (ix0, iy0) really starts, in level pixels."""
        d = self.level_downsamples[level]
        return math.floor(ix0 * d) / d, math.floor(iy0 * d) / d

    def read(
        self, level: int, ix0: int, iy0: int, w: int, h: int
    ) -> tuple[Image.Image, float, float]:
        d = self.level_downsamples[level]
        x0, y0 = math.floor(ix0 * d), math.floor(iy0 * d)
        ox, oy = x0 / d, y0 / d
        # one extra column/row when OpenSlide starts at a fractional level pixel before ix0
        w2, h2 = w + (ox != ix0), h + (oy != iy0)
        img = self._s.read_region((x0, y0), level, (w2, h2))  # RGBA, transparent outside the slide
        if self._ycbcr:
            r, g, b, a = img.split()
            img = Image.merge("YCbCr", (r, g, b)).convert("RGB")
            img.putalpha(a)
        return _flatten_alpha(img), ox, oy

    def close(self) -> None:
        self._s.close()


class _GridBackend:
    """Backends addressed by whole level pixels: reads are clipped to the slide and padded white here."""

    name = "grid"
    level_dimensions: tuple[tuple[int, int], ...]
    level_downsamples: tuple[float, ...]

    def _read_inside(self, level: int, x0: int, y0: int, x1: int, y1: int) -> np.ndarray:
        raise NotImplementedError

    def origin(self, level: int, ix0: int, iy0: int) -> tuple[float, float]:
        return float(ix0), float(iy0)

    def read(
        self, level: int, ix0: int, iy0: int, w: int, h: int
    ) -> tuple[Image.Image, float, float]:
        lw, lh = self.level_dimensions[level]
        cx0, cy0 = max(ix0, 0), max(iy0, 0)
        cx1, cy1 = min(ix0 + w, lw), min(iy0 + h, lh)
        inside = cx1 > cx0 and cy1 > cy0
        if inside and (cx0, cy0, cx1, cy1) == (ix0, iy0, ix0 + w, iy0 + h):
            return (
                _to_rgb_image(self._read_inside(level, cx0, cy0, cx1, cy1)),
                float(ix0),
                float(iy0),
            )
        canvas = Image.new("RGB", (w, h), (WHITE, WHITE, WHITE))
        if inside:
            canvas.paste(
                _to_rgb_image(self._read_inside(level, cx0, cy0, cx1, cy1)), (cx0 - ix0, cy0 - iy0)
            )
        return canvas, float(ix0), float(iy0)


class _TiffSlideBackend(_GridBackend):
    name = "tiffslide"

    def __init__(self, path: Path) -> None:
        import tifffile
        import tiffslide

        try:
            self._s = tiffslide.TiffSlide(str(path))
            # properties are parsed lazily: touch them here so a broken file fails in this block
            self.level_dimensions = tuple((int(w), int(h)) for w, h in self._s.level_dimensions)
            self.level_downsamples = tuple(float(d) for d in self._s.level_downsamples)
            p = self._s.properties
        except tifffile.TiffFileError as exc:
            if "not a TIFF file" in str(exc):
                raise _Unrecognised(_short(exc)) from exc
            raise
        except (IndexError, KeyError) as exc:  # tifffile found no usable page: the IFDs are gone
            # (tifffile's own words, e.g. "index 0 out of range(0)", would say nothing more)
            raise ValueError(
                "no readable image in the TIFF structure (truncated or corrupt file?)"
            ) from exc
        vendor = p.get("tiffslide.vendor")
        meta = _Meta(
            vendor=vendor, objective_power=_float_or_none(p.get("tiffslide.objective-power"))
        )
        mpp = _mean_mpp(p.get("tiffslide.mpp-x"), p.get("tiffslide.mpp-y"))
        if mpp is None:
            mpp = _mean_mpp(p.get("aperio.MPP"), None)
        if mpp is not None:
            # without a vendor, tiffslide's mpp comes from the TIFF resolution tags
            meta.mpp, meta.mpp_source = mpp, ("metadata" if vendor else "tiff-resolution")
        self.meta = meta

    def _read_inside(self, level: int, x0: int, y0: int, x1: int, y1: int) -> np.ndarray:
        d = self.level_downsamples[level]
        # tiffslide maps a level-0 location to level pixel int(loc / d): pick the location that lands on x0
        lx, ly = self._loc(x0, d), self._loc(y0, d)
        return self._s.read_region(
            (lx, ly), level, (x1 - x0, y1 - y0), as_array=True, padding=False
        )

    @staticmethod
    def _loc(i: int, d: float) -> int:
        loc = math.ceil(i * d)
        while loc > 0 and int(loc / d) > i:
            loc -= 1
        while int(loc / d) < i:
            loc += 1
        return loc

    def close(self) -> None:
        self._s.close()


class _ImageBackend(_GridBackend):
    """Plain images (PNG, JPEG, BMP, simple TIFF), decoded once into memory at open."""

    name = "image"

    def __init__(self, path: Path) -> None:
        self._arr, dpi = self._decode(path)  # read-only RGB (h, w, 3)
        h, w = self._arr.shape[:2]
        self.level_dimensions = ((w, h),)
        self.level_downsamples = (1.0,)
        mpp = _mpp_from_resolution(dpi[0], dpi[-1], "inch") if dpi else None
        self.meta = _Meta(mpp=mpp, mpp_source="tiff-resolution" if mpp else "none")

    @staticmethod
    def _decode(path: Path) -> tuple[np.ndarray, tuple | None]:
        """RGB pixels and (x, y) dots per inch; Pillow first, tifffile for TIFFs Pillow cannot decode."""
        from PIL import UnidentifiedImageError

        try:
            with Image.open(path) as im:
                im.load()
                # dpi: PNG pHYs, JPEG JFIF density and TIFF resolution tags, converted by Pillow
                return np.asarray(_flatten_alpha(im)), im.info.get("dpi")
        except Image.DecompressionBombError as exc:
            raise ValueError(
                f"{_short(exc)}; convert it to a tiled pyramidal TIFF (e.g. vips tiffsave --tile --pyramid)"
            ) from exc
        except (UnidentifiedImageError, OSError, ValueError) as exc:
            if path.suffix.lower() not in TIFF_SUFFIXES:
                if isinstance(exc, UnidentifiedImageError):
                    raise _Unrecognised(_short(exc)) from exc
                raise
            pil_error = exc
        import tifffile

        try:
            with tifffile.TiffFile(path) as tf:
                page = tf.pages.first
                arr = page.asarray()
                photometric = page.photometric.name
                tags = page.tags
                unit = tags.get("ResolutionUnit")
                xr, yr = tags.get("XResolution"), tags.get("YResolution")
                dpi = None
                if unit is not None and xr is not None and yr is not None:
                    to_inch = {2: 1.0, 3: 2.54}.get(int(unit.value))
                    if to_inch and xr.value[1] and yr.value[1]:
                        dpi = (
                            xr.value[0] / xr.value[1] * to_inch,
                            yr.value[0] / yr.value[1] * to_inch,
                        )
        except tifffile.TiffFileError as exc:
            if "not a TIFF file" in str(exc):
                raise _Unrecognised(_short(exc)) from pil_error
            raise
        if photometric not in ("RGB", "MINISBLACK"):
            raise ValueError(f"unsupported TIFF colour model {photometric} ({_short(pil_error)})")
        return np.asarray(_to_rgb_image(arr)), dpi

    def _read_inside(self, level: int, x0: int, y0: int, x1: int, y1: int) -> np.ndarray:
        return self._arr[y0:y1, x0:x1]

    def close(self) -> None:
        self._arr = np.zeros((0, 0, 3), np.uint8)


_BACKEND_CLASSES = {
    "openslide": _OpenSlideBackend,
    "tiffslide": _TiffSlideBackend,
    "image": _ImageBackend,
}


# --------------------------------------------------------------------------------------------------


@dataclass
class _Attempt:
    backend: str
    stage: str  # "open" or "read"
    error: BaseException = field(repr=False)


class Slide:
    """A whole-slide image (or plain image) opened for reading; a context manager.

    Use ``Slide.open(path)``. ``read_region`` and ``read_at_mpp`` may be called from several threads.
    Do not ``close`` while other threads read. A Slide cannot be pickled: each process opens its own.
    """

    def __init__(self, backend: Any, info: SlideInfo) -> None:
        self._b = backend
        self.info = info
        self._closed = False

    # ---- opening ----------------------------------------------------------------------------------

    @classmethod
    def open(cls, path: str | Path, *, backend: str = "auto", mpp: float | None = None) -> Slide:
        """Open a slide, resolve its mpp and probe one small read.

        ``path`` may be a DICOM WSI folder (its first ``.dcm`` file is opened; OpenSlide finds the rest).
        ``backend``: "auto" (OpenSlide, then tiffslide, then plain image), or one of those forced.
        ``mpp``: micrometres per pixel given by the user (within PLAUSIBLE_MPP); overrides whatever
        the file says, with a warning where the two differ.
        Raises SlideOpenError (missing, not a slide, unopenable) or SlideReadError (pixels undecodable).
        """
        if backend not in BACKENDS:
            raise InvalidArgumentError(
                f"backend must be one of {', '.join(BACKENDS)}, not {backend!r}"
            )
        if mpp is not None and not _plausible(_float_or_none(mpp)):
            lo, hi = PLAUSIBLE_MPP
            raise InvalidArgumentError(
                f"mpp must be a slide's micrometres per pixel, between {lo:g} and {hi:g} "
                f"(0.25 is 40x, 0.5 is 20x), not {mpp!r}"
            )
        p = Path(path).expanduser()
        name = p.stem
        if p.is_dir():
            dcms = sorted(p.glob("*.dcm"))
            if not dcms:
                raise SlideOpenError(
                    f"cannot open '{p}': it is a folder without DICOM (.dcm) files"
                )
            name, p = p.name, dcms[0]
        elif not p.exists():
            raise SlideOpenError(f"cannot open '{p}': no such file or folder")
        elif not p.is_file():
            raise SlideOpenError(f"cannot open '{p}': not a regular file")
        elif p.stat().st_size == 0:
            raise SlideOpenError(f"cannot open '{p}': the file is empty (0 bytes)")

        if backend != "auto":
            order = [backend]
        elif p.suffix.lower() in IMAGE_SUFFIXES:
            order = ["image"]
        else:
            order = ["openslide", "tiffslide", "image"]

        attempts: list[_Attempt] = []
        for bname in order:
            with _quiet() as held:
                try:
                    b = _BACKEND_CLASSES[bname](p)
                except _Unrecognised:
                    continue
                except MemoryError:
                    raise
                except Exception as exc:  # any decoder/library failure at open
                    attempts.append(_Attempt(bname, "open", exc))
                    continue
                slide = cls(b, cls._make_info(b, p, name, mpp))
                try:
                    slide._probe()
                except SlideReadError as exc:
                    slide.close()
                    attempts.append(_Attempt(bname, "read", exc.__cause__ or exc))
                    continue
                held.keep = True
            return slide

        if not attempts:
            tried = ", ".join(order)
            raise SlideOpenError(
                f"cannot open '{p}': not a whole-slide image or image in a supported format (tried {tried})"
            )
        # The first backend that recognised the format speaks for the file (OpenSlide's reason is the
        # most specific one; later backends usually fail the same way, less clearly).
        first = attempts[0]
        reason = _short(first.error)
        if first.stage == "read":
            known = "truncated" in reason or "unsupported pixel type" in reason
            hint = "" if known else " (file corrupt or truncated?)"
            raise SlideReadError(
                f"'{p}' opened ({first.backend}) but its pixels cannot be decoded: {reason}{hint}"
            )
        raise SlideOpenError(f"cannot open '{p}' ({first.backend}): {reason}")

    @staticmethod
    def _make_info(b: Any, p: Path, name: str, user_mpp: float | None) -> SlideInfo:
        meta: _Meta = b.meta
        mpp, source = meta.mpp, meta.mpp_source
        if mpp is not None and not _plausible(mpp):
            log.info("%s: ignoring implausible resolution %.4g µm/px (%s)", p, mpp, source)
            mpp, source = None, "none"
        overridden = None
        if user_mpp is not None:
            # the user's value wins (metadata can be wrong), but never silently (warn_mpp_override)
            if mpp is not None and abs(user_mpp - mpp) > 0.02 * mpp:
                overridden = (mpp, source)
            mpp, source = float(user_mpp), "user"
        w, h = b.level_dimensions[0]
        return SlideInfo(
            path=str(p),
            name=name,
            width=w,
            height=h,
            level_count=len(b.level_dimensions),
            level_dimensions=b.level_dimensions,
            level_downsamples=b.level_downsamples,
            mpp=mpp,
            mpp_source=source,
            vendor=meta.vendor,
            backend=b.name,
            objective_power=meta.objective_power,
            overridden_mpp=overridden,
        )

    def _probe(self) -> None:
        """Check TIFF data extents and decode a corner of the coarsest level, so a broken file fails now."""
        if self.backend != "image":  # the image backend decoded everything already
            short = _tiff_truncation(Path(self.info.path))
            if short:
                raise SlideReadError(short) from ValueError(short)
        level = self.level_count - 1
        lw, lh = self.level_dimensions[level]
        self.read_region(0, 0, min(lw, _PROBE_PX), min(lh, _PROBE_PX), level)
        if level > 0:  # and a corner of level 0, where the processing reads happen
            self.read_region(0, 0, min(self.width, 16), min(self.height, 16), 0)

    # ---- properties -------------------------------------------------------------------------------

    @property
    def path(self) -> str:
        return self.info.path

    @property
    def name(self) -> str:
        return self.info.name

    @property
    def backend(self) -> str:
        return self.info.backend

    @property
    def width(self) -> int:
        return self.info.width

    @property
    def height(self) -> int:
        return self.info.height

    @property
    def dimensions(self) -> tuple[int, int]:
        return self.info.width, self.info.height

    @property
    def level_count(self) -> int:
        return self.info.level_count

    @property
    def level_dimensions(self) -> tuple[tuple[int, int], ...]:
        return self.info.level_dimensions

    @property
    def level_downsamples(self) -> tuple[float, ...]:
        return self.info.level_downsamples

    @property
    def mpp(self) -> float:
        """Level-0 micrometres per pixel; MissingMppError when neither the file nor the user gave one."""
        if self.info.mpp is None:
            raise MissingMppError(
                f"{self.info.path}: no usable resolution in its metadata; "
                "give it with --mpp (micrometres per pixel at full resolution, e.g. --mpp 0.25 for 40x, 0.5 for 20x)"
            )
        return self.info.mpp

    # ---- reading ----------------------------------------------------------------------------------

    def best_level(self, target_mpp: float) -> int:
        """The coarsest level whose pixels are still at least as fine as ``target_mpp`` (level 0 if none)."""
        limit = target_mpp / self.mpp * (1.0 + LEVEL_TOLERANCE)
        best = 0
        for i, d in enumerate(self.level_downsamples):
            if d <= limit and d >= self.level_downsamples[best]:
                best = i
        return best

    def read_region(self, x: int, y: int, w: int, h: int, level: int = 0) -> np.ndarray:
        """uint8 (h, w, 3) RGB of ``level``; ``x, y`` in level-0 px, ``w, h`` in that level's px.

        The region starts at level pixel ``x / d`` (OpenSlide's convention); where that is not a whole
        pixel it is resampled. Parts outside the slide are white.
        """
        if not 0 <= level < self.level_count:
            raise ValueError(
                f"level {level} out of range: {self.info.name} has {self.level_count} levels"
            )
        d = self.level_downsamples[level]
        return self._render(level, x / d, y / d, float(w), float(h), int(w), int(h))

    def read_at_mpp(self, x: float, y: float, w: float, h: float, target_mpp: float) -> np.ndarray:
        """The level-0 box (x, y, w, h) resampled to ``target_mpp``: uint8 RGB of shape
        ``(round(h*mpp/target_mpp), round(w*mpp/target_mpp), 3)``, read from the best pyramid level.

        The box maps exactly onto the output grid (output px = ``w/out_w`` level-0 px); fractional
        boxes are allowed. Parts of the box outside the slide are white.
        """
        if target_mpp <= 0:
            raise ValueError(f"target_mpp must be positive, not {target_mpp}")
        f = self.mpp / target_mpp
        out_w, out_h = round(w * f), round(h * f)
        level = self.best_level(target_mpp)
        d = self.level_downsamples[level]
        return self._render(level, x / d, y / d, w / d, h / d, out_w, out_h)

    def thumbnail(self, target_mpp: float) -> tuple[np.ndarray, float]:
        """An RGB image at ``target_mpp`` covering the whole slide, and its level-0 px per thumbnail px.

        The thumbnail covers level-0 ``[0, out_w*scale) x [0, out_h*scale)`` (white past the slide), so
        the scale is exact on both axes. Large single-level slides are read in chunks.
        """
        if target_mpp <= 0:
            raise ValueError(f"target_mpp must be positive, not {target_mpp}")
        scale = target_mpp / self.mpp  # level-0 px per thumbnail px
        out_w, out_h = max(1, math.ceil(self.width / scale)), max(1, math.ceil(self.height / scale))
        level = self.best_level(target_mpp)
        d = self.level_downsamples[level]
        step = max(1, int(_THUMB_CHUNK * d / scale))  # thumbnail px per chunk side
        if out_w <= step and out_h <= step:
            return self._render(
                level, 0.0, 0.0, out_w * scale / d, out_h * scale / d, out_w, out_h
            ), scale
        out = np.empty((out_h, out_w, 3), np.uint8)
        for r0 in range(0, out_h, step):
            r1 = min(r0 + step, out_h)
            for c0 in range(0, out_w, step):
                c1 = min(c0 + step, out_w)
                out[r0:r1, c0:c1] = self._render(
                    level,
                    c0 * scale / d,
                    r0 * scale / d,
                    (c1 - c0) * scale / d,
                    (r1 - r0) * scale / d,
                    c1 - c0,
                    r1 - r0,
                )
        return out, scale

    def _render(
        self, level: int, fx: float, fy: float, fw: float, fh: float, out_w: int, out_h: int
    ) -> np.ndarray:
        """Level-pixel box (fx, fy, fw, fh) resampled onto an (out_h, out_w) RGB grid."""
        if self._closed:
            raise ValueError(f"slide '{self.info.name}' is closed")
        if out_w <= 0 or out_h <= 0:
            return np.full((max(out_h, 0), max(out_w, 0), 3), WHITE, np.uint8)
        if (
            fw == out_w
            and fh == out_h
            and float(fx).is_integer()
            and float(fy).is_integer()
            and self._b.origin(level, int(fx), int(fy)) == (fx, fy)
        ):  # whole level pixels at scale 1: no resampling
            img, _, _ = self._read(level, int(fx), int(fy), out_w, out_h)
            return np.array(img)  # writable copy; np.asarray of a PIL image is read-only
        # margin so the anti-aliasing filter sees real neighbours at the box edge, not a clamp
        reduce = max(fw / out_w, fh / out_h, 1.0)
        m = math.ceil(_FILTER_SUPPORT * reduce) + 1
        ix0, iy0 = math.floor(fx) - m, math.floor(fy) - m
        ix1, iy1 = math.ceil(fx + fw) + m, math.ceil(fy + fh) + m
        img, ox, oy = self._read(level, ix0, iy0, ix1 - ix0, iy1 - iy0)
        box = (fx - ox, fy - oy, fx + fw - ox, fy + fh - oy)
        return np.array(img.resize((out_w, out_h), RESAMPLE, box=box))

    def _read(
        self, level: int, ix0: int, iy0: int, w: int, h: int
    ) -> tuple[Image.Image, float, float]:
        try:
            return self._b.read(level, ix0, iy0, w, h)
        except MemoryError:
            raise
        except Exception as exc:  # decoder errors of any backend become one clear error
            raise SlideReadError(
                f"cannot read '{self.info.path}' at level {level}, "
                f"pixels x={ix0}..{ix0 + w}, y={iy0}..{iy0 + h}: {_short(exc)}"
            ) from exc

    # ---- lifetime ---------------------------------------------------------------------------------

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            try:
                self._b.close()
            except Exception as exc:  # closing a broken handle must not mask the original error
                log.debug("closing %s: %s", self.info.path, exc)

    def __enter__(self) -> Slide:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass

    def __reduce__(self) -> Any:
        raise TypeError(
            f"a Slide ('{self.info.name}') cannot be pickled or sent to another process; "
            "send the path and call Slide.open(path) there"
        )

    def __repr__(self) -> str:
        i = self.info
        mpp = f"{i.mpp:g}" if i.mpp is not None else "None"
        state = " closed" if self._closed else ""
        return f"<Slide {i.name!r} {i.width}x{i.height} levels={i.level_count} mpp={mpp} backend={i.backend}{state}>"
