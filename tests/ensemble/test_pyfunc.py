"""The registered ensemble as an MLflow model: a signature, an input example and no pickle; it takes image
files or their base64 bytes with ROI boxes, answers the fields of /v1/predict through the Serve replica's
``ModelRuntime`` (so its probabilities equal the offline evaluation's and ``mammo_ray.load``'s), names bad
rows, and predicts from ``mlflow models predict`` with its own copy of mammo_ray where the package is not
installed."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import time
from importlib.metadata import packages_distributions
from pathlib import Path

import mlflow.artifacts
import mlflow.pyfunc
import numpy as np
import pandas as pd
import pytest
import torch
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from mlflow.models import Model
from test_layering import PACKAGE_ROOT, import_graph

import mammo_ray
from mammo_ray.constants import DISCLAIMER
from mammo_ray.data.crops import mask_bbox
from mammo_ray.data.datasets import CropCache, SingleViewDataset
from mammo_ray.data.dicom import read_dicom
from mammo_ray.data.pipeline import ensure_prepared
from mammo_ray.data.transforms import build_eval_transform
from mammo_ray.ensemble.model import Ensemble, register_ensemble
from mammo_ray.ensemble.pyfunc import OUTPUT_COLUMNS, REQUIREMENTS, flatten_reply
from mammo_ray.ensemble.source import resolve_model_source
from mammo_ray.train.checkpoint import checkpoint_payload, save_checkpoint
from mammo_ray.train.loop import build_training

REPO = Path(__file__).resolve().parents[2]
OUTPUTS = [name for name, _ in OUTPUT_COLUMNS]

# Put first on PYTHONPATH, this hides the editable install of mammo-ray from a Python process (its finder
# is a sys.meta_path entry that a .pth file installs before sitecustomize runs), and records at exit
# which mammo_ray the process imported and whether it imported ray.
HIDE_EDITABLE = """\
import atexit, json, os, sys

sys.meta_path[:] = [f for f in sys.meta_path if not getattr(f, "__module__", "").startswith("__editable__")]
sys.path[:] = [p for p in sys.path if "__editable__" not in p]

def _record():
    module = sys.modules.get("mammo_ray")
    with open(os.environ["IMPORTED_RECORD"], "w") as f:
        json.dump({"mammo_ray": getattr(module, "__file__", None), "ray": "ray" in sys.modules}, f)

