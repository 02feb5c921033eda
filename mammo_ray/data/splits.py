"""Patient-level train/val/test splits, k folds, and the leak check.

Splits are by patient, never by image or lesion: all rows of a patient land in one split.

* Who is split: by default only patients with at least one resolved manifest row; the others
  (and their rows) are listed in ``Splits.excluded_patients`` / ``excluded_rows``.
* Fractions (80/10/10 in papers 000, 001, 003) are fractions of *patients*, met per stratum
  by rounding, so the totals are within about one patient per stratum of the target.
* Stratification: a patient's class is the maximum of ``label_column`` over their rows when
  it is numeric (any malignant lesion makes a malignant patient), otherwise its most common
  value (ties: the first in sorted order), e.g. ``abnormality_type`` for paper 004. Strata
  combine that class with the abnormality types the patient has (``composition_strata``), so
  every split gets its share of mass and of calcification patients and the split does not
  depend on which abnormality a model trains on: a mass model and an all-abnormality model
  made with the same seed share their test patients.
* Modes: ``patient`` (default) draws all three splits at random by patient; ``official`` keeps
  the dataset's own test set (CBIS-DDSM's test CSVs; the 31 patients that are in both official
  sets go to test only) and draws val from the official train patients.
* ``balance_eval`` (paper 001): val and test are made class-balanced by patient class, by
  moving randomly chosen surplus patients of the larger classes into train; none are dropped.
* ``folds=K`` (paper 004: an 85/15 split, ``fractions=(0.85, 0, 0.15)``, and five folds):
  K stratified, disjoint patient folds over all non-test patients (train + val). Round k
  validates on ``folds[k]`` and trains on the other non-test patients (``Splits.fold(k)``).

Randomness comes only from ``seed`` (numpy ``default_rng``), applied to sorted patient ids, so
the same manifest and seed give the same splits on every machine.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from mammo_ray.constants import Split

SPLIT_NAMES: tuple[str, ...] = ("train", "val", "test")  # Split values, lower-cased, as rows carry them
_FORMAT = "mammo-ray-splits/1"


class SplitLeakError(ValueError):
    """A patient in two splits (or two folds, or a fold and test); ``.leaks`` maps patient → places."""

    def __init__(self, leaks: dict[str, list[str]], where: str = ""):
        self.leaks = leaks
        shown = "; ".join(f"{p} in {' and '.join(places)}" for p, places in sorted(leaks.items())[:10])
        more = f" (and {len(leaks) - 10} more)" if len(leaks) > 10 else ""
        super().__init__(
            f"{where + ': ' if where else ''}{len(leaks)} patient(s) in more than one split: {shown}{more}"
        )


@dataclass
class Splits:
    """Patient ids per split, optional folds, and how they were made."""

    train: list[str]
    val: list[str]
    test: list[str]
    folds: list[list[str]] | None = None  # K disjoint patient lists over train + val
    seed: int = 0
    fractions: tuple[float, float, float] = (0.8, 0.1, 0.1)  # train/val/test, of patients
    stratify: bool = True
    balance_eval: bool = False
    label_column: str = "label"  # what the strata are made of
    excluded_patients: list[str] = field(default_factory=list)  # not split (no resolved row)
    excluded_rows: int = 0  # manifest rows of those patients
    excluded_reason: str = ""
    mode: str = "patient"  # "patient" (random) or "official" (the dataset's own)
    overlap_patients_in_test: int = 0  # official: patients in both official sets, put in test

    def patients(self, split: str | Split) -> list[str]:
        """Patient ids of ``split`` (a Split or its spelling: "train", "VAL", ...)."""
        return getattr(self, Split.parse(split).value.lower())

    def check_no_leak(self, where: str = "") -> None:
        """Raise SplitLeakError if a patient is in two splits, twice in one, in two folds or in a fold and test."""
        places: dict[str, list[str]] = defaultdict(list)
        for name in SPLIT_NAMES:
            for patient in self.patients(name):
                places[patient].append(name)
        for k, fold in enumerate(self.folds or []):
            for patient in fold:
                places[patient].append(f"fold {k}")
        leaks = {}
        for patient, seen in places.items():
            in_folds = [w for w in seen if w.startswith("fold")]
            in_splits = [w for w in seen if w in SPLIT_NAMES]
            if len(in_splits) > 1 or len(in_folds) > 1 or (in_folds and "test" in in_splits):
                leaks[patient] = seen
        if leaks:
            raise SplitLeakError(leaks, where)

    def assign(self, manifest: pd.DataFrame) -> pd.Series:
        """Split name ("train"/"val"/"test") per manifest row; "" for patients in no split."""
        lookup = {p: name for name in SPLIT_NAMES for p in self.patients(name)}
        return manifest["patient_id"].map(lambda p: lookup.get(p, "")).astype("string").rename("split")

    def assign_folds(self, manifest: pd.DataFrame) -> pd.Series:
        """Fold index per manifest row; -1 for rows outside every fold (test, excluded, no folds)."""
        lookup = {p: k for k, fold in enumerate(self.folds or []) for p in fold}
        return manifest["patient_id"].map(lambda p: lookup.get(p, -1)).astype("int64").rename("fold")

    def fold(self, k: int) -> tuple[list[str], list[str]]:
        """(training patients, validation patients) of fold ``k``."""
        if not self.folds:
            raise ValueError("these splits have no folds (make_splits(..., folds=K))")
        held = set(self.folds[k])
        return sorted(p for f in self.folds for p in f if p not in held), sorted(held)

    def save(self, path: str | Path) -> Path:
        """Write JSON atomically (temp file + rename) after the leak check."""
        self.check_no_leak("refusing to save splits")
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps({"format": _FORMAT, **dataclasses.asdict(self)}, indent=1))
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, path: str | Path) -> Splits:
        """Read a file written by ``save``; unknown keys and leaks are errors naming the file."""
        path = Path(path)
        data = json.loads(path.read_text())
        if data.pop("format", None) != _FORMAT:
            raise ValueError(f"{path}: not a mammo-ray splits file (expected format {_FORMAT!r})")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"{path}: unknown keys {unknown}")
        data["fractions"] = tuple(data.get("fractions", (0.8, 0.1, 0.1)))
        splits = cls(**data)
        splits.check_no_leak(str(path))
        return splits


def patient_strata(manifest: pd.DataFrame, label_column: str = "label") -> pd.Series:
    """Each patient's class for stratification (index: patient_id), as the module docstring says."""
    grouped = manifest.groupby("patient_id", sort=True)[label_column]
    if pd.api.types.is_numeric_dtype(manifest[label_column]):
        return grouped.max()
    return grouped.agg(lambda s: sorted(s.value_counts().loc[lambda c: c == c.max()].index)[0])


