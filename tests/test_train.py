"""End-to-end runs of the real configs: train, evaluate, resume, bad input."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf, open_dict

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


# ------------------------------------------------------------------ issue 17: runs
def test_two_runs_started_together_get_their_own_folders(tmp_path):
    """Two `python train.py` started in the same second (a small sweep from a script):
    one folder each, each with its own config, checkpoint and metrics."""
    env = {k: v for k, v in os.environ.items() if k not in ("SLURM_JOB_ID", "NOWCAST_RUN_ID")}
    args = [*TINY, "callbacks.forecast_plots=null", "data.train_size=16", "data.val_size=8",
            "data.test_size=8", f"paths.log_dir={tmp_path / 'logs'}", f"paths.data_dir={tmp_path / 'data'}"]
    procs = [subprocess.Popen([sys.executable, "train.py", *args, f"seed={seed}"], cwd=ROOT, env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
             for seed in (1, 2)]
    for p in procs:
        _, err = p.communicate(timeout=600)
        assert p.returncode == 0, err[-3000:]
    runs = sorted((tmp_path / "logs" / "train" / "runs").iterdir())
    assert len(runs) == 2, runs
    seeds = set()
    for run in runs:
        seed = OmegaConf.load(run / ".hydra" / "config.yaml").seed
        stored = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["nowcast_config"]
        assert stored["seed"] == seed  # the checkpoint belongs to the run whose config is here
        assert (run / "csv" / "metrics.csv").is_file()
        assert (run / "train.log").read_text().count("Seed set to") <= 1
        seeds.add(seed)
    assert seeds == {1, 2}


def test_run_folders_differ_within_a_second(tmp_path):
    first = compose_config("train", [], tmp_path).hydra.run.dir
    second = compose_config("train", [], tmp_path).hydra.run.dir
    assert first != second  # same second, different random suffix


def test_resume_continues_the_stored_run_in_its_folder(tmp_path):
    """Train 1 epoch with non-default overrides; `ckpt_path=<run>/checkpoints/last.ckpt
    trainer.max_epochs=2` alone continues the same network, in the same folder, with one
    metrics file."""
    first = compose_config("train", TINY + ["callbacks.forecast_plots=null", "model.net.hidden_channels=[4,8]",
                                            "model.optimizer.lr=3e-3", "test=false"], tmp_path)
    train(first)
    run = Path(first.paths.output_dir)
    (run / ".hydra").mkdir()
    OmegaConf.save(first, run / ".hydra" / "config.yaml")  # as @hydra.main writes it
    last = run / "checkpoints" / "last.ckpt"
    resumed = compose_config("train", [f"ckpt_path={last}", "trainer.max_epochs=2"], tmp_path / "elsewhere")
    assert resumed.hydra.run.dir == str(run.resolve())  # the run folder the CLI would use
    with open_dict(resumed):
        resumed.paths.output_dir = str(run)
    metrics = train(resumed)
    assert math.isfinite(metrics["val/mse"])
    ckpt = torch.load(last, weights_only=True)
    assert ckpt["epoch"] == 1
    stored = ckpt["nowcast_config"]
    assert stored["model"]["net"]["hidden_channels"] == [4, 8]
    assert stored["model"]["optimizer"]["lr"] == 3e-3 and stored["data"]["train_size"] == 32
    assert stored["trainer"]["max_epochs"] == 2
    import pandas as pd

    (csv,) = run.rglob("metrics.csv")
    epochs = pd.read_csv(csv)["epoch"].dropna().astype(int)
    assert sorted(set(epochs)) == [0, 1]  # both parts of the run in one file
    assert not (tmp_path / "elsewhere" / "run").exists()


def test_resume_refuses_overrides_it_cannot_apply(tmp_path):
    cfg = compose_config("train", TINY + ["callbacks.forecast_plots=null"], tmp_path)
    train(cfg)
    last = Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt"
    from nowcast.train import resumed_config

    other = compose_config("train", [f"ckpt_path={last}", "+extra.key=1", "~callbacks.progress_bar"],
                           tmp_path / "b")
    out = resumed_config(other, last)
    assert out.extra.key == 1 and "progress_bar" not in out.callbacks
    assert out.data.train_size == 32  # the stored value, not the composed default (1024)
    other = compose_config("train", [f"ckpt_path={last}", "experiment=mmnist_shi2015"], tmp_path / "b")
    with pytest.raises(ValueError, match="cannot apply the override 'experiment=mmnist_shi2015' when "
                                         "resuming"):
        resumed_config(other, last)
    with pytest.raises(ValueError, match="give resume=.* or ckpt_path=.*, not both"):
        train(compose_config("train", [f"ckpt_path={last}", f"resume={tmp_path}"], tmp_path / "c"))


def test_no_validation_set_is_a_warning_that_says_what_it_disables(train_cfg, caplog):
    import logging

    with caplog.at_level(logging.WARNING, logger="nowcast.train"):
        metrics = train(train_cfg("data.val_size=0", "callbacks.forecast_plots=null"))
    assert "val/mse" not in metrics
    (message,) = [r.getMessage() for r in caplog.records if "WITHOUT validation" in r.getMessage()]
    for what in ("data.val_size=0", "best checkpoint", "early stopping", "sweep metric"):
        assert what in message, what


def test_archives_with_validation_periods_are_not_warned_about(tmp_path, caplog):
    import logging

    from nowcast.train import warn_without_validation

    # data=radar_multi: data.val_period is null, the archives bring their own
    cfg = compose_config("train", ["experiment=radar_multi"], tmp_path / "a")
    with caplog.at_level(logging.WARNING, logger="nowcast.train"):
        assert not warn_without_validation(cfg)
        # one archive (data.path) with no validation period of its own is warned about
        one = compose_config("train", ["experiment=radar_multi", "data.path=/some/archive"], tmp_path / "b")
        assert warn_without_validation(one)
        # and so are archives none of which validates
        none = compose_config("train", ["experiment=radar_multi", "data.archives.0.val_period=null",
                                        "data.archives.1.val_period=null"], tmp_path / "c")
        assert warn_without_validation(none)
    assert sum("WITHOUT validation" in r.getMessage() for r in caplog.records) == 2


def test_wandb_without_key_fails_fast_naming_offline_mode(train_cfg, tmp_path, monkeypatch):
    for key in ("WANDB_API_KEY", "WANDB_MODE", "WANDB_BASE_URL"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    import nowcast.train as nt

    built = []
    monkeypatch.setattr(nt, "instantiate", lambda *a, **k: built.append(a) or pytest.fail("set-up ran"))
    with pytest.raises(RuntimeError, match=r"no API key.*WANDB_MODE=offline"):
        train(train_cfg("logger=wandb"))
    assert built == []  # stopped before data and model set-up
    (tmp_path / "netrc").write_text("machine api.wandb.ai login user password abc123\n")
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    assert nt.wandb_api_key_available()
    nt.check_wandb(train_cfg("logger=wandb").logger)  # a key: fine
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    monkeypatch.setenv("WANDB_MODE", "offline")
    nt.check_wandb(train_cfg("logger=wandb").logger)  # offline: fine


def test_resume_keeps_the_original_hydra_config(tmp_path):
    run = tmp_path / "logs" / "train" / "runs" / "old"
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra" / "config.yaml").write_text("seed: 1\n")
    (run / "checkpoints").mkdir()
    cfg = compose_config("train", [f"ckpt_path={run / 'checkpoints' / 'last.ckpt'}"], tmp_path)
    assert cfg.hydra.run.dir == str(run.resolve())
    assert cfg.hydra.output_subdir.startswith(".hydra/resume_")
    assert compose_config("train", [], tmp_path).hydra.output_subdir == ".hydra"
