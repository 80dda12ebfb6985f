"""``predict(cfg)``: a nowcast from the newest radar files, as CF netCDF, PNG and a summary.

``python predict.py ckpt_path=<ckpt> input=<dir | glob | [files]>`` reads the newest
``T_in`` frames (as training read them: the checkpoint's reader settings, units and
``downsample``), checks that they are consecutive at the model's time step and on a grid
of the training resolution, runs the model on the full domain (tiled when large, see
:mod:`nowcast.inference`) and writes, per method (``methods=[model, optical_flow,
sprog]``), one CF-1.8 netCDF ``<prefix>_<issue time>_<method>.nc``: ``rainfall_rate``
(mm/h) on ``(lead_time, y, x)`` with ``time`` (valid times), ``forecast_reference_time``
(the issue time = time of the newest input), the input grid's coordinates and
``grid_mapping``, and provenance attributes. Plus ``<prefix>_<issue time>.png`` (inputs
and forecasts) and one log line per lead (wet area, maximum). Every file is written to a
temporary name in the output folder and renamed (:func:`atomic_path`), so a reader never
sees half a file. ``runtime=onnx model_path=<file.onnx>`` runs an exported model with
ONNX Runtime instead (no Lightning needed).

``watch=true`` polls the input folder and issues a nowcast whenever a new frame completes
the window; a bad, truncated or late file is logged and skipped, a failed nowcast writes
nothing (the last good one stays), SIGTERM / Ctrl-C stop the loop cleanly.
"""

from __future__ import annotations

import hashlib
import logging
import signal
import tempfile
import threading
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import hydra
import numpy as np
import torch
from omegaconf import DictConfig

import nowcast
from nowcast.data.radar_io import RadarArchive, RadarDataError, RadarGrid, resolve_paths
from nowcast.inference import (
    BASELINE_METHODS,
    Forecaster,
    OnnxForecaster,
    Tiling,
    grid_spacing,
    load_forecaster,
    plain_config,
    run_baselines,
)
from nowcast.io_utils import atomic_path
from nowcast.nn.conv import get_cpu_conv_backend, set_cpu_conv_backend
from nowcast.run_folders import config_dir

log = logging.getLogger(__name__)


class BadInputFile(RadarDataError):
    """A radar file that cannot be used (unreadable, truncated, no valid pixel)."""

    def __init__(self, path: Path, message: str) -> None:
        super().__init__(message)
        self.path = path


# --------------------------------------------------------------------------- reading
@dataclass
class InputWindow:
    """The newest ``T_in`` frames: ``frames`` ``(T_in, H, W)`` float32 mm/h (NaN missing),
    ``times`` ``(T_in,)`` datetime64[ns], the file of every frame, and the grid."""

    frames: np.ndarray
    times: np.ndarray
    files: list[Path]
    grid: RadarGrid
    skipped: list[Path] = field(default_factory=list)


def list_input_files(source: str | Path | Sequence[str | Path]) -> list[Path]:
    """Files named by a folder, a glob or a list (sorted by name within a folder/glob)."""
    return resolve_paths(source)


def _minutes(step: np.timedelta64) -> str:
    return f"{step / np.timedelta64(1, 'm'):g} min"


