"""The ``wsi-psm`` command line (installed as ``wsi_psm.cli``)."""
