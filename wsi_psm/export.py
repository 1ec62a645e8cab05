"""Writing one slide's cells: streamed GeoJSON and GeoParquet, with the same ids and geometry.
(summary.json: :mod:`wsi_psm.summary`; overlay.png: :mod:`wsi_psm.overlay`; the output folder that
appears under its final name only when complete: :class:`wsi_psm.atomic.OutputFolder`.)

Contract (DESIGN.md "Outputs"): every cell is a Feature with a UUID ``id``, a Polygon in level-0 px and
``properties = {"objectType": "detection", "classification": {"name", "color"}, "measurements": {..}}``;
``properties.type`` is never written (QuPath reads it as objectType). The GeoJSON and the GeoParquet
hold the same cells with the same ids and the same (rounded) geometry.
"""

from __future__ import annotations

import gzip as _gzip
import json
import math
import os
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import TracebackType
from typing import IO, Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import shapely
from shapely.geometry import Polygon

from wsi_psm import __version__
from wsi_psm.overlay import Outline, overlay_outlines, ring_bounds

# Namespace of the deterministic cell ids (uuid5); changing it changes every id ever written.
CELL_ID_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "wsi-psm:cell")


@dataclass(frozen=True, slots=True)
class CellRecord:
    """One cell as written: a Polygon in level-0 px, its class, the class colour and measurements."""

    polygon: Polygon
    class_name: str
    color: tuple[int, int, int]
    measurements: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class PreparedCell:
    """A cell encoded for the writers (see :func:`prepare_cell`): id, rounded rings, finite
    measurements and its GeoJSON Feature text, so the encoding can run in worker processes."""

    id: str
    wkb: bytes  # the polygon with its rounded coordinates, as GeoParquet stores it
    bounds: tuple[float, float, float, float]  # of the rounded polygon
    measurements: dict[str, float]
    class_name: str
    color: tuple[int, int, int]
    feature: str  # the GeoJSON Feature, compact JSON
    slide_key: str
    decimals: int
    # the cell as OverlayRenderer draws it (``overlay_outline``), when the scale was known
    outline: Outline | None = None


def _round_sig(value: float, digits: int = 6) -> float:
    return float(f"{value:.{digits}g}")


def cell_id(slide_key: str, ring: np.ndarray) -> str:
    """Deterministic UUID of a cell: uuid5 of the slide key, the centroid and the area of its
    (rounded, closed) exterior ring.

    Reruns of the same slide with the same settings therefore give the same ids, so two runs can be
    joined or diffed cell by cell and a re-import into a QuPath project replaces objects instead of
    duplicating them. Two distinct cells of one slide cannot share centroid and area unless they
    overlap, which the tile-ownership rule rules out. Use the slide's name (its file stem, not its path, so
    moving a slide keeps its ids) as ``slide_key`` so ids also differ between slides.
    """
    x, y = ring[:, 0] - ring[0, 0], ring[:, 1] - ring[0, 1]
    cross = x[:-1] * y[1:] - x[1:] * y[:-1]
    a2 = float(cross.sum())
    if a2 == 0:
        cx, cy = float(ring[:, 0].mean()), float(ring[:, 1].mean())
    else:
        cx = float(np.dot(x[:-1] + x[1:], cross)) / (3.0 * a2) + ring[0, 0]
        cy = float(np.dot(y[:-1] + y[1:], cross)) / (3.0 * a2) + ring[0, 1]
    return str(uuid.uuid5(CELL_ID_NAMESPACE, f"{slide_key}|{cx:.2f}|{cy:.2f}|{abs(a2) / 2:.2f}"))


def snap_polygon(polygon: Polygon, decimals: int) -> Polygon:
    """``polygon`` with its vertices on the grid of ``decimals`` decimal places and still valid
    (GEOS's snap-rounding), as its largest part where snapping parts it. Its rounded coordinates
    are then the same, so it stays valid when written."""
    snapped = shapely.set_precision(polygon, 10.0**-decimals)
    parts = [g for g in shapely.get_parts(snapped) if isinstance(g, Polygon) and not g.is_empty]
    if not parts:  # thinner than the grid everywhere: nothing to write but what there was
        return polygon
    return max(parts, key=lambda g: g.area)


