"""Time-to-quality: validation scores against elapsed seconds, one line per run.

Reads the CSV logger's ``metrics.csv`` of each run (``val/elapsed_s`` is logged by
``nowcast.timing.ElapsedTime``, in ``callbacks=default``) and draws the model's
validation MSE as a fraction of persistence's, and its SSIM minus persistence's, against
the seconds since fit started::

    python scripts/plot_time_to_quality.py docs/moving_mnist_time_to_quality.png \
        "default (1 digit)=logs/train/runs/<time>" "2 digits=logs/train/runs/<time2>"
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

log = logging.getLogger(__name__)

COLUMNS = ("val/elapsed_s", "val/mse", "val/persistence/mse", "val/ssim", "val/persistence/ssim")


def load_curve(run: Path) -> pd.DataFrame:
    """``step, val/elapsed_s, val/mse, ...`` rows of one run's validations."""
    (csv,) = sorted(Path(run).rglob("metrics.csv"))[:1] or [None]
    if csv is None:
        raise FileNotFoundError(f"{run}: no metrics.csv (was the run logged with logger=csv?)")
    frame = pd.read_csv(csv)
    missing = [c for c in COLUMNS if c not in frame]
    if missing:
        raise ValueError(f"{csv}: columns {missing} missing; needs callbacks.elapsed_time and "
                         "model.persistence_baseline=true")
    return frame[["step", *COLUMNS]].dropna(subset=list(COLUMNS))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("output", type=Path, help="PNG to write")
    parser.add_argument("runs", nargs="+", help="LABEL=RUN_DIR (the run's output folder)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    fig, (ax_mse, ax_ssim) = plt.subplots(1, 2, figsize=(10, 3.8), constrained_layout=True)
    for spec in args.runs:
        label, _, run = spec.rpartition("=")
        curve = load_curve(Path(run))
        t = curve["val/elapsed_s"] / 60.0
        ratio = curve["val/mse"] / curve["val/persistence/mse"]
        ax_mse.plot(t, ratio, marker="o", label=label or run)
        ax_ssim.plot(t, curve["val/ssim"] - curve["val/persistence/ssim"], marker="o",
                     label=label or run)
        for _, row in curve.iterrows():
            log.info("%s: step %d, %.0f s: MSE %.4f (%.2fx persistence), SSIM %.3f (persistence %.3f)",
                     label, row["step"], row["val/elapsed_s"], row["val/mse"],
                     row["val/mse"] / row["val/persistence/mse"], row["val/ssim"],
                     row["val/persistence/ssim"])
    ax_mse.axhline(1.0, color="grey", lw=0.8, ls="--")
    ax_mse.axhline(0.4, color="tab:red", lw=0.8, ls=":", label="target 0.4")
    ax_mse.set(xlabel="minutes since fit started", ylabel="val MSE / persistence MSE",
               title="Validation MSE relative to persistence", ylim=(0, None))
    ax_ssim.axhline(0.0, color="grey", lw=0.8, ls="--")
    ax_ssim.set(xlabel="minutes since fit started", ylabel="val SSIM - persistence SSIM",
                title="Validation SSIM above persistence")
    for ax in (ax_mse, ax_ssim):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.output, dpi=100)
    log.info("wrote %s", args.output)


if __name__ == "__main__":
    main()
