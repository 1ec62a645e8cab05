"""Readers of the annotations in the shared data folder (MoNuSeg XML and colour masks, BCData points).

Annotations are for measuring only; nothing in the pipeline imports this module.

Rasterisation of MoNuSeg polygons: a pixel (row r, col c) belongs to a region when the point
(X=c, Y=r) lies inside it, i.e. ``skimage.draw.polygon(Y, X)``. The XML thus puts pixel centres on
integer coordinates; in this project's pixel-corner convention (DESIGN.md) that is the polygon shifted
by +0.5 px, rasterised by pixel centres. Of the choices tried (vertices as they are, or shifted by
±0.5 px) it agrees best with the third-party derived colour masks: foreground Dice 0.990-0.998 on 12
of the 13 images; TCGA-B0-5710 (0.946) was drawn with another offset by that third party.

Overlapping regions (0.01-2.6 % of the nucleus pixels of an image): the later region in the file wins,
the order in which a drawing tool paints them. A label can therefore come out in more than one piece
(a partly covered region, or a sliver thinner than a pixel); the metrics do not need connected labels.
"""

from __future__ import annotations

import csv
import functools
import gzip
import json
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from skimage.draw import polygon as draw_polygon

from wsi_psm.errors import WsiPsmError

MONUSEG_SHAPE = (1000, 1000)
BCDATA_CLASSES = ("Positive", "Negative")


class AnnotationError(WsiPsmError):
    """An annotation file is missing, unreadable, or not in the expected format."""


class Case(NamedTuple):
    """One image and its annotation, as the benchmarks iterate them."""

    stem: str
    image: Path
    annotation: Path  # MoNuSeg: the XML, else the colour mask; BCData: the annotations root
    has_xml: bool


# --------------------------------------------------------------------------- MoNuSeg


def _parse_xml(path: Path) -> ET.Element:
    try:
        return ET.parse(path).getroot()
    except (OSError, ET.ParseError) as err:
        raise AnnotationError(f"cannot read MoNuSeg XML {path}: {err}") from err


def monuseg_polygons(path: str | Path) -> list[np.ndarray]:
    """The regions of a MoNuSeg / ImageScope XML as (N, 2) float arrays of (x, y) = (column, row).

    Degenerate regions (fewer than 3 vertices) are skipped.
    """
    root = _parse_xml(Path(path))
    polys = []
    for region in root.iter("Region"):
        xy = [(float(v.get("X", "nan")), float(v.get("Y", "nan"))) for v in region.iter("Vertex")]
        arr = np.asarray(xy, dtype=np.float64).reshape(-1, 2)
        if len(arr) < 3 or not np.isfinite(arr).all():
            continue
        polys.append(arr)
    return polys


def monuseg_mpp(path: str | Path) -> float | None:
    """The XML's ``MicronsPerPixel`` attribute, or None when absent (TCGA-NH-A8F7 has none)."""
    root = _parse_xml(Path(path))
    node = root if root.tag == "Annotations" else root.find(".//Annotations")
    value = None if node is None else node.get("MicronsPerPixel")
    try:
        mpp = float(value) if value else None
    except ValueError:
        return None
    return mpp if mpp and mpp > 0 else None


def load_monuseg_xml(path: str | Path, shape: tuple[int, int] = MONUSEG_SHAPE) -> np.ndarray:
    """Instance labels (int32, 0 = background) from a MoNuSeg XML; label i = the i-th kept region."""
    labels = np.zeros(shape, dtype=np.int32)
    for i, xy in enumerate(monuseg_polygons(path), start=1):
        rr, cc = draw_polygon(xy[:, 1], xy[:, 0], shape=shape)
        labels[rr, cc] = i  # later regions overwrite earlier ones where they overlap
    return labels


# --------------------------------------------------------------------------- label images


# the least share of black (background) pixels an instance colour mask has: nuclei cover under
# half of a MoNuSeg mask; a photograph has a few black pixels at most
MIN_BACKGROUND_SHARE = 0.01


