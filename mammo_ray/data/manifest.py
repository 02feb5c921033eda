"""The manifest: one row per abnormality, every column later steps need.

Written by ``mammo-ray index`` as Parquet. Paths are absolute after resolution.

Columns (``MANIFEST_COLUMNS``):

    lesion_id          str   unique per abnormality in one view: "<patient>_<side>_<view>_<type>_<abn>"
    exam_key           str   pairs the CC and MLO rows of one lesion: "<patient>_<side>_<type>_<abn>"
                             (see ``mark_quirks`` for the pairing rule)
    patient_id         str   e.g. "P_00001"
    side               str   Side value: LEFT / RIGHT
    view               str   View value: CC / MLO
    abnormality_id     int   the CSV's "abnormality id" (1-based per image)
    abnormality_type   str   AbnormalityType value: MASS / CALCIFICATION
    pathology          str   Pathology value (MALIGNANT / BENIGN / BENIGN_WITHOUT_CALLBACK)
    label              int   1 malignant, 0 benign
    breast_density     float 1-4, NaN if unknown
    assessment         float BI-RADS assessment, NaN if unknown
    subtlety           float 1-5, NaN if unknown
    mass_shape         str   "" unless a mass
    mass_margins       str   "" unless a mass
    calc_type          str   "" unless a calcification
    calc_distribution  str   "" unless a calcification
    source             str   where the row came from: "cbis-ddsm" or "generic"
    source_split       str   the dataset's own split ("train" / "test" for CBIS-DDSM), "" if none
    source_file        str   the CSV file name the row came from
    source_row         int   1-based data row number in that CSV (header is row 0)
    image_path         str   absolute path of the full mammogram DICOM, "" if unresolved
    roi_mask_path      str   absolute path of the binary ROI mask, "" if none/unresolved
    crop_path          str   absolute path of the dataset's cropped ROI, "" if none/unresolved
    bbox_x0 .. bbox_y1 float ROI box in full-image pixels (x1, y1 exclusive), NaN if unknown
    seed_x, seed_y     float radiologist seed point in full-image pixels, NaN if unknown
    resolved           bool  image_path exists (and the mask, if the source named one)
    unresolved_reason  str   "" when resolved, otherwise why not
    image_id           str   the film: "<patient>_<side>_<view>" (one film may have two files)
    shared_film        bool  the film is listed under both a Mass and a Calc row
    multi_roi_image    bool  the film has more than one ROI row
    view_label_conflict bool the CC and MLO rows of this abnormality id disagree on the label:
                             not paired, exam_key is "<patient>_<side>_<type>_<abn>_<view>"
    mask_resampled     bool  the ROI mask is stored at another size, same aspect: resampled
    mask_dropped       bool  the ROI mask has another aspect ratio than its image: not used
    in_both_source_splits bool the patient is in CBIS-DDSM's official train and test sets

Generic manifest CSV (``read_generic_csv``): how INbreast, VinDr-Mammo or a private export
comes in. One row per abnormality per image; a header row (row 0), then data rows 1, 2, ...

    patient_id          required  patient identifier (splits are by this column)
    image_path          required  full mammogram DICOM; relative paths are taken against
                                  ``root`` if given, else the CSV's own folder
    side                required  LEFT/RIGHT (L/R accepted)
    view                required  CC/MLO
    label               required  0/1, or a pathology word (MALIGNANT, BENIGN, BENIGN_WITHOUT_CALLBACK)
    pathology           optional  pathology word; must agree with a numeric label
    roi_mask_path       optional  binary ROI mask DICOM, same size as the image
    crop_path           optional  a cropped ROI DICOM
    bbox                optional  "x0,y0,x1,y1" in full-image pixels (x1, y1 exclusive), or
    bbox_x0 .. bbox_y1  optional  the same as four columns; all four or none per row
    seed_x, seed_y      optional  seed point in full-image pixels; default: the bbox centre
    abnormality_type    optional  MASS (default) or CALCIFICATION
    abnormality_id      optional  positive int; default: running number per image (1, 2, ...)
    breast_density, assessment, subtlety   optional numbers
    split               optional  the dataset's own split, kept as ``source_split``

Empty cells count as absent. Unknown columns are an error (a typo must not drop a mask).
Every error names the file, the row number and the field.
"""

from __future__ import annotations

import math
import os
import zlib
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pandas as pd

from mammo_ray.constants import AbnormalityType, Pathology, Side, View
from mammo_ray.data.quirks import mark_quirks, quirk_counts

