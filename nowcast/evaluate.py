"""``evaluate(cfg)``: score a checkpoint and nowcasting baselines on the test set.

The model and the data are rebuilt from the config stored in the checkpoint by
``nowcast.train`` (no need to repeat training overrides), after checking it against the
allowlist of :mod:`nowcast.safe_config` (a checkpoint is untrusted). The test set runs
through Lightning's test loop (``Trainer.test``, any number of devices); every method is
scored by :class:`nowcast.callbacks.TestScoresCallback` on the same windows and masks, in
physical units. Writes to the run folder, atomically:

* ``metrics.json``: ``{method: {"test/mse": ..., "test/mse/lead01": ...}}``, strict JSON
  (non-finite scores are ``null``), plus ``_flags`` and ``_null_reasons``
* ``metrics.md``: Markdown tables, methods side by side, overall and per lead time
* ``plots/scores_vs_lead.png`` and ``plots/sample_N.png`` forecast panels
* ``forecasts.nc`` (``write_forecasts=true``): the model's forecasts as CF netCDF
"""

from __future__ import annotations

import copy
import json
import logging
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import matplotlib.pyplot as plt
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from nowcast.baselines import get_baseline
from nowcast.callbacks import TestScoresCallback
from nowcast.checkpoints import (
    check_compatible,
    instantiate_trusted,
    load_checkpoint,
    stored_config,
)
from nowcast.data.archives import Periods, format_period, parse_periods
from nowcast.io_utils import atomic_path, atomic_write_text, save_figure
from nowcast.plots import forecast_panel, scores_vs_lead
from nowcast.run_folders import config_dir
from nowcast.safe_config import to_plain

log = logging.getLogger(__name__)

#: Scores shown in the headline table and the lead-time plot, when present.
HEADLINE = ("mse", "mae", "mse_frame", "mae_frame", "ssim", "psnr", "bias")