def colours_to_labels(
    rgb: np.ndarray, *, merge_overlaps: bool = False, source: str = "colour mask"
) -> np.ndarray:
    """One label per distinct colour, black = 0; labels follow the sorted colour codes (deterministic).

    ``merge_overlaps``: see :func:`merge_overlap_fragments` (for the derived MoNuSeg masks).
    ``source`` names the mask in errors (AnnotationError: not RGB, or no black background).
    """
    if rgb.ndim != 3 or rgb.shape[-1] < 3:
        raise AnnotationError(f"{source}: expected an RGB image, got an array of shape {rgb.shape}")
    rgb = rgb[..., :3].astype(np.int64)
    code = (rgb[..., 0] << 16) | (rgb[..., 1] << 8) | rgb[..., 2]
    uniq, inverse = np.unique(code.ravel(), return_inverse=True)
    black = float(np.mean(code == 0))
    if black < MIN_BACKGROUND_SHARE:
        # a mask has background; a photograph (an image folder given as ground truth) has almost
        # none (a few black pixels at most), and each of its colours would become a "nucleus"
        raise AnnotationError(
            f"{source}: not an instance mask: {black:.2%} black background among {len(uniq):,} "
            "colours (a photograph, not an annotation?)"
        )
    labels = inverse.reshape(code.shape).astype(np.int32)
    if merge_overlaps:
        colours = np.stack([(uniq >> 16) & 255, (uniq >> 8) & 255, uniq & 255], axis=1)
        labels = merge_overlap_fragments(labels, colours)
    return labels


def merge_overlap_fragments(labels: np.ndarray, colours: np.ndarray, tol: int = 2) -> np.ndarray:
    """Give the overlap pixels of two nuclei in an additive colour mask back to one of the two.

    The derived MoNuSeg masks were made by adding per-nucleus colour images, so where nuclei a and
    b overlap the colour is a + b (mod 256 per channel, give or take 1): a label of its own. A label
    whose colour is within ``tol`` of the sum of two labels it touches, and which is smaller than
    the larger of them, is merged into whichever of the two shares the longer border with it (the
    larger on a tie). On the 13 images with XML this turns 5,599 colours into 4,938 labels (the XMLs
    hold 4,949 regions; at most 4 apart per image), and PQ of mask against XML rises from 0.84-0.98
    to 0.89-0.99.
    Labels are then renumbered 1..n in order. ``colours[i]`` is the RGB of label i (row 0 black).
    """
    n = len(colours) - 1
    if n < 3:
        return labels
    colours = np.asarray(colours, dtype=np.int64)
    pa, pb = [], []
    for a, b in ((labels[:, :-1], labels[:, 1:]), (labels[:-1], labels[1:])):
        m = (a != b) & (a > 0) & (b > 0)
        pa.append(a[m])
        pb.append(b[m])
    src = np.concatenate(pa + pb).astype(np.int64)
    dst = np.concatenate(pb + pa).astype(np.int64)
    key, border = np.unique(src * (n + 1) + dst, return_counts=True)
    src, dst = key // (n + 1), key % (n + 1)
    area = np.bincount(labels.ravel(), minlength=n + 1)
    target = np.arange(n + 1)
    starts = np.searchsorted(src, np.arange(n + 2))
    for k in range(1, n + 1):
        nb, nb_border = dst[starts[k] : starts[k + 1]], border[starts[k] : starts[k + 1]]
        if len(nb) < 2:
            continue
        diff = np.abs((colours[nb][:, None] + colours[nb][None, :]) % 256 - colours[k])
        dist = np.minimum(diff, 256 - diff).max(axis=-1)
        np.fill_diagonal(dist, tol + 1)
        hits = np.argwhere(dist <= tol)
        if len(hits) == 0:
            continue
        i, j = hits[0]
        if area[k] >= max(area[nb[i]], area[nb[j]]):
            continue
        better_i = (nb_border[i], area[nb[i]]) >= (nb_border[j], area[nb[j]])
        target[k] = nb[i] if better_i else nb[j]
    if np.array_equal(target, np.arange(n + 1)):
        return labels
    # chains (a fragment merged into a fragment) resolve to their end
    while True:
        nxt = target[target]
        if np.array_equal(nxt, target):
            break
        target = nxt
    keep = np.zeros(n + 1, dtype=bool)
    keep[np.unique(target[1:])] = True
    keep[0] = False
    lut = np.zeros(n + 1, dtype=np.int32)
    lut[keep] = np.arange(1, int(keep.sum()) + 1, dtype=np.int32)
    return lut[target][labels]


