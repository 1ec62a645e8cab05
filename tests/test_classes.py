"""Cell features and label-free classes: synthetic tiles with known stain, real BCData and CMU-1 tiles."""

from __future__ import annotations

import json
import math
import re

import numpy as np
import pytest
from conftest import data_path
from PIL import Image
from scipy import ndimage as ndi
from skimage.filters import threshold_otsu

from wsi_psm.classes import (
    NEGATIVE,
    NUCLEUS,
    POSITIVE,
    CellClassifier,
    _label_quantile,
    cell_features,
    dab_threshold,
    he_groups,
    ink_fraction,
    pale_threshold,
    stain_feature_names,
)
from wsi_psm.config import ClassConfig, RunConfig
from wsi_psm.groundtruth import load_bcdata_points
from wsi_psm.instances import split_instances
from wsi_psm.polygons import MEASUREMENT_NAMES, labels_to_polygons
from wsi_psm.stain import default_stain_matrix, ink_pixels, stain_channels
from wsi_psm.stitching import Candidate

MPP = 0.5


def _paint(shape: tuple[int, int], h: np.ndarray, d: np.ndarray) -> np.ndarray:
    """uint8 RGB whose Ruifrok haematoxylin / DAB amounts are ``h`` / ``d`` (Beer-Lambert)."""
    m = default_stain_matrix("ihc-dab")
    od = h[..., None] * m[0] + d[..., None] * m[1]
    rgb = 256.0 * 10.0 ** (-od) - 1.0
    return np.clip(np.rint(rgb), 0, 255).astype(np.uint8).reshape(*shape, 3)


def _disc_tile() -> tuple[np.ndarray, np.ndarray, dict[int, tuple[float, float]]]:
    """A 96x96 tile: label 1 a brown disc (DAB 0.8, H 0.2), label 2 a blue disc (H 0.5), label 3 an
    ellipse (H 0.3, DAB 0.05), on a near-white background."""
    yy, xx = np.mgrid[:96, :96]
    labels = np.zeros((96, 96), np.int32)
    labels[(yy - 24) ** 2 + (xx - 24) ** 2 <= 8**2] = 1
    labels[(yy - 24) ** 2 + (xx - 70) ** 2 <= 8**2] = 2
    labels[((yy - 70) / 6.0) ** 2 + ((xx - 48) / 14.0) ** 2 <= 1] = 3
    truth = {1: (0.2, 0.8), 2: (0.5, 0.0), 3: (0.3, 0.05)}  # (haematoxylin, dab)
    h = np.full(labels.shape, 0.0)
    d = np.full(labels.shape, 0.0)
    for k, (hv, dv) in truth.items():
        h[labels == k] = hv
        d[labels == k] = dv
    return _paint(labels.shape, h, d), labels, truth


# --------------------------------------------------------------------------- features


def test_features_recover_known_stain_size_and_shape() -> None:
    img, labels, truth = _disc_tile()
    f = cell_features(img, labels, mpp=MPP, stain="ihc-dab", matrix=None)
    assert list(f.ids) == [1, 2, 3]
    assert np.all(np.isfinite(f.values))
    for i, k in enumerate(f.ids):
        hv, dv = truth[int(k)]
        assert f.column("Nucleus: Hematoxylin OD mean")[i] == pytest.approx(hv, abs=0.02)
        assert f.column("Nucleus: DAB OD mean")[i] == pytest.approx(dv, abs=0.02)
        assert f.column("Nucleus: DAB OD p90")[i] == pytest.approx(dv, abs=0.02)
        assert f.column("Nucleus: DAB OD std")[i] < 0.01  # flat stain: no texture
        # the ring lies on white background
        assert f.column("Ring: DAB OD mean")[i] < 0.02
        assert f.column("Ring: Hematoxylin OD mean")[i] < 0.02
        assert f.column("Area µm^2")[i] == pytest.approx((labels == k).sum() * MPP * MPP)
    ecc = f.column("Eccentricity")
    assert ecc[0] < 0.2 and ecc[1] < 0.2  # discs
    assert ecc[2] == pytest.approx(math.sqrt(1 - (6 / 14) ** 2), abs=0.05)  # the 14 x 6 ellipse


