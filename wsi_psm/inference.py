"""Applying a fitted model bundle to tiles: the pipeline's TilePredictor and CellAnnotator.

Two routes: the bundle's downstream network when it has one (NetworkPredictor), else the PSM
pseudo masks split by the watershed (PSMPredictor). Each has a picklable CPU half (labeller) that
post-processing workers receive instead of the network.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from .classes import CLASSES_COMPONENT, CellClassifier
from .clustering import PseudoMaskModel
from .config import RunConfig
from .instances import split_instances
from .model import ModelBundle
from .networks import bundle_segmenter, is_shipped_network, network_scales
from .pipeline import CellAnnotator, ShapeOnly, TilePredictor
from .psm.maps import compute_psm
from .psm.network import ActivationNet
from .segmenter.network import Segmenter
from .segmenter.predict import SegmenterPredictor
from .segmenter.readout import MapsLabeller


class PseudoMaskLabeller:
    """The CPU half of PSMPredictor (picklable: sent to post-processing workers)."""

    def __init__(self, pseudo: PseudoMaskModel, cfg: RunConfig) -> None:
        self.pseudo = pseudo
        self.cfg = cfg

    def labels(self, image: np.ndarray, raw: np.ndarray | None) -> np.ndarray:
        fg = self.pseudo.predict(image, raw)
        return split_instances(fg, mpp=self.cfg.target_mpp, cfg=self.cfg.instances)


class PSMPredictor:
    """Cells straight from the PSM pseudo masks: PSM on the device, clustering + watershed on the CPU."""

    def __init__(
        self, net: ActivationNet, pseudo: PseudoMaskModel, device: torch.device, cfg: RunConfig
    ) -> None:
        self.net = net.to(device).eval()
        self.pseudo = pseudo
        self.device = device
        self.cfg = cfg
        self.needs_psm = pseudo.cfg.features != "stain"

    def network(self, images: np.ndarray) -> list[np.ndarray | None]:
        if not self.needs_psm:
            return [None] * len(images)
        return list(compute_psm(self.net, images, self.device, stain=self.pseudo.stain))

    def labeller(self) -> PseudoMaskLabeller:
        return PseudoMaskLabeller(self.pseudo, self.cfg)

    def labels(self, image: np.ndarray, raw: np.ndarray | None) -> np.ndarray:
        return self.labeller().labels(image, raw)


class NetworkPredictor(SegmenterPredictor):
    """Cells from the downstream network: maps on the device, watershed read-out on the CPU.
    ``shipped``: the net has the shipped network's weights (:func:`is_shipped_network`, judged
    once by :func:`make_predictor`), so the slide gets the magnification check."""

    def __init__(
        self,
        net: Segmenter,
        device: torch.device,
        cfg: RunConfig,
        *,
        scales: Sequence[float] = (1.0,),
        shipped: bool = False,
    ) -> None:
        super().__init__(net, device, cfg, scales=scales)
        self.shipped = shipped

    def labeller(self) -> MapsLabeller:
        return MapsLabeller(self.cfg)


def make_predictor(
    bundle: ModelBundle, *, device: torch.device, cfg: RunConfig
) -> tuple[TilePredictor, CellAnnotator, Callable[[dict[str, int]], dict[str, Any]] | None]:
    """The predictor, the cell annotator and the summary-indices hook for a bundle."""
    net = bundle_segmenter(bundle)
    predictor: TilePredictor
    if net is None:
        predictor = PSMPredictor(*bundle.psm_stages(), device, cfg)
    else:
        # (a digest of the weights, on the CPU: before the net goes to the device; the shipped
        # network's magnification check runs in pipeline.process_slide)
        shipped = is_shipped_network(net)
        scales = network_scales(shipped, cfg)
        predictor = NetworkPredictor(net, device, cfg, scales=scales, shipped=shipped)
    state = bundle.component_meta.get(CLASSES_COMPONENT)
    if state is None or not cfg.classes.enabled:
        return predictor, ShapeOnly(), None
    clf = CellClassifier.from_state(state)
    return predictor, clf, clf.indices
