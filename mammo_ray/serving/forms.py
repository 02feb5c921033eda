"""The upload forms of the HTTP API as its OpenAPI schema documents them, and the checks that hold a
request to them (``api.build_api`` uses both). For research use only. Not for use in diagnostic procedures.
"""

from __future__ import annotations

from typing import Any

from fastapi import Request
from starlette.datastructures import FormData
from starlette.datastructures import UploadFile as FormFile

from mammo_ray.serving.uploads import THRESHOLD_PATTERN, UploadError, check_fields, coordinates_pattern


# --- the forms as OpenAPI documents them -------------------------------------------------------------
# FastAPI derives a form's schema from the endpoint's parameters, which cannot say what the endpoint
# checks itself: a file field takes a file (not text, not "null"); `file` with `box`/`seed`, or the
# pair `cc` and `mlo` with theirs, not both; the ROI texts' syntax; no other fields. So the two forms
# are written out here and replace the derived ones (``document_forms``). A blank text field means its
# default, as FastAPI reads forms. What no schema can say answers 4xx, documented in `responses`:
# bytes that are no image (400), too large (413) or without a decoder (415); a ROI outside the image
# or empty, a method the model cannot do (422).
def _upload(description: str) -> dict[str, Any]:
    return {
        "type": "string",
        "format": "binary",
        "contentMediaType": "application/octet-stream",
        "description": description,
    }


def _roi(count: int, image: str) -> dict[str, Any]:
    text = "x0,y0,x1,y1 (x1, y1 exclusive)" if count == 4 else "x,y (column, row)"
    return {
        "type": "string",
        "pattern": coordinates_pattern(count),
        "description": f"ROI {'box' if count == 4 else 'seed point'} {text} in pixels of `{image}` as stored, "
        "or a JSON list; at most 256 characters; outside the image or empty answers 422",
    }


PREDICT_FORM: dict[str, Any] = {
    "title": "PredictForm",
    "description": "One image in `file`, or a CC+MLO pair in `cc` and `mlo`, each with an optional ROI: a box "
    "or a seed point (neither: the server's roi_default).",
    "type": "object",
    "properties": {
        "file": _upload("one DICOM, PNG, TIFF or JPEG image"),
        "box": _roi(4, "file"),
        "seed": _roi(2, "file"),
        "cc": _upload("the CC view of a pair"),
        "mlo": _upload("the MLO view of a pair"),
        "cc_box": _roi(4, "cc"),
        "cc_seed": _roi(2, "cc"),
        "mlo_box": _roi(4, "mlo"),
        "mlo_seed": _roi(2, "mlo"),
    },
    "additionalProperties": False,
    # Each ROI needs its image, `cc` and `mlo` need each other, `file` excludes them, and a form is not
    # empty: so it holds `file` or the pair, not both. (Written without anyOf/oneOf, which schemathesis
    # 4.32 cannot draw for a form holding file bytes.)
    "minProperties": 1,
    "dependentRequired": {
        "box": ["file"],
        "seed": ["file"],
        "cc": ["mlo"],
        "mlo": ["cc"],
        "cc_box": ["cc"],
        "cc_seed": ["cc"],
        "mlo_box": ["mlo"],
        "mlo_seed": ["mlo"],
    },
    "dependentSchemas": {"file": {"properties": {"cc": False, "mlo": False}}},
}


LOCALIZE_FORM: dict[str, Any] = {
    "title": "LocalizeForm",
    "type": "object",
    "properties": {
        "file": _upload("a whole mammogram: DICOM, PNG, TIFF or JPEG"),
        "threshold": {
            "type": "string",
            "pattern": THRESHOLD_PATTERN,
            "description": "box threshold, a decimal from 0 to 1 (e.g. 0.35); blank: the server's localize_threshold",
        },
        "heatmap": {
            "enum": ["png", "array", "both", "layers", "none", ""],
            "default": "png",
            "description": "png: an overlay picture; array: the map grid; both; layers: the map and the member "
            "spread as grayscale PNGs on /v1/preview's grid (the page's); none; blank: png. Ignored by format=dicom",
        },
        "method": {
            "enum": ["dense", "cam", "gradcam", ""],
            "description": "dense (patch classifiers), cam (GAP+FC backbones) or gradcam (any); "
            "blank: dense for patch classifiers, else cam, else gradcam. "
            "One the model cannot do answers 422 with the reason",
        },
    },
    "required": ["file"],
    "additionalProperties": False,
}


PREVIEW_FORM: dict[str, Any] = {
    "title": "PreviewForm",
    "type": "object",
    "properties": {"file": _upload("an image: DICOM, PNG, TIFF or JPEG")},
    "required": ["file"],
    "additionalProperties": False,
}


def document_forms(spec: dict[str, Any]) -> None:
    """Put the upload forms in ``spec`` in place of the forms FastAPI derived."""
    schemas = spec["components"]["schemas"]
    forms = (("/v1/predict", PREDICT_FORM), ("/v1/localize", LOCALIZE_FORM), ("/v1/preview", PREVIEW_FORM))
    for path, form in forms:
        body = spec["paths"][path]["post"]["requestBody"]
        content = body["content"]["multipart/form-data"]
        schemas.pop(content["schema"]["$ref"].rsplit("/", 1)[-1])
        schemas[form["title"]] = form
        content["schema"] = {"$ref": f"#/components/schemas/{form['title']}"}
        body["required"] = True


def check_form(form: FormData, allowed: set[str], required: set[str], files: set[str]) -> None:
    """422 for an unknown, missing or repeated field, or text in a file field (FastAPI reads a blank
    one as absent, and a repeated one as its last value)."""
    check_fields(list(form.keys()), allowed, required)
    for name in sorted(set(form.keys())):
        values = form.getlist(name)
        if len(values) > 1:
            raise UploadError(422, f"{name!r} is given {len(values)} times; send it once", name)
        if name in files and not isinstance(values[0], FormFile):
            raise UploadError(422, f"expected a file upload, got the text {str(values[0])[:40]!r}", name)


def require_form_body(request: Request) -> None:
    """415 unless the body is a form (the upload routes' dependency, so it answers before the fields)."""
    media_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media_type not in ("multipart/form-data", "application/x-www-form-urlencoded"):
        raise UploadError(415, f"the body must be multipart/form-data, not {media_type or 'without a Content-Type'}")