def composition_strata(manifest: pd.DataFrame, label_column: str = "label") -> pd.Series:
    """Each patient's stratum: their class (``patient_strata``) and which abnormality types they have.

    Stratifying by the types as well gives every split its share of mass patients and of
    calcification patients, so one split file serves a mass model and an all-abnormality model
    alike (``data.abnormality`` does not change who is in test).
    """
    classes = patient_strata(manifest, label_column).astype(str)
    if "abnormality_type" not in manifest.columns:
        return classes
    types = manifest.groupby("patient_id", sort=True)["abnormality_type"].agg(lambda s: "+".join(sorted(set(s))))
    return classes + "|" + types


def _official_test(manifest: pd.DataFrame) -> tuple[set[str], set[str]]:
    """(test patients, overlap patients) of the dataset's own split; a patient in both sets goes to test."""
    sets: dict[str, set[str]] = {
        patient: set(values.str.lower()) - {""} for patient, values in manifest.groupby("patient_id")["source_split"]
    }
    missing = sorted(p for p, s in sets.items() if not s)
    if missing:
        raise ValueError(
            f"data.split=official needs the dataset's own train/test split (manifest column "
            f"source_split); {len(missing)} patient(s) have none, e.g. {missing[0]!r}"
        )
    unknown = sorted(set().union(*sets.values()) - {"train", "test"})
    if unknown:
        raise ValueError(f"data.split=official: source_split values {unknown} are neither 'train' nor 'test'")
    test = {p for p, s in sets.items() if "test" in s}
    overlap = {p for p, s in sets.items() if s == {"train", "test"}}
    return test, overlap


