"""The debug config group (debug=fdr|overfit|limit|profiler, as in the Lightning-Hydra
template) and the trainer options accepted without Hydra's ``+``."""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd
import pytest
import torch

from nowcast.train import train
from tests.conftest import ROOT, TINY, compose_config


def test_debug_options_are_the_files_in_configs_debug():
    assert sorted(p.stem for p in (ROOT / "configs" / "debug").glob("*.yaml")) == [
        "default", "fdr", "limit", "overfit", "profiler"]


@pytest.mark.parametrize(
    "option, expected",
    [("fdr", {"fast_dev_run": True}),
     ("overfit", {"overfit_batches": 3, "max_epochs": 20}),
     ("limit", {"limit_train_batches": 4, "limit_val_batches": 2, "max_epochs": 3}),
     ("profiler", {"profiler": "simple", "detect_anomaly": False})],
)
def test_debug_configs_compose_over_the_defaults(option, expected, tmp_path):
    cfg = compose_config("train", [f"debug={option}"], tmp_path)
    assert cfg.task_name == "debug"
    assert cfg.trainer.max_time is None  # no time budget while debugging
    assert cfg.trainer.accelerator == "cpu" and cfg.trainer.devices == 1
    for key, value in expected.items():
        assert cfg.trainer[key] == value, key
    # debug is applied last: it wins over an experiment's trainer settings
    cfg = compose_config("train", ["experiment=mmnist_shi2015", f"debug={option}"], tmp_path)
    assert cfg.trainer.accelerator == "cpu" and cfg.trainer.max_time is None


def test_trainer_options_need_no_plus(tmp_path):
    cfg = compose_config("train", ["trainer.fast_dev_run=true", "trainer.max_time=00:00:05:00"],
                         tmp_path)
    assert cfg.trainer.fast_dev_run is True and cfg.trainer.max_time == "00:00:05:00"
    assert cfg.model.scheduler.max_time == "00:00:05:00"  # the schedule follows the budget


def test_fdr_runs_one_batch_and_writes_no_checkpoint(tmp_path):
    cfg = compose_config("train", TINY + ["debug=fdr"], tmp_path)
    metrics = train(cfg)
    assert math.isfinite(metrics["train/loss_step"]) and math.isfinite(metrics["val/mse"])
    assert not list(Path(cfg.paths.output_dir).rglob("*.ckpt"))


def test_overfit_drives_the_training_loss_down(tmp_path):
    tiny = [o for o in TINY if not o.startswith("callbacks.")]  # debug=overfit has none
    # The frame-drawing head, which can fit any 3 batches: a head that moves the last frame
    # fits them only as far as a motion does (session 6's velocity field: 0.063 -> 0.059).
    cfg = compose_config("train", tiny + ["debug=overfit", "logger=csv", "trainer.max_epochs=12",
                                          "model/net=encoder_forecaster", "model.optimizer.lr=0.01"],
                         tmp_path)
    train(cfg)
    (csv,) = tmp_path.rglob("metrics.csv")
    loss = pd.read_csv(csv)["train/loss_epoch"].dropna().to_numpy()
    assert len(loss) == 12
    assert loss[-1] < 0.6 * loss[0], loss


def test_limit_runs_few_batches_per_epoch(tmp_path):
    # TINY's max_epochs=1 is a command-line override, which wins over debug=limit's 3
    cfg = compose_config("train", TINY + ["debug=limit", "data.train_size=64", "trainer.max_epochs=3"],
                         tmp_path)
    train(cfg)
    last = torch.load(Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt", weights_only=True)
    assert last["epoch"] == 2 and last["global_step"] == 3 * 4  # 4 of the 8 batches per epoch


def test_profiler_reports_where_the_time_goes(tmp_path, caplog):
    cfg = compose_config("train", TINY + ["debug=profiler"], tmp_path)
    with caplog.at_level("INFO"):
        train(cfg)
    assert "Profiler Report" in caplog.text and "run_training_batch" in caplog.text
