"""Tests for mammo_ray.serving.uploads (and the decoder it calls, mammo_ray.data.images): every
rejection has its status and names the problem."""

from __future__ import annotations

import dataclasses
import io
import pickle
import struct
import tempfile
import zlib
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate
from pydicom.pixels import get_decoder
from pydicom.uid import MPEG2MPML, RLELossless

from mammo_ray.constants import Side, View
from mammo_ray.data.dicom import read_dicom, read_dicom_header
from mammo_ray.data.images import NOT_AN_IMAGE, DecodedImage, canonical_box, canonical_point, sniff
from mammo_ray.data.synthetic.dicom_write import DicomInfo, write_mammogram
from mammo_ray.serving.uploads import (
    UploadError,
    check_fields,
    check_in_bounds,
    decode_upload,
    parse_box,
    parse_point,
    read_capped,
)

INFO = DicomInfo(
    patient_id="P_00001",
    side=Side.LEFT,
    view=View.MLO,
    study_uid="1.2.3.1",
    series_uid="1.2.3.2",
    sop_uid="1.2.3.3",
    series_description="full mammogram images",
    study_date="20240101",
    spacing_mm=0.1,
)


def left_heavy(rows: int = 24, cols: int = 30, top: int = 4000, dtype=np.uint16) -> np.ndarray:
    """A bright breast against the left edge, fading to background on the right."""
    ramp = np.linspace(top, 0, cols).round()
    return np.ascontiguousarray(np.tile(ramp, (rows, 1)) + np.arange(rows)[:, None]).astype(dtype)


def dicom_bytes(tmp_path, pixels: np.ndarray | None = None, **attrs) -> bytes:
    """A synthetic mammogram written by ``write_mammogram``; ``attrs`` then override header values."""
    path = write_mammogram(tmp_path / "img.dcm", left_heavy() if pixels is None else pixels, INFO)
    if not attrs:
        return path.read_bytes()
    ds = dcmread(path)
    for keyword, value in attrs.items():
        setattr(ds, keyword, value)
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def pil_bytes(pixels: np.ndarray, fmt: str, **save) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=fmt, **save)
    return buffer.getvalue()


def forge_png_size(data: bytes, width: int, height: int) -> bytes:
    """Rewrite the IHDR size (and its CRC): the header claims what the pixel data does not hold."""
    ihdr = b"IHDR" + struct.pack(">II", width, height) + data[24:29]
    return data[:12] + ihdr + struct.pack(">I", zlib.crc32(ihdr)) + data[33:]


def rejected(data: bytes, **kwargs) -> UploadError:
    with pytest.raises(UploadError) as info:
        decode_upload(data, name=kwargs.pop("name", "scan.dcm"), field="image", **kwargs)
    assert info.value.field == "image"
    return info.value


@pytest.fixture
def no_decoding(monkeypatch):
    """Fail the test if any DICOM pixel is decoded."""
    decoded = []
    monkeypatch.setattr(Dataset, "pixel_array", property(lambda ds: decoded.append(ds)))
    yield
    assert decoded == []


# --- rejections: one per error class -------------------------------------------------------


def test_truncated_dicom_is_400(tmp_path):
    error = rejected(dicom_bytes(tmp_path)[:-10])
    assert error.status == 400 and "truncated" in error.reason and "scan.dcm" in error.reason


def test_compressed_dicom_without_decoder_is_415_naming_the_syntax(tmp_path, monkeypatch):
    ds = dcmread(io.BytesIO(dicom_bytes(tmp_path)))
    ds.compress(RLELossless)
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    monkeypatch.setattr(get_decoder(RLELossless), "_available", {})  # as if no plugin were installed
    error = rejected(buffer.getvalue())
    assert error.status == 415 and "RLE Lossless" in error.reason and RLELossless in error.reason
    assert "no decoder" in error.reason


def test_unknown_transfer_syntax_is_415(tmp_path, no_decoding):
    ds = dcmread(io.BytesIO(dicom_bytes(tmp_path)))
    ds.PixelData = encapsulate([b"\x00" * 64])
    ds.file_meta.TransferSyntaxUID = MPEG2MPML
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    error = rejected(buffer.getvalue())
    assert error.status == 415 and "unsupported transfer syntax" in error.reason


@pytest.mark.parametrize(
    "data",
    [b"\x00" * 300, b"hello, this is not a mammogram\n" * 10, np.random.default_rng(0).bytes(2048)],
    ids=["zeros", "text", "random"],
)
def test_bytes_that_are_not_an_image_are_400(data):
    error = rejected(data)
    assert error.status == 400 and NOT_AN_IMAGE in error.reason


