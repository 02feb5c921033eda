"""CBIS-DDSM: parse the four case-description CSVs and find their DICOMs on disk.

The CSVs (one row per abnormality) name files as ``<case>/<StudyUID>/<SeriesUID>/00000N.dcm``.
Two layouts of the images are understood, under ``root`` or ``root/CBIS-DDSM``:

* CSV layout: ``<case>/<uid>/<uid>/000000.dcm`` — the UID folders of a real download often
  differ from the CSV, so files are matched on the case folder (the first path component)
  and the DICOMs found below it.
* TCIA layout: ``<case>/<MM-DD-YYYY>-DDSM-[NA-]<last 5 of StudyUID>/
  <n>-full mammogram images-<last 5 of SeriesUID>/1-1.dcm``, ROI series
  ``<n>-ROI mask images-<…>`` (1-1.dcm and 1-2.dcm) or ``<n>-cropped images-<…>``.

Where a folder holds several DICOMs the one whose UID folders match the CSV (in full, or by
their trailing five digits) wins. Which ROI file is the mask and which the crop is decided by
content, never by name (``000000``/``000001`` and even the CSV columns are swapped in the real
data): the mask has the full image's size and is binary; the crop is smaller or not binary.
Headers are read first; pixels only when sizes do not decide, or for boxes.

Cost: one directory walk per case folder, one header per file; ``with_boxes=True`` also decodes
every mask once (≈ 50-100 ms for a 3000×5000 mask, minutes for the full 3,568 rows).

``data.index.index_dataset`` is the entry point that turns this (and generic manifest CSVs) into
one manifest and its report.
"""

from __future__ import annotations

import multiprocessing as mp
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from dataclasses import field as dc_field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from tqdm import tqdm  # the text bar: tqdm.auto wants ipywidgets in a notebook

from mammo_ray.constants import AbnormalityType, Pathology, Side, View
from mammo_ray.data.dicom import DicomReadError, read_dicom, read_dicom_header
from mammo_ray.data.manifest import MANIFEST_COLUMNS
from mammo_ray.data.masks import mask_fit, mask_fit_reason, scale_box

CSV_FILES: dict[str, tuple[AbnormalityType, str]] = {
    "mass_case_description_train_set.csv": (AbnormalityType.MASS, "train"),
    "mass_case_description_test_set.csv": (AbnormalityType.MASS, "test"),
    "calc_case_description_train_set.csv": (AbnormalityType.CALCIFICATION, "train"),
    "calc_case_description_test_set.csv": (AbnormalityType.CALCIFICATION, "test"),
}
# CSV header (lower-case, "_" → " ") → our column; both density spellings map to one.
_COLUMNS = {
    "patient id": "patient_id",
    "breast density": "breast_density",
    "left or right breast": "side",
    "image view": "view",
    "abnormality id": "abnormality_id",
    "abnormality type": "abnormality_type",
    "mass shape": "mass_shape",
    "mass margins": "mass_margins",
    "calc type": "calc_type",
    "calc distribution": "calc_distribution",
    "assessment": "assessment",
    "pathology": "pathology",
    "subtlety": "subtlety",
    "image file path": "csv_image_path",
    "cropped image file path": "csv_crop_path",
    "roi mask file path": "csv_mask_path",
}
_REQUIRED = ("patient_id", "side", "view", "abnormality_id", "abnormality_type", "pathology", "csv_image_path")
_ENUMS: dict[str, type[Side] | type[View] | type[AbnormalityType] | type[Pathology]] = {
    "side": Side,
    "view": View,
    "abnormality_type": AbnormalityType,
    "pathology": Pathology,
}


class CbisCsvError(ValueError):
    """A CBIS-DDSM CSV that cannot be used: missing, wrong columns, or (strict) a bad row."""


@dataclass
class FileProblems:
    """What resolving found wrong with files, for the index report (nothing is skipped silently)."""

    unreadable: list[dict[str, str]] = dc_field(default_factory=list)  # {path, reason}: not a readable DICOM
    warnings: list[dict[str, str]] = dc_field(default_factory=list)  # {lesion_id, path, reason}: a mask dropped, empty


