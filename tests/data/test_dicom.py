"""Tests for mammo_ray.data.dicom on tiny DICOMs built in tmp_path."""

from __future__ import annotations

import dataclasses
import io
import pickle
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.filebase import DicomFileLike
from pydicom.filewriter import write_dataset
from pydicom.pixels import get_decoder
from pydicom.uid import (
    MPEG2MPML,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
    generate_uid,
)

from mammo_ray.constants import Side, View
from mammo_ray.data.dicom import (
    DEFAULT_MAX_DIM,
    DicomMeta,
    DicomReadError,
    _header,
    parse_side_view_from_path,
    read_dicom,
    read_dicom_header,
    read_dicom_mask,
)

MAMMO_FOR_PRESENTATION = "1.2.840.10008.5.1.4.1.1.1.2"


def make_dataset(pixels: np.ndarray, *, bits_stored: int | None = None, **attrs) -> Dataset:
    """A minimal single-frame grayscale mammogram; ``attrs`` override (None deletes)."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = MAMMO_FOR_PRESENTATION
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.PatientID = "P_00001"
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = pixels.dtype.itemsize * 8
    ds.BitsStored = bits_stored or ds.BitsAllocated
    ds.HighBit = ds.BitsStored - 1
    ds.PixelRepresentation = 0
    ds.PixelData = pixels.astype(pixels.dtype.newbyteorder("<")).tobytes()
    for keyword, value in attrs.items():
        if value is None:
            if keyword in ds:
                delattr(ds, keyword)
        else:
            setattr(ds, keyword, value)
    return ds


def write(ds: Dataset, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def left_heavy(rows: int = 6, cols: int = 9, dtype=np.uint16, top: int = 4000) -> np.ndarray:
    """Bright breast against the left edge, fading to background on the right."""
    ramp = np.linspace(top, 0, cols).round().astype(dtype)
    return np.ascontiguousarray(np.tile(ramp, (rows, 1)) + np.arange(rows, dtype=dtype)[:, None])


def code_item(value: str, meaning: str) -> Dataset:
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value, "SRT", meaning
    return item


# --- round trip and meta -------------------------------------------------------------------


@pytest.mark.parametrize("spacing_keyword", ["PixelSpacing", "ImagerPixelSpacing"])
def test_monochrome2_round_trip_and_meta(tmp_path, spacing_keyword):
    pixels = left_heavy()
    path = write(
        make_dataset(pixels, ImageLaterality="L", ViewPosition="CC", **{spacing_keyword: [0.05, 0.07]}),
        tmp_path / "img.dcm",
    )

    image, meta = read_dicom(path)

    assert image.dtype == np.float32 and image.flags.c_contiguous
    np.testing.assert_array_equal(image, pixels.astype(np.float32))
    assert meta == DicomMeta(
        path=str(path),
        patient_id="P_00001",
        side=Side.LEFT,
        view=View.CC,
        rows=6,
        columns=9,
        pixel_spacing=(0.05, 0.07),
        photometric="MONOCHROME2",
        bits_allocated=16,
        bits_stored=16,
        transfer_syntax="Explicit VR Little Endian",
        flipped=False,
        orientation_source="header",
        content_disagrees=False,
    )
    # the header read decodes no pixel, so it decides no orientation
    assert read_dicom_header(path) == dataclasses.replace(meta, orientation_source="")


def test_eight_bit_and_absent_optional_fields(tmp_path):
    pixels = left_heavy(dtype=np.uint8, top=200)
    path = write(make_dataset(pixels, PatientID=None), tmp_path / "img.dcm")
    image, meta = read_dicom(path)
    np.testing.assert_array_equal(image, pixels)
    assert (meta.patient_id, meta.side, meta.view, meta.pixel_spacing) == ("", None, None, None)
    assert (meta.bits_allocated, meta.bits_stored) == (8, 8)


# --- intensity: MONOCHROME1, rescale, bit depth, VOI ----------------------------------------

STORED_12 = np.array([[0, 1536, 2048], [2559, 4095, 100]], dtype=np.uint16)


def _window(values, center=2048.0, width=1024.0, y_max=4095.0):
    """DICOM PS3.3 C.11.2.1.2.1 LINEAR window onto [0, y_max]."""
    values = np.asarray(values, dtype=np.float64)
    c, w = center - 0.5, width - 1
    out = ((values - c) / w + 0.5) * y_max
    out[values <= c - w / 2] = 0
    out[values > c + w / 2] = y_max
    return out


def _voi_lut_item() -> Dataset:
    item = Dataset()
    item.add_new("LUTDescriptor", "US", [4096, 0, 8])  # 4096 entries, first input 0, 8-bit output
    item.add_new("LUTData", "US", [v // 16 for v in range(4096)])
    return item


INTENSITY_CASES = {
    # name: (stored, bits_stored, attrs, apply_voi, expected)
    "mono2_16bit": (STORED_12, 16, {}, True, STORED_12),
    "mono1_12bit_inverted": (
        STORED_12,
        12,
        {"PhotometricInterpretation": "MONOCHROME1"},
        True,
        [[4095, 2559, 2047], [1536, 0, 3995]],
    ),
    "mono1_16bit_inverted": (
        STORED_12,
        16,
        {"PhotometricInterpretation": "MONOCHROME1"},
        True,
        65535 - STORED_12.astype(np.int64),
    ),
    "rescale": (STORED_12, 12, {"RescaleSlope": 2, "RescaleIntercept": -100}, True, STORED_12 * 2.0 - 100),
    "mono1_rescale_inverted_about_rescaled_range": (
        STORED_12,
        12,
        {"PhotometricInterpretation": "MONOCHROME1", "RescaleSlope": 2, "RescaleIntercept": -100},
        True,
        (-100 + 8090) - (STORED_12 * 2.0 - 100),
    ),
    "12bit_garbage_high_bits_masked": (STORED_12 | 0xF000, 12, {}, True, STORED_12),
    "window_applied": (STORED_12, 12, {"WindowCenter": 2048, "WindowWidth": 1024}, True, _window(STORED_12)),
    "window_skipped": (STORED_12, 12, {"WindowCenter": 2048, "WindowWidth": 1024}, False, STORED_12),
    "mono1_window_then_inverted": (
        STORED_12,
        12,
        {"WindowCenter": 2048, "WindowWidth": 1024, "PhotometricInterpretation": "MONOCHROME1"},
        True,
        4095 - _window(STORED_12),
    ),
    "voi_lut_sequence": (STORED_12, 12, {"VOILUTSequence": [_voi_lut_item()]}, True, STORED_12 // 16),
    "mono1_voi_lut_inverted_about_lut_range": (
        STORED_12,
        12,
        {"VOILUTSequence": [_voi_lut_item()], "PhotometricInterpretation": "MONOCHROME1"},
        True,
        255 - STORED_12 // 16,
    ),
}


@pytest.mark.parametrize("case", INTENSITY_CASES)
def test_intensity(tmp_path, case):
    stored, bits_stored, attrs, apply_voi, expected = INTENSITY_CASES[case]
    path = write(make_dataset(stored, bits_stored=bits_stored, **attrs), tmp_path / "img.dcm")
    image, _ = read_dicom(path, flip=False, apply_voi=apply_voi)
    np.testing.assert_allclose(image, np.asarray(expected, dtype=np.float64), rtol=1e-6, atol=1e-3)


def test_monochrome1_brightest_becomes_darkest(tmp_path):
    path = write(make_dataset(STORED_12, bits_stored=12, PhotometricInterpretation="MONOCHROME1"), tmp_path / "img.dcm")
    image, meta = read_dicom(path, flip=False)
    assert meta.photometric == "MONOCHROME1"
    assert image[STORED_12 == 4095].item() == 0.0 and image[STORED_12 == 0].item() == 4095.0


# --- compressed transfer syntaxes ------------------------------------------------------------


def _random_12bit(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 4096, (32, 40)).astype(np.uint16)


def test_rle_round_trip(tmp_path):
    pixels = _random_12bit()
    ds = make_dataset(pixels, bits_stored=12)
    ds.compress(RLELossless)
    image, meta = read_dicom(write(ds, tmp_path / "rle.dcm"), flip=False)
    assert meta.transfer_syntax == "RLE Lossless"
    np.testing.assert_array_equal(image, pixels)


def _jpeg2000_file(tmp_path: Path, pixels: np.ndarray) -> Path:
    ds = make_dataset(pixels, bits_stored=12)
    ds.compress(JPEG2000Lossless, encoding_plugin="pylibjpeg")
    return write(ds, tmp_path / "j2k.dcm")


def test_jpeg2000_lossless_round_trip(tmp_path):
    pixels = _random_12bit(1)
    image, meta = read_dicom(_jpeg2000_file(tmp_path, pixels), flip=False)
    assert meta.transfer_syntax == "JPEG 2000 Image Compression (Lossless Only)"
    np.testing.assert_array_equal(image, pixels)


def test_jpeg_baseline_decodes(tmp_path):
    pixels = left_heavy(16, 16, dtype=np.uint8, top=240)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=95)
    ds = make_dataset(pixels, PixelData=encapsulate([buffer.getvalue()]))
    ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
    image, _ = read_dicom(write(ds, tmp_path / "jpeg.dcm"), flip=False)
    assert np.abs(image - pixels).max() <= 4  # lossy, but close on a smooth ramp


def test_missing_plugin_names_the_package(tmp_path, monkeypatch):
    path = _jpeg2000_file(tmp_path, _random_12bit())
    monkeypatch.setattr(get_decoder(JPEG2000Lossless), "_available", {})  # as if no plugin installed

    with pytest.raises(DicomReadError) as info:
        read_dicom(path)
    assert "pylibjpeg-openjpeg" in info.value.reason and "j2k.dcm" in str(info.value)
    assert read_dicom_header(path).rows == 32  # the header needs no codec


def _jpeg_lossless_stream(pixels: np.ndarray, precision: int) -> bytes:
    """A JPEG Lossless codestream (ITU-T T.81 process 14, predictor 1, point transform 0) of one
    grayscale frame. pydicom encodes no JPEG Lossless and ships no grayscale file of it, so the test
    writes its own: one Huffman table that gives each difference category 0..16 a 5-bit code."""
    x = pixels.astype(np.int64)
    pred = np.empty_like(x)
    pred[0, 0] = 1 << (precision - 1)  # T.81 H.1.1: the first sample's predictor
    pred[0, 1:] = x[0, :-1]  # first row: the sample to the left
    pred[1:, 0] = x[:-1, 0]  # first column: the sample above
    pred[1:, 1:] = x[1:, :-1]  # predictor 1 elsewhere: the sample to the left
    diff = (x - pred) % 65536  # differences are taken modulo 2^16 ...
    diff = np.where(diff >= 32768, diff - 65536, diff)  # ... and coded as signed values
    bits = []
    for d in diff.ravel().tolist():
        category = abs(d).bit_length()  # 0..16; 16 (d = -32768) has no extra bits
        bits.append(format(category, "05b"))
        if 0 < category < 16:  # a negative difference is sent as the low bits of d - 1
            bits.append(format((d if d > 0 else d - 1) & ((1 << category) - 1), f"0{category}b"))
    stream = "".join(bits)
    stream += "1" * (-len(stream) % 8)  # pad the last byte with 1-bits
    entropy = bytearray()
    for i in range(0, len(stream), 8):
        entropy.append(int(stream[i : i + 8], 2))
        if entropy[-1] == 0xFF:
            entropy.append(0x00)  # byte stuffing
    rows, cols = pixels.shape
    sof3 = (
        b"\xff\xc3\x00\x0b"
        + bytes([precision])
        + rows.to_bytes(2, "big")
        + cols.to_bytes(2, "big")
        + b"\x01\x01\x11\x00"
    )
    dht = b"\xff\xc4\x00\x24\x00" + bytes([0, 0, 0, 0, 17] + [0] * 11) + bytes(range(17))
    sos = b"\xff\xda\x00\x08\x01\x01\x00\x01\x00\x00"  # one component, table 0, predictor 1, Se 0, Al 0
    return b"\xff\xd8" + sof3 + dht + sos + bytes(entropy) + b"\xff\xd9"


@pytest.mark.parametrize("syntax", [JPEGLossless, JPEGLosslessSV1])
@pytest.mark.parametrize("bits_stored", [12, 16])
def test_jpeg_lossless_decodes_exactly(tmp_path, syntax, bits_stored):
    rng = np.random.default_rng(bits_stored)
    pixels = rng.integers(0, 2**bits_stored, (24, 33)).astype(np.uint16)
    pixels[:, :8] = np.arange(8, dtype=np.uint16) * (2**bits_stored // 9)  # a smooth band: small differences too
    ds = make_dataset(
        pixels, bits_stored=bits_stored, PixelData=encapsulate([_jpeg_lossless_stream(pixels, bits_stored)])
    )
    ds.file_meta.TransferSyntaxUID = syntax
    image, meta = read_dicom(write(ds, tmp_path / "jpeg-lossless.dcm"), flip=False)
    assert meta.transfer_syntax == syntax.name and meta.bits_stored == bits_stored
    np.testing.assert_array_equal(image, pixels)
    assert "pylibjpeg" in get_decoder(syntax).available_plugins  # pylibjpeg-libjpeg, from the jpeg extra (in dev)


def test_the_jpeg_lossless_file_pydicom_ships_is_colour_and_refused_by_name():
    path = get_testdata_file("SC_rgb_jpeg_gdcm.dcm")  # pydicom's only JPEG Lossless (.70) file: RGB
    with pytest.raises(DicomReadError, match="SamplesPerPixel is 3: mammograms are grayscale"):
        read_dicom(path)


def test_jpeg_ls_lossless_decodes_to_the_uncompressed_pixels():
    """pydicom ships MR_small twice: uncompressed and JPEG-LS lossless; pylibjpeg-libjpeg decodes the latter."""
    compressed, compressed_meta = read_dicom(get_testdata_file("MR_small_jpeg_ls_lossless.dcm"), flip=False)
    plain, plain_meta = read_dicom(get_testdata_file("MR_small.dcm"), flip=False)
    assert compressed_meta.transfer_syntax == JPEGLSLossless.name
    assert plain_meta.transfer_syntax == ExplicitVRLittleEndian.name
    assert compressed.shape == (64, 64) and np.ptp(plain) > 1000
    np.testing.assert_array_equal(compressed, plain)


@pytest.mark.parametrize(
    ("name", "dtype"), [("JPEGLSNearLossless_08.dcm", np.uint8), ("JPEGLSNearLossless_16.dcm", np.uint16)]
)
def test_jpeg_ls_near_lossless_decodes(name, dtype):
    path = get_testdata_file(name)
    image, meta = read_dicom(path, flip=False)
    assert meta.transfer_syntax == JPEGLSNearLossless.name
    decoded = dcmread(path).pixel_array  # no rescale, no VOI, MONOCHROME2: read_dicom returns the samples
    assert decoded.dtype == dtype and image.shape == decoded.shape
    np.testing.assert_array_equal(image, decoded.astype(np.float32))
    assert image.min() == 0 and image.max() == np.iinfo(dtype).max  # the full range survives


def test_missing_jpeg_ls_plugin_names_the_package(monkeypatch):
    path = get_testdata_file("MR_small_jpeg_ls_lossless.dcm")
    monkeypatch.setattr(get_decoder(JPEGLSLossless), "_available", {})  # as if pylibjpeg-libjpeg were absent
    with pytest.raises(DicomReadError) as info:
        read_dicom(path)
    assert "pylibjpeg-libjpeg" in info.value.reason and "mammo-ray[jpeg]" in info.value.reason


# --- rejections -----------------------------------------------------------------------------


def _valid(tmp_path, name="img.dcm", **attrs) -> Path:
    return write(make_dataset(left_heavy(), **attrs), tmp_path / name)


def _truncated(tmp_path) -> Path:
    path = _valid(tmp_path)
    path.write_bytes(path.read_bytes()[:-10])
    return path


def _not_dicom(tmp_path) -> Path:
    path = tmp_path / "notes.dcm"
    path.write_bytes(b"this is a text file, not a mammogram\n" * 20)
    return path


def _empty(tmp_path) -> Path:
    path = tmp_path / "empty.dcm"
    path.write_bytes(b"")
    return path


def _corrupt_j2k(tmp_path) -> Path:
    ds = make_dataset(left_heavy(), PixelData=encapsulate([b"\xff\x4f\xff\x51" + b"\x00" * 60]))
    ds.file_meta.TransferSyntaxUID = JPEG2000Lossless
    return write(ds, tmp_path / "corrupt.dcm")


def _mpeg(tmp_path) -> Path:
    ds = make_dataset(left_heavy(), PixelData=encapsulate([b"\x00" * 64]))
    ds.file_meta.TransferSyntaxUID = MPEG2MPML
    return write(ds, tmp_path / "video.dcm")


HEADER_REJECTIONS = {
    # name: (file builder, word the reason must contain)
    "not_dicom": (_not_dicom, "not a DICOM file"),
    "empty_file": (_empty, "not a DICOM file"),
    "missing_file": (lambda p: p / "absent.dcm", "not found"),
    "directory": (lambda p: p, "not a regular file"),
    "truncated_file": (_truncated, "truncated"),
    "short_pixel_data": (lambda p: _valid(p, PixelData=b"\x00" * 20), "expected 108"),
    "missing_pixel_data": (lambda p: _valid(p, PixelData=None), "PixelData"),
    "oversized_rows": (lambda p: _valid(p, Rows=20_000), "exceed"),
    "oversized_columns": (lambda p: _valid(p, Columns=DEFAULT_MAX_DIM + 1), "exceed"),
    "zero_columns": (lambda p: _valid(p, Columns=0), "zero"),
    "bits_stored_over_allocated": (lambda p: _valid(p, BitsStored=17), "BitsStored 17"),
    "high_bit": (lambda p: _valid(p, HighBit=11), "HighBit"),
    "bits_allocated": (lambda p: _valid(p, BitsAllocated=12), "BitsAllocated 12"),
    "rgb": (lambda p: _valid(p, SamplesPerPixel=3, PhotometricInterpretation="RGB"), "grayscale"),
    "palette": (lambda p: _valid(p, PhotometricInterpretation="PALETTE COLOR"), "MONOCHROME"),
    "multi_frame": (lambda p: _valid(p, NumberOfFrames=2), "NumberOfFrames"),
    "unsupported_syntax": (_mpeg, "unsupported transfer syntax"),
}


@pytest.mark.parametrize("case", HEADER_REJECTIONS)
def test_header_rejections_happen_before_decoding(tmp_path, monkeypatch, case):
    build, word = HEADER_REJECTIONS[case]
    path = build(tmp_path)
    decoded = []
    monkeypatch.setattr(Dataset, "pixel_array", property(lambda ds: decoded.append(ds)))

    for read in (read_dicom, read_dicom_header):
        with pytest.raises(DicomReadError) as info:
            read(path)
        assert info.value.path == str(path) and str(info.value).startswith(f"{path}: ")
        assert word in info.value.reason
    assert decoded == []


def test_corrupt_compressed_data_is_a_decode_error(tmp_path):
    path = _corrupt_j2k(tmp_path)
    assert read_dicom_header(path).rows == 6
    with pytest.raises(DicomReadError, match="corrupt.dcm: cannot decode JPEG 2000") as info:
        read_dicom(path)
    assert info.value.__cause__ is not None


def test_caps_are_configurable(tmp_path):
    path = _valid(tmp_path)
    with pytest.raises(DicomReadError, match="exceed the limit 5x100"):
        read_dicom(path, max_rows=5, max_cols=100)


def test_error_survives_pickling():
    error = pickle.loads(pickle.dumps(DicomReadError("/x/a.dcm", "file not found")))
    assert (error.path, error.reason, str(error)) == ("/x/a.dcm", "file not found", "/x/a.dcm: file not found")


# --- files without the 128-byte preamble -----------------------------------------------------


def test_file_without_preamble_is_read(tmp_path):
    full = _valid(tmp_path).read_bytes()
    path = tmp_path / "no_preamble.dcm"
    path.write_bytes(full[132:])  # drop preamble + "DICM", keep the file meta group
    image, _ = read_dicom(path)
    np.testing.assert_array_equal(image, left_heavy())


@pytest.mark.parametrize("implicit", [True, False])
def test_bare_data_set_is_read(tmp_path, implicit):
    ds = make_dataset(left_heavy())
    del ds.file_meta
    path = tmp_path / "bare.dcm"
    with open(path, "wb") as handle:
        fp = DicomFileLike(handle)
        fp.is_little_endian, fp.is_implicit_VR = True, implicit
        write_dataset(fp, ds)
    image, meta = read_dicom(path)
    np.testing.assert_array_equal(image, left_heavy())
    assert meta.transfer_syntax == ("Implicit VR Little Endian" if implicit else "Explicit VR Little Endian")


# --- orientation ----------------------------------------------------------------------------


def test_breast_on_right_is_flipped(tmp_path):
    right_heavy = np.ascontiguousarray(np.fliplr(left_heavy()))
    path = write(make_dataset(right_heavy), tmp_path / "img.dcm")

    image, meta = read_dicom(path)
    assert meta.flipped and image.flags.c_contiguous
    np.testing.assert_array_equal(image, left_heavy())
    assert image[:, :3].mean() > image[:, -3:].mean()

    image, meta = read_dicom(path, flip=False)
    assert not meta.flipped
    np.testing.assert_array_equal(image, right_heavy)


def test_monochrome1_orientation_is_decided_after_inversion(tmp_path):
    # Stored dark-on-left is a bright breast on the left once inverted: no flip.
    stored = (4095 - left_heavy(top=4000)).astype(np.uint16)
    path = write(make_dataset(stored, bits_stored=12, PhotometricInterpretation="MONOCHROME1"), tmp_path / "img.dcm")
    image, meta = read_dicom(path)
    assert not meta.flipped
    np.testing.assert_array_equal(image, left_heavy(top=4000))


def test_forced_flip_for_masks(tmp_path):
    path = write(make_dataset(left_heavy(), ImageLaterality="L"), tmp_path / "mask.dcm")
    image, meta = read_dicom(path, flip=True)  # the caller's decision beats the header
    assert meta.flipped and (meta.orientation_source, meta.content_disagrees) == ("caller", False)
    np.testing.assert_array_equal(image, np.fliplr(left_heavy()))


def test_laterality_header_decides_over_content(tmp_path):
    # A RIGHT breast drawn with its tissue on the left: the header wins, the content check is recorded.
    path = write(make_dataset(left_heavy(), ImageLaterality="R"), tmp_path / "img.dcm")
    image, meta = read_dicom(path)
    assert meta.flipped and (meta.orientation_source, meta.content_disagrees) == ("header", True)
    np.testing.assert_array_equal(image, np.fliplr(left_heavy()))


@pytest.mark.parametrize(
    "attrs, pixels, flipped, disagrees",
    [
        ({"ImageLaterality": "R"}, "right", True, False),  # standard right breast: header and content agree
        ({"ImageLaterality": "L"}, "left", False, False),
        ({"Laterality": "L"}, "right", False, True),  # series-level laterality counts as a header
        ({"ViewCodeSequence": [code_item("X-1", "right cranio-caudal")]}, "left", True, True),  # side in the view code
    ],
)
def test_header_side_sources(tmp_path, attrs, pixels, flipped, disagrees):
    stored = left_heavy() if pixels == "left" else np.ascontiguousarray(np.fliplr(left_heavy()))
    _, meta = read_dicom(write(make_dataset(stored, **attrs), tmp_path / "img.dcm"))
    assert (meta.flipped, meta.orientation_source, meta.content_disagrees) == (flipped, "header", disagrees)


@pytest.mark.parametrize("name", ["img.dcm", "Mass-Training_P_00001_LEFT_CC/000000.dcm"])
def test_without_laterality_header_content_decides(tmp_path, name):
    # Path tokens name a side (LEFT) but never decide the mirror: the content (breast on the right) does.
    right_heavy = np.ascontiguousarray(np.fliplr(left_heavy()))
    path = write(make_dataset(right_heavy, ImageLaterality=None), tmp_path / name)
    image, meta = read_dicom(path)
    assert meta.flipped and (meta.orientation_source, meta.content_disagrees) == ("content", False)
    np.testing.assert_array_equal(image, left_heavy())
    assert read_dicom(path, flip=None)[1].side == (Side.LEFT if "LEFT" in name else None)


# --- side and view --------------------------------------------------------------------------

SIDE_VIEW_CASES = {
    # name: (relative path, header attrs, expected side, expected view)
    "image_laterality": ("img.dcm", {"ImageLaterality": "R", "ViewPosition": "MLO"}, Side.RIGHT, View.MLO),
    "laterality_only": ("img.dcm", {"Laterality": "L"}, Side.LEFT, None),
    "view_code_value": ("img.dcm", {"ViewCodeSequence": [code_item("R-10242", "cranio-caudal")]}, None, View.CC),
    "view_code_meaning": ("img.dcm", {"ViewCodeSequence": [code_item("X-1", "medio-lateral oblique")]}, None, View.MLO),
    "view_code_meaning_with_side": (
        "img.dcm",
        {"ViewCodeSequence": [code_item("X-1", "left cranio-caudal")]},
        Side.LEFT,
        View.CC,
    ),
    "path_only": ("Mass-Training_P_00001_LEFT_CC/1.3.6.1/1.3.6.2/000000.dcm", {}, Side.LEFT, View.CC),
    "header_beats_path": ("Calc-Test_P_00038_LEFT_MLO_1/000000.dcm", {"ImageLaterality": "R"}, Side.RIGHT, View.MLO),
    "both_breasts_unknown": ("img.dcm", {"ImageLaterality": "B"}, None, None),
}


@pytest.mark.parametrize("case", SIDE_VIEW_CASES)
def test_side_and_view(tmp_path, case):
    relative, attrs, side, view = SIDE_VIEW_CASES[case]
    meta = read_dicom_header(write(make_dataset(left_heavy(), **attrs), tmp_path / relative))
    assert (meta.side, meta.view) == (side, view)


@pytest.mark.parametrize(
    "path, expected",
    [
        ("data/Mass-Training_P_00001_LEFT_CC/1.3.6.1.4/1.3.6.1.5/000000.dcm", (Side.LEFT, View.CC)),
        ("Calc-Test_P_00038_LEFT_MLO_1", (Side.LEFT, View.MLO)),
        ("case_R_MLO.dcm", (Side.RIGHT, View.MLO)),
        ("inbreast/22678622_R-CC.dcm", (Side.RIGHT, View.CC)),
        ("ddsm/A_1234_1.RIGHT_CC.LJPEG", (Side.RIGHT, View.CC)),
        ("patient/LMLO.dcm", (Side.LEFT, View.MLO)),
        ("/data/R/Calc-Test_P_00038_LEFT_MLO/000000.dcm", (Side.LEFT, View.MLO)),
        ("L_and_R/x_CC.dcm", (None, View.CC)),
        ("scans/0001/image.dcm", (None, None)),
        ("CLEAR/MLOOKUP.dcm", (None, None)),
    ],
)
def test_parse_side_view_from_path(path, expected):
    assert parse_side_view_from_path(path) == expected
    assert parse_side_view_from_path(Path(path)) == expected


# --- the fast paths equal pydicom's general code ------------------------------------------------
# read_dicom reads uncompressed little-endian pixels itself, windows LINEAR in float32 and reads masks
# as stored: each must give what pydicom's pixel_array, apply_voi_lut and the float image give.

NATIVE_CASES = {
    # name: (dtype, bits_stored, signed)
    "uint8": (np.uint8, 8, False),
    "uint16_12_bits_with_garbage_above": (np.uint16, 12, False),
    "uint16": (np.uint16, 16, False),
    "int16_12_bits_sign_extended": (np.int16, 12, True),
    "int16": (np.int16, 16, True),
    "uint32_20_bits": (np.uint32, 20, False),
}


@pytest.mark.parametrize("case", NATIVE_CASES)
@pytest.mark.parametrize("implicit", [False, True])
@pytest.mark.parametrize("source", ["path", "bytes"])
def test_native_pixels_equal_pydicoms_pixel_array(tmp_path, case, implicit, source):
    dtype, bits, signed = NATIVE_CASES[case]
    rng = np.random.default_rng(len(case))
    info = np.iinfo(dtype)
    # 70 x 90 pixels: more than the 4 KB under which a value is read with the header, not deferred
    raw = rng.integers(info.min, info.max, size=(70, 90), endpoint=True, dtype=dtype)
    ds = make_dataset(raw, bits_stored=bits, PixelRepresentation=int(signed))
    if implicit:
        ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2"
    path = write(ds, tmp_path / "img.dcm")
    expected = dcmread(path).pixel_array.astype(np.float64)
    assert not np.array_equal(expected, raw.astype(np.float64)) or bits == raw.itemsize * 8  # bits were cut
    image, meta = read_dicom(path if source == "path" else path.read_bytes(), flip=False, apply_voi=False)
    np.testing.assert_array_equal(image, expected)
    assert image.dtype == np.float32 and meta.bits_stored == bits


def test_native_pixels_of_a_tiny_image_read_with_the_header(tmp_path):
    pixels = left_heavy()  # 108 bytes: pydicom reads it with the header rather than deferring it
    image, _ = read_dicom(write(make_dataset(pixels), tmp_path / "img.dcm"), flip=False)
    np.testing.assert_array_equal(image, pixels)


WINDOW_CASES = {
    # name: (bits_stored, attrs); pydicom's apply_voi_lut is the reference
    "linear": (12, {"WindowCenter": 1800, "WindowWidth": 900}),
    "linear_named": (12, {"WindowCenter": 1800, "WindowWidth": 900, "VOILUTFunction": "LINEAR"}),
    "several_windows_take_the_first": (16, {"WindowCenter": [30000, 1000], "WindowWidth": [20000, 50]}),
    "after_rescale": (12, {"WindowCenter": 3000, "WindowWidth": 2000, "RescaleSlope": 2, "RescaleIntercept": -100}),
    "wider_than_the_range": (12, {"WindowCenter": 2048, "WindowWidth": 100000}),
    # the general code's cases: the fast path declines them
    "linear_exact": (12, {"WindowCenter": 1800, "WindowWidth": 900, "VOILUTFunction": "LINEAR_EXACT"}),
    "sigmoid": (12, {"WindowCenter": 1800, "WindowWidth": 900, "VOILUTFunction": "SIGMOID"}),
    "width_one_is_a_step": (12, {"WindowCenter": 1800, "WindowWidth": 1}),
}


@pytest.mark.parametrize("case", WINDOW_CASES)
def test_window_equals_pydicoms(tmp_path, case):
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    bits, attrs = WINDOW_CASES[case]
    stored = np.random.default_rng(3).integers(0, 2**bits, size=(40, 60), dtype=np.uint16)
    path = write(make_dataset(stored, bits_stored=bits, **attrs), tmp_path / "img.dcm")
    ds = dcmread(path)
    expected = apply_voi_lut(apply_modality_lut(ds.pixel_array, ds), ds)
    image, _ = read_dicom(path, flip=False)
    np.testing.assert_allclose(image, expected, rtol=1e-6, atol=1e-3 * max(1.0, float(np.ptp(expected))) / 4096)
    assert np.ptp(image) > 0


MASK_CASES = {
    "binary_uint8": (np.array([[0, 255, 0], [0, 255, 255]], np.uint8), {}),
    "any_positive_value": (np.array([[0, 3, 0], [1, 0, 65535]], np.uint16), {}),
    "monochrome1_zero_is_the_lesion": (
        np.array([[0, 255, 255], [255, 0, 255]], np.uint8),
        {"PhotometricInterpretation": "MONOCHROME1"},
    ),
    "rescaled_below_zero": (np.array([[0, 1, 2], [3, 4, 5]], np.uint8), {"RescaleSlope": 1, "RescaleIntercept": -2}),
    "identity_rescale": (np.array([[0, 1, 0], [0, 0, 9]], np.uint8), {"RescaleSlope": 1, "RescaleIntercept": 0}),
    "signed": (np.array([[-5, 0, 7], [1, -1, 0]], np.int16), {"PixelRepresentation": 1}),
}


@pytest.mark.parametrize("case", MASK_CASES)
@pytest.mark.parametrize("flip", [False, True])
def test_mask_read_equals_the_float_image_above_zero(tmp_path, case, flip):
    pixels, attrs = MASK_CASES[case]
    path = write(make_dataset(pixels, **attrs), tmp_path / "mask.dcm")
    mask, meta = read_dicom_mask(path, flip=flip)
    image, _ = read_dicom(path, flip=flip, apply_voi=False)
    assert mask.dtype == bool and mask.flags.c_contiguous
    np.testing.assert_array_equal(mask, image > 0)
    assert mask.any() and not mask.all()
    assert (meta.flipped, meta.orientation_source) == (flip, "caller")


def test_header_values_equal_pydicoms_own_read_twice():
    """``_header`` memoizes conversions by the raw element: each value must still be what pydicom gives.

    pydicom's shipped files cover explicit and implicit VR, big endian, other character sets and
    deferred values; the second pass reads every value from the memo.
    """
    # The files pydicom ships (get_testdata_files would also try to download its external set).
    paths = sorted(Path(get_testdata_file("MR_small.dcm")).parent.glob("*.dcm"))
    compared = 0
    for _ in range(2):
        for path in paths:
            try:
                ds = dcmread(path, defer_size=4096)
                values = _header(ds)
                truth = dcmread(path, stop_before_pixels=True)
            except Exception:  # noqa: BLE001 - files pydicom itself cannot read are not this test's subject
                continue
            for keyword, value in values.items():
                if keyword.endswith("Sequence"):
                    continue
                expected = truth[keyword].value if keyword in truth else None
                assert value == expected and type(value) is type(expected), (path, keyword, value, expected)
                compared += value is not None
    assert compared > 200
