"""The time budget: BudgetCosineLR against torch's cosine schedule and a controlled clock,
max_time parsing, and a run that stops on its budget with the schedule complete."""

from __future__ import annotations

import math
from datetime import timedelta
from pathlib import Path

import pandas as pd
import pytest
import torch

from nowcast import timing
from nowcast.timing import BudgetCosineLR, duration_seconds
from nowcast.train import train
from tests.conftest import TINY, compose_config


class FakeClock:
    """Stands in for ``time.monotonic`` in ``nowcast.timing``: seconds set by the test."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch):
    fake = FakeClock()
    monkeypatch.setattr(timing.time, "monotonic", fake)
    return fake


def _optimizer(lr: float = 0.1) -> torch.optim.Optimizer:
    return torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)


def _lrs(scheduler, steps: int) -> list[float]:
    out = []
    for _ in range(steps):
        out.append(scheduler.optimizer.param_groups[0]["lr"])
        scheduler.optimizer.step()
        scheduler.step()
    return out


def test_without_budget_it_is_torch_cosine_annealing():
    ours = BudgetCosineLR(_optimizer(), T_max=7, eta_min=0.01)
    ref = torch.optim.lr_scheduler.CosineAnnealingLR(_optimizer(), T_max=7, eta_min=0.01)
    assert _lrs(ours, 8) == pytest.approx(_lrs(ref, 8), rel=1e-12, abs=1e-15)


def test_the_clock_ends_the_schedule_when_it_runs_out_first(clock):
    sched = BudgetCosineLR(_optimizer(0.1), T_max=1000, max_time="00:00:01:40")  # 100 s
    clock.now += 25.0  # a quarter of the budget, after one step (0.1% of the steps)
    sched.step()
    assert sched.get_last_lr()[0] == pytest.approx(0.1 * (1 + math.cos(math.pi / 4)) / 2)
    clock.now += 75.0
    sched.step()
    assert sched.get_last_lr()[0] == pytest.approx(0.0, abs=1e-12)
    clock.now += 50.0  # past the budget: stays at eta_min
    sched.step()
    assert sched.get_last_lr()[0] == pytest.approx(0.0, abs=1e-12)


def test_the_steps_end_the_schedule_when_they_run_out_first(clock):
    sched = BudgetCosineLR(_optimizer(0.1), T_max=4, max_time={"hours": 1})
    clock.now += 1.0
    lrs = _lrs(sched, 5)
    expected = [0.1 * (1 + math.cos(math.pi * k / 4)) / 2 for k in range(5)]
    assert lrs == pytest.approx(expected)


def test_warmup_then_cosine():
    sched = BudgetCosineLR(_optimizer(0.1), T_max=10, warmup_steps=4)
    lrs = _lrs(sched, 6)
    cosine = [0.1 * (1 + math.cos(math.pi * k / 10)) / 2 for k in range(6)]
    warm = [1 / 4, 2 / 4, 3 / 4, 1, 1, 1]
    assert lrs == pytest.approx([w * c for w, c in zip(warm, cosine)])


def test_resume_continues_the_clock(clock):
    sched = BudgetCosineLR(_optimizer(0.1), T_max=1000, max_time=100)
    clock.now += 40.0
    sched.step()
    state = sched.state_dict()
    assert state["_offset_s"] == pytest.approx(40.0) and "_start" not in state
    clock.now += 500.0  # time between the runs does not count
    resumed = BudgetCosineLR(_optimizer(0.1), T_max=1000, max_time=100)
    resumed.load_state_dict(state)
    assert resumed.elapsed_s() == pytest.approx(40.0)
    clock.now += 10.0
    resumed.step()
    assert resumed.get_last_lr()[0] == pytest.approx(0.1 * (1 + math.cos(math.pi * 0.5)) / 2)


@pytest.mark.parametrize(
    "value, seconds",
    [("00:00:08:00", 480.0), ("1:02:03:04", 93784.0), ({"minutes": 2}, 120.0),
     (timedelta(seconds=5), 5.0), (30, 30.0), (None, None)],
)
def test_duration_seconds(value, seconds):
    assert duration_seconds(value) == seconds


def test_bad_budgets_are_clear_errors():
    with pytest.raises(ValueError, match="max_time='8 minutes' is not a duration; expected 'DD:HH:MM:SS'"):
        duration_seconds("8 minutes")
    with pytest.raises(ValueError, match="max_time must be positive"):
        BudgetCosineLR(_optimizer(), T_max=3, max_time=0)
    with pytest.raises(ValueError, match="T_max must be >= 1"):
        BudgetCosineLR(_optimizer(), T_max=0)


def test_run_stops_on_its_time_budget_with_the_schedule_complete(tmp_path):
    """``trainer.max_time`` (declared, no ``+``) stops a run planned for 1000 epochs; the
    learning rate has reached its end, and every validation logged its elapsed time."""
    cfg = compose_config("train", TINY + [
        "trainer.max_epochs=1000", "trainer.max_time=00:00:00:08", "callbacks.forecast_plots=null",
        "logger=csv", "callbacks.learning_rate_monitor.logging_interval=step",
    ], tmp_path)
    train(cfg)
    last = torch.load(Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt", weights_only=True)
    assert 1 <= last["epoch"] < 999
    (csv,) = tmp_path.rglob("metrics.csv")
    logged = pd.read_csv(csv)
    elapsed = logged["val/elapsed_s"].dropna().to_numpy()
    assert len(elapsed) >= 1 and (elapsed > 0).all() and (elapsed[1:] > elapsed[:-1]).all()
    assert elapsed[-1] < 8.0 + 5.0  # validations inside the budget (plus one epoch at most)
    lr = logged["lr-AdamW"].dropna().to_numpy()
    assert lr[0] > 0.5 * cfg.model.optimizer.lr and lr[-1] < 0.2 * cfg.model.optimizer.lr