def test_empty_upload_is_400():
    error = rejected(b"")
    assert error.status == 400 and "empty upload" in error.reason


def test_oversized_upload_is_413_before_parsing(tmp_path, monkeypatch):
    data = dicom_bytes(tmp_path)
    monkeypatch.setattr("mammo_ray.data.images.read_dicom", None)  # never reached
    error = rejected(data, max_bytes=len(data) - 1)
    assert error.status == 413 and f"over the size limit of {len(data) - 1} bytes" in error.reason
    monkeypatch.undo()
    assert decode_upload(data, name="scan.dcm", field="image", max_bytes=len(data)).shape == (24, 30)


def test_read_capped_stops_at_the_cap():
    stream = io.BytesIO(b"x" * 1000)
    with pytest.raises(UploadError) as info:
        read_capped(stream, max_bytes=100, field="image", name="big.dcm")
    assert info.value.status == 413 and stream.tell() == 101 and "big.dcm" in info.value.reason
    assert read_capped(io.BytesIO(b"x" * 100), max_bytes=100, field="image") == b"x" * 100


def test_dicom_dimensions_are_checked_before_decoding(tmp_path, no_decoding):
    # 20000 rows and 24x30 pixels' worth of data: the dimension check must fire, not truncation.
    error = rejected(dicom_bytes(tmp_path, Rows=20_000))
    assert error.status == 413 and "20000x30 exceed the limit" in error.reason
    error = rejected(dicom_bytes(tmp_path), max_dim=20)
    assert error.status == 413 and "exceed the limit 20x20" in error.reason


def test_png_dimensions_are_checked_before_decoding(monkeypatch):
    data = forge_png_size(pil_bytes(left_heavy(dtype=np.uint8, top=200), "PNG"), width=50, height=20_000)
    loaded = []
    monkeypatch.setattr(Image.Image, "load", lambda im: loaded.append(im))
    error = rejected(data, name="scan.png")
    assert error.status == 413 and "20000x50" in error.reason and "exceed the limit" in error.reason
    assert loaded == []


