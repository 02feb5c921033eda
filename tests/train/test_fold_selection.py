"""Cross-validation folds: the fold that scores a model must not pick its checkpoint."""

from __future__ import annotations

from mammo_ray.config import load_config
from mammo_ray.train.run import TrainOutcome, checkpoint_rule


def test_a_fold_trains_fixed_epochs_and_reports_the_last():
    config = load_config(None, ["train.epochs=7", "train.early_stop_patience=2", "train.monitor=val_auc"])
    fold_config, rule = checkpoint_rule(config, fold=3)
    assert rule.last
    assert rule.selection == "fixed epochs (train.epochs=7): the fold is not used to pick the checkpoint"
    assert fold_config.train.early_stop_patience is None  # the fold's val patients cannot stop it either
    assert fold_config.train.epochs == 7
    assert fold_config.model_copy(update={"train": config.train}) == config  # nothing else changes


def test_paper004_train_accuracy_stop_is_kept_and_said():
    config = load_config(None, ["train.epochs=200", "train.stop_train_acc=0.995"])
    fold_config, rule = checkpoint_rule(config, fold=0)
    assert fold_config.train.stop_train_acc == 0.995  # a rule on training batches, not on the fold
    assert rule.selection.startswith("fixed epochs (train.epochs=200): the fold is not used to pick the checkpoint; ")
    assert "train.stop_train_acc=0.995" in rule.selection


def test_a_plain_run_keeps_its_best_epoch_by_monitor():
    config = load_config(None, ["train.early_stop_patience=2", "train.monitor=val_exam_loss"])
    same, rule = checkpoint_rule(config, fold=None)
    assert same is config and not rule.last
    assert "train.monitor=val_exam_loss" in rule.selection


def test_the_outcome_says_how_the_checkpoint_was_chosen():
    _, rule = checkpoint_rule(load_config(None, ["train.epochs=2"]), fold=1)
    outcome = TrainOutcome(
        run_id="r",
        run_name="n",
        tracking_uri="u",
        checkpoint="c",
        output_dir="o",
        metrics={},
        best_epoch=1,
        epochs_run=2,
        status="FINISHED",
        selection=rule.selection,
    )
    assert (
        outcome.to_dict()["selection"] == "fixed epochs (train.epochs=2): the fold is not used to pick the checkpoint"
    )
