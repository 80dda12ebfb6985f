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
