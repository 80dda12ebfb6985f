"""A CSV logger that continues a run's ``metrics.csv`` instead of deleting it.

Lightning's ``CSVLogger`` removes an existing ``metrics.csv`` when it starts, so a run
resumed in its own folder (``python train.py ckpt_path=<run>/checkpoints/last.ckpt``)
would lose the rows of its first part. This one appends: the existing header is read
back, new columns rewrite the file with the wider header (as Lightning does within one
run), and one run keeps one metrics file.
"""

from __future__ import annotations

import csv

from lightning.pytorch.loggers import CSVLogger as _LightningCSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.loggers.logger import rank_zero_experiment


class AppendingExperimentWriter(ExperimentWriter):
    """Lightning's CSV writer, continuing an existing ``metrics.csv``."""

    def _check_log_dir_exists(self) -> None:
        if not self._fs.isfile(self.metrics_file_path):
            return
        with self._fs.open(self.metrics_file_path, "r", newline="") as file:
            header = next(csv.reader(file), [])
        self.metrics_keys = sorted(set(header))


class CSVLogger(_LightningCSVLogger):
    """``lightning.pytorch.loggers.CSVLogger`` that appends to an existing ``metrics.csv``
    (same arguments)."""

    @property
    @rank_zero_experiment
    def experiment(self) -> AppendingExperimentWriter:
        if self._experiment is not None:
            return self._experiment
        self._fs.makedirs(self.root_dir, exist_ok=True)
        self._experiment = AppendingExperimentWriter(log_dir=self.log_dir)
        return self._experiment
