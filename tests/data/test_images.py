"""The one image decoder: a file read from disk (localize, the CLI) and uploaded (Serve) gives one array."""

from __future__ import annotations

import io
import pickle

import numpy as np
import pytest
from PIL import Image

from mammo_ray.data.dicom import DicomReadError
from mammo_ray.data.images import (
    NOT_AN_IMAGE,
    ImageReadError,
    ImageTooLargeError,
    read_image,
)
from mammo_ray.localize.whole_image import read_mammogram
from mammo_ray.serving.uploads import UploadError, decode_upload


def right_breast(rows: int = 40, cols: int = 56, top: int = 250, dtype=np.uint8) -> np.ndarray:
    """A bright breast against the right edge: every reader must mirror it to the left."""
    ramp = np.linspace(0, top, cols).round()
    return np.ascontiguousarray(np.tile(ramp, (rows, 1)) + np.arange(rows)[:, None] % 3).astype(dtype)


def encode(pixels: np.ndarray, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=fmt, **options)
    return buffer.getvalue()


@pytest.mark.parametrize(
    ("dtype", "top", "fmt", "suffix"),
    [
        (np.uint8, 250, "PNG", "png"),
        (np.uint16, 60_000, "PNG", "png"),
        (np.uint8, 250, "TIFF", "tif"),
        (np.uint16, 60_000, "TIFF", "tiff"),
    ],
    ids=["png8", "png16", "tiff8", "tiff16"],
)
def test_localize_reader_and_upload_give_the_identical_array(tmp_path, dtype, top, fmt, suffix):
    pixels = right_breast(top=top, dtype=dtype)
    data = encode(pixels, fmt)
    path = tmp_path / f"film.{suffix}"
    path.write_bytes(data)

    offline, flipped = read_mammogram(path)
    uploaded = decode_upload(data, name=path.name, field="file")

    assert flipped and uploaded.flipped
    assert offline.dtype == uploaded.image.dtype == np.float32
    np.testing.assert_array_equal(offline, uploaded.image)
    # the stored depth is kept (16-bit values are not cut to 8 bits) and the breast is mirrored left
    np.testing.assert_array_equal(offline, np.fliplr(pixels).astype(np.float32))
    assert offline.max() == pixels.max()


def test_exif_orientation_is_applied_on_both_paths(tmp_path):
    pixels = right_breast(rows=30, cols=50)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise to display
    data = encode(pixels, "PNG", exif=exif.tobytes())
    path = tmp_path / "rotated.png"
    path.write_bytes(data)
    offline, _ = read_mammogram(path)
    uploaded = decode_upload(data, name="rotated.png", field="file")
    assert offline.shape == uploaded.shape == (50, 30)  # upright as a viewer shows it
    np.testing.assert_array_equal(offline, uploaded.image)


def test_format_comes_from_the_bytes_not_the_name(tmp_path):
    pixels = right_breast(dtype=np.uint16, top=40_000)
    path = tmp_path / "film.dcm"  # a PNG under a DICOM name
    path.write_bytes(encode(pixels, "PNG"))
    decoded = read_image(path)
    assert decoded.kind == "png" and decoded.name == str(path) and decoded.view is None
    np.testing.assert_array_equal(decoded.image, np.fliplr(pixels).astype(np.float32))


def test_errors_name_the_file_and_map_to_upload_statuses(tmp_path):
    junk = tmp_path / "notes.png"
    junk.write_bytes(b"hello, not a mammogram\n" * 8)
    with pytest.raises(ImageReadError) as info:
        read_image(junk)
    assert str(info.value).startswith(f"{junk}: {NOT_AN_IMAGE}") and isinstance(info.value, ValueError)
    with pytest.raises(DicomReadError, match="not a DICOM file"):  # offline, bare DICOM data sets are tried too
        read_mammogram(junk)
    with pytest.raises(ImageReadError, match="file not found"):
        read_image(tmp_path / "missing.png")

    big = encode(right_breast(rows=40, cols=56), "PNG")
    with pytest.raises(ImageTooLargeError, match="exceed the limit 32x32"):
        read_image(big, name="big.png", max_dim=32)
    with pytest.raises(UploadError) as upload:
        decode_upload(big, name="big.png", field="file", max_dim=32)
    assert upload.value.status == 413 and upload.value.reason.startswith("big.png: image dimensions 40x56")

    error = pickle.loads(pickle.dumps(ImageTooLargeError("x.png", "too big")))
    assert type(error) is ImageTooLargeError and (error.name, error.reason) == ("x.png", "too big")
