"""Pseudo-mask quality on MoNuSeg: PSM + stain clustering against stain alone (the PSM ablation).

Protocol (label-free; the annotations are read only to score):

- every image is resampled from its own resolution (XML ``MicronsPerPixel``, else 0.25 um/px) to the
  processing resolution ``RunConfig.target_mpp`` (0.5 um/px: 1000 px -> ~500 px);
- the activation net is fitted on the 17 images WITHOUT XML annotations (never on the 13 scored
  images), then calibrated there; its PSM is computed for all 30 images;
- the k-means pseudo-mask model is fitted either per image ("slide" mode: each MoNuSeg image comes
  from a different slide, and the pipeline fits one clustering per slide, on that slide's own
  pixels, without labels) or once on the 17 unscored images ("cohort" mode: one model applied to
  slides it never saw);
- each mask is upsampled (nearest) to the original 1000 x 1000 grid and scored by pixel F1 against
  the XML polygons of the 13 annotated images.

Variants: the configured clustering (default RunConfig().cluster) and the same with other feature
sets, e.g. ``h`` (haematoxylin only: the no-PSM ablation), ``psm`` (PSM only), ``rgb``/``psm+rgb``
(the reference's colour features), plus the classical floor (Otsu on smoothed haematoxylin).
Also measured: fit time and PSM throughput on 512 x 512 tiles (batch 8).

    .venv/bin/python benchmarks/pseudo_masks.py [--data ../shared/data/monuseg-train] [--task T]
        [--steps N] [--seed S] [--modes slide,cohort] [--json out.json]

About 4-8 minutes on 2 shared CPU cores.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import tifffile
import torch
from scipy import ndimage as ndi
from skimage.filters import threshold_otsu
from skimage.transform import resize
from sklearn.metrics import roc_auc_score

from wsi_psm.allocator import tune_malloc
from wsi_psm.clustering import PseudoMaskModel
from wsi_psm.config import ClusterConfig, RunConfig
from wsi_psm.groundtruth import load_monuseg_xml, monuseg_cases, monuseg_mpp
from wsi_psm.metrics import pixel_f1
from wsi_psm.psm.maps import compute_psm
from wsi_psm.psm.network import ActivationNet
from wsi_psm.psm.train import fit_activation_net
from wsi_psm.stain import estimate_stain_matrix, stain_channels

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "monuseg-train"
FALLBACK_MPP = 0.25


def read_rgb(path: Path) -> np.ndarray:
    return np.ascontiguousarray(tifffile.imread(path)[..., :3])


def to_target(rgb: np.ndarray, mpp: float, target: float) -> np.ndarray:
    h, w = (round(n * mpp / target) for n in rgb.shape[:2])
    if (h, w) == rgb.shape[:2]:
        return rgb
    out = resize(rgb, (h, w), anti_aliasing=True, preserve_range=True)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def upsample(mask: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    return resize(
        mask.astype(np.uint8), shape, order=0, preserve_range=True, anti_aliasing=False
    ).astype(bool)


def otsu_floor(rgb: np.ndarray, mpp: float) -> np.ndarray:
    """Classical reference: Otsu threshold on Macenko haematoxylin smoothed by sigma 0.5 um."""
    h = stain_channels(rgb, "he", estimate_stain_matrix(rgb))["haematoxylin"]
    h = ndi.gaussian_filter(h, 0.5 / mpp)
    return h > threshold_otsu(h)


def psm_throughput(
    net, device: torch.device, images: list[np.ndarray], batch: int = 8, n_batches: int = 3
) -> float:
    """512 x 512 tiles per second through compute_psm (crops of the processing-resolution images)."""
    rng = np.random.default_rng(0)
    crops = []
    for i in range(batch * n_batches):
        im = images[i % len(images)]
        if min(im.shape[:2]) < 512:
            im = np.pad(
                im,
                ((0, max(0, 512 - im.shape[0])), (0, max(0, 512 - im.shape[1])), (0, 0)),
                mode="reflect",
            )
        y, x = rng.integers(im.shape[0] - 511), rng.integers(im.shape[1] - 511)
        crops.append(im[y : y + 512, x : x + 512])
    compute_psm(net, np.stack(crops[:2]), device)  # warm-up
    t, c = time.perf_counter(), time.process_time()
    for i in range(n_batches):
        compute_psm(net, np.stack(crops[i * batch : (i + 1) * batch]), device)
    n = batch * n_batches
    return n / (time.perf_counter() - t), (time.process_time() - c) / n


def _variant(base: ClusterConfig, spec: str) -> ClusterConfig:
    feats, *rest = spec.split(":")
    upd: dict = {"features": feats}
    if rest:
        upd["k"] = int(rest[0])
    if len(rest) > 1:
        upd["psm_weight"] = float(rest[1])
    return ClusterConfig.model_validate({**base.model_dump(), **upd})


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--task", default=None, help="override PSMConfig.task")
    ap.add_argument("--steps", type=int, default=None, help="override PSMConfig.fit_steps")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--modes", default="slide,cohort")
    ap.add_argument(
        "--variants",
        default="h,psm,psm+h:2:1,stain:3,psm+stain:3:1,rgb:3,psm+rgb:3:1",
        help="extra clustering variants besides the configured one: FEATURES[:K[:PSM_WEIGHT]]",
    )
    ap.add_argument(
        "--cache",
        type=Path,
        default=None,
        help="folder to keep the fitted net in (reused when config and seed match)",
    )
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    tune_malloc()  # as the CLI does
    torch.set_num_threads(args.threads)
    device = torch.device("cpu")

    cfg = RunConfig(seed=args.seed)
    upd = {"psm.task": args.task, "psm.fit_steps": args.steps}
    cfg = cfg.with_updates(**upd)
    target = cfg.target_mpp

    cases = monuseg_cases(args.data)
    scored = [c for c in cases if c.has_xml]
    fit_cases = [c for c in cases if not c.has_xml]
    if not scored or not fit_cases:
        print(f"MoNuSeg data not found or incomplete under {args.data}", file=sys.stderr)
        return 1
    mpps = {
        c.stem: (monuseg_mpp(c.annotation) if c.has_xml else None) or FALLBACK_MPP for c in cases
    }
    rgb = {c.stem: to_target(read_rgb(c.image), mpps[c.stem], target) for c in cases}
    gt = {c.stem: load_monuseg_xml(c.annotation) > 0 for c in scored}
    fit_tiles = [rgb[c.stem] for c in fit_cases]

    print(f"processing at {target} um/px; net: {cfg.psm.model_dump()}")
    cached = None
    if args.cache:
        key = hashlib.sha1(
            json.dumps([cfg.psm.model_dump(), cfg.seed, target]).encode()
        ).hexdigest()[:12]
        cached = args.cache / f"psm-net-{key}.pt"
    if cached is not None and cached.exists():
        blob = torch.load(cached, weights_only=True)
        net = ActivationNet(**json.loads(blob["arch"]))
        net.load_state_dict(blob["state"])
        fit_s, fit_cpu = float(blob["fit_s"]), float(blob.get("fit_cpu", float("nan")))
        print(f"(net loaded from {cached})")
    else:
        t, c = time.perf_counter(), time.process_time()
        net = fit_activation_net(fit_tiles, cfg.psm, seed=cfg.seed, device=device, stain="he")
        fit_s, fit_cpu = time.perf_counter() - t, time.process_time() - c
        if cached is not None:
            cached.parent.mkdir(parents=True, exist_ok=True)
            torch.save(
                {"arch": json.dumps(net.arch), "state": net.state_dict(), "fit_s": fit_s}, cached
            )
    t = time.perf_counter()
    psm = {s: compute_psm(net, im, device)[0] for s, im in rgb.items()}
    psm_s = time.perf_counter() - t
    tput, psm_cpu = psm_throughput(net, device, fit_tiles)
    print(
        f"fit: {fit_s:.1f} s wall, {fit_cpu:.1f} s CPU on {len(fit_tiles)} images ({cfg.psm.fit_steps} steps, "
        f"{torch.get_num_threads()} threads); PSM: {psm_s / len(rgb):.2f} s per image, {tput:.2f} tiles/s "
        f"at 512x512 (batch 8), {psm_cpu:.2f} CPU s per tile; load average {os.getloadavg()[0]:.1f} "
        "(wall times on a shared machine vary several-fold)"
    )

    # PSM quality on its own: ROC AUC of the map against the annotation (at the processing grid),
    # next to the haematoxylin OD it should add to.
    auc_psm, auc_h = [], []
    for c in scored:
        g = (
            resize(gt[c.stem].astype(np.float32), psm[c.stem].shape, order=1, anti_aliasing=True)
            > 0.5
        )
        h = stain_channels(rgb[c.stem], "he", estimate_stain_matrix(rgb[c.stem]))["haematoxylin"]
        auc_psm.append(roc_auc_score(g.ravel(), psm[c.stem].ravel()))
        auc_h.append(roc_auc_score(g.ravel(), ndi.gaussian_filter(h, 0.5 / target).ravel()))
    print(
        f"pixel ROC AUC vs annotation: PSM {np.mean(auc_psm):.3f}, haematoxylin OD (sigma 0.5 um) {np.mean(auc_h):.3f}"
    )

    variants = [cfg.cluster] + [_variant(cfg.cluster, v) for v in args.variants.split(",") if v]
    results: dict[str, dict[str, float]] = {}

    def score(name: str, masks: dict[str, np.ndarray]) -> None:
        results[name] = {s: pixel_f1(upsample(m, gt[s].shape), gt[s]) for s, m in masks.items()}

    score(
        "otsu-haematoxylin (classical floor)",
        {c.stem: otsu_floor(rgb[c.stem], target) for c in scored},
    )
    for mode in args.modes.split(","):
        for i, ccfg in enumerate(variants):
            feats = ccfg.features
            needs = "psm" in feats.split("+")
            masks = {}
            if mode == "cohort":
                model = PseudoMaskModel.fit(
                    fit_tiles,
                    [psm[c.stem] for c in fit_cases] if needs else None,
                    ccfg,
                    mpp=target,
                    seed=cfg.seed,
                    stain="he",
                )
            for c in scored:
                if mode == "slide":
                    model = PseudoMaskModel.fit(
                        [rgb[c.stem]],
                        [psm[c.stem]] if needs else None,
                        ccfg,
                        mpp=target,
                        seed=cfg.seed,
                        stain="he",
                    )
                masks[c.stem] = model.predict(rgb[c.stem], psm[c.stem] if needs else None)
            w = f", w={ccfg.psm_weight:g}" if needs else ""
            score(f"{mode}: {feats}, k={ccfg.k}{w}{' (configured)' if i == 0 else ''}", masks)

    stems = [c.stem for c in scored]
    width = max(len(n) for n in results)
    print("\npixel F1 per image (13 MoNuSeg training images with XML; the net never saw them)")
    print(f"{'variant':{width}s} " + " ".join(f"{s[5:12]:>7s}" for s in stems) + f" {'MEAN':>6s}")
    for name, r in results.items():
        print(
            f"{name:{width}s} "
            + " ".join(f"{r[s]:7.3f}" for s in stems)
            + f" {np.mean(list(r.values())):6.3f}"
        )
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "config": cfg.to_dict(),
                    "fit_seconds": fit_s,
                    "fit_cpu_seconds": fit_cpu,
                    "psm_cpu_seconds_per_512_tile": psm_cpu,
                    "psm_seconds_per_image": psm_s / len(rgb),
                    "psm_tiles_per_second_512": tput,
                    "psm_auc": float(np.mean(auc_psm)),
                    "haematoxylin_auc": float(np.mean(auc_h)),
                    "pixel_f1": results,
                    "mean_pixel_f1": {
                        k: float(np.mean(list(v.values()))) for k, v in results.items()
                    },
                },
                indent=1,
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
