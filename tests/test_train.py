"""End-to-end runs of the real configs: train, evaluate, resume, bad input."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import open_dict

from nowcast.evaluate import evaluate
from nowcast.train import train
from tests.conftest import ROOT, TINY, compose_config


def test_fast_dev_run(train_cfg):
    cfg = train_cfg("trainer.fast_dev_run=true", "logger=csv")
    metrics = train(cfg)
    assert math.isfinite(metrics["train/loss_step"])


def test_train_then_evaluate_round_trip(train_cfg, tmp_path):
    cfg = train_cfg("test=true")
    metrics = train(cfg)
    for key in ("val/loss", "val/mse", "val/persistence/mse", "val/ssim", "test/mse", "test/mse/lead01"):
        assert key in metrics, key
    run = Path(cfg.paths.output_dir)
    best = run / "checkpoints" / "best.ckpt"
    assert best.is_file() and (run / "checkpoints" / "last.ckpt").is_file()
    assert sorted((run / "plots").glob("epoch_000_sample*.png"))
    assert (run / "csv" / "metrics.csv").is_file()

    ecfg = compose_config("evaluate", [f"ckpt_path={best}", "plot_samples=2"], tmp_path / "eval")
    results = evaluate(ecfg)
    # The same checkpoint on the same test set: evaluate.py reproduces trainer.test.
    for key in ("test/mse", "test/mae", "test/ssim", "test/mse/lead03"):
        assert results["model"][key] == pytest.approx(metrics[key], rel=1e-4, abs=1e-6), key
        assert results["persistence"][key] == pytest.approx(metrics[key.replace("test/", "test/persistence/")], rel=1e-4, abs=1e-6)
    out = Path(ecfg.paths.output_dir)
    stored = json.loads((out / "metrics.json").read_text())
    assert stored["model"]["test/mse"] == pytest.approx(results["model"]["test/mse"])
    table = (out / "metrics.md").read_text()
    assert "| score | model | persistence |" in table and "## mse per lead time" in table
    assert (out / "plots" / "scores_vs_lead.png").is_file()
    assert (out / "plots" / "sample_1.png").is_file()


def _final_weights(cfg) -> dict[str, torch.Tensor]:
    ckpt = torch.load(Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt", weights_only=True)
    return ckpt["state_dict"], ckpt["global_step"]


def test_resume_equals_uninterrupted(tmp_path):
    common = ["trainer.deterministic=true", "seed=3", "callbacks.forecast_plots=null"]
    full = compose_config("train", _tiny(common + ["trainer.max_epochs=2"]), tmp_path / "full")
    train(full)
    first = compose_config("train", _tiny(common + ["trainer.max_epochs=1",
                                                     "model.scheduler.T_max=2"]), tmp_path / "first")
    train(first)
    last = Path(first.paths.output_dir) / "checkpoints" / "last.ckpt"
    resumed = compose_config("train", _tiny(common + ["trainer.max_epochs=2", f"ckpt_path={last}"]),
                             tmp_path / "resumed")
    train(resumed)
    w_full, step_full = _final_weights(full)
    w_resumed, step_resumed = _final_weights(resumed)
    assert step_full == step_resumed
    for k in w_full:
        torch.testing.assert_close(w_full[k], w_resumed[k], rtol=0, atol=0, msg=k)


def _tiny(extra):
    from tests.conftest import TINY

    return TINY + extra


def test_missing_checkpoint_is_a_clear_error(train_cfg, tmp_path):
    cfg = train_cfg(f"ckpt_path={tmp_path / 'nope.ckpt'}")
    with pytest.raises(FileNotFoundError, match="nope.ckpt does not exist"):
        train(cfg)


def test_not_a_checkpoint_is_a_clear_error(train_cfg, tmp_path):
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(b"this is not a checkpoint")
    with pytest.raises(ValueError, match="bad.ckpt is not a readable checkpoint"):
        train(train_cfg(f"ckpt_path={bad}"))
    ecfg = compose_config("evaluate", [f"ckpt_path={bad}"], tmp_path / "eval")
    with pytest.raises(ValueError, match="not a readable checkpoint"):
        evaluate(ecfg)


def test_incompatible_model_config(tmp_path):
    cfg = compose_config("train", _tiny(["callbacks.forecast_plots=null"]), tmp_path / "a")
    train(cfg)
    last = Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt"
    other = compose_config("train", _tiny([f"ckpt_path={last}", "model.net.hidden_channels=[8,16]"]),
                           tmp_path / "b")
    with pytest.raises(ValueError, match=r"does not fit the configured model:\n  shape mismatches"):
        train(other)
    assert last.is_file()  # nothing lost


def test_nan_loss_stops_with_step_and_keeps_checkpoint(tmp_path):
    cfg = compose_config("train", _tiny(["callbacks.forecast_plots=null", "trainer.max_epochs=1"]),
                         tmp_path / "ok")
    train(cfg)
    last = Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt"
    before = last.read_bytes()
    # A second run into the same folder with an absurd learning rate and no clipping
    # blows the weights up within a few steps. The frame-drawing head with an identity
    # output can: the default motion head's output, a moved input frame, stays finite.
    bad = compose_config("train", _tiny(["callbacks.forecast_plots=null", "trainer.max_epochs=3",
                                         "model/net=encoder_forecaster", "model.optimizer.lr=1e30",
                                         "trainer.gradient_clip_val=null",
                                         "model.net.output_activation=identity"]), tmp_path / "ok")
    with open_dict(bad):
        bad.paths.output_dir = cfg.paths.output_dir
    with pytest.raises(FloatingPointError, match=r"non-finite training loss .* at global step \d+"):
        train(bad)
    assert last.read_bytes() == before


def _cli(*args, cwd=ROOT):
    return subprocess.run([sys.executable, "train.py", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=300)


def test_unknown_key_and_option_errors_from_hydra():
    out = _cli("data.not_a_key=1", "hydra.run.dir=/tmp/nowcast_cli_test")
    assert out.returncode != 0
    assert "not_a_key" in out.stderr
    out = _cli("data=not_a_dataset", "hydra.run.dir=/tmp/nowcast_cli_test")
    assert out.returncode != 0
    assert "Could not find 'data/not_a_dataset'" in out.stderr
    assert "moving_mnist" in out.stderr  # the valid choices are listed


def test_convlstm_net_trains_with_scheduled_sampling(tmp_path):
    # 32 sequences in batches of 8: 4 steps; p falls from 1 to 0 over the first half
    cfg = compose_config(
        "train",
        TINY + ["model=convlstm", "model.net.kernel_size=3", "model.teacher_forcing=0.5", "logger=csv"],
        tmp_path,
    )
    metrics = train(cfg)
    assert math.isfinite(metrics["val/mse"])
    import pandas as pd

    (csv,) = tmp_path.rglob("metrics.csv")
    logged = pd.read_csv(csv)[["step", "train/teacher_forcing"]].dropna()
    assert logged["train/teacher_forcing"].tolist() == [1.0, 0.5, 0.0, 0.0]


def test_teacher_forcing_needs_a_network_that_reads_its_forecasts(tmp_path):
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate

    cfg = compose_config("train", TINY + ["model.teacher_forcing=0.5"], tmp_path)
    with pytest.raises(InstantiationException, match="EncoderForecaster does not"):
        instantiate(cfg.model)


def test_last_checkpoint_follows_the_run_when_the_score_stops_improving(tmp_path):
    # mode=min on the epoch number: the best checkpoint stays at epoch 0, as when the
    # validation score gets worse; last.ckpt must still hold the final epoch (resume).
    cfg = compose_config("train", _tiny(["callbacks.forecast_plots=null", "trainer.max_epochs=3",
                                         "callbacks.model_checkpoint.monitor=epoch"]), tmp_path)
    train(cfg)
    ckpts = Path(cfg.paths.output_dir) / "checkpoints"
    assert torch.load(ckpts / "best.ckpt", weights_only=True)["epoch"] == 0
    last = torch.load(ckpts / "last.ckpt", weights_only=True)
    assert last["epoch"] == 2
    assert sorted(p.name for p in ckpts.iterdir()) == ["best.ckpt", "last.ckpt"]
