"""The commands a user runs first, end to end at tiny size: `mammo-ray demo` and `mammo-ray serve`.

Each runs as the user runs it, the console script in a subprocess with a Ray of its own: its own
temp dir (``RAY_TMPDIR``) and home (where Ray keeps its token), so it neither joins nor disturbs
another Ray on the machine, and nothing lands in the user's home. Every process it starts carries
that temp dir in its environment, which is how the tests find any it leaves behind.
"""

from __future__ import annotations

import ast
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from http_forms import multipart
from ray_head import reserved_port
from setups import TINY_TRAIN
from subprocesses import MAMMO_RAY, REPO, own_ray_environment, processes_with, wait_for_exit_of_all

from mammo_ray.config import load_config
from mammo_ray.constants import Side, View
from mammo_ray.data.synthetic.dicom_write import SERIES_FULL, DicomInfo, write_mammogram
from mammo_ray.data.transforms import TransformSpec
from mammo_ray.models.views import build_view_model
from mammo_ray.serving.runtime import ModelRuntime, PredictItem, ServeSettings
from mammo_ray.train.checkpoint import checkpoint_payload, save_checkpoint

pytestmark = [pytest.mark.ray, pytest.mark.slow]

DEMO_SHRINK = [  # tune_configs/search_smoke.yaml cut to one levynet trial of one epoch on 32-px crops
    "data.synth_patients=40",
    "data.synth_size=[384, 240]",
    "data.cache_px=40",
    "data.input_px=32",
    "train.epochs=1",
    "train.eval_bootstrap=20",
    "tune.backbones=[levynet]",
    "tune.view_modes=[single]",
    "tune.num_samples=1",
    "tune.max_concurrent_trials=1",
    "tune.baseline=false",
]


def predict_in_process(model: str, path: Path, workdir: Path, tracking_uri: str | None = None, box: str | None = None):
    """P(malignant) of one upload through the served code path, without Ray or HTTP."""
    runtime = ModelRuntime(
        ServeSettings(model=model, tracking_uri=tracking_uri, workdir=str(workdir), execution="loop")
    )
    item = PredictItem(files={"file": (path.name, path.read_bytes())}, rois={"box": box} if box else {})
    return runtime.predict_items([item])[0]["probability"]


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> tuple[Path, dict]:
    """(workdir, JSON result) of `mammo-ray demo` at tiny size, as a user runs it."""
    workdir = tmp_path_factory.mktemp("demo") / "work"
    args = [MAMMO_RAY, "demo", "--config", "tune_configs/search_smoke.yaml", "--members", "1"]
    args += ["--workdir", str(workdir), "--json", *[a for o in DEMO_SHRINK for a in ("--set", o)]]
    with own_ray_environment() as (env, marker):
        done = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, check=False, timeout=600)
        assert done.returncode == 0, done.stderr[-4000:]
        wait_for_exit_of_all(marker)
    return workdir, json.loads(done.stdout)


@pytest.mark.timeout(600)
def test_demo_runs_the_main_job_and_serves_its_ensemble(demo):
    workdir, result = demo
    search, ensemble, served = result["search"], result["ensemble"], result["serve"]
    assert search["trials"] == 1 and search["errored"] == 0
    assert search["best"]["cell"] == "levynet-single-aug_as-configured"
    assert ensemble["members"] == 1 and not ensemble["members_failed"]
    assert ensemble["model_uri"] == "models:/mammo-ray-demo-ensemble/1"
    assert ensemble["alias_uri"] == "models:/mammo-ray-demo-ensemble@champion"
    example = result["example"]  # the lesion it asked about, where the README's commands expect it
    assert Path(example["image"]) == workdir / "demo" / "example.dcm" and Path(example["image"]).is_file()
    assert (workdir / "demo" / "example-box.txt").read_text().strip() == example["box"]
    steps = result["next_steps"]  # the exact commands, with this run's non-default workdir
    assert steps["serve"] == f"mammo-ray serve --model {ensemble['alias_uri']} --workdir {workdir}"
    assert f"file=@{example['image']}" in steps["ask"] and f"box={example['box']}" in steps["ask"]
    assert steps["page"].startswith("http://127.0.0.1:8000/ ")
    assert steps["MLflow UI"].startswith(f"mlflow ui --backend-store-uri {ensemble['tracking_uri']} ")
    assert f"mammo_ray.load({ensemble['alias_uri']!r}, workdir={str(workdir)!r})" in steps["Python"]
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}  # the venv's python
    env.pop("MLFLOW_TRACKING_URI", None)
    printed = subprocess.run(["bash", "-c", steps["Python"]], env=env, capture_output=True, text=True, timeout=300)
    assert printed.returncode == 0, printed.stderr[-3000:]
    reply = ast.literal_eval(printed.stdout.strip().splitlines()[-1])  # as printed, it answers as served
    assert reply["probability"] == pytest.approx(result["serve"]["reply"]["probability"], abs=1e-5)
    reply = served["reply"]
    assert reply["members"]["count"] == 1 and reply["label"] in ("benign", "malignant")
    # What the demo's curl got from Serve is what the served code computes in-process for that lesion.
    fields = dict(arg.split("=", 1) for arg in shlex.split(served["curl"]) if arg.startswith(("file=", "box=")))
    image, box = Path(fields["file"].removeprefix("@")), fields["box"]
    expected = predict_in_process(ensemble["model_uri"], image, workdir, ensemble["tracking_uri"], box)
    assert reply["probability"] == pytest.approx(expected, abs=1e-5)
    assert served["localize_reply"]["method"] == "gradcam"  # levynet crop classifier: Grad-CAM
    assert result["disclaimer"].startswith("For research use only")