def _read_mat(path: Path) -> np.ndarray:
    """The instance map of a MATLAB file, as CoNSeP, CPM and HoVer-Net's Kumar copy ship them:
    the variable ``inst_map``, else the file's one 2-D numeric array."""
    import h5py
    from scipy.io import loadmat

    if h5py.is_hdf5(path):  # MATLAB v7.3 saves HDF5, its arrays stored transposed
        with h5py.File(path, "r") as f:
            if "inst_map" not in f:
                raise ValueError("a MATLAB v7.3 (HDF5) file without 'inst_map'")
            return np.asarray(f["inst_map"][()]).T
    data = {k: v for k, v in loadmat(path).items() if not k.startswith("__")}
    if "inst_map" in data:
        return np.asarray(data["inst_map"])
    arrays = [v for v in data.values() if isinstance(v, np.ndarray) and v.ndim == 2]
    if len(arrays) != 1:
        raise ValueError(f"no 'inst_map' and {len(arrays)} 2-D arrays ({', '.join(data)})")
    return arrays[0]


def _read_image(path: Path) -> np.ndarray:
    if not path.is_file():
        raise AnnotationError(f"label image not found: {path}")
    try:
        if path.suffix.lower() == ".mat":
            return _read_mat(path)
        if path.suffix.lower() in (".tif", ".tiff"):
            import tifffile

            return np.asarray(tifffile.imread(path))
        from PIL import Image

        with Image.open(path) as im:
            if im.mode in ("P", "PA", "RGBA", "LA", "CMYK", "YCbCr"):
                im = im.convert("RGB")
            return np.asarray(im)
    except Exception as err:  # any decoder failure is the same problem for the user
        raise AnnotationError(f"cannot read label image {path}: {err}") from err


def load_instance_png(path: str | Path, *, merge_overlaps: bool = False) -> np.ndarray:
    """Instance labels from an RGB colour mask (one nucleus per colour, black background).

    ``merge_overlaps=True`` repairs the additive overlap colours of the derived MoNuSeg masks
    (:func:`merge_overlap_fragments`); leave it off for other masks, whose palettes may be sums.
    """
    arr = _read_image(Path(path))
    if arr.ndim == 2:
        return load_label_image(path)
    return colours_to_labels(arr, merge_overlaps=merge_overlaps, source=str(path))


def load_label_image(path: str | Path) -> np.ndarray:
    """Instance labels from an integer label TIFF / PNG, or a MATLAB file's ``inst_map`` (0 =
    background); RGB files are read as colour masks."""
    arr = _read_image(Path(path))
    if arr.ndim == 3 and arr.shape[-1] in (3, 4):
        return colours_to_labels(arr, source=str(path))
    if arr.ndim == 3 and arr.shape[0] == 1:
        arr = arr[0]
    if arr.ndim != 2:
        raise AnnotationError(f"{path}: expected a 2-D label image, got shape {arr.shape}")
    if arr.dtype.kind == "f":
        if not np.all(np.mod(arr, 1) == 0):
            raise AnnotationError(f"{path}: label image holds non-integer values")
    elif arr.dtype.kind == "b":
        arr = arr.astype(np.uint8)
    elif arr.dtype.kind not in "iu":
        raise AnnotationError(f"{path}: unsupported label dtype {arr.dtype}")
    if arr.size and arr.min() < 0:
        raise AnnotationError(f"{path}: label image holds negative values")
    if arr.size and arr.max() > np.iinfo(np.int32).max:
        raise AnnotationError(f"{path}: labels exceed int32")
    return arr.astype(np.int32)


