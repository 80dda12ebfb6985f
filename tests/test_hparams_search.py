"""hparams_search=mmnist_optuna: the Optuna sweeper runs trials of the real train.py and
minimises the metric train.py returns (``optimized_metric``)."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
import yaml

from tests.conftest import ROOT, TINY, compose_config

pytest.importorskip("hydra_plugins.hydra_optuna_sweeper", reason='needs pip install -e ".[optuna]"')


def test_search_space_is_the_default_models(tmp_path):
    cfg = compose_config("train", ["hparams_search=mmnist_optuna"], tmp_path)
    params = cfg.hydra.sweeper.params
    assert set(params) == {"model.optimizer.lr", "model.net.hidden_channels", "model.net.kernel_size"}
    assert cfg.optimized_metric == "val/mse" and cfg.hydra.sweeper.direction == "minimize"
    assert cfg.hydra.mode.name == "MULTIRUN"


@pytest.mark.slow
def test_two_trials_of_a_tiny_search(tmp_path):
    tiny = [o for o in TINY if not o.startswith("model.net.hidden_channels")]
    out = subprocess.run(
        [sys.executable, "train.py", "hparams_search=mmnist_optuna", *tiny,
         "hydra.sweeper.n_trials=2", "hydra.sweeper.sampler.n_startup_trials=2",
         "model.net.hidden_channels=choice([4,4],[8,8])", "callbacks.forecast_plots=null",
         f"paths.log_dir={tmp_path}", f"paths.data_dir={tmp_path}/data"],
        cwd=ROOT, capture_output=True, text=True, timeout=600, stdin=subprocess.DEVNULL,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    (sweep,) = (tmp_path / "train" / "multiruns").iterdir()
    assert sorted(p.name for p in sweep.iterdir() if p.is_dir()) == ["0", "1"]
    result = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert result["name"] == "optuna"
    best = result["best_params"]
    assert set(best) == {"model.optimizer.lr", "model.net.hidden_channels", "model.net.kernel_size"}
    assert 0.0005 <= best["model.optimizer.lr"] <= 0.02 and best["model.net.kernel_size"] in (3, 5)
    assert math.isfinite(result["best_value"]) and result["best_value"] > 0
    # each trial ran with the overrides the sampler chose, and its value is its val/mse
    for trial in ("0", "1"):
        overrides = yaml.safe_load((sweep / trial / ".hydra" / "overrides.yaml").read_text())
        assert any(o.startswith("model.optimizer.lr=") for o in overrides)
