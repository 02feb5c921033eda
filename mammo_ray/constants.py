"""Domain vocabulary: views, sides, pathology, abnormality types, and the disclaimer.

Every dataset spells these differently (``L``/``LEFT``, ``BENIGN_WITHOUT_CALLBACK``,
``calcification``/``calc``); they are parsed once, at the edge, with ``parse``.
"""

from __future__ import annotations

import enum
from typing import Self

DISCLAIMER = "For research use only. Not for use in diagnostic procedures."


class _ParsableEnum(str, enum.Enum):  # noqa: UP042 - StrEnum changes str() of members, which outputs use
    """A string enum with a forgiving ``parse`` for dataset spellings."""

    @classmethod
    def _aliases(cls) -> dict[str, str]:
        return {}

    @classmethod
    def parse(cls, value: object) -> Self:
        """Parse a dataset spelling; raise ValueError naming the value otherwise."""
        if isinstance(value, cls):
            return value
        text = str(value).strip().upper().replace(" ", "_").replace("-", "_")
        text = cls._aliases().get(text, text)
        try:
            return cls(text)
        except ValueError:
            allowed = ", ".join(m.value for m in cls)
            raise ValueError(f"{cls.__name__}: cannot parse {value!r} (expected one of {allowed})") from None


class View(_ParsableEnum):
    CC = "CC"
    MLO = "MLO"

    @classmethod
    def _aliases(cls) -> dict[str, str]:
        # DICOM ViewPosition / ViewCodeSequence meanings seen in the wild.
        return {
            "CRANIO_CAUDAL": "CC",
            "CRANIOCAUDAL": "CC",
            "MEDIO_LATERAL_OBLIQUE": "MLO",
            "MEDIOLATERAL_OBLIQUE": "MLO",
            "ML": "MLO",
            "LM": "MLO",
            "XCC": "CC",
            "CCX": "CC",
            "LMO": "MLO",
        }


class Side(_ParsableEnum):
    LEFT = "LEFT"
    RIGHT = "RIGHT"

    @classmethod
    def _aliases(cls) -> dict[str, str]:
        return {"L": "LEFT", "R": "RIGHT"}

    @property
    def code(self) -> str:
        """The one-letter DICOM spelling (ImageLaterality)."""
        return self.value[0]


class Pathology(_ParsableEnum):
    MALIGNANT = "MALIGNANT"
    BENIGN = "BENIGN"
    BENIGN_WITHOUT_CALLBACK = "BENIGN_WITHOUT_CALLBACK"

    @property
    def label(self) -> int:
        """Binary malignancy label: 1 malignant, 0 benign (with or without callback)."""
        return int(self is Pathology.MALIGNANT)


class AbnormalityType(_ParsableEnum):
    MASS = "MASS"
    CALCIFICATION = "CALCIFICATION"

    @classmethod
    def _aliases(cls) -> dict[str, str]:
        return {"CALC": "CALCIFICATION", "CALCIFICATIONS": "CALCIFICATION", "MASSES": "MASS"}


class Split(_ParsableEnum):
    TRAIN = "TRAIN"
    VAL = "VAL"
    TEST = "TEST"

    @classmethod
    def _aliases(cls) -> dict[str, str]:
        return {"VALIDATION": "VAL", "TRAINING": "TRAIN"}


class Task(_ParsableEnum):
    """What a classifier predicts (the label column a task reads)."""

    PATHOLOGY = "PATHOLOGY"  # benign (0) vs malignant (1)
    ABNORMALITY = "ABNORMALITY"  # mass (0) vs calcification (1), paper 004
    MASS_PRESENCE = "MASS_PRESENCE"  # no mass (0) vs mass (1) patches, paper 003


CLASS_NAMES: dict[Task, tuple[str, str]] = {
    Task.PATHOLOGY: ("benign", "malignant"),
    Task.ABNORMALITY: ("mass", "calcification"),
    Task.MASS_PRESENCE: ("no_mass", "mass"),
}
