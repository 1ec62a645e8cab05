"""A fitted model bundle: activation net + PSM calibration + pseudo-mask clustering + run config +
provenance, saved as one file and loaded without executing code.

File format (``FORMAT_VERSION`` 1): ``torch.save`` of a plain dict holding only tensors, strings and
numbers, so it loads with ``torch.load(weights_only=True)``:

``{"format": "wsi-psm-model", "version": 1, "meta": <JSON string>, "net": {name: tensor},
"components": {name: {name: tensor}}}``

``meta`` holds the net's architecture, the PSM calibration (also in the net's buffers), the
pseudo-mask model's state, the RunConfig used to fit, provenance (what it was fitted on, when, library
versions) and one JSON entry per extra component. ``components`` is where later stages (e.g. the
downstream segmenter) add their weights without a format change; a loader keeps components it does
not know about, so an older reader round-trips a newer bundle's extras.
"""

from __future__ import annotations

import datetime as _dt
import io
import json
import platform
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from wsi_psm import __version__
from wsi_psm.atomic import torch_save_atomic
from wsi_psm.clustering import PseudoMaskModel, sample_tiles
from wsi_psm.config import RunConfig
from wsi_psm.errors import ModelError
from wsi_psm.psm.maps import compute_psm
from wsi_psm.psm.network import ActivationNet
from wsi_psm.psm.train import fit_activation_net
from wsi_psm.stain import Stain, detect_stain, estimate_stain_matrix

FORMAT = "wsi-psm-model"
FORMAT_VERSION = 1


def library_versions() -> dict[str, str]:
    import scipy
    import skimage
    import sklearn

    return {
        "wsi_psm": __version__,
        "torch": torch.__version__,
        "numpy": np.__version__,
        "scipy": scipy.__version__,
        "scikit-learn": sklearn.__version__,
        "scikit-image": skimage.__version__,
        "python": platform.python_version(),
    }


@dataclass
class ModelBundle:
    """Everything needed to turn tiles into nucleus pseudo masks, reproducibly.

    ``net`` and ``pseudo`` are None in a bundle fitted without its PSM stages (``fit_model`` with
    ``psm_needed`` false for its stain: the shipped network's route of ``run``, which uses nothing of
    them but the stain and its vectors, kept in ``stain_vectors``). Such a bundle serves the run it
    was made for and cannot be saved."""

    net: ActivationNet | None
    pseudo: PseudoMaskModel | None
    config: RunConfig
    provenance: dict[str, Any] = field(default_factory=dict)
    # Extra components added by later stages: weights (plain tensors) and JSON-able metadata.
    components: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    component_meta: dict[str, Any] = field(default_factory=dict)
    stain_vectors: tuple[Stain, np.ndarray] | None = None  # only where ``pseudo`` is None

    def __post_init__(self) -> None:
        if (self.net is None) != (self.pseudo is None) or (
            self.pseudo is None and self.stain_vectors is None
        ):
            raise ValueError("a bundle has both PSM stages, or neither and its stain vectors")

    @property
    def stain(self) -> Stain:
        return self.pseudo.stain if self.pseudo is not None else self.stain_vectors[0]  # type: ignore[index]

    @property
    def stain_matrix(self) -> np.ndarray:
        """The stain vectors (Macenko, estimated on the fit tiles) as rows."""
        if self.pseudo is not None:
            return self.pseudo.stain_matrix
        return self.stain_vectors[1]  # type: ignore[index]

    def psm_stages(self) -> tuple[ActivationNet, PseudoMaskModel]:
        """The activation net and the pseudo-mask model; ModelError where they were not fitted."""
        if self.net is None or self.pseudo is None:
            raise ModelError("this model was fitted without its PSM stages (no activation net)")
        return self.net, self.pseudo

    def psm(self, rgb_batch: np.ndarray, device: torch.device) -> np.ndarray:
        net, _ = self.psm_stages()
        return compute_psm(net, rgb_batch, device, stain=self.stain)

    def pseudo_masks(self, rgb_batch: np.ndarray, device: torch.device) -> np.ndarray:
        """Bool nucleus masks (B, H, W) for uint8 RGB tiles (B, H, W, 3) at ``config.target_mpp``."""
        rgb = np.asarray(rgb_batch)
        if rgb.ndim == 3:
            rgb = rgb[None]
        _, pseudo = self.psm_stages()
        psms = self.psm(rgb, device)
        return np.stack(
            [
                pseudo.predict(t, p if pseudo.needs_psm else None)
                for t, p in zip(rgb, psms, strict=True)
            ]
        )

    # ------------------------------------------------------------------------------ save / load
    def _meta(self) -> dict[str, Any]:
        net, pseudo = self.psm_stages()
        return {
            "net_arch": dict(net.arch),
            "psm_calibration": {
                "block_sign": net.block_sign.tolist(),
                "block_scale": net.block_scale.tolist(),
                "cam_lo": float(net.cam_lo),
                "cam_hi": float(net.cam_hi),
            },
            "pseudo_mask_model": pseudo.to_state(),
            "config": self.config.to_dict(),
            "provenance": self.provenance,
            "components": self.component_meta,
        }

    def save(self, path: str | Path) -> Path:
        """Write atomically (temporary file in the same folder, then rename)."""
        path = Path(path)
        meta = json.dumps(self._meta())  # first: a bundle without PSM stages raises ModelError
        payload = {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "meta": meta,
            "net": {k: v.detach().cpu().clone() for k, v in self.net.state_dict().items()},  # type: ignore[union-attr]
            "components": {
                name: {k: v.detach().cpu().clone() for k, v in state.items()}
                for name, state in self.components.items()
            },
        }
        return torch_save_atomic(payload, path)

    @classmethod
    def load(cls, path: str | Path, map_location: str | torch.device = "cpu") -> ModelBundle:
        """Load a bundle; any missing, unreadable, foreign or incompatible file raises ModelError."""
        path = Path(path)
        if not path.is_file():
            raise ModelError(f"model file not found: {path}")
        try:
            data = torch.load(
                io.BytesIO(path.read_bytes()), map_location=map_location, weights_only=True
            )
        except Exception as exc:  # torch raises many types for corrupt or non-torch files
            # torch's own text (an unpickling error advising weights_only=False, i.e. running
            # untrusted code) is no help here: the file is simply not one of ours
            raise ModelError(
                f"cannot read model file {path}: not a wsi-psm model file (one written by "
                f"`wsi-psm fit` or `segment --save-model`), or a damaged one ({type(exc).__name__})"
            ) from exc
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise ModelError(f"{path} is not a wsi-psm model file")
        version = data.get("version")
        if not isinstance(version, int) or version > FORMAT_VERSION:
            raise ModelError(
                f"{path} has model format version {version!r}; this wsi-psm reads up to {FORMAT_VERSION} (upgrade wsi-psm)"
            )
        try:
            meta = json.loads(data["meta"])
            net = ActivationNet(**meta["net_arch"])
            net.load_state_dict(data["net"], strict=True)
            net.eval()
            pseudo = PseudoMaskModel.from_state(meta["pseudo_mask_model"])
            config = RunConfig.model_validate(meta["config"])
            components = {str(k): dict(v) for k, v in data.get("components", {}).items()}
        except Exception as exc:
            raise ModelError(
                f"model file {path} is incomplete or inconsistent: {type(exc).__name__}: {exc}".splitlines()[
                    0
                ]
            ) from exc
        return cls(
            net=net,
            pseudo=pseudo,
            config=config,
            provenance=meta.get("provenance", {}),
            components=components,
            component_meta=meta.get("components", {}),
        )