def test_ring_sees_a_brown_membrane() -> None:
    _, labels, _ = _disc_tile()
    # paint a 1 µm (2 px) DAB membrane around nucleus 2 (outside its mask)
    ring = ndi.binary_dilation(labels == 2, iterations=2) & (labels == 0)
    h, d = np.zeros(labels.shape), np.zeros(labels.shape)
    h[labels == 2] = 0.5
    d[ring] = 1.0
    f = cell_features(_paint(labels.shape, h, d), labels, mpp=MPP, stain="ihc-dab", ring_um=1.0)
    ring_dab = f.column("Ring: DAB OD mean")
    assert ring_dab[1] > 0.4 and ring_dab[0] < 0.05


def test_label_quantile_matches_numpy() -> None:
    rng = np.random.default_rng(0)
    lab = rng.integers(1, 30, size=5000)
    lab[lab == 7] = 8  # an absent label in the middle
    v = np.abs(rng.normal(size=5000)).astype(np.float32)  # stain amounts: float32, >= 0
    v[:40] = 0.0
    v[40:50] = -0.0  # (np.maximum(x, 0) can give -0.0; it must sort as 0)
    v[50:60] = v[60:70]  # ties
    counts = np.bincount(lab, minlength=30)
    got = _label_quantile(v, lab, counts, 0.9)
    for k in range(1, 30):
        want = np.percentile(v[lab == k].astype(np.float64), 90) if counts[k] else 0.0
        assert got[k - 1] == pytest.approx(want, rel=1e-12, abs=1e-12)
    for q in (0.0, 0.5, 1.0):  # the ends and the middle: min, median, max per label
        want = [np.quantile(v[lab == k].astype(np.float64), q) for k in range(1, 30) if counts[k]]
        np.testing.assert_allclose(_label_quantile(v, lab, counts, q)[counts[1:] > 0], want)
    with pytest.raises(ValueError, match="float32"):
        _label_quantile(v.astype(np.float64), lab, counts, 0.9)


def test_features_of_an_empty_tile() -> None:
    img = np.full((32, 32, 3), 240, np.uint8)
    f = cell_features(img, np.zeros((32, 32), np.int32), mpp=MPP, stain="he")
    assert len(f) == 0 and f.values.shape == (0, len(f.names))


# --------------------------------------------------------------------------- IHC rule


def test_dab_rule_splits_two_modes_and_keeps_the_floor() -> None:
    rng = np.random.default_rng(0)
    neg = np.exp(rng.normal(np.log(0.08), 0.3, 600))
    pos = np.exp(rng.normal(np.log(0.9), 0.35, 300))
    rule = dab_threshold(np.r_[neg, pos])
    assert rule.mixture_threshold is not None
    assert 0.2 < rule.threshold < 0.6
    # one population only (an all-negative slide): the floor decides, nothing becomes positive
    only = dab_threshold(neg)
    assert only.threshold >= 0.15
    assert np.mean(neg > only.threshold) < 0.05
    # the mixture never goes below the floor
    assert dab_threshold(np.r_[neg, pos], floor=0.7).threshold == 0.7


