"""API keys on the HTTP app (serving/auth.py), in-process over a stub backend (no model, no Ray): 401
without a key and with a wrong one, which is never echoed; 200 with each of two keys; /v1/health and
the page's files open; the key file's errors; the refusal to bind beyond loopback without keys."""

from __future__ import annotations

import logging
import os
from typing import Any

import pytest
from fastapi.testclient import TestClient

from mammo_ray.cli import main
from mammo_ray.constants import DISCLAIMER
from mammo_ray.serving.api import build_api
from mammo_ray.serving.auth import (
    KEYS_ENV,
    ApiKeys,
    AuthConfigError,
    append_key,
    bearer,
    check_bind,
    is_loopback,
    load_keys,
    own_key,
)
from mammo_ray.serving.runtime import ServeSettings


class StubBackend:
    """Answers /v1/model and /v1/health; the upload routes are not called by these tests."""

    async def info(self) -> dict[str, Any]:
        return {"version": "stub", "members": 1}

    async def status(self) -> dict[str, Any]:
        return {"status": "ready", "members": 1}


@pytest.fixture
def key_file(tmp_path):
    path = tmp_path / "keys.txt"
    first, _ = append_key(path)
    second, count = append_key(path)
    assert count == 2 and first != second
    return path, first, second


def _client(key_file=None, **settings) -> TestClient:
    config = ServeSettings(model="stub", api_keys_file=str(key_file) if key_file else None, **settings)
    return TestClient(build_api(StubBackend(), config))  # type: ignore[arg-type]


def test_401_without_a_key_and_with_a_wrong_one_and_200_with_each_key(key_file):
    path, first, second = key_file
    client = _client(path)
    for headers in ({}, {"Authorization": "Bearer wrong-key-that-is-long-enough"}, {"Authorization": first}):
        reply = client.get("/v1/model", headers=headers)
        assert reply.status_code == 401, headers
        body = reply.json()
        assert body["status"] == 401 and body["error"] == "Unauthorized" and body["disclaimer"] == DISCLAIMER
        assert reply.headers["www-authenticate"].startswith("Bearer")
        assert "wrong-key" not in reply.text and first not in reply.text  # a key is never echoed
    assert "no Authorization: Bearer header" in client.get("/v1/model").json()["reason"]
    for key in (first, second):  # two keys at once: one can be rotated out while the other works
        reply = client.get("/v1/model", headers={"Authorization": f"Bearer {key}"})
        assert reply.status_code == 200 and reply.json()["version"] == "stub"
    upload = client.post("/v1/predict", files={"file": ("x.dcm", b"x")})
    assert upload.status_code == 401  # before the upload is read
    assert client.get("/v1/nothing").status_code == 401  # an unknown route tells nothing without a key


def test_health_and_the_page_stay_open_and_openapi_says_which_routes_need_a_key(key_file):
    client = _client(key_file[0])
    assert client.get("/v1/health").status_code == 200
    page = client.get("/")
    assert page.status_code == 200 and DISCLAIMER in page.text and 'id="key-form"' in page.text
    assert client.get("/page/page.js").status_code == 200
    spec = client.get("/openapi.json").json()
    assert spec["components"]["securitySchemes"]["bearer"] == {"type": "http", "scheme": "bearer"}
    assert spec["paths"]["/v1/predict"]["post"]["security"] == [{"bearer": []}]
    assert "security" not in spec["paths"]["/v1/health"]["get"]
    assert "securitySchemes" not in _client().get("/openapi.json").json()["components"]  # no keys: none


def test_the_environment_names_the_key_file_when_the_settings_do_not(key_file, monkeypatch):
    path, first, _ = key_file
    monkeypatch.setenv(KEYS_ENV, str(path))
    client = _client()
    assert client.get("/v1/model").status_code == 401
    assert client.get("/v1/model", headers={"Authorization": f"Bearer {first}"}).status_code == 200
    assert own_key(None) == first
    monkeypatch.delenv(KEYS_ENV)
    assert load_keys(None) is None and _client().get("/v1/model").status_code == 200


