"""A console a person can read: one line per trial event (search.progress.TrialLines), and the libraries'
chatter in a log file under the work directory (cli.console.quiet_libraries) while errors stay loud."""

from __future__ import annotations

import logging
import os
import warnings
from types import SimpleNamespace

from mammo_ray.cli.console import log_path, quiet_libraries, restore_libraries
from mammo_ray.search.progress import TrialLines


def _trial(trial_id, cell="levynet-single", error_file=None, **config):
    return SimpleNamespace(
        trial_id=trial_id, config={"cell": cell, **config}, last_result={}, error_file=error_file, path="/trials/x"
    )


def test_a_trial_prints_a_start_an_epoch_and_an_end_line(capsys):
    lines = TrialLines(total=4, epochs=2)
    trial = _trial("a", **{"model.dropout": 0.2744, "optim.lr": 0.00269})
    lines.on_trial_start(0, [], trial)
    result = {"epochs_done": 1, "train_loss": 5.52801, "val_loss": 0.858, "val_auc": 0.25, "train_images_per_s": 193.4}
    lines.on_trial_result(0, [], trial, result)
    trial.last_result = {"epochs_done": 2}
    lines.on_trial_complete(0, [], trial)
    other = _trial("b")
    lines.on_trial_start(0, [], other)
    other.last_result = {"epochs_done": 1}
    lines.on_trial_complete(0, [], other)
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "trial 1/4 levynet-single started: dropout 0.274, lr 0.00269"
    assert out[1] == "trial 1/4 levynet-single epoch 1/2: train loss 5.528 | val loss 0.858 AUC 0.250 | 193 images/s"
    assert out[2].startswith("trial 1/4 levynet-single done after 2/2 epochs (")
    assert out[3] == "trial 2/4 levynet-single started"
    assert out[4].startswith("trial 2/4 levynet-single stopped early (ASHA or early stopping) after 1/2 epochs")


def test_a_member_is_named_by_its_seed_and_a_failure_goes_to_stderr(tmp_path, capsys):
    error = tmp_path / "error.txt"
    error.write_text("Traceback (most recent call last):\n  ...\nValueError: data.crop: no such crop mode\n")
    lines = TrialLines(total=3, epochs=5, what="member")
    member = _trial("m", cell="member", error_file=str(error), **{"train.seed": 7})
    lines.on_trial_start(0, [], member)
    lines.on_trial_error(0, [], member)
    captured = capsys.readouterr()
    assert captured.out.strip() == "member 1/3 (seed 7) started"
    assert captured.err.strip() == (
        f"member 1/3 (seed 7) FAILED: ValueError: data.crop: no such crop mode (traceback: {error})"
    )


def _state(names):
    """What quiet_libraries may change: each logger's handlers (with levels), level and propagation,
    whether warnings are captured, and the environment variables it sets."""
    loggers = {
        n: (
            [(h, h.level) for h in logging.getLogger(n).handlers],
            logging.getLogger(n).level,
            logging.getLogger(n).propagate,
        )
        for n in names
    }
    env = {k: os.environ.get(k) for k in ("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "RAY_AIR_NEW_OUTPUT")}
    return loggers, getattr(logging, "_warnings_showwarning", None) is not None, env


def test_library_chatter_goes_to_the_log_file_errors_stay_and_everything_is_put_back(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", raising=False)
    console = logging.StreamHandler()  # as a library installs its own console handler
    logging.getLogger("optuna").addHandler(console)
    names = ["mlflow", "mlflow.store.db.utils", "optuna", "py.warnings", "ray"]
    before = _state(names)
    path = log_path(tmp_path, "tune")
    assert path.parent == tmp_path / "logs" and path.name.startswith("tune-") and path.suffix == ".log"
    try:
        quiet_libraries(path)
        quiet_libraries(path)  # again, after a library set itself up: nothing is doubled
        logging.getLogger("mlflow.store.db.utils").info("Creating initial MLflow database tables...")
        logging.getLogger("optuna").info("A new study created in memory")
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            warnings.warn("Saving pytorch model by Pickle", UserWarning, stacklevel=1)
        assert console.level == logging.ERROR  # the library's own console handler keeps errors only
        assert os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] == "false"
    finally:
        restore_libraries()
        logging.getLogger("optuna").removeHandler(console)
    text = path.read_text()
    assert text.count("Creating initial MLflow database tables") == 1 and "A new study created" in text
    assert "Saving pytorch model by Pickle" in text
    after = _state(names)
    assert after[1:] == before[1:]  # warnings capture and the environment as they were
    for name in names:  # each logger as it was (the test's own console handler aside)
        handlers, level, propagate = after[0][name]
        expected = [(h, lvl) for h, lvl in before[0][name][0] if h is not console]
        assert ([(h, lvl) for h, lvl in handlers if h is not console], level, propagate) == (
            expected,
            before[0][name][1],
            before[0][name][2],
        ), name
