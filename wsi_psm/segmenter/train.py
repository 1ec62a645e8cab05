"""Training the downstream network on pseudo instance labels, label-free.

Targets come from instance labels (pseudo masks split into nuclei, or a previous round's own
predictions): the foreground, and each nucleus's distance to its edge normalised to 1 at its centre.
A per-pixel weight lets uncertain pixels (where a previous round hesitated) be ignored.

Augmentation is strong, because one fit must serve other organs, stains and scanners: stain-space
colour jitter (haematoxylin / eosin amounts scaled and shifted), brightness, contrast, saturation,
blur and noise on the uint8 crop, then one random affine per crop (any rotation, a flip, a scale
in ``segmenter.fit_scale``, 0.8-1.25 by default) applied to image and targets together with
``grid_sample``.

Seeded: crops and jitter come from a numpy Generator and the weights from a forked torch RNG, so a
fit with the same seed, data and config gives the same weights on CPU.
"""

from __future__ import annotations

import copy
import functools
import math
import os
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch
from scipy import ndimage as ndi
from torch.nn import functional as F

from wsi_psm.config import InstanceConfig, RunConfig
from wsi_psm.errors import NoNucleiError
from wsi_psm.instances import split_instances
from wsi_psm.preprocess import to_network_input
from wsi_psm.psm.train import one_cycle
from wsi_psm.segmenter.network import DIST, FG, SegEnsemble, Segmenter, SegNet
from wsi_psm.stain import Stain, default_stain_matrix, rgb_to_od, stain_channels

Progress = Callable[[int, int, float], None]


# The read-out that gives the refinement's teacher points: fixed (not the inference defaults, which
# were tuned later on the finished net), so the shipped model stays what this fit makes.
TEACHER_READOUT = {"fg_threshold": 0.5, "marker_h": 0.0, "shrink_um": 0.0, "merge_solidity": 0.0}


@dataclass
class Sample:
    """One training image at the processing resolution with its targets (all the same H x W)."""

    image: np.ndarray  # uint8 (H, W, 3)
    fg: np.ndarray  # float32 in [0, 1]
    dist: np.ndarray  # float32 in [0, 1]
    weight: np.ndarray | None = None  # float32 >= 0; None = all ones


def distance_target(labels: np.ndarray) -> np.ndarray:
    """Per nucleus, the Euclidean distance to its own edge divided by its maximum (1 at the centre).

    Touching nuclei each get their own edge, so the target has a valley between them.
    """
    labels = np.asarray(labels)
    out = np.zeros(labels.shape, np.float32)
    for i, sl in enumerate(ndi.find_objects(labels), start=1):
        if sl is None:
            continue
        sl = tuple(slice(max(s.start - 1, 0), s.stop + 1) for s in sl)
        m = labels[sl] == i
        d = ndi.distance_transform_edt(m)
        mx = d.max()
        if mx > 0:
            out[sl][m] = (d[m] / mx).astype(np.float32)
    return out


def sample_from_labels(
    image: np.ndarray, labels: np.ndarray, weight: np.ndarray | None = None
) -> Sample:
    return Sample(image, (labels > 0).astype(np.float32), distance_target(labels), weight)


# ------------------------------------------------------------------------------------- augmentation

_HE = default_stain_matrix("he")
_M = np.vstack([_HE, np.cross(_HE[0], _HE[1]) / np.linalg.norm(np.cross(_HE[0], _HE[1]))]).astype(
    np.float32
)
_M_INV = np.linalg.inv(_M).astype(np.float32)


@dataclass(frozen=True)
class _JitterDraw:
    """One crop's random colour-jitter numbers (:func:`colour_jitter`), drawn apart from its
    arithmetic: a batch's draws are made in order on one Generator, then its crops are jittered in
    threads, so the random stream and the batch are the same as one crop after another."""

    alpha: np.ndarray  # per stain: amount factor
    beta: np.ndarray  # per stain: shift
    contrast: float
    brightness: float
    saturation: float
    blur: float | None  # Gaussian sigma, px
    noise: np.ndarray | None  # additive, the crop's shape


def _draw_jitter(rng: np.random.Generator, shape: tuple[int, ...], s: float) -> _JitterDraw:
    alpha = rng.uniform(1 - 0.35 * s, 1 + 0.35 * s, size=3).astype(np.float32)
    beta = rng.uniform(-0.05 * s, 0.05 * s, size=3).astype(np.float32)
    contrast = rng.uniform(1 - 0.2 * s, 1 + 0.2 * s)
    brightness = rng.uniform(-15, 15) * s
    saturation = rng.uniform(1 - 0.3 * s, 1 + 0.3 * s)
    blur = rng.uniform(0.3, 1.2) if rng.random() < 0.25 * s else None
    noise = rng.normal(0, rng.uniform(2, 8), size=shape) if rng.random() < 0.25 * s else None
    return _JitterDraw(alpha, beta, contrast, brightness, saturation, blur, noise)


