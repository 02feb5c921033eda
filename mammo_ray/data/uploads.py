"""Checking and decoding HTTP uploads (DICOM, PNG, TIFF, JPEG) into canonical mammograms.

Pure Python, no Serve or FastAPI: the Serve ingress reads the multipart form, then calls
``check_fields``, ``read_capped`` / ``decode_upload``, ``parse_box`` / ``parse_point`` and
``check_in_bounds``. Every rejection is an ``UploadError`` carrying the HTTP status to answer
with and a reason that names the problem, so that a bad input gets a 4xx JSON reply:

    400  bytes that are not an image, truncated or corrupt files, unreadable DICOM headers
    413  an upload over the byte cap, image dimensions over the cap (checked before any pixel
         is decoded), Pillow's decompression-bomb guard
    415  a DICOM transfer syntax with no decoder here (names the syntax and the package),
         an image mode that cannot be made grayscale
    422  unknown or missing form fields, malformed or out-of-bounds ROI boxes and seed points

Images come out as ``read_dicom`` returns them: float32 (H, W), higher is denser, mirrored so
that the breast lies on the left. Coordinates are pixels of the image as uploaded, x the
column and y the row; a box is half-open, ``image[y0:y1, x0:x1]``. ``canonical_box`` and
``canonical_point`` follow the mirroring.
"""

from __future__ import annotations

import difflib
import io
import json
import math
import re
from collections.abc import Iterable
from dataclasses import dataclass
from dataclasses import field as dc_field
from http import HTTPStatus
from typing import BinaryIO, Literal

import numpy as np
from PIL import Image, ImageOps

from mammo_ray.constants import View
from mammo_ray.data.dicom import (
    DEFAULT_MAX_DIM,
    UPLOAD_NAME,
    DicomMeta,
    DicomReadError,
    DicomTooLargeError,
    DicomUnsupportedError,
    breast_on_right,
    read_dicom,
)

DEFAULT_MAX_UPLOAD_BYTES = 100 * 2**20
NOT_AN_IMAGE = "not a DICOM, PNG, TIFF or JPEG image"
_MAX_COORD_TEXT = 256  # longer box/seed strings are rejected before parsing
_INTEGRAL = re.compile(r"[+-]?[0-9]+(?:\.0*)?")  # "12", "-3", "12.0"; not "1_000", "1e3", "١٢"

# Magic bytes at offset 0 (DICOM's "DICM" sits at 128, after the preamble).
_MAGIC = (
    (b"\x89PNG\r\n\x1a\n", "png"),
    (b"II*\x00", "tiff"),
    (b"MM\x00*", "tiff"),
    (b"II+\x00", "tiff"),
    (b"MM\x00+", "tiff"),  # + BigTIFF
    (b"\xff\xd8\xff", "jpeg"),
)
# The reply's "error": fixed here, since http.HTTPStatus phrases change between Pythons
# (413 is "Request Entity Too Large" in 3.11, "Content Too Large" in 3.13).
_ERROR_NAMES = {
    400: "Bad Request",
    413: "Payload Too Large",
    415: "Unsupported Media Type",
    422: "Unprocessable Entity",
}
_PIL_FORMAT = {"png": "PNG", "tiff": "TIFF", "jpeg": "JPEG"}
_SIXTEEN_BIT_MODES = {"I;16", "I;16L", "I;16B", "I;16N"}  # kept as stored, not cut to 8 bits

Kind = Literal["dicom", "png", "tiff", "jpeg"]
Box = tuple[int, int, int, int]
Point = tuple[int, int]


class UploadError(ValueError):
    """A rejected upload or form value: the HTTP status, the form field and the reason."""

    def __init__(self, status: int, reason: str, field: str | None = None):
        if not 400 <= status < 500:
            raise ValueError(f"UploadError status must be a 4xx code, got {status}")
        self.status, self.reason, self.field = int(status), reason, field
        super().__init__(f"{field}: {reason}" if field else reason)

    def to_dict(self) -> dict:
        """The JSON body of the reply, e.g. ``{"error": "Payload Too Large", ...}``."""
        error = _ERROR_NAMES.get(self.status) or HTTPStatus(self.status).phrase
        return {"error": error, "field": self.field, "reason": self.reason, "status": self.status}

    def __reduce__(self):  # survives pickling, e.g. out of a Ray Serve replica
        return type(self), (self.status, self.reason, self.field)


