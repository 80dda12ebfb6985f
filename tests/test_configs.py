"""Every config in configs/ composes and instantiates; training options work on CPU."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
from hydra.utils import instantiate

from nowcast.train import train
from tests.conftest import ROOT, TINY, compose_config

GROUPS = ["data", "model", "trainer", "logger", "callbacks", "experiment"]


def _options(group: str) -> list[str]:
    return sorted(p.stem for p in (ROOT / "configs" / group).glob("*.yaml"))


def _radar_overrides(option: str, tmp_path: Path) -> list[str]:
    """Radar configs need an archive path; any path string composes."""
    return [f"data.path={tmp_path}/radar"] if "radar" in option else []


@pytest.mark.parametrize("group,option", [(g, o) for g in GROUPS for o in _options(g)])
def test_config_composes_and_instantiates(group, option, tmp_path):
    extra = _radar_overrides(option, tmp_path) if group in ("data", "experiment") else []
    cfg = compose_config("train", [f"{group}={option}", *extra], tmp_path)
    datamodule = instantiate(cfg.data)
    assert isinstance(datamodule, L.LightningDataModule)
    model = instantiate(cfg.model)
    assert isinstance(model, L.LightningModule)
    for name in ("logger", "callbacks"):
        for key, node in (cfg.get(name) or {}).items():
            if node is not None and "_target_" in node:
                if key == "wandb":
                    os.environ.setdefault("WANDB_MODE", "offline")
                assert instantiate(node) is not None
    if cfg.trainer.accelerator == "cpu":
        assert isinstance(instantiate(cfg.trainer), L.Trainer)
    else:  # gpu / ddp configs compose; they are instantiated on GPU machines only
        assert cfg.trainer.accelerator == "gpu"


def test_evaluate_config_composes(tmp_path):
    cfg = compose_config("evaluate", ["ckpt_path=x.ckpt"], tmp_path)
    assert cfg.baselines == ["persistence"] and cfg.ckpt_path == "x.ckpt"


@pytest.mark.parametrize(
    "extra",
    [
        ["trainer.precision=bf16-mixed"],
        ["trainer.precision=16-mixed"],
        ["trainer.accumulate_grad_batches=2", "trainer.gradient_clip_val=0.5"],
        ["model=shi2015", "model.net.hidden_channels=[8,8]", "model.net.kernel_size=3",
         "model.loss._target_=nowcast.losses.MaskedBCE"],
        ["model.net.pool_size=[2,2,2]", "data.input_steps=4", "data.output_steps=2"],
        ["callbacks=default_early_stopping", "logger=tensorboard"],
    ],
    ids=["bf16", "fp16", "accumulate-clip", "shi2015-bce", "time-pooling", "early-stop-tensorboard"],
)
def test_training_options_run(extra, tmp_path):
    cfg = compose_config("train", TINY + ["+trainer.limit_train_batches=2", *extra], tmp_path)
    metrics = train(cfg)
    assert math.isfinite(metrics["val/mse"])


def test_wandb_offline_needs_no_account(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    cfg = compose_config("train", TINY + ["logger=wandb", "+trainer.limit_train_batches=2",
                                          "callbacks.forecast_plots.num_samples=1"], tmp_path)
    metrics = train(cfg)
    assert math.isfinite(metrics["val/mse"])
    assert list((Path(cfg.paths.output_dir) / "wandb").glob("offline-run-*"))


def test_multirun_sweep_from_the_command_line(tmp_path):
    out = subprocess.run(
        [sys.executable, "train.py", "-m", "model.optimizer.lr=0.001,0.002",
         *TINY, "trainer.fast_dev_run=true", f"paths.log_dir={tmp_path}",
         f"paths.data_dir={tmp_path}/data"],
        cwd=ROOT, capture_output=True, text=True, timeout=600, stdin=subprocess.DEVNULL,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    runs = sorted((tmp_path / "train" / "multiruns").glob("*/[0-9]"))
    assert [r.name for r in runs] == ["0", "1"]
    assert (runs[1] / ".hydra" / "overrides.yaml").read_text().count("lr=0.002") == 1


def test_default_run_is_the_light_task_on_a_time_budget(tmp_path):
    """`python train.py`: one digit, the shift head, 8 minutes of training whose schedule
    ends with the budget, then the test set; the standard task is one override away."""
    cfg = compose_config("train", [], tmp_path)
    assert cfg.data.num_digits == 1 and cfg.data.frame_size == 64
    assert (cfg.data.input_steps, cfg.data.output_steps) == (10, 5)
    assert cfg.model.net.output == "shift" and cfg.model.net.shift_prior > 0 and cfg.test is True
    assert cfg.model.net.hidden_channels == [16, 32]
    assert cfg.trainer.max_time == "00:00:08:00"
    scheduler = instantiate(cfg.model.scheduler)(optimizer=_sgd())
    assert scheduler.budget_s == 480.0 and scheduler.T_max == cfg.trainer.max_epochs
    standard = compose_config("train", ["data=moving_mnist_standard"], tmp_path)
    assert standard.data.num_digits == 2 and standard.data.data_dir != cfg.data.data_dir
    assert (standard.data.input_steps, standard.data.output_steps) == (10, 10)
    for name in ("mmnist_shi2015", "mmnist_convlstm"):  # GPU recipes: standard task, no budget
        exp = compose_config("train", [f"experiment={name}"], tmp_path)
        assert exp.data.num_digits == 2 and exp.trainer.max_time is None
        assert exp.data.output_steps == exp.model.net.output_steps == 10


def _sgd():
    import torch

    return torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)


@pytest.mark.parametrize("experiment", [None, "mmnist_convlstm", "mmnist_shi2015", "radar_bom",
                                        "radar_bom_network"])
def test_every_recipe_builds_its_optimizer_and_scheduler(experiment, tmp_path):
    # A recipe that swaps the scheduler must not inherit the default's arguments (OneCycleLR
    # was handed CosineAnnealingLR's T_max and crashed at the first step).
    overrides = [f"experiment={experiment}"] if experiment else []
    cfg = compose_config("train", overrides, tmp_path)
    model = instantiate(cfg.model)
    setup = model.configure_optimizers()
    optimizer = setup["optimizer"] if isinstance(setup, dict) else setup
    optimizer.step()  # the scheduler's first step needs one optimizer step before it
    if isinstance(setup, dict):
        setup["lr_scheduler"]["scheduler"].step()