def test_pale_rule_needs_a_separate_pale_minority() -> None:
    """CMU-1's case: 15% of the objects at a quarter of the nuclei's haematoxylin get a rule whose
    threshold lies between the modes; modes 1.8x apart (pale and dark nuclei, as in many MoNuSeg
    images), a long pale tail of one mode, a pale majority, a stricter ratio, or a pale mode that
    is haematoxylin-dominant (pale vesicular nuclei beside dark lymphocytes) give none."""
    rng = np.random.default_rng(0)

    def modes(low: float, high: float, w_low: float, n: int = 2000) -> np.ndarray:
        k = int(w_low * n)
        return np.exp(
            np.r_[rng.normal(np.log(low), 0.25, k), rng.normal(np.log(high), 0.25, n - k)]
        )

    def eosin(h: np.ndarray, pale_ratio: float) -> np.ndarray:
        """Eosin OD: ``pale_ratio`` x haematoxylin under 0.3 (the pale objects), 0.7 x above."""
        return h * np.where(h < 0.3, pale_ratio, 0.7)

    cmu = modes(0.16, 0.68, 0.15)
    collagen = eosin(cmu, 3.0)  # CMU-1's fragments: eosin 3x their haematoxylin
    rule = pale_threshold(cmu, collagen)
    assert rule is not None and 0.2 < rule.threshold < 0.5
    assert rule.means == pytest.approx((0.16, 0.68), rel=0.1)
    assert rule.weights[0] == pytest.approx(0.15, abs=0.03)
    assert rule.eosin_ratio == pytest.approx(3.0, rel=0.05)
    # the same modes, the pale one stained by haematoxylin more than by eosin: nuclei, kept
    assert pale_threshold(cmu, eosin(cmu, 1.0)) is None
    two = modes(0.3, 0.55, 0.4)  # pale and dark nuclei, 1.8x apart
    assert pale_threshold(two, eosin(two, 3.0)) is None
    # one mode with a long pale tail: two Gaussians fit it far apart, but there is no dip
    tail = np.exp(np.log(0.6) - np.abs(rng.normal(0, 0.6, 2000)) * (rng.random(2000) < 0.3))
    assert pale_threshold(tail, eosin(tail, 3.0), ratio=1.5) is None
    most = modes(0.16, 0.68, 0.6)  # the pale mode would be most objects
    assert pale_threshold(most, eosin(most, 3.0)) is None
    assert pale_threshold(cmu, collagen, ratio=5.0) is None
    assert pale_threshold(cmu[:40], collagen[:40]) is None  # too few objects to say


def _he_cohort(pale_eosin: float = 0.45) -> tuple[np.ndarray, np.ndarray, set[int]]:
    """A 480x480 H&E-painted tile of 100 discs: 85 nuclei (haematoxylin OD ~0.7) and 15 pale,
    eosin-rich objects (haematoxylin ~0.15, eosin 0.45: collagen-like), a little eosin
    everywhere; returns image, labels, the pale labels."""
    rng = np.random.default_rng(1)
    m = default_stain_matrix("he")
    labels = np.zeros((480, 480), np.int32)
    h = np.zeros(labels.shape)
    e = np.full(labels.shape, 0.15)
    yy, xx = np.mgrid[:48, :48]
    pale = set(rng.choice(np.arange(1, 101), 15, replace=False).tolist())
    for k in range(1, 101):
        r, c = divmod(k - 1, 10)
        disc = (yy - 24) ** 2 + (xx - 24) ** 2 <= rng.integers(7, 12) ** 2
        level = rng.normal(0.15 if k in pale else 0.7, 0.03)
        labels[r * 48 : r * 48 + 48, c * 48 : c * 48 + 48][disc] = k
        h[r * 48 : r * 48 + 48, c * 48 : c * 48 + 48][disc] = level
        if k in pale:
            e[r * 48 : r * 48 + 48, c * 48 : c * 48 + 48][disc] = pale_eosin
    od = h[..., None] * m[0] + e[..., None] * m[1]
    rgb = np.clip(np.rint(256.0 * 10.0 ** (-od) - 1.0), 0, 255).astype(np.uint8)
    return rgb, labels, pale