# --------------------------------------------------------------------------- BCData


def _bcdata_ann_dir(annotations_root: Path) -> Path:
    """Accept the dataset root, its ``annotations/`` folder or ``annotations/test``."""
    for cand in (
        annotations_root,
        annotations_root / "test",
        annotations_root / "annotations" / "test",
    ):
        if (cand / "positive").is_dir() or (cand / "negative").is_dir():
            return cand
    raise AnnotationError(
        f"no BCData annotations under {annotations_root} (expected annotations/test/{{positive,negative}}/)"
    )


def load_bcdata_points(annotations_root: str | Path, image_id: str | int) -> dict[str, np.ndarray]:
    """``{"Positive": (N, 2), "Negative": (M, 2)}`` float arrays of (x, y) = (column, row) points."""
    import h5py

    ann = _bcdata_ann_dir(Path(annotations_root))
    out: dict[str, np.ndarray] = {}
    for name in BCDATA_CLASSES:
        path = ann / name.lower() / f"{image_id}.h5"
        if not path.is_file():
            raise AnnotationError(f"BCData annotation not found: {path}")
        try:
            with h5py.File(path, "r") as f:
                xy = np.asarray(f["coordinates"][()], dtype=np.float64)
        except (OSError, KeyError) as err:
            raise AnnotationError(f"cannot read dataset 'coordinates' in {path}: {err}") from err
        if xy.size == 0:
            xy = xy.reshape(0, 2)
        if xy.ndim != 2 or xy.shape[1] != 2:
            raise AnnotationError(f"{path}: expected (N, 2) coordinates, got shape {xy.shape}")
        out[name] = xy
    return out


POINT_SUFFIXES = (".geojson", ".csv", ".json")
# ``label_id`` of a JSON point list (SHIDC-B-Ki-67: 1 immunopositive, 2 immunonegative, 3 a
# tumour-infiltrating lymphocyte, which is not scored)
LABEL_IDS = {1: "Positive", 2: "Negative"}


def point_class(name: object) -> str | None:
    """Positive / Negative for a point's class name, any case, also as the last part of a derived
    QuPath name ("Tumor: Positive"); None for any other class."""
    if not isinstance(name, str):
        return None
    last = name.rsplit(":", 1)[-1].strip().lower()
    return next((c for c in BCDATA_CLASSES if c.lower() == last), None)


@functools.lru_cache(maxsize=8)  # (a few files: a whole-slide export can be large)
def _parsed(path: str, mtime_ns: int, size: int) -> Any:
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as fh:
        return json.load(fh)


def _read_json(path: Path) -> Any:
    """A JSON file's content, parsed once while unchanged: eval asks of one annotation file what
    it holds (points? outlines?) before reading it. Not to be modified by the caller."""
    st = path.stat()
    return _parsed(str(path), st.st_mtime_ns, st.st_size)


def read_geojson_features(path: str | Path) -> list[dict[str, Any]]:
    """The features with a geometry of a GeoJSON file (``.gz`` too): a FeatureCollection, one
    Feature, or a bare list of features (QuPath's "export as array")."""
    path = Path(path)
    try:
        data = _read_json(path)
    except (OSError, ValueError, EOFError) as err:
        raise AnnotationError(f"cannot read GeoJSON {path}: {err}") from err
    if isinstance(data, dict) and data.get("type") == "FeatureCollection":
        feats = data.get("features") or []
    elif isinstance(data, dict) and data.get("type") == "Feature":
        feats = [data]
    elif isinstance(data, list):
        feats = data
    else:
        raise AnnotationError(f"{path}: not a GeoJSON FeatureCollection")
    return [f for f in feats if isinstance(f, dict) and isinstance(f.get("geometry"), dict)]