#: Data config keys that hold file locations, shown when the stored data is not found.
PATH_KEYS = ("path", "data_dir", "test_file", "mnist_dir")


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """``base`` with ``extra`` merged in, recursively (``extra`` wins)."""
    out = copy.deepcopy(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def load_run(ckpt_path: str | Path, data_overrides: DictConfig | dict | None = None):
    """Rebuild ``(model, datamodule, run_config)`` from a checkpoint written by ``train``.

    The config stored in the checkpoint is untrusted: it is checked whole by
    :func:`nowcast.checkpoints.stored_config` (only nowcast classes and allowlisted
    torch/Lightning classes, no interpolations) before anything is instantiated.

    Parameters
    ----------
    ckpt_path
        A ``.ckpt`` written by ``nowcast.train``.
    data_overrides
        Values merged over the stored ``data`` config (e.g. ``{"path": "/new/place"}``);
        interpolations in an omegaconf node are resolved in its own config first.

    Returns
    -------
    model
        The ``NowcastModule`` with the checkpoint's weights, in eval mode, on the CPU.
    datamodule
        The stored datamodule (not yet set up).
    run_config
        The stored run config as a ``DictConfig``, with ``data`` as evaluated.
    """
    model, datamodule, run_cfg, _ = _load_run(ckpt_path, data_overrides)
    return model, datamodule, run_cfg


def _load_run(ckpt_path: str | Path, data_overrides: Any = None):
    """:func:`load_run`, plus the stored data config before the overrides (plain dict)."""
    ckpt = load_checkpoint(ckpt_path)
    run = copy.deepcopy(stored_config(ckpt, ckpt_path))
    for group in ("data", "model"):
        if not isinstance(run.get(group), dict):
            raise ValueError(f"{ckpt_path}: the stored nowcast_config has no {group!r} section")
    stored_data = copy.deepcopy(run["data"])
    overrides = to_plain(data_overrides) or {}
    if not isinstance(overrides, dict):
        raise ValueError(f"data overrides must be a mapping of data config keys, got {overrides!r}")
    run["data"] = _merge(run["data"], overrides)
    source = f"checkpoint {ckpt_path}"
    try:
        datamodule = instantiate_trusted(run["data"], source=source)
    except Exception as err:  # noqa: BLE001 - Hydra wraps the datamodule's own error
        raise _moved_data_error(err, ckpt_path, run["data"], overrides) from err
    model = instantiate_trusted(run["model"], source=source)
    check_compatible(model, ckpt, ckpt_path)
    model.load_state_dict(ckpt["state_dict"])
    model.eval()
    return model, datamodule, OmegaConf.create(run), stored_data


def _moved_data_error(err: Exception, ckpt_path: str | Path, data: dict[str, Any],
                      overrides: dict[str, Any]) -> Exception:
    """A missing data file is explained as a stored path and the override to use."""
    cause: BaseException | None = err
    while cause is not None and not isinstance(cause, FileNotFoundError):
        cause = cause.__cause__
    if cause is None:
        return err
    stored = {k: data[k] for k in PATH_KEYS if data.get(k) is not None and k not in overrides}
    if not stored:
        return cause
    shown = ", ".join(f"data.{k}={v!r}" for k, v in stored.items())
    hint = " ".join(f"data.{k}=<new location>" for k in stored)
    return FileNotFoundError(
        f"{cause}\nThe data location comes from the config stored in checkpoint {ckpt_path} "
        f"({shown}). If the data moved, override it: python evaluate.py ckpt_path={ckpt_path} {hint}"
    )


def nonfinite_tensors(state_dict: dict[str, torch.Tensor]) -> list[str]:
    """Names of the floating-point tensors holding NaN or infinity, with their counts."""
    bad = []
    for name, value in state_dict.items():
        if torch.is_tensor(value) and value.is_floating_point():
            n = int((~torch.isfinite(value)).sum())
            if n:
                bad.append(f"{name} ({n} of {value.numel()} values)")
    return bad


def evaluate(cfg: DictConfig) -> dict[str, dict[str, float]]:
    """Evaluate ``cfg.ckpt_path`` and ``cfg.baselines`` on the test set.

    Non-finite weights or forecasts stop the evaluation with an error that names the
    checkpoint and the tensors, unless ``cfg.allow_nonfinite``: then a warning, and a flag
    in ``metrics.json`` (``_flags``, ``null`` scores) and ``metrics.md``. A stored training
    period that overlaps the evaluated test period is flagged the same way.

    Returns
    -------
    ``{method: {metric name: value}}`` with the names logged in training
    (``test/mse``, ``test/mse/lead01``, ...); non-finite scores are NaN here.
    """
    output_dir = Path(cfg.paths.output_dir)
    allow_nonfinite = bool(cfg.get("allow_nonfinite", False))
    model, datamodule, run_cfg, stored_data = _load_run(cfg.ckpt_path, cfg.get("data"))
    flags: list[dict[str, str]] = []

    bad = nonfinite_tensors(model.state_dict())
    if bad:
        message = (f"checkpoint {cfg.ckpt_path} has non-finite weights: {', '.join(bad[:8])}"
                   f"{f' and {len(bad) - 8} more tensors' if len(bad) > 8 else ''}")
        if not allow_nonfinite:
            raise FloatingPointError(f"{message}; its forecasts would be meaningless "
                                     "(allow_nonfinite=true scores it anyway, flagged)")
        log.warning("%s (allow_nonfinite=true: scoring it anyway, flagged in every report)", message)
        flags.append({"flag": "nonfinite_weights", "message": message})
    overlap = period_overlap(stored_data, OmegaConf.to_container(run_cfg.data), cfg.ckpt_path)
    if overlap:
        log.warning("%s", overlap)
        flags.append({"flag": "train_test_overlap", "message": overlap})

    baselines: dict[str, Callable] = {name: get_baseline(name) for name in cfg.get("baselines", [])}
    scorer = TestScoresCallback(baselines, plot_samples=int(cfg.plot_samples),
                                keep_forecasts=bool(cfg.get("write_forecasts")),
                                allow_nonfinite=allow_nonfinite, name=f"checkpoint {cfg.ckpt_path}")
    devices = cfg.get("devices", 1)
    if cfg.get("write_forecasts") and devices not in (1, "1", [0]):
        raise ValueError(f"write_forecasts=true needs devices=1 (got {devices}): the forecasts of "
                         "other ranks are not gathered")
    trainer = L.Trainer(accelerator=cfg.get("accelerator", "auto"), devices=devices, logger=False,
                        callbacks=[scorer], enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False)
    log.info("evaluating %s on %s x %s", cfg.ckpt_path, trainer.num_devices,
             type(trainer.accelerator).__name__)
    try:
        trainer.test(model, datamodule=datamodule, verbose=False)
    except FileNotFoundError as err:
        raise _moved_data_error(err, cfg.ckpt_path, OmegaConf.to_container(run_cfg.data),
                                to_plain(cfg.get("data")) or {}) from err
    transform = model.transform
    lead_times = model.lead_times or getattr(datamodule, "lead_times", None)
    nonfinite, samples = scorer.nonfinite, scorer.samples
    forecasts, issue_times = scorer.forecasts, scorer.issue_times

    for name, n in nonfinite.items():
        if n:
            message = f"{name}: {n} non-finite forecast values on the test set"
            log.warning("%s (allow_nonfinite=true: scores involving them are NaN/null)", message)
            flags.append({"flag": "nonfinite_forecast", "message": message})
    results = scorer.results()
    if not trainer.is_global_zero:
        return results  # rank 0 writes the reports
    output_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(output_dir / "metrics.json", metrics_json(results, flags))
    table = markdown_tables(results, lead_times or [f"lead{k + 1:02d}" for k in range(model.num_leads)],
                            flags)
    atomic_write_text(output_dir / "metrics.md", table)
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


def metrics_json(results: dict[str, dict[str, float]], flags: list[dict[str, str]]) -> str:
    """Strict JSON (no ``NaN``): ``{method: {name: value | null}}`` plus ``_flags`` (what
    was flagged, e.g. non-finite forecasts, train/test overlap) and ``_null_reasons``
    (``{method: {name: why it is null}}``). Keys starting with ``_`` are not methods."""
    clean: dict[str, Any] = {}
    reasons: dict[str, dict[str, str]] = {}
    for method, values in results.items():
        clean[method] = {}
        for key, value in values.items():
            if value is None or not math.isfinite(value):
                clean[method][key] = None
                reasons.setdefault(method, {})[key] = (
                    f"non-finite value ({value}): the forecasts or targets were not finite or the "
                    "score is undefined on this data (e.g. no event for CSI)"
                )
            else:
                clean[method][key] = value
    clean["_flags"] = flags
    clean["_null_reasons"] = reasons
    return json.dumps(clean, indent=2, sort_keys=True, allow_nan=False)


def _show(periods: Periods) -> str:
    return ", ".join(format_period(p) for p in periods)


def _stored_source(stored: dict[str, Any], evaluated: dict[str, Any]) -> dict[str, Any] | None:
    """The stored periods that apply to the evaluated data.

    A multi-archive checkpoint (``data.archives``) stores periods per archive; evaluating
    one archive (``data.path``) compares with the stored archive at the same path, whose
    unset periods are the datamodule's. ``None``: the evaluated archive was not trained on.
    """
    archives = stored.get("archives")
    if not archives or not evaluated.get("path") or evaluated.get("archives") not in (None, archives):
        return stored
    target = Path(str(evaluated["path"])).expanduser().resolve()
    for archive in archives:
        if isinstance(archive, dict) and archive.get("path") is not None \
                and Path(str(archive["path"])).expanduser().resolve() == target:
            keys = ("train_period", "val_period", "test_period")
            return {k: archive[k] if archive.get(k) is not None else stored.get(k) for k in keys}
    return None


def period_overlap(stored: dict[str, Any], evaluated: dict[str, Any],
                   ckpt_path: str | Path) -> str | None:
    """A message when the checkpoint's training period overlaps the evaluated test period.

    Compares config values (``train_period``, ``val_period``, ``test_period``; radar data,
    each one period or a list of them): ``stored`` is the data config training used,
    ``evaluated`` the one evaluated (its ``test_period`` may have been overridden). A
    stored ``train_period: null`` means "every frame outside the stored validation and
    test periods", so a test period outside those overlaps training. A multi-archive
    checkpoint is compared archive by archive (:func:`_stored_source`).
    """
    source = _stored_source(stored, evaluated)
    if source is None or "train_period" not in source:
        return None  # an archive not trained on, or data without periods (Moving-MNIST)
    try:
        tests = parse_periods("test_period", evaluated.get("test_period")) or []
        train = parse_periods("train_period", source.get("train_period")) or []
        held = [p for key in ("val_period", "test_period") for p in parse_periods(key, source.get(key)) or []]
    except (TypeError, ValueError):
        return None  # malformed periods: the datamodule reports them
    if not tests:
        return None
    where = f"checkpoint {ckpt_path}"
    if train:
        hit = [t for t in tests if any(p[0] <= t[1] and t[0] <= p[1] for p in train)]
        if hit:
            return (f"the test period {_show(hit)} overlaps the training period {_show(train)} "
                    f"stored in {where}: these test scores are on data the model was trained on")
        return None
    outside = [t for t in tests if not any(p[0] <= t[0] and t[1] <= p[1] for p in held)]
    if not outside:
        return None
    return (f"the test period {_show(outside)} is not inside the validation/test periods held "
            f"out when training {where} (train_period=null trains on every other frame): these "
            "test scores are on data the model was trained on")


def _score_names(results: dict[str, dict[str, float]]) -> list[str]:
    """Overall score names (``mse``, ``csi_1mmh``...) in a stable, readable order."""
    names = sorted({k.split("/")[1] for r in results.values() for k in r if k.count("/") == 1})
    head = [n for n in HEADLINE if n in names]
    return head + [n for n in names if n not in head]


def markdown_tables(results: dict[str, dict[str, float]], lead_times: list[str],
                    flags: list[dict[str, str]] | None = None) -> str:
    """Methods side by side: one overall table, then one per-lead table per score.

    ``flags`` (non-finite forecasts, train/test overlap) come first, as warnings. A
    non-finite score is shown as ``NaN`` / ``inf`` in bold (not "n/a": it is a result, a
    bad one); a score a method does not have is ``-``.
    """
    methods = list(results)

    def fmt(v: float | None) -> str:
        if v is None:
            return "-"
        return f"**{v}**" if not math.isfinite(v) else f"{v:.4g}"

    names = _score_names(results)
    lines = [f"> **WARNING ({f['flag']})**: {f['message']}\n" for f in flags or []]
    lines += ["## Overall (test set)", "", "| score | " + " | ".join(methods) + " |",
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
        save_figure(fig, plot_dir / "scores_vs_lead.png", dpi=100)
        plt.close(fig)
    for i, s in enumerate(samples):
        others = {k: v for k, v in s.items() if k not in ("inputs", "target", "mask", "model")}
        fig = forecast_panel(s["inputs"], s["target"], s["model"], mask=s["mask"],
                             rain=units == "mm/h", units=units, lead_names=lead_times,
                             title=f"test sample {i}", baselines=others)
        save_figure(fig, plot_dir / f"sample_{i}.png", dpi=90)
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
    step = datamodule.step  # numpy timedelta64: the experiment's step, not an archive's own
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
    with atomic_path(path) as tmp:  # readers see the old file or the whole new one
        ds.to_netcdf(tmp, encoding=encoding)
    return path


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="evaluate")
def main(cfg: DictConfig) -> None:
    """Console entry point ``nowcast-evaluate`` (same as ``python evaluate.py``)."""
    evaluate(cfg)