def fit_model(
    tiles: Sequence[np.ndarray],
    config: RunConfig,
    *,
    device: torch.device,
    sources: Sequence[str] = (),
    progress: Callable[[int, int, float], None] | None = None,
    psm_needed: Callable[[Stain], bool] | None = None,
) -> ModelBundle:
    """Fit a bundle label-free on uint8 RGB tiles at ``config.target_mpp``: stain detection (unless
    the config fixes it), the activation net (on up to ``psm.fit_tiles`` tiles) and the pseudo-mask
    clustering (on the same tiles' pixels). ``sources`` names what the tiles came from (provenance).

    ``psm_needed(stain)`` false (default: always needed) stops after the stain and its vectors, the
    same Macenko estimate on the same tiles: a bundle without PSM stages, for a route that uses
    nothing else of them (the shipped network on H&E)."""
    if not tiles:
        raise ValueError("fit_model needs at least one tile")
    seed = config.seed
    fit_tiles = sample_tiles(list(tiles), config.psm.fit_tiles, seed)
    stain: Stain = detect_stain(fit_tiles, seed=seed) if config.stain == "auto" else config.stain
    started = _dt.datetime.now(_dt.timezone.utc)
    net: ActivationNet | None = None
    pseudo: PseudoMaskModel | None = None
    vectors = None
    if psm_needed is None or psm_needed(stain):
        net = fit_activation_net(
            fit_tiles, config.psm, seed=seed, device=device, progress=progress, stain=stain
        )
        psms = [compute_psm(net, t, device, stain=stain)[0] for t in fit_tiles]
        pseudo = PseudoMaskModel.fit(
            fit_tiles, psms, config.cluster, mpp=config.target_mpp, seed=seed, stain=stain
        )
    else:
        vectors = (stain, estimate_stain_matrix(fit_tiles, stain, seed=seed))
    provenance = {
        "fitted_on": list(sources),
        "n_tiles": len(fit_tiles),
        "tile_shapes": sorted({f"{t.shape[0]}x{t.shape[1]}" for t in fit_tiles}),
        "stain": stain,
        "psm": "fitted" if net is not None else "not fitted (the route uses no pseudo masks)",
        "seed": seed,
        "device": str(device),
        "created_utc": started.isoformat(timespec="seconds"),
        "fit_seconds": round((_dt.datetime.now(_dt.timezone.utc) - started).total_seconds(), 2),
        "versions": library_versions(),
    }
    return ModelBundle(
        net=net, pseudo=pseudo, config=config, provenance=provenance, stain_vectors=vectors
    )
