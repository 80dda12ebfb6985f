"""Training throughput in sequences per second, as one number at the end of a run.

Lightning's own ``ThroughputMonitor`` logs a rolling window to the loggers but leaves no
whole-run figure in the log; this callback does: the mean over every training batch after
a warm-up (kernel selection, cuDNN autotuning, allocator growth), with validation (and
what runs inside it, e.g. forecast plots) left out of the clock.
Add it to a run with::

    python train.py ... '+callbacks.throughput={_target_: nowcast.throughput.SequenceThroughput}'
"""

from __future__ import annotations

import logging
import time
from typing import Any

import lightning as L
import torch

log = logging.getLogger(__name__)


class SequenceThroughput(L.Callback):
    """Log training sequences per second (all ranks together) when training ends.

    Time is wall-clock between points where the device has finished its queued work
    (``torch.cuda.synchronize`` on a GPU), so asynchronous kernels are counted.

    Parameters
    ----------
    warmup_batches
        Training batches (per rank) left out at the start.

    Attributes
    ----------
    sequences_per_s
        The result, ``None`` until a run measured at least one batch after the warm-up.
    """

    def __init__(self, warmup_batches: int = 10) -> None:
        if warmup_batches < 1:
            raise ValueError(f"warmup_batches must be >= 1, got {warmup_batches}")
        self.warmup_batches = warmup_batches
        self.sequences_per_s: float | None = None
        self._batches = 0
        self._sequences = 0
        self._start: float | None = None
        self._paused = 0.0  # seconds spent in validation since the clock started
        self._val_start: float | None = None

    @staticmethod
    def _now(pl_module: L.LightningModule) -> float:
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)
        return time.perf_counter()

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._batches += 1
        if self._batches == self.warmup_batches:
            self._start = self._now(pl_module)
        elif self._start is not None:
            inputs = batch["inputs"]  # (B, T_in, C, H, W) per rank
            self._sequences += inputs.shape[0] * trainer.world_size

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._start is not None and trainer.state.fn == "fit":
            self._val_start = self._now(pl_module)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._val_start is not None:
            self._paused += self._now(pl_module) - self._val_start
            self._val_start = None

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._start is None or self._sequences == 0:
            log.warning(
                "throughput: not measured, %d training batches ran (warm-up %d)",
                self._batches, self.warmup_batches,
            )
            return
        seconds = self._now(pl_module) - self._start - self._paused
        self.sequences_per_s = self._sequences / seconds
        log.info(
            "throughput: %.2f training sequences/s (%d sequences in %.2f s of training, "
            "after %d warm-up batches; %.1f s of validation left out; %s, precision %s)",
            self.sequences_per_s, self._sequences, seconds, self.warmup_batches,
            self._paused, pl_module.device, trainer.precision,
        )
        for logger in trainer.loggers:
            logger.log_metrics({"train/sequences_per_s": self.sequences_per_s}, step=trainer.global_step)