def read_window(
    files: Sequence[Path],
    input_steps: int,
    step: np.timedelta64 | None,
    reader: dict[str, Any],
    skip_bad_files: bool = False,
    scan_files: int | None = None,
    load: bool = True,
) -> InputWindow:
    """Read the newest ``input_steps`` frames of ``files`` and check they are consecutive.

    The one place predict reads radar files: through
    :class:`~nowcast.data.radar_io.RadarArchive`, the training reader, with the
    checkpoint's ``reader`` settings, and only its public API (times, ``frame_files``,
    ``read``, ``grid``). Only the last ``scan_files`` files by name (default
    ``2 * input_steps + 2``) are opened, so a growing archive costs the same every time;
    file names must sort in time order (as radar products name them). ``load=False``
    only finds the frames (``frames`` is empty).

    Raises
    ------
    RadarDataError
        Fewer readable frames than ``input_steps``, or frames not ``step`` apart (the
        message names the files on both sides of the gap and the missing time).
    BadInputFile
        A frame without a single valid pixel (e.g. a truncated file); ``.path`` names it.
    """
    files = list(files)
    candidates = files[-(scan_files or 2 * input_steps + 2):]
    step_arg = None if step is None else f"{int(step / np.timedelta64(1, 's'))}s"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # skipped files are logged by the reader
        try:
            archive = RadarArchive(candidates, time_step=step_arg or "600s", skip_bad_files=skip_bad_files,
                                   cache_frames=0, **reader)
        except RadarDataError as error:
            if "frame(s); at least one window" in str(error) or "none of the" in str(error):
                raise RadarDataError(
                    f"the model needs the {input_steps} newest frames, but only "
                    f"{len(candidates)} file(s) were found or readable: "
                    f"{[p.name for p in candidates]}"
                ) from error
            raise
    kept = {Path(p) for p in archive.files}
    skipped = [p for p in candidates if p not in kept]
    n = len(archive.times)
    if n < input_steps:
        raise RadarDataError(
            f"the model needs the {input_steps} newest frames, found {n} readable in "
            f"{[p.name for p in candidates]}" + (f" (unreadable: {[p.name for p in skipped]})" if skipped else "")
        )
    index = np.arange(n - input_steps, n)
    times = archive.times[index]
    frame_files = archive.frame_files(index)
    if step is not None:
        for k in range(1, input_steps):
            gap = times[k] - times[k - 1]
            if gap != step:
                missing = (times[k - 1] + step).astype("datetime64[m]")
                raise RadarDataError(
                    f"input frames are not consecutive at the model's {_minutes(step)} step: "
                    f"{frame_files[k - 1].name} ({times[k - 1].astype('datetime64[m]')}) is followed by "
                    f"{frame_files[k].name} ({times[k].astype('datetime64[m]')}), {_minutes(gap)} later; "
                    f"the frame for {missing} is missing or late"
                )
    if not load:
        archive.close()
        return InputWindow(np.zeros((0, 0, 0), np.float32), times, frame_files, archive.grid(), skipped)
    frames = archive.read(index, cache=False)  # (T_in, H, W) mm/h, NaN missing
    for k, frame in enumerate(frames):
        if not np.isfinite(frame).any():
            raise BadInputFile(frame_files[k], f"{frame_files[k]} has no valid pixel (truncated or empty file?)")
    grid = archive.grid()
    archive.close()
    return InputWindow(frames, times, frame_files, grid, skipped)


def check_grid(window: InputWindow, forecaster: Forecaster) -> None:
    """Raise ``RadarDataError`` when the input resolution differs from the training data's."""
    spacing = grid_spacing(window.grid.y, window.grid.x)
    trained = forecaster.grid_spacing
    if trained is None or spacing is None:
        log.warning("the training grid's resolution is unknown: the input grid (%dx%d) is not checked",
                    *window.grid.shape)
        return
    if not np.allclose(spacing, trained, rtol=1e-3):
        units = window.grid.y_attrs.get("units", "coordinate units")
        raise RadarDataError(
            f"the input grid ({window.grid.shape[0]}x{window.grid.shape[1]} px, spacing "
            f"{spacing[0]:g} x {spacing[1]:g} {units}, downsample={forecaster.reader.get('downsample', 1)}) "
            f"differs from the training grid (spacing {trained[0]:g} x {trained[1]:g} {units}); "
            f"first input file {window.files[0]}"
        )