def _check_colour(seen: dict[str, tuple[int, int, int]], name: str, color: Sequence[int]) -> None:
    """One colour per class (QuPath keeps one per class), each three ints in 0..255."""
    known = seen.get(name)
    if known is not None and tuple(color) == known:
        return
    if not isinstance(name, str) or not name:
        raise ValueError(f"class name must be a non-empty string, got {name!r}")
    col = tuple(int(v) for v in color)
    if len(col) != 3 or any(not 0 <= v <= 255 for v in col) or col != tuple(color):
        raise ValueError(f"class {name!r}: colour must be three ints in 0..255, got {color!r}")
    if known is not None:
        raise ValueError(f"class {name!r} written with two colours: {known} and {col}")
    seen[name] = col  # type: ignore[assignment]


def prepare_cell(
    cell: CellRecord, slide_key: str, decimals: int = 2, overlay_scale: float | None = None
) -> PreparedCell:
    """Encode one cell for :class:`GeoJSONWriter` and :class:`GeoParquetWriter` (see
    :func:`prepare_cells`)."""
    return prepare_cells([cell], slide_key, decimals, overlay_scale)[0]


def prepare_cells(
    cells: Sequence[CellRecord],
    slide_key: str,
    decimals: int = 2,
    overlay_scale: float | None = None,
) -> list[PreparedCell]:
    """Encode cells for :class:`GeoJSONWriter` and :class:`GeoParquetWriter` (which accept the
    results as they are when their ``slide_key`` and ``decimals`` match), and with ``overlay_scale``
    (an :class:`OverlayRenderer`'s ``scale``) their outlines for the overlay. The pipeline calls it
    in its post-processing workers, a tile's cells at once (coordinates, WKB and outlines as GEOS
    and numpy arrays), so the single writing thread only appends finished work. A polygon that
    rounding would make invalid is snapped to the rounding grid first (:func:`snap_polygon`)."""
    return _prepare_cells(cells, slide_key, decimals, overlay_scale, snapped=False)


def _prepare_cells(
    cells: Sequence[CellRecord],
    slide_key: str,
    decimals: int,
    overlay_scale: float | None,
    *,
    snapped: bool,
) -> list[PreparedCell]:
    if not cells:
        return []
    polys = np.array([c.polygon for c in cells], dtype=object)
    bad = [p for p in polys if not isinstance(p, Polygon)] or list(polys[shapely.is_empty(polys)])
    if bad:
        raise ValueError(f"a cell must be a non-empty shapely Polygon, got {bad[0].geom_type}")
    # exteriors counter-clockwise, as RFC 7946 asks (GEOS gives a seam-trimmed or snapped cell
    # clockwise); the id does not depend on it
    polys = shapely.orient_polygons(polys)
    checked: set[tuple[str, tuple[int, ...]]] = set()
    for c in cells:
        key = (c.class_name, tuple(c.color))
        if key not in checked:
            _check_colour({}, c.class_name, c.color)
            checked.add(key)
    exteriors = shapely.get_exterior_ring(polys)
    xy_raw, owner = shapely.get_coordinates(exteriors, return_index=True)
    xy = np.round(xy_raw, decimals)
    ends = np.cumsum(np.bincount(owner, minlength=len(cells)))
    starts = ends - np.bincount(owner, minlength=len(cells))
    holes = shapely.get_num_interior_rings(polys)
    # the Parquet geometry is encoded here too: the writing thread (which feeds the network) only
    # gathers bytes, and a cell travels back from a worker as bytes, not as arrays
    rounded = shapely.polygons(shapely.linearrings(xy, indices=owner))
    inner = {  # holes are rare (nuclei are hole-filled): one by one
        i: [np.round(shapely.get_coordinates(r), decimals) for r in polys[i].interiors]
        for i in np.flatnonzero(holes).tolist()
    }
    for i, rings in inner.items():
        rounded[i] = Polygon(xy[starts[i] : ends[i]], rings)
    folded = np.flatnonzero(~shapely.is_valid(rounded))
    if folded.size:
        # rounding folded these rings: vertices closer than the rounding step (a cell trimmed at a
        # seam between two tiles whose pixel grids differ by a fraction of a pixel) merged into a
        # spike. Snapped to the step by GEOS instead, which keeps them valid; again at most once.
        if snapped:  # (thinner than the grid everywhere: no cell a label image can give)
            raise ValueError(f"cell {int(folded[0])}: no valid polygon at {decimals} decimals")
        cells = list(cells)
        for i in folded.tolist():
            cells[i] = replace(cells[i], polygon=snap_polygon(cells[i].polygon, decimals))
        return _prepare_cells(cells, slide_key, decimals, overlay_scale, snapped=True)
    wkbs = shapely.to_wkb(rounded)
    lo, hi = ring_bounds(xy, starts)
    outlines = (
        None if overlay_scale is None else overlay_outlines(xy_raw, starts, ends, overlay_scale)
    )
    out = []
    for i, cell in enumerate(cells):
        rings = [xy[starts[i] : ends[i]], *inner.get(i, ())]
        # Non-finite numbers are not JSON; QuPath reads a missing measurement as NaN anyway.
        meas = {
            str(k): _round_sig(float(v)) for k, v in cell.measurements.items() if math.isfinite(v)
        }
        cid = cell_id(slide_key, rings[0])
        color = (int(cell.color[0]), int(cell.color[1]), int(cell.color[2]))
        feature = {
            "type": "Feature",
            "id": cid,
            "geometry": {"type": "Polygon", "coordinates": _coords_json(rings)},
            "properties": {
                "objectType": "detection",
                "classification": {"name": cell.class_name, "color": list(color)},
                "measurements": meas,
            },
        }
        text = json.dumps(feature, separators=(",", ":"), allow_nan=False)
        bounds = (float(lo[i, 0]), float(lo[i, 1]), float(hi[i, 0]), float(hi[i, 1]))
        outline = None if outlines is None else outlines[i]
        out.append(
            PreparedCell(
                cid,
                wkbs[i],
                bounds,
                meas,
                cell.class_name,
                color,
                text,
                slide_key,
                decimals,
                outline,
            )
        )
    return out


