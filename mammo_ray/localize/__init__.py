"""Localization: CAM / Grad-CAM, fully convolutional dense maps (paper 003), findings and FROC."""