def test_keys_are_kept_hashed_and_the_file_is_checked(tmp_path, key_file):
    path, first, second = key_file
    keys = ApiKeys.from_file(path)
    assert len(keys) == 2 and all(len(d) == 32 for d in keys.digests)
    assert first.encode() not in b"".join(keys.digests)
    assert keys.accepts(first) and keys.accepts(second)
    assert not keys.accepts(first[:-1]) and not keys.accepts("") and not keys.accepts(None)
    assert oct(os.stat(path).st_mode & 0o777) == "0o600"
    commented = tmp_path / "commented.txt"
    commented.write_text(f"# rotated in on Monday\n\n  {first}  \n")
    assert ApiKeys.from_file(commented).accepts(first)
    for text, message in (("", "holds no key"), ("short\n", "line 1: a key of 5 characters is too short"),
                          ("# only\nabcdefgh ijklmnopqrst\n", "line 2: a key holds whitespace")):  # fmt: skip
        bad = tmp_path / "bad.txt"
        bad.write_text(text)
        with pytest.raises(AuthConfigError, match=message) as error:
            ApiKeys.from_file(bad)
        assert str(bad) in str(error.value) and "ijklmnop" not in str(error.value)
    with pytest.raises(AuthConfigError, match="cannot be read"):
        ApiKeys.from_file(tmp_path / "missing.txt")


def test_bearer_header_parsing():
    assert bearer("Bearer abc") == "abc" and bearer("bearer   abc ") == "abc"
    assert bearer("Basic abc") is None and bearer("Bearer") is None and bearer(None) is None


def test_binding_beyond_loopback_needs_keys_or_an_explicit_insecure_flag(key_file, caplog):
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("10.0.0.5") and not is_loopback("example.org")
    check_bind("127.0.0.1", None, False)
    check_bind("0.0.0.0", ApiKeys.from_file(key_file[0]), False)
    with pytest.raises(AuthConfigError, match="refusing to serve on 0.0.0.0 without API keys") as error:
        check_bind("0.0.0.0", None, False)
    assert "mammo-ray api-key --append" in str(error.value) and "--api-keys" in str(error.value)
    with caplog.at_level(logging.WARNING, logger="mammo_ray.serving.auth"):
        check_bind("0.0.0.0", None, True)
    assert "WITHOUT authentication" in caplog.text


def test_serve_refuses_a_public_address_without_keys_before_starting_anything(tmp_path, capsys):
    code = main(["serve", "--model", str(tmp_path / "none.pt"), "--host", "0.0.0.0", "--workdir", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 1 and "refusing to serve on 0.0.0.0 without API keys" in err and "--api-keys" in err
    bad = tmp_path / "keys.txt"
    bad.write_text("tooshort\n")
    code = main(["serve", "--model", "x", "--api-keys", str(bad), "--workdir", str(tmp_path)])
    assert code == 1 and "line 1: a key of 8 characters is too short" in capsys.readouterr().err


def test_the_serve_ingress_refuses_to_build_beyond_loopback_without_keys(key_file, monkeypatch):
    """Under `serve run` / `serve deploy` the Ingress replica checks the proxies' bind address (asked of
    Serve's controller; where it cannot be asked, 0.0.0.0 is assumed) before it builds the app."""
    from mammo_ray.serving import app as serve_app

    build = serve_app.asgi_builder(ServeSettings(model="stub").model_dump(mode="json"))
    with pytest.raises(AuthConfigError, match="refusing to serve on 0.0.0.0 without API keys"):
        build()  # no controller here: the widest bind is assumed
    monkeypatch.setattr(serve_app, "_http_host", lambda: "127.0.0.1")
    monkeypatch.setattr(serve_app.serve, "get_replica_context", lambda: (_ for _ in ()).throw(LookupError("past")))
    with pytest.raises(LookupError, match="past"):  # loopback: past the check, to the replica's context
        build()
    monkeypatch.setattr(serve_app, "_http_host", lambda: "0.0.0.0")
    monkeypatch.setenv(KEYS_ENV, str(key_file[0]))
    with pytest.raises(LookupError, match="past"):  # keys from the environment: past the check
        build()
