"""What real CBIS-DDSM does that a tidy dataset would not, and the rules that handle it.

The manifest (``mammo_ray.data.manifest``) flags each quirk per row and ``mammo-ray index``
counts them (``quirk_counts``): films stored twice (under a Mass and a Calc folder), films with
several ROIs, CC and MLO rows of one abnormality id that disagree on the label, masks stored at
another size than their image, and patients in both official sets. ``mark_quirks`` also applies
the exam pairing rule, so that every exam has one label.
"""

from __future__ import annotations

import pandas as pd


def film_ids(rows: pd.DataFrame) -> pd.Series:
    """Each row's film: ``image_id``, or ``<patient>_<side>_<view>`` where it is missing or empty
    (rows of a frame that did not go through ``conform``, such as a cache's own row tables)."""
    derived = rows["patient_id"].astype(str) + "_" + rows["side"].astype(str) + "_" + rows["view"].astype(str)
    if "image_id" not in rows:
        return derived
    given = rows["image_id"].fillna("").astype(str)
    return given.where(given != "", derived)


def exam_base_key(frame: pd.DataFrame) -> pd.Series:
    """(patient, side, abnormality type, abnormality id): the key CBIS-DDSM numbers abnormalities by."""
    return (
        frame["patient_id"]
        + "_"
        + frame["side"]
        + "_"
        + frame["abnormality_type"]
        + "_"
        + frame["abnormality_id"].astype("int64").astype(str)
    ).astype("string")


def mark_quirks(frame: pd.DataFrame) -> pd.DataFrame:
    """Set the quirk flags and apply the exam pairing rule on a conformed manifest; idempotent.

    Pairing rule: CBIS-DDSM numbers abnormalities per image, and the CC and MLO rows of one
    breast that share (patient, side, type, abnormality id) are taken as one lesion seen twice:
    one exam. Where those views disagree on the label (three keys in the real CSVs:
    P_00419 LEFT MASS 1 and 2, P_01623 RIGHT MASS 1), they cannot be one lesion, so they are
    not paired: each view becomes an exam of its own, ``<key>_<VIEW>``, flagged
    ``view_label_conflict``. Within one exam the label is therefore always one value.

    Image identity is the film, ``image_id`` = (patient, side, view): ``shared_film`` marks a
    film listed under both a Mass and a Calc row (the same pixels in two folders);
    ``multi_roi_image`` a film with more than one ROI row; ``in_both_source_splits`` a patient
    in CBIS-DDSM's official train and test sets. ``mask_resampled`` / ``mask_dropped`` are set
    by the indexer, which reads the masks.
    """
    out = frame.copy()
    types = out.groupby("image_id")["abnormality_type"].transform("nunique")
    out["shared_film"] = (types > 1).astype(bool)
    out["multi_roi_image"] = (out.groupby("image_id")["image_id"].transform("size") > 1).astype(bool)
    base = exam_base_key(out)
    conflict = out.groupby(base)["label"].transform("nunique").gt(1).to_numpy()
    out["exam_key"] = base.where(~conflict, base + "_" + out["view"])
    out["view_label_conflict"] = conflict
    official = out[out["source_split"] != ""].groupby("patient_id")["source_split"].nunique()
    both = set(official.index[official > 1])
    out["in_both_source_splits"] = out["patient_id"].isin(both).to_numpy()
    return out


def quirk_counts(manifest: pd.DataFrame) -> dict[str, int]:
    """The ``quirks`` of ``mammo-ray index --json``: how many of each real-data quirk were handled.

    view_label_conflicts: exam keys (patient, side, type, id) whose CC and MLO labels disagree;
    shared_films: films listed under both a Mass and a Calc row; multi_roi_images: films with
    more than one ROI row; resampled_masks / dropped_masks: rows whose mask is stored at another
    size than its image (same aspect ratio: resampled; another: dropped); official_split_overlap_patients:
    patients in both of CBIS-DDSM's own train and test sets.
    """
    conflicts = manifest.loc[manifest["view_label_conflict"]]
    return {
        "view_label_conflicts": int(exam_base_key(conflicts).nunique()) if len(conflicts) else 0,
        "shared_films": int(manifest.loc[manifest["shared_film"], "image_id"].nunique()),
        "multi_roi_images": int(manifest.loc[manifest["multi_roi_image"], "image_id"].nunique()),
        "resampled_masks": int(manifest["mask_resampled"].sum()),
        "dropped_masks": int(manifest["mask_dropped"].sum()),
        "official_split_overlap_patients": int(manifest.loc[manifest["in_both_source_splits"], "patient_id"].nunique()),
    }
