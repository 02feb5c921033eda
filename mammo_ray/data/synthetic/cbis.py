"""Synthetic CBIS-DDSM: the four case-description CSVs and the DICOM tree they name.

``synthesize`` either invents patients (stratified blocks of ten: ~80/20 Training/Test,
half mass and half calcification cases, some with two lesions in one breast or lesions in
both breasts) or, with ``from_csv``, redraws the rows of real CBIS-DDSM CSVs. Either way
the rows come first and the pictures follow from them: a lesion's CSV description
(shape, margins, calc type, distribution, subtlety, density) decides how it is drawn, in
both the CC and the MLO view of its breast. The CSVs reproduce the real files' quirks
(CRLF lines, one path column quoted with a trailing newline, crop/mask file names that do
not tell which is which, masks in another series, several rows per image).

A ``from_csv`` replica also keeps the real data's structure: a film that a Mass and a Calc row
both list (71 in CBIS-DDSM) is drawn once, with the lesions of both, and the same pixels are
written under both folders; each ROI has its own mask; some masks are stored at another size
than their image (``_mask_size_quirk``); labels that disagree between the CC and MLO rows of
one abnormality id are kept as the CSVs have them.

Layouts: ``csv`` stores each DICOM at ``out_dir/<path in the CSV>``; ``tcia`` stores them
the way a TCIA download does (``CBIS-DDSM/<folder>/<date>-DDSM-[NA-]<study[-5:]>/
1.000000-<series description>-<series[-5:]>/1-1.dcm``). Every number comes from
``numpy.random.default_rng`` seeded with (seed, patient number, ...), so the same seed
gives byte-identical files and one patient's draws never depend on another's.
"""

from __future__ import annotations

import csv
import dataclasses
import datetime
import multiprocessing as mp
import re
import warnings
import zlib
from collections import Counter
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm  # the text bar: tqdm.auto wants ipywidgets in a notebook

from mammo_ray.constants import Side, View
from mammo_ray.data.masks import resample_mask
from mammo_ray.data.synthetic import phantom as si
from mammo_ray.data.synthetic.dicom_write import (
    SERIES_CROP,
    SERIES_FULL,
    SERIES_MASK,
    DicomInfo,
    write_crop,
    write_mammogram,
    write_mask,
)

MASS_COLUMNS = (
    "patient_id",
    "breast_density",
    "left or right breast",
    "image view",
    "abnormality id",
    "abnormality type",
    "mass shape",
    "mass margins",
    "assessment",
    "pathology",
    "subtlety",
    "image file path",
    "cropped image file path",
    "ROI mask file path",
)
CALC_COLUMNS = (
    "patient_id",
    "breast density",
    "left or right breast",
    "image view",
    "abnormality id",
    "abnormality type",
    "calc type",
    "calc distribution",
    "assessment",
    "pathology",
    "subtlety",
    "image file path",
    "cropped image file path",
    "ROI mask file path",
)
CSV_NAMES = {
    ("mass", "Training"): "mass_case_description_train_set.csv",
    ("mass", "Test"): "mass_case_description_test_set.csv",
    ("calc", "Training"): "calc_case_description_train_set.csv",
    ("calc", "Test"): "calc_case_description_test_set.csv",
}
LAYOUTS = ("csv", "tcia")
UID_ROOT = "1.3.6.1.4.1.9590.100.1.2."  # the root CBIS-DDSM's UIDs use
IMAGE_HEIGHT_MM = 250.0  # physical height of a full-field image: 0.05 mm pixels at 5000 rows
PATIENTS_PER_WORKER = 40  # synthesize starts a process per this many patients (up to ``workers``)
PATIENTS_PER_CHUNK = 16  # patients per task of a process
_CASES = tuple(CSV_NAMES)
_I_IMG, _I_CROP, _I_MASK = 11, 12, 13