def parse_cbis_csvs(csv_dir: str | Path) -> tuple[pd.DataFrame, list[dict]]:
    """Parse whichever of the four case-description CSVs exist in ``csv_dir``.

    Returns the rows (manifest columns plus ``csv_image_path/csv_crop_path/csv_mask_path``,
    the CSV's relative paths, stripped) and the invalid rows, each
    ``{source_file, source_row, field, value, reason}``; invalid rows are not in the frame.
    """
    csv_dir = Path(csv_dir)
    present = [name for name in CSV_FILES if (csv_dir / name).is_file()]
    if not present:
        raise CbisCsvError(f"{csv_dir}: none of the CBIS-DDSM CSVs {sorted(CSV_FILES)} found")
    rows: list[dict] = []
    invalid: list[dict] = []
    for name in present:
        raw = pd.read_csv(csv_dir / name, dtype=str, keep_default_na=False)
        raw = raw.rename(columns=lambda c: _COLUMNS.get(c.strip().lower().replace("_", " "), c))
        missing = [c for c in _REQUIRED if c not in raw.columns]
        if missing:
            raise CbisCsvError(f"{csv_dir / name}: missing columns {missing}")
        for number, record in enumerate(raw.to_dict("records"), start=1):
            row, problem = _parse_row({k: str(v).strip() for k, v in record.items()}, name, number)
            if problem:
                invalid.append(problem)
            else:
                rows.append(row)
    frame = pd.DataFrame(rows)
    if frame.empty:
        frame = pd.DataFrame(columns=list(dict.fromkeys([*MANIFEST_COLUMNS, *_COLUMNS.values()])))
    return frame, invalid


def read_cbis_csvs(csv_dir: str | Path) -> pd.DataFrame:
    """Like ``parse_cbis_csvs`` but raise ``CbisCsvError`` naming file, row and field of a bad row."""
    frame, invalid = parse_cbis_csvs(csv_dir)
    if invalid:
        bad = invalid[0]
        raise CbisCsvError(
            f"{bad['source_file']}: row {bad['source_row']}: field {bad['field']!r}: "
            f"{bad['reason']} ({len(invalid)} invalid rows in all)"
        )
    return frame


def _parse_row(rec: dict, name: str, number: int) -> tuple[dict, dict | None]:
    def bad(field: str, reason: str) -> tuple[dict, dict]:
        return {}, {
            "source_file": name,
            "source_row": number,
            "field": field,
            "value": rec.get(field, ""),
            "reason": reason,
        }

    if not rec["patient_id"]:
        return bad("patient_id", "missing patient id")
    if not rec["csv_image_path"]:
        return bad("csv_image_path", "missing image file path")
    row = dict(rec)
    for field, enum in _ENUMS.items():
        try:
            row[field] = enum.parse(rec[field]).value
        except ValueError as exc:
            return bad(field, str(exc))
    if not rec["abnormality_id"].isdigit() or int(rec["abnormality_id"]) < 1:
        return bad("abnormality_id", f"not a positive integer: {rec['abnormality_id']!r}")
    row["abnormality_id"] = int(rec["abnormality_id"])
    for field in ("breast_density", "assessment", "subtlety"):  # optional: values as in the CSV
        row[field] = float(pd.to_numeric(rec.get(field, ""), errors="coerce"))
    row["label"] = Pathology(row["pathology"]).label
    row["source"], row["source_split"] = "cbis-ddsm", CSV_FILES[name][1]
    row["source_file"], row["source_row"] = name, number
    row["lesion_id"] = "_".join(
        [row["patient_id"], row["side"], row["view"], row["abnormality_type"], str(row["abnormality_id"])]
    )
    row["exam_key"] = "_".join([row["patient_id"], row["side"], row["abnormality_type"], str(row["abnormality_id"])])
    return row, None


def _uid_match(folder: str, uid: str) -> int:
    """2: the folder is the UID; 1: it ends with the UID's last five digits (TCIA); 0: neither."""
    return 2 if folder == uid else int(len(uid) >= 5 and folder.endswith("-" + uid[-5:]))


def _score(path: Path, rel: str, use_name: bool = True) -> int:
    """How well a found file matches a CSV path: case folder, then UID folders, then file name.

    ``use_name=False`` ignores the file name, which the real data assigns unreliably to ROIs.
    """
    parts = rel.split("/")
    score = 10 * (parts[0] in path.parts)
    if len(parts) >= 4 and len(path.parts) >= 3:
        score += _uid_match(path.parts[-3], parts[-3]) + _uid_match(path.parts[-2], parts[-2])
    return score + 100 * (use_name and path.name == parts[-1] and score == 14)


