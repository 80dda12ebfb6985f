"""Figures a person looks at: forecast panels and scores against lead time."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import matplotlib

matplotlib.use("Agg")  # headless: runs on clusters and in CI

import matplotlib.colors as mcolors  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

#: Rain-rate levels (mm/h) of the log-scaled rain colour map.
RAIN_LEVELS = (0.1, 0.5, 1, 2, 5, 10, 20, 50, 100)


def rain_cmap() -> tuple[mcolors.Colormap, mcolors.Normalize]:
    """A rain-rate colour map with log-spaced bounds; below 0.1 mm/h is white (dry)."""
    colors = ["#c6dbef", "#6baed6", "#2171b5", "#41ab5d", "#fdd835", "#fb8c00", "#e53935", "#8e24aa"]
    # below 0.1 mm/h: white (dry); masked (no data / outside coverage): grey
    cmap = mcolors.ListedColormap(colors, name="rain").with_extremes(
        under="white", over="#4a148c", bad="#bdbdbd"
    )
    norm = mcolors.BoundaryNorm(RAIN_LEVELS, cmap.N)
    return cmap, norm


def forecast_panel(
    inputs: np.ndarray,
    target: np.ndarray,
    forecast: np.ndarray,
    mask: np.ndarray | None = None,
    rain: bool = False,
    units: str = "",
    lead_names: Sequence[str] | None = None,
    max_inputs: int = 4,
    max_leads: int = 10,
    title: str | None = None,
    baselines: Mapping[str, np.ndarray] | None = None,
) -> Figure:
    """One sample: rows of input frames, truth, forecast (and baselines).

    Parameters
    ----------
    inputs, target, forecast
        ``(T, H, W)`` arrays in physical units (channel already selected).
    mask
        ``(T_out, H, W)`` bool, ``True`` = valid; invalid pixels are drawn grey.
    rain
        Use the log-scaled rain colour map in mm/h instead of greyscale [0, 1].
    """
    leads = list(range(target.shape[0]))
    if len(leads) > max_leads:  # evenly spaced leads, always the last
        leads = sorted(set(np.linspace(0, target.shape[0] - 1, max_leads).round().astype(int)))
    inputs = inputs[-max_inputs:]
    rows = [("input", inputs, None), ("truth", target[leads], mask), ("forecast", forecast[leads], mask)]
    for name, values in (baselines or {}).items():
        rows.append((name, values[leads], mask))
    ncols = max(len(leads), len(inputs))
    fig, axes = plt.subplots(len(rows), ncols, figsize=(1.6 * ncols + 1.2, 1.7 * len(rows)),
                             squeeze=False, constrained_layout=True)
    if rain:
        cmap, norm = rain_cmap()
        kwargs = dict(cmap=cmap, norm=norm)
    else:
        kwargs = dict(cmap="gray", vmin=0.0, vmax=1.0)
    image = None
    for r, (name, frames, frame_mask) in enumerate(rows):
        for c in range(ncols):
            ax = axes[r, c]
            ax.set_xticks([])
            ax.set_yticks([])
            if c >= len(frames):
                ax.axis("off")
                continue
            frame = np.asarray(frames[c], dtype=float)
            if frame_mask is not None:
                m = frame_mask[leads][c] if name != "input" else None
                if m is not None:
                    frame = np.ma.masked_where(~m, frame)
            image = ax.imshow(frame, interpolation="nearest", **kwargs)
            if r == 0:
                ax.set_title(f"t-{len(inputs) - 1 - c}" if len(inputs) > 1 else "t0", fontsize=8)
            elif r == 1:
                label = lead_names[leads[c]] if lead_names else f"+{leads[c] + 1}"
                ax.set_title(label, fontsize=8)
            if c == 0:
                ax.set_ylabel(name, fontsize=9)
    if rain and image is not None:
        fig.colorbar(image, ax=axes, shrink=0.8, label=f"rain rate ({units or 'mm/h'})",
                     extend="both", ticks=RAIN_LEVELS)
    if title:
        fig.suptitle(title, fontsize=10)
    return fig


def scores_vs_lead(
    per_lead: Mapping[str, Mapping[str, Sequence[float]]],
    lead_names: Sequence[str],
    scores: Sequence[str],
) -> Figure:
    """Scores against lead time, one panel per score, one line per method.

    ``per_lead[method][score]`` is the sequence of per-lead values.
    """
    n = len(scores)
    ncols = min(n, 3)
    nrows = (n + ncols - 1) // ncols
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.2 * ncols, 3.2 * nrows), squeeze=False,
                             constrained_layout=True)
    x = np.arange(1, len(lead_names) + 1)
    for k, score in enumerate(scores):
        ax = axes[k // ncols, k % ncols]
        for method, values in per_lead.items():
            if score in values:
                ax.plot(x, values[score], marker="o", markersize=3, label=method)
        ax.set_title(score)
        ax.set_xticks(x)
        ax.set_xticklabels(lead_names, rotation=45, fontsize=7)
        ax.set_xlabel("lead time")
        ax.grid(alpha=0.3)
    for k in range(n, nrows * ncols):
        axes[k // ncols, k % ncols].axis("off")
    axes[0, 0].legend(fontsize=8)
    return fig