@pytest.fixture
def checkpoint_and_scan(tmp_path) -> tuple[Path, Path]:
    """An untrained levynet lesion classifier on 32-px crops, and a synthetic 16-bit mammogram."""
    config = load_config(None, TINY_TRAIN)
    torch.manual_seed(0)
    model = build_view_model(config.model).eval()
    spec = TransformSpec.from_config(config.data, train_mean=1000.0, train_std=300.0)
    checkpoint = save_checkpoint(checkpoint_payload(model=model, config=config, spec=spec, epoch=0), tmp_path / "ckpt")
    rng = np.random.default_rng(0)
    pixels = rng.normal(900, 120, (200, 120))
    yy, xx = np.mgrid[:200, :120]
    pixels[(yy - 100) ** 2 + (xx - 40) ** 2 <= 15**2] += 1500  # a bright mass in the breast
    pixels[:, 80:] = 40  # background on the right: a left breast
    info = DicomInfo("P_00001", Side.LEFT, View.CC, "1.2.3", "1.2.3.4", "1.2.3.4.5", SERIES_FULL, "20200101", 0.1)
    scan = write_mammogram(tmp_path / "scan.dcm", np.clip(pixels, 0, 65535).astype(np.uint16), info)
    return checkpoint, scan


def process_names(pids: list[int]) -> set[str]:
    names = set()
    for pid in pids:
        try:
            names.add(Path(f"/proc/{pid}/comm").read_text().strip())
        except OSError:  # ended meanwhile
            continue
    return names


@pytest.mark.timeout(300)
@pytest.mark.parametrize("proxy", ["serve", "haproxy"])
def test_serve_answers_over_http_and_stops_cleanly_on_ctrl_c(proxy, checkpoint_and_scan, tmp_path):
    checkpoint, scan = checkpoint_and_scan
    workdir = tmp_path / "work"
    with own_ray_environment() as (env, marker):
        with reserved_port() as port:  # held until Serve's proxy (or HAProxy) has bound it (SO_REUSEPORT)
            args = [MAMMO_RAY, "serve", "--model", str(checkpoint), "--workdir", str(workdir), "--port", str(port)]
            args += ["--set", "num_cpus=0.5", "--set", "execution=loop"] + (["--haproxy"] if proxy == "haproxy" else [])
            server = subprocess.Popen(
                args, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
            )
            # `serve` prints its "serving ..." line once /v1/health answered 200.
            lines = []
            while not (lines and lines[-1].startswith("serving ")):
                line = server.stdout.readline()
                assert line, f"mammo-ray serve exited {server.wait()}: {server.stderr.read()[-4000:]}"
                lines.append(line)
        url = f"http://127.0.0.1:{port}"
        assert f"at {url}" in lines[-1] and "1 members" in lines[-1]
        if proxy == "haproxy":  # HAProxy answers on the port, not a Python proxy; Serve runs in its mode
            assert "haproxy" in process_names(processes_with(marker))
            while not lines[-1].startswith("proxy: "):  # printed after the "serving" line, the page's and the keys'
                lines.append(server.stdout.readline())
                assert lines[-1], "".join(lines)
            assert lines[-1].startswith("proxy: HAProxy") and "every interface" in lines[-1]
        with urllib.request.urlopen(f"{url}/v1/health", timeout=60) as reply:
            assert reply.status == 200 and json.loads(reply.read())["status"] == "ready"
        body, content_type = multipart({"file": (scan.name, scan.read_bytes())})
        request = urllib.request.Request(
            f"{url}/v1/predict", data=body, headers={"Content-Type": content_type}, method="POST"
        )
        with urllib.request.urlopen(request, timeout=120) as reply:
            answer = json.loads(reply.read())
        server.send_signal(signal.SIGINT)
        out, err = server.communicate()
        assert server.returncode == 0, err[-4000:]
        assert "stopped serving" in out and "For research use only" in out
        assert "(raylet)" not in err and "graceful_shutdown" not in err, err[-4000:]  # a quiet stop
        wait_for_exit_of_all(marker)  # no Serve replica or raylet outlives the command
    assert answer["members"]["count"] == 1 and answer["views"].keys() == {"CC"}
    assert answer["probability"] == pytest.approx(predict_in_process(str(checkpoint), scan, workdir), abs=1e-5)