def test_objects_too_pale_to_be_nuclei_get_no_payload() -> None:
    img, labels, pale = _he_cohort()
    clf = CellClassifier.fit(
        [img], [labels], mpp=MPP, stain="he", matrix=default_stain_matrix("he")
    )
    assert clf.pale is not None and 0.15 < clf.pale.threshold < 0.7
    assert clf.n_fit_cells == 100
    assert "not nuclei" in clf.describe()
    back = CellClassifier.from_state(json.loads(json.dumps(clf.to_state())))
    assert back.pale == clf.pale
    # a state saved before the rule (version 1, no "pale") loads without it
    old = {k: v for k, v in clf.to_state().items() if k != "pale"}
    assert CellClassifier.from_state({**old, "version": 1}).pale is None
    polys = labels_to_polygons(labels)
    cands = [Candidate(0, p, p.centroid.x, p.centroid.y, True, label=k) for k, p in polys]
    back.annotate(img, labels, cands, MPP)
    assert {c.label for c in cands if c.payload is None} == pale
    assert all(c.payload[0] in dict(clf.classes) for c in cands if c.label not in pale)
    # the rule off: every object is a cell
    off = ClassConfig(pale_ratio=None, max_ink_fraction=None)
    keep = CellClassifier.fit([img], [labels], mpp=MPP, stain="he", cfg=off,
                              matrix=default_stain_matrix("he"))  # fmt: skip
    assert keep.pale is None and "not nuclei" not in keep.describe()
    # pale objects stained by haematoxylin more than by eosin are pale nuclei: no rule
    img, labels, _ = _he_cohort(pale_eosin=0.05)
    nuclei = CellClassifier.fit(
        [img], [labels], mpp=MPP, stain="he", matrix=default_stain_matrix("he")
    )
    assert nuclei.pale is None


def test_ink_pixels_are_the_colours_no_he_stain_makes() -> None:
    colours = {  # RGB: ink?
        (0, 128, 128): True,  # teal marking ink
        (40, 160, 60): True,  # green ink
        (120, 190, 200): True,  # light teal (hue 188)
        (90, 60, 140): False,  # haematoxylin, purple
        (60, 70, 160): False,  # haematoxylin, blue (hue 234)
        (230, 120, 170): False,  # eosin
        (150, 90, 40): False,  # DAB
        (30, 60, 200): False,  # a blue pen: haematoxylin's hue, not told apart
        (128, 128, 128): False,  # grey
        (200, 210, 212): False,  # near-grey teal: chroma 12, dirt or glass
    }
    rgb = np.array([list(colours)], dtype=np.uint8)
    assert ink_pixels(rgb)[0].tolist() == list(colours.values())


def _inked(img: np.ndarray, labels: np.ndarray, inked: set[int], share: float) -> np.ndarray:
    """``img`` with the first ``share`` of each inked label's pixels (in raster order) teal."""
    out = img.copy()
    for k in inked:
        ys, xs = np.nonzero(labels == k)
        n = round(share * len(ys))
        out[ys[:n], xs[:n]] = (20, 140, 130)
    return out