def _apply_jitter(rgb: np.ndarray, j: _JitterDraw) -> np.ndarray:
    od = rgb_to_od(rgb)
    conc = od @ _M_INV
    conc = conc * j.alpha + j.beta
    od = np.maximum(conc @ _M, 0.0)
    img = 256.0 * np.power(10.0, -od) - 1.0
    # brightness / contrast around the mean, saturation against the grey value
    mean = img.mean()
    img = (img - mean) * j.contrast + mean + j.brightness
    grey = img.mean(axis=-1, keepdims=True)
    img = grey + (img - grey) * j.saturation
    if j.blur is not None:
        img = ndi.gaussian_filter(img, (j.blur, j.blur, 0))
    if j.noise is not None:
        img = img + j.noise
    return np.clip(img, 0, 255).round().astype(np.uint8)


def colour_jitter(rgb: np.ndarray, rng: np.random.Generator, strength: float = 1.0) -> np.ndarray:
    """A randomly restained copy of a uint8 RGB crop (stain amounts, brightness, contrast, saturation)."""
    return _apply_jitter(rgb, _draw_jitter(rng, rgb.shape, strength))


@functools.cache
def _jitter_pool() -> ThreadPoolExecutor:
    # numpy releases the GIL on whole-crop arithmetic: beside a GPU, whose training step takes a
    # few ms, jittering a batch's crops one after another on one core was most of a step
    return ThreadPoolExecutor(min(8, os.cpu_count() or 1), thread_name_prefix="wsi-psm-jitter")


