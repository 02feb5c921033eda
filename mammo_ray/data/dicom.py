"""Read one mammogram DICOM into a canonical float32 array, checking the header first.

Canonical means: a C-contiguous 2-D float32 array in which higher values are denser
(MONOCHROME2 sense) and the breast lies on the left (chest wall at column 0). Values keep
the units of the last LUT stage applied (stored value -> Modality LUT/rescale -> VOI LUT or
window); nothing is rescaled to [0, 1] here.

Orientation: the laterality header (ImageLaterality, Laterality, a side in the view code) says
which breast this is, and a RIGHT breast in standard display has its chest wall on the right,
so RIGHT is mirrored and LEFT is not. Only without such a header does image content decide
(``breast_on_right``). Path tokens never decide the mirror: a folder name is weaker evidence
than the pixels. ``DicomMeta`` records which source decided and whether the content check
disagreed with the header, for the caller to count.

Every failure is a ``DicomReadError`` naming the file and the reason. Header checks
(dimensions, bit depth, pixel-data length, transfer syntax) run on a deferred read, before
any pixel is decoded, so a broken or hostile header cannot make us allocate a huge array.
Two subclasses let a caller (the Serve upload layer) tell the kinds apart without parsing
reasons: ``DicomTooLargeError`` (dimensions over the cap) and ``DicomUnsupportedError``
(a transfer syntax with no decoder here).

The source is a path, or, for uploads, the file's bytes or a seekable binary file object;
``name`` then stands for the path in errors and in ``DicomMeta.path``.

Speed: ``prepare`` reads every film and ROI mask through here, so the common case avoids
pydicom's general machinery where it costs more than the work: uncompressed little-endian
pixels are read straight into an array, a LINEAR window is applied in float32, each header
element is converted once, and ``read_dicom_mask`` compares a plain mask as stored. Each fast
path gives what pydicom's own functions give (tests/data/test_dicom.py compares them); every
other case (compressed syntaxes, big endian, LUTs, other VOI functions) is pydicom's code.
"""

from __future__ import annotations

import dataclasses
import functools
import io
import os
import re
from dataclasses import dataclass
from pathlib import PurePath
from typing import Any, BinaryIO, TypeVar

import numpy as np
import pydicom
from pydicom import uid as dcm_uid
from pydicom.dataelem import RawDataElement, convert_raw_data_element
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.multival import MultiValue
from pydicom.pixels import apply_modality_lut, apply_voi_lut, get_decoder
from pydicom.tag import Tag

from mammo_ray.constants import Side, View

DEFAULT_MAX_DIM = 10_000
_DEFER_SIZE = 4096  # larger element values stay on disk until accessed: header reads never load pixels
_MONOCHROME = ("MONOCHROME1", "MONOCHROME2")

# The pip package that brings a pydicom decoding plugin, per transfer syntax (RLE is native).
_PLUGIN_PACKAGE = {
    **dict.fromkeys(  # GPL-3.0, so an opt-in extra of mammo-ray
        dcm_uid.JPEGTransferSyntaxes + dcm_uid.JPEGLSTransferSyntaxes,
        "pylibjpeg-libjpeg (pip install 'mammo-ray[jpeg]')",
    ),
    **dict.fromkeys(dcm_uid.JPEG2000TransferSyntaxes, "pylibjpeg-openjpeg"),
}
# ViewCodeSequence code values (SNOMED-RT, then SNOMED CT) for the two standard views.
_VIEW_CODES = {"R-10242": View.CC, "399162004": View.CC, "R-10226": View.MLO, "399368009": View.MLO}
_SIDE_TOKENS = {"L", "R", "LEFT", "RIGHT"}
_VIEW_TOKENS = {"CC", "MLO"}
_TOKEN_SPLIT = re.compile(r"[_\-/\\.\s]+")
_SIDE_VIEW_TOKEN = re.compile(r"^([LR])(CC|MLO)$")  # original DDSM style: "LEFT_CC" or "LCC"
_DIGITS_AND_DOTS = re.compile(r"[\d.]*")
# The elements read_dicom consults, read once per file into a plain dict (``_header``).
_HEADER_KEYWORDS = (
    "SamplesPerPixel",
    "PhotometricInterpretation",
    "NumberOfFrames",
    "Rows",
    "Columns",
    "BitsAllocated",
    "BitsStored",
    "HighBit",
    "PixelRepresentation",
    "PatientID",
    "ImageLaterality",
    "Laterality",
    "ViewPosition",
    "ViewCodeSequence",
    "PixelSpacing",
    "ImagerPixelSpacing",
    "ModalityLUTSequence",
    "RescaleSlope",
    "RescaleIntercept",
    "VOILUTSequence",
    "WindowCenter",
    "WindowWidth",
    "VOILUTFunction",
)
_HEADER_TAGS = tuple((keyword, Tag(keyword)) for keyword in _HEADER_KEYWORDS)
# Uncompressed syntaxes whose pixels are read straight from the bytes (``_native_pixels``).
_NATIVE_LITTLE_ENDIAN = (dcm_uid.ExplicitVRLittleEndian, dcm_uid.ImplicitVRLittleEndian)
UPLOAD_NAME = "<upload>"  # the name of an in-memory source when the caller gives none
_SOURCE_TYPES = "path must be a str or os.PathLike, bytes or a binary file object"