def test_objects_of_marking_ink_get_no_payload_and_stay_out_of_the_fit() -> None:
    img, labels, pale = _he_cohort()
    rng = np.random.default_rng(3)
    nuclei = sorted(set(range(1, 101)) - pale)
    inked = set(rng.choice(nuclei, 8, replace=False).tolist())
    smudged = set(rng.choice(sorted(set(nuclei) - inked), 8, replace=False).tolist())
    img = _inked(_inked(img, labels, inked, 0.6), labels, smudged, 0.1)
    frac = ink_fraction(img, labels, np.arange(1, 101))
    assert frac[sorted(k - 1 for k in inked)].min() > 0.55
    assert frac[sorted(k - 1 for k in smudged)].max() < 0.15
    clf = CellClassifier.fit(
        [img], [labels], mpp=MPP, stain="he", matrix=default_stain_matrix("he")
    )
    assert clf.max_ink == 0.3 and "marking ink" in clf.describe()
    # the inked objects stay out of the fit: the same rules as a fit without them
    without = np.where(np.isin(labels, sorted(inked)), 0, labels)
    ref = CellClassifier.fit(
        [img], [without], mpp=MPP, stain="he", matrix=default_stain_matrix("he")
    )
    # (too few cells for groups: the pale rule is the fit that shows it, fitted as without them)
    assert clf.groups is None and clf.pale is not None and clf.pale == ref.pale
    back = CellClassifier.from_state(json.loads(json.dumps(clf.to_state())))
    assert back.max_ink == clf.max_ink
    polys = labels_to_polygons(labels)
    cands = [Candidate(0, p, p.centroid.x, p.centroid.y, True, label=k) for k, p in polys]
    back.annotate(img, labels, cands, MPP)
    # the inked objects and the pale ones are not written; a nucleus with an ink smudge is
    assert {c.label for c in cands if c.payload is None} == pale | inked
    # a state from before the rule (version 2) loads without it; the rule off keeps them all
    old = {k: v for k, v in clf.to_state().items() if k != "max_ink"}
    assert CellClassifier.from_state({**old, "version": 2}).max_ink is None
    keep = CellClassifier.fit([img], [labels], mpp=MPP, stain="he", matrix=default_stain_matrix("he"),
                              cfg=ClassConfig(max_ink_fraction=None))  # fmt: skip
    assert keep.pale != clf.pale  # inked objects in the fit move the rule: the equality above tells
    keep.annotate(img, labels, cands, MPP)
    assert {c.label for c in cands if c.payload is None} == pale
    # IHC has no ink rule: its pale haematoxylin can be cyan
    assert CellClassifier.fit([img], [labels], mpp=MPP, stain="ihc-dab").max_ink is None


def test_no_annotated_monuseg_nucleus_reads_as_ink(monuseg_dir) -> None:
    """The ink rule's margin on real H&E: annotated nuclei of MoNuSeg images from four organs."""
    from wsi_psm.groundtruth import load_monuseg_labels, monuseg_cases

    cases = [c for c in monuseg_cases(monuseg_dir, xml_only=True)][:4]
    worst = 0.0
    for case in cases:
        rgb = np.asarray(Image.open(case.image).convert("RGB"))
        lab = load_monuseg_labels(case)
        ids = np.unique(lab[lab > 0])
        worst = max(worst, float(ink_fraction(rgb, lab, ids).max()))
    assert worst < ClassConfig().max_ink_fraction / 2


def _bcdata_image(bcdata_dir, stem: str) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    img = np.asarray(Image.open(bcdata_dir / "images" / "test" / f"{stem}.png").convert("RGB"))
    return img, load_bcdata_points(bcdata_dir / "annotations" / "test", stem)


def test_ihc_brown_nuclei_positive_blue_negative_on_bcdata(bcdata_dir) -> None:
    """Label-free nuclei (OD thresholds + watershed), classes fitted on the image itself; the annotated
    points only measure: cells hit by a positive point must be Positive, by a negative point Negative."""
    img, pts = _bcdata_image(bcdata_dir, "5")  # 56 positive, 56 negative annotated cells
    mpp = 0.25
    ch = stain_channels(img, "ihc-dab")
    h, d = (ndi.gaussian_filter(ch[k], 2) for k in ("haematoxylin", "dab"))
    t_d = np.exp(threshold_otsu(np.log(d + 0.01)))
    t_h = np.exp(threshold_otsu(np.log(h[d < t_d] + 0.01)))
    # brown nuclei first, then blue ones not touching them (one mask would merge the two kinds)
    brown = split_instances(d > t_d, mpp=mpp)
    blue = split_instances((h > t_h) & ~ndi.binary_dilation(brown > 0, iterations=6), mpp=mpp)
    labels = np.where(brown > 0, brown, np.where(blue > 0, blue + brown.max(), 0)).astype(np.int32)
    clf = CellClassifier.fit([img], [labels], mpp=mpp, stain="auto", seed=0)
    assert clf.stain == "ihc-dab"  # detected, not given
    assert clf.classes == (POSITIVE, NEGATIVE)
    assert clf.dab is not None and clf.dab.mixture_threshold is not None  # two modes found

    polys = labels_to_polygons(labels)
    cands = [Candidate(0, p, p.centroid.x, p.centroid.y, True, label=k) for k, p in polys]
    clf.annotate(img, labels, cands, mpp)
    name_of = {c.label: c.payload[0] for c in cands}
    right = total = 0
    for cls, xy in pts.items():
        hit = labels[xy[:, 1].astype(int), xy[:, 0].astype(int)]
        for k in hit[hit > 0]:
            total += 1
            right += name_of[int(k)] == cls
    assert total > 60  # most annotated cells lie on a detected nucleus
    assert right / total >= 0.9


