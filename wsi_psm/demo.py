"""The demo: a small pyramidal slide built from a real IHC field that scikit-image ships, run end to end.

``skimage.data.immunohistochemistry()`` (colonic glands, DAB + haematoxylin, 512 x 512) is upsampled
to 1024 x 1024 and written as a tiled, 3-level pyramidal TIFF at 0.25 µm/px with its resolution in the
TIFF tags, so the demo exercises the real reader, level choice, tiling (2 x 2 tiles, seams) and writers,
without any download.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import tifffile
from PIL import Image

from .atomic import write_error
from .config import RunConfig
from .counts_table import check_counts_table, write_slides_table
from .errors import OutputExistsError
from .pipeline import SlideRun, process_slide
from .progress import ProgressHook

DEMO_MPP = 0.25
# 128-µm tile cores so the small slide still has seams; no downstream network, because an IHC slide
# would otherwise get one trained on it (about 10 minutes on 2 CPU cores): the demo shows the pipe,
# `segmenter.default_model` decides the accuracy/time trade-off for real runs
DEMO_CONFIG = RunConfig().with_updates(
    **{"tiles.core_um": 128.0, "segmenter.default_model": "none"}
)


def write_demo_slide(path: str | Path) -> Path:
    """Write the demo slide (pyramidal tiled TIFF, 1024 px at 0.25 µm/px, levels /1 /2 /4)."""
    from skimage import data

    base = Image.fromarray(data.immunohistochemistry())
    level0 = np.asarray(base.resize((1024, 1024), Image.Resampling.BICUBIC))
    path = Path(path)
    res = (1e4 / DEMO_MPP, 1e4 / DEMO_MPP)  # px per cm
    with tifffile.TiffWriter(path) as tif:
        img = level0
        for level in range(3):
            tif.write(
                img,
                tile=(256, 256),
                photometric="rgb",
                compression="jpeg",
                subfiletype=0 if level == 0 else 1,
                resolution=(res[0] / 2**level, res[1] / 2**level),
                resolutionunit="CENTIMETER",
                metadata=None,
            )
            h, w = img.shape[:2]
            img = np.asarray(Image.fromarray(img).resize((w // 2, h // 2), Image.Resampling.BOX))
    return path


def run_demo(
    out_root: str | Path, *, overwrite: bool = False, progress: ProgressHook | None = None
) -> tuple[SlideRun, Path]:
    """Write the demo slide into ``out_root`` and process it into ``out_root/demo-ihc``."""
    out_root = Path(out_root)
    out_dir = out_root / "demo-ihc"
    if out_dir.exists() and not overwrite:  # before the demo slide is (re)written
        raise OutputExistsError(f"output exists: {out_dir} (use --overwrite to replace it)")
    check_counts_table(out_root)
    try:
        out_root.mkdir(parents=True, exist_ok=True)
        slide = write_demo_slide(out_root / "demo-ihc.tiff")
    except OSError as err:
        raise write_error(err, out_root) from err
    res = process_slide(slide, out_dir, DEMO_CONFIG, overwrite=overwrite, progress=progress)
    try:  # as `run` does: the cohort table beside the slide's folder
        write_slides_table(out_root, [out_dir.name])
    except OSError as err:
        raise write_error(err, out_root) from err
    return res, slide
