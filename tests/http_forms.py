"""HTTP by hand for the tests of the served app over real sockets: a multipart body and a POST that
answers (status, JSON), a reader of the Server-Timing header, and the small Serve settings those tests run with."""

from __future__ import annotations

import io
import json
import urllib.error
import urllib.request
import uuid

# A Serve app that fits beside the rest of a 2-CPU test machine, with back-pressure that shows quickly.
SMALL = {"num_cpus": 0.5, "max_batch_size": 4, "max_ongoing_requests": 4, "max_queued_requests": 8, "execution": "loop"}


def multipart(fields: dict[str, tuple[str, bytes] | str]) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    out = io.BytesIO()
    for name, value in fields.items():
        out.write(f"--{boundary}\r\n".encode())
        if isinstance(value, tuple):
            out.write(
                f'Content-Disposition: form-data; name="{name}"; filename="{value[0]}"\r\n'
                "Content-Type: application/octet-stream\r\n\r\n".encode()
            )
            out.write(value[1])
        else:
            out.write(f'Content-Disposition: form-data; name="{name}"\r\n\r\n{value}'.encode())
        out.write(b"\r\n")
    out.write(f"--{boundary}--\r\n".encode())
    return out.getvalue(), f"multipart/form-data; boundary={boundary}"


def post(url: str, fields: dict, headers: dict[str, str] | None = None) -> tuple[int, dict]:
    """(status, JSON) of a multipart POST; ``headers``, when given, gets the reply's headers (lower-case names)."""
    body, content_type = multipart(fields)
    request = urllib.request.Request(url, data=body, headers={"Content-Type": content_type}, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=120) as reply:
            if headers is not None:
                headers.update({k.lower(): v for k, v in reply.headers.items()})
            return reply.status, json.loads(reply.read())
    except urllib.error.HTTPError as exc:
        text = exc.read()
        try:
            return exc.code, json.loads(text)
        except ValueError:
            return exc.code, {"raw": text.decode(errors="replace")}


def server_timing(header: str) -> dict[str, float | str]:
    """``{"ingress": ms, ..., "batch": "3 requests"}`` from a ``Server-Timing`` header."""
    stages: dict[str, float | str] = {}
    for entry in header.split(","):
        name, _, params = entry.strip().partition(";")
        key, _, value = params.partition("=")
        stages[name] = float(value) if key == "dur" else value.strip('"')
    return stages
