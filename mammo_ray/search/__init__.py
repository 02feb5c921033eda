"""Hyperparameter search and the ensemble on Ray Tune (paper 000)."""
