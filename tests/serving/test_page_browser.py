"""The page at / in a real browser: headless Chromium (Debian's ``chromium`` and ``chromium-driver``,
which ``.ci/run`` installs) driven by Selenium against the API served by uvicorn on 127.0.0.1.

It uploads a synthetic DICOM pair, drags an ROI on the CC image, waits for the answer, and checks the
probability the page shows against /v1/predict for the same files and ROI, that the heatmap overlay is
not blank (and goes when toggled off), that the members' strip is drawn, and that a garbage file shows
the server's 4xx reason while the page stays usable. A screenshot is kept in ``test-artifacts/``
(``$MAMMO_RAY_TEST_ARTIFACTS`` elsewhere). Without a browser the tests skip with the reason, except
under CI=true, where tests/conftest.py turns the skip into a failure.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
import uvicorn

from mammo_ray.constants import DISCLAIMER
from mammo_ray.serving.api import RuntimeBackend, build_api
from mammo_ray.serving.auth import append_key
from mammo_ray.serving.runtime import ServeSettings

pytestmark = [pytest.mark.slow, pytest.mark.browser]

ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = Path(os.environ.get("MAMMO_RAY_TEST_ARTIFACTS", ROOT / "test-artifacts"))
# Chromium as root in a closed network: no sandbox (root), and none of its calls home, which this
# machine's network refuses (the flags of /work/.library/env: background networking, components, sync).
CHROMIUM_FLAGS = (
    "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic",
    "--no-first-run", "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--window-size=1400,1800",
)  # fmt: skip


def _browser() -> tuple[str, str]:
    """(browser, driver) paths, or skip saying what is missing and how to install it."""
    browser = next(filter(None, map(shutil.which, ("chromium", "chromium-browser", "google-chrome"))), None)
    driver = shutil.which("chromedriver")
    if not (browser and driver):
        missing = ", ".join(n for n, p in (("chromium", browser), ("chromedriver", driver)) if not p)
        pytest.skip(f"no {missing} on PATH (Debian: apt-get install chromium chromium-driver; .ci/run does)")
    return browser, driver


@contextlib.contextmanager
def _uvicorn(app) -> Iterator[str]:
    """``app`` served by uvicorn in a thread on a free port of 127.0.0.1: its base URL."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "uvicorn did not start"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


@pytest.fixture(scope="module")
def backend(lesion_model, tmp_path_factory):
    """The lesion classifier, loaded in this process."""
    settings = ServeSettings(model=str(lesion_model[0]), workdir=str(tmp_path_factory.mktemp("page")), execution="loop")
    loaded = RuntimeBackend(settings)
    asyncio.run(loaded.load())
    return loaded


@pytest.fixture(scope="module")
def server(backend):
    """The app over the lesion classifier, without keys: its base URL."""
    with _uvicorn(build_api(backend, backend.settings)) as url:
        yield url


@pytest.fixture(scope="module")
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    path, driver = _browser()
    options = webdriver.ChromeOptions()
    options.binary_location = path
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    chrome = webdriver.Chrome(service=Service(driver), options=options)  # a given driver: no download
    yield chrome
    chrome.quit()


@pytest.fixture(scope="module")
def pair(lesions):
    """(CC row, MLO row) of one exam of the test split."""
    exam = lesions.groupby("exam_key").filter(lambda g: set(g["view"]) == {"CC", "MLO"})
    return tuple(exam[exam["view"] == v].iloc[0] for v in ("CC", "MLO"))


def _wait(browser, condition, what: str, timeout: float = 120):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(browser, timeout, poll_frequency=0.1).until(lambda b: condition(b), message=what)


def _text(browser, element_id: str) -> str:
    return browser.find_element("id", element_id).text


def _opaque_pixels(browser, canvas_id: str) -> int:
    return browser.execute_script(
        "const c = document.getElementById(arguments[0]);"
        "if (!c.width || !c.height) return 0;"
        "const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;"
        "let n = 0; for (let i = 3; i < d.length; i += 4) if (d[i] > 0) n++; return n;",
        canvas_id,
    )


def _choose(browser, view: str, path: str | Path) -> None:
    browser.find_element("id", f"{view}-file").send_keys(str(path))


def _previewed(browser, view: str) -> bool:
    return browser.execute_script(f"return document.getElementById('{view}-image').width > 0")