# --------------------------------------------------------------------------- writing
def check_writable(folder: Path) -> Path:
    """Create ``folder`` and prove a file can be written there; raise ``PermissionError``
    naming it otherwise (before any computing)."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-test-"):
            pass
    except OSError as error:
        raise PermissionError(f"output folder {folder} is not writable: {error}") from error
    return folder


def sha256(path: Path) -> str:
    """Hex SHA-256 of a file."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def write_nowcast_netcdf(
    path: Path,
    forecast: np.ndarray,
    issue_time: np.datetime64,
    step: np.timedelta64,
    grid: RadarGrid,
    attrs: dict[str, str],
) -> Path:
    """Write ``forecast`` ``(T_out, H, W)`` mm/h as CF-1.8 netCDF, atomically.

    Dimensions ``(lead_time, y, x)`` (the input grid's names); coordinates ``lead_time``
    (``forecast_period``), ``time`` (valid times), scalar ``forecast_reference_time``, the
    grid's coordinates; ``rainfall_rate`` float32 in mm h-1 with ``grid_mapping``.
    """
    import xarray as xr

    leads = (np.arange(1, forecast.shape[0] + 1) * step).astype("timedelta64[ns]")
    issue = np.datetime64(issue_time, "ns")
    var_attrs = {"standard_name": "rainfall_rate", "long_name": "nowcast rain rate", "units": "mm h-1"}
    data_vars: dict[str, Any] = {}
    if grid.crs_attrs:
        var_attrs["grid_mapping"] = "proj"
        data_vars["proj"] = xr.Variable((), np.int32(0), dict(grid.crs_attrs))
    data_vars["rainfall_rate"] = xr.Variable(("lead_time", grid.y_name, grid.x_name),
                                             forecast.astype(np.float32), var_attrs)
    ds = xr.Dataset(
        data_vars,
        coords={
            "lead_time": xr.Variable("lead_time", leads, {"standard_name": "forecast_period",
                                                          "long_name": "lead time"}),
            "time": xr.Variable("lead_time", issue + leads, {"standard_name": "time",
                                                             "long_name": "valid time"}),
            "forecast_reference_time": xr.Variable((), issue, {"standard_name": "forecast_reference_time",
                                                                "long_name": "issue time (newest input frame)"}),
            **grid.coords(),
        },
        attrs={"Conventions": "CF-1.8", **attrs},
    )
    encoding = {
        "rainfall_rate": {"zlib": True, "complevel": 4},
        "lead_time": {"units": "minutes", "dtype": "int32"},
        "time": {"units": "minutes since 1970-01-01 00:00:00", "dtype": "int64"},
        "forecast_reference_time": {"units": "minutes since 1970-01-01 00:00:00", "dtype": "int64"},
    }
    with atomic_path(path) as tmp:
        ds.to_netcdf(tmp, encoding=encoding)
    return path


