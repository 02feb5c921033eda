"""HTTP uploads: the multipart form's files and fields, checked, with every rejection a 4xx.

Pure Python, no Serve or FastAPI: the Serve ingress reads the multipart form, then calls
``check_fields``, ``read_capped`` / ``decode_upload``, ``parse_box`` / ``parse_point`` /
``parse_threshold`` and ``check_in_bounds``. The pixels come from the one image decoder every entry
point uses (``mammo_ray.data.images.read_image``), so an upload decodes exactly as ``mammo-ray
localize`` reads the same file from disk; this module only maps its errors to HTTP statuses. Every rejection
is an ``UploadError`` carrying the HTTP status to answer with and a reason that names the problem,
so that a bad input gets a 4xx JSON reply:

    400  bytes that are not an image, truncated or corrupt files, unreadable DICOM headers
    413  an upload over the byte cap, image dimensions over the cap (checked before any pixel
         is decoded), Pillow's decompression-bomb guard
    415  a DICOM transfer syntax with no decoder here (names the syntax and the package),
         an image mode that cannot be made grayscale
    422  unknown or missing form fields, malformed or out-of-bounds ROI boxes and seed points,
         a threshold that is not a decimal from 0 to 1

Coordinates are pixels of the image as uploaded, x the column and y the row; a box is half-open,
``image[y0:y1, x0:x1]`` (``data.images.canonical_box`` follows the decoder's mirroring).
"""

from __future__ import annotations

import contextlib
import difflib
import json
import math
import re
from collections.abc import Iterable, Iterator
from http import HTTPStatus
from typing import Any, BinaryIO

from mammo_ray.data.dicom import (
    DEFAULT_MAX_DIM,
    UPLOAD_NAME,
    DicomReadError,
    DicomTooLargeError,
    DicomUnsupportedError,
)
from mammo_ray.data.images import (
    Box,
    DecodedImage,
    ImageReadError,
    ImageTooLargeError,
    ImageUnsupportedError,
    Point,
    read_image,
)

DEFAULT_MAX_UPLOAD_BYTES = 100 * 2**20
_MAX_COORD_TEXT = 256  # longer box/seed strings are rejected before parsing
_INTEGRAL = re.compile(r"[+-]?[0-9]+(?:\.0*)?")  # "12", "-3", "12.0"; not "1_000", "1e3", "١٢"

# The ROI texts as regular expressions, for the OpenAPI form (ECMA-262 and Python's `re` read them
# alike): blank (absent), or the integers of `_parse_ints` and not negative, as "x0,y0,x1,y1" with
# any spaces around the items, or as a JSON list ("-0" and "12.0" are integers, "-1" is not). What no
# pattern says: at most _MAX_COORD_TEXT characters once stripped, a JSON list's exponents ("1e2",
# accepted), x1 > x0 and y1 > y0, and that the box or point lies inside the image.
_PLAIN_INT = r"(?:\+?[0-9]+|-0+)(?:\.0*)?"
_JSON_INT = r"(?:-?0|[1-9][0-9]*)(?:\.0+)?"
_JSON_SPACE = r"[ \t\n\r]*"


def coordinates_pattern(count: int) -> str:
    """The pattern of a box (``count=4``) or a point (``count=2``) as ``parse_box`` / ``parse_point`` read it."""
    plain = rf"(?:{_PLAIN_INT}\s*,\s*){{{count - 1}}}{_PLAIN_INT}"
    listed = rf"\[{_JSON_SPACE}(?:{_JSON_INT}{_JSON_SPACE},{_JSON_SPACE}){{{count - 1}}}{_JSON_INT}{_JSON_SPACE}\]"
    return rf"^\s*(?:{plain}|{listed})?\s*$"


# A threshold as the form gives it: a decimal from 0 to 1 ("0.35", ".5", "1"), or blank (absent).
THRESHOLD_PATTERN = r"^\s*(?:0?\.[0-9]+|0(?:\.[0-9]*)?|1(?:\.0*)?)?\s*$"