class _Resolver:
    """Finds files for CSV paths with cached listings, headers and mask contents."""

    def __init__(self, root: str | Path | None, with_boxes: bool):
        self.root = Path(os.path.abspath(root)) if root is not None else None
        if self.root is not None and not self.root.is_dir():
            raise FileNotFoundError(f"image root {self.root} is not a directory")
        self.with_boxes = with_boxes
        self.unreadable: dict[str, str] = {}
        self.warnings: list[dict] = []
        self._cases: dict[str, Path] | None = None
        self._files: dict[Path, list[Path]] = {}
        self._headers: dict[Path, object] = {}
        self._masks: dict[Path, tuple[bool | None, tuple[int, int, int, int] | None]] = {}

    def case_dir(self, name: str) -> Path | None:
        if self.root is None:  # a generic manifest names its files itself
            return None
        if self._cases is None:  # one listing of root and root/CBIS-DDSM, not a stat per row
            self._cases = {}
            for base in (self.root, self.root / "CBIS-DDSM"):
                if base.is_dir():
                    with os.scandir(base) as entries:
                        for entry in entries:
                            if entry.is_dir():
                                self._cases.setdefault(entry.name, Path(entry.path))
        return self._cases.get(name)

    def files(self, folder: Path) -> list[Path]:
        """Every ``*.dcm`` below ``folder``, listed once."""
        if folder not in self._files:
            found, stack = [], [folder]
            while stack:
                with os.scandir(stack.pop()) as entries:
                    for entry in entries:
                        if entry.is_dir():
                            stack.append(Path(entry.path))
                        elif entry.name.lower().endswith(".dcm"):
                            found.append(Path(entry.path))
            self._files[folder] = sorted(found)
        return self._files[folder]

    def header(self, path: Path):
        if path not in self._headers:
            try:
                self._headers[path] = read_dicom_header(path)
            except DicomReadError as exc:
                self._headers[path] = None
                self.unreadable[str(path)] = exc.reason
        return self._headers[path]

    def mask_info(self, path: Path) -> tuple[bool | None, tuple[int, int, int, int] | None]:
        """(is binary, (x0, y0, x1, y1) of the foreground) from one decode; None if unreadable."""
        if path not in self._masks:
            try:
                pixels, _ = read_dicom(path, flip=False, apply_voi=False)  # raw values, unflipped frame
            except DicomReadError as exc:
                self.unreadable[str(path)] = exc.reason
                self._masks[path] = (None, None)
                return self._masks[path]
            low, high = pixels.min(), pixels.max()
            binary = bool(((pixels == low) | (pixels == high)).all())
            box = None
            if binary and low != high:  # foreground = the rarer value (robust to MONOCHROME1 inversion)
                fg = pixels == high
                fg = fg if fg.sum() * 2 <= fg.size else ~fg
                ys, xs = np.flatnonzero(fg.any(axis=1)), np.flatnonzero(fg.any(axis=0))
                box = (int(xs[0]), int(ys[0]), int(xs[-1]) + 1, int(ys[-1]) + 1)
            self._masks[path] = (binary, box)
        return self._masks[path]

    def _best(self, paths: list[Path], rel: str, bonus=lambda p: 0, use_name: bool = True) -> Path | None:
        """The single best match for ``rel`` among ``paths``, or None on a tie."""
        if len(paths) == 1:
            return paths[0]
        ranked = sorted(((_score(p, rel, use_name) + bonus(p), p) for p in paths), reverse=True)
        return ranked[0][1] if ranked[0][0] > ranked[1][0] else None

    def image(self, rel: str) -> tuple[Path | None, str]:
        folder = self.case_dir(rel.split("/")[0])
        if folder is None:
            return None, f"image folder not found: {rel.split('/')[0]} under {self.root}"
        files = self.files(folder)
        if not files:
            return None, f"no DICOM in image folder: {folder}"
        best = self._best(files, rel, bonus=lambda p: "full mammogram" in p.parent.name.lower())
        if best is None:
            return None, f"ambiguous image: {len(files)} DICOMs under {folder}, none matches the CSV UIDs"
        return best, ""

    def roi(self, crop_rel: str, mask_rel: str, shape: tuple[int, int]) -> tuple[Path | None, Path | None, str]:
        """(mask, crop, reason): mask by content (binary, image-sized), crop = the other file."""
        folders: list[Path] = []
        missing: list[str] = []
        for rel in dict.fromkeys(r.split("/")[0] for r in (crop_rel, mask_rel) if r):
            folder = self.case_dir(rel)
            if folder is None:
                missing.append(rel)
            else:
                folders.append(folder)
        found = {f for d in folders for f in self.files(d)}
        exact: set[Path] = set()
        for r in (crop_rel, mask_rel):
            base = self.case_dir(r.split("/")[0]) if r else None
            if base is not None:
                exact.add(base.joinpath(*r.split("/")[1:]))
        exact &= found
        pool = sorted(exact) if len(exact) == 2 else sorted(found)
        where = ", ".join(str(d) for d in folders)
        if not pool:
            return (
                None,
                None,
                (
                    f"ROI folder not found: {missing[0]} under {self.root}"
                    if missing
                    else f"ROI mask not found: no DICOM under {where}"
                ),
            )
        readable = [p for p in pool if self.header(p) is not None]
        sized = [p for p in readable if (self.header(p).rows, self.header(p).columns) == shape]
        if len(sized) == 1 and len(readable) >= 2:
            masks = sized  # sizes decide; no pixels needed
        else:
            masks = [p for p in (sized or readable) if self.mask_info(p)[0]]
        crops = [p for p in readable if p not in masks]
        crop = self._best(crops, crop_rel, use_name=False) if crops and crop_rel else None
        if not masks:
            return None, crop, f"ROI mask not found: no binary DICOM among {len(readable)} readable under {where}"
        mask = self._best(masks, mask_rel, use_name=False)
        if mask is None:
            return None, None, f"mask and crop indistinguishable: {len(masks)} binary candidates under {where}"
        return mask, crop, ""

    def finish(self, row: dict, image: Path, mask: Path | None, crop: Path | None) -> dict:
        """Fill paths, box and seed for a row whose image (and mask, if any) was found."""
        meta = self.header(image)
        if meta is None:
            return {"resolved": False, "unresolved_reason": f"image unreadable: {image}: {self.unreadable[str(image)]}"}
        out = {
            "image_path": str(image),
            "roi_mask_path": str(mask or ""),
            "crop_path": str(crop or ""),
            "resolved": True,
            "unresolved_reason": "",
        }
        if mask is None or not self.with_boxes or not np.isnan(row.get("bbox_x0", np.nan)):
            return out
        mask_meta = self.header(mask)
        if mask_meta is None:
            return out | {"resolved": False, "unresolved_reason": f"ROI mask unreadable: {mask}"}
        binary, box = self.mask_info(mask)
        if binary is None or not binary:
            return out | {
                "resolved": False,
                "unresolved_reason": f"ROI mask {'unreadable' if binary is None else 'not binary'}: {mask}",
            }
        mask_shape, image_shape = (mask_meta.rows, mask_meta.columns), (meta.rows, meta.columns)
        fit = mask_fit(mask_shape, image_shape)
        if fit == "drop":
            reason = mask_fit_reason(mask_shape, image_shape)
            self.warnings.append({"lesion_id": row.get("lesion_id", ""), "path": str(mask), "reason": reason})
            return out | {"mask_dropped": True}
        if box is None:
            self.warnings.append(
                {"lesion_id": row.get("lesion_id", ""), "path": str(mask), "reason": "ROI mask is empty"}
            )
            return out | {"mask_resampled": fit == "resample"}
        x0, y0, x1, y1 = box if fit == "same" else scale_box(box, mask_shape, image_shape)
        out.update(bbox_x0=x0, bbox_y0=y0, bbox_x1=x1, bbox_y1=y1, mask_resampled=fit == "resample")
        if np.isnan(row.get("seed_x", np.nan)):
            out.update(seed_x=(x0 + x1) / 2, seed_y=(y0 + y1) / 2)
        return out