# --- the README's commands -------------------------------------------------------------------------

README = REPO / "README.md"
BLOCK = re.compile(r"<!-- readme-test: (run|check) -->\s*```bash\n(.*?)```", re.S)


def readme_blocks(kind: str) -> list[str]:
    """The README's ```bash blocks marked ``<!-- readme-test: KIND -->``: ``run`` blocks are run as printed
    after the demo, ``check`` blocks (long-running: a server, a UI) have their models and files checked."""
    blocks = [body for marked, body in BLOCK.findall(README.read_text()) if marked == kind]
    assert blocks, f"README.md has no block marked <!-- readme-test: {kind} -->"
    return blocks


def test_the_readme_marks_its_commands():
    assert len(readme_blocks("run")) >= 1 and len(readme_blocks("check")) >= 1
    assert "models:/mammo-ray-demo-ensemble@champion" in readme_blocks("run")[0]


def _user_checkout(demo_workdir: Path, tmp_path: Path) -> Path:
    """A directory laid out as the user's clone after `make demo`: ``work`` (the demo's) and ``.venv``."""
    checkout = tmp_path / "checkout"
    checkout.mkdir()
    (checkout / "work").symlink_to(demo_workdir)
    (checkout / ".venv").symlink_to(Path(sys.executable).parents[1])
    return checkout


@pytest.mark.timeout(600)
def test_the_readme_commands_work_as_printed_after_the_demo(demo, tmp_path):
    workdir, result = demo
    checkout = _user_checkout(workdir, tmp_path)
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "MAMMO_RAY_WORKDIR")}
    env["HOME"] = str(tmp_path)  # nothing lands in the user's home
    for block in readme_blocks("run"):
        done = subprocess.run(
            ["bash", "-euo", "pipefail", "-c", block],
            cwd=checkout,
            env=env,
            capture_output=True,
            text=True,
            timeout=500,
        )
        assert done.returncode == 0, f"{block}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
        assert "For research use only" in done.stdout
    out = done.stdout
    # evaluate: the registered ensemble's test AUC is the one the demo's ensemble reported
    assert f"AUC {result['ensemble']['ensemble_auc']:.3f}" in out
    # mammo_ray.load: a probability, equal to the one the demo's served ensemble answered for this lesion
    printed = ast.literal_eval(next(line for line in out.splitlines() if line.startswith("{'probability'")))
    assert printed["probability"] == pytest.approx(result["serve"]["reply"]["probability"], abs=1e-5)


def test_the_readme_long_running_commands_name_what_the_demo_made(demo, tmp_path):
    """``check`` blocks (serve, curl, the MLflow UI) are not run; what they name must exist after the demo."""
    from mammo_ray.ensemble.source import resolve_model_source

    workdir, result = demo
    checkout = _user_checkout(workdir, tmp_path)
    text = "\n".join(readme_blocks("check"))
    uris = set(re.findall(r"models:/[\w.\-]+(?:@[\w\-]+|/\d+)", text))
    assert uris == {result["ensemble"]["alias_uri"]}
    for uri in uris:
        source = resolve_model_source(uri, workdir, tracking_uri=result["ensemble"]["tracking_uri"])
        assert source.model_uri == result["ensemble"]["model_uri"]
    for path in re.findall(r"(?:file=@|cat |--config )([\w./\-]+)", text):
        assert (checkout / path).exists() or (REPO / path).exists(), path
    assert "sqlite:///$PWD/work/mlflow/mlflow.db" in text and (workdir / "mlflow" / "mlflow.db").is_file()
    makefile = (REPO / "Makefile").read_text()  # `make serve` / `make ui`, which the block mentions
    assert "\nserve: " in makefile and "\nui: " in makefile
    assert f"MODEL ?= {result['ensemble']['alias_uri']}" in makefile