MANIFEST_COLUMNS: dict[str, str] = {
    "lesion_id": "string",
    "exam_key": "string",
    "patient_id": "string",
    "side": "string",
    "view": "string",
    "abnormality_id": "int64",
    "abnormality_type": "string",
    "pathology": "string",
    "label": "int64",
    "breast_density": "float64",
    "assessment": "float64",
    "subtlety": "float64",
    "mass_shape": "string",
    "mass_margins": "string",
    "calc_type": "string",
    "calc_distribution": "string",
    "source": "string",
    "source_split": "string",
    "source_file": "string",
    "source_row": "int64",
    "image_path": "string",
    "roi_mask_path": "string",
    "crop_path": "string",
    "bbox_x0": "float64",
    "bbox_y0": "float64",
    "bbox_x1": "float64",
    "bbox_y1": "float64",
    "seed_x": "float64",
    "seed_y": "float64",
    "resolved": "bool",
    "unresolved_reason": "string",
    "image_id": "string",
    "shared_film": "bool",
    "multi_roi_image": "bool",
    "view_label_conflict": "bool",
    "mask_resampled": "bool",
    "mask_dropped": "bool",
    "in_both_source_splits": "bool",
}
MANIFEST_FORMAT = "m2"  # m2: quirk flags, image_id, the exam pairing rule
# Quirk flags (see ``mark_quirks``): computed, so a manifest written before they existed still reads.
QUIRK_FLAGS = (
    "shared_film",
    "multi_roi_image",
    "view_label_conflict",
    "mask_resampled",
    "mask_dropped",
    "in_both_source_splits",
)


class ManifestError(ValueError):
    """A manifest file that is missing columns or has unusable values."""


def conform(frame: pd.DataFrame) -> pd.DataFrame:
    """Return ``frame`` with exactly the manifest columns, in order, with their dtypes.

    Missing optional columns are filled (NaN for floats, "" for strings).
    """
    out = pd.DataFrame(index=frame.index)
    for name, dtype in MANIFEST_COLUMNS.items():
        if name in frame.columns:
            col = frame[name]
        elif dtype == "float64":
            col = pd.Series(float("nan"), index=frame.index)
        elif dtype == "string":
            col = pd.Series("", index=frame.index)
        elif name in QUIRK_FLAGS:
            col = pd.Series(False, index=frame.index)
        else:
            raise ManifestError(f"manifest is missing required column {name!r}")
        if dtype == "string":
            col = col.fillna("")
        elif dtype == "bool":  # a flag an update left out is not set (NaN would cast to True)
            col = col.astype(object).where(col.notna(), False)
        out[name] = col.astype(dtype)
    # Image identity is the film, (patient, side, view), not the file: CBIS-DDSM stores some films
    # twice, under a Mass and a Calc folder.
    # A generic export may hold two studies of one view (priors): there the file is the image.
    derived = out["patient_id"] + "_" + out["side"] + "_" + out["view"]
    generic = out["source"] == "generic"
    if generic.any():
        derived = derived.where(~generic, derived + "_" + out["image_path"].map(_path_tag).astype("string"))
    out["image_id"] = out["image_id"].where(out["image_id"] != "", derived)
    return out.reset_index(drop=True)


def _path_tag(path: str) -> str:
    return f"{zlib.crc32(str(path).encode()):08x}"


def write_manifest(frame: pd.DataFrame, path: str | Path) -> Path:
    """Write a conformed manifest as Parquet (atomically) and return its path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    conform(frame).to_parquet(tmp, index=False)
    tmp.replace(path)
    return path


def read_manifest(path: str | Path) -> pd.DataFrame:
    """Read a manifest written by ``write_manifest``; raise ManifestError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise ManifestError(f"{path}: manifest file not found")
    try:
        frame = pd.read_parquet(path)
    except Exception as exc:  # pyarrow raises several types for a bad file
        raise ManifestError(f"{path}: not a readable Parquet manifest ({exc})") from exc
    missing = [c for c in MANIFEST_COLUMNS if c not in frame.columns and c not in QUIRK_FLAGS + ("image_id",)]
    if missing:
        raise ManifestError(f"{path}: manifest lacks columns {missing}")
    # The pairing rule and the film flags hold for a manifest written before they existed too.
    return mark_quirks(conform(frame))


_GENERIC_REQUIRED = ("patient_id", "image_path", "side", "view", "label")
_GENERIC_OPTIONAL = (
    "pathology",
    "roi_mask_path",
    "crop_path",
    "bbox",
    "bbox_x0",
    "bbox_y0",
    "bbox_x1",
    "bbox_y1",
    "seed_x",
    "seed_y",
    "abnormality_type",
    "abnormality_id",
    "breast_density",
    "assessment",
    "subtlety",
    "split",
)
_BOX = ("bbox_x0", "bbox_y0", "bbox_x1", "bbox_y1")


