"""The HTTP contract: schemathesis runs every check (``schemathesis run --checks all``) against the
served app in-process, over an untrained levynet (no training, no Ray). It fails on a 5xx, a status
the OpenAPI schema does not document, a body that does not match its schema (every error is an
``ErrorReply`` with the disclaimer), a schema-invalid request accepted, or a schema-valid one refused
for anything but what no schema can say (``CONTENT_REFUSALS``).

From outside, against ``mammo-ray serve``: ``schemathesis run http://HOST/openapi.json --checks all``
with ``CONFIG`` as its schemathesis.toml; it lacks this file's two checks, and reports as accepted a few
requests that are invalid only before multipart turns them into text (``_as_sent``).
"""

from __future__ import annotations

import asyncio
import json
import re

import jsonschema_rs
import pytest
import schemathesis
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from schemathesis.specs.openapi.checks import negative_data_rejection
from setups import TINY_TRAIN

from mammo_ray.config import load_config
from mammo_ray.data.transforms import TransformSpec
from mammo_ray.models.views import build_view_model
from mammo_ray.serving.api import RuntimeBackend, build_api
from mammo_ray.serving.replies import ErrorReply
from mammo_ray.serving.runtime import ServeSettings
from mammo_ray.serving.uploads import (
    THRESHOLD_PATTERN,
    UploadError,
    coordinates_pattern,
    parse_box,
    parse_point,
    parse_threshold,
)
from mammo_ray.train.checkpoint import checkpoint_payload, save_checkpoint

IMAGES = ("file", "cc", "mlo")
ROIS = ("box", "seed", "cc_box", "cc_seed", "mlo_box", "mlo_seed")
ERROR_REPLY = jsonschema_rs.Draft202012Validator(ErrorReply.model_json_schema(mode="serialization"))

# What a schema-valid request may still be refused for, as (status, field): what no schema can say.
CONTENT_REFUSALS = {
    *((status, image) for status in (400, 413, 415) for image in IMAGES),  # no image, too large, no decoder
    *((422, roi) for roi in ROIS),  # a ROI outside the image, or empty
    (422, "method"),  # a localization method this model cannot do
}

# schemathesis' positive_data_acceptance wants 2xx for every schema-valid request; these statuses are
# let through it, and `refused_only_for_content` below holds them to CONTENT_REFUSALS.
CONFIG = schemathesis.Config.from_dict(
    {
        "checks": {
            "enabled": True,  # every check, as --checks all
            "positive_data_acceptance": {
                "expected-statuses": ["2xx", "3xx", "400", "401", "403", "404", "409", "413", "415", "422", "429"]
            },
        }
    }
)


def _load_schema() -> schemathesis.BaseSchema:
    """The app's /openapi.json, which does not depend on the model: an app whose model is never loaded
    gives it at collection. (schemathesis.pytest.from_fixture fails under pytest 9: no `_nodeid`.)"""
    settings = ServeSettings(model="never loaded")
    return schemathesis.openapi.from_asgi("/openapi.json", build_api(RuntimeBackend(settings), settings), config=CONFIG)


schema = _load_schema()
FORMS = {  # route -> a validator of its form, as the served schema gives it
    path: jsonschema_rs.Draft202012Validator({"components": schema.raw_schema["components"], **body["schema"]})
    for path, item in schema.raw_schema["paths"].items()
    for body in [item.get("post", {}).get("requestBody", {}).get("content", {}).get("multipart/form-data")]
    if body
}


@pytest.fixture(scope="module")
def served_app(tmp_path_factory):
    """The app over an untrained levynet lesion classifier on 32-px crops, loaded in this process."""
    tmp = tmp_path_factory.mktemp("contract")
    config = load_config(None, TINY_TRAIN)
    torch.manual_seed(0)
    model = build_view_model(config.model).eval()
    spec = TransformSpec.from_config(config.data, train_mean=1000.0, train_std=300.0)
    checkpoint = save_checkpoint(checkpoint_payload(model=model, config=config, spec=spec, epoch=0), tmp / "ckpt")
    serve = ServeSettings(model=str(checkpoint), workdir=str(tmp), execution="loop")
    backend = RuntimeBackend(serve)
    asyncio.run(backend.load())
    return build_api(backend, serve)


def _is_file(value: object) -> bool:
    """Whether schemathesis sends a value as a file part: bytes, or its Binary (a str subclass)."""
    return isinstance(value, bytes) or (isinstance(value, str) and type(value) is not str)