def make_splits(
    manifest: pd.DataFrame,
    *,
    fractions: tuple[float, float, float] = (0.8, 0.1, 0.1),
    seed: int = 0,
    stratify: bool = True,
    balance_eval: bool = False,
    folds: int | None = None,
    label_column: str = "label",
    require_resolved: bool = True,
    mode: str = "patient",
) -> Splits:
    """Split the manifest's patients into train/val/test (and optional folds); see the module docstring.

    ``mode="official"`` keeps the dataset's own test set (``source_split``, CBIS-DDSM's train/test
    CSVs): every patient with a test row is in test, including the patients that the official
    sets share (counted in ``overlap_patients_in_test``); val is drawn by patient from the official
    train patients, ``fractions[1] / (fractions[0] + fractions[1])`` of them per stratum;
    ``fractions[2]`` is not used.
    """
    if mode not in ("patient", "official"):
        raise ValueError(f"split mode must be 'patient' or 'official', got {mode!r}")
    if len(fractions) != 3 or min(fractions) < 0 or not math.isclose(sum(fractions), 1.0, abs_tol=1e-6):
        raise ValueError(f"fractions must be three non-negative numbers summing to 1, got {fractions}")
    if fractions[0] <= 0:
        raise ValueError(f"the train fraction must be positive, got {fractions}")
    keep = (
        manifest.groupby("patient_id")["resolved"].transform("any")
        if require_resolved
        else pd.Series(True, index=manifest.index)
    )
    excluded = sorted(manifest.loc[~keep, "patient_id"].unique())
    strata = composition_strata(manifest[keep], label_column) if keep.any() else pd.Series(dtype="object")
    if not stratify:
        strata = pd.Series(0, index=strata.index)
    rng = np.random.default_rng(seed)
    parts: dict[str, list[str]] = {name: [] for name in SPLIT_NAMES}
    official_test, overlap = _official_test(manifest[keep]) if mode == "official" else (set(), set())
    for _, members in sorted(strata.groupby(strata), key=lambda kv: str(kv[0])):
        if mode == "official":
            parts["test"] += sorted(p for p in members.index if p in official_test)
            order = list(
                rng.permutation(np.asarray(sorted(p for p in members.index if p not in official_test), dtype=object))
            )
            n_test, share = 0, fractions[1] / (fractions[0] + fractions[1])
        else:
            order = list(rng.permutation(np.asarray(sorted(members.index), dtype=object)))
            n_test, share = math.floor(len(order) * fractions[2] + 0.5), fractions[1]
            parts["test"] += order[:n_test]
        n_val = min(math.floor(len(order) * share + 0.5), len(order) - n_test)
        parts["val"] += order[n_test : n_test + n_val]
        parts["train"] += order[n_test + n_val :]
    if balance_eval:
        classes = patient_strata(manifest[keep], label_column) if keep.any() else pd.Series(dtype="int64")
        for name in ("val", "test") if mode == "patient" else ("val",):  # the official test set stays whole
            parts[name], surplus = _balance(parts[name], classes, rng)
            parts["train"] += surplus
    fold_lists = None
    if folds is not None:
        pool = parts["train"] + parts["val"]
        if not 2 <= folds <= len(pool):
            raise ValueError(f"folds must be between 2 and the {len(pool)} non-test patients, got {folds}")
        fold_lists = _folds(pool, strata, folds, rng)
    splits = Splits(
        train=sorted(parts["train"]),
        val=sorted(parts["val"]),
        test=sorted(parts["test"]),
        folds=fold_lists,
        seed=seed,
        fractions=(fractions[0], fractions[1], fractions[2]),  # a tuple, whatever sequence was given
        stratify=stratify,
        balance_eval=balance_eval,
        label_column=label_column,
        excluded_patients=excluded,
        excluded_rows=int((~keep).sum()),
        excluded_reason="patient has no resolved row" if excluded else "",
        mode=mode,
        overlap_patients_in_test=len(overlap),
    )
    splits.check_no_leak("make_splits")
    return splits


def _balance(patients: list[str], classes: pd.Series, rng: np.random.Generator) -> tuple[list[str], list[str]]:
    """Keep an equal number of patients of every class present in the data; return (kept, surplus)."""
    by_class: dict[object, list[str]] = {c: [] for c in sorted(classes.unique(), key=str)}
    for patient in sorted(patients):
        by_class[classes[patient]].append(patient)
    smallest = min((len(v) for v in by_class.values()), default=0)
    kept, surplus = [], []
    for members in by_class.values():
        order = list(rng.permutation(np.asarray(members, dtype=object)))
        kept += order[:smallest]
        surplus += order[smallest:]
    return kept, surplus


def _folds(pool: list[str], strata: pd.Series, k: int, rng: np.random.Generator) -> list[list[str]]:
    """Deal each stratum's shuffled patients round-robin into k folds (sizes differ by at most one)."""
    out: list[list[str]] = [[] for _ in range(k)]
    position = 0
    pool_strata = strata[sorted(pool)]
    for _, members in sorted(pool_strata.groupby(pool_strata), key=lambda kv: str(kv[0])):
        for patient in rng.permutation(np.asarray(sorted(members.index), dtype=object)):
            out[position % k].append(str(patient))
            position += 1
    return [sorted(f) for f in out]


def summarize(splits: Splits, manifest: pd.DataFrame) -> dict[str, dict[str, int]]:
    """JSON-able counts per split: ``patients``, ``rows`` and rows per class ``<label_column>_<value>``.

    Keys: train, val, test, and excluded when some patients were not split
    (``pd.DataFrame(summary).T`` shows it as a table).
    """
    split = splits.assign(manifest).replace("", "excluded")
    column = splits.label_column
    table = pd.crosstab(split, manifest[column]).rename(columns=lambda v: f"{column}_{v}")
    table.insert(0, "rows", split.value_counts())
    table.insert(0, "patients", manifest.groupby(split)["patient_id"].nunique())
    order = [*SPLIT_NAMES, *(["excluded"] if (split == "excluded").any() else [])]
    table = table.reindex(order).fillna(0).astype("int64")
    return {name: {str(k): int(v) for k, v in table.loc[name].items()} for name in order}