def test_decompression_bomb_is_413(monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # 24x30 = 720 > 2 * 100: Pillow's error, not a warning
    error = rejected(pil_bytes(left_heavy(dtype=np.uint8, top=200), "PNG"), name="scan.png")
    assert error.status == 413 and "too large to decode" in error.reason


@pytest.mark.parametrize("fmt", ["PNG", "TIFF", "JPEG"])
def test_truncated_pil_image_is_400(fmt):
    data = pil_bytes(np.random.default_rng(1).integers(0, 255, (64, 64)).astype(np.uint8), fmt)
    error = rejected(data[: len(data) // 2], name=f"scan.{fmt.lower()}")
    assert error.status == 400 and f"cannot decode the {fmt}" in error.reason and "truncated" in error.reason


def test_dicom_without_preamble_needs_force_dicom(tmp_path):
    data = dicom_bytes(tmp_path)[132:]  # no preamble and no "DICM"
    assert rejected(data).status == 400
    decoded = decode_upload(data, name="scan.dcm", field="image", force_dicom=True)
    np.testing.assert_array_equal(decoded.image, left_heavy())


def test_error_dict_and_pickling():
    error = UploadError(413, "scan.dcm: upload is over the size limit", "image")
    assert error.to_dict() == {
        "error": "Payload Too Large",
        "field": "image",
        "reason": "scan.dcm: upload is over the size limit",
        "status": 413,
    }
    assert str(error) == "image: scan.dcm: upload is over the size limit"
    again = pickle.loads(pickle.dumps(error))
    assert (again.status, again.reason, again.field) == (413, error.reason, "image")
    with pytest.raises(ValueError):
        UploadError(500, "not a client error")


# --- form fields, boxes and points ---------------------------------------------------------


def test_unknown_field_is_422_and_named():
    with pytest.raises(UploadError) as info:
        check_fields(["imgae", "box"], allowed={"image", "box", "seed"}, required={"image"})
    error = info.value
    assert error.status == 422 and error.field == "imgae"
    assert "unknown form field 'imgae' (did you mean 'image'?); expected one of: box, image, seed" in error.reason
    assert "missing required form field 'image'" in error.reason


def test_missing_field_is_422():
    with pytest.raises(UploadError) as info:
        check_fields(["cc"], allowed={"cc", "mlo"}, required={"cc", "mlo"})
    assert (info.value.status, info.value.field) == (422, "mlo")
    assert info.value.reason == "missing required form field 'mlo'"
    check_fields(["cc", "mlo"], allowed={"cc", "mlo", "box"}, required={"cc", "mlo"})  # no error


@pytest.mark.parametrize(
    "text, expected",
    [
        (None, None),
        ("", None),
        ("  ", None),
        ("1,2,3,4", (1, 2, 3, 4)),
        (" 1 , 2 , 30 , 40 ", (1, 2, 30, 40)),
        ("[1, 2, 3, 4]", (1, 2, 3, 4)),
        ("1.0,2,3,4", (1, 2, 3, 4)),
        ('["1", 2, 3, 4.0]', (1, 2, 3, 4)),
    ],
)
def test_parse_box(text, expected):
    assert parse_box(text) == expected


@pytest.mark.parametrize(
    "text, word",
    [
        ("a,b,c,d", "not an integer"),
        ("1,2,3", "has 3 values"),
        ("10,0,5,20", "x1 > x0"),
        ("0,10,5,10", "y1 > y0"),
        ("-1,0,5,5", "negative"),
        ("[1,2,3]", "has 3 values"),
        ("[1,2", "not valid JSON"),
        ("1.5,2,3,4", "'1.5'"),
        ("[true,2,3,4]", "True"),
        ("[NaN,2,3,4]", "nan"),
        ("1_0,2,30,40", "'1_0'"),
        ("1e1,2,30,40", "'1e1'"),
        ("9," * 200 + "9", "characters long"),
    ],
)
def test_bad_box_is_422(text, word):
    with pytest.raises(UploadError) as info:
        parse_box(text, field="roi")
    assert (info.value.status, info.value.field) == (422, "roi") and word in info.value.reason


@pytest.mark.parametrize(
    "text, expected, word",
    [
        ("3,4", (3, 4), None),
        ("[3, 4]", (3, 4), None),
        (None, None, None),
        ("3", None, "has 1 values"),
        ("3,x", None, "not an integer"),
        ("-3,4", None, "negative"),
        ('{"x": 3}', None, "expected 2"),
        ("[3, {}]", None, "not an integer"),
    ],
)
def test_parse_point(text, expected, word):
    if word is None:
        assert parse_point(text) == expected
        return
    with pytest.raises(UploadError) as info:
        parse_point(text)
    assert (info.value.status, info.value.field) == (422, "seed") and word in info.value.reason


@pytest.mark.parametrize(
    "value, inside",
    [
        ((0, 0, 30, 24), True),
        ((0, 0, 31, 24), False),
        ((0, 0, 30, 25), False),
        ((29, 23), True),
        ((30, 0), False),
        ((0, 24), False),
        (None, True),
    ],
)
def test_check_in_bounds(value, inside):
    if inside:
        check_in_bounds(value, (24, 30), "box")
        return
    with pytest.raises(UploadError) as info:
        check_in_bounds(value, (24, 30), "box")
    assert info.value.status == 422 and "outside the image of 30 columns x 24 rows" in info.value.reason


# --- success cases -------------------------------------------------------------------------


def test_dicom_decodes_like_read_dicom(tmp_path):
    pixels = np.ascontiguousarray(np.fliplr(left_heavy()))  # a right breast, on the right: mirrored
    path = write_mammogram(tmp_path / "case_R_MLO.dcm", pixels, dataclasses.replace(INFO, side=Side.RIGHT))
    expected, meta = read_dicom(path)

    decoded = decode_upload(path.read_bytes(), name="case.dcm", field="image")

    np.testing.assert_array_equal(decoded.image, expected)
    assert decoded.image.dtype == np.float32 and decoded.image.flags.c_contiguous
    assert (decoded.kind, decoded.name, decoded.view, decoded.flipped, decoded.shape) == (
        "dicom",
        "case.dcm",
        View.MLO,
        True,
        (24, 30),
    )
    assert decoded.meta.path == "case.dcm" and decoded.meta.side is Side.RIGHT and decoded.meta.rows == meta.rows
    assert decoded.meta.orientation_source == "header" and not decoded.meta.content_disagrees


def test_read_dicom_takes_bytes_and_file_objects(tmp_path):
    data = dicom_bytes(tmp_path)
    expected, _ = read_dicom(tmp_path / "img.dcm")
    for source in (data, bytearray(data), io.BytesIO(data)):
        image, meta = read_dicom(source, name="up.dcm")
        np.testing.assert_array_equal(image, expected)
        assert meta.path == "up.dcm"
    assert read_dicom(data)[1].path == "<upload>"
    assert read_dicom_header(data, name="up.dcm").rows == 24
    stream = io.BytesIO(b"junk" + data)
    stream.seek(4)  # a file object is read from its current position
    np.testing.assert_array_equal(read_dicom(stream)[0], expected)


@pytest.mark.parametrize(
    "dtype, top, fmt, kind",
    [
        (np.uint8, 250, "PNG", "png"),
        (np.uint16, 60_000, "PNG", "png"),
        (np.uint16, 60_000, "TIFF", "tiff"),
        (np.uint8, 250, "TIFF", "tiff"),
    ],
)
def test_png_and_tiff_decode_at_their_depth(dtype, top, fmt, kind):
    pixels = left_heavy(top=top, dtype=dtype)
    decoded = decode_upload(pil_bytes(pixels, fmt), name=f"scan.{kind}", field="image")
    assert (decoded.kind, decoded.shape, decoded.flipped, decoded.view) == (kind, (24, 30), False, None)
    assert decoded.image.dtype == np.float32 and decoded.image.flags.c_contiguous
    np.testing.assert_array_equal(decoded.image, pixels.astype(np.float32))  # 16-bit kept, not cut to 8
    assert decoded.image.max() == pixels.max() > (255 if dtype == np.uint16 else 200)


def test_rgb_and_jpeg_become_grayscale():
    gray = left_heavy(top=240, dtype=np.uint8)
    rgb = decode_upload(pil_bytes(np.dstack([gray] * 3), "PNG"), name="rgb.png", field="image")
    np.testing.assert_array_equal(rgb.image, gray)
    jpeg = decode_upload(pil_bytes(gray, "JPEG", quality=95), name="scan.jpg", field="image")
    assert jpeg.kind == "jpeg" and jpeg.shape == (24, 30) and np.abs(jpeg.image - gray).max() <= 6


def test_right_breast_png_is_mirrored_with_its_box():
    left = left_heavy(top=60_000)
    decoded = decode_upload(pil_bytes(np.ascontiguousarray(np.fliplr(left)), "PNG"), name="r.png", field="image")
    assert decoded.flipped
    np.testing.assert_array_equal(decoded.image, left.astype(np.float32))
    assert decoded.image[:, :10].mean() > decoded.image[:, -10:].mean()
    # A box and a point placed on the upload follow the mirroring.
    assert canonical_box((25, 2, 30, 6), decoded) == (0, 2, 5, 6)
    assert canonical_point((29, 3), decoded) == (0, 3)
    unflipped = DecodedImage(image=np.zeros((4, 8), np.float32), flipped=False, kind="png", name="x", view=None)
    assert canonical_box((1, 1, 2, 2), unflipped) == (1, 1, 2, 2) and unflipped.shape == (4, 8)


def test_sniff():
    assert sniff(b"\x00" * 128 + b"DICM") == "dicom"
    assert sniff(b"\x89PNG\r\n\x1a\n") == "png" and sniff(b"MM\x00*") == "tiff"
    assert sniff(b"\xff\xd8\xff\xe0") == "jpeg"
    assert sniff(b"GIF89a") is None and sniff(b"") is None


# --- property: nothing but UploadError -----------------------------------------------------


def _valid_files() -> list[bytes]:
    """One small file per format, for the corruption property (built once, at import)."""
    pixels = left_heavy(8, 12)
    with tempfile.TemporaryDirectory() as tmp:  # write_mammogram takes a path
        dicom = write_mammogram(Path(tmp) / "a.dcm", pixels, INFO).read_bytes()
    small = pixels.astype(np.uint8)
    return [
        dicom,
        pil_bytes(pixels, "PNG"),
        pil_bytes(small, "PNG"),
        pil_bytes(pixels, "TIFF"),
        pil_bytes(small, "JPEG"),
    ]


VALID_FILES = _valid_files()


def _decode_or_upload_error(data: bytes, **kwargs) -> None:
    try:
        decoded = decode_upload(data, name="fuzz", field="image", **kwargs)
    except UploadError as exc:
        assert 400 <= exc.status < 500 and exc.reason
        return
    assert decoded.image.ndim == 2 and decoded.image.dtype == np.float32


@pytest.mark.filterwarnings("ignore::UserWarning")  # pydicom and Pillow warn on garbage
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=4096))
def test_arbitrary_bytes_only_raise_upload_error(data):
    _decode_or_upload_error(data)
    _decode_or_upload_error(data, force_dicom=True)


@pytest.mark.filterwarnings("ignore::UserWarning")  # pydicom and Pillow warn on garbage
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.sampled_from(range(len(VALID_FILES))),
    st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), max_size=8),
    st.one_of(st.none(), st.integers(0, 10**6)),
)
def test_corrupted_files_only_raise_upload_error(which, flips, cut):
    data = bytearray(VALID_FILES[which])
    for position, value in flips:
        data[position % len(data)] = value
    if cut is not None:
        data = data[: cut % (len(data) + 1)]
    _decode_or_upload_error(bytes(data), max_dim=512)
