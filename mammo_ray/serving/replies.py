"""The HTTP API's replies as pydantic models: what ``/openapi.json`` documents and the contract test
holds the served app to. Every reply carries the disclaimer.
For research use only. Not for use in diagnostic procedures.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from mammo_ray.constants import DISCLAIMER


class MemberSummary(BaseModel):
    count: int
    mean: float
    std: float
    quantiles: dict[str, float]
    probabilities: list[float]  # each member's P(class 1), in member order


class Uncertainty(BaseModel):
    """The members' disagreement (bits, except std): see mammo_ray.decisions.referral."""

    std: float  # the members' standard deviation
    entropy: float  # total: entropy of the mean probability
    expected_entropy: float  # aleatoric: the members' mean entropy
    mutual_information: float  # epistemic: entropy - expected entropy (0 for one network)


class Referral(BaseModel):
    refer: bool | None  # refer to a reader; None: the model has no decision policy
    reason: str
    measure: str | None = None  # the uncertainty measure compared with the cut-off
    value: float | None = None
    cutoff: float | None = None  # chosen on the validation split for the model's target referral rate


class OperatingLabel(BaseModel):
    name: str  # e.g. sensitivity_at_specificity_0.90
    threshold: float  # on the calibrated probability, chosen on the validation split
    label: str  # the class at that threshold


class PredictReply(BaseModel):
    probability: float  # P(class 1): malignancy for the pathology task; mean over members (and CC, MLO)
    calibrated_probability: float | None  # `probability` through the model's calibration (fitted on val); None: none
    label: str  # the class at `threshold`: malignant / benign (mass / no_mass, calcification / mass)
    threshold: float
    task: str
    members: MemberSummary
    uncertainty: Uncertainty
    refer: Referral
    operating_points: list[OperatingLabel]  # the label at each validation-chosen operating threshold
    views: dict[str, float]  # per-view probabilities
    model_version: str
    disclaimer: str = Field(json_schema_extra={"const": DISCLAIMER})


class Box(BaseModel):
    x0: int  # left edge (inclusive), original pixels of the stored image
    y0: int  # top edge (inclusive)
    x1: int  # right edge (exclusive)
    y1: int  # bottom edge (exclusive)
    score: float  # the map's maximum inside the blob
    area: float  # blob size in original pixels


class HeatmapLayers(BaseModel):
    """The map and the members' spread as 8-bit grayscale PNGs on /v1/preview's pixel grid (stored orientation)."""

    size: list[int]  # (h, w) of both PNGs: the image scaled by `scale`
    scale: float  # PNG pixels per original pixel
    spread_max: float  # the spread PNG's 255: the largest member std
    map_png_base64: str  # the map clipped to [0, 1], times 255
    spread_png_base64: str  # the member std divided by spread_max, times 255


class PreviewReply(BaseModel):
    """/v1/preview: the upload as the page shows it, decoded as every route decodes it."""

    image_png_base64: str  # 8-bit grayscale, stored orientation, long side at most 1024 px
    image_size: list[int]  # (H, W) of the upload
    scale: float  # PNG pixels per original pixel
    kind: str  # the format the bytes were read as: dicom, png, tiff, jpeg
    view: str | None  # CC or MLO from the DICOM header (or the file name), else null
    disclaimer: str = Field(json_schema_extra={"const": DISCLAIMER})


class LocalizeReply(BaseModel):
    method: Literal["dense", "cam", "gradcam"]  # how the map was made: the model's default or the `method` field
    map_values: str  # what the map's numbers are (a probability for dense, a relative activation for cam/gradcam)
    boxes: list[Box]  # blobs of the map >= `threshold`, highest score first
    image_score: float
    image_score_means: str  # dense: the map's maximum; cam/gradcam: the members' mean P(class 1) of the image
    threshold: float
    image_size: list[int]  # (H, W) of the upload
    map_shape: list[int]  # (h, w) of the map grid
    map_stride_px: float  # original pixels per map cell
    window_px: int | None  # dense: the patch side in original pixels; None for cam/gradcam
    max_spread: float  # largest member std of the map (0 for one member)
    heatmap_png_base64: str | None = None  # heatmap=png|both: the overlay with the boxes
    heatmap_array: list[list[float]] | None = None  # heatmap=array|both: the map grid, stored orientation
    heatmap_array_geometry: dict[str, Any] | None = None  # cell_px and offset_px of heatmap_array
    heatmap_layers: HeatmapLayers | None = None  # heatmap=layers: the map and member spread as the page draws them
    model_version: str
    disclaimer: str = Field(json_schema_extra={"const": DISCLAIMER})


class ErrorReply(BaseModel):
    """The body of every 4xx and 5xx reply."""

    model_config = ConfigDict(extra="forbid")

    error: str  # the status's phrase, e.g. "Unprocessable Entity"
    field: str | None  # the form field at fault; null when it is the request as a whole
    reason: str  # what was wrong, naming the value
    status: int = Field(ge=400, le=599)
    disclaimer: str = Field(json_schema_extra={"const": DISCLAIMER})


class HealthReply(BaseModel):
    """/v1/health: 200 once ready, else 503 with the reason."""

    model_config = ConfigDict(extra="allow")

    status: Literal["ready", "loading", "failed"]
    reason: str | None = None  # why it is not ready
    members: int | None = None
    execution: str | None = None  # loop or stacked
    device: str | None = None
    disclaimer: str = Field(json_schema_extra={"const": DISCLAIMER})
