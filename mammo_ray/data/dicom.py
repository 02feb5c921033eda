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
"""

from __future__ import annotations

import dataclasses
import io
import os
import re
from dataclasses import dataclass
from pathlib import PurePath
from typing import BinaryIO, TypeVar

import numpy as np
import pydicom
from pydicom import uid as dcm_uid
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.pixels import apply_modality_lut, apply_voi_lut, get_decoder

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
    return _check_header(name, ds, size, max_rows, max_cols)


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
    name, ds, size = _open(path, name)
    meta = _check_header(name, ds, size, max_rows, max_cols)
    stored = _decode(name, ds)
    if stored.shape != (meta.rows, meta.columns):
        raise DicomReadError(
            name, f"decoded shape {stored.shape} differs from Rows x Columns ({meta.rows}, {meta.columns})"
        )
    try:
        image = _to_canonical_intensity(stored, ds, apply_voi)
    except Exception as exc:
        raise DicomReadError(name, f"cannot apply the modality/VOI LUT ({exc})") from exc
    if flip is None:
        mirror, source, disagrees = decide_mirror(image, _side_view_from_header(ds)[0])
    else:
        mirror, source, disagrees = bool(flip), "caller", False
    if mirror:
        image = np.fliplr(image)
    meta = dataclasses.replace(meta, flipped=mirror, orientation_source=source, content_disagrees=disagrees)
    return np.ascontiguousarray(image, dtype=np.float32), meta


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
        sides, views = set(), set()
        for token in _TOKEN_SPLIT.split(part.upper()):
            if match := _SIDE_VIEW_TOKEN.match(token):
                sides.add(Side.parse(match[1]))
                views.add(View.parse(match[2]))
            elif token in _SIDE_TOKENS:
                sides.add(Side.parse(token))
            elif token in _VIEW_TOKENS:
                views.add(View.parse(token))
        side = side or (sides.pop() if len(sides) == 1 else None)
        view = view or (views.pop() if len(views) == 1 else None)
    return side, view


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


def _check_header(name: str, ds: Dataset, size: int, max_rows: int, max_cols: int) -> DicomMeta:
    try:
        return _checked_meta(name, ds, size, max_rows, max_cols)
    except DicomReadError:
        raise
    except Exception as exc:  # a malformed value (wrong VR, unparsable number) in an element we read
        raise DicomReadError(name, f"invalid header ({type(exc).__name__}: {exc})") from exc


def _checked_meta(name: str, ds: Dataset, size: int, max_rows: int, max_cols: int) -> DicomMeta:
    def fail(reason: str) -> DicomReadError:
        return DicomReadError(name, reason)

    if "PixelData" not in ds:
        raise fail("no PixelData element: not an image")
    samples = int(ds.get("SamplesPerPixel", 1))
    if samples != 1:
        raise fail(f"SamplesPerPixel is {samples}: mammograms are grayscale (1 sample per pixel)")
    photometric = str(ds.get("PhotometricInterpretation", "")).strip().upper()
    if photometric not in _MONOCHROME:
        raise fail(f"PhotometricInterpretation {photometric!r} is not MONOCHROME1/MONOCHROME2")
    frames = int(ds.get("NumberOfFrames") or 1)
    if frames != 1:
        raise fail(f"NumberOfFrames is {frames}: expected one 2-D mammogram (tomosynthesis is not supported)")

    if "Rows" not in ds or "Columns" not in ds:
        raise fail("missing Rows or Columns")
    rows, cols = int(ds.Rows), int(ds.Columns)
    if rows <= 0 or cols <= 0:
        raise fail(f"zero image dimensions (Rows={rows}, Columns={cols})")
    if rows > max_rows or cols > max_cols:
        raise DicomTooLargeError(name, f"image dimensions {rows}x{cols} exceed the limit {max_rows}x{max_cols}")

    if "BitsAllocated" not in ds or "BitsStored" not in ds:
        raise fail("missing BitsAllocated or BitsStored")
    allocated, stored = int(ds.BitsAllocated), int(ds.BitsStored)
    if allocated not in (8, 16, 32):
        raise fail(f"BitsAllocated {allocated} is not supported (expected 8, 16 or 32)")
    if not 1 <= stored <= allocated:
        raise fail(f"BitsStored {stored} is inconsistent with BitsAllocated {allocated}")
    if "HighBit" in ds and int(ds.HighBit) != stored - 1:
        raise fail(f"HighBit {int(ds.HighBit)} is inconsistent with BitsStored {stored} (expected {stored - 1})")

    syntax = _transfer_syntax(ds)
    try:
        get_decoder(syntax)
    except NotImplementedError as exc:
        raise DicomUnsupportedError(name, f"unsupported transfer syntax {syntax} ({syntax.name})") from exc
    if not syntax.is_encapsulated:
        _check_native_length(name, ds, syntax, rows * cols * allocated // 8, size)

    side, view = _side_view_from_header(ds)
    path_side, path_view = parse_side_view_from_path(name)
    return DicomMeta(
        path=name,
        patient_id=str(ds.get("PatientID", "") or ""),
        side=side or path_side,
        view=view or path_view,
        rows=rows,
        columns=cols,
        pixel_spacing=_pixel_spacing(ds),
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


def _decode(name: str, ds: Dataset) -> np.ndarray:
    syntax = ds.file_meta.TransferSyntaxUID
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


def _to_canonical_intensity(stored: np.ndarray, ds: Dataset, apply_voi: bool) -> np.ndarray:
    """Modality LUT, optional VOI, then MONOCHROME1 inversion; returns float32.

    MONOCHROME1 is inverted about the nominal output range ``[lo, hi]`` of the last LUT stage
    (``lo + hi - value``), not about this image's own min/max: the same stored value then
    maps to the same output in every image of a device, and in its ROI masks. For raw unsigned
    data this is ``2**BitsStored - 1 - value``.
    """
    bits = int(ds.BitsStored)
    signed = int(ds.get("PixelRepresentation", 0)) == 1
    lo, hi = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
    arr = stored
    if ds.get("ModalityLUTSequence"):
        lo, hi = 0, 2 ** int(ds.ModalityLUTSequence[0].LUTDescriptor[2]) - 1
        arr = apply_modality_lut(arr, ds)
    elif "RescaleSlope" in ds and "RescaleIntercept" in ds:
        slope, intercept = float(ds.RescaleSlope), float(ds.RescaleIntercept)
        lo, hi = sorted((lo * slope + intercept, hi * slope + intercept))
        arr = apply_modality_lut(arr, ds)
    if apply_voi:
        voi = ds.get("VOILUTSequence")
        if voi and "LUTDescriptor" in voi[0] and "LUTData" in voi[0]:
            entries, first, depth = (int(v) for v in voi[0].LUTDescriptor)
            lo, hi = 0, 2**depth - 1
            # pydicom 3.0.2 builds its index array in the LUT's output dtype, so an 8-bit LUT
            # wraps every input above 255. The entries are the same numbers as 16-bit ones.
            voi[0].LUTDescriptor = [entries, first, max(depth, 16)]
        # A window maps onto its input's range (PS3.3 C.11.2.1.2), so lo/hi stay as they are.
        arr = apply_voi_lut(arr, ds)
    image = np.asarray(arr, dtype=np.float32)
    if str(ds.PhotometricInterpretation).strip().upper() == "MONOCHROME1":
        image = np.float32(lo + hi) - image
    return image


def breast_on_right(image: np.ndarray) -> bool:
    """True when the right third of the columns is brighter than the left third."""
    third = max(1, image.shape[1] // 3)
    return float(image[:, -third:].mean(dtype=np.float64)) > float(image[:, :third].mean(dtype=np.float64))


def _side_view_from_header(ds: Dataset) -> tuple[Side | None, View | None]:
    # PatientOrientation is not used for the side: its L/R letter depends on the view and
    # on how the image was mirrored, so it does not encode laterality on its own.
    side = _parse(Side, ds.get("ImageLaterality")) or _parse(Side, ds.get("Laterality"))
    view = _parse(View, ds.get("ViewPosition"))
    for item in ds.get("ViewCodeSequence") or []:
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


def _pixel_spacing(ds: Dataset) -> tuple[float, float] | None:
    for keyword in ("PixelSpacing", "ImagerPixelSpacing"):
        try:  # a malformed spacing is treated as unknown, not as an unreadable file
            row, col = (float(v) for v in ds.get(keyword) or ())
        except (TypeError, ValueError):
            continue
        if row > 0 and col > 0:
            return row, col
    return None
