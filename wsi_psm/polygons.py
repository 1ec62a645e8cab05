"""Instance labels -> pixel-corner polygons in level-0 pixels, and cheap per-cell shape measurements.

Pixel (row r, col c) of a label array is the unit square [c, c+1) x [r, r+1) (QuPath's convention),
so an outline traced along pixel corners, rasterised back with pixel-centre sampling, covers exactly
the pixels of its label. GDAL's polygonize (via ``rasterio.features.shapes``) traces those outlines in C.
"""

from __future__ import annotations

import itertools
import math
import warnings
from collections.abc import Sequence

import numpy as np
import rasterio.features
import shapely
from affine import Affine
from rasterio.errors import NotGeoreferencedWarning
from shapely.geometry import Polygon

# rasterio only traces label pixels here; an identity transform (a tile at the origin at scale 1,
# e.g. a 20x slide processed at 0.5 um/px) is intended, not a missing georeference
warnings.filterwarnings("ignore", category=NotGeoreferencedWarning, module="rasterio")

# The measurement names every writer and summary uses; QuPath's style, units in the name.
AREA = "Area µm^2"
PERIMETER = "Perimeter µm"
CIRCULARITY = "Circularity"
SOLIDITY = "Solidity"
MAJOR_AXIS = "Major axis µm"
MINOR_AXIS = "Minor axis µm"
ECCENTRICITY = "Eccentricity"
MEASUREMENT_NAMES: tuple[str, ...] = (
    AREA,
    PERIMETER,
    CIRCULARITY,
    SOLIDITY,
    MAJOR_AXIS,
    MINOR_AXIS,
    ECCENTRICITY,
)


def labels_to_polygons(
    labels: np.ndarray,
    *,
    scale: float = 1.0,
    offset: tuple[float, float] = (0, 0),
) -> list[tuple[int, Polygon]]:
    """Outline every non-zero label of a 2-D instance array as a polygon in level-0 pixels.

    Array pixel (r, c) becomes the square [c, c+1) x [r, r+1); array point (x, y) maps to level-0
    ``X = offset[0] + x * scale``, ``Y = offset[1] + y * scale`` (offset = (x, y) of the array's top-left
    corner in level-0 px; scale = level-0 px per array px). Rasterising a returned polygon back onto
    the array (pixel-centre rule) gives exactly the pixels of its label, under the two rules below.

    - Pieces: a label is expected to be one 4-connected region. If it has several, only the largest
      piece (by area; the first in scan order on a tie) is returned, the others are dropped.
    - Holes: nuclei are hole-filled upstream, so only the exterior ring is kept; a label with a hole
      comes back filled.

    Returns ``(label, polygon)`` pairs sorted by label; each exterior ring is counter-clockwise
    (mathematical sense, as RFC 7946 asks) and has no repeated collinear vertices.
    """
    if labels.ndim != 2:
        raise ValueError(f"labels must be 2-D, got shape {labels.shape}")
    if labels.size == 0 or not labels.any():
        return []
    if labels.dtype.kind not in "iu":
        raise ValueError(f"labels must be an integer array, got {labels.dtype}")
    if labels.max() > np.iinfo(np.int32).max or labels.min() < 0:
        raise ValueError("labels must lie in 0 .. 2**31-1")
    # GDAL polygonize takes int32, not uint32/int64; labels of one tile always fit.
    arr = np.ascontiguousarray(labels, dtype=np.int32)
    transform = Affine(float(scale), 0.0, float(offset[0]), 0.0, float(scale), float(offset[1]))
    geoms = list(rasterio.features.shapes(arr, mask=arr > 0, connectivity=4, transform=transform))
    # all outlines built at once (GEOS arrays): a tile's hundreds of cells one by one cost more
    values = np.fromiter((v for _, v in geoms), np.int64, len(geoms))
    exteriors = [g["coordinates"][0] for g, _ in geoms]
    n_pts = np.fromiter(map(len, exteriors), np.int64, len(exteriors))
    coords = np.array(list(itertools.chain.from_iterable(exteriors)), dtype=np.float64)
    rings = shapely.linearrings(coords, indices=np.repeat(np.arange(len(exteriors)), n_pts))
    area = shapely.area(shapely.polygons(rings))
    # per label the largest piece, the first in scan order on a tie; sorted by label
    order = np.lexsort((np.arange(len(values)), -area, values))
    first = np.r_[True, values[order][1:] != values[order][:-1]]
    pick = order[first]
    rings = rings[pick]
    # GDAL traces exteriors clockwise (y-up sense); flip them so every ring is counter-clockwise.
    cw = ~shapely.is_ccw(rings)
    rings[cw] = shapely.reverse(rings[cw])
    return list(zip(values[pick].tolist(), shapely.polygons(rings), strict=True))


def _ring_sums(ring_of: np.ndarray, values: np.ndarray, n: int) -> np.ndarray:
    return np.bincount(ring_of, weights=values, minlength=n)


