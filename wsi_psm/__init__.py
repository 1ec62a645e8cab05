"""wsi-psm: label-free cell recognition on whole-slide images with prior self-activation maps."""

__version__ = "0.1.0"