def _check_encoding(item: PreparedCell | CellBlock, slide_key: str, decimals: int) -> None:
    # ids and rounding are fixed when a cell is encoded: one made for another slide would be wrong
    if item.slide_key != slide_key or item.decimals != decimals:
        raise ValueError(
            f"cell prepared for slide key {item.slide_key!r} / {item.decimals} decimals, "
            f"written with {slide_key!r} / {decimals}"
        )


def _prepared(cell: CellRecord | PreparedCell, slide_key: str, decimals: int) -> PreparedCell:
    if isinstance(cell, PreparedCell):
        _check_encoding(cell, slide_key, decimals)
        return cell
    return prepare_cell(cell, slide_key, decimals)


def _cells_table(cells: Sequence[PreparedCell], names: Iterable[str]) -> pa.Table:
    """The GeoParquet rows of prepared cells: id, class, the measurements ``names`` (null where a
    cell lacks one), geometry (WKB)."""
    cols: dict[str, Any] = {
        "id": pa.array([c.id for c in cells], pa.string()),
        "class": pa.array([c.class_name for c in cells], pa.string()),
    }
    for n in names:
        cols[n] = pa.array([c.measurements.get(n) for c in cells], pa.float64())
    cols["geometry"] = pa.array([c.wkb for c in cells], pa.binary())
    return pa.table(cols)


@dataclass(frozen=True, slots=True)
class PackedOutlines:
    """Overlay outlines (``overlay_outline``) of many cells in four arrays."""

    boxes: np.ndarray  # (n, 4) bounding boxes, thumbnail px
    points: np.ndarray  # (m, 2) every cell's points, concatenated
    offsets: np.ndarray  # (n + 1,) where each cell's points start in ``points``
    colours: np.ndarray  # (n, 3) uint8


@dataclass(frozen=True, slots=True)
class CellBlock:
    """Prepared cells packed together (:func:`pack_cells`), e.g. one tile's final cells in a
    worker process: they cross to the writing process as a few buffers instead of one object per
    cell, and each writer appends them in one step (``write_block`` / ``add_block``). Writing a
    block gives the same files as writing its cells one by one, in order."""

    slide_key: str
    decimals: int
    features: str  # the GeoJSON Features, joined as GeoJSONWriter joins them
    table: pa.Table  # id, class, the measurements seen (first-seen order, float64), geometry (WKB)
    bbox: tuple[float, float, float, float]
    # class name -> (colour, cells), first seen first
    classes: dict[str, tuple[tuple[int, int, int], int]]
    outlines: PackedOutlines | None  # when every cell had one

    def __len__(self) -> int:
        return self.table.num_rows

    @property
    def measurement_names(self) -> list[str]:
        return self.table.column_names[2:-1]


