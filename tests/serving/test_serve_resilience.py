"""Serve when things go wrong, as an operator meets it: the model replica SIGKILLed while clients post
(every answer is a 200 or a 503 that says to retry, never a 500), with two deployments and with one behind
HAProxy, and `mammo-ray serve` stopped with
SIGTERM (it exits and leaves no process of its own Ray behind)."""

from __future__ import annotations

import http.client
import json
import os
import signal
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from contextlib import suppress
from pathlib import Path

import pandas as pd
import psutil
import pytest
from http_forms import SMALL, multipart
from ray import serve
from ray_head import reserved_port
from subprocesses import MAMMO_RAY, REPO, own_ray_environment, processes_with

from mammo_ray.cli.serve import start_app
from mammo_ray.constants import DISCLAIMER
from mammo_ray.serving.runtime import ServeSettings

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.timeout(300)]

CLIENTS = 8
STOP_WITHIN_S = 45  # SIGTERM to exit, leftovers ended: mammo-ray serve gives Serve 10 s, then ends its Ray


@pytest.fixture(scope="module")
def served(local_ray, lesion_model, tmp_path_factory):
    """The lesion classifier served under "/" on the session's Ray, one model replica; its URL."""
    settings = ServeSettings(model=str(lesion_model[0]), workdir=str(tmp_path_factory.mktemp("resilience")), **SMALL)
    with reserved_port() as port:  # held until Serve's proxy binds it (SO_REUSEPORT, Serve's default)
        url = start_app(settings.model_dump(), "127.0.0.1", port)
    yield url
    serve.shutdown()  # Ray itself stays up for the next module that uses it


def post(url: str, body: bytes, content_type: str) -> tuple[int | str, str | None, dict]:
    """(status, Retry-After header, JSON body) of one POST; a connection closed without an answer is its
    exception's name in place of a status."""
    request = urllib.request.Request(url, data=body, headers={"Content-Type": content_type}, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=120) as reply:
            return reply.status, reply.headers.get("Retry-After"), json.loads(reply.read())
    except urllib.error.HTTPError as exc:
        text = exc.read()
        try:
            return exc.code, exc.headers.get("Retry-After"), json.loads(text)
        except ValueError:
            return exc.code, exc.headers.get("Retry-After"), {"raw": text.decode(errors="replace")}
    except (ConnectionError, http.client.RemoteDisconnected) as exc:
        return type(exc).__name__, None, {}


def replica_pid(url: str) -> int:
    with urllib.request.urlopen(f"{url}/v1/model", timeout=30) as reply:
        return int(json.loads(reply.read())["replica"]["pid"])


def test_a_replica_killed_under_load_answers_503_with_retry_after_never_500(served, lesion_model, record_property):
    """Two deployments (the default): the ingress outlives the model replica and says so."""
    image = pd.read_parquet(lesion_model[1].manifest)["image_path"].iloc[0]
    kill_under_load(served, multipart({"file": ("scan.dcm", Path(image).read_bytes())}), record_property)


def test_behind_haproxy_one_deployment_answers_its_killed_replicas_requests_with_503(
    lesion_model, tmp_path, record_property
):
    """`mammo-ray serve --haproxy`: the app and the members in one deployment (combined topology), so nothing of
    the app outlives the replica: HAProxy answers for it, with the 503 page of serving/haproxy.py."""
    image = pd.read_parquet(lesion_model[1].manifest)["image_path"].iloc[0]
    out, err = tmp_path / "stdout", tmp_path / "stderr"
    with own_ray_environment() as (env, _):
        with reserved_port() as port:  # held until HAProxy has bound it (SO_REUSEPORT)
            args = [MAMMO_RAY, "serve", "--model", str(lesion_model[0]), "--workdir", str(tmp_path / "work")]
            args += ["--port", str(port), "--haproxy", "--set", "num_cpus=0.5", "--set", "execution=loop"]
            with out.open("w") as stdout, err.open("w") as stderr:
                server = subprocess.Popen(args, cwd=REPO, env=env, stdout=stdout, stderr=stderr)
            while "serving " not in out.read_text():  # printed once /v1/health answered 200
                assert server.poll() is None, f"mammo-ray serve exited {server.returncode}: {err.read_text()[-4000:]}"
                time.sleep(0.5)
        url = f"http://127.0.0.1:{port}"
        with urllib.request.urlopen(f"{url}/v1/model", timeout=30) as reply:
            assert json.loads(reply.read())["settings"]["topology"] == "combined"
        kill_under_load(url, multipart({"file": ("scan.dcm", Path(image).read_bytes())}), record_property)
        server.send_signal(signal.SIGTERM)
        assert server.wait(timeout=STOP_WITHIN_S) == 0, err.read_text()[-4000:]