def _progress(items, total: int, progress: bool | None, what: str):
    return tqdm(items, total=total, desc=what, unit="row", disable=not (total >= 200 if progress is None else progress))


ROWS_PER_WORKER = 400  # resolve_paths starts a process per this many rows (up to ``workers``)
ROWS_PER_CHUNK = 100  # rows per task of a process


def _resolve_row(resolver: _Resolver, row: dict[str, Any]) -> dict[str, Any]:
    image, reason = resolver.image(row["csv_image_path"])
    mask = crop = None
    if image is not None and resolver.header(image) is not None and (row["csv_mask_path"] or row["csv_crop_path"]):
        meta = resolver.header(image)
        mask, crop, reason = resolver.roi(row["csv_crop_path"], row["csv_mask_path"], (meta.rows, meta.columns))
    if reason or image is None:  # resolver.image gives a reason whenever it finds no image
        return {"image_path": str(image or ""), "resolved": False, "unresolved_reason": reason}
    return resolver.finish(row, image, mask, crop)


def _resolve_rows(
    records: list[dict[str, Any]], root: str | Path, with_boxes: bool
) -> tuple[list[dict[str, Any]], dict[str, str], list[dict]]:
    """One task of ``resolve_paths``: (updates, unreadable files, warnings) of these rows."""
    resolver = _Resolver(root, with_boxes)
    return [_resolve_row(resolver, row) for row in records], resolver.unreadable, resolver.warnings


