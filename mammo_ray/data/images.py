"""One image decoder for every entry point: DICOM, PNG, TIFF or JPEG into a canonical mammogram.

``read_image`` serves the CLI (``localize``, ``explain``, ``dream``, ``froc`` through
``localize.whole_image.read_mammogram``) and the HTTP uploads (``serving.uploads.decode_upload``),
so one file gives one array whether it is read from disk or posted to the Serve app. Like MONAI's
reader interface, the format is decided by the file's leading bytes (``sniff``), never by its name:

    DICOM   ``read_dicom``: the header is checked (dimensions included) before any pixel is decoded,
            the modality and VOI LUTs are applied, the laterality header decides the mirroring
    PNG, TIFF, JPEG
            Pillow: the dimension cap is checked on the header before ``load()`` (Pillow's own
            decompression-bomb guard also applies); the EXIF orientation is applied, as a viewer
            (and a client placing a box) shows the image; one channel at the stored depth: 16-bit,
            32-bit integer and float modes keep their values, other modes become luminance (8-bit);
            a breast on the right is mirrored (``breast_on_right``), as ``read_dicom`` does without
            a laterality header

Images come out as ``read_dicom`` returns them: C-contiguous float32 (H, W), higher is denser, the
breast on the left. Coordinates are pixels of the image as stored, x the column and y the row; a
box is half-open, ``image[y0:y1, x0:x1]``. ``canonical_box`` and ``canonical_point`` follow the
mirroring.

Errors name the source and the reason. DICOM failures are ``DicomReadError`` (with its
``DicomTooLargeError`` and ``DicomUnsupportedError``), the other formats' are ``ImageReadError``
(with ``ImageTooLargeError`` and ``ImageUnsupportedError``), so a caller such as the upload layer
tells "too large" and "no decoder" apart from "unreadable" without parsing reasons.
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass
from dataclasses import field as dc_field
from typing import Literal

import numpy as np
from PIL import Image, ImageOps

from mammo_ray.constants import View
from mammo_ray.data.crops import Box
from mammo_ray.data.dicom import (
    DEFAULT_MAX_DIM,
    UPLOAD_NAME,
    DicomMeta,
    DicomReadError,
    breast_on_right,
    read_dicom,
)

NOT_AN_IMAGE = "not a DICOM, PNG, TIFF or JPEG image"

Kind = Literal["dicom", "png", "tiff", "jpeg", "array"]
Point = tuple[int, int]
# A path, or the file's bytes (an upload).
ImageSource = str | os.PathLike[str] | bytes | bytearray | memoryview

# Magic bytes at offset 0 (DICOM's "DICM" sits at 128, after the preamble).
_MAGIC: tuple[tuple[bytes, Kind], ...] = (
    (b"\x89PNG\r\n\x1a\n", "png"),
    (b"II*\x00", "tiff"),
    (b"MM\x00*", "tiff"),
    (b"II+\x00", "tiff"),
    (b"MM\x00+", "tiff"),  # + BigTIFF
    (b"\xff\xd8\xff", "jpeg"),
)
_SNIFF_BYTES = 132  # enough for every magic above, DICOM's included
_PIL_FORMAT = {"png": "PNG", "tiff": "TIFF", "jpeg": "JPEG"}
_SIXTEEN_BIT_MODES = {"I;16", "I;16L", "I;16B", "I;16N"}  # kept as stored, not cut to 8 bits


class ImageReadError(ValueError):
    """A PNG, TIFF or JPEG (or bytes that are no image) that cannot be read: names the source and the reason."""

    def __init__(self, name: str, reason: str):
        self.name, self.reason = name, reason
        super().__init__(f"{name}: {reason}")

    def __reduce__(self) -> tuple[type[ImageReadError], tuple[str, str]]:  # survives pickling (Ray)
        return type(self), (self.name, self.reason)


class ImageTooLargeError(ImageReadError):
    """Over the byte cap, or dimensions over the cap (checked on the header, before decoding)."""


class ImageUnsupportedError(ImageReadError):
    """An image mode that cannot be made one grayscale channel."""


@dataclass(frozen=True)
class DecodedImage:
    image: np.ndarray  # float32 (H, W), canonical: denser is higher, breast on the left
    flipped: bool  # mirrored left-right into canonical orientation
    kind: Kind  # the format the bytes were sniffed as
    name: str  # the file's path or name (an upload's file name, or "<upload>")
    view: View | None  # DICOM header (or file-name tokens, as read_dicom); None otherwise
    meta: DicomMeta | None = None  # the DICOM header, for side and pixel spacing; None otherwise
    shape: tuple[int, int] = dc_field(init=False)  # (H, W), the same before and after mirroring

    def __post_init__(self) -> None:
        object.__setattr__(self, "shape", (int(self.image.shape[0]), int(self.image.shape[1])))


def sniff(data: bytes) -> Kind | None:
    """The format by magic bytes, or None. A DICOM preamble wins (it may hold a TIFF header)."""
    if len(data) >= 132 and data[128:132] == b"DICM":
        return "dicom"
    for magic, kind in _MAGIC:
        if data[: len(magic)] == magic:
            return kind
    return None


def read_image(
    source: ImageSource,
    *,
    name: str | None = None,
    max_bytes: int | None = None,
    max_dim: int = DEFAULT_MAX_DIM,
    force_dicom: bool = False,
) -> DecodedImage:
    """Decode one mammogram file (a path or its bytes) into a canonical float32 image.

    Args:
        source: a path, or the file's bytes.
        name: what errors and ``DecodedImage.name`` call the source (an upload's file name; DICOM
            side and view tokens in it count). Default: the path, or ``"<upload>"`` for bytes.
        max_bytes: larger sources are rejected (``ImageTooLargeError``) before anything is parsed;
            None: no cap.
        max_dim: rows or columns above this are rejected from the header, before decoding
            (``ImageTooLargeError``, or ``DicomTooLargeError`` for a DICOM).
        force_dicom: also try a source with no DICOM preamble as a bare DICOM data set (old
            exports). Off by default: anything then gets parsed as DICOM tags.

    Raises:
        ImageReadError: not an image, unreadable, too large (``ImageTooLargeError``), or a mode
            with no grayscale (``ImageUnsupportedError``).
        DicomReadError: a DICOM that cannot be read (``DicomTooLargeError``, ``DicomUnsupportedError``).
    """
    data: bytes | None = None  # the whole file, once it is read
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
        label, what, size, head = name or UPLOAD_NAME, "upload", len(data), data[:_SNIFF_BYTES]
    else:
        path = os.fsdecode(os.fspath(source))
        label, what = name or path, "file"
        if not os.path.isfile(path):
            raise ImageReadError(label, "file not found" if not os.path.exists(path) else "not a regular file")
        size = os.path.getsize(path)
        with open(path, "rb") as handle:
            head = handle.read(_SNIFF_BYTES)
    if max_bytes is not None and size > max_bytes:
        raise ImageTooLargeError(label, f"{what} is {size} bytes, over the size limit of {max_bytes} bytes")
    if size == 0:
        raise ImageReadError(label, f"empty {what} (0 bytes): {NOT_AN_IMAGE}")
    kind = sniff(head)
    if kind == "dicom" or (kind is None and force_dicom):
        return _read_dicom(data if data is not None else path, name, label, max_dim)
    if kind is None:
        raise ImageReadError(label, f"{NOT_AN_IMAGE} (unrecognised leading bytes {head[:8].hex(' ')})")
    if data is None:
        with open(path, "rb") as handle:
            data = handle.read()
    return _read_pillow(data, kind, label, max_dim)


def _read_dicom(source: ImageSource, name: str | None, label: str, max_dim: int) -> DecodedImage:
    try:  # read_dicom checks the header (dimensions included) before decoding any pixel
        image, meta = read_dicom(source, name=name, max_rows=max_dim, max_cols=max_dim)
    except DicomReadError:
        raise
    except Exception as exc:  # a pydicom path that escaped read_dicom's mapping: still the input's fault
        raise DicomReadError(label, f"cannot read the DICOM ({type(exc).__name__}: {exc})") from exc
    return DecodedImage(image=image, flipped=meta.flipped, kind="dicom", name=meta.path, view=meta.view, meta=meta)


def _read_pillow(data: bytes, kind: Kind, name: str, max_dim: int) -> DecodedImage:
    label = kind.upper()
    try:
        # Image.open parses the header only (and applies Pillow's own pixel-count bomb check);
        # nothing is decoded before load(), so our dimension cap comes first.
        with Image.open(io.BytesIO(data), formats=[_PIL_FORMAT[kind]]) as im:
            width, height = im.size
            if width > max_dim or height > max_dim:
                raise ImageTooLargeError(
                    name, f"image dimensions {height}x{width} (rows x columns) exceed the limit {max_dim}x{max_dim}"
                )
            if width <= 0 or height <= 0:
                raise ImageReadError(name, f"zero image dimensions ({height}x{width})")
            frames = getattr(im, "n_frames", 1)
            if frames != 1:
                raise ImageReadError(name, f"{label} has {frames} frames: expected one 2-D mammogram")
            im.load()
            pixels = _grayscale(_upright(im), name, label)
    except ImageReadError:
        raise
    except Image.UnidentifiedImageError as exc:  # its message is only the BytesIO's repr
        raise ImageReadError(name, f"cannot read the {label} header (truncated or corrupt)") from exc
    except Image.DecompressionBombError as exc:
        raise ImageTooLargeError(name, f"{label} is too large to decode ({exc})") from exc
    except Exception as exc:  # OSError "truncated", SyntaxError, zlib/struct errors, ...
        raise ImageReadError(name, f"cannot decode the {label} image ({type(exc).__name__}: {exc})") from exc
    return _canonical(np.asarray(pixels, dtype=np.float32), kind, name, label)


def decode_array(array: np.ndarray, *, name: str = "<array>", max_dim: int = DEFAULT_MAX_DIM) -> DecodedImage:
    """A 2-D grayscale image given as an array (the Python API), made canonical as a PNG or TIFF of the
    same pixels is: float32, breast on the left (mirrored when it was on the right).

    Raises:
        ImageReadError: not 2-D, empty, not numeric, NaN or infinite values; ``ImageTooLargeError``
            over ``max_dim``.
    """
    array = np.asarray(array)
    if array.ndim != 2:
        raise ImageUnsupportedError(name, f"array of shape {array.shape}: expected one 2-D grayscale image (H, W)")
    height, width = array.shape
    if height == 0 or width == 0:
        raise ImageReadError(name, f"zero image dimensions ({height}x{width})")
    if height > max_dim or width > max_dim:
        raise ImageTooLargeError(
            name, f"image dimensions {height}x{width} (rows x columns) exceed the limit {max_dim}x{max_dim}"
        )
    if array.dtype.kind not in "uif" or array.dtype == np.bool_:
        raise ImageUnsupportedError(name, f"array of dtype {array.dtype}: expected integer or float pixels")
    return _canonical(array.astype(np.float32), "array", name, "the array")


def _canonical(image: np.ndarray, kind: Kind, name: str, label: str) -> DecodedImage:
    """Decoded pixels made canonical: 2-D, finite, breast on the left."""
    if image.ndim != 2:
        raise ImageUnsupportedError(name, f"{label} decodes to shape {image.shape}, not a 2-D image")
    if not np.isfinite(image).all():
        raise ImageReadError(name, f"{label} holds NaN or infinite pixel values")
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


def _grayscale(im: Image.Image, name: str, label: str) -> np.ndarray:
    """One channel at the stored depth: 16-bit, 32-bit int and float modes keep their values."""
    if im.mode in _SIXTEEN_BIT_MODES or im.mode in ("L", "I", "F"):
        return np.asarray(im)
    try:
        return np.asarray(im.convert("L"))  # 1, P, LA, RGB(A), CMYK, YCbCr: luminance
    except (ValueError, OSError) as exc:
        raise ImageUnsupportedError(name, f"{label} mode {im.mode!r} cannot be made grayscale ({exc})") from exc


def canonical_box(box: Box | None, decoded: DecodedImage) -> Box | None:
    """A box on the stored image in the coordinates of ``decoded.image`` (mirrored if it was)."""
    if box is None or not decoded.flipped:
        return box
    x0, y0, x1, y1 = box
    width = decoded.shape[1]
    return width - x1, y0, width - x0, y1


def canonical_point(point: Point | None, decoded: DecodedImage) -> Point | None:
    """A point on the stored image in the coordinates of ``decoded.image``."""
    if point is None or not decoded.flipped:
        return point
    return decoded.shape[1] - 1 - point[0], point[1]
