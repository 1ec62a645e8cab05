"""Errors a user can act on. The CLI prints ``str(error)`` as one line and exits non-zero."""

from __future__ import annotations


class WsiPsmError(Exception):
    """Base of every expected failure (bad input, missing metadata, unwritable output)."""

    exit_code = 2


class InvalidArgumentError(WsiPsmError, ValueError):
    """A value the caller passed is out of range (a ValueError to library callers, one line in the CLI)."""


class SlideOpenError(WsiPsmError):
    """The file is missing, is not a slide, or cannot be decoded."""


class SlideReadError(WsiPsmError):
    """The slide opened but a region could not be decoded (truncated or corrupt data)."""


class MissingMppError(WsiPsmError):
    """No usable resolution in the metadata and none given with --mpp."""


class UnsupportedSlideError(WsiPsmError):
    """A readable slide this tool deliberately does not process (e.g. fluorescence)."""


class NoTissueError(WsiPsmError):
    """The tissue detector found nothing to process."""


class NoNucleiError(WsiPsmError):
    """A label-free fit found too few nucleus-like objects in its pseudo masks to learn from."""


class SlideTooSmallError(WsiPsmError):
    """The slide (at the processing resolution) is smaller than the network's minimum input."""


class OutputExistsError(WsiPsmError):
    """The output folder already exists and --overwrite was not given."""


class OutputWriteError(WsiPsmError):
    """The output could not be written (read-only or full disk)."""


class MixedStainError(WsiPsmError):
    """One model was asked to fit slides of more than one stain (its stages assume one)."""


class StainMismatchError(WsiPsmError):
    """A slide's stain is not the one the model given for it was fitted on."""


class ClusterStartError(WsiPsmError):
    """A local Dask cluster for a batch run could not be started."""


class ModelError(WsiPsmError):
    """A model file is missing, unreadable, or incompatible."""