# Vocabulary tables (value, weight). Malignant masses lean irregular/spiculated, benign ones
# round/oval/circumscribed, with deliberate overlap so the label is not read off perfectly.
_PATHOLOGY = {
    "mass": (("MALIGNANT", 47), ("BENIGN", 43), ("BENIGN_WITHOUT_CALLBACK", 10)),
    "calc": (("MALIGNANT", 40), ("BENIGN", 35), ("BENIGN_WITHOUT_CALLBACK", 25)),
}
_MASS_SHAPE = {
    True: (
        ("IRREGULAR", 50),
        ("LOBULATED", 15),
        ("ARCHITECTURAL_DISTORTION", 8),
        ("IRREGULAR-ARCHITECTURAL_DISTORTION", 7),
        ("OVAL", 10),
        ("ROUND", 10),
    ),
    False: (
        ("OVAL", 35),
        ("ROUND", 20),
        ("LOBULATED", 25),
        ("IRREGULAR", 12),
        ("LYMPH_NODE", 5),
        ("ARCHITECTURAL_DISTORTION", 3),
    ),
}
_MARGIN_OF_SHAPE = {
    "ARCHITECTURAL_DISTORTION": (("SPICULATED", 50), ("ILL_DEFINED", 50)),
    "IRREGULAR-ARCHITECTURAL_DISTORTION": (("SPICULATED", 60), ("ILL_DEFINED", 40)),
    "LYMPH_NODE": (("CIRCUMSCRIBED", 80), ("OBSCURED", 20)),
}
_MASS_MARGIN = {
    True: (("SPICULATED", 40), ("ILL_DEFINED", 30), ("MICROLOBULATED", 10), ("OBSCURED", 10), ("CIRCUMSCRIBED", 10)),
    False: (("CIRCUMSCRIBED", 45), ("OBSCURED", 25), ("ILL_DEFINED", 20), ("MICROLOBULATED", 5), ("SPICULATED", 5)),
}
_CALC_TYPE = {
    True: (
        ("PLEOMORPHIC", 45),
        ("FINE_LINEAR_BRANCHING", 20),
        ("AMORPHOUS", 15),
        ("PUNCTATE", 8),
        ("PLEOMORPHIC-FINE_LINEAR_BRANCHING", 7),
        ("ROUND_AND_REGULAR", 5),
    ),
    False: (
        ("ROUND_AND_REGULAR", 15),
        ("LUCENT_CENTER", 15),
        ("COARSE", 12),
        ("VASCULAR", 12),
        ("PUNCTATE", 15),
        ("PLEOMORPHIC", 15),
        ("AMORPHOUS", 6),
        ("EGGSHELL", 5),
        ("LARGE_RODLIKE", 5),
    ),
}
_CALC_DIST = {
    True: (("CLUSTERED", 45), ("LINEAR", 20), ("SEGMENTAL", 25), ("REGIONAL", 10)),
    False: (
        ("CLUSTERED", 35),
        ("REGIONAL", 20),
        ("DIFFUSELY_SCATTERED", 15),
        ("SEGMENTAL", 5),
        ("LINEAR", 5),
        ("NA", 20),
    ),
}
_ASSESSMENT = {
    "MALIGNANT": (("4", 50), ("5", 35), ("3", 5), ("0", 10)),
    "BENIGN": (("2", 25), ("3", 30), ("4", 30), ("0", 15)),
    "BENIGN_WITHOUT_CALLBACK": (("2", 60), ("3", 30), ("0", 10)),
}
_SUBTLETY = {
    "mass": (("1", 5), ("2", 10), ("3", 25), ("4", 25), ("5", 35)),
    "calc": (("1", 8), ("2", 15), ("3", 32), ("4", 22), ("5", 23)),
}
_DENSITY = (("1", 18), ("2", 42), ("3", 28), ("4", 12))
_BLOCK = {
    "kind": ["mass"] * 5 + ["calc"] * 5,
    "split": ["Training"] * 8 + ["Test"] * 2,
    "config": ["single"] * 6 + ["two"] * 2 + ["both"] * 2,
}  # per block of ten patients


@dataclass(frozen=True)
class SynthSummary:
    """What ``synthesize`` wrote; the counts are of CSV rows unless named otherwise."""

    out_dir: str
    csv_dir: str
    layout: str
    seed: int
    size: tuple[int, int]  # (H, W) of the full-field images
    patients: int
    images: int  # full-field mammogram files
    films: int  # distinct (patient, side, view): a film listed under a Mass and a Calc folder is one film, two files
    abnormalities: int  # CSV rows (one per abnormality per view)
    by_type: dict[str, int]
    by_pathology: dict[str, int]

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out["size"] = list(self.size)
        return out