def polygons_measurements(polys: Sequence[Polygon], mpp: float) -> np.ndarray:
    """Cheap shape features of cell polygons (level-0 px), in micrometres: an (n, 7) array whose
    columns are :data:`MEASUREMENT_NAMES` (QuPath style, units in the name). All polygons at once
    (per-edge arrays, summed per ring), as a tile's few hundred cells are cheaper that way than one
    by one in Python. Holes, if any, are ignored:

    - ``Area µm^2``: exact area of the pixel-corner polygon (= pixel count x pixel area).
    - ``Perimeter µm``: perimeter of the polygon through the midpoints of the outline's edges. A
      pixel staircase overestimates the length of the smooth outline it digitises (a disk of radius
      r gets ~8r instead of 2*pi*r); its edge midpoints lie on that outline's digital line, so the
      midpoint polygon measures straight runs at any angle exactly and disks within ~1% (r >= 5 px).
      Axis-aligned rectangles are the bad case (their corners are cut), which nuclei are not.
    - ``Circularity``: 4*pi*area / perimeter^2 of that midpoint polygon, in (0, 1]; 1 for a disk.
    - ``Solidity``: area / convex hull area, in (0, 1].
    - ``Major axis µm``, ``Minor axis µm``, ``Eccentricity``: of the ellipse with the polygon's
      second moments (Green's theorem; axes = 4 * sqrt(eigenvalues), like scikit-image, but with the
      continuous polygon moments, so a single pixel has axes of 4/sqrt(12) px rather than 0).
    """
    n = len(polys)
    if n == 0:
        return np.zeros((0, len(MEASUREMENT_NAMES)))
    rings = shapely.get_exterior_ring(np.asarray(polys, dtype=object))
    xy, ring_of_pt = shapely.get_coordinates(rings, return_index=True)
    n_pts = np.bincount(ring_of_pt, minlength=n)
    first = np.concatenate([[0], np.cumsum(n_pts)[:-1]])
    # edges of the closed rings (the last point repeats the first): point k -> k + 1, same ring
    edge = np.flatnonzero(ring_of_pt[:-1] == ring_of_pt[1:])
    ring = ring_of_pt[edge]
    # shifted by each ring's first vertex, for precision: level-0 coordinates reach 1e5
    p = xy - xy[first[ring_of_pt]]
    x0, y0, x1, y1 = p[edge, 0], p[edge, 1], p[edge + 1, 0], p[edge + 1, 1]
    cross = x0 * y1 - x1 * y0
    a2 = _ring_sums(ring, cross, n)  # twice the signed area
    area_px = np.abs(a2) / 2.0
    if np.any(n_pts < 4) or np.any(area_px <= 0):
        raise ValueError("cannot measure an empty or degenerate polygon")
    # the midpoint polygon: one vertex per edge, each joined to the next edge's (cyclic per ring)
    mid = 0.5 * (p[edge] + p[edge + 1])
    n_edges = np.bincount(ring, minlength=n)
    first_edge = np.concatenate([[0], np.cumsum(n_edges)[:-1]])
    nxt = np.arange(len(edge)) + 1
    last = first_edge + n_edges - 1
    nxt[last] = first_edge
    d = mid[nxt] - mid
    perim_px = _ring_sums(ring, np.sqrt((d * d).sum(axis=1)), n)
    mid_cross = mid[:, 0] * mid[nxt, 1] - mid[nxt, 0] * mid[:, 1]
    mid_area = np.abs(_ring_sums(ring, mid_cross, n)) / 2.0
    circularity = np.minimum(1.0, 4.0 * math.pi * mid_area / perim_px**2)
    hull_area = shapely.area(shapely.convex_hull(rings))
    solidity = np.minimum(1.0, area_px / hull_area)
    # central second moments / area
    cx = _ring_sums(ring, (x0 + x1) * cross, n) / (3.0 * a2)
    cy = _ring_sums(ring, (y0 + y1) * cross, n) / (3.0 * a2)
    sxx = _ring_sums(ring, (x0 * x0 + x0 * x1 + x1 * x1) * cross, n) / (6.0 * a2)
    syy = _ring_sums(ring, (y0 * y0 + y0 * y1 + y1 * y1) * cross, n) / (6.0 * a2)
    sxy = _ring_sums(ring, (x0 * y1 + 2 * x0 * y0 + 2 * x1 * y1 + x1 * y0) * cross, n) / (12.0 * a2)
    mu20, mu11, mu02 = sxx - cx * cx, sxy - cx * cy, syy - cy * cy
    half_tr = 0.5 * (mu20 + mu02)
    disc = np.sqrt(np.maximum(0.0, 0.25 * (mu20 - mu02) ** 2 + mu11 * mu11))
    lam1, lam2 = half_tr + disc, np.maximum(0.0, half_tr - disc)
    safe = np.where(lam1 > 0, lam1, 1.0)
    ecc = np.where(lam1 > 0, np.sqrt(np.maximum(0.0, 1.0 - lam2 / safe)), 0.0)
    return np.stack(
        [
            area_px * mpp * mpp,
            perim_px * mpp,
            circularity,
            solidity,
            4.0 * np.sqrt(np.maximum(lam1, 0.0)) * mpp,
            4.0 * np.sqrt(lam2) * mpp,
            ecc,
        ],
        axis=1,
    )


def measurement_dicts(polys: Sequence[Polygon], mpp: float) -> list[dict[str, float]]:
    """:func:`polygons_measurements` as one dict per polygon, keyed by :data:`MEASUREMENT_NAMES`."""
    rows = polygons_measurements(polys, mpp).tolist()
    return [dict(zip(MEASUREMENT_NAMES, row, strict=True)) for row in rows]


def polygon_measurements(poly: Polygon, mpp: float) -> dict[str, float]:
    """:func:`measurement_dicts` of one polygon."""
    return measurement_dicts([poly], mpp)[0]