def save_panel(path: Path, inputs: np.ndarray, forecasts: dict[str, np.ndarray], times: np.ndarray,
               step: np.timedelta64, max_leads: int = 6) -> Path:
    """PNG: the input frames in the first row, each method's forecast in a row below
    (up to ``max_leads`` leads, evenly spread), on the rain colour map; written atomically."""
    import matplotlib.pyplot as plt

    from nowcast.plots import RAIN_LEVELS, rain_cmap

    cmap, norm = rain_cmap()
    t_out = next(iter(forecasts.values())).shape[0]
    leads = np.unique(np.linspace(0, t_out - 1, min(max_leads, t_out)).round().astype(int))
    cols = max(len(inputs), len(leads))
    rows = 1 + len(forecasts)
    fig, axes = plt.subplots(rows, cols, figsize=(2.2 * cols, 2.3 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    image = None
    for k, frame in enumerate(inputs):
        image = axes[0, k].imshow(frame, cmap=cmap, norm=norm, interpolation="nearest")
        axes[0, k].set_title(f"input {str(times[k].astype('datetime64[m]'))[11:16]}", fontsize=8)
    for r, (method, fc) in enumerate(forecasts.items(), start=1):
        for c, lead in enumerate(leads):
            axes[r, c].imshow(fc[lead], cmap=cmap, norm=norm, interpolation="nearest")
            axes[r, c].set_title(f"{method} +{_minutes(step * int(lead + 1))}", fontsize=8)
    if image is not None:
        fig.colorbar(image, ax=axes, ticks=RAIN_LEVELS, shrink=0.6, label="rain rate (mm/h)")
    fig.suptitle(f"nowcast issued {str(times[-1].astype('datetime64[m]'))} UTC", fontsize=10)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=80, format="png")
    plt.close(fig)
    return path


def summary_lines(method: str, forecast: np.ndarray, issue: np.datetime64, step: np.timedelta64,
                  grid: RadarGrid, threshold: float) -> list[str]:
    """One line per lead: valid time, wet area (>= ``threshold`` mm/h) and the maximum."""
    spacing = grid_spacing(grid.y, grid.x)
    units = grid.y_attrs.get("units", "")
    to_km = {"km": 1.0, "m": 1e-3}.get(units)
    pixel_km2 = spacing[0] * spacing[1] * to_km**2 if spacing and to_km else None
    lines = []
    for k, field_ in enumerate(forecast):
        wet = int((field_ >= threshold).sum())
        area = f", {wet * pixel_km2:,.0f} km2" if pixel_km2 else ""
        valid = (np.datetime64(issue, "m") + step * (k + 1)).astype("datetime64[m]")
        lines.append(f"{method} +{_minutes(step * (k + 1))} (valid {valid}): wet area "
                     f"{100 * wet / field_.size:.1f}% (>= {threshold:g} mm/h{area}), "
                     f"max {float(field_.max()):.1f} mm/h")
    return lines


# --------------------------------------------------------------------------- predict
@dataclass
class Predictor:
    """Everything a nowcast needs that does not change between nowcasts."""

    forecaster: Forecaster
    methods: list[str]
    output_dir: Path
    prefix: str = "nowcast"
    plot: bool = True
    wet_threshold: float = 0.1
    scan_files: int | None = None
    provenance: dict[str, str] = field(default_factory=dict)

    def nowcast(self, files: Sequence[Path], skip_bad_files: bool = False) -> dict[str, Any]:
        """One nowcast from the newest frames of ``files``; returns the written paths,
        the summary lines and the issue time. Writes nothing if anything fails."""
        fc = self.forecaster
        window = read_window(files, fc.input_steps, fc.time_step, fc.reader, skip_bad_files, self.scan_files)
        check_grid(window, fc)
        issue = window.times[-1]
        step = fc.time_step if fc.time_step is not None else np.timedelta64(10, "m")
        x = torch.from_numpy(window.frames)[None, :, None]  # (1, T_in, 1, H, W) mm/h
        forecasts: dict[str, np.ndarray] = {}
        started = time.perf_counter()
        if "model" in self.methods:
            forecasts["model"] = fc(x)[0, :, 0].numpy()  # (T_out, H, W) mm/h
        others = [m for m in self.methods if m != "model"]
        for name, out in run_baselines(x, fc.output_steps, others).items():
            forecasts[name] = out[0, :, 0].numpy()
        log.info("nowcast for %s computed in %.2f s (%s)", issue.astype("datetime64[m]"),
                 time.perf_counter() - started, ", ".join(forecasts))
        stamp = str(issue.astype("datetime64[m]")).replace("-", "").replace(":", "")
        attrs = dict(self.provenance)
        attrs["input_files"] = "\n".join(str(p) for p in window.files)
        attrs["history"] = f"{np.datetime64('now')}Z written by nowcast.predict"
        paths: dict[str, Path] = {}
        lines: list[str] = []
        for method, forecast in forecasts.items():
            path = self.output_dir / f"{self.prefix}_{stamp}Z_{method}.nc"
            source = ("nowcast network (" + attrs.get("model_file", "") + ")" if method == "model"
                      else f"pysteps {method} baseline (nowcast.baselines)")
            paths[method] = write_nowcast_netcdf(path, forecast, issue, step, window.grid,
                                                 {**attrs, "method": method, "source": source})
            lines += summary_lines(method, forecast, issue, step, window.grid, self.wet_threshold)
        if self.plot:
            paths["png"] = save_panel(self.output_dir / f"{self.prefix}_{stamp}Z.png", window.frames,
                                      forecasts, window.times, step)
        for line in lines:
            log.info(line)
        log.info("written: %s", ", ".join(str(p) for p in paths.values()))
        return {"issue_time": issue, "paths": paths, "summary": lines, "inputs": window.files,
                "skipped": window.skipped}


def build_forecaster(cfg: DictConfig) -> tuple[Forecaster, dict[str, str]]:
    """The model of ``cfg.runtime`` (``torch``: ``ckpt_path``; ``onnx``: ``model_path``)
    and its provenance attributes."""
    tiling = Tiling(**plain_config(cfg.tiling))
    runtime = cfg.get("runtime", "torch")
    if runtime == "torch":
        if not cfg.get("ckpt_path"):
            raise ValueError("runtime=torch needs ckpt_path=<checkpoint>")
        path = Path(cfg.ckpt_path)
        forecaster: Forecaster = load_forecaster(path, tiling)
    elif runtime == "onnx":
        if not cfg.get("model_path"):
            raise ValueError("runtime=onnx needs model_path=<file.onnx> (see export.py)")
        path = Path(cfg.model_path)
        forecaster = OnnxForecaster(path, tiling, threads=cfg.get("threads"))
    else:
        raise ValueError(f"runtime must be 'torch' or 'onnx', got {runtime!r}")
    forecaster.reader.update(plain_config(cfg.get("data")))
    provenance = {"model_file": str(path.resolve()), "model_sha256": sha256(path),
                  "nowcast_version": nowcast.__version__, "runtime": runtime}
    return forecaster, provenance


def predict(cfg: DictConfig) -> list[dict[str, Any]]:
    """Issue one nowcast (or, with ``cfg.watch``, one per new frame); see the module docstring.

    Returns
    -------
    One dict per nowcast issued: ``issue_time``, ``paths`` (``{method: netCDF path, "png":
    panel}``), ``summary`` (lines), ``inputs`` (the files read).
    """
    methods = list(cfg.methods)
    unknown = [m for m in methods if m != "model" and m not in BASELINE_METHODS]
    if unknown or not methods:
        raise ValueError(f"methods must be among model, {', '.join(BASELINE_METHODS)}; got {methods}")
    output_dir = check_writable(Path(cfg.output_dir))  # before loading or computing anything
    policy = get_cpu_conv_backend()
    set_cpu_conv_backend(cfg.get("cpu_conv_backend") or policy)
    try:
        return _predict(cfg, methods, output_dir)
    finally:
        set_cpu_conv_backend(policy)  # a process-wide setting: leave it as found


def _predict(cfg: DictConfig, methods: list[str], output_dir: Path) -> list[dict[str, Any]]:
    forecaster, provenance = build_forecaster(cfg)
    torch.set_num_threads(int(cfg.threads)) if cfg.get("threads") else None
    predictor = Predictor(forecaster, methods, output_dir, prefix=cfg.get("prefix", "nowcast"),
                          plot=bool(cfg.get("plot", True)), wet_threshold=float(cfg.get("wet_threshold", 0.1)),
                          scan_files=cfg.get("scan_files"), provenance=provenance)
    source = _input(cfg.input)
    if cfg.get("watch"):
        return watch(predictor, source, poll_seconds=float(cfg.poll_seconds),
                     max_iterations=cfg.get("max_iterations"), timeout_s=cfg.get("timeout_s"))
    return [predictor.nowcast(list_input_files(source))]


def _input(value: Any) -> str | list[str]:
    if isinstance(value, (str, Path)):
        return str(value)
    return [str(v) for v in value]


# --------------------------------------------------------------------------- watch
def _signature(path: Path) -> tuple[int, int] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_size, st.st_mtime_ns


def watch(
    predictor: Predictor,
    source: str | list[str],
    poll_seconds: float = 5.0,
    max_iterations: int | None = None,
    timeout_s: float | None = None,
    stop: threading.Event | None = None,
) -> list[dict[str, Any]]:
    """Poll ``source`` and issue a nowcast whenever a newer frame completes the window.

    A file that cannot be read, or has no valid pixel, is logged and left out until it
    changes (a file still being written is retried when its size or time changes); a
    window with a missing or late frame is logged and waited out. Nothing is written
    unless the whole nowcast succeeded, so the last good nowcast is never replaced by a
    broken one. SIGTERM and SIGINT (Ctrl-C) end the loop after the current step (handlers
    installed only in the main thread); so do ``stop``, ``max_iterations`` polls and
    ``timeout_s`` seconds.
    """
    stop = stop or threading.Event()
    previous: dict[int, Any] = {}
    if threading.current_thread() is threading.main_thread():
        def handler(signum, _frame):
            log.info("watch: %s received, stopping", signal.Signals(signum).name)
            stop.set()

        for sig in (signal.SIGTERM, signal.SIGINT):
            previous[sig] = signal.signal(sig, handler)
    issued: list[dict[str, Any]] = []
    bad: dict[Path, tuple[int, int] | None] = {}
    last_seen: tuple = ()
    last_issue: np.datetime64 | None = None
    known: set[Path] = set()
    started = time.monotonic()
    iterations = 0
    log.info("watching %s every %g s for new frames", source, poll_seconds)
    try:
        while not stop.is_set():
            try:
                files = list_input_files(source)
            except FileNotFoundError:
                files = []
            files = [f for f in files if not (f in bad and bad[f] == _signature(f))]
            seen = tuple((f, _signature(f)) for f in files)
            if seen != last_seen:
                last_seen = seen
                try:
                    result = _watch_step(predictor, files, last_issue, known)
                except BadInputFile as error:
                    log.warning("watch: skipping %s: %s", error.path.name, error)
                    bad[error.path] = _signature(error.path)
                    last_seen = ()  # try again at once without it
                    continue
                except (RadarDataError, OSError, ValueError) as error:
                    log.warning("watch: no nowcast yet: %s", error)
                    result = None
                if result is not None:
                    for path in result.get("skipped", []):
                        bad[path] = _signature(path)
                        log.warning("watch: skipped unreadable file %s", path.name)
                    if result.get("paths"):
                        issued.append(result)
                        last_issue = result["issue_time"]
                        known = set(files)
            iterations += 1
            if max_iterations is not None and iterations >= int(max_iterations):
                break
            if timeout_s is not None and time.monotonic() - started >= float(timeout_s):
                log.info("watch: timeout_s=%g reached", timeout_s)
                break
            stop.wait(poll_seconds)
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
    log.info("watch: stopped after %d polls, %d nowcasts issued", iterations, len(issued))
    return issued


def _watch_step(predictor: Predictor, files: list[Path], last_issue: np.datetime64 | None,
                known: set[Path]) -> dict | None:
    """One nowcast if the newest frame is newer than ``last_issue``; ``known`` are the
    files present at the last nowcast (a new file older than it arrived late)."""
    if not files:
        return None
    fc = predictor.forecaster
    probe = read_window(files, fc.input_steps, None, fc.reader, True, predictor.scan_files, load=False)
    if last_issue is not None and probe.times[-1] <= last_issue:
        for path, t in zip(probe.files, probe.times):
            if path not in known:
                log.warning("watch: %s (%s) arrived after the nowcast for %s was issued; not issued again",
                            path.name, t.astype("datetime64[m]"), last_issue.astype("datetime64[m]"))
                known.add(path)
        return {"skipped": probe.skipped}
    return predictor.nowcast(files, skip_bad_files=True)


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="predict")
def main(cfg: DictConfig) -> None:
    """Console entry point ``nowcast-predict`` (same as ``python predict.py``)."""
    predict(cfg)