def pack_cells(cells: Sequence[PreparedCell]) -> CellBlock:
    """Pack prepared cells (one slide key, one rounding) into a :class:`CellBlock`."""
    if not cells:
        raise ValueError("pack_cells needs at least one cell")
    key, decimals = cells[0].slide_key, cells[0].decimals
    colours: dict[str, tuple[int, int, int]] = {}
    counts: dict[str, int] = {}
    for c in cells:
        _check_encoding(c, key, decimals)
        _check_colour(colours, c.class_name, c.color)
        counts[c.class_name] = counts.get(c.class_name, 0) + 1
    names = dict.fromkeys(k for c in cells for k in c.measurements)
    bounds = np.array([c.bounds for c in cells])
    lo, hi = bounds[:, :2].min(axis=0), bounds[:, 2:].max(axis=0)
    outlines = None
    if all(c.outline is not None for c in cells):
        pts = [c.outline[1] for c in cells]  # type: ignore[index]
        offsets = np.zeros(len(cells) + 1, np.int64)
        offsets[1:] = np.cumsum([len(p) for p in pts])
        outlines = PackedOutlines(
            np.array([c.outline[0] for c in cells], np.float64),  # type: ignore[index]
            np.concatenate(pts).astype(np.float64, copy=False),
            offsets,
            np.array([c.color for c in cells], np.uint8),
        )
    return CellBlock(
        key,
        decimals,
        ",\n".join(c.feature for c in cells),
        _cells_table(cells, names),
        (float(lo[0]), float(lo[1]), float(hi[0]), float(hi[1])),
        {n: (colours[n], counts[n]) for n in counts},
        outlines,
    )


def _coords_json(rings: list[np.ndarray]) -> list[list[list[float]]] | list[list[list[int]]]:
    # Integral coordinates (scale 1, or pixel corners times an integer) are written without ".0".
    out = []
    for r in rings:
        ri = r.astype(np.int64)
        out.append(ri.tolist() if np.array_equal(ri, r) else r.tolist())
    return out


class _CellSink:
    """What both cell writers share: ``write`` one cell, ``write_many`` an iterable of them."""

    def write(self, cell: CellRecord | PreparedCell) -> str:
        raise NotImplementedError

    def write_many(self, cells: Iterable[CellRecord | PreparedCell]) -> int:
        """Append every cell of an iterable (consumed lazily); returns how many."""
        n = 0
        for cell in cells:
            self.write(cell)
            n += 1
        return n


class GeoJSONWriter(_CellSink):
    """Stream cells into a GeoJSON FeatureCollection, one Feature per line, never holding them all.

    ``with GeoJSONWriter(folder / "cells.geojson.gz", gzip=True, slide_key=name) as w: w.write(cell)``.
    The closing ``]}`` is written only when the block ends without an exception, so an interrupted
    file is never valid JSON. Coordinates are rounded to ``decimals`` (2: pixel corners times a scale
    are exact or within 0.005 px), measurements to 6 significant digits; ids as :func:`cell_id`.
    Gzip output has a zero timestamp, so identical runs give identical bytes. Note that QuPath's
    object import (PathIO.readObjects) reads .geojson, .json and .zip, not .gz: gunzip first.
    """

    _HEADER = b'{"type":"FeatureCollection","features":[\n'
    _FOOTER = b"\n]}\n"

    def __init__(
        self,
        path: str | os.PathLike[str],
        gzip: bool = False,
        *,
        slide_key: str = "",
        decimals: int = 2,
        compresslevel: int = 6,
    ) -> None:
        self.path = Path(path)
        self.gzip = gzip
        self.slide_key = slide_key
        self.decimals = decimals
        self.compresslevel = compresslevel
        self.count = 0
        self._fh: IO[bytes] | None = None
        self._raw: IO[bytes] | None = None
        self._buf: list[str] = []  # Features (one cell's, or a block's)
        self._written = 0  # cells already in the file
        self._colours: dict[str, tuple[int, int, int]] = {}

    def __enter__(self) -> GeoJSONWriter:
        self._raw = open(self.path, "wb")
        if self.gzip:
            self._fh = _gzip.GzipFile(
                filename=self.path.name.removesuffix(".gz"),
                mode="wb",
                fileobj=self._raw,
                compresslevel=self.compresslevel,
                mtime=0,
            )
        else:
            self._fh = self._raw
        self._fh.write(self._HEADER)
        return self

    def write(self, cell: CellRecord | PreparedCell) -> str:
        """Append one cell (or a cell from :func:`prepare_cell`); returns its id."""
        if self._fh is None:
            raise RuntimeError("GeoJSONWriter.write outside its with-block")
        _check_colour(self._colours, cell.class_name, cell.color)
        p = _prepared(cell, self.slide_key, self.decimals)
        self._append(p.feature, 1)
        return p.id

    def write_block(self, block: CellBlock) -> int:
        """Append the cells of a :class:`CellBlock`; returns how many."""
        if self._fh is None:
            raise RuntimeError("GeoJSONWriter.write_block outside its with-block")
        _check_encoding(block, self.slide_key, self.decimals)
        for name, (color, _) in block.classes.items():
            _check_colour(self._colours, name, color)
        if len(block):
            self._append(block.features, len(block))
        return len(block)

    def _append(self, features: str, n: int) -> None:
        self._buf.append(features)
        self.count += n
        if self.count - self._written >= 2000:
            self._flush()

    def _flush(self) -> None:
        if self._buf:
            assert self._fh is not None
            sep = b",\n" if self._written else b""
            self._fh.write(sep + ",\n".join(self._buf).encode("ascii"))
            self._buf.clear()
            self._written = self.count

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            if exc_type is None:
                self._flush()
                assert self._fh is not None
                self._fh.write(self._FOOTER)
        finally:
            if self._fh is not None and self._fh is not self._raw:
                self._fh.close()
            if self._raw is not None:
                self._raw.close()
            self._fh = self._raw = None


