"""One radar archive in a training: where and how to read it, and its periods.

:class:`RadarSource` is what a config names (``_target_: nowcast.data.archives.RadarSource``)
in ``data.archives``: the reader settings of one archive (path, importer, units, Z-R
relation, downsample, plausibility limits), its train/val/test periods and its sampling
weight. It does not touch the files; :meth:`RadarSource.open` scans the archive
(:class:`~nowcast.data.radar_io.RadarArchive`) when the datamodule first needs it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from nowcast.data.radar_io import (
    DEFAULT_DBZ_RANGE,
    DEFAULT_MAX_RAIN_RATE,
    RadarArchive,
    _default_name,
)

#: ``[start, end]`` (ISO times, inclusive), a list of those, or ``None``.
PeriodSpec = Sequence[str] | Sequence[Sequence[str]] | None
#: Parsed: a list of ``(start, end)`` datetime64[ns] pairs, or ``None``.
Periods = list[tuple[np.datetime64, np.datetime64]] | None

SPLITS = ("train", "val", "test")


def parse_periods(name: str, period: PeriodSpec) -> Periods:
    """``[start, end]`` or ``[[start, end], ...]`` (ISO times) -> list of datetime64 pairs.

    Raises
    ------
    ValueError
        Naming ``name`` and the value, for anything but pairs of parsable times with
        ``start <= end``.
    """
    if period is None:
        return None
    values = list(period)
    if values and all(isinstance(v, str) or not isinstance(v, Sequence) for v in values):
        values = [values]  # one [start, end]
    out = []
    for pair in values:
        pair = list(pair) if isinstance(pair, Sequence) and not isinstance(pair, str) else [pair]
        if len(pair) != 2:
            raise ValueError(
                f"{name} must be [start, end] or a list of [start, end] (ISO times), got {period!r}"
            )
        try:
            start, end = (np.datetime64(str(v), "ns") for v in pair)
        except ValueError as error:
            raise ValueError(f"{name}: cannot parse {pair!r} as ISO times: {error}") from error
        if end < start:
            raise ValueError(f"{name}: end {pair[1]} is before start {pair[0]}")
        out.append((start, end))
    if not out:
        raise ValueError(f"{name} is an empty list; use null for no period")
    return out


def format_period(period: tuple[np.datetime64, np.datetime64]) -> str:
    """``[2021-02-02T00:00, 2021-02-02T23:59]`` to the minute (or second if needed)."""
    unit = "s" if any(np.datetime64(p, "m") != p for p in period) else "m"
    return "[" + ", ".join(np.datetime_as_string(p, unit) for p in period) + "]"


class RadarSource:
    """One archive of a training: reader settings, periods and sampling weight.

    Parameters
    ----------
    path
        What :class:`~nowcast.data.radar_io.RadarArchive` reads: a directory (searched
        recursively), glob, file, list of files, or a Zarr store (path or fsspec URL).
    name
        Name in logs, errors and per-archive validation scores (``val/<name>/mse``);
        default: the last component of ``path``. Names must be unique.
    importer, importer_kwargs, filename_time_format, filename_time_regex, variable,
    time_variable, units, accumulation_minutes, zr_a, zr_b, downsample, skip_bad_files,
    chunks, max_rain_rate, dbz_range, strict_values
        Reader settings, see :class:`~nowcast.data.radar_io.RadarArchive`.
    native_step
        The archive's own time step (``"5min"``); ``None`` infers the most common
        spacing. The experiment's step is ``data.time_step``.
    train_period, val_period, test_period
        ``[start, end]`` or a list of ``[start, end]`` (ISO times, inclusive, of the
        frames); ``None`` inherits the datamodule's. ``train_period=None`` (also there)
        means every frame outside this archive's val and test periods.
    weight
        Share of the training samples drawn from this archive (relative to the other
        archives' weights); ``None`` for every archive: proportional to the windows.
    """

    def __init__(
        self,
        path: str | Path | Sequence[str | Path],
        name: str | None = None,
        importer: str | None = None,
        importer_kwargs: Mapping[str, Any] | None = None,
        filename_time_format: str | None = None,
        filename_time_regex: str | None = None,
        variable: str | None = None,
        time_variable: str = "valid_time",
        units: str | None = None,
        accumulation_minutes: float | None = None,
        zr_a: float | None = None,
        zr_b: float | None = None,
        downsample: int = 1,
        skip_bad_files: bool = False,
        chunks: dict | int | str | None = None,
        native_step: str | None = None,
        max_rain_rate: float | None = DEFAULT_MAX_RAIN_RATE,
        dbz_range: Sequence[float] | None = DEFAULT_DBZ_RANGE,
        strict_values: bool = False,
        train_period: PeriodSpec = None,
        val_period: PeriodSpec = None,
        test_period: PeriodSpec = None,
        weight: float | None = None,
    ) -> None:
        if int(downsample) < 1:
            raise ValueError(f"downsample must be >= 1, got {downsample}")
        if weight is not None and not float(weight) > 0:
            raise ValueError(f"archive {name or path!r}: weight must be > 0, got {weight}")
        self.path = path if isinstance(path, (str, Path)) else [str(p) for p in path]
        self.name = str(name) if name else _default_name(path)
        self.reader: dict[str, Any] = dict(
            importer=importer,
            importer_kwargs=dict(importer_kwargs or {}),  # DictConfig -> dict
            filename_time_format=filename_time_format,
            filename_time_regex=filename_time_regex,
            variable=variable,
            time_variable=time_variable,
            units=units,
            accumulation_minutes=accumulation_minutes,
            zr_a=zr_a,
            zr_b=zr_b,
            downsample=int(downsample),
            skip_bad_files=bool(skip_bad_files),
            chunks=dict(chunks) if isinstance(chunks, Mapping) else chunks,
            time_step=native_step,
            max_rain_rate=max_rain_rate,
            dbz_range=None if dbz_range is None else [float(v) for v in dbz_range],
            strict_values=bool(strict_values),
        )
        self.periods: dict[str, Periods] = {
            "train": parse_periods(f"{self.name}: train_period", train_period),
            "val": parse_periods(f"{self.name}: val_period", val_period),
            "test": parse_periods(f"{self.name}: test_period", test_period),
        }
        self.weight = None if weight is None else float(weight)

    def open(self, cache_frames: int = 16) -> RadarArchive:
        """Scan the archive (time stamps, grid, units; no data values)."""
        return RadarArchive(self.path, name=self.name, cache_frames=cache_frames, **self.reader)

    def __repr__(self) -> str:
        return f"RadarSource(name={self.name!r}, path={self.path!r}, importer={self.reader['importer']!r})"