def read_generic_csv(path: str | Path, root: str | Path | None = None) -> pd.DataFrame:
    """Read a generic manifest CSV (format in the module docstring) into a conformed manifest.

    ``resolved`` says whether the image (and the mask, if named) exist; DICOM contents are
    checked later (``cbis_ddsm.verify_generic``). Raises ManifestError listing every bad
    row as ``<file>: row <n>: field <name>: <reason>``.
    """
    path = Path(path)
    if not path.is_file():
        raise ManifestError(f"{path}: generic manifest CSV not found")
    raw = pd.read_csv(path, dtype=str, keep_default_na=False)
    raw.columns = [c.strip().lower() for c in raw.columns]
    missing = [c for c in _GENERIC_REQUIRED if c not in raw.columns]
    unknown = [c for c in raw.columns if c not in _GENERIC_REQUIRED + _GENERIC_OPTIONAL]
    if missing or unknown:
        raise ManifestError(
            f"{path}: missing columns {missing}, unknown columns {unknown} "
            f"(allowed: {list(_GENERIC_REQUIRED + _GENERIC_OPTIONAL)})"
        )
    base = Path(root) if root is not None else path.parent
    errors: list[str] = []
    rows: list[dict] = []
    per_image: Counter[str] = Counter()
    for number, record in enumerate(raw.to_dict("records"), start=1):
        rec = {k: str(v).strip() for k, v in record.items()}
        try:
            row = _generic_row(rec, base, per_image)
        except _FieldError as exc:
            errors.append(f"{path}: row {number}: field {exc.field!r}: {exc.reason}")
            continue
        row.update(source="generic", source_file=path.name, source_row=number)
        rows.append(row)
    seen: dict[str, int] = {}
    for row in rows:
        first = seen.setdefault(row["lesion_id"], row["source_row"])
        if first != row["source_row"]:
            errors.append(
                f"{path}: row {row['source_row']}: field 'abnormality_id': lesion "
                f"{row['lesion_id']} repeats row {first} (give distinct abnormality_id)"
            )
    if errors:
        shown = "\n  ".join(errors[:20])
        raise ManifestError(f"{path}: {len(errors)} invalid row(s):\n  {shown}")
    return conform(pd.DataFrame(rows, columns=list(rows[0]) if rows else list(MANIFEST_COLUMNS)))


class _FieldError(Exception):
    def __init__(self, field: str, reason: str):
        super().__init__(reason)
        self.field, self.reason = field, reason


def _generic_row(rec: dict, base: Path, per_image: Counter) -> dict:
    def number(field: str) -> float:
        text = rec.get(field, "")
        try:
            value = float(text) if text else math.nan
        except ValueError:
            raise _FieldError(field, f"not a number: {text!r}") from None
        if math.isinf(value):
            raise _FieldError(field, f"not finite: {text!r}")
        return value

    def enum(field: str, kind, default: str = ""):
        try:
            return kind.parse(rec.get(field) or default).value
        except ValueError as exc:
            raise _FieldError(field, str(exc)) from None

    if not rec["patient_id"]:
        raise _FieldError("patient_id", "empty")
    if not rec["image_path"]:
        raise _FieldError("image_path", "empty")
    row = {
        "patient_id": rec["patient_id"],
        "side": enum("side", Side),
        "view": enum("view", View),
        "abnormality_type": enum("abnormality_type", AbnormalityType, "MASS"),
    }
    label_text = rec["label"]
    if label_text in ("0", "1"):
        row["label"] = int(label_text)
        pathology = enum("pathology", Pathology, "MALIGNANT" if row["label"] else "BENIGN")
        if Pathology(pathology).label != row["label"]:
            raise _FieldError("pathology", f"{pathology} disagrees with label {label_text}")
    else:
        pathology = enum("label", Pathology)
        row["label"] = Pathology(pathology).label
    row["pathology"] = pathology
    paths = {
        f: str((base / rec[f]).absolute()) if rec.get(f) else "" for f in ("image_path", "roi_mask_path", "crop_path")
    }
    row.update(paths)
    image_key = paths["image_path"]
    per_image[image_key] += 1
    if rec.get("abnormality_id"):
        if not rec["abnormality_id"].isdigit() or int(rec["abnormality_id"]) < 1:
            raise _FieldError("abnormality_id", f"not a positive integer: {rec['abnormality_id']!r}")
        row["abnormality_id"] = int(rec["abnormality_id"])
    else:
        row["abnormality_id"] = per_image[image_key]
    for field in ("breast_density", "assessment", "subtlety", "seed_x", "seed_y"):
        row[field] = number(field)
    box = _generic_box(rec, number)
    row.update(zip(_BOX, box, strict=True))
    if math.isnan(row["seed_x"]) != math.isnan(row["seed_y"]):
        raise _FieldError("seed_x" if math.isnan(row["seed_x"]) else "seed_y", "give both seed_x and seed_y")
    if math.isnan(row["seed_x"]) and not math.isnan(box[0]):
        row["seed_x"], row["seed_y"] = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
    row["source_split"] = rec.get("split", "").lower()
    row["lesion_id"] = "_".join(
        [row["patient_id"], row["side"], row["view"], row["abnormality_type"], str(row["abnormality_id"])]
    )
    row["exam_key"] = "_".join([row["patient_id"], row["side"], row["abnormality_type"], str(row["abnormality_id"])])
    reason = "" if os.path.isfile(paths["image_path"]) else f"image not found: {paths['image_path']}"
    if not reason and paths["roi_mask_path"] and not os.path.isfile(paths["roi_mask_path"]):
        reason = f"ROI mask not found: {paths['roi_mask_path']}"
    row.update(resolved=not reason, unresolved_reason=reason)
    return row