def _geojson_points(path: Path) -> list[tuple[str | None, float, float]]:
    out, outlines = [], 0
    for f in read_geojson_features(path):
        geom = f["geometry"]
        if geom.get("type") not in ("Point", "MultiPoint"):
            outlines += 1  # (e.g. the outline of the annotated field: not points)
            continue
        cls = (f.get("properties") or {}).get("classification")
        name = cls.get("name") if isinstance(cls, dict) else cls
        coords = [geom["coordinates"]] if geom["type"] == "Point" else geom["coordinates"]
        try:
            out += [(name, float(c[0]), float(c[1])) for c in coords]
        except (TypeError, ValueError, IndexError) as err:
            raise AnnotationError(f"{path}: bad point coordinates: {err}") from err
    if outlines and not out:
        raise AnnotationError(
            f"{path} holds outlines, not points: a folder of outlines is scored as segmentation "
            "ground truth, one of points as detection; keep the two kinds in separate folders"
        )
    return out


def point_list(path: str | Path) -> list[dict[str, Any]] | None:
    """A JSON list of point records (objects with x and y, as SHIDC-B-Ki-67 ships them), or None
    when the file holds something else (GeoJSON: read as such); AnnotationError when it cannot
    be read."""
    path = Path(path)
    try:
        data = _read_json(path)
    except (OSError, ValueError) as err:
        raise AnnotationError(f"cannot read {path}: {err}") from err
    if isinstance(data, list) and all(
        isinstance(d, dict) and "x" in d and "y" in d and "geometry" not in d for d in data
    ):
        return data
    return None


def is_point_list(path: str | Path) -> bool:
    """Whether a ``.json`` file is a list of point records (x, y, and a label_id or class)."""
    try:
        return point_list(Path(path)) is not None
    except AnnotationError:
        return False


def _json_points(path: Path) -> list[tuple[str | None, float, float]]:
    records = point_list(path)
    if records is None:  # a GeoJSON saved as .json (QuPath's export can be named so)
        return _geojson_points(path)
    out = []
    for i, d in enumerate(records):
        if "label_id" in d:
            try:
                name = LABEL_IDS.get(int(d["label_id"]), f"label_id {d['label_id']}")
            except (TypeError, ValueError):
                name = f"label_id {d['label_id']}"
        else:
            name = d.get("class", d.get("label"))
        try:
            # pixel indices, as BCData's: a pixel's centre is +0.5 in the pixel-corner convention
            out.append((name, float(d["x"]) + 0.5, float(d["y"]) + 0.5))
        except (TypeError, ValueError) as err:
            raise AnnotationError(f"{path}, point {i}: x and y must be numbers: {err}") from err
    return out


POINT_COLUMNS = {"x", "y", "class"}


