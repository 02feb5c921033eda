"""The phantom simulator: synthetic CBIS-DDSM-shaped datasets (not the data pipeline).

``cbis.synthesize`` writes the four case-description CSVs and the DICOM tree they name, either
for invented patients or, with ``from_csv``, as a replica of the real CSVs with every structural
quirk they have; ``phantom`` draws breasts, masses and calcifications; ``dicom_write`` writes
the DICOM files. The data pipeline (``mammo_ray.data``) reads what this writes exactly as it
reads a real download.
"""

from pathlib import Path

from mammo_ray.data.synthetic.cbis import SynthSummary, synthesize

# The four real CBIS-DDSM case-description CSVs (CC BY 3.0; attribution in their README), shipped
# so that ``synth_from_csv: cbis-ddsm`` builds the full-structure replica anywhere mammo-ray runs.
REAL_CBIS_CSVS = Path(__file__).resolve().parent / "cbis_ddsm_csvs"


def csv_source(value: str | Path) -> Path:
    """The CSV folder a ``from_csv`` value names: ``cbis-ddsm`` is the shipped copy of the real CSVs."""
    return REAL_CBIS_CSVS if str(value) == "cbis-ddsm" else Path(value)


__all__ = ["REAL_CBIS_CSVS", "SynthSummary", "csv_source", "synthesize"]