@dataclass(frozen=True)
class _Row:
    kind: str  # "mass" | "calc"
    split: str  # "Training" | "Test"
    values: tuple[str, ...]  # the 14 CSV fields exactly as written (quirks included)

    def __getitem__(self, i: int) -> str:
        return self.values[i].strip()


def _pick(rng: np.random.Generator, table) -> str:
    names, weights = zip(*table, strict=True)
    return names[int(rng.choice(len(names), p=np.asarray(weights, float) / sum(weights)))]


def _uid(rng: np.random.Generator) -> str:
    n = int(rng.integers(36, 40))  # CBIS UIDs are 61-64 characters
    return UID_ROOT + str(int(rng.integers(1, 10))) + "".join(str(d) for d in rng.integers(0, 10, n - 1))


def _case(kind: str, split: str) -> str:
    return f"{'Mass' if kind == 'mass' else 'Calc'}-{split}"


def _roi_paths(rng: np.random.Generator, kind: str, folder: str) -> tuple[str, str]:
    """Crop and mask paths of one ROI: mostly one series holding 000000/000001 in either
    order, sometimes (like ~7% of real mass rows) the mask in a study/series of its own."""
    study, series = _uid(rng), _uid(rng)
    if rng.random() < 0.08:
        return f"{folder}/{study}/{series}/000000.dcm", f"{folder}/{_uid(rng)}/{_uid(rng)}/000000.dcm"
    crop_first = rng.random() < (0.7 if kind == "mass" else 0.3)
    crop_name, mask_name = ("000000.dcm", "000001.dcm") if crop_first else ("000001.dcm", "000000.dcm")
    return f"{folder}/{study}/{series}/{crop_name}", f"{folder}/{study}/{series}/{mask_name}"


def _plan_patient(seed: int, pnum: int, kind: str, split: str, config: str) -> list[_Row]:
    """CSV rows of one invented patient: each lesion seen in CC and MLO."""
    rng = np.random.default_rng([seed, pnum])
    pid, density, case = f"P_{pnum:05d}", _pick(rng, _DENSITY), _case(kind, split)
    side = (Side.LEFT, Side.RIGHT)[int(rng.integers(2))]
    lesions = {"single": [(side, 1)], "two": [(side, 1), (side, 2)], "both": [(Side.LEFT, 1), (Side.RIGHT, 1)]}[config]
    described = {}
    for les in lesions:
        path = _pick(rng, _PATHOLOGY[kind])
        malignant = path == "MALIGNANT"
        look = (
            (_pick(rng, _MASS_SHAPE[malignant]), _pick(rng, _MASS_MARGIN[malignant]))
            if kind == "mass"
            else (_pick(rng, _CALC_TYPE[malignant]), _pick(rng, _CALC_DIST[malignant]))
        )
        if look[0] in _MARGIN_OF_SHAPE:  # distortions are never circumscribed, nodes never spiculated
            look = (look[0], _pick(rng, _MARGIN_OF_SHAPE[look[0]]))
        described[les] = (*look, _pick(rng, _ASSESSMENT[path]), path, _pick(rng, _SUBTLETY[kind]))
    rows = []
    for side in sorted({s for s, _ in lesions}, key=lambda s: s.value):
        for view in (View.CC, View.MLO):
            folder = f"{case}_{pid}_{side.value}_{view.value}"
            image = f"{folder}/{_uid(rng)}/{_uid(rng)}/000000.dcm"
            for abn in sorted(a for s, a in lesions if s is side):
                crop, mask = _roi_paths(rng, kind, f"{folder}_{abn}")
                crop, mask = (crop, mask + "\n") if kind == "mass" else (crop + "\n", mask)  # the real files' quirk
                values = (
                    pid,
                    density,
                    side.value,
                    view.value,
                    str(abn),
                    "mass" if kind == "mass" else "calcification",
                    *described[(side, abn)],
                    image,
                    crop,
                    mask,
                )
                rows.append(_Row(kind, split, values))
    return rows


