"""Training against the clock: a learning-rate schedule that fits a time budget, and the
elapsed time logged with every validation (time-to-quality curves).

On a CPU the number of steps a run can afford depends on the machine: the same default
run does 4-5x more steps on a 2-core AVX-512 machine than on a 2-core AVX2 one. With
``trainer.max_time`` as the budget, :class:`BudgetCosineLR` decays the learning rate over
whichever runs out first, the epochs or the time, so that a slow machine trains fewer
steps with a complete schedule instead of running long or stopping at a high learning
rate. :class:`ElapsedTime` logs ``val/elapsed_s`` next to the validation scores.
"""

from __future__ import annotations

import math
import re
import time
from datetime import timedelta
from typing import Any

import lightning as L
import torch
from torch.optim.lr_scheduler import LRScheduler


def duration_seconds(duration: str | float | dict | timedelta | None) -> float | None:
    """Seconds in a Lightning ``max_time``: ``"DD:HH:MM:SS"``, a dict of ``timedelta``
    arguments (``{minutes: 8}``), a ``timedelta``, a number of seconds or ``None``."""
    if duration is None:
        return None
    if isinstance(duration, timedelta):
        return duration.total_seconds()
    if isinstance(duration, (int, float)):
        return float(duration)
    if isinstance(duration, str):
        match = re.fullmatch(r"(\d+):(\d\d):(\d\d):(\d\d)", duration.strip())
        if not match:
            raise ValueError(f"max_time={duration!r} is not a duration; expected 'DD:HH:MM:SS'")
        d, h, m, s = (int(g) for g in match.groups())
        return float(((d * 24 + h) * 60 + m) * 60 + s)
    if isinstance(duration, dict) or hasattr(duration, "items"):
        return timedelta(**dict(duration)).total_seconds()
    raise ValueError(f"max_time={duration!r} is not a duration; expected 'DD:HH:MM:SS'")


class BudgetCosineLR(LRScheduler):
    """Cosine decay over ``T_max`` scheduler steps or ``max_time`` seconds, whichever
    comes first, after an optional linear warm-up.

    Progress is ``p = max(steps / T_max, elapsed / max_time)`` and the learning rate
    ``eta_min + (base_lr - eta_min) * (1 + cos(pi * p)) / 2``, multiplied by
    ``min(1, (steps + 1) / warmup_steps)`` during warm-up. With ``max_time=None``, or
    when the steps run out first (a fast machine, or a short test run), it is
    ``torch.optim.lr_scheduler.CosineAnnealingLR`` in closed form: deterministic.

    Parameters
    ----------
    optimizer
        The optimizer.
    T_max
        Scheduler steps (epochs with ``scheduler_interval: epoch``) of the full schedule,
        e.g. ``trainer.max_epochs``.
    max_time
        The time budget (``trainer.max_time``: ``"DD:HH:MM:SS"``, a dict, seconds or
        ``None``). The clock starts when the scheduler is built (just before training)
        and is saved in the state dict, so a resumed run continues where it stopped, as
        Lightning's own timer does.
    eta_min
        Final learning rate.
    warmup_steps
        Scheduler steps of linear warm-up from ``base_lr / warmup_steps`` (0: none).
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        T_max: int,
        max_time: str | float | dict | timedelta | None = None,
        eta_min: float = 0.0,
        warmup_steps: int = 0,
        last_epoch: int = -1,
    ) -> None:
        if T_max < 1:
            raise ValueError(f"T_max must be >= 1, got {T_max}")
        self.T_max = int(T_max)
        self.budget_s = duration_seconds(max_time)
        if self.budget_s is not None and self.budget_s <= 0:
            raise ValueError(f"max_time must be positive, got {max_time!r}")
        self.eta_min = float(eta_min)
        self.warmup_steps = int(warmup_steps)
        self._offset_s = 0.0
        self._start = time.monotonic()
        super().__init__(optimizer, last_epoch)

    def elapsed_s(self) -> float:
        """Seconds of training so far (including those before a resume)."""
        return self._offset_s + time.monotonic() - self._start

    def progress(self) -> float:
        """Fraction of the schedule done, in ``[0, 1]``."""
        p = self.last_epoch / self.T_max
        if self.budget_s is not None:
            p = max(p, self.elapsed_s() / self.budget_s)
        return min(max(p, 0.0), 1.0)

    def get_lr(self) -> list[float]:
        factor = (1.0 + math.cos(math.pi * self.progress())) / 2.0
        warm = min(1.0, (self.last_epoch + 1) / self.warmup_steps) if self.warmup_steps else 1.0
        return [warm * (self.eta_min + (base - self.eta_min) * factor) for base in self.base_lrs]

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state.pop("_start", None)  # a monotonic-clock reading means nothing in another process
        state["_offset_s"] = self.elapsed_s()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self._start = time.monotonic()


class ElapsedTime(L.Callback):
    """Log ``val/elapsed_s``, seconds since fit started, with every validation.

    Plotted against ``val/mse`` or ``val/ssim`` (the CSV logger's ``metrics.csv``) it
    gives the time-to-quality curve of a run. The time includes validation, checkpoints
    and plots, as ``trainer.max_time`` does, and continues across a resume.
    """

    def __init__(self) -> None:
        self._offset_s = 0.0
        self._start: float | None = None

    def elapsed_s(self) -> float:
        return self._offset_s + (time.monotonic() - self._start if self._start is not None else 0.0)

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start = time.monotonic()

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or self._start is None:
            return
        pl_module.log("val/elapsed_s", self.elapsed_s(), on_epoch=True)

    def state_dict(self) -> dict[str, Any]:
        return {"elapsed_s": self.elapsed_s()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._offset_s = float(state_dict.get("elapsed_s", 0.0))
