"""docs/quickstart.ipynb runs as committed, in the venv's own kernel, on a trained model and a test-split
lesion: every cell runs, the probability it prints is ``mammo_ray.load(...).predict``'s, it shows the
disclaimer and a heatmap overlay; and it is committed without outputs."""

from __future__ import annotations

import base64
import io
import re
import sys
from pathlib import Path

import nbformat
import numpy as np
import pandas as pd
import pytest
from nbclient import NotebookClient
from PIL import Image

import mammo_ray
from mammo_ray.constants import DISCLAIMER
from mammo_ray.data.crops import mask_bbox
from mammo_ray.data.datasets import CropCache, SingleViewDataset
from mammo_ray.data.dicom import read_dicom

NOTEBOOK = Path(__file__).resolve().parents[1] / "docs" / "quickstart.ipynb"
# Where Jupyter and IPython keep connection files, kernelspecs, config and history, and matplotlib its
# font cache: by default under the user's home, which tests leave alone.
TOOL_DIRS = ("JUPYTER_RUNTIME_DIR", "JUPYTER_DATA_DIR", "JUPYTER_CONFIG_DIR", "IPYTHONDIR", "MPLCONFIGDIR")
KERNEL_PROBE = "import sys\nprint('kernel', sys.executable)\nprint('prefix', sys.prefix)"


def _texts(cell) -> str:
    """The text a code cell printed or returned (streams and text/plain), joined."""
    parts = []
    for output in cell.outputs:
        if output.output_type == "stream":
            parts.append(output.text)
        elif output.output_type in ("execute_result", "display_data"):
            parts.append(output.data.get("text/plain", ""))
    return "\n".join(parts)


@pytest.fixture
def test_lesion(lesion_model):
    """The first test-split lesion of the model's data: (image path, ROI box in stored pixels)."""
    _, prepared = lesion_model
    row = SingleViewDataset(CropCache(prepared.cache_dir), "test", "pathology").frame.iloc[0]
    manifest = pd.read_parquet(prepared.manifest).set_index("lesion_id")
    box = mask_bbox(read_dicom(manifest.loc[row["lesion_id"], "roi_mask_path"], flip=False)[0] > 0)
    assert box is not None, row["lesion_id"]
    return row["image_path"], tuple(int(v) for v in box)


@pytest.mark.slow  # its fixture trains the lesion model
def test_the_quickstart_runs_and_prints_the_models_probability(lesion_model, test_lesion, tmp_path, monkeypatch):
    checkpoint, _ = lesion_model
    image, box = test_lesion
    for var in TOOL_DIRS:
        (tmp_path / var.lower()).mkdir()
        monkeypatch.setenv(var, str(tmp_path / var.lower()))
    workdir, run_dir = tmp_path / "work", tmp_path / "run"
    run_dir.mkdir()
    monkeypatch.setenv("MAMMO_RAY_MODEL", str(checkpoint))
    monkeypatch.setenv("MAMMO_RAY_IMAGE", str(image))
    monkeypatch.setenv("MAMMO_RAY_BOX", ",".join(map(str, box)))
    monkeypatch.setenv("MAMMO_RAY_WORKDIR", str(workdir))

    notebook = nbformat.read(NOTEBOOK, as_version=4)
    notebook.cells.append(nbformat.v4.new_code_cell(KERNEL_PROBE, id="kernel-probe"))  # not saved
    client = NotebookClient(
        notebook, kernel_name="python3", timeout=300, resources={"metadata": {"path": str(run_dir)}}
    )
    client.execute()  # raises CellExecutionError, with the cell and its traceback, if a cell fails
    nbformat.write(notebook, tmp_path / "executed.ipynb")  # to look at when an assertion below fails

    cells = {cell.id: cell for cell in notebook.cells if cell.cell_type == "code"}
    errors = [(cell_id, o.ename) for cell_id, c in cells.items() for o in c.outputs if o.output_type == "error"]
    assert not errors
    assert _texts(cells["kernel-probe"]).split("\n")[:2] == [f"kernel {sys.executable}", f"prefix {sys.prefix}"]

    expected = mammo_ray.load(checkpoint, workdir=tmp_path / "direct").predict(image, box=box)["probability"]
    printed = re.search(r"^probability (\d+\.\d+)$", _texts(cells["predict"]), re.MULTILINE)
    assert printed is not None, _texts(cells["predict"])
    assert float(printed.group(1)) == pytest.approx(expected, abs=1e-5)
    assert any(DISCLAIMER in _texts(cell) for cell in cells.values())
    assert re.search(r"^method (cam|gradcam|dense), ", _texts(cells["localize"]), re.MULTILINE)
    assert f"version   {checkpoint}" in _texts(cells["lineage"])

    pngs = [o.data["image/png"] for o in cells["overlay"].outputs if "image/png" in o.get("data", {})]
    assert len(pngs) == 1, cells["overlay"].outputs
    pixels = np.asarray(Image.open(io.BytesIO(base64.b64decode(pngs[0]))).convert("L"), dtype=np.float64)
    assert min(pixels.shape) > 100 and pixels.std() > 10  # a drawn figure, not a blank canvas


def test_the_committed_quickstart_has_no_outputs():
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(notebook)
    assert notebook.metadata.kernelspec.name == "python3"
    assert set(notebook.metadata) <= {"kernelspec", "language_info"}
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert code and all(cell.outputs == [] and cell.execution_count is None for cell in code)
    assert all(cell.metadata == {} for cell in notebook.cells)
    assert DISCLAIMER in notebook.cells[0].source  # stated before anything runs