class GeoParquetWriter(_CellSink):
    """Stream cells into a GeoParquet 1.0 file (WKB geometry, "geo" metadata, no CRS: pixel space).

    Columns: ``id`` (same UUIDs as the GeoJSON), ``class``, one float64 column per measurement (null
    where a cell lacks it or it is not finite), ``geometry``. Rows go out in row groups of
    ``row_group_size`` (zstd; 25k rows keep the buffer near 50 MB). Measurement columns are
    ``measurement_names`` when given, else the names seen in the first row group; a later cell with
    an unknown measurement raises ValueError rather than losing it. File metadata: ``geo`` (with the bbox) and ``wsi_psm`` (units, slide key, class ->
    colour map); both are written when the block ends cleanly, so an interrupted file is not GeoParquet.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        slide_key: str = "",
        decimals: int = 2,
        row_group_size: int = 25_000,
        measurement_names: Sequence[str] | None = None,
    ) -> None:
        self.path = Path(path)
        self.slide_key = slide_key
        self.decimals = decimals
        self.row_group_size = row_group_size
        self.count = 0
        self._names: list[str] | None = list(measurement_names) if measurement_names else None
        self._writer: pq.ParquetWriter | None = None
        # rows not yet written, in order: runs of single cells, blocks, and a written group's rest
        self._parts: list[list[PreparedCell] | CellBlock | pa.Table] = []
        self._buffered = 0
        self._colours: dict[str, tuple[int, int, int]] = {}
        self._bbox = [math.inf, math.inf, -math.inf, -math.inf]
        self._open = False

    def __enter__(self) -> GeoParquetWriter:
        self._open = True
        return self

    def write(self, cell: CellRecord | PreparedCell) -> str:
        if not self._open:
            raise RuntimeError("GeoParquetWriter.write outside its with-block")
        _check_colour(self._colours, cell.class_name, cell.color)
        p = _prepared(cell, self.slide_key, self.decimals)
        self._check_names(p.measurements.keys())
        if not self._parts or not isinstance(self._parts[-1], list):
            self._parts.append([])
        self._parts[-1].append(p)  # type: ignore[union-attr]
        self._added(1, p.bounds)
        return p.id

    def write_block(self, block: CellBlock) -> int:
        """Append the cells of a :class:`CellBlock`; returns how many."""
        if not self._open:
            raise RuntimeError("GeoParquetWriter.write_block outside its with-block")
        _check_encoding(block, self.slide_key, self.decimals)
        for name, (color, _) in block.classes.items():
            _check_colour(self._colours, name, color)
        self._check_names(block.measurement_names)
        if len(block):
            self._parts.append(block)
            self._added(len(block), block.bbox)
        return len(block)

    def _check_names(self, names: Iterable[str]) -> None:
        if self._names is not None:
            extra = set(names) - set(self._names)
            if extra:
                raise ValueError(
                    f"measurements {sorted(extra)} are not columns of {self.path.name} "
                    f"(columns: {self._names}); pass measurement_names up front"
                )

    def _added(self, n: int, bounds: tuple[float, float, float, float]) -> None:
        self.count += n
        self._buffered += n
        b = self._bbox
        self._bbox = [
            min(b[0], bounds[0]),
            min(b[1], bounds[1]),
            max(b[2], bounds[2]),
            max(b[3], bounds[3]),
        ]
        if self._buffered >= self.row_group_size:
            self._flush(final=False)

    def _schema(self) -> pa.Schema:
        assert self._names is not None
        clash = {"id", "class", "geometry"} & set(self._names)
        if clash:
            raise ValueError(f"measurement names {sorted(clash)} clash with fixed columns")
        fields = [pa.field("id", pa.string()), pa.field("class", pa.string())]
        fields += [pa.field(n, pa.float64()) for n in self._names]
        fields.append(pa.field("geometry", pa.binary()))
        return pa.schema(fields)

    def _file_metadata(self) -> dict[str, str]:
        geo_col: dict[str, Any] = {
            "encoding": "WKB",
            "geometry_types": ["Polygon"],
            # null = not geographic; an omitted crs would mean OGC:CRS84 longitude/latitude
            "crs": None,
        }
        if self.count:
            geo_col["bbox"] = self._bbox
        geo = {"version": "1.0.0", "primary_column": "geometry", "columns": {"geometry": geo_col}}
        ours = {
            "units": "level-0 pixels",
            "slide_key": self.slide_key,
            "classes": {k: list(v) for k, v in self._colours.items()},
            "wsi_psm": __version__,
        }
        return {"geo": json.dumps(geo), "wsi_psm": json.dumps(ours)}

    def _part_table(
        self, part: list[PreparedCell] | CellBlock | pa.Table, schema: pa.Schema
    ) -> pa.Table:
        if isinstance(part, pa.Table):
            return part
        t = part.table if isinstance(part, CellBlock) else _cells_table(part, self._names or ())
        # the file's columns in its order; a block's missing measurements are null
        cols = [t[f.name] if f.name in t.column_names else pa.nulls(len(t), f.type) for f in schema]
        return pa.Table.from_arrays(cols, schema=schema)

    def _flush(self, final: bool) -> None:
        """Write the buffered rows in row groups of ``row_group_size`` (the rest too when final)."""
        if self._names is None:
            seen: dict[str, None] = {}
            for part in self._parts:
                if isinstance(part, CellBlock):
                    seen.update(dict.fromkeys(part.measurement_names))
                else:
                    for r in part:
                        seen.update(dict.fromkeys(r.measurements))
            self._names = list(seen)
        if self._writer is None:
            self._writer = pq.ParquetWriter(
                self.path, self._schema(), compression="zstd", store_schema=False
            )
        if not self._parts:
            return
        schema = self._writer.schema
        table = pa.concat_tables([self._part_table(p, schema) for p in self._parts])
        size = self.row_group_size
        whole = len(table) if final else len(table) - len(table) % size
        for start in range(0, whole, size):
            # contiguous columns: the same pages, so the same bytes, as cells written one by one
            self._writer.write_table(table.slice(start, min(size, whole - start)).combine_chunks())
        rest = table.slice(whole)
        self._parts = [rest] if len(rest) else []
        self._buffered = len(rest)

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._open = False
        try:
            if exc_type is None:
                if self._names is None and not self._parts:
                    self._names = []
                self._flush(final=True)
                assert self._writer is not None
                # Written last (with the bbox and classes now known). store_schema=False makes
                # readers take the schema metadata from these key-value pairs.
                self._writer.add_key_value_metadata(self._file_metadata())
        finally:
            if self._writer is not None:
                self._writer.close()
                self._writer = None


__all__ = [
    "CELL_ID_NAMESPACE",
    "CellBlock",
    "CellRecord",
    "GeoJSONWriter",
    "GeoParquetWriter",
    "PreparedCell",
    "cell_id",
    "pack_cells",
    "prepare_cell",
    "prepare_cells",
]