def _plan(seed: int, patients: int) -> list[_Row]:
    """Rows of ``patients`` invented patients; blocks of ten fix the mix of splits, kinds, configurations."""
    pnums = np.cumsum(np.random.default_rng([seed, 11]).integers(1, 4, size=patients))
    rows = []
    for block in range(0, patients, 10):
        brng = np.random.default_rng([seed, 12, block])
        mix = {k: list(brng.permutation(v)) for k, v in _BLOCK.items()}
        for j, pnum in enumerate(pnums[block : block + 10]):
            rows += _plan_patient(seed, int(pnum), str(mix["kind"][j]), str(mix["split"][j]), str(mix["config"][j]))
    return rows


def _read_rows(csv_dir: Path, patients: int) -> list[_Row]:
    """Rows of the first ``patients`` patient ids (sorted) of real CBIS-DDSM CSVs, values untouched."""
    rows = []
    for (kind, split), name in CSV_NAMES.items():
        path = Path(csv_dir) / name
        if not path.is_file():
            warnings.warn(f"from_csv: {path} not found; no {_case(kind, split)} rows", stacklevel=3)
            continue
        with open(path, newline="") as f:
            reader = csv.reader(f)
            header = tuple(h.strip() for h in next(reader))
            expected = MASS_COLUMNS if kind == "mass" else CALC_COLUMNS
            if header != expected:
                raise ValueError(f"{path}: header {header} is not the CBIS-DDSM {kind} header {expected}")
            for line, rec in enumerate(reader, start=1):
                if len(rec) != len(expected):
                    raise ValueError(f"{path}: data row {line} has {len(rec)} fields, expected {len(expected)}")
                rows.append(_Row(kind, split, tuple(rec)))
    if not rows:
        raise FileNotFoundError(f"from_csv: no CBIS-DDSM case description CSVs in {csv_dir}")
    keep = set(sorted({r[0] for r in rows})[:patients])
    return [r for r in rows if r[0] in keep]


def _int(text: str, default: int, lo: int, hi: int) -> int:
    return min(max(int(text), lo), hi) if text.isdigit() else default


def _pnum(pid: str) -> int:
    digits = re.sub(r"\D", "", pid)
    return int(digits) if digits else zlib.crc32(pid.encode())


def _study_date(seed: int, kind: str) -> datetime.date:
    offset = int(np.random.default_rng([seed, 5, int(kind == "calc")]).integers(0, 730))
    return datetime.date(2016, 1, 1) + datetime.timedelta(days=offset)


def _target(out: Path, layout: str, path: str, description: str, date: datetime.date, kind: str) -> Path:
    """Where the DICOM named by CSV ``path`` lives in ``layout``."""
    if layout == "csv":
        return out / path
    folder, study, series, name = path.split("/")
    study_dir = f"{date:%m-%d-%Y}-DDSM-{'NA-' if kind == 'mass' else ''}{study[-5:]}"
    series_dir = f"1.000000-{description}-{series[-5:]}"
    return out / "CBIS-DDSM" / folder / study_dir / series_dir / ("1-1.dcm" if name == "000000.dcm" else "1-2.dcm")


def _lesion_draw(row: _Row, seed: int, pnum: int, spacing: float):
    """The look of a row's lesion (same for its CC and MLO rows) and this view's angle/scale."""
    case, side = _CASES.index((row.kind, row.split)), int(row[2] == "RIGHT")
    rng = np.random.default_rng([seed, pnum, case, side, _int(row[4], 1, 0, 99), 1])
    subtle = _int(row[10], 3, 1, 5)
    angle, detail = rng.uniform(0, np.pi), int(rng.integers(2**31))
    mlo_turn, mlo_scale = rng.uniform(0.5, 1.0) * rng.choice([-1, 1]), rng.uniform(0.92, 1.08)
    look: si.MassLook | si.CalcLook
    if row.kind == "mass":
        look = si.MassLook(row[6], row[7], rng.uniform(8, 28), rng.uniform(0.75, 1.25) * (0.03 + 0.04 * subtle), detail)
    else:
        look = si.CalcLook(row[6], row[7], rng.uniform(8, 26), rng.uniform(0.8, 1.2) * (0.45 + 0.14 * subtle), detail)
    mlo = row[3] == "MLO"
    return look, angle + (mlo_turn if mlo else 0.0), (mlo_scale if mlo else 1.0)


