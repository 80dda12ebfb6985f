"""``evaluate(cfg)``: score a checkpoint and nowcasting baselines on the test set.

The model and the data are rebuilt from the config stored in the checkpoint by
``nowcast.train`` (no need to repeat training overrides). Every method is scored on the
same windows and masks, in physical units. Writes to the run folder:

* ``metrics.json``: ``{method: {"test/mse": ..., "test/mse/lead01": ...}}``
* ``metrics.md``: Markdown tables, methods side by side, overall and per lead time
* ``plots/scores_vs_lead.png`` and ``plots/sample_N.png`` forecast panels
* ``forecasts.nc`` (``write_forecasts=true``): the model's forecasts as CF netCDF
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import hydra
import matplotlib.pyplot as plt
import numpy as np
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from nowcast.baselines import get_baseline
from nowcast.checkpoints import check_compatible, load_checkpoint
from nowcast.lit_module import compute_scores, update_scores
from nowcast.plots import forecast_panel, scores_vs_lead

log = logging.getLogger(__name__)

#: Scores shown in the headline table and the lead-time plot, when present.
HEADLINE = ("mse", "mae", "mse_frame", "mae_frame", "ssim", "psnr", "bias")


def load_run(ckpt_path: str | Path, data_overrides: DictConfig | dict | None = None):
    """Rebuild ``(model, datamodule, run_config)`` from a checkpoint written by ``train``."""
    ckpt = load_checkpoint(ckpt_path)
    if "nowcast_config" not in ckpt:
        raise ValueError(
            f"{ckpt_path} has no stored nowcast config: it was not written by nowcast.train, "
            "so the model cannot be rebuilt from it"
        )
    run_cfg = OmegaConf.create(ckpt["nowcast_config"])
    if data_overrides:
        run_cfg.data = OmegaConf.merge(run_cfg.data, data_overrides)
    datamodule = instantiate(run_cfg.data)
    model = instantiate(run_cfg.model)
    check_compatible(model, ckpt, ckpt_path)
    model.load_state_dict(ckpt["state_dict"])
    model.eval()
    return model, datamodule, run_cfg


def evaluate(cfg: DictConfig) -> dict[str, dict[str, float]]:
    """Evaluate ``cfg.ckpt_path`` and ``cfg.baselines`` on the test set.

    Returns
    -------
    ``{method: {metric name: value}}`` with the names logged in training
    (``test/mse``, ``test/mse/lead01``, ...).
    """
    output_dir = Path(cfg.paths.output_dir)
    model, datamodule, run_cfg = load_run(cfg.ckpt_path, cfg.get("data"))
    device = _device(cfg.get("accelerator", "auto"))
    model.to(device)
    log.info("evaluating %s on %s", cfg.ckpt_path, device)

    baselines: dict[str, Callable] = {name: get_baseline(name) for name in cfg.get("baselines", [])}
    datamodule.prepare_data()
    datamodule.setup("test")
    transform = model.transform
    lead_times = model.lead_times or getattr(datamodule, "lead_times", None)
    scores = {m: model.make_scores(**model.score_kwargs).to(device) for m in ["model", *baselines]}

    samples: list[dict[str, np.ndarray]] = []
    forecasts: list[np.ndarray] = []
    issue_times: list[np.ndarray] = []
    with torch.no_grad():
        for batch in datamodule.test_dataloader():
            inputs = batch["inputs"].to(device)
            mask = batch.get("mask")
            mask = None if mask is None else mask.to(device)
            target = transform.decode(batch["targets"].to(device).float())
            forecast = transform.decode(model(inputs).float())
            update_scores(scores["model"], forecast, target, mask)
            past = transform.decode(inputs.float())
            preds = {"model": forecast}
            for name, baseline in baselines.items():
                preds[name] = baseline(past, model.num_leads).to(device=device, dtype=forecast.dtype)
                update_scores(scores[name], preds[name], target, mask)
            for i in range(min(cfg.plot_samples - len(samples), inputs.shape[0])):
                samples.append({
                    "inputs": past[i, :, 0].cpu().numpy(),
                    "target": target[i, :, 0].cpu().numpy(),
                    "mask": None if mask is None else mask[i, :, 0].cpu().numpy(),
                    **{k: v[i, :, 0].cpu().numpy() for k, v in preds.items()},
                })
            if cfg.get("write_forecasts"):
                if "issue_time" not in batch:
                    raise ValueError("write_forecasts needs issue times: only radar data has them")
                forecasts.append(forecast[:, :, 0].cpu().numpy())
                issue_times.append(batch["issue_time"].numpy())

    results = {m: compute_scores(s, "test", lead_times) for m, s in scores.items()}
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "metrics.json").write_text(json.dumps(results, indent=2, sort_keys=True))
    table = markdown_tables(results, lead_times or [f"lead{k + 1:02d}" for k in range(model.num_leads)])
    (output_dir / "metrics.md").write_text(table)
    _plots(results, samples, lead_times, transform.units, output_dir / "plots", model.num_leads)
    if forecasts:
        path = write_forecasts_netcdf(
            output_dir / "forecasts.nc", np.concatenate(forecasts), np.concatenate(issue_times),
            datamodule, transform.units,
        )
        log.info("forecasts: %s", path)
    log.info("results:\n%s", table)
    log.info("metrics: %s, %s; plots: %s", output_dir / "metrics.json", output_dir / "metrics.md",
             output_dir / "plots")
    return results


def _device(accelerator: str) -> torch.device:
    if accelerator in ("auto", "gpu", "cuda"):
        if torch.cuda.is_available():
            return torch.device("cuda")
        if accelerator != "auto":
            raise ValueError(f"accelerator={accelerator!r} but no CUDA device is available")
    return torch.device("cpu")


def _score_names(results: dict[str, dict[str, float]]) -> list[str]:
    """Overall score names (``mse``, ``csi_1mmh``...) in a stable, readable order."""
    names = sorted({k.split("/")[1] for r in results.values() for k in r if k.count("/") == 1})
    head = [n for n in HEADLINE if n in names]
    return head + [n for n in names if n not in head]


def markdown_tables(results: dict[str, dict[str, float]], lead_times: list[str]) -> str:
    """Methods side by side: one overall table, then one per-lead table per score."""
    methods = list(results)

    def fmt(v: float | None) -> str:
        return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.4g}"

    names = _score_names(results)
    lines = ["## Overall (test set)", "", "| score | " + " | ".join(methods) + " |",
             "| --- |" + " --- |" * len(methods)]
    for n in names:
        lines.append(f"| {n} | " + " | ".join(fmt(results[m].get(f"test/{n}")) for m in methods) + " |")
    for n in names:
        if not any(f"test/{n}/{lead_times[0]}" in results[m] for m in methods):
            continue
        lines += ["", f"## {n} per lead time", "", "| lead | " + " | ".join(methods) + " |",
                  "| --- |" + " --- |" * len(methods)]
        for lead in lead_times:
            lines.append(f"| {lead} | " + " | ".join(fmt(results[m].get(f"test/{n}/{lead}"))
                                                   for m in methods) + " |")
    return "\n".join(lines) + "\n"


def _plots(results, samples, lead_times, units, plot_dir: Path, num_leads: int) -> None:
    plot_dir.mkdir(parents=True, exist_ok=True)
    leads = lead_times or [f"lead{k + 1:02d}" for k in range(num_leads)]
    per_lead: dict[str, dict[str, list[float]]] = {}
    names = _score_names(results)
    for method, values in results.items():
        per_lead[method] = {
            n: [values.get(f"test/{n}/{lead}", float("nan")) for lead in leads]
            for n in names if f"test/{n}/{leads[0]}" in values
        }
    shown = [n for n in names if any(n in v for v in per_lead.values())][:9]
    if shown:
        fig = scores_vs_lead(per_lead, leads, shown)
        fig.savefig(plot_dir / "scores_vs_lead.png", dpi=100)
        plt.close(fig)
    for i, s in enumerate(samples):
        others = {k: v for k, v in s.items() if k not in ("inputs", "target", "mask", "model")}
        fig = forecast_panel(s["inputs"], s["target"], s["model"], mask=s["mask"],
                             rain=units == "mm/h", units=units, lead_names=lead_times,
                             title=f"test sample {i}", baselines=others)
        fig.savefig(plot_dir / f"sample_{i}.png", dpi=90)
        plt.close(fig)


def write_forecasts_netcdf(path: Path, forecasts: np.ndarray, issue_times: np.ndarray,
                           datamodule: Any, units: str) -> Path:
    """Write forecasts ``(N, T_out, H, W)`` as CF netCDF on the input grid.

    Dimensions ``(issue_time, lead_time, y, x)``; the padding added for the network is
    cropped off, and the grid's coordinates, their attributes and the projection
    (``grid_mapping``) are those of the input files.
    """
    import xarray as xr

    grid = datamodule.grid
    h, w = grid.shape
    forecasts = forecasts[..., :h, :w]  # (N, T_out, H, W) without the masked padding
    step = datamodule.archive.step  # numpy timedelta64
    leads = (np.arange(1, forecasts.shape[1] + 1) * step).astype("timedelta64[m]")
    attrs = {"units": units, "long_name": "nowcast rain rate"}
    if units == "mm/h":
        attrs["standard_name"] = "rainfall_rate"
    data_vars: dict[str, Any] = {}
    if grid.crs_attrs:
        attrs["grid_mapping"] = "proj"
        data_vars["proj"] = xr.Variable((), np.int32(0), dict(grid.crs_attrs))
    data_vars["rain_rate"] = xr.Variable(
        ("issue_time", "lead_time", grid.y_name, grid.x_name), forecasts.astype(np.float32), attrs
    )
    ds = xr.Dataset(
        data_vars,
        coords={"issue_time": issue_times.astype("datetime64[ns]"), "lead_time": leads,
                **grid.coords()},
        attrs={"Conventions": "CF-1.7",
               "source": "nowcast ConvLSTM encoder-forecaster",
               "history": "written by nowcast.evaluate"},
    )
    ds["issue_time"].attrs["long_name"] = "time of the last input frame"
    ds["lead_time"].attrs["long_name"] = "forecast lead time"
    encoding = {"rain_rate": {"zlib": True, "complevel": 4}}
    ds.to_netcdf(path, encoding=encoding)
    return path


def _config_dir() -> str:
    here = Path(__file__).resolve().parents[1] / "configs"
    return str(here if here.is_dir() else Path.cwd() / "configs")


@hydra.main(version_base="1.3", config_path=_config_dir(), config_name="evaluate")
def main(cfg: DictConfig) -> None:
    """Console entry point ``nowcast-evaluate`` (same as ``python evaluate.py``)."""
    evaluate(cfg)
