"""The downstream segmentation network: a small U-Net trained label-free on pseudo masks, its
self-training, batched tiled inference and the watershed read-out of instances.

- ``network``: :class:`SegNet` (foreground + normalised-distance heads);
- ``train``: targets from (pseudo) instance labels, augmentation, the fit;
- ``predict``: batched, tiled, test-time-augmented maps;
- ``readout``: maps -> instance labels (torch-free: post-processing workers import it);
- ``model``: saving / loading (state dicts), the shipped default model, the pipeline predictor.
"""
