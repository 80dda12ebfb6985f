"""Lightning callbacks: forecast panels of fixed validation samples."""

from __future__ import annotations

import logging
from pathlib import Path

import lightning as L
import matplotlib.pyplot as plt
import torch
from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger
from lightning.pytorch.utilities import rank_zero_only

from nowcast.io_utils import save_figure
from nowcast.plots import forecast_panel

log = logging.getLogger(__name__)


class ForecastPlotCallback(L.Callback):
    """Draw input / truth / forecast panels of the same validation samples every epoch.

    The PNGs go to ``dirpath/epoch_XXX_sampleN.png`` and, as images, to the TensorBoard or W&B
    logger when one is active. Runs on rank 0 only.

    Parameters
    ----------
    dirpath
        Folder for the PNG files.
    num_samples
        How many samples of the first validation batch to draw (fixed across epochs).
    every_n_epochs
        Draw every n-th validation epoch.
    """

    def __init__(self, dirpath: str, num_samples: int = 3, every_n_epochs: int = 1) -> None:
        self.dirpath = Path(dirpath)
        self.num_samples = num_samples
        self.every_n_epochs = every_n_epochs
        self._batch: dict[str, torch.Tensor] | None = None
        self.last_path: Path | None = None

    def _samples(self, trainer: L.Trainer) -> dict[str, torch.Tensor] | None:
        if self._batch is None:
            loaders = trainer.val_dataloaders
            loader = loaders[0] if isinstance(loaders, (list, tuple)) else loaders
            if loader is None:
                return None
            batch = next(iter(loader))
            self._batch = {k: v[: self.num_samples] for k, v in batch.items() if torch.is_tensor(v)}
        return self._batch

    @rank_zero_only
    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or (trainer.current_epoch + 1) % self.every_n_epochs:
            return
        batch = self._samples(trainer)
        if batch is None:
            return
        transform = pl_module.transform
        with torch.no_grad():
            inputs = batch["inputs"].to(pl_module.device)
            forecast = transform.decode(pl_module(inputs).float()).cpu()
        inputs = transform.decode(batch["inputs"].float())
        target = transform.decode(batch["targets"].float())
        mask = batch.get("mask")
        rain = transform.units == "mm/h"
        self.dirpath.mkdir(parents=True, exist_ok=True)
        figs = []
        for i in range(inputs.shape[0]):
            fig = forecast_panel(
                inputs[i, :, 0].numpy(), target[i, :, 0].numpy(), forecast[i, :, 0].numpy(),
                mask=None if mask is None else mask[i, :, 0].numpy(), rain=rain,
                units=transform.units, lead_names=getattr(pl_module, "lead_times", None),
                title=f"validation sample {i}, epoch {trainer.current_epoch}",
            )
            figs.append(fig)
        for i, fig in enumerate(figs):
            path = self.dirpath / f"epoch_{trainer.current_epoch:03d}_sample{i}.png"
            save_figure(fig, path, dpi=90)  # atomic: never half a PNG on a full disk
            self.last_path = path
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                for i, fig in enumerate(figs):
                    logger.experiment.add_figure(f"val/forecast_{i}", fig, trainer.global_step)
            elif isinstance(logger, WandbLogger):
                logger.log_image("val/forecast", images=figs, step=trainer.global_step)
        for fig in figs:
            plt.close(fig)


class TestScoresCallback(L.Callback):
    """Score the model and baselines on the same test windows inside ``Trainer.test``.

    Used by ``nowcast.evaluate``: the module's ``test_step`` returns its decoded forecast
    ``(B, T_out, C, H, W)`` in physical units; this callback scores it and every baseline
    (run on the decoded inputs) with a fresh set of the module's streaming scores, which
    torchmetrics reduces across ranks, so evaluation runs on several devices like training.

    Parameters
    ----------
    baselines
        ``{name: baseline(past (B, T_in, C, H, W), num_leads) -> (B, T_out, C, H, W)}``.
    plot_samples
        How many samples (rank 0's first ones) to keep for forecast panels.
    keep_forecasts
        Keep the model's forecasts ``(N, T_out, H, W)`` and issue times (radar data) for
        a netCDF file; single device only.
    allow_nonfinite
        Count non-finite forecast values instead of raising ``FloatingPointError``.
    name
        What is evaluated (the checkpoint), for messages.
    """

    def __init__(self, baselines: dict, plot_samples: int = 0, keep_forecasts: bool = False,
                 allow_nonfinite: bool = False, name: str = "model") -> None:
        self.baselines = dict(baselines)
        self.plot_samples = plot_samples
        self.keep_forecasts = keep_forecasts
        self.allow_nonfinite = allow_nonfinite
        self.name = name
        self.samples: list[dict] = []
        self.forecasts: list = []
        self.issue_times: list = []

    def on_test_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        methods = ["model", *self.baselines]
        self.scores = {m: pl_module.make_scores(**pl_module.score_kwargs).to(pl_module.device)
                       for m in methods}
        self.nonfinite = dict.fromkeys(methods, 0)

    def on_test_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs,
                          batch, batch_idx: int, dataloader_idx: int = 0) -> None:
        from nowcast.lit_module import update_scores

        transform = pl_module.transform
        forecast = outputs["forecast"]  # (B, T_out, C, H, W) physical units
        target = transform.decode(batch["targets"].float())
        past = transform.decode(batch["inputs"].float())
        mask = batch.get("mask")
        preds = {"model": forecast}
        for name, baseline in self.baselines.items():
            preds[name] = baseline(past, pl_module.num_leads).to(device=forecast.device, dtype=forecast.dtype)
        for name, pred in preds.items():
            n = int((~torch.isfinite(pred)).sum())
            if n and not self.allow_nonfinite:
                raise FloatingPointError(
                    f"{name} forecast of {self.name} has {n} non-finite values in test batch "
                    f"{batch_idx} (of {pred.numel()}); the scores would be NaN "
                    "(allow_nonfinite=true scores it anyway, flagged)"
                )
            self.nonfinite[name] += n
            update_scores(self.scores[name], pred, target, mask)
        if trainer.is_global_zero:
            for i in range(min(self.plot_samples - len(self.samples), forecast.shape[0])):
                self.samples.append({
                    "inputs": past[i, :, 0].cpu().numpy(),
                    "target": target[i, :, 0].cpu().numpy(),
                    "mask": None if mask is None else mask[i, :, 0].cpu().numpy(),
                    **{k: v[i, :, 0].cpu().numpy() for k, v in preds.items()},
                })
        if self.keep_forecasts:
            if "issue_time" not in batch:
                raise ValueError("write_forecasts needs issue times: only radar data has them")
            self.forecasts.append(forecast[:, :, 0].cpu().numpy())
            self.issue_times.append(batch["issue_time"].cpu().numpy())

    def on_test_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Inside the loop, while every rank is still there for the torchmetrics reduction.
        from nowcast.lit_module import compute_scores

        lead_times = pl_module.lead_times or getattr(trainer.datamodule, "lead_times", None)
        self.computed = {m: compute_scores(s, "test", lead_times) for m, s in self.scores.items()}

    def results(self) -> dict[str, dict[str, float]]:
        """``{method: {"test/mse": ..., "test/mse/lead01": ...}}``, reduced over ranks."""
        return self.computed
