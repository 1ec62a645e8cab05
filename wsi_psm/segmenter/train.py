"""Training the downstream network on pseudo instance labels, label-free.

Targets come from instance labels (pseudo masks split into nuclei, or a previous round's own
predictions): the foreground, and each nucleus's distance to its edge normalised to 1 at its centre.
A per-pixel weight lets uncertain pixels (where a previous round hesitated) be ignored.

The training crops and their augmentation are :mod:`wsi_psm.segmenter.crops`'s.

Seeded: crops and jitter come from a numpy Generator and the weights from a forked torch RNG, so a
fit with the same seed, data and config gives the same weights on CPU. On a GPU the crops are made
on the device (:class:`DeviceCrops`: its noise from a torch Generator, another float path).
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Callable, Sequence

import numpy as np
import torch
from scipy import ndimage as ndi
from torch.nn import functional as F

from wsi_psm.config import InstanceConfig, RunConfig
from wsi_psm.errors import NoNucleiError
from wsi_psm.instances import split_instances
from wsi_psm.psm.train import one_cycle
from wsi_psm.segmenter.crops import DeviceCrops, Sample, sample_batch
from wsi_psm.segmenter.network import DIST, FG, SegEnsemble, Segmenter, SegNet
from wsi_psm.stain import Stain, stain_channels

log = logging.getLogger(__name__)

Progress = Callable[[int, int, float], None]


# The read-out that gives the refinement's teacher points: fixed (not the inference defaults, which
# were tuned later on the finished net), so the shipped model stays what this fit makes.
TEACHER_READOUT = {"fg_threshold": 0.5, "marker_h": 0.0, "shrink_um": 0.0, "merge_solidity": 0.0}


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


def _fits_on_device(samples: Sequence[Sample], device: torch.device) -> bool:
    """Whether the samples take under a quarter of ``device``'s free memory (CUDA; other devices:
    yes). A fit on thousands of large images makes its crops on the CPU instead."""
    if device.type != "cuda":
        return True
    free, _ = torch.cuda.mem_get_info(device)
    need = sum(s.nbytes for s in samples)
    if need <= free / 4:
        return True
    log.info("training crops made on the CPU: the samples (%.1f GB) would take over a quarter "
             "of the GPU's free memory", need / 1e9)  # fmt: skip
    return False


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
    device_crops: bool | None = None,
) -> SegNet:
    """Train a :class:`SegNet` (or continue ``init``) on ``samples``: Adam, one-cycle cosine lr.

    ``device_crops``: make the crops on ``device`` (:class:`DeviceCrops`); None = on any device but
    the CPU, when the samples fit in a quarter of its free memory."""
    device = device or torch.device("cpu")
    if not samples:
        raise ValueError("fit_segmenter needs at least one training sample")
    rng = np.random.default_rng(seed)
    if device_crops is None:
        device_crops = device.type != "cpu" and _fits_on_device(samples, device)
    crops = DeviceCrops(samples, device, seed=seed) if device_crops else None
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = init if init is not None else SegNet(width=width, depth=depth)
    # channels-last: one step at batch 8 of 128² crops trains ~1.35x faster in it, on 2 CPU cores
    # (oneDNN: 175 -> 125 ms) as on an H200 (cuDNN: 10.7 -> 8.1 ms); another float path than the
    # plain layout, so a fit's weights are not bit-identical across the two (the shipped file
    # predates it). Other devices (MPS) keep the plain layout: not measured there.
    layout = torch.channels_last if device.type in ("cpu", "cuda") else torch.contiguous_format
    net = net.to(device).to(memory_format=layout).train()
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    sched = one_cycle(opt, lr, steps)
    t0 = time.perf_counter()
    for step in range(steps):
        if crops is not None:
            x, y = crops.batch(rng, batch, crop, colour=colour, scale=scale)
        else:
            x, y = sample_batch(
                samples, rng, batch, crop, colour=colour, scale=scale, device=device
            )
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
    from wsi_psm.clustering import fit_kmeans, one_openmp_thread

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
    km = fit_kmeans(feats[pick], 3, n_init=3, seed=seed)
    with one_openmp_thread():
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