# The reply's "error": fixed here, since http.HTTPStatus phrases change between Pythons
# (413 is "Request Entity Too Large" in 3.11, "Content Too Large" in 3.13).
_ERROR_NAMES = {
    400: "Bad Request",
    413: "Payload Too Large",
    415: "Unsupported Media Type",
    422: "Unprocessable Entity",
}


class UploadError(ValueError):
    """A rejected upload or form value: the HTTP status, the form field and the reason."""

    def __init__(self, status: int, reason: str, field: str | None = None):
        if not 400 <= status < 500:
            raise ValueError(f"UploadError status must be a 4xx code, got {status}")
        self.status, self.reason, self.field = int(status), reason, field
        super().__init__(f"{field}: {reason}" if field else reason)

    def to_dict(self) -> dict[str, Any]:
        """The JSON body of the reply, e.g. ``{"error": "Payload Too Large", ...}``."""
        error = _ERROR_NAMES.get(self.status) or HTTPStatus(self.status).phrase
        return {"error": error, "field": self.field, "reason": self.reason, "status": self.status}

    def __reduce__(self) -> tuple[type[UploadError], tuple[int, str, str | None]]:  # survives pickling (Serve)
        return type(self), (self.status, self.reason, self.field)


def read_capped(
    stream: BinaryIO, *, max_bytes: int = DEFAULT_MAX_UPLOAD_BYTES, field: str, name: str | None = UPLOAD_NAME
) -> bytes:
    """Read a file object (e.g. ``UploadFile.file``) but never more than ``max_bytes + 1`` bytes."""
    data = stream.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise UploadError(413, f"{name or UPLOAD_NAME}: upload is over the size limit of {max_bytes} bytes", field)
    return data


def decode_upload(
    data: bytes,
    *,
    name: str | None = UPLOAD_NAME,
    field: str,
    max_bytes: int = DEFAULT_MAX_UPLOAD_BYTES,
    max_dim: int = DEFAULT_MAX_DIM,
    force_dicom: bool = False,
) -> DecodedImage:
    """Check and decode one uploaded image (``data.images.read_image``); every failure is an ``UploadError``.

    Args:
        data: the uploaded bytes.
        name: the upload's file name, for messages (and DICOM side/view tokens).
        field: the form field the file came in.
        max_bytes: uploads larger than this are rejected (413) before anything is parsed.
        max_dim: rows or columns above this are rejected (413) from the header, before decoding.
        force_dicom: also try bytes with no DICOM preamble as a bare DICOM data set (old
            exports). Off by default: anything then gets parsed as DICOM tags.
    """
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise TypeError(f"decode_upload takes the file's bytes, got {type(data).__name__}")
    name = name or UPLOAD_NAME  # UploadFile.filename may be None
    with upload_errors(field, name):
        return read_image(data, name=name, max_bytes=max_bytes, max_dim=max_dim, force_dicom=force_dicom)


@contextlib.contextmanager
def upload_errors(field: str, name: str) -> Iterator[None]:
    """Decoder errors as ``UploadError``: 413 too large, 415 no decoder or no grayscale, 400 the rest."""
    try:
        yield
    except (DicomTooLargeError, ImageTooLargeError) as exc:
        raise UploadError(413, str(exc), field) from exc
    except (DicomUnsupportedError, ImageUnsupportedError) as exc:
        raise UploadError(415, str(exc), field) from exc
    except (DicomReadError, ImageReadError) as exc:
        raise UploadError(400, str(exc), field) from exc
    except UploadError:
        raise
    except Exception as exc:  # a decoder path that escaped the mapping: still the input's fault
        raise UploadError(400, f"{name}: cannot decode the image ({type(exc).__name__}: {exc})", field) from exc


# --- form values ----------------------------------------------------------------------------