# A path, the file's bytes, or a binary file object (seekable, e.g. io.BytesIO).
DicomSource = str | os.PathLike | bytes | bytearray | memoryview | BinaryIO
_SideOrView = TypeVar("_SideOrView", Side, View)


class DicomReadError(Exception):
    """One typed error for every failure: names the file and the reason."""

    def __init__(self, path: str | os.PathLike, reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")

    def __reduce__(self):  # keep (path, reason) across pickling, e.g. out of a Ray worker
        return type(self), (self.path, self.reason)


class DicomTooLargeError(DicomReadError):
    """Rows or Columns exceed the caller's cap (raised before any pixel is decoded)."""


class DicomUnsupportedError(DicomReadError):
    """The transfer syntax has no decoder: unknown to pydicom, or its plugin is not installed."""


@dataclass(frozen=True)
class DicomMeta:
    path: str
    patient_id: str  # "" if absent
    side: Side | None  # None if neither header nor path says
    view: View | None
    rows: int  # as stored, before any flip
    columns: int
    pixel_spacing: tuple[float, float] | None  # (row, col) mm, PixelSpacing or ImagerPixelSpacing
    photometric: str  # PhotometricInterpretation as stored
    bits_allocated: int
    bits_stored: int
    transfer_syntax: str  # UID name, e.g. "Explicit VR Little Endian"
    flipped: bool  # the returned array was mirrored left-right
    orientation_source: str = ""  # "header", "content", "caller" (flip given); "" unread
    content_disagrees: bool = False  # header decided, and the content check said otherwise


def read_dicom_header(
    path: DicomSource, *, max_rows: int = DEFAULT_MAX_DIM, max_cols: int = DEFAULT_MAX_DIM, name: str | None = None
) -> DicomMeta:
    """Read and check the header only (pixel data stays on disk); ``flipped`` is False.

    Decoder availability is checked by ``read_dicom`` only: a header can be indexed on a
    machine that lacks the codec. ``path`` and ``name`` are as for ``read_dicom``.
    """
    name, ds, size = _open(path, name)
    return _check_header(name, ds, size, max_rows, max_cols)[0]


def read_dicom(
    path: DicomSource,
    *,
    flip: bool | None = None,
    apply_voi: bool = True,
    max_rows: int = DEFAULT_MAX_DIM,
    max_cols: int = DEFAULT_MAX_DIM,
    name: str | None = None,
) -> tuple[np.ndarray, DicomMeta]:
    """Return ``(image, meta)``: a float32 2-D array in canonical orientation and its header.

    Args:
        path: a path; or the file's bytes, or a seekable binary file object read from its
            current position (an upload). Bytes are never taken as a path.
        flip: None decides from the laterality header (RIGHT is mirrored), and from content
            only when no header names the side (mirror when the right third of the columns is
            brighter than the left third); True/False forces it, e.g. for an ROI mask that
            must follow its image's decision (``meta.flipped`` of the image).
        apply_voi: apply the VOI LUT or window (WindowCenter/Width) when the file has one.
        max_rows, max_cols: header dimensions above these are rejected before decoding
            (``DicomTooLargeError``).
        name: what errors and ``meta.path`` call the source, e.g. an upload's file name;
            side and view tokens in it count as they do in a path. Defaults to the path, or
            ``"<upload>"`` for bytes and file objects.
    """
    name, ds, header, meta, stored = _read_stored(path, name, max_rows, max_cols)
    image = _canonical(name, stored, ds, header, apply_voi)
    if flip is None:
        mirror, source, disagrees = decide_mirror(image, _side_view_from_header(header)[0])
    else:
        mirror, source, disagrees = bool(flip), "caller", False
    if mirror:
        image = np.fliplr(image)
    meta = dataclasses.replace(meta, flipped=mirror, orientation_source=source, content_disagrees=disagrees)
    return np.ascontiguousarray(image, dtype=np.float32), meta


def read_dicom_mask(
    path: DicomSource,
    *,
    flip: bool,
    max_rows: int = DEFAULT_MAX_DIM,
    max_cols: int = DEFAULT_MAX_DIM,
    name: str | None = None,
) -> tuple[np.ndarray, DicomMeta]:
    """An ROI mask as a C-contiguous bool array: ``read_dicom(..., flip=flip, apply_voi=False)[0] > 0``.

    ``flip`` is its film's mirror decision. A MONOCHROME2 mask without a modality transform is
    compared as stored, which skips the float32 image: masks are half of what prepare decodes.
    """
    name, ds, header, meta, stored = _read_stored(path, name, max_rows, max_cols)
    rescale = (header["RescaleSlope"], header["RescaleIntercept"])
    as_stored = (
        meta.photometric == "MONOCHROME2"
        and not header["ModalityLUTSequence"]
        and (None in rescale or tuple(float(v) for v in rescale) == (1.0, 0.0))
    )
    mask = stored > 0 if as_stored else _canonical(name, stored, ds, header, False) > 0
    if flip:
        mask = np.fliplr(mask)
    return np.ascontiguousarray(mask), dataclasses.replace(meta, flipped=bool(flip), orientation_source="caller")


def _read_stored(
    path: DicomSource, name: str | None, max_rows: int, max_cols: int
) -> tuple[str, Dataset, dict[str, Any], DicomMeta, np.ndarray]:
    """Open, check and decode: ``(name, data set, header values, meta, stored pixels)``."""
    name, ds, size = _open(path, name)
    meta, header = _check_header(name, ds, size, max_rows, max_cols)
    stored = _decode(name, ds, header, meta)
    if stored.shape != (meta.rows, meta.columns):
        raise DicomReadError(
            name, f"decoded shape {stored.shape} differs from Rows x Columns ({meta.rows}, {meta.columns})"
        )
    return name, ds, header, meta, stored


def _canonical(name: str, stored: np.ndarray, ds: Dataset, header: dict[str, Any], apply_voi: bool) -> np.ndarray:
    try:
        return _to_canonical_intensity(stored, ds, header, apply_voi)
    except Exception as exc:
        raise DicomReadError(name, f"cannot apply the modality/VOI LUT ({exc})") from exc


def decide_mirror(image: np.ndarray, header_side: Side | None) -> tuple[bool, str, bool]:
    """``(mirror, source, content_disagrees)`` for an image in its stored orientation.

    A side from the header decides (RIGHT -> mirror: its chest wall is on the right in standard
    display); content (``breast_on_right``) is then only a check. Without a header side, content
    decides and there is nothing to disagree with.
    """
    content = breast_on_right(image)
    if header_side is None:
        return content, "content", False
    mirror = header_side is Side.RIGHT
    return mirror, "header", mirror != content


def parse_side_view_from_path(path: str | os.PathLike) -> tuple[Side | None, View | None]:
    """Side and view from tokens in a path, e.g. ``Calc-Test_P_00038_LEFT_MLO_1/.../000000.dcm``.

    Tokens are split on ``_ - / \\ .`` and whitespace; ``L``/``R``/``LEFT``/``RIGHT``, ``CC``/``MLO``
    and ``LCC``-style pairs count. The most specific component (file name first, then its
    folders outwards) wins, and a component naming both sides (or both views) is skipped as
    ambiguous, so a stray ``R`` folder high up the tree cannot override the case folder.
    """
    side = view = None
    for part in reversed(PurePath(os.fspath(path)).parts):
        sides, views = _part_side_view(part)
        side = side or (next(iter(sides)) if len(sides) == 1 else None)
        view = view or (next(iter(views)) if len(views) == 1 else None)
    return side, view


@functools.lru_cache(maxsize=4096)  # a dataset's folders repeat from file to file
def _part_side_view(part: str) -> tuple[frozenset[Side], frozenset[View]]:
    """The sides and views one path component names."""
    sides, views = set(), set()
    if _DIGITS_AND_DOTS.fullmatch(part):  # a UID folder: no tokens, and one of these per file
        return frozenset(), frozenset()
    for token in _TOKEN_SPLIT.split(part.upper()):
        if match := _SIDE_VIEW_TOKEN.match(token):
            sides.add(Side.parse(match[1]))
            views.add(View.parse(match[2]))
        elif token in _SIDE_TOKENS:
            sides.add(Side.parse(token))
        elif token in _VIEW_TOKENS:
            views.add(View.parse(token))
    return frozenset(sides), frozenset(views)


def _open(path: DicomSource, name: str | None) -> tuple[str, Dataset, int]:
    """Parse the source with large values deferred; return ``(name, dataset, size in bytes)``.

    Every failure is a DicomReadError. An in-memory or file-object source stays referenced
    by the dataset, which reads its deferred pixel data from it later.
    """
    source, start, name = _resolve(path, name)
    if isinstance(source, str):
        size = os.path.getsize(source)
    else:  # offsets pydicom records are absolute positions in the buffer
        size = source.seek(0, os.SEEK_END)
        source.seek(start)
    try:
        return name, pydicom.dcmread(source, defer_size=_DEFER_SIZE), size
    except InvalidDicomError as exc:
        not_dicom = exc
    except OSError as exc:
        raise DicomReadError(name, f"unreadable ({exc.strerror or exc})") from exc
    except Exception as exc:
        raise DicomReadError(name, f"cannot parse the DICOM header ({exc})") from exc
    # No 128-byte preamble + "DICM": some old exports write the bare data set. Accept one only
    # if it parses into something DICOM-shaped; arbitrary bytes parse into nonsense tags.
    try:
        if not isinstance(source, str):
            source.seek(start)
        ds = pydicom.dcmread(source, defer_size=_DEFER_SIZE, force=True)
    except Exception:  # noqa: BLE001 - any failure here means "not DICOM", reported just below
        ds = None
    if ds is None or not (ds.file_meta or "SOPClassUID" in ds):
        raise DicomReadError(name, f"not a DICOM file ({not_dicom})") from not_dicom
    return name, ds, size


def _resolve(path: DicomSource, name: str | None) -> tuple[str | BinaryIO, int, str]:
    """``(path or binary stream, stream start, name for errors)``; checks that a path is a file."""
    if isinstance(path, (bytes, bytearray, memoryview)):
        return io.BytesIO(path), 0, name or UPLOAD_NAME
    if not isinstance(path, (str, os.PathLike)):
        if not hasattr(path, "read"):
            raise DicomReadError(name or repr(path), _SOURCE_TYPES)
        name = name or UPLOAD_NAME
        try:
            if path.seekable():
                return path, path.tell(), name
            return io.BytesIO(path.read()), 0, name  # pydicom seeks; a pipe is read whole
        except (OSError, ValueError) as exc:  # e.g. a closed file
            raise DicomReadError(name, f"unreadable ({exc})") from exc
    try:
        fs_path = os.fsdecode(os.fspath(path))  # a PathLike may give bytes
    except TypeError as exc:  # __fspath__ returned neither str nor bytes
        raise DicomReadError(name or repr(path), _SOURCE_TYPES) from exc
    name = name or fs_path
    if not os.path.exists(fs_path):
        raise DicomReadError(name, "file not found")
    if not os.path.isfile(fs_path):
        raise DicomReadError(name, "not a regular file")
    return fs_path, 0, name


def _header(ds: Dataset) -> dict[str, Any]:
    """The values of ``_HEADER_KEYWORDS`` (None where absent), each converted once.

    Plain elements are converted from their raw form without storing them back into the data
    set: ``Dataset.get`` costs about 30 us an element on top of the conversion, which is a
    third of reading a small film. Sequences go through the data set, because the LUT
    functions read them from there (and ``_to_canonical_intensity`` adjusts one in place).
    The values are shared between reads (``_converted``): read them, never change them.
    """
    values: dict[str, Any] = {}
    encoding = ds.original_character_set
    charset = tuple(encoding) if isinstance(encoding, (list, MultiValue)) else encoding
    for keyword, tag in _HEADER_TAGS:
        if keyword.endswith("Sequence"):
            values[keyword] = ds.get(keyword)
            continue
        elem = ds.get_item(tag)
        if isinstance(elem, RawDataElement):
            values[keyword] = _converted(elem, encoding, charset, ds)
        else:
            values[keyword] = None if elem is None else elem.value
    return values


# pydicom's value of a raw header element, by everything the conversion reads: tag (the VR of an
# implicit-VR file comes from it), VR, encoding, the bytes and the character set. Films of one
# source repeat most header values (Rows, PhotometricInterpretation, bits, window), and the
# conversion costs about 25 us an element, a fifth of reading a small film; a hit is a lookup.
_CONVERTED: dict[tuple[Any, ...], Any] = {}
_CONVERTED_MAX = 4096  # entries; cleared when full (a new PatientID per patient would fill it)
_CONVERTED_MAX_BYTES = 256  # longer values are converted every time


def _converted(elem: RawDataElement, encoding: Any, charset: Any, ds: Dataset) -> Any:
    raw = elem.value
    if not isinstance(raw, bytes) or len(raw) > _CONVERTED_MAX_BYTES or (elem.VR and " or " in elem.VR):
        return convert_raw_data_element(elem, encoding=encoding, ds=ds).value  # deferred, long or ambiguous
    key = (elem.tag, elem.VR, elem.is_implicit_VR, elem.is_little_endian, raw, charset)
    try:
        return _CONVERTED[key]
    except KeyError:
        pass
    value = convert_raw_data_element(elem, encoding=encoding, ds=ds).value
    if len(_CONVERTED) >= _CONVERTED_MAX:
        _CONVERTED.clear()
    _CONVERTED[key] = value
    return value


def _check_header(name: str, ds: Dataset, size: int, max_rows: int, max_cols: int) -> tuple[DicomMeta, dict[str, Any]]:
    """The checked header as ``DicomMeta``, and the values it was read from (``_header``)."""
    try:
        header = _header(ds)
        return _checked_meta(name, ds, header, size, max_rows, max_cols), header
    except DicomReadError:
        raise
    except Exception as exc:  # a malformed value (wrong VR, unparsable number) in an element we read
        raise DicomReadError(name, f"invalid header ({type(exc).__name__}: {exc})") from exc


def _checked_meta(name: str, ds: Dataset, h: dict[str, Any], size: int, max_rows: int, max_cols: int) -> DicomMeta:
    def fail(reason: str) -> DicomReadError:
        return DicomReadError(name, reason)

    if "PixelData" not in ds:
        raise fail("no PixelData element: not an image")
    samples = int(h["SamplesPerPixel"] if h["SamplesPerPixel"] is not None else 1)
    if samples != 1:
        raise fail(f"SamplesPerPixel is {samples}: mammograms are grayscale (1 sample per pixel)")
    photometric = str(h["PhotometricInterpretation"] or "").strip().upper()
    if photometric not in _MONOCHROME:
        raise fail(f"PhotometricInterpretation {photometric!r} is not MONOCHROME1/MONOCHROME2")
    frames = int(h["NumberOfFrames"] or 1)
    if frames != 1:
        raise fail(f"NumberOfFrames is {frames}: expected one 2-D mammogram (tomosynthesis is not supported)")

    if h["Rows"] is None or h["Columns"] is None:
        raise fail("missing Rows or Columns")
    rows, cols = int(h["Rows"]), int(h["Columns"])
    if rows <= 0 or cols <= 0:
        raise fail(f"zero image dimensions (Rows={rows}, Columns={cols})")
    if rows > max_rows or cols > max_cols:
        raise DicomTooLargeError(name, f"image dimensions {rows}x{cols} exceed the limit {max_rows}x{max_cols}")

    if h["BitsAllocated"] is None or h["BitsStored"] is None:
        raise fail("missing BitsAllocated or BitsStored")
    allocated, stored = int(h["BitsAllocated"]), int(h["BitsStored"])
    if allocated not in (8, 16, 32):
        raise fail(f"BitsAllocated {allocated} is not supported (expected 8, 16 or 32)")
    if not 1 <= stored <= allocated:
        raise fail(f"BitsStored {stored} is inconsistent with BitsAllocated {allocated}")
    if h["HighBit"] is not None and int(h["HighBit"]) != stored - 1:
        raise fail(f"HighBit {int(h['HighBit'])} is inconsistent with BitsStored {stored} (expected {stored - 1})")

    syntax = _transfer_syntax(ds)
    try:
        get_decoder(syntax)
    except NotImplementedError as exc:
        raise DicomUnsupportedError(name, f"unsupported transfer syntax {syntax} ({syntax.name})") from exc
    if not syntax.is_encapsulated:
        _check_native_length(name, ds, syntax, rows * cols * allocated // 8, size)

    side, view = _side_view_from_header(h)
    if side is None or view is None:  # the header wins; the path's tokens fill in what it lacks
        path_side, path_view = parse_side_view_from_path(name)
        side, view = side or path_side, view or path_view
    return DicomMeta(
        path=name,
        patient_id=str(h["PatientID"] or ""),
        side=side,
        view=view,
        rows=rows,
        columns=cols,
        pixel_spacing=_pixel_spacing(h),
        photometric=photometric,
        bits_allocated=allocated,
        bits_stored=stored,
        transfer_syntax=syntax.name,
        flipped=False,
    )


def _transfer_syntax(ds: Dataset) -> dcm_uid.UID:
    """The file's transfer syntax; for a bare data set, the encoding pydicom detected."""
    syntax = ds.file_meta.get("TransferSyntaxUID")
    if syntax is None:
        implicit, little = ds.original_encoding
        syntax = (
            dcm_uid.ImplicitVRLittleEndian
            if implicit
            else dcm_uid.ExplicitVRLittleEndian
            if little
            else dcm_uid.ExplicitVRBigEndian
        )
        ds.file_meta.TransferSyntaxUID = syntax  # the decoder reads it from here
    return dcm_uid.UID(syntax)


def _check_native_length(name: str, ds: Dataset, syntax: dcm_uid.UID, expected: int, size: int) -> None:
    # The raw element keeps the declared length and file offset without loading the value.
    elem = ds.get_item("PixelData", keep_deferred=True)
    length = getattr(elem, "length", None)
    if length is None or length == 0xFFFFFFFF:
        raise DicomReadError(name, "uncompressed PixelData has an undefined length")
    if length < expected:
        raise DicomReadError(
            name,
            f"pixel data is {length} bytes, expected {expected} for "
            f"Rows x Columns x BitsAllocated/8 (truncated or wrong header)",
        )
    # A cut file still declares the full length; compare with what is on disk (or in the
    # buffer). Offsets in a deflated file refer to the inflated stream, so they cannot be compared.
    end = getattr(elem, "value_tell", 0) + expected
    if syntax != dcm_uid.DeflatedExplicitVRLittleEndian and size < end:
        raise DicomReadError(name, f"file truncated: pixel data needs {end} bytes, the file has {size}")


def _decode(name: str, ds: Dataset, h: dict[str, Any], meta: DicomMeta) -> np.ndarray:
    syntax = ds.file_meta.TransferSyntaxUID
    if syntax in _NATIVE_LITTLE_ENDIAN:
        return _native_pixels(name, ds, h, meta)
    decoder = get_decoder(syntax)
    if not decoder.is_available:
        package = _PLUGIN_PACKAGE.get(syntax, "pylibjpeg-libjpeg or pylibjpeg-openjpeg")
        found = "; ".join(decoder.missing_dependencies) or "no plugins"
        raise DicomUnsupportedError(
            name,
            f"no decoder available for {syntax.name} ({syntax}): install "
            f"pylibjpeg and {package} (pydicom plugins: {found})",
        )
    try:
        # pydicom masks bits above BitsStored (sign-extending signed data) for us.
        return ds.pixel_array
    except Exception as exc:
        raise DicomReadError(name, f"cannot decode {syntax.name} pixel data ({exc})") from exc


def _native_pixels(name: str, ds: Dataset, h: dict[str, Any], meta: DicomMeta) -> np.ndarray:
    """Uncompressed little-endian pixels straight from the file's bytes: what ``ds.pixel_array`` returns.

    The header checks have made sure the element holds Rows x Columns values of BitsAllocated
    bits. Bits above BitsStored are cleared, or sign-extended for signed data, as pydicom does.
    This skips pydicom's decoder set-up, which costs more than reading a small film, and a
    file's pixels are read once, into the array, rather than into bytes and then copied.
    """
    signed = int(h["PixelRepresentation"] or 0) == 1
    dtype = np.dtype(f"<{'i' if signed else 'u'}{meta.bits_allocated // 8}")
    count = meta.rows * meta.columns
    elem = ds.get_item("PixelData", keep_deferred=True)
    try:
        if isinstance(ds.filename, str) and isinstance(elem, RawDataElement) and elem.value is None:  # deferred
            pixels = np.fromfile(ds.filename, dtype=dtype, count=count, offset=elem.value_tell)
        else:  # an upload's buffer, or a value small enough to have been read with the header
            pixels = np.frombuffer(ds.PixelData, dtype=dtype, count=count).copy()
        pixels = pixels.reshape(meta.rows, meta.columns).astype(dtype.newbyteorder("="), copy=False)
    except Exception as exc:
        raise DicomReadError(name, f"cannot decode {meta.transfer_syntax} pixel data ({exc})") from exc
    unused = meta.bits_allocated - meta.bits_stored
    if unused:
        if signed:  # shift the sign bit to the top and back: arithmetic shifts extend it
            pixels <<= unused
            pixels >>= unused
        else:
            pixels &= (1 << meta.bits_stored) - 1
    return pixels


def _to_canonical_intensity(stored: np.ndarray, ds: Dataset, h: dict[str, Any], apply_voi: bool) -> np.ndarray:
    """Modality LUT, optional VOI, then MONOCHROME1 inversion; returns float32.

    MONOCHROME1 is inverted about the nominal output range ``[lo, hi]`` of the last LUT stage
    (``lo + hi - value``), not about this image's own min/max: the same stored value then
    maps to the same output in every image of a device, and in its ROI masks. For raw unsigned
    data this is ``2**BitsStored - 1 - value``.
    """
    bits = int(h["BitsStored"])
    signed = int(h["PixelRepresentation"] or 0) == 1
    lo, hi = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
    arr = stored
    if h["ModalityLUTSequence"]:
        lo, hi = 0, 2 ** int(h["ModalityLUTSequence"][0].LUTDescriptor[2]) - 1
        arr = apply_modality_lut(arr, ds)
    elif h["RescaleSlope"] is not None and h["RescaleIntercept"] is not None:
        slope, intercept = float(h["RescaleSlope"]), float(h["RescaleIntercept"])
        lo, hi = sorted((lo * slope + intercept, hi * slope + intercept))
        if (slope, intercept) != (1.0, 0.0):  # the identity: pydicom would only copy to float64
            arr = apply_modality_lut(arr, ds)
    voi = h["VOILUTSequence"]
    if apply_voi and (voi or h["WindowCenter"] is not None):  # without either, apply_voi_lut is the identity
        if voi and "LUTDescriptor" in voi[0] and "LUTData" in voi[0]:
            entries, first, depth = (int(v) for v in voi[0].LUTDescriptor)
            lo, hi = 0, 2**depth - 1
            # pydicom 3.0.2 builds its index array in the LUT's output dtype, so an 8-bit LUT
            # wraps every input above 255. The entries are the same numbers as 16-bit ones.
            voi[0].LUTDescriptor = [entries, first, max(depth, 16)]
        # A window maps onto its input's range (PS3.3 C.11.2.1.2), so lo/hi stay as they are.
        window = None if voi else _linear_window(arr, h, lo, hi)
        arr = apply_voi_lut(arr, ds) if window is None else window
    image = np.asarray(arr, dtype=np.float32)
    if str(h["PhotometricInterpretation"]).strip().upper() == "MONOCHROME1":
        image = np.float32(lo + hi) - image
    return image


def _linear_window(arr: np.ndarray, h: dict[str, Any], lo: float, hi: float) -> np.ndarray | None:
    """The LINEAR window (PS3.3 C.11.2.1.2.1) onto ``[lo, hi]`` in float32, or None for pydicom's general code.

    Equal to ``apply_windowing`` within float32 rounding, in three passes instead of pydicom's
    float64 masks: on a small film that function costs a third of the whole read. Other VOI
    functions, a width of 1 (a step) and a decreasing rescale go to pydicom.
    """
    function = str(h["VOILUTFunction"] or "LINEAR").strip().upper()
    if function != "LINEAR" or h["WindowWidth"] is None or float(h["RescaleSlope"] or 1) <= 0:
        return None
    center, width = (_first(h[keyword]) for keyword in ("WindowCenter", "WindowWidth"))
    if width <= 1:
        return None
    # ((x - (c - 0.5)) / (w - 1) + 0.5) * (hi - lo) + lo, clipped to [lo, hi]: one multiply-add.
    scale = (hi - lo) / (width - 1)
    out = np.array(arr, dtype=np.float32)
    out *= np.float32(scale)
    out += np.float32((0.5 - (center - 0.5) / (width - 1)) * (hi - lo) + lo)
    return np.clip(out, lo, hi, out=out)


def _first(value: Any) -> float:
    """A window value as pydicom's windowing reads it: the first of several."""
    return float(value[0] if isinstance(value, (list, MultiValue)) else value)


def breast_on_right(image: np.ndarray) -> bool:
    """True when the right third of the columns is brighter than the left third."""
    third = max(1, image.shape[1] // 3)
    return float(image[:, -third:].mean(dtype=np.float64)) > float(image[:, :third].mean(dtype=np.float64))


def _side_view_from_header(h: dict[str, Any]) -> tuple[Side | None, View | None]:
    # PatientOrientation is not used for the side: its L/R letter depends on the view and
    # on how the image was mirrored, so it does not encode laterality on its own.
    side = _parse(Side, h["ImageLaterality"]) or _parse(Side, h["Laterality"])
    view = _parse(View, h["ViewPosition"])
    for item in h["ViewCodeSequence"] or []:
        meaning = str(item.get("CodeMeaning", ""))
        view = view or _VIEW_CODES.get(str(item.get("CodeValue", ""))) or _parse(View, meaning)
        # Some vendors spell the side into the meaning ("left cranio-caudal").
        words = {w for w in _TOKEN_SPLIT.split(meaning.upper()) if w in ("LEFT", "RIGHT")}
        side = side or (_parse(Side, words.pop()) if len(words) == 1 else None)
        if view is None:  # e.g. "left cranio-caudal": parse what remains after the side
            rest = re.sub(r"\b(left|right)\b", "", meaning, flags=re.IGNORECASE)
            view = _parse(View, rest)
    return side, view


def _parse(enum: type[_SideOrView], value: object) -> _SideOrView | None:
    """``enum.parse`` that answers None for absent, empty or unknown values ("U", "B")."""
    text = str(value or "").strip()
    if not text:
        return None
    try:
        return enum.parse(text)
    except ValueError:
        return None


def _pixel_spacing(h: dict[str, Any]) -> tuple[float, float] | None:
    for keyword in ("PixelSpacing", "ImagerPixelSpacing"):
        try:  # a malformed spacing is treated as unknown, not as an unreadable file
            row, col = (float(v) for v in h[keyword] or ())
        except (TypeError, ValueError):
            continue
        if row > 0 and col > 0:
            return row, col
    return None
