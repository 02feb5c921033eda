"""The search leaderboard, shaped like paper 000's Table 1 (see docs/papers.md).

Rows are backbones (and the non-deep baseline); column groups are view mode x augmentation;
each cell is the held-out test accuracy / ROC AUC (patient-level bootstrap 95% CI) / log loss of
the cell's best trial, chosen on the validation metric; the note under the table says which metric
at which level chose the cells' winners and the best configuration overall. Written three ways:
``leaderboard.md`` (the table to read), ``leaderboard.csv`` (the same table, one column per cell
and measure) and ``leaderboard_long.csv`` (one row per cell, every number, for analysis).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd

# How far the probability can be read as one (decisions.report; thresholds and calibration from val):
# per image and per exam, the Brier score and the ECE before and after calibration, and average precision.
CALIBRATION_COLUMNS = tuple(
    f"test_{level}{measure}"
    for level in ("", "exam_")
    for measure in ("brier", "ece", "ece_calibrated", "average_precision")
)
LONG_COLUMNS = [
    "backbone",
    "column",
    "view_mode",
    "augment",
    "status",
    "test_acc",
    "test_auc",
    "test_auc_ci_low",
    "test_auc_ci_high",
    "test_loss",
    "test_n",
    *CALIBRATION_COLUMNS,
    "val_metric",
    "val_exam_loss",
    "trial_id",
    "run_id",
    "trials",
]
MEASURES = ("acc", "auc", "auc_ci_low", "auc_ci_high", "loss")


def leaderboard_frame(rows: Sequence[dict[str, Any]]) -> pd.DataFrame:
    """One row per cell (``LONG_COLUMNS``); missing entries are NaN."""
    frame = pd.DataFrame(list(rows))
    for column in LONG_COLUMNS:
        if column not in frame.columns:
            frame[column] = math.nan
    return frame[LONG_COLUMNS]


def _fmt(value: Any, digits: int = 2) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def cell_text(row: pd.Series) -> str:
    """``0.78 / 0.84 (0.71-0.95) / 0.52``: accuracy / AUC (CI) / loss, or why there is none."""
    if row["status"] != "ok":
        return str(row["status"])
    return (
        f"{_fmt(row['test_acc'])} / {_fmt(row['test_auc'])} ({_fmt(row['test_auc_ci_low'])}-"
        f"{_fmt(row['test_auc_ci_high'])}) / {_fmt(row['test_loss'])}"
    )


def calibration_text(row: pd.Series) -> str:
    """``0.19 / 0.12 -> 0.04``: Brier score / ECE before -> after calibration (per image), or why there is none."""
    if row["status"] != "ok":
        return str(row["status"])
    return f"{_fmt(row['test_brier'])} / {_fmt(row['test_ece'])} -> {_fmt(row['test_ece_calibrated'])}"


def _ordered(values: pd.Series) -> list[str]:
    return list(dict.fromkeys(values.astype(str)))


def wide_table(long: pd.DataFrame, text: Any = cell_text) -> pd.DataFrame:
    """Rows backbones, columns the cells' column groups, entries ``text(row)`` (``cell_text``); ""
    where a backbone has no such cell (the baseline has no multi-modal variant)."""
    table = pd.DataFrame(index=_ordered(long["backbone"]), columns=_ordered(long["column"]), dtype=object).fillna("")
    for _, row in long.iterrows():
        table.loc[str(row["backbone"]), str(row["column"])] = text(row)
    table.index.name = "method"
    return table


def _rows(table: pd.DataFrame) -> list[str]:
    header = ["method", *table.columns]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join([str(method), *(str(v) for v in row)]) + " |" for method, row in table.iterrows()]


def to_markdown(table: pd.DataFrame, title: str, selection: str = "", calibration: pd.DataFrame | None = None) -> str:
    lines = [f"**{title}**", "", *_rows(table)]
    lines += [
        "",
        "Each cell: test accuracy / ROC AUC (95% CI, bootstrap over patients) / log loss of the cell's "
        "best trial by validation metric.",
    ]
    if calibration is not None:
        lines += [
            "",
            *_rows(calibration),
            "",
            "Each cell: test Brier score / expected calibration error (equal-mass bins, per image) before -> "
            "after the calibration fitted on the validation split.",
        ]
    if selection:
        lines += ["", selection]
    lines += ["", "For research use only. Not for use in diagnostic procedures."]
    return "\n".join(lines) + "\n"


def write_leaderboard(
    rows: Sequence[dict[str, Any]], out_dir: str | Path, *, title: str, selection: str = ""
) -> dict[str, Any]:
    """Write ``leaderboard.{md,csv}`` and ``leaderboard_long.csv``; return their paths and the Markdown.

    ``selection`` (``search.selection_text``) says under the table which metric, at which level,
    chose each cell's best trial and the best configuration overall."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    long = leaderboard_frame(rows)
    long.to_csv(out_dir / "leaderboard_long.csv", index=False)
    wide = pd.DataFrame(index=_ordered(long["backbone"]))
    wide.index.name = "method"
    for _, row in long.iterrows():
        for measure in MEASURES:
            value = row[f"test_{measure}"] if row["status"] == "ok" else math.nan
            wide.loc[str(row["backbone"]), f"{row['column']} {measure}"] = value
    wide.to_csv(out_dir / "leaderboard.csv")
    markdown = to_markdown(wide_table(long), title, selection, calibration=wide_table(long, calibration_text))
    (out_dir / "leaderboard.md").write_text(markdown)
    return {
        "csv": str(out_dir / "leaderboard.csv"),
        "long_csv": str(out_dir / "leaderboard_long.csv"),
        "markdown": str(out_dir / "leaderboard.md"),
        "text": markdown,
    }