def kill_under_load(url: str, upload: tuple[bytes, str], record_property) -> None:
    """SIGKILL the model replica while ``CLIENTS`` clients post ``upload``; every answer must be a 200 or a 503
    with Retry-After and a reason (the clients retry after it), and the app must answer 200s again after."""
    body, content_type = upload
    answers: list[tuple[int, str | None, dict]] = []
    stop = threading.Event()

    def client() -> None:
        while not stop.is_set():
            answers.append(post(f"{url}/v1/predict", body, content_type))
            if answers[-1][0] == 503:  # a client that does as told: retry after Retry-After
                stop.wait(float(answers[-1][1] or 1))

    victim = replica_pid(url)
    threads = [threading.Thread(target=client, daemon=True) for _ in range(CLIENTS)]
    for thread in threads:
        thread.start()
    while len(answers) < 2 * CLIENTS:  # under load: every client has had answers
        time.sleep(0.1)
    os.kill(victim, signal.SIGKILL)
    at_kill = len(answers)
    # Serve starts a new replica; the clients keep posting until they are answered by it.
    while True:
        try:
            if replica_pid(url) != victim:
                break
        except (urllib.error.URLError, TimeoutError, ConnectionError):
            pass  # no replica to answer yet: a 503 (an HTTPError), or no answer in time
        time.sleep(0.5)
    recovered = len(answers)
    while len(answers) < recovered + 2 * CLIENTS:
        time.sleep(0.1)
    stop.set()
    for thread in threads:
        thread.join(timeout=150)
    counts = Counter(status for status, _, _ in answers)
    record_property("status_counts", dict(counts))
    print(f"status codes: {dict(counts)}, {at_kill} answered before the kill, {recovered} before the new replica")
    assert set(counts) <= {200, 503}, counts  # never a 500, never a closed connection
    for status, retry_after, reply in answers:
        if status == 503:
            assert retry_after and retry_after.isdigit(), reply
            assert reply["disclaimer"] == DISCLAIMER and reply["status"] == 503, reply
            assert "retry" in reply["reason"], reply
    assert [status for status, _, _ in answers[recovered:]].count(200) >= CLIENTS, counts  # recovered
    assert post(f"{url}/v1/predict", body, content_type)[0] == 200


def _own_processes(marker: str) -> list[str]:
    """'pid name' of each process (not this one) whose environment carries ``marker``."""
    found = []
    for pid in processes_with(marker):
        with suppress(psutil.NoSuchProcess):
            found.append(f"{pid} {psutil.Process(pid).name()}")
    return found


@pytest.mark.parametrize("target", ["process", "group"])
def test_sigterm_stops_serve_and_leaves_no_process_of_its_ray(target, lesion_model, tmp_path, record_property):
    """SIGTERM to the command (``kill PID``), or to its whole process group (``timeout``, ``kill -TERM -PGID``:
    the raylet and the replicas get it too, and the replicas used to outlive the raylet)."""
    out, err = tmp_path / "stdout", tmp_path / "stderr"
    with own_ray_environment() as (env, marker):
        with reserved_port() as port:  # held until Serve's proxy has bound it (SO_REUSEPORT)
            args = [MAMMO_RAY, "serve", "--model", str(lesion_model[0]), "--workdir", str(tmp_path / "work")]
            args += ["--port", str(port), "--set", "num_cpus=0.5", "--set", "execution=loop"]
            with out.open("w") as stdout, err.open("w") as stderr:
                server = subprocess.Popen(args, cwd=REPO, env=env, stdout=stdout, stderr=stderr, start_new_session=True)
            while "serving " not in out.read_text():  # printed once /v1/health answered 200
                assert server.poll() is None, f"mammo-ray serve exited {server.returncode}: {err.read_text()[-4000:]}"
                time.sleep(0.5)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/health", timeout=60) as reply:
            assert reply.status == 200
        before = _own_processes(marker)
        descendants = psutil.Process(server.pid).children(recursive=True)
        if target == "group":
            os.killpg(server.pid, signal.SIGTERM)
        else:
            server.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + STOP_WITHIN_S  # a bound for a hang, not a performance figure
        while (server.poll() is None or _own_processes(marker)) and time.monotonic() < deadline:
            time.sleep(0.5)
        after = _own_processes(marker)
        record_property("processes", {"before": len(before), "descendants": len(descendants), "after": len(after)})
        print(f"SIGTERM to the {target}: {len(before)} processes ({len(descendants)} descendants), after: {after}")
    assert server.poll() == 0, err.read_text()[-4000:]
    assert "stopped serving" in out.read_text()
    assert len(before) > 5 and after == [], (before, after)  # its GCS, raylet, Serve's actors and all they started
