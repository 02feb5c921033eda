"""Data pipeline: DICOM reading, synthetic data, indexing, splits, crops, cache, datasets."""
