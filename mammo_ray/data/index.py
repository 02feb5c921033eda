"""Index a dataset into one manifest: the one entry point for every dataset (``mammo-ray index``).

CBIS-DDSM (its four case-description CSVs and a DICOM tree in either layout, ``cbis_ddsm``) and
generic manifest CSVs (``manifest.read_generic_csv``) come out as one manifest with the same
columns, the quirk flags marked (``quirks.mark_quirks``), and an ``IndexReport``: what was read,
what could not be resolved and why, and the counts. The report is a typed value;
``IndexReport.to_dict`` is the JSON saved beside the manifest.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from mammo_ray.data.cbis_ddsm import CSV_FILES, CbisCsvError, parse_cbis_csvs, resolve_paths, verify_generic
from mammo_ray.data.manifest import build_index_report, conform, read_generic_csv
from mammo_ray.data.quirks import mark_quirks


@dataclass
class IndexReport:
    """What indexing found (``manifest.build_index_report`` documents the items of each list)."""

    rows: int  # manifest rows (one per abnormality)
    resolved: int  # rows whose image (and ROI files) were found and read
    unresolved: list[dict[str, Any]]  # {lesion_id, source_file, source_row, reason}
    unresolved_by_reason: dict[str, int]  # the reason's text before ":" -> rows
    unreadable: list[dict[str, Any]]  # {path, reason}: files that are not readable DICOMs
    invalid: list[dict[str, Any]]  # {source_file, source_row, field, value, reason}: rows left out
    warnings: list[dict[str, Any]]  # {lesion_id, path, reason}: kept rows with a problem (a dropped mask)
    patients: int
    patients_in_both_source_splits: int  # CBIS-DDSM's own train and test sets share patients
    quirks: dict[str, int]  # ``quirks.quirk_counts``
    by_type: dict[str, int]
    by_pathology: dict[str, int]
    by_label: dict[str, int]
    by_source_split: dict[str, int]
    resolved_by_type: dict[str, int]
    root: str = ""  # the image root given ("" for none)
    csv_dir: str = ""  # the CBIS-DDSM CSV folder read ("" for none)
    generic_csv: str = ""  # the generic manifest CSV read ("" for none)

    def to_dict(self) -> dict[str, Any]:
        """The JSON-able report (``mammo-ray index --json`` and ``<manifest>.report.json``)."""
        return asdict(self)


def index_dataset(
    root: str | Path | None = None,
    csv_dir: str | Path | None = None,
    generic_csv: str | Path | None = None,
    with_boxes: bool = True,
    progress: bool | None = None,
    workers: int = 1,
) -> tuple[pd.DataFrame, IndexReport]:
    """Build the manifest of CBIS-DDSM CSVs and/or a generic manifest CSV, and its report.

    ``csv_dir`` defaults to ``root`` (or ``root/CBIS-DDSM``) when neither it nor ``generic_csv``
    is given. Without ``root`` the CSVs are only parsed: every row is unresolved. ``workers``
    processes read the CBIS-DDSM headers and masks (``cbis_ddsm.resolve_paths``).

    Raises:
        ValueError: none of ``root``, ``csv_dir`` and ``generic_csv`` given.
        CbisCsvError: no CBIS-DDSM CSVs where they were looked for, or a CSV without its columns.
        FileNotFoundError: ``root`` is not a directory.
        ManifestError: a generic CSV with bad rows (each named).
    """
    if csv_dir is None and generic_csv is None:
        if root is None:
            raise ValueError("index_dataset needs root, csv_dir or generic_csv")
        candidates = [Path(root), Path(root) / "CBIS-DDSM"]
        csv_dir = next((d for d in candidates if any((d / n).is_file() for n in CSV_FILES)), None)
        if csv_dir is None:
            raise CbisCsvError(f"no CBIS-DDSM CSVs in {' or '.join(map(str, candidates))}; pass csv_dir")
    frames: list[pd.DataFrame] = []
    invalid: list[dict[str, Any]] = []
    unreadable: list[dict[str, str]] = []
    warnings: list[dict[str, str]] = []
    if csv_dir is not None:
        parsed, invalid = parse_cbis_csvs(csv_dir)
        if root is None:
            parsed = parsed.assign(resolved=False, unresolved_reason="no image root given")
        else:
            parsed, problems = resolve_paths(parsed, root, with_boxes=with_boxes, progress=progress, workers=workers)
            unreadable += problems.unreadable
            warnings += problems.warnings
        frames.append(conform(parsed))
    if generic_csv is not None:
        generic, problems = verify_generic(
            read_generic_csv(generic_csv, root), with_boxes=with_boxes, progress=progress
        )
        unreadable += problems.unreadable
        warnings += problems.warnings
        frames.append(conform(generic))
    manifest = mark_quirks(conform(pd.concat(frames, ignore_index=True)))
    counts = build_index_report(manifest, invalid=invalid, unreadable=unreadable, warnings=warnings)
    report = IndexReport(**counts, root=str(root or ""), csv_dir=str(csv_dir or ""), generic_csv=str(generic_csv or ""))
    return manifest, report