# --------------------------------------------------------------------------- H&E groups


def test_he_groups_synthetic_order_and_not_separable() -> None:
    rng = np.random.default_rng(1)
    small = np.c_[
        rng.normal(2.5, 0.15, 800),
        rng.normal(0.0, 0.1, 800),
        rng.normal(0.2, 0.03, 800),
        rng.normal(0.5, 0.08, 800),
    ]
    large = np.c_[
        rng.normal(4.0, 0.15, 400),
        rng.normal(-0.8, 0.1, 400),
        rng.normal(0.4, 0.03, 400),
        rng.normal(0.6, 0.08, 400),
    ]
    x = np.r_[large, small]  # large first: the order must come from area, not from the data
    g = he_groups(x, max_groups=3, seed=0)
    assert g.k == 2
    pred = g.predict(x)
    assert np.mean(pred[400:] == 0) > 0.98 and np.mean(pred[:400] == 1) > 0.98
    one = he_groups(rng.normal(size=(2000, 4)), max_groups=3, seed=0)
    assert one.k == 1
    assert he_groups(x[:100], max_groups=3).k == 1  # too few cells to group


@pytest.fixture(scope="module")
def cmu_tiles() -> tuple[list[np.ndarray], list[np.ndarray]]:
    from wsi_psm.slide import Slide

    path = data_path("wsi", "aperio-svs", "CMU-1-Small-Region.svs")
    with Slide.open(path) as s:
        img = s.read_at_mpp(0, 0, s.width, s.height, MPP)
    tiles, labs = [], []
    for y in range(0, img.shape[0] - 511, 512):
        for x in range(0, img.shape[1] - 511, 512):
            t = img[y : y + 512, x : x + 512]
            h = ndi.gaussian_filter(stain_channels(t, "he")["haematoxylin"], 1)
            tiles.append(t)
            labs.append(split_instances(h > threshold_otsu(h), mpp=MPP))
    return tiles, labs


def test_he_groups_stable_across_seeds_on_cmu(cmu_tiles) -> None:
    tiles, labs = cmu_tiles
    a = CellClassifier.fit(tiles, labs, mpp=MPP, stain="auto", seed=0)
    b = CellClassifier.fit(tiles, labs, mpp=MPP, stain="auto", seed=1)
    assert a.stain == b.stain == "he"
    assert a.groups is not None and len(a.classes) >= 2
    assert a.classes == b.classes  # names, colours and order
    assert a.classes[0][0] == "Small nucleus"
    pa = np.concatenate(
        [a.predict(a.features(t, lab, MPP)) for t, lab in zip(tiles, labs, strict=True)]
    )
    pb = np.concatenate(
        [b.predict(b.features(t, lab, MPP)) for t, lab in zip(tiles, labs, strict=True)]
    )
    assert np.mean(pa == pb) > 0.9
    # group means of area rise with the rank (the documented order)
    area = np.concatenate(
        [a.features(t, lab, MPP).column("Area µm^2") for t, lab in zip(tiles, labs, strict=True)]
    )
    means = [area[pa == k].mean() for k in range(len(a.classes))]
    assert means == sorted(means)
    # the description gives each group's centre, its area near the group's median cell area
    text = a.describe()
    for k, (name, _) in enumerate(a.classes):
        said = float(re.search(rf"{name} \(about (\d+) µm²", text).group(1))
        assert 0.7 < said / np.median(area[pa == k]) < 1.4, (name, said)