def test_the_page_answers_a_dicom_pair_as_the_api_does(server, browser, pair, tmp_path):
    from selenium.webdriver.common.action_chains import ActionChains

    cc, mlo = pair
    browser.get(server + "/")
    assert DISCLAIMER in browser.find_element("tag name", "footer").text
    assert browser.find_element("tag name", "footer").is_displayed()  # always on screen
    _wait(browser, lambda b: b.find_element("id", "model-line").is_displayed(), "the model line")
    assert _text(browser, "model-members") == "1" and "heatmaps by" in _text(browser, "model-localize")

    _choose(browser, "cc", cc.image_path)
    _choose(browser, "mlo", mlo.image_path)
    _wait(browser, lambda b: _previewed(b, "cc") and _previewed(b, "mlo"), "both previews")
    _wait(browser, lambda b: b.find_element("id", "analyse").is_enabled(), "the Analyse button")

    # Drag an ROI over the middle of the CC image: the page turns it into original pixels.
    marks = browser.find_element("id", "cc-marks")
    w, h = marks.size["width"], marks.size["height"]
    ActionChains(browser).move_to_element_with_offset(marks, -w // 4, -h // 4).click_and_hold().move_by_offset(
        w // 2, h // 2
    ).release().perform()
    roi = [int(v) for v in _text(browser, "cc-roi").split(",")]
    height, width = (int(n) for n in browser.execute_script("return state.views.cc.preview.image_size"))
    assert 0 <= roi[0] < roi[2] <= width and 0 <= roi[1] < roi[3] <= height  # original pixels, in the image

    browser.find_element("id", "analyse").click()
    _wait(browser, lambda b: b.find_element("id", "status").get_attribute("data-state") in ("done", "error"), "result")
    assert browser.find_element("id", "status").get_attribute("data-state") == "done", _text(browser, "error")

    files = {
        "cc": ("cc.dcm", Path(cc.image_path).read_bytes()),
        "mlo": ("mlo.dcm", Path(mlo.image_path).read_bytes()),
    }
    api = requests.post(f"{server}/v1/predict", files=files, data={"cc_box": ",".join(map(str, roi))}, timeout=60)
    assert api.status_code == 200, api.text
    shown = float(browser.find_element("id", "probability").get_attribute("data-value"))
    assert shown == pytest.approx(api.json()["probability"], abs=1e-9)
    assert _text(browser, "probability") == f"{api.json()['probability']:.4f}"
    assert _text(browser, "label") == api.json()["label"]
    assert _text(browser, "members-count") == "1"

    overlay = _opaque_pixels(browser, "cc-overlay")
    assert overlay > 0, "the heatmap overlay is blank"
    assert _opaque_pixels(browser, "members-strip") > 0
    assert _opaque_pixels(browser, "cc-marks") > 0  # the ROI (and any boxes) drawn over the image
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    shot = ARTIFACTS / "page.png"
    assert browser.save_screenshot(str(shot)) and shot.stat().st_size > 10_000
    print(f"screenshot: {shot}")

    browser.find_element("id", "overlay-toggle").click()  # off: the overlay goes, the image stays
    assert _opaque_pixels(browser, "cc-overlay") == 0 and _opaque_pixels(browser, "cc-image") > 0
    browser.find_element("id", "overlay-toggle").click()
    assert _opaque_pixels(browser, "cc-overlay") == overlay


def test_a_garbage_file_shows_the_servers_reason_and_the_page_stays_usable(server, browser, pair, tmp_path):
    cc, mlo = pair
    garbage = tmp_path / "garbage.dcm"
    garbage.write_bytes(os.urandom(4096))
    browser.get(server + "/")
    _choose(browser, "cc", garbage)
    error = _wait(browser, lambda b: b.find_element("id", "error").is_displayed(), "the error message")
    assert error
    message = _text(browser, "error")
    api = requests.post(f"{server}/v1/preview", files={"file": ("garbage.dcm", garbage.read_bytes())}, timeout=60)
    assert api.status_code == 400 and message.startswith("CC garbage.dcm: 400 ")
    assert api.json()["reason"] in message and "(field file)" in message
    assert not browser.find_element("id", "analyse").is_enabled()
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    browser.save_screenshot(str(ARTIFACTS / "page-error.png"))

    _choose(browser, "cc", cc.image_path)  # the same page, a good file: it works again
    _wait(browser, lambda b: _previewed(b, "cc"), "the CC preview")
    assert not browser.find_element("id", "error").is_displayed()
    browser.find_element("id", "analyse").click()
    _wait(browser, lambda b: b.find_element("id", "status").get_attribute("data-state") == "done", "result")
    api = requests.post(
        f"{server}/v1/predict", files={"file": ("cc.dcm", Path(cc.image_path).read_bytes())}, timeout=60
    )
    assert float(browser.find_element("id", "probability").get_attribute("data-value")) == pytest.approx(
        api.json()["probability"], abs=1e-9
    )


def test_with_api_keys_the_page_asks_for_one_and_sends_it(backend, browser, pair, tmp_path):
    cc, _ = pair
    key, _ = append_key(tmp_path / "keys.txt")
    settings = backend.settings.model_copy(update={"api_keys_file": str(tmp_path / "keys.txt")})
    with _uvicorn(build_api(backend, settings)) as url:
        browser.get(url + "/")  # a new origin (another port): an empty sessionStorage
        _wait(browser, lambda b: b.find_element("id", "key-form").is_displayed(), "the key form")
        assert "Authorization: Bearer" in _text(browser, "key-reason")
        assert not browser.find_element("id", "model-line").is_displayed()
        browser.find_element("id", "key-input").send_keys(key)
        browser.find_element("id", "key-save").click()
        _wait(browser, lambda b: b.find_element("id", "model-line").is_displayed(), "the model line")
        assert not browser.find_element("id", "key-form").is_displayed()
        assert browser.execute_script("return sessionStorage.getItem('mammo-ray-api-key')") == key
        _choose(browser, "cc", cc.image_path)  # every call sends it: preview, predict, localize
        _wait(browser, lambda b: _previewed(b, "cc"), "the CC preview")
        browser.find_element("id", "analyse").click()
        _wait(browser, lambda b: b.find_element("id", "status").get_attribute("data-state") == "done", "result")
        assert _opaque_pixels(browser, "cc-overlay") > 0