@dataclass(frozen=True)
class DecodedImage:
    image: np.ndarray  # float32 (H, W), canonical: denser is higher, breast on the left
    flipped: bool  # mirrored left-right into canonical orientation
    kind: Kind  # the format the bytes were sniffed as
    name: str  # the upload's file name (or "<upload>")
    view: View | None  # DICOM header (or file-name tokens, as read_dicom); None otherwise
    meta: DicomMeta | None = None  # the DICOM header, for side and pixel spacing; None otherwise
    shape: tuple[int, int] = dc_field(init=False)  # (H, W), the same before and after mirroring

    def __post_init__(self):
        object.__setattr__(self, "shape", (int(self.image.shape[0]), int(self.image.shape[1])))


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
    """Check and decode one uploaded image; every failure is an ``UploadError``.

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
    if len(data) > max_bytes:
        raise UploadError(413, f"{name}: upload is {len(data)} bytes, over the size limit of {max_bytes} bytes", field)
    if len(data) == 0:
        raise UploadError(400, f"{name}: empty upload (0 bytes): {NOT_AN_IMAGE}", field)
    kind = sniff(data)
    if kind == "dicom" or (kind is None and force_dicom):
        return _decode_dicom(bytes(data), name, field, max_dim)
    if kind is None:
        raise UploadError(400, f"{name}: {NOT_AN_IMAGE} (unrecognised leading bytes {bytes(data[:8]).hex(' ')})", field)
    return _decode_pillow(bytes(data), kind, name, field, max_dim)


def sniff(data: bytes) -> Kind | None:
    """The format by magic bytes, or None. A DICOM preamble wins (it may hold a TIFF header)."""
    if len(data) >= 132 and data[128:132] == b"DICM":
        return "dicom"
    for magic, kind in _MAGIC:
        if data[: len(magic)] == magic:
            return kind
    return None


def _decode_dicom(data: bytes, name: str, field: str, max_dim: int) -> DecodedImage:
    try:  # read_dicom checks the header (dimensions included) before decoding any pixel
        image, meta = read_dicom(data, name=name, max_rows=max_dim, max_cols=max_dim)
    except DicomTooLargeError as exc:
        raise UploadError(413, str(exc), field) from exc
    except DicomUnsupportedError as exc:
        raise UploadError(415, str(exc), field) from exc
    except DicomReadError as exc:
        raise UploadError(400, str(exc), field) from exc
    except Exception as exc:  # a pydicom path that escaped read_dicom's mapping: still the input's fault
        raise UploadError(400, f"{name}: cannot read the DICOM ({type(exc).__name__}: {exc})", field) from exc
    return DecodedImage(image=image, flipped=meta.flipped, kind="dicom", name=name, view=meta.view, meta=meta)


def _decode_pillow(data: bytes, kind: Kind, name: str, field: str, max_dim: int) -> DecodedImage:
    label = kind.upper()
    try:
        # Image.open parses the header only (and applies Pillow's own pixel-count bomb check);
        # nothing is decoded before load(), so our dimension cap comes first.
        with Image.open(io.BytesIO(data), formats=[_PIL_FORMAT[kind]]) as im:
            width, height = im.size
            if width > max_dim or height > max_dim:
                raise UploadError(
                    413,
                    f"{name}: image dimensions {height}x{width} (rows x columns) exceed the limit {max_dim}x{max_dim}",
                    field,
                )
            if width <= 0 or height <= 0:
                raise UploadError(400, f"{name}: zero image dimensions ({height}x{width})", field)
            if getattr(im, "n_frames", 1) != 1:
                raise UploadError(400, f"{name}: {label} has {im.n_frames} frames: expected one 2-D mammogram", field)
            im.load()
            pixels = _grayscale(_upright(im), name, label, field)
    except UploadError:
        raise
    except Image.UnidentifiedImageError as exc:  # its message is only the BytesIO's repr
        raise UploadError(400, f"{name}: cannot read the {label} header (truncated or corrupt)", field) from exc
    except Image.DecompressionBombError as exc:
        raise UploadError(413, f"{name}: {label} is too large to decode ({exc})", field) from exc
    except Exception as exc:  # OSError "truncated", SyntaxError, zlib/struct errors, ...
        raise UploadError(400, f"{name}: cannot decode the {label} image ({type(exc).__name__}: {exc})", field) from exc
    image = np.asarray(pixels, dtype=np.float32)
    if image.ndim != 2:
        raise UploadError(415, f"{name}: {label} decodes to shape {image.shape}, not a 2-D image", field)
    if not np.isfinite(image).all():
        raise UploadError(400, f"{name}: {label} holds NaN or infinite pixel values", field)
    flipped = breast_on_right(image)
    if flipped:
        image = np.fliplr(image)
    return DecodedImage(image=np.ascontiguousarray(image), flipped=flipped, kind=kind, name=name, view=None)


def _upright(im: Image.Image) -> Image.Image:
    """Apply the EXIF orientation, as a viewer (and the client placing a box) shows it."""
    try:
        return ImageOps.exif_transpose(im)
    except Exception:  # noqa: BLE001 - a malformed EXIF block is no reason to reject the pixels
        return im


def _grayscale(im: Image.Image, name: str, label: str, field: str) -> np.ndarray:
    """One channel at the stored depth: 16-bit, 32-bit int and float modes keep their values."""
    if im.mode in _SIXTEEN_BIT_MODES or im.mode in ("L", "I", "F"):
        return np.asarray(im)
    try:
        return np.asarray(im.convert("L"))  # 1, P, LA, RGB(A), CMYK, YCbCr: luminance
    except (ValueError, OSError) as exc:
        raise UploadError(415, f"{name}: {label} mode {im.mode!r} cannot be made grayscale ({exc})", field) from exc


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


def canonical_box(box: Box | None, decoded: DecodedImage) -> Box | None:
    """A box on the uploaded image in the coordinates of ``decoded.image`` (mirrored if it was)."""
    if box is None or not decoded.flipped:
        return box
    x0, y0, x1, y1 = box
    width = decoded.shape[1]
    return width - x1, y0, width - x0, y1


def canonical_point(point: Point | None, decoded: DecodedImage) -> Point | None:
    """A point on the uploaded image in the coordinates of ``decoded.image``."""
    if point is None or not decoded.flipped:
        return point
    return decoded.shape[1] - 1 - point[0], point[1]


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