def _affine_batch(
    x: torch.Tensor, y: torch.Tensor, out: int, rng: np.random.Generator, scale: tuple[float, float]
) -> tuple[torch.Tensor, torch.Tensor]:
    """One random rotation / flip / scale per sample, the same for image and targets; centre ``out``^2."""
    b, _, h, w = x.shape
    theta = np.zeros((b, 2, 3), np.float32)
    for i in range(b):
        a = rng.uniform(0, 2 * math.pi)
        s = math.exp(rng.uniform(math.log(scale[0]), math.log(scale[1])))
        f = -1.0 if rng.random() < 0.5 else 1.0
        # output pixel grid spans out px; in input normalised coords that is out/w * s
        sx, sy = out / w / s, out / h / s
        c, si = math.cos(a), math.sin(a)
        theta[i] = [[c * sx * f, -si * sy, 0.0], [si * sx * f, c * sy, 0.0]]
    grid = F.affine_grid(
        torch.from_numpy(theta).to(x.device), [b, 1, out, out], align_corners=False
    )
    xo = F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
    yo = F.grid_sample(y, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
    return xo, yo


def _cut(a: np.ndarray, box: tuple[slice, slice], win: int) -> np.ndarray:
    """``a[box]``, reflect-padded to ``win`` x ``win`` when the image is smaller than the window."""
    c = a[box]
    if c.shape[0] < win or c.shape[1] < win:
        pad = [(0, win - c.shape[0]), (0, win - c.shape[1])] + [(0, 0)] * (c.ndim - 2)
        c = np.pad(c, pad, mode="reflect")
    return c


def sample_batch(
    samples: Sequence[Sample],
    rng: np.random.Generator,
    batch: int,
    crop: int,
    *,
    colour: float = 1.0,
    scale: tuple[float, float] = (0.8, 1.25),
    pool: Executor | None = None,
    device: torch.device | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch of augmented crops: inputs (B, 3, crop, crop) and targets (B, 3, crop, crop) =
    (foreground, distance, weight), on ``device`` (the warp runs there: beside a GPU the CPU only
    cuts and jitters). The crops' colour jitter runs on ``pool`` (default: a shared thread pool);
    the batch does not depend on it."""
    # read a window large enough that any rotation at the smallest scale stays inside it
    win = math.ceil(crop * math.sqrt(2) / scale[0]) + 2
    imgs = np.empty((batch, win, win, 3), np.uint8)
    tg = np.empty((batch, 3, win, win), np.float32)
    draws: list[_JitterDraw] = []
    for i in range(batch):
        s = samples[rng.integers(len(samples))]
        h, w = s.fg.shape
        y0 = rng.integers(max(h - win, 0) + 1)
        x0 = rng.integers(max(w - win, 0) + 1)
        box = (slice(y0, y0 + win), slice(x0, x0 + win))

        imgs[i] = _cut(s.image, box, win)
        if colour > 0:
            draws.append(_draw_jitter(rng, imgs[i].shape, colour))
        tg[i, 0] = _cut(s.fg, box, win)
        tg[i, 1] = _cut(s.dist, box, win)
        tg[i, 2] = 1.0 if s.weight is None else _cut(s.weight, box, win)
    if draws:

        def jitter(i: int) -> None:
            imgs[i] = _apply_jitter(imgs[i], draws[i])

        list((pool or _jitter_pool()).map(jitter, range(batch)))
    x = to_network_input(imgs, device)
    y = torch.from_numpy(tg) if device is None else torch.from_numpy(tg).to(device)
    return _affine_batch(x, y, crop, rng, scale)


# ------------------------------------------------------------------------------------------ loss


def segmentation_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Weighted BCE + soft Dice on the foreground, weighted BCE on the normalised distance."""
    w = target[:, 2]
    fg_t, d_t = target[:, 0], target[:, 1]
    fg_l, d_l = logits[:, FG], logits[:, DIST]
    wsum = w.sum().clamp_min(1.0)
    bce = (F.binary_cross_entropy_with_logits(fg_l, fg_t, reduction="none") * w).sum() / wsum
    p = torch.sigmoid(fg_l) * w
    inter = (p * fg_t).sum()
    dice = 1 - (2 * inter + 1) / (p.sum() + (fg_t * w).sum() + 1)
    dl = (F.binary_cross_entropy_with_logits(d_l, d_t, reduction="none") * w).sum() / wsum
    return bce + dice + dl


# ------------------------------------------------------------------------------------------ fit


def fit_segmenter(
    samples: Sequence[Sample],
    *,
    width: int = 16,
    depth: int = 3,
    steps: int = 800,
    batch: int = 16,
    crop: int = 128,
    lr: float = 2e-3,
    colour: float = 1.0,
    scale: tuple[float, float] = (0.8, 1.25),
    seed: int = 0,
    device: torch.device | None = None,
    init: SegNet | None = None,
    progress: Progress | None = None,
) -> SegNet:
    """Train a :class:`SegNet` (or continue ``init``) on ``samples``: Adam, one-cycle cosine lr."""
    device = device or torch.device("cpu")
    if not samples:
        raise ValueError("fit_segmenter needs at least one training sample")
    rng = np.random.default_rng(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = init if init is not None else SegNet(width=width, depth=depth)
    # channels-last on a CPU: oneDNN's convolutions train ~1.35x faster in it (one step at batch 8
    # of 128² crops, 2 cores: 175 -> 125 ms); another float path than the plain layout, so a fit's
    # weights are not bit-identical across the two (the shipped file predates it). CUDA keeps the
    # plain layout (training in it not measured there; the GPU fit waits on the crops anyway).
    layout = torch.channels_last if device.type == "cpu" else torch.contiguous_format
    net = net.to(device).to(memory_format=layout).train()
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    sched = one_cycle(opt, lr, steps)
    t0 = time.perf_counter()
    for step in range(steps):
        x, y = sample_batch(samples, rng, batch, crop, colour=colour, scale=scale, device=device)
        loss = segmentation_loss(net(x.contiguous(memory_format=layout)), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if progress is not None:
            progress(step + 1, steps, float(loss.detach()))
    net = net.to(memory_format=torch.contiguous_format).eval()  # (saved and used as before)
    net.fit_seconds = time.perf_counter() - t0  # type: ignore[attr-defined]
    return net


# ------------------------------------------------------------------------- pseudo masks -> network


# Fewer pseudo nuclei than this in all the images together is nothing to learn nuclei from: an
# image of one colour, or no stained tissue (a 128 µm field of tissue holds tens of them).
MIN_PSEUDO_NUCLEI = 10


def pseudo_instances(
    masks: Sequence[np.ndarray], *, mpp: float, instance_cfg: InstanceConfig | None = None
) -> list[np.ndarray]:
    """Round-0 targets: each boolean pseudo mask split into nuclei (distance watershed).

    Raises NoNucleiError when all of them together hold fewer than ``MIN_PSEUDO_NUCLEI``."""
    labels = [split_instances(m, mpp=mpp, cfg=instance_cfg) for m in masks]
    found = sum(int(lab.max()) for lab in labels)
    if found < MIN_PSEUDO_NUCLEI:
        raise NoNucleiError(
            f"nothing to fit a network on: the pseudo masks of {len(masks)} image(s) hold "
            f"{found} nucleus-like object(s), {MIN_PSEUDO_NUCLEI} are needed (stained tissue, "
            "at the right --mpp?)"
        )
    return labels


def label_centroids(labels: np.ndarray) -> np.ndarray:
    """(n, 2) integer (row, col) centroids of labels 1..n (labels are compact: every id present)."""
    n = int(labels.max())
    if n == 0:
        return np.zeros((0, 2), np.int64)
    rows, cols = np.nonzero(labels)
    ids = labels[rows, cols]
    cnt = np.maximum(np.bincount(ids, minlength=n + 1), 1)
    cy = np.bincount(ids, weights=rows, minlength=n + 1) / cnt
    cx = np.bincount(ids, weights=cols, minlength=n + 1) / cnt
    pts = np.stack([cy[1:], cx[1:]], axis=1).round().astype(np.int64)
    present = np.bincount(ids, minlength=n + 1)[1:] > 0
    return pts[present]


def distance_peaks(
    maps: np.ndarray,
    *,
    mpp: float,
    smooth_um: float = 0.5,
    min_distance_um: float = 1.5,
    min_dist: float = 0.3,
    fg_threshold: float = 0.5,
) -> np.ndarray:
    """(n, 2) integer (row, col) nucleus centres: local maxima of the smoothed distance map
    (``maps[1]``) at least ``min_distance_um`` apart, above ``min_dist``, on the foreground.

    The teacher points of a refinement round. Unlike the centroids of the read-out's instances,
    every distance peak counts, so nuclei merged into one instance still give one point each
    (on the 17 MoNuSeg mask-only images: point recall 0.74 vs 0.59 at about the same precision).
    """
    from skimage.feature import peak_local_max

    fg, dist = np.asarray(maps[0], np.float32), np.asarray(maps[1], np.float32)
    d = ndi.gaussian_filter(dist, smooth_um / mpp) if smooth_um > 0 else dist
    pts = peak_local_max(
        d, min_distance=max(1, round(min_distance_um / mpp)), threshold_abs=min_dist,
        exclude_border=False,
    )  # fmt: skip
    return pts[fg[pts[:, 0], pts[:, 1]] > fg_threshold].astype(np.int64)


def voronoi_sample(
    image: np.ndarray,
    points: np.ndarray,
    *,
    mpp: float,
    stain: Stain = "he",
    trunc_um: float = 5.0,
    point_radius_um: float = 1.0,
    colour_weight: float = 0.2,
    seed: int = 0,
) -> Sample:
    """Point-supervision targets (Qu et al. 2019, as the PSM method refines): from nucleus centres.

    - Voronoi label: the edges of the Voronoi partition of the points are background (neighbouring
      nuclei are parted there), a small disc at each point is nucleus;
    - cluster label: per-pixel k-means (k = 3) on the stain optical densities (standardised, times
      ``colour_weight``) and the distance to the nearest point (truncated at ``trunc_um``, scaled to
      [0, 1]); the cluster nearest the points is nucleus, the farthest background, the middle one
      is left out of the loss (weight 0).

    Nuclei come out compact and centred on their points, so the ragged, holed or haloed outlines of
    a threshold-like pseudo mask do not carry over. Instances for the distance target: the nucleus
    pixels of each Voronoi cell.
    """
    from sklearn.cluster import KMeans

    h, w = image.shape[:2]
    seeds = np.zeros((h, w), np.int32)
    pts = np.clip(np.asarray(points, np.int64).reshape(-1, 2), 0, [h - 1, w - 1])
    if len(pts) == 0:  # nothing detected: all background
        return Sample(image, np.zeros((h, w), np.float32), np.zeros((h, w), np.float32), None)
    seeds[pts[:, 0], pts[:, 1]] = np.arange(1, len(pts) + 1, dtype=np.int32)
    dist, (iy, ix) = ndi.distance_transform_edt(seeds == 0, return_indices=True)
    cell = seeds[iy, ix]
    edges = np.zeros((h, w), bool)
    edges[:, 1:] |= cell[:, 1:] != cell[:, :-1]
    edges[1:, :] |= cell[1:, :] != cell[:-1, :]
    trunc = trunc_um / mpp
    od = np.stack(list(stain_channels(image, stain).values()), axis=-1).reshape(-1, 2)
    od = (od - od.mean(0)) / np.maximum(od.std(0), 1e-6) * colour_weight
    feats = np.concatenate([od, (np.minimum(dist, trunc) / trunc).reshape(-1, 1)], axis=1)
    rng = np.random.default_rng(seed)
    pick = rng.choice(len(feats), min(len(feats), 50000), replace=False)
    km = KMeans(n_clusters=3, n_init=3, random_state=seed).fit(feats[pick])
    cl = km.predict(feats).reshape(h, w)
    order = np.argsort(km.cluster_centers_[:, -1])  # by distance to the points
    disc = ndi.binary_dilation(seeds > 0, iterations=max(1, round(point_radius_um / mpp)))
    nuc = ((cl == order[0]) & ~edges) | disc
    nuc = ndi.binary_fill_holes(nuc) & ~edges
    bg = ((cl == order[2]) | edges) & ~disc
    labels = np.where(nuc, cell, 0)
    weight = (nuc | bg).astype(np.float32)
    return Sample(image, nuc.astype(np.float32), distance_target(labels), weight)


def fit_on_pseudo_masks(
    images: Sequence[np.ndarray],
    masks: Sequence[np.ndarray],
    cfg: RunConfig,
    *,
    stain: Stain = "he",
    device: torch.device | None = None,
    progress: Callable[[str, int, int], None] | None = None,
    init: Segmenter | None = None,
) -> Segmenter:
    """The label-free downstream fit, on a fixed schedule (no annotation, no checkpoint selection):

    1. train on the pseudo masks, split into nuclei by the distance watershed;
    2. ``refine_rounds`` times: the previous net's test-time-augmented maps on the same images
       give nucleus centres (``refine_points``: the peaks of its distance map, or the centroids of
       its instances), :func:`voronoi_sample` turns them into point-supervision targets, and a
       fresh net is trained on those;
    3. with ``ensemble`` (and at least one refinement), the result averages the first and the last
       net (:class:`SegEnsemble`), else it is the last net.

    ``init``: start round r from a copy of member r of this trained net or ensemble (the last
    member for later rounds) instead of random weights.

    ``images``: uint8 RGB at ``cfg.target_mpp`` (any sizes); ``masks``: their boolean pseudo masks.
    ``progress(stage, step, total)`` is called after every optimiser step.
    """
    from wsi_psm.segmenter.predict import predict_maps
    from wsi_psm.segmenter.readout import instances_from_maps

    if len(images) != len(masks) or not images:
        raise ValueError(
            "fit_on_pseudo_masks needs one pseudo mask per image, and at least one image"
        )
    sc = cfg.segmenter
    device = device or torch.device("cpu")
    mpp = cfg.target_mpp
    t0 = time.perf_counter()
    labels = pseudo_instances(masks, mpp=mpp, instance_cfg=cfg.instances)
    samples = [sample_from_labels(im, lab) for im, lab in zip(images, labels, strict=True)]
    del labels
    nets: list[SegNet] = []
    net: SegNet | None = None
    for rnd in range(sc.refine_rounds + 1):
        stage = "segmenter: pseudo masks" if rnd == 0 else f"segmenter: point refinement {rnd}"
        if net is not None:
            samples = []
            for i, im in enumerate(images):
                # the teacher's maps in the layout the shipped model was fitted with: a fit on
                # a CPU stays bit-reproducible (channels-last rounds differently, ~1e-5)
                maps = predict_maps(
                    net, im, device, window=sc.window_px, tta=True, amp=sc.amp,
                    channels_last=False,
                )  # fmt: skip
                if sc.refine_points == "peaks":
                    pts = distance_peaks(
                        maps, mpp=mpp, fg_threshold=TEACHER_READOUT["fg_threshold"]
                    )
                else:  # the plain threshold-marker read-out, as the shipped model was fit
                    plain = cfg.with_updates(
                        **{f"segmenter.{k}": v for k, v in TEACHER_READOUT.items()}
                    )
                    pts = label_centroids(instances_from_maps(maps, mpp=mpp, cfg=plain))
                samples.append(voronoi_sample(im, pts, mpp=mpp, stain=stain, seed=cfg.seed + i))

        def step(i: int, n: int, loss: float, stage: str = stage) -> None:
            if progress is not None:
                progress(stage, i, n)

        start = None
        if init is not None:
            members = list(init.members) if isinstance(init, SegEnsemble) else [init]
            start = copy.deepcopy(members[min(rnd, len(members) - 1)]).float()
        net = fit_segmenter(
            samples, width=sc.width, depth=sc.depth, steps=sc.fit_steps, batch=sc.fit_batch,
            crop=sc.fit_crop_px, lr=sc.lr, scale=tuple(sc.fit_scale), seed=cfg.seed + rnd,
            device=device, progress=step, init=start,
        )  # fmt: skip
        nets.append(net)
    out: Segmenter = SegEnsemble([nets[0], nets[-1]]) if sc.ensemble and len(nets) > 1 else nets[-1]
    out.fit_seconds = time.perf_counter() - t0  # type: ignore[attr-defined]
    return out.eval()
