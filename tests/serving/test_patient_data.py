"""Patient data on the serving path: an upload stays in memory (no byte of it on disk, Starlette's
spool included), and neither the logs nor the replies carry its DICOM identifiers (patient name, ID,
birth date, study date, accession number), for a good request or a refused one."""

from __future__ import annotations

import asyncio
import io
import logging
import tempfile
import zipfile
from pathlib import Path

import pydicom
import pytest
from fastapi.testclient import TestClient
from pydicom.tag import Tag
from starlette.formparsers import MultiPartParser

from mammo_ray.serving.api import RuntimeBackend, build_api
from mammo_ray.serving.runtime import ServeSettings

pytestmark = pytest.mark.slow  # the fixtures train a model

IDENTIFIERS = {
    "PatientName": "Doe^Jane^Q",
    "PatientID": "MRN-77123456",
    "PatientBirthDate": "19610203",
    "StudyDate": "20190405",
    "AccessionNumber": "ACC-556677",
}
PADDING = 3 * 2**20  # a private element: the upload is a realistic 3 MB, beyond Starlette's 1 MB spool


def _identified(path: str, *, truncate: bool = False) -> bytes:
    """The DICOM at ``path`` with IDENTIFIERS in its header and 3 MB of private data (or its pixels cut)."""
    ds = pydicom.dcmread(path)
    for name, value in IDENTIFIERS.items():
        setattr(ds, name, value)
    ds.add_new(Tag(0x0011, 0x0010), "LO", "MAMMO-RAY TEST")
    ds.add_new(Tag(0x0011, 0x1010), "OB", b"\0" * PADDING)
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    data = out.getvalue()
    return data[: len(data) - 5000] if truncate else data


@pytest.fixture(scope="module")
def client(lesion_model, tmp_path_factory):
    settings = ServeSettings(model=str(lesion_model[0]), workdir=str(tmp_path_factory.mktemp("phi")), execution="loop")
    backend = RuntimeBackend(settings)
    asyncio.run(backend.load())
    return TestClient(build_api(backend, settings))


def _requests(client, data: bytes, bad: bytes) -> list:
    return [
        client.post("/v1/predict", files={"file": ("scan.dcm", data)}),
        client.post("/v1/localize", files={"file": ("scan.dcm", data)}, data={"heatmap": "both"}),
        client.post("/v1/localize?format=dicom", files={"file": ("scan.dcm", data)}),
        client.post("/v1/preview", files={"file": ("scan.dcm", data)}),
        client.post("/v1/predict", files={"file": ("scan.dcm", bad)}),
    ]


def test_no_byte_of_an_upload_reaches_the_disk(client, lesions, tmp_path, monkeypatch):
    data, bad = _identified(lesions.iloc[0].image_path), _identified(lesions.iloc[0].image_path, truncate=True)
    assert len(data) > 2**20  # beyond Starlette's default spool
    rolled: list[int] = []
    rollover = tempfile.SpooledTemporaryFile.rollover

    def spy(self):  # a spooled upload moves to a file on disk here
        rolled.append(self.tell())
        return rollover(self)

    monkeypatch.setattr(tempfile.SpooledTemporaryFile, "rollover", spy)
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    replies = _requests(client, data, bad)
    assert [r.status_code for r in replies] == [200, 200, 200, 200, 400], [r.text[:200] for r in replies]
    assert rolled == [] and list(scratch.iterdir()) == []
    # The check can fail: with Starlette's own 1 MB spool, the same upload goes to a temporary file.
    monkeypatch.setattr(MultiPartParser, "spool_max_size", 2**20)
    assert client.post("/v1/predict", files={"file": ("scan.dcm", data)}).status_code == 200
    assert rolled, "a 3 MB upload did not roll over to disk at 1 MB: the spy sees nothing"


def test_no_dicom_identifier_in_the_logs_or_the_replies(client, lesions, caplog):
    path = lesions.iloc[0].image_path
    data, bad = _identified(path), _identified(path, truncate=True)
    assert all(value.encode() in data for value in IDENTIFIERS.values())  # they are there to leak
    with caplog.at_level(logging.DEBUG):
        replies = _requests(client, data, bad)
        replies.append(client.post("/v1/localize", files={"file": ("scan.dcm", bad)}))
    assert [r.status_code for r in replies] == [200, 200, 200, 200, 400, 400]
    logged = caplog.text + "".join(str(r.args) for r in caplog.records)
    for name, value in IDENTIFIERS.items():
        assert value not in logged, f"{name} in the logs"
        for reply in replies:
            if reply.headers["content-type"] == "application/json":
                assert value not in reply.text, f"{name} in the reply of {reply.request.url}"
    assert "scan.dcm" in replies[-1].json()["reason"]  # the refusal names the file and the reason instead
    assert Path(path).read_bytes() != data  # (the test's copy, not the fixture's file, carries them)


def test_dicom_outputs_reference_the_source_but_copy_no_identifier(client, lesions):
    data = _identified(lesions.iloc[0].image_path)
    source = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True)
    reply = client.post("/v1/localize?format=dicom", files={"file": ("scan.dcm", data)})
    assert reply.status_code == 200
    with zipfile.ZipFile(io.BytesIO(reply.content)) as archive:
        outputs = {name: archive.read(name) for name in archive.namelist() if name.endswith(".dcm")}
    assert sorted(outputs) == ["scan_seg.dcm", "scan_sr.dcm"]
    for name, raw in outputs.items():
        for field, value in IDENTIFIERS.items():
            assert value.encode() not in raw, f"{field} copied into {name}"
        ds = pydicom.dcmread(io.BytesIO(raw))
        # What references the source stays: its study (the SR and SEG file into it) and its image.
        assert ds.StudyInstanceUID == source.StudyInstanceUID
        assert source.SOPInstanceUID.encode() in raw and source.SeriesInstanceUID.encode() in raw
        # The patient and study Type 2 attributes are present and empty ("unknown").
        for field in IDENTIFIERS:
            assert field in ds and not ds[field].value, f"{name}: {field} = {ds[field].value!r}"