def check_fields(received: Iterable[str], allowed: set[str], required: set[str]) -> None:
    """Raise 422 naming every unknown field (with the closest allowed one) and every missing one."""
    received = list(received)
    unknown = list(dict.fromkeys(f for f in received if f not in allowed))
    missing = sorted(set(required) - set(received))
    if not unknown and not missing:
        return
    expected = ", ".join(sorted(allowed))
    parts = []
    for name in unknown:
        close = difflib.get_close_matches(name, sorted(allowed), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        parts.append(f"unknown form field {name!r}{hint}; expected one of: {expected}")
    parts += [f"missing required form field {name!r}" for name in missing]
    raise UploadError(422, "; ".join(parts), (unknown or missing)[0])


def parse_box(text: str | None, field: str = "box") -> Box | None:
    """``"x0,y0,x1,y1"`` or a JSON list of four integers; None (or blank) when absent.

    The box is half-open (``image[y0:y1, x0:x1]``), so it needs ``x1 > x0`` and ``y1 > y0``.
    """
    values = _parse_ints(text, 4, field, "x0,y0,x1,y1")
    if values is None:
        return None
    x0, y0, x1, y1 = values
    if min(values) < 0:
        raise UploadError(422, f"box {text!r} has a negative coordinate", field)
    if x1 <= x0 or y1 <= y0:
        raise UploadError(422, f"box {text!r} is empty: it needs x1 > x0 and y1 > y0 (x0,y0,x1,y1)", field)
    return x0, y0, x1, y1


def parse_point(text: str | None, field: str = "seed") -> Point | None:
    """``"x,y"`` or a JSON list of two integers (column, row); None (or blank) when absent."""
    values = _parse_ints(text, 2, field, "x,y")
    if values is None:
        return None
    if min(values) < 0:
        raise UploadError(422, f"point {text!r} has a negative coordinate", field)
    return values[0], values[1]


def parse_threshold(text: str | None, field: str = "threshold") -> float | None:
    """A decimal from 0 to 1 (``THRESHOLD_PATTERN``); None (or blank) when absent."""
    if text is None or not text.strip():
        return None
    if not re.search(THRESHOLD_PATTERN, text):
        raise UploadError(422, f"{text[:40]!r} is not a decimal from 0 to 1 (e.g. 0.35)", field)
    return float(text.strip())


def check_in_bounds(box: Box | Point | None, shape: tuple[int, ...], field: str) -> None:
    """422 unless a box (half-open) or a point lies inside an image of ``shape`` (H, W, ...)."""
    if box is None:
        return
    height, width = int(shape[0]), int(shape[1])
    if len(box) == 4:
        x0, y0, x1, y1 = box
        inside = 0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height
        what = f"box {tuple(box)} (x0,y0,x1,y1, x1/y1 exclusive)"
    else:
        x, y = box
        inside = 0 <= x < width and 0 <= y < height
        what = f"point {tuple(box)} (x,y)"
    if not inside:
        raise UploadError(422, f"{what} lies outside the image of {width} columns x {height} rows", field)


def _parse_ints(text: object, count: int, field: str, form: str) -> tuple[int, ...] | None:
    if text is None:
        return None
    if not isinstance(text, str):
        raise UploadError(422, f"expected text {form!r}, got {type(text).__name__}", field)
    stripped = text.strip()
    if not stripped:
        return None
    if len(stripped) > _MAX_COORD_TEXT:
        raise UploadError(422, f"value is {len(stripped)} characters long; expected {form!r}", field)
    if stripped.startswith("["):
        try:
            items = json.loads(stripped)
        except ValueError as exc:
            raise UploadError(
                422, f"{text!r} is not valid JSON ({exc}); expected {form!r} or a JSON list", field
            ) from exc
        if not isinstance(items, list):
            raise UploadError(422, f"{text!r} is not a list; expected {form!r}", field)
    else:
        items = [item.strip() for item in stripped.split(",")]
    if len(items) != count:
        raise UploadError(422, f"{text!r} has {len(items)} values; expected {count}: {form!r}", field)
    return tuple(_to_int(item, text, field, form) for item in items)


def _to_int(item: object, text: str, field: str, form: str) -> int:
    """An integer, or an integral number written "12.0"; anything else is a 422 naming the value."""
    if isinstance(item, int) and not isinstance(item, bool):
        return item
    if isinstance(item, float) and math.isfinite(item) and item.is_integer():
        return int(item)
    if isinstance(item, str) and _INTEGRAL.fullmatch(item):
        return int(item.split(".")[0])
    raise UploadError(422, f"{item!r} in {text!r} is not an integer pixel coordinate ({form})", field)