def _positions(rows: list[_Row], seed: int, pnum: int) -> dict[tuple, tuple[float, float, float]]:
    """Breast coordinates (u, p, q) of each lesion, apart from each other; keyed by (kind, split, side, abn)."""
    keys = sorted({(r.kind, r.split, r[2], r[4]) for r in rows})
    out: dict[tuple, tuple[float, float, float]] = {}
    for key in keys:
        case, side, abn = _CASES.index(key[:2]), int(key[2] == "RIGHT"), _int(key[3], 1, 0, 99)
        rng = np.random.default_rng([seed, pnum, case, side, abn, 2])
        for _ in range(50):
            cand = (rng.uniform(0.25, 0.7), rng.uniform(-0.6, 0.6), rng.uniform(-0.6, 0.6))
            near = [k for k, o in out.items() if k[:3] == key[:3] and np.linalg.norm(np.subtract(cand, o)) < 0.35]
            if not near:
                break
        out[key] = cand
    return out


def _mask_size_quirk(row: _Row, seed: int, pnum: int, view_mlo: bool) -> str:
    """ "": the mask has its image's size; "rescaled" / "cropped": stored at another size (replica only).

    Real CBIS-DDSM has masks whose size differs from their image: about 2% of these ROIs are
    written rescaled (same aspect ratio, resampled by the pipeline) and 0.5% cropped by an
    eighth of their rows (another aspect ratio: the pipeline drops them and says so).
    """
    case, side = _CASES.index((row.kind, row.split)), int(row[2] == "RIGHT")
    draw = np.random.default_rng([seed, pnum, case, side, int(view_mlo), _int(row[4], 1, 0, 99), 7]).random()
    return "rescaled" if draw < 0.02 else "cropped" if draw < 0.025 else ""