def resolve_paths(
    frame: pd.DataFrame,
    root: str | Path,
    *,
    with_boxes: bool = True,
    progress: bool | None = None,
    workers: int = 1,
) -> tuple[pd.DataFrame, FileProblems]:
    """Fill image/roi_mask/crop paths (absolute), boxes, ``resolved`` and ``unresolved_reason``.

    ``frame`` comes from ``parse_cbis_csvs``. Returns the filled frame and the unreadable DICOMs
    and warnings met on the way. ``workers`` processes (at most one per ``ROWS_PER_WORKER`` rows)
    read the headers and masks of consecutive runs of rows; the result does not depend on it.
    """
    records = frame.to_dict("records")
    chunks = [records[i : i + ROWS_PER_CHUNK] for i in range(0, len(records), ROWS_PER_CHUNK)]
    workers = max(1, min(workers, len(records) // ROWS_PER_WORKER))
    updates: list[dict[str, Any]] = []
    unreadable: dict[str, str] = {}
    warnings: list[dict] = []
    with _progress(None, len(frame), progress, "resolving CBIS-DDSM") as bar:
        if workers == 1:
            results: Any = (_resolve_rows(chunk, root, with_boxes) for chunk in chunks)
        else:
            pool = ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn"))
            results = pool.map(_resolve_rows, chunks, [root] * len(chunks), [with_boxes] * len(chunks))
        try:
            for (chunk_updates, chunk_unreadable, chunk_warnings), chunk in zip(results, chunks, strict=True):
                updates += chunk_updates  # in row order: map keeps the chunks' order
                for path, reason in chunk_unreadable.items():
                    unreadable.setdefault(path, reason)
                warnings += chunk_warnings
                bar.update(len(chunk))
        finally:
            if workers > 1:
                pool.shutdown(cancel_futures=True)
    return _apply(frame, updates, unreadable, warnings)


def _apply(
    frame: pd.DataFrame, updates: list[dict], unreadable: dict[str, str], warnings: list[dict]
) -> tuple[pd.DataFrame, FileProblems]:
    out = frame.assign(resolved=False, unresolved_reason="") if frame.empty else frame.copy()
    upd = pd.DataFrame(updates, index=frame.index)
    for column in upd.columns:  # a row's update names only what it changes
        out[column] = upd[column].where(upd[column].notna(), out[column]) if column in out else upd[column]
    problems = [{"path": p, "reason": r} for p, r in unreadable.items()]
    return out, FileProblems(unreadable=problems, warnings=list(warnings))


def verify_generic(
    frame: pd.DataFrame, *, with_boxes: bool = True, progress: bool | None = None
) -> tuple[pd.DataFrame, FileProblems]:
    """Check a ``read_generic_csv`` manifest's DICOMs are readable and fill boxes from masks."""
    resolver = _Resolver(None, with_boxes)
    updates: list[dict[str, Any]] = []
    for row in _progress(frame.to_dict("records"), len(frame), progress, "checking generic manifest"):
        if not row["resolved"]:
            updates.append({})
            continue
        mask = Path(row["roi_mask_path"]) if row["roi_mask_path"] else None
        crop = Path(row["crop_path"]) if row["crop_path"] else None
        updates.append(resolver.finish(row, Path(row["image_path"]), mask, crop))
    return _apply(frame, updates, resolver.unreadable, resolver.warnings)
