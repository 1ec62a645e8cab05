"""The PSM engine: self-supervised activation network, its fit, and prior self-activation maps."""