def _csv_rows(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    """Header (stripped, lower case) and rows of a CSV; a spreadsheet's byte-order mark is fine."""
    with path.open(newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh)
        head = [h.strip().lower() for h in reader.fieldnames or []]
        rows = [{k.strip().lower(): v for k, v in r.items() if isinstance(k, str)} for r in reader]
    return head, rows


def is_point_csv(path: str | Path) -> bool:
    """Whether a CSV's header names the point columns x, y and class (its first line only)."""
    try:
        with Path(path).open(newline="", encoding="utf-8-sig") as fh:
            head = next(csv.reader(fh), [])
    except (OSError, UnicodeDecodeError, csv.Error):
        return False
    return POINT_COLUMNS <= {h.strip().lower() for h in head}


def _csv_points(path: Path) -> list[tuple[str | None, float, float]]:
    try:
        head, rows = _csv_rows(path)
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise AnnotationError(f"cannot read {path}: {err}") from err
    if not POINT_COLUMNS <= set(head):
        raise AnnotationError(f"{path}: expected the columns x, y, class")
    out = []
    for i, r in enumerate(rows, 2):
        try:
            out.append((r["class"] or None, float(r["x"]), float(r["y"])))
        except (TypeError, ValueError) as err:
            raise AnnotationError(f"{path}, line {i}: x and y must be numbers: {err}") from err
    return out


NO_CLASS = "(no class)"


def load_point_annotations(path: str | Path) -> tuple[dict[str, np.ndarray], dict[str, int]]:
    """The Positive / Negative points of one image from a point file: GeoJSON Point / MultiPoint
    features with a classification (as QuPath exports point annotations), a CSV with the
    columns x, y, class, or a JSON list of ``{"x", "y", "label_id"}`` records (SHIDC-B-Ki-67:
    label_id 1 Positive, 2 Negative; or a "class" name). Coordinates are image pixels, continuous
    (the pixel-corner convention: a pixel's centre is at +0.5; a JSON list's are pixel indices). Returns ``({"Positive": (N, 2), "Negative": (M, 2)}, {class
    name: number of points} of the points not scored: other classes, and ``NO_CLASS``)``."""
    p = Path(path)
    read = {".csv": _csv_points, ".json": _json_points}.get(p.suffix.lower(), _geojson_points)
    pts = [(point_class(n), n, x, y) for n, x, y in read(p)]
    out = {
        c: np.asarray([(x, y) for k, _, x, y in pts if k == c], dtype=np.float64).reshape(-1, 2)
        for c in BCDATA_CLASSES
    }
    ignored: dict[str, int] = {}
    for k, n, _, _ in pts:
        if k is None:
            name = str(n) if n else NO_CLASS
            ignored[name] = ignored.get(name, 0) + 1
    return out, ignored


# --------------------------------------------------------------------------- case listings


def _natural_key(stem: str) -> tuple[int, int | str]:
    return (0, int(stem)) if stem.isdigit() else (1, stem)


def monuseg_cases(root: str | Path, *, xml_only: bool = False) -> list[Case]:
    """MoNuSeg images with their best annotation: the XML where present, else the derived colour mask.

    Images with neither are left out. Sorted by stem.
    """
    root = Path(root)
    images = sorted((root / "images").glob("*.tif"))
    if not images:
        raise AnnotationError(f"no MoNuSeg images under {root / 'images'}")
    cases = []
    for img in images:
        xml = root / "annotations" / f"{img.stem}.xml"
        png = root / "derived_instance_color_masks_ykrmm" / f"{img.stem}.png"
        if xml.is_file():
            cases.append(Case(img.stem, img, xml, True))
        elif png.is_file() and not xml_only:
            cases.append(Case(img.stem, img, png, False))
    return cases


def load_monuseg_labels(case: Case) -> np.ndarray:
    """Ground-truth instance labels of a MoNuSeg case (XML when it has one, else the colour mask).

    Colour masks are read with ``merge_overlaps`` (their overlap colours are not nuclei).
    """
    if case.has_xml:
        return load_monuseg_xml(case.annotation)
    return load_instance_png(case.annotation, merge_overlaps=True)


def bcdata_cases(root: str | Path, split: str = "test") -> list[Case]:
    """BCData images whose positive and negative point files both exist, sorted by numeric id."""
    root = Path(root)
    img_dir = root / "images" / split
    ann_dir = root / "annotations" / split
    images = sorted(img_dir.glob("*.png"), key=lambda p: _natural_key(p.stem))
    if not images:
        raise AnnotationError(f"no BCData images under {img_dir}")
    return [
        Case(p.stem, p, ann_dir, False)
        for p in images
        if (ann_dir / "positive" / f"{p.stem}.h5").is_file()
        and (ann_dir / "negative" / f"{p.stem}.h5").is_file()
    ]
