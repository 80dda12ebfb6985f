"""``nowcast.throughput.SequenceThroughput`` in a real (tiny) training run."""

from __future__ import annotations

import logging

import pytest
from hydra.utils import instantiate

from nowcast.throughput import SequenceThroughput
from nowcast.train import train

CALLBACK = "+callbacks.throughput={_target_: nowcast.throughput.SequenceThroughput, warmup_batches: 1}"


def test_counts_sequences_after_warmup_and_logs(train_cfg, caplog, tmp_path):
    # TINY: 32 training sequences in batches of 8, one epoch: 4 batches, 3 after warm-up
    cfg = train_cfg(CALLBACK, "callbacks.forecast_plots=null")
    cb = instantiate(cfg.callbacks.throughput)
    assert isinstance(cb, SequenceThroughput)
    with caplog.at_level(logging.INFO, logger="nowcast.throughput"):
        train(cfg)
    line = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("throughput:"))
    assert "24 sequences in" in line, line
    seconds = float(line.split("sequences in ")[1].split(" s")[0])
    rate = float(line.split()[1])
    # the log rounds the seconds to 0.01 s, which for a tiny run is several percent
    assert 24 / (seconds + 0.006) <= rate <= 24 / max(seconds - 0.006, 1e-3)
    metrics_csv = (tmp_path / "run" / "csv" / "metrics.csv").read_text()
    assert "train/sequences_per_s" in metrics_csv.splitlines()[0]


def test_too_few_batches_warns_and_bad_warmup(caplog):
    cb = SequenceThroughput(warmup_batches=10)  # a run that ended before the clock started
    with caplog.at_level(logging.WARNING, logger="nowcast.throughput"):
        cb.on_train_end(trainer=None, pl_module=None)
    assert cb.sequences_per_s is None
    assert any("throughput: not measured, 0 training batches ran (warm-up 10)" in r.getMessage()
               for r in caplog.records)
    with pytest.raises(ValueError, match="warmup_batches must be >= 1, got 0"):
        SequenceThroughput(warmup_batches=0)