def _as_sent(value: object) -> object:
    """A form value as multipart sends it: text, a list as one part per item (a one-item list is that
    item), the integer 1 as "1"; a file's bytes stand in as "" for the validator."""
    if isinstance(value, list):
        return [_as_sent(item) for item in value] if len(value) != 1 else _as_sent(value[0])
    if _is_file(value):
        return ""
    return value if isinstance(value, str) else json.dumps(value)


def _admitted(case: schemathesis.Case, *, as_sent: bool) -> bool:
    """Whether the served schema admits the case's form: as schemathesis drew it, or as it goes over the
    wire, where a value drawn schema-invalid may arrive valid (see ``_as_sent``; an empty list is no
    field at all). Checked, not trusted: the coverage phase labels some invalid forms valid."""
    validator = FORMS.get(case.operation.path)
    headers = {name.lower(): value for name, value in (case.headers or {}).items()}
    if validator is None or case.method != case.operation.method.upper() or not isinstance(case.body, dict):
        return False
    if not headers.get("content-type", case.media_type or "").startswith("multipart/form-data"):
        return False
    if as_sent:
        form = {name: _as_sent(value) for name, value in case.body.items() if value != []}
    else:
        form = {name: "" if _is_file(value) else value for name, value in case.body.items()}
    return validator.is_valid(form)


def refused_only_for_content(ctx, response, case) -> None:
    """A request the schema admits gets its 4xx only for what no schema can say (CONTENT_REFUSALS)."""
    positive = case.meta is not None and case.meta.generation.mode.is_positive
    if not positive or not 400 <= response.status_code < 500 or not _admitted(case, as_sent=False):
        return
    field = response.json().get("field")
    if (response.status_code, field) == (422, "file") and (case.query or {}).get("format") == "dicom":
        # ?format=dicom of an image that is no DICOM: its bytes' format, which no schema can say
        assert response.json()["reason"].startswith("DICOM output needs a DICOM input"), response.text
        return
    assert (response.status_code, field) in CONTENT_REFUSALS, (
        f"a request the schema admits was refused: {response.status_code} {response.text}"
    )


def every_error_is_an_error_reply(ctx, response, case) -> None:
    """Every 4xx and 5xx body is an ErrorReply with the disclaimer, the framework's own (405 for a method
    the route lacks, 400 for a body that does not parse, ...) included; /v1/health's 503 is a HealthReply."""
    if response.status_code < 400 or case.operation.path == "/v1/health":
        return
    body = response.json()
    assert ERROR_REPLY.is_valid(body) and body["status"] == response.status_code, (
        f"{case.method} {case.path} answered {response.status_code} without an ErrorReply: {response.text}"
    )


@pytest.mark.slow  # loads a model and sends ~270 requests: 15-40 s on 2 cores
@schema.parametrize()
@settings(max_examples=100, deadline=None)  # fuzzed examples per route; the conftest profile derandomizes
def test_the_served_app_keeps_its_openapi_contract(case, served_app):
    negative_on_the_wire = not _admitted(case, as_sent=True)
    excluded = [] if negative_on_the_wire else [negative_data_rejection]
    checks = [every_error_is_an_error_reply, refused_only_for_content]
    case.call_and_validate(app=served_app, additional_checks=checks, excluded_checks=excluded)


# --- the form patterns are the parsers --------------------------------------------------------------


@pytest.mark.parametrize(("count", "parse"), [(4, parse_box), (2, parse_point)])
@given(data=st.data())
def test_the_roi_patterns_admit_what_the_parsers_accept(count, parse, data):
    pattern = coordinates_pattern(count)
    admitted = data.draw(st.from_regex(pattern), label="admitted")
    try:
        parse(admitted)
    except UploadError as exc:  # a pattern cannot say x1 > x0, nor the length once stripped
        assert "is empty" in exc.reason or len(admitted.strip()) > 256, exc.reason
    text = data.draw(st.text(alphabet=" ,.+-[]0123456789\t", max_size=24), label="text")
    try:
        parse(text)
    except UploadError as exc:
        assert not re.search(pattern, text) or "is empty" in exc.reason, exc.reason
    else:
        assert re.search(pattern, text), f"{text!r} parses but the pattern refuses it"


@given(text=st.one_of(st.from_regex(THRESHOLD_PATTERN), st.text(alphabet=" .+-e0123456789", max_size=8)))
def test_the_threshold_pattern_is_its_parser(text):
    admitted = re.search(THRESHOLD_PATTERN, text) is not None
    try:
        value = parse_threshold(text)
    except UploadError:
        assert not admitted, text
    else:
        assert admitted, text
        assert value is None or 0 <= value <= 1