def _generic_box(rec: dict, number: Callable[[str], float]) -> tuple[float, float, float, float]:
    if rec.get("bbox"):
        parts = rec["bbox"].replace(";", ",").split(",")
        try:
            values = tuple(float(p) for p in parts)
        except ValueError:
            values = ()
        if len(values) != 4:
            raise _FieldError("bbox", f"expected 'x0,y0,x1,y1', got {rec['bbox']!r}")
        x0, y0, x1, y1 = values
        field = "bbox"
    else:
        x0, y0, x1, y1 = (number(f) for f in _BOX)
        if all(math.isnan(v) for v in (x0, y0, x1, y1)):
            return x0, y0, x1, y1
        if any(math.isnan(v) for v in (x0, y0, x1, y1)):
            nan_at = [math.isnan(v) for v in (x0, y0, x1, y1)].index(True)
            raise _FieldError(_BOX[nan_at], "give all four bbox columns or none")
        field = "bbox_x1"
    box = (x0, y0, x1, y1)
    if not (0 <= x0 < x1 and 0 <= y0 < y1):
        raise _FieldError(field, f"box {box} must have 0 <= x0 < x1 and 0 <= y0 < y1")
    return box


def build_index_report(manifest: pd.DataFrame, *, invalid=(), unreadable=(), warnings=()) -> dict:
    """The JSON-able summary ``mammo-ray index`` prints and saves beside the manifest.

    Keys: rows, resolved, unresolved (list of {lesion_id, source_file, source_row, reason}),
    unresolved_by_reason (the reason's text before ":"), unreadable ({path, reason}),
    invalid ({source_file, source_row, field, value, reason}), warnings, patients,
    patients_in_both_source_splits (CBIS-DDSM's own train/test share patients), quirks
    (``quirk_counts``), and counts
    by_type, by_pathology, by_label, by_source_split, resolved_by_type.
    """

    def counts(series: pd.Series) -> dict:
        return {str(k): int(v) for k, v in series.value_counts().sort_index().items()}

    bad = manifest[~manifest["resolved"]]
    unresolved = [
        {
            "lesion_id": str(r.lesion_id),
            "source_file": str(r.source_file),
            "source_row": int(r.source_row),
            "reason": str(r.unresolved_reason),
        }
        for r in bad.itertuples(index=False)
    ]
    splits_per_patient = manifest[manifest["source_split"] != ""].groupby("patient_id")["source_split"].nunique()
    return {
        "rows": int(len(manifest)),
        "resolved": int(manifest["resolved"].sum()),
        "unresolved": unresolved,
        "unresolved_by_reason": counts(bad["unresolved_reason"].str.split(":").str[0]),
        "unreadable": [dict(u) for u in unreadable],
        "invalid": [{k: (int(v) if k == "source_row" else str(v)) for k, v in row.items()} for row in invalid],
        "warnings": [dict(w) for w in warnings],
        "patients": int(manifest["patient_id"].nunique()),
        "patients_in_both_source_splits": int((splits_per_patient > 1).sum()),
        "quirks": quirk_counts(manifest),
        "by_type": counts(manifest["abnormality_type"]),
        "by_pathology": counts(manifest["pathology"]),
        "by_label": counts(manifest["label"]),
        "by_source_split": counts(manifest["source_split"]),
        "resolved_by_type": counts(manifest.loc[manifest["resolved"], "abnormality_type"]),
    }
