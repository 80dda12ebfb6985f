"""The LightningModule: loss, train/val/test steps, scores, optimizer wiring.

Input ``(B, T_in, C, H, W)`` -> forecast ``(B, T_out, C, H, W)``, both in the network's
space (see ``docs/data_contract.md``). Losses work in that space; every score is computed
on ``transform.decode(...)`` in physical units.

Log namespace: ``train/loss``, ``val/loss``, ``val/mse``, ``val/mse/lead01``,
``val/csi_1mmh``, ``val/persistence/mse``, ``test/...``. The checkpoint monitor and
sweeps use these exact strings.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable, Sequence
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn

from nowcast.baselines import persistence
from nowcast.data.transforms import Identity, Transform
from nowcast.metrics import (
    CategoricalScores,
    ContinuousScores,
    FractionsSkillScore,
    ImageScores,
    flatten_scores,
)
from nowcast.nn.cpu import emulated_bf16_warning

log = logging.getLogger(__name__)

STAGES = ("val", "test")


class NowcastModule(L.LightningModule):
    """Train and verify a nowcasting network.

    Parameters
    ----------
    net
        Maps ``(B, T_in, C, H, W)`` to ``(B, T_out, C, H, W)``; must expose
        ``output_steps``.
    loss
        ``loss(pred, target, mask) -> scalar`` (see :mod:`nowcast.losses`).
    optimizer
        Partial optimizer: ``optimizer(params) -> torch.optim.Optimizer`` (Hydra
        ``_partial_: true``).
    scheduler
        Optional partial LR scheduler: ``scheduler(optimizer)``; stepped every
        ``scheduler_interval`` (``"epoch"`` or ``"step"``).
    transform
        The data's value transform; scores are computed on ``transform.decode``.
    thresholds
        Event thresholds in physical units for CSI/POD/FAR/HSS/ETS (empty: none).
    fss_thresholds, fss_scales
        FSS thresholds (physical units) and window sizes in pixels (empty: none).
    units_suffix
        Suffix of threshold score names (``csi_1mmh``); ``""`` for unitless data.
    image_scores
        Also compute SSIM and PSNR (images in ``[0, data_range]``).
    data_range
        Value range for SSIM/PSNR.
    lead_times
        Names of the lead times for per-lead logging (``["10min", ...]``); default
        ``lead01, lead02, ...``.
    persistence_baseline
        Score the persistence forecast on the same validation/test windows, logged as
        ``val/persistence/...``: the first number to beat.
    """

    def __init__(
        self,
        net: nn.Module,
        loss: nn.Module,
        optimizer: Callable[..., torch.optim.Optimizer],
        scheduler: Callable[..., Any] | None = None,
        scheduler_interval: str = "epoch",
        transform: Transform | None = None,
        thresholds: Sequence[float] = (),
        fss_thresholds: Sequence[float] = (),
        fss_scales: Sequence[int] = (),
        units_suffix: str = "mmh",
        image_scores: bool = True,
        data_range: float = 1.0,
        lead_times: Sequence[str] | None = None,
        persistence_baseline: bool = True,
        teacher_forcing: float = 0.0,
    ) -> None:
        super().__init__()
        if not 0.0 <= teacher_forcing <= 1.0:
            raise ValueError(f"teacher_forcing must be a fraction of training in [0, 1], got {teacher_forcing}")
        if teacher_forcing and "targets" not in inspect.signature(net.forward).parameters:
            raise ValueError(
                f"teacher_forcing={teacher_forcing} needs a network that reads its own forecasts "
                f"(e.g. nowcast.models.ConvLSTMNet); {type(net).__name__} does not"
            )
        self.teacher_forcing = teacher_forcing
        if scheduler_interval not in ("epoch", "step"):
            raise ValueError(f"scheduler_interval must be 'epoch' or 'step', got {scheduler_interval!r}")
        self.net = net
        self.loss = loss
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.scheduler_interval = scheduler_interval
        self.transform = transform or Identity()
        self.num_leads = int(net.output_steps)
        self.lead_times = list(lead_times) if lead_times else None
        self.persistence_baseline = persistence_baseline
        score_kwargs = dict(
            thresholds=list(thresholds),
            fss_thresholds=list(fss_thresholds),
            fss_scales=list(fss_scales),
            units_suffix=units_suffix,
            image_scores=image_scores,
            data_range=data_range,
        )
        self.score_kwargs = score_kwargs
        self.scores = nn.ModuleDict({stage: self.make_scores(**score_kwargs) for stage in STAGES})
        if persistence_baseline:
            self.baseline_scores = nn.ModuleDict(
                {stage: self.make_scores(**score_kwargs) for stage in STAGES}
            )
        #: The composed run config, stored in every checkpoint (set by ``nowcast.train``).
        self.run_config: dict | None = None

    def make_scores(
        self,
        thresholds: Sequence[float],
        fss_thresholds: Sequence[float],
        fss_scales: Sequence[int],
        units_suffix: str,
        image_scores: bool,
        data_range: float,
    ) -> nn.ModuleDict:
        """A fresh set of streaming scores for ``num_leads`` lead times."""
        scores = nn.ModuleDict({"continuous": ContinuousScores(self.num_leads)})
        if image_scores:
            scores["image"] = ImageScores(self.num_leads, data_range=data_range)
        if thresholds:
            scores["categorical"] = CategoricalScores(thresholds, self.num_leads, units_suffix=units_suffix)
        if fss_thresholds and fss_scales:
            scores["fss"] = FractionsSkillScore(
                fss_thresholds, fss_scales, self.num_leads, units_suffix=units_suffix
            )
        return scores

    def setup(self, stage: str) -> None:
        # Name lead times as the data does ("10min", ...) unless the config says otherwise.
        if self.lead_times is None and self.trainer is not None:
            names = getattr(self.trainer.datamodule, "lead_times", None)
            if names is not None and len(names) == self.num_leads:
                self.lead_times = list(names)

    def on_fit_start(self) -> None:
        if self.device.type == "cpu":
            warning = emulated_bf16_warning(getattr(self.trainer, "precision", None))
            if warning:
                log.warning(warning)
                rank_zero_warn(warning)

    def forward(self, x: Tensor) -> Tensor:
        """``(B, T_in, C, H, W)`` -> ``(B, T_out, C, H, W)``, network space."""
        return self.net(x)

    # -- steps -------------------------------------------------------------------------
    def teacher_forcing_probability(self) -> float:
        """Scheduled sampling: the chance of feeding the true previous frame, decaying
        linearly from 1 to 0 over the first ``teacher_forcing`` fraction of training."""
        if not self.teacher_forcing:
            return 0.0
        total = self.trainer.estimated_stepping_batches if self._trainer is not None else 1
        return max(0.0, 1.0 - self.global_step / (self.teacher_forcing * max(total, 1)))

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        p = self.teacher_forcing_probability()
        if self.teacher_forcing:
            self.log("train/teacher_forcing", p, on_step=True, on_epoch=False)
        if p > 0:
            pred = self.net(batch["inputs"], targets=batch["targets"], teacher_forcing=p)
        else:
            pred = self(batch["inputs"])
        loss = self.loss(pred, batch["targets"], batch.get("mask"))
        if not torch.isfinite(loss):
            # Stop before the optimizer writes NaNs into the weights; checkpoints
            # already on disk stay as they are.
            raise FloatingPointError(
                f"non-finite training loss {loss.item()} at global step {self.global_step} "
                f"(epoch {self.current_epoch}, batch {batch_idx}); stopping. Lower the learning "
                "rate, enable gradient clipping (trainer.gradient_clip_val=1.0) or check the data"
            )
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=True,
                 batch_size=pred.shape[0])
        return loss

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self._eval_step(batch, "val")

    def test_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self._eval_step(batch, "test")

    def _eval_step(self, batch: dict[str, Tensor], stage: str) -> None:
        pred = self(batch["inputs"])
        mask = batch.get("mask")
        loss = self.loss(pred, batch["targets"], mask)
        self.log(f"{stage}/loss", loss, prog_bar=stage == "val", on_epoch=True, sync_dist=True,
                 batch_size=pred.shape[0])
        target = self.transform.decode(batch["targets"].float())
        forecast = self.transform.decode(pred.float())
        update_scores(self.scores[stage], forecast, target, mask)
        if self.persistence_baseline:
            last = self.transform.decode(batch["inputs"][:, -1:].float())  # (B, 1, C, H, W): all persistence needs
            update_scores(self.baseline_scores[stage], persistence(last, self.num_leads), target, mask)

    def on_validation_epoch_end(self) -> None:
        self._log_scores("val")

    def on_test_epoch_end(self) -> None:
        self._log_scores("test")

    def _log_scores(self, stage: str) -> None:
        flat = compute_scores(self.scores[stage], stage, self.lead_times)
        if self.persistence_baseline:
            flat.update(compute_scores(self.baseline_scores[stage], f"{stage}/persistence", self.lead_times))
        # compute() already reduced the sums across ranks: no sync_dist here.
        shown = (f"{stage}/mse", f"{stage}/persistence/mse")
        self.log_dict({k: v for k, v in flat.items() if k in shown}, prog_bar=True)
        self.log_dict({k: v for k, v in flat.items() if k not in shown}, prog_bar=False)

    # -- optimisation ------------------------------------------------------------------
    def configure_optimizers(self):
        optimizer = self.optimizer_factory(params=self.parameters())
        if self.scheduler_factory is None:
            return optimizer
        scheduler = self.scheduler_factory(optimizer=optimizer)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": self.scheduler_interval,
                             "monitor": "val/loss"},
        }

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # Plain containers only, so that evaluate.py can load with weights_only=True.
        if self.run_config is not None:
            checkpoint["nowcast_config"] = self.run_config


def update_scores(scores: nn.ModuleDict, forecast: Tensor, target: Tensor, mask: Tensor | None) -> None:
    """Feed one batch (physical units, ``(B, T, C, H, W)``) to every score."""
    for metric in scores.values():
        metric.update(forecast, target, mask)


def compute_scores(scores: nn.ModuleDict, prefix: str, lead_times: Sequence[str] | None) -> dict[str, float]:
    """Compute, flatten to ``{prefix}/{name}[/{lead}]`` and reset a set of scores."""
    flat: dict[str, float] = {}
    for metric in scores.values():
        flat.update(flatten_scores(prefix, metric.compute(), lead_times))
        metric.reset()
    return flat