def test_disabled_classes_give_one_nucleus_class(cmu_tiles) -> None:
    tiles, labs = cmu_tiles
    clf = CellClassifier.fit(
        tiles[:2], labs[:2], mpp=MPP, stain="he", cfg=ClassConfig(enabled=False)
    )
    assert clf.classes == (NUCLEUS,) and clf.indices({"Nucleus": 5}) == {}


# --------------------------------------------------------------------------- state, payloads, indices


def _fitted_ihc() -> tuple[CellClassifier, np.ndarray, np.ndarray]:
    img, labels, _ = _disc_tile()
    # a tiny cohort: the disc tile and its transpose; too few cells for a mixture -> the floor
    clf = CellClassifier.fit(
        [img, img.transpose(1, 0, 2)],
        [labels, labels.T],
        mpp=MPP,
        stain="ihc-dab",
        matrix=default_stain_matrix("ihc-dab"),  # the vectors the tile was painted with
    )
    return clf, img, labels


def test_state_round_trip_through_json(cmu_tiles) -> None:
    tiles, labs = cmu_tiles
    he = CellClassifier.fit(tiles, labs, mpp=MPP, stain="he", seed=0)
    ihc, img, labels = _fitted_ihc()
    for clf, t, lab in ((he, tiles[0], labs[0]), (ihc, img, labels)):
        back = CellClassifier.from_state(json.loads(json.dumps(clf.to_state())))
        assert back.classes == clf.classes and back.stain == clf.stain
        np.testing.assert_allclose(back.matrix, clf.matrix)
        f = clf.features(t, lab, MPP)
        np.testing.assert_array_equal(back.predict(f), clf.predict(f))
    with pytest.raises(ValueError, match="version"):
        CellClassifier.from_state({**ihc.to_state(), "version": 99})


def test_annotate_sets_valid_payloads() -> None:
    clf, img, labels = _fitted_ihc()
    assert clf.dab is not None and clf.dab.threshold == pytest.approx(0.15)  # floor: 6 cells only
    np.testing.assert_allclose(clf.matrix, default_stain_matrix("ihc-dab"))  # given, not estimated
    mpp_l0 = 0.25  # level-0 is twice the processing resolution
    polys = labels_to_polygons(labels, scale=2.0, offset=(1000, 2000))
    cands = [Candidate(3, p, p.centroid.x, p.centroid.y, True, label=k) for k, p in polys]
    clf.annotate(img, labels, cands, mpp_l0)
    keys = None
    for c in cands:
        name, color, meas = c.payload
        assert (name, color) in clf.classes
        assert len(color) == 3 and all(isinstance(v, int) and 0 <= v <= 255 for v in color)
        assert all(isinstance(v, float) and math.isfinite(v) for v in meas.values())
        assert set(MEASUREMENT_NAMES) <= set(meas) and set(stain_feature_names("ihc-dab")) <= set(
            meas
        )
        keys = keys or set(meas)
        assert set(meas) == keys  # the same columns for every cell
        assert meas["Area µm^2"] == pytest.approx((labels == c.label).sum() * MPP * MPP)
    names = {c.label: c.payload[0] for c in cands}
    assert names == {1: "Positive", 2: "Negative", 3: "Negative"}
    clf.annotate(img, labels, [], mpp_l0)  # nothing to do


def test_indices() -> None:
    clf, _, _ = _fitted_ihc()
    assert clf.indices({"Positive": 30, "Negative": 90}) == {"ki67_index": 0.25}
    assert clf.indices({}) == {"ki67_index": None}


def test_run_config_carries_class_config() -> None:
    cfg = RunConfig().with_updates(**{"classes.max_groups": 2, "classes.marker": "er"})
    assert cfg.classes.max_groups == 2 and cfg.to_dict()["classes"]["marker"] == "er"
