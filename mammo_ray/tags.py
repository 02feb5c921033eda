"""The MLflow tag names mammo-ray writes and reads: one module, so a writer and its reader never drift.

Runs (``mammo-ray train``, its folds, search and ensemble parents and their trials) and registered
model versions (the ensemble) carry these tags. The values are strings, as MLflow stores them.
"""

from __future__ import annotations

PREFIX = "mammo_ray."

# What a run is, and where its files are.
KIND = "mammo_ray.kind"  # "train", "fold", "cv", "search", "ensemble", "search-trial", "ensemble-trial"
OUTPUT_DIR = "mammo_ray.output_dir"  # <workdir>/runs/<run name>/ of a training run
CACHE_DIR = "mammo_ray.cache_dir"  # the crop cache it trained on
SPLITS = "mammo_ray.splits"  # the splits JSON of that cache
EXPERIMENT_DIR = "mammo_ray.experiment_dir"  # a search's or ensemble's Tune folder (for --resume)

# The checkpoint a training run reports and how it was chosen.
CHECKPOINT = "mammo_ray.checkpoint"  # path of the reported checkpoint.pt (read by evaluate and --model)
BEST_EPOCH = "mammo_ray.best_epoch"  # its epoch
SELECTION = "mammo_ray.selection"  # the sentence that says how it was chosen

# Cross-validation.
FOLD = "mammo_ray.fold"  # the fold a child run validates on
FOLDS = "mammo_ray.folds"  # K, on the parent run

# Search and ensemble trials.
TRIAL_ID = "mammo_ray.trial_id"  # the Tune trial a child run belongs to (stable across restarts)
CELL = "mammo_ray.cell"  # the search cell of a trial
SEARCH = "mammo_ray.search"  # the search (or ensemble) name a trial belongs to
STOP_REASON = "mammo_ray.stop_reason"  # why a trial's run ended KILLED or FAILED from the driver
CELL_BEST = "mammo_ray.cell_best"  # "true" on the best trial of its cell (evaluated on test)
BEST_TRIAL = "mammo_ray.best_trial"  # on a search parent: the best configuration's trial
BEST_CELL = "mammo_ray.best_cell"  # ... its cell
BEST_CONFIG = "mammo_ray.best_config"  # ... and the best_config.yaml it saved
FROM_SEARCH = "mammo_ray.from_search"  # on an ensemble parent: the search run its config came from

# Ensembles (runs and registered model versions).
MEMBERS = "mammo_ray.members"  # member count
MEMBER_RUN_IDS = "mammo_ray.member_run_ids"  # comma-separated member runs (lineage)
VIEW_MODE = "mammo_ray.view_mode"  # the members' view mode

# Where a run came from, next to MLflow's own mlflow.source.name/type, mlflow.source.git.commit and
# mlflow.user (``tracking.driver_source``): the same for a driver's run and for its trials' runs.
VERSION = "mammo_ray.version"  # the mammo-ray package version of the command
RAY_JOB = "mammo_ray.ray_job"  # the Ray job submission id, when the command ran under `ray job submit`

# The process that holds a run open (a driver, or a trial's process): ``tracking.reap_dead_runs`` ends
# FAILED a RUNNING run whose process on this host is gone. Set when the run is created or reopened.
OWNER_HOST = "mammo_ray.owner.host"  # socket.gethostname() of that process
OWNER_PID = "mammo_ray.owner.pid"  # its pid
OWNER_STARTED = "mammo_ray.owner.started"  # its start time (ISO 8601, UTC): a reused pid is not the owner

# MLflow's own tag for a failed run's error (set next to status FAILED): an exception's text, or why
# ``tracking.reap_dead_runs`` ended the run.
ERROR = "error"