atexit.register(_record)
"""


@pytest.fixture(scope="module")
def prepared(tiny_workdir, tiny_config):
    return ensure_prepared(tiny_config(), tiny_workdir, progress=False)


def make_members(tiny_config, prepared, tmp_path_factory, *overrides: str) -> list[Path]:
    """Two members as initialised by seeds 0 and 1 (untrained: what is tested is the plumbing)."""
    paths = []
    for seed in (0, 1):
        config = tiny_config(f"train.seed={seed}", *overrides)
        training = build_training(config, prepared.cache_dir)
        payload = checkpoint_payload(model=training.model, config=config, spec=training.spec, epoch=0, history=[])
        paths.append(save_checkpoint(payload, tmp_path_factory.mktemp(f"member{seed}")))
    return paths


def register(members: list[Path], root: Path, name: str) -> tuple[str, dict]:
    """(store URI, ``register_ensemble``'s result) in a new SQLite store under ``root``."""
    uri = f"sqlite:///{root / 'mlflow.db'}"
    client = MlflowClient(uri)
    experiment = client.create_experiment("pyfunc", artifact_location=str(root / "artifacts"))
    parent = client.create_run(experiment).info.run_id
    member_runs = [client.create_run(experiment).info.run_id for _ in members]
    return uri, register_ensemble(uri, parent, members, member_runs, name)


def load(uri: str, model_uri: str) -> mlflow.pyfunc.PyFuncModel:
    with pytest.MonkeyPatch.context() as env:  # models:/ resolves through the process-wide registry URI
        env.setenv("MLFLOW_TRACKING_URI", uri)
        return mlflow.pyfunc.load_model(model_uri)


@pytest.fixture(scope="module")
def members(tiny_config, prepared, tmp_path_factory):
    return make_members(tiny_config, prepared, tmp_path_factory)


@pytest.fixture(scope="module")
def registered(members, tmp_path_factory):
    return register(members, tmp_path_factory.mktemp("store"), "pyfunc-test")


@pytest.fixture(scope="module")
def model_dir(registered, tmp_path_factory):
    uri, result = registered
    version = MlflowClient(uri).get_model_version("pyfunc-test", str(result["version"]))
    return Path(mlflow.artifacts.download_artifacts(version.source, dst_path=str(tmp_path_factory.mktemp("dl"))))


@pytest.fixture(scope="module")
def loaded(registered):
    uri, result = registered
    return load(uri, result["model_uri"])


@pytest.fixture(scope="module")
def lesions(prepared, members):
    """Six test-split lesions: image path, ROI box of their mask (stored pixels), DICOM view, and the
    ensemble's probability from the crop cache (``mammo-ray evaluate``'s input)."""
    ensemble = Ensemble.from_checkpoints(members)
    dataset = SingleViewDataset(
        CropCache(prepared.cache_dir), "test", "pathology", transform=build_eval_transform(ensemble.spec)
    )
    rows = dataset.frame.head(6).copy()
    masks = pd.read_parquet(prepared.manifest).set_index("lesion_id").loc[rows["lesion_id"], "roi_mask_path"]
    rows["box"] = [",".join(map(str, mask_bbox(read_dicom(m, flip=False)[0] > 0))) for m in masks]
    probs = ensemble(torch.stack([dataset[i][0] for i in range(len(rows))])).numpy().astype(np.float64)
    return rows.assign(prob=probs.mean(axis=1), prob_std=probs.std(axis=1))


@pytest.mark.slow
def test_the_saved_model_has_a_signature_an_example_and_its_code(model_dir, registered):
    meta = Model.load(model_dir)
    assert meta.model_id == registered[1]["model_id"] and meta.run_id == registered[1]["run_id"]
    inputs = meta.signature.inputs.to_dict()
    assert [(c["name"], c["type"], c["required"]) for c in inputs] == [
        ("image", "string", True),
        ("box", "string", False),
    ]
    assert meta.signature.outputs.input_names() == OUTPUTS
    example = meta.load_input_example(model_dir)
    assert list(example.columns) == ["image", "box"] and example["box"].iloc[0] == "16,28,40,68"
    flavor = meta.flavors["python_function"]
    assert flavor["loader_module"] == "mlflow.pyfunc.loaders.code_model"  # models-from-code
    assert (model_dir / "pyfunc_model.py").is_file() and not list(model_dir.rglob("*.pkl"))  # nothing pickled
    assert (model_dir / "code/mammo_ray/serving/runtime.py").is_file()
    assert meta.metadata == {
        "mammo_ray.members": 2,
        "mammo_ray.view_mode": "single",
        "mammo_ray.version": mammo_ray.__version__,
    }
    requirements = (model_dir / "requirements.txt").read_text().split()
    names = [r.split("==")[0] for r in requirements]
    assert "mammo-ray" not in names and "ray" not in names and {"torch", "pydicom", "mlflow"} <= set(names)
    assert all("==" in r and "+" not in r for r in requirements)  # pinned, without local versions


def test_the_requirements_cover_what_the_model_code_imports():
    edges, external = import_graph(PACKAGE_ROOT)
    reached, todo = set(), ["mammo_ray.ensemble.pyfunc_model"]
    while todo:
        module = todo.pop()
        if module not in reached:
            reached.add(module)
            todo.extend(edges[module])
    imported = set().union(*(external[m] for m in reached)) - set(sys.stdlib_module_names)
    assert "ray" not in imported, sorted(m for m in reached if "ray" in external[m])
    distributions = packages_distributions()
    needed = {d.lower() for module in imported for d in distributions[module]} - {"mlflow-skinny", "mlflow-tracing"}
    assert needed <= {r.lower() for r in REQUIREMENTS}, needed - {r.lower() for r in REQUIREMENTS}


@pytest.mark.slow
def test_registered_version_still_resolves_to_its_member_checkpoints(registered, members, tmp_path):
    uri, result = registered
    source = resolve_model_source(result["model_uri"], tmp_path, tracking_uri=uri)
    assert source.kind == "registered" and len(source.checkpoints) == len(members)
    for downloaded, original in zip(source.checkpoints, members, strict=True):
        assert downloaded.read_bytes() == original.read_bytes()


@pytest.mark.slow
def test_paths_and_base64_bytes_give_the_offline_probability(loaded, lesions):
    image_bytes = [base64.b64encode(Path(p).read_bytes()).decode("ascii") for p in lesions["image_path"]]
    frame = pd.DataFrame({"image": [*lesions["image_path"], *image_bytes], "box": [*lesions["box"], *lesions["box"]]})
    out = loaded.predict(frame)
    assert list(out.columns) == OUTPUTS and len(out) == 2 * len(lesions)
    for half in (out.iloc[: len(lesions)], out.iloc[len(lesions) :]):
        np.testing.assert_allclose(half["probability"], lesions["prob"], atol=1e-5)
        np.testing.assert_allclose(half["members_std"], lesions["prob_std"], atol=1e-5)
        assert (half["label"] == np.where(half["probability"] >= 0.5, "malignant", "benign")).all()
        assert (half["members_count"] == 2).all() and (half["disclaimer"] == DISCLAIMER).all()
    assert list(out["view"].iloc[: len(lesions)]) == list(lesions["view"])  # the DICOM header names the view


@pytest.mark.slow
def test_rows_equal_mammo_ray_load(loaded, registered, lesions, model_dir, tmp_path):
    uri, result = registered
    predictor = mammo_ray.load(result["model_uri"], tracking_uri=uri, workdir=tmp_path)
    path, box = lesions["image_path"].iloc[0], lesions["box"].iloc[0]
    out = loaded.predict(pd.DataFrame({"image": [path, path], "box": [box, None]}))
    for row, kwargs in zip(out.to_dict("records"), [{"box": box}, {}], strict=True):
        expected = flatten_reply(predictor.predict(path, **kwargs), pair=False)
        assert row == pytest.approx(expected, abs=1e-6, nan_ok=True)  # calibrated_probability: NaN, no policy
    example = Model.load(model_dir).load_input_example(model_dir)  # the logged example predicts too
    answers = loaded.predict(example)
    assert answers["probability"].between(0, 1).all() and answers["probability"].nunique() == 2  # box vs whole


@pytest.mark.slow
def test_bad_rows_are_named(loaded, lesions, tmp_path):
    path = lesions["image_path"].iloc[0]
    frame = pd.DataFrame(
        {
            "image": [path, str(tmp_path / "missing.dcm"), path, base64.b64encode(b"not an image").decode()],
            "box": [None, None, "0,0,99999,10", None],
        }
    )
    with pytest.raises(MlflowException, match="3 of 4 rows failed") as info:
        loaded.predict(frame)
    message = str(info.value)
    assert "row 1, image: " in message and "is neither a file here nor base64" in message
    assert "row 2, box: " in message and "outside the image" in message
    assert "row 3, image: " in message and "row 0" not in message


@pytest.mark.slow
def test_mlflow_models_predict_runs_the_models_own_code(registered, loaded, lesions, tmp_path):
    """``mlflow models predict`` from a folder outside the repository, with the editable install hidden:
    mammo_ray can only come from the model, and the record says it did (and that ray was not imported)."""
    uri, result = registered
    (tmp_path / "hide").mkdir()
    (tmp_path / "hide" / "sitecustomize.py").write_text(HIDE_EDITABLE)
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "hide"), "MLFLOW_TRACKING_URI": uri}
    hidden = subprocess.run(
        [sys.executable, "-c", "import mammo_ray"],
        cwd=tmp_path,
        env={**env, "IMPORTED_RECORD": str(tmp_path / "check.json")},
        capture_output=True,
        text=True,
    )
    assert hidden.returncode != 0 and "No module named 'mammo_ray'" in hidden.stderr  # the hiding works
    rows = {"image": list(lesions["image_path"][:2]), "box": [lesions["box"].iloc[0], None]}
    frame = pd.DataFrame(rows)
    (tmp_path / "input.json").write_text(json.dumps({"dataframe_split": frame.to_dict(orient="split", index=False)}))
    mlflow_cli = Path(sys.executable).with_name("mlflow")
    command = [str(mlflow_cli), "models", "predict", "-m", result["model_uri"], "--env-manager", "local"]
    started = time.perf_counter()
    done = subprocess.run(
        [*command, "-i", "input.json", "-t", "json", "-o", "out.json"],
        cwd=tmp_path,
        env={**env, "IMPORTED_RECORD": str(tmp_path / "imported.json")},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    print(f"mlflow models predict: {time.perf_counter() - started:.1f} s")
    imported = json.loads((tmp_path / "imported.json").read_text())
    assert imported["mammo_ray"].endswith(os.path.join("code", "mammo_ray", "__init__.py")), imported
    assert not imported["mammo_ray"].startswith(str(REPO)) and imported["ray"] is False
    predictions = pd.DataFrame(json.loads((tmp_path / "out.json").read_text())["predictions"])
    expected = loaded.predict(frame)
    assert list(predictions.columns) == OUTPUTS
    np.testing.assert_allclose(predictions["probability"], expected["probability"], atol=1e-6)
    assert list(predictions["label"]) == list(expected["label"])


@pytest.mark.slow
def test_a_multimodal_ensemble_takes_a_pair_per_row(tiny_config, prepared, lesions, tmp_path_factory, tmp_path):
    members = make_members(tiny_config, prepared, tmp_path_factory, "model.view_mode=multimodal")
    uri, result = register(members, tmp_path_factory.mktemp("store"), "pyfunc-pair")
    model = load(uri, result["model_uri"])
    assert model.metadata.get_input_schema().input_names() == ["cc", "mlo", "cc_box", "mlo_box"]
    cc, mlo = lesions["image_path"].iloc[0], lesions["image_path"].iloc[1]
    box = lesions["box"].iloc[0]
    out = model.predict(
        pd.DataFrame({"cc": [cc, cc], "mlo": [mlo, mlo], "cc_box": [box, None], "mlo_box": [None, None]})
    )
    assert list(out["view"]) == ["CC+MLO", "CC+MLO"] and out["probability"].nunique() == 2
    predictor = mammo_ray.load(result["model_uri"], tracking_uri=uri, workdir=tmp_path)
    for row, kwargs in zip(out.to_dict("records"), [{"cc_box": box}, {}], strict=True):
        expected = flatten_reply(predictor.predict(cc=cc, mlo=mlo, **kwargs), pair=True)
        assert row == pytest.approx(expected, abs=1e-6, nan_ok=True)
    with pytest.raises(MlflowException, match="mlo"):  # both views are required
        model.predict(pd.DataFrame({"cc": [cc]}))
