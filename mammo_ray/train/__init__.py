"""Training: the plain-torch loop, metrics and plots, checkpoints, and the Ray Train wiring."""
