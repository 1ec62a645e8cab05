"""The one typed, frozen run configuration. It is written into every output so a run can be reproduced."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PositiveFloat, field_validator, model_validator


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class TissueConfig(_Frozen):
    thumb_mpp: float = Field(
        8.0, gt=0, description="resolution of the thumbnail the tissue mask is computed on"
    )
    min_area_um2: float = Field(
        20000.0, ge=0, description="tissue components smaller than this are dropped"
    )


class TileConfig(_Frozen):
    core_um: float = Field(
        256.0, gt=0, description="side of a tile's core (the part that owns cells), micrometres"
    )
    margin_um: float = Field(
        20.0, gt=0, description="overlap margin on each side; must exceed the largest nucleus"
    )
    batch_size: int = Field(
        8,
        ge=1,
        description="tiles per network batch; a GPU runs the batch in one forward, a CPU a few "
        "tiles at a time (up to 512² px per forward: large CPU forwards fault pages in)",
    )
    decode_workers: int = Field(
        0,
        ge=0,
        description="threads decoding tiles (Dask threaded scheduler); 0 = auto: 2 when the network "
        "runs on the CPU, a quarter of the cores (2 to 8) when it runs on a GPU",
    )
    prefetch_batches: int = Field(
        3, ge=1, description="decoded batches allowed in flight ahead of the network"
    )
    post_workers: int = Field(
        0, ge=0, description="workers turning network maps into cells; 0 = auto"
    )
    post_mode: Literal["auto", "threads", "processes"] = Field(
        "auto",
        description="post-processing in threads or processes; auto = processes when the network runs on a GPU",
    )


class PSMConfig(_Frozen):
    """Self-supervised activation network and prior self-activation map."""

    width: int = Field(16, ge=4, description="channels of the stem; shallow blocks use 2x")
    shallow_blocks: int = Field(
        2, ge=1, le=6, description="residual blocks the PSM is read from (stride 2)"
    )
    fit_tiles: int = Field(64, ge=1, description="tiles sampled from the tissue to fit the network")
    fit_steps: int = Field(300, ge=1, description="optimiser steps of the self-supervised fit")
    fit_batch: int = Field(16, ge=2)
    fit_crop_px: int = Field(64, ge=32, description="crop side used while fitting")
    lr: float = Field(2e-3, gt=0)
    colour_jitter: float = Field(
        0.0,
        ge=0,
        lt=1,
        description="per-view stain-intensity jitter while fitting (contrastive/similarity need > 0)",
    )
    task: Literal["rot180-similarity", "rotation", "contrastive", "stain-regression"] = (
        "stain-regression"
    )


class ClusterConfig(_Frozen):
    """Turning PSM + stain into nucleus pseudo masks (scikit-learn k-means)."""

    features: str = Field(
        "psm+h",
        pattern=r"^(psm|h|stain|rgb)(\+(psm|h|stain|rgb))*$",
        description="'+'-joined per-pixel k-means features: psm, h (haematoxylin), stain (both stains), rgb; without psm it is the ablation",
    )
    k: int = Field(2, ge=2, le=8)
    psm_weight: float = Field(0.25, gt=0, description="weight of the (standardised) PSM feature")
    smooth_um: float = Field(
        0.5, ge=0, description="Gaussian smoothing of the features before clustering"
    )
    sample_pixels: int = Field(200000, ge=1000, description="pixels sampled to fit the clustering")
    min_hole_um2: float = Field(
        16.0, ge=0, description="holes smaller than this inside a nucleus are filled"
    )
    min_object_um2: float = Field(
        0.0, ge=0, description="mask specks smaller than this are removed"
    )
    max_stage_region_um2: float = Field(
        3000.0,
        gt=0,
        description="H-DAB: a DAB-stage region larger than this (ten of the largest nuclei) is "
        "membranous or cytoplasmic staining, not stained nuclei: its pixels go to the "
        "haematoxylin stage, which finds the nuclei inside it",
    )


class InstanceConfig(_Frozen):
    min_area_um2: float = Field(8.0, ge=0, description="smaller objects are dropped (debris)")
    max_area_um2: float = Field(
        300.0, gt=0, description="larger objects are dropped (not a nucleus)"
    )
    split_min_distance_um: float = Field(
        2.5, gt=0, description="minimum distance between two nucleus seeds"
    )


class ClassConfig(_Frozen):
    """Label-free cell classes (classes.py): IHC positive/negative by nuclear DAB, H&E nucleus groups."""

    enabled: bool = Field(True, description="name cells by class; false: every cell is 'Nucleus'")
    estimate_stain_matrix: bool = Field(
        True,
        description="estimate the stain vectors per slide/cohort (Macenko); false: fixed Ruifrok vectors",
    )
    ring_um: float = Field(
        1.0, gt=0, description="width of the ring measured just outside each nucleus"
    )
    dab_floor_od: float = Field(
        0.15,
        ge=0,
        description="nuclear DAB OD mean below which no nucleus is positive (stain leakage bound)",
    )
    marker: str = Field(
        "ki67",
        pattern=r"^[a-z0-9_]+$",
        description="IHC marker; the summary index is '<marker>_index'",
    )
    max_groups: int = Field(
        3, ge=1, le=4, description="H&E: most nucleus groups (1 = 'Nucleus' only)"
    )
    min_group_fraction: float = Field(
        0.05, ge=0, lt=0.5, description="H&E: smallest share of cells a group may hold"
    )
    group_criterion: Literal["bic", "icl"] = Field(
        "bic",
        description="H&E: how many groups: 'bic' (phenotype tiers) or 'icl' (only clearly separate groups)",
    )
    fit_max_cells: int = Field(
        20000, ge=100, description="cells sampled from the fit tiles to fit the classes"
    )
    pale_ratio: float | None = Field(
        3.0,
        gt=1,
        description="H&E: objects whose nuclear haematoxylin forms a mode of its own under "
        "1/pale_ratio of the nuclei's are not nuclei (e.g. stroma fragments) and are not written; "
        "null keeps every object",
    )
    max_ink_fraction: float | None = Field(
        0.3,
        gt=0,
        le=1,
        description="H&E: objects with at least this share of their pixels in marking-ink colours "
        "(yellow-green to cyan, hues no H&E stain makes) are not nuclei and are not written; "
        "null keeps them",
    )


class SegmenterConfig(_Frozen):
    """Downstream segmentation network (small U-Net trained on the pseudo masks) and its read-out."""

    width: int = Field(
        16, ge=4, description="U-Net channels at full resolution (doubling per level)"
    )
    depth: int = Field(3, ge=1, le=5, description="U-Net downsamplings")
    fit_steps: int = Field(600, ge=1, description="optimiser steps per training round")
    fit_batch: int = Field(8, ge=1)
    fit_crop_px: int = Field(128, ge=32, description="crop side used while training")
    lr: float = Field(2e-3, gt=0)
    fit_scale: tuple[PositiveFloat, PositiveFloat] = Field(
        (0.8, 1.25),
        description="range (low, high) of the random scale applied to training crops "
        "(log-uniform; the crop window read grows as 1 / low). Wider ranges were measured: "
        "[0.5, 2] and [0.6, 1.6] lost dev AJI (benchmarks/README.md)",
    )
    refine_rounds: int = Field(
        1, ge=0, description="point/Voronoi refinement rounds after training on the pseudo masks"
    )
    refine_points: Literal["peaks", "instances"] = Field(
        "instances",
        description="refinement teacher points: distance-map peaks, or centroids of the instances",
    )
    init: Literal["scratch", "shipped"] = Field(
        "scratch",
        description="fits start from random weights, or from the shipped H&E network's (each "
        "round from the matching member; same architecture required)",
    )
    ensemble: bool = Field(
        True, description="keep and average the pseudo-mask net and the last refined net"
    )
    tta: bool = Field(
        False,
        description="average the 8 rotations/flips at inference (8x the network time for about "
        "+0.003 AJI on MoNuSeg, hence off)",
    )
    amp: bool = Field(True, description="float16 autocast at inference on CUDA")
    window_px: int = Field(
        1024,
        ge=128,  # windows overlap by 64 px: a 64-px window would keep nothing of itself
        description="inference window (processing px) for large images: larger ones go in "
        "windows overlapping by 64 px (1024: a 1000² image magnified 2x goes whole, where 512 "
        "made 9 windows, 2.4x the pixels; peak memory on a CPU about 0.55 GB more)",
    )
    fg_threshold: float = Field(
        0.45,
        gt=0,
        lt=1,
        description="nucleus probability threshold (with shrink_um: a lower threshold, then the "
        "halo trimmed)",
    )
    marker_threshold: float = Field(
        0.5, gt=0, lt=1, description="normalised distance above which a pixel seeds a nucleus"
    )
    marker_h: float = Field(
        0.02,
        ge=0,
        lt=1,
        description="also seed every distance peak at least this high above its surroundings (0: off)",
    )
    shrink_um: float = Field(
        0.25,
        ge=0,
        description="take off every nucleus pixel whose centre lies within this many µm of the "
        "nucleus's edge (the pseudo masks' halo); none at pixels of 2x this or more",
    )
    merge_solidity: float = Field(
        0.96,
        ge=0,
        le=1,
        description="merge touching nuclei whose union is at least this convex (pixels / pixels "
        "of its convex hull; 0: off): one nucleus cut in pieces by a spurious marker",
    )
    default_model: Literal["shipped", "fit", "none"] = Field(
        "shipped",
        description="without --model: 'shipped' = the packaged H&E network (IHC, which it was not "
        "trained on, gets a network fitted on the images/slide), 'fit' = always fit one on the "
        "images/slide, 'none' = no network: cells from the PSM pseudo masks (fastest)",
    )
    zoom_check: bool = Field(
        True,
        description="with the shipped network: also run it on the tissue magnified 2x and keep that "
        "when it finds the same nuclei better resolved (as many to 2.5x as many): small crowded "
        "nuclei. segment decides per image (5x the network time); run judges 8 sampled tiles and, "
        "when most are resolved at 2x, runs every tile at both scales and decides per tile (5x "
        "the network time, 5x the read-out pixels); otherwise 1x alone. Fitted networks: not "
        "applied (they average fitted_scales instead)",
    )
    native_instances: bool = Field(
        True, description="segment: separate instances at the input's resolution (maps upsampled)"
    )
    # at most 2x: magnified further the nets cut ordinary nuclei into pieces (2x already does,
    # benchmarks/README.md), and a CPU forward of a 1024-px window costs a peak RSS of 3.7 GB at
    # 2x but 13.9 GB at 4x (the pixels squared)
    fitted_scales: list[Annotated[float, Field(gt=0.25, le=2)]] = Field(
        [1.0, 1.41],
        min_length=1,
        description="networks other than the shipped one (fitted on IHC images or slides, or at "
        "another resolution; --model with other weights): the tissue is shown magnified by each "
        "factor (1.0: as it is) and the maps are averaged (a larger view parts touching nuclei; "
        "the shipped network has the magnification check instead). [1.0, 1.41]: 3x the network "
        "time; a network fitted on the "
        "17 MoNuSeg dev images: AJI 0.440 -> 0.448; BCData: mean F1 0.729 -> 0.743 "
        "(benchmarks/README.md); [1.0]: off",
    )

    @model_validator(mode="after")
    def _scale_range(self) -> SegmenterConfig:
        if self.fit_scale[0] > self.fit_scale[1]:
            raise ValueError(f"segmenter.fit_scale must be (low, high), got {self.fit_scale}")
        if len(set(self.fitted_scales)) < len(self.fitted_scales):  # the same maps twice: no gain
            raise ValueError(f"segmenter.fitted_scales repeats a factor: {self.fitted_scales}")
        return self


# the processing resolutions a run may take (µm/px): beyond 2 a nucleus is a few pixels wide
TARGET_MPP_RANGE = (0.1, 2.0)


class RunConfig(_Frozen):
    """Every setting of a run, immutable: ``RunConfig()`` is the default, ``RunConfig.load(path)``
    reads a JSON file (schemas/config.schema.json), ``cfg.with_updates(**{"tiles.batch_size": 8})``
    returns a changed copy (dotted names reach the sections), ``cfg.to_dict()`` is what
    summary.json records."""

    target_mpp: float = Field(
        0.5,
        ge=TARGET_MPP_RANGE[0],
        le=TARGET_MPP_RANGE[1],
        description="processing resolution, micrometres per pixel (beyond 2 a nucleus is a few pixels)",
    )
    # below 2**31: per-image and per-round seeds are this plus an offset, and scikit-learn takes
    # only seeds under 2**32
    seed: int = Field(0, ge=0, lt=2**31, description="random seed (fits are deterministic on CPU)")
    device: str = Field("auto", description="auto | cpu | cuda | cuda:N | mps")
    stain: Literal["auto", "he", "ihc-dab"] = "auto"
    geojson_gzip: bool = Field(False, description="write cells.geojson.gz instead of cells.geojson")
    tissue: TissueConfig = TissueConfig()
    tiles: TileConfig = TileConfig()
    psm: PSMConfig = PSMConfig()
    cluster: ClusterConfig = ClusterConfig()
    instances: InstanceConfig = InstanceConfig()
    classes: ClassConfig = ClassConfig()
    segmenter: SegmenterConfig = SegmenterConfig()

    @field_validator("device")
    @classmethod
    def _device_name(cls, v: str) -> str:
        # the spelling is checked here, before any work (whether the device exists is checked
        # when the run starts, by wsi_psm.device.select_device)
        name = v.strip().lower()
        if not re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", name):
            raise ValueError(f"unknown device {v!r}: use auto, cpu, cuda, cuda:N or mps")
        return name

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def with_updates(self, **changes: Any) -> RunConfig:
        """A copy with top-level or dotted-path changes, e.g. ``{"tiles.batch_size": 4}``; None values are ignored."""
        data = self.to_dict()
        for key, value in changes.items():
            if value is None:
                continue
            node = data
            *parents, leaf = key.split(".")
            for p in parents:
                node = node[p]
            node[leaf] = value
        return RunConfig.model_validate(data)

    @classmethod
    def load(cls, path: str | Path) -> RunConfig:
        return cls.model_validate(json.loads(Path(path).read_text()))