def _stored_mask(mask: np.ndarray, quirk: str, rng_key: list[int]) -> np.ndarray:
    if quirk == "rescaled":
        factor = (0.5, 0.8, 1.25)[int(np.random.default_rng(rng_key).integers(3))]
        h, w = mask.shape
        return resample_mask(mask, (max(8, round(h * factor)), max(8, round(w * factor))))
    if quirk == "cropped":
        return mask[: mask.shape[0] - mask.shape[0] // 8]
    return mask


def _render_image(
    out: Path,
    layout: str,
    rows: list[_Row],
    seed: int,
    pnum: int,
    size: tuple[int, int],
    positions: dict,
    dates: dict,
    mask_quirks: bool = False,
) -> int:
    """Draw one film with all lesions of its rows; write it, each crop and each mask; return files written.

    ``rows`` are every row of one (patient, side, view). CBIS-DDSM lists some films under both a
    Mass and a Calc folder: the film is drawn once, with the lesions of both, and the same pixels
    are written at each of its image paths.
    """
    first = rows[0]
    kind, side, view = first.kind, Side.parse(first[2]), View.parse(first[3])
    case, spacing = _CASES.index((kind, first.split)), IMAGE_HEIGHT_MM / size[0]
    rng = np.random.default_rng([seed, pnum, case, int(side is Side.RIGHT), int(view is View.MLO), 3])
    geom = si.breast_geometry(rng, size, view is View.MLO)
    att = si.render_breast(rng, geom, _int(first[1], 2, 1, 4), spacing)
    rois = []
    for row in rows:
        look, angle, scale = _lesion_draw(row, seed, pnum, spacing)
        u, p, q = positions[(row.kind, row.split, row[2], row[4])]
        w = p if view is View.CC else float(np.clip(0.7 * (p + q), -0.7, 0.7))
        radius = (look.diameter_mm if row.kind == "mass" else look.extent_mm) * scale / 2 / spacing
        center = si.lesion_center(geom, u, w, radius)
        draw = si.draw_mass if row.kind == "mass" else si.draw_calcs
        rois.append(draw(att, center, look, spacing, angle, scale))
    pixels = si.to_pixels(att, rng)
    del att
    if side is Side.RIGHT:  # standard display: a right breast's chest wall is on the right
        pixels = np.ascontiguousarray(pixels[:, ::-1])
    base: dict[str, Any] = dict(patient_id=first[0], side=side, view=view, spacing_mm=spacing)
    films = {row[_I_IMG]: row.kind for row in rows}  # one path per folder that lists the film
    for img_path, img_kind in films.items():
        _, study, series, _ = img_path.split("/")
        date = dates[img_kind]
        write_mammogram(
            _target(out, layout, img_path, SERIES_FULL, date, img_kind),
            pixels,
            DicomInfo(
                study_uid=study,
                series_uid=series,
                sop_uid=_uid(rng),
                series_description=SERIES_FULL,
                study_date=f"{date:%Y%m%d}",
                **base,
            ),
        )
    written = len(films)
    for row, (sl, local) in zip(rows, rois, strict=True):
        mask = np.zeros(size, bool)
        mask[sl] = local
        if not mask.any():  # a lesion squeezed off the image still needs a non-empty ROI
            mask[(sl[0].start + sl[0].stop) // 2, (sl[1].start + sl[1].stop) // 2] = True
        if side is Side.RIGHT:
            mask = mask[:, ::-1]
        ys, xs = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
        crop = pixels[ys[0] : ys[-1] + 1, xs[0] : xs[-1] + 1]
        quirk = _mask_size_quirk(row, seed, pnum, view is View.MLO) if mask_quirks else ""
        mask = _stored_mask(mask, quirk, [seed, pnum, _int(row[4], 1, 0, 99), 8])
        crop_path, mask_path = row[_I_CROP], row[_I_MASK]
        shared = crop_path.rsplit("/", 1)[0] == mask_path.rsplit("/", 1)[0]
        date = dates[row.kind]
        for path, desc, write, data in (
            (crop_path, SERIES_MASK if shared else SERIES_CROP, write_crop, crop),
            (mask_path, SERIES_MASK, write_mask, mask),
        ):
            _, study, series, name = path.split("/")
            write(
                _target(out, layout, path, desc, date, row.kind),
                data,
                DicomInfo(
                    study_uid=study,
                    series_uid=series,
                    sop_uid=_uid(rng),
                    series_description=desc,
                    instance_number=1 + int(name != "000000.dcm"),
                    study_date=f"{date:%Y%m%d}",
                    **base,
                ),
            )
        written += 2
    return written


def _render_patients(
    patients: list[tuple[str, list[_Row]]],
    *,
    out: Path,
    layout: str,
    seed: int,
    size: tuple[int, int],
    dates: dict,
    mask_quirks: bool,
) -> tuple[int, int]:
    """Draw every film of these patients (one task of ``synthesize``); returns (images, films)."""
    n_images = n_films = 0
    for pid, prows in patients:
        pnum = _pnum(pid)
        positions = _positions(prows, seed, pnum)
        films: dict[tuple[str, str], list[_Row]] = {}  # (side, view): every row of that film, any folder
        for row in prows:
            films.setdefault((row[2].upper(), row[3].upper()), []).append(row)
        for frows in films.values():
            frows.sort(key=lambda r: _CASES.index((r.kind, r.split)))  # the film's look: its first folder's draw
            _render_image(out, layout, frows, seed, pnum, size, positions, dates, mask_quirks=mask_quirks)
            n_images += len({r[_I_IMG] for r in frows})
        n_films += len(films)
    return n_images, n_films


def _write_csvs(out: Path, rows: list[_Row]) -> None:
    """The four case-description CSVs, CRLF lines, minimal quoting (so only newline paths are quoted)."""
    for (kind, split), name in CSV_NAMES.items():
        with open(out / name, "w", newline="") as f:
            writer = csv.writer(f, lineterminator="\r\n")
            writer.writerow(MASS_COLUMNS if kind == "mass" else CALC_COLUMNS)
            writer.writerows(r.values for r in rows if (r.kind, r.split) == (kind, split))


def synthesize(
    out_dir: str | Path,
    *,
    patients: int = 40,
    seed: int = 0,
    size: tuple[int, int] = (832, 512),
    layout: str = "csv",
    from_csv: str | Path | None = None,
    mask_quirks: bool | None = None,
    progress: bool = True,
    workers: int = 1,
) -> SynthSummary:
    """Write a synthetic CBIS-DDSM-shaped dataset (four CSVs + DICOMs) to ``out_dir``.

    Args:
        out_dir: Output folder; the CSVs go directly in it.
        patients: Number of patients to invent, or with ``from_csv`` the number of real
            patient ids (first in sorted order) whose rows are redrawn.
        seed: Everything (UIDs, dates, pixels) is a function of it.
        size: (H, W) of the full-field images; pixel spacing is 250 mm / H.
        layout: "csv" (files at the CSV paths) or "tcia" (as a TCIA download).
        from_csv: Folder with real CBIS-DDSM case-description CSVs whose rows, paths and
            descriptions are reused.
        mask_quirks: Store some ROI masks at another size than their image, as real CBIS-DDSM
            does (see ``_mask_size_quirk``). Default: on for a ``from_csv`` replica, off otherwise.
        progress: Show a tqdm bar over patients.
        workers: Processes that draw patients at once (at most one per ``PATIENTS_PER_WORKER``
            patients); the files are the same for any number.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout {layout!r} is not one of {LAYOUTS}")
    if patients < 1 or seed < 0:
        raise ValueError(f"need patients >= 1 and seed >= 0, got patients={patients}, seed={seed}")
    seed = int(seed)
    size = (int(size[0]), int(size[1]))
    if min(size) < 64:
        raise ValueError(f"size {size} is too small for a mammogram (need H, W >= 64)")
    out = Path(out_dir)
    if from_csv is not None and Path(from_csv).resolve() == out.resolve():
        raise ValueError(f"from_csv {from_csv} is out_dir: writing there would overwrite the source CSVs")
    out.mkdir(parents=True, exist_ok=True)
    rows = _read_rows(Path(from_csv), patients) if from_csv is not None else _plan(seed, patients)
    mask_quirks = from_csv is not None if mask_quirks is None else bool(mask_quirks)
    dates = {kind: _study_date(seed, kind) for kind in ("mass", "calc")}
    by_patient: dict[str, list[_Row]] = {}
    for row in rows:
        by_patient.setdefault(row[0], []).append(row)
    pids = sorted(by_patient)
    render = partial(
        _render_patients, out=out, layout=layout, seed=seed, size=size, dates=dates, mask_quirks=mask_quirks
    )
    # Every film's pixels, UIDs and masks are a function of (seed, patient), so the patients can be drawn
    # in any order and by any number of processes: the files are the same. A process pays ~1 s to start,
    # so a small set stays in this one.
    workers = max(1, min(workers, len(pids) // PATIENTS_PER_WORKER))
    chunks = [pids[i : i + PATIENTS_PER_CHUNK] for i in range(0, len(pids), PATIENTS_PER_CHUNK)]
    n_images = n_films = 0
    with tqdm(total=len(pids), desc="synthesize", unit="patient", disable=not progress) as bar:
        if workers == 1:
            counts = (render([(pid, by_patient[pid]) for pid in chunk]) for chunk in chunks)
            for (images, films), chunk in zip(counts, chunks, strict=True):
                n_images, n_films = n_images + images, n_films + films
                bar.update(len(chunk))
        else:
            with ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn")) as pool:
                futures = {
                    pool.submit(render, [(pid, by_patient[pid]) for pid in chunk]): len(chunk) for chunk in chunks
                }
                for future in as_completed(futures):
                    images, films = future.result()
                    n_images, n_films = n_images + images, n_films + films
                    bar.update(futures[future])
    _write_csvs(out, rows)
    return SynthSummary(
        out_dir=str(out),
        csv_dir=str(out),
        layout=layout,
        seed=seed,
        size=size,
        patients=len(by_patient),
        images=n_images,
        films=n_films,
        abnormalities=len(rows),
        by_type=dict(sorted(Counter(r[5] for r in rows).items())),
        by_pathology=dict(sorted(Counter(r[9] for r in rows).items())),
    )
