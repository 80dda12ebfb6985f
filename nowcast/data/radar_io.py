"""Reading radar archives lazily: file discovery, time axis, units, grid, frame reads.

A *radar archive* is one of

- CF netCDF: one file per time step, the time given by a scalar (or length-1) time
  variable such as the BoM ``valid_time`` or by a pattern in the file name; or one or
  several files with a time dimension;
- any format a pysteps importer reads (``importer="knmi_hdf5"``, ``"odim_hdf5"``,
  ``"fmi_pgm"``, ``"mrms_grib"``, ...: :func:`pysteps.io.get_method`), one file per time
  step, the time taken from the file name (``filename_time_format``);
- a Zarr store holding ``(time, y, x)`` with CF attributes (``xarray.open_zarr``; a local
  path or any fsspec URL), e.g. the output of ``scripts/prepare_radar.py``.

:class:`RadarArchive` scans the archive once (time stamps from names or time variables;
grid and units from the first frame; no data values), sorts the frames by time and then
reads frames on demand, so an archive larger than memory streams: only the frames of the
windows asked for are decoded, and a small LRU cache of decoded frames (a window's
worth) serves overlapping windows. netCDF frames are read with ``netCDF4`` directly
(3-4x faster per file than ``xarray.open_dataset``, see docs/radar.md), applying CF
decoding as xarray does (``_FillValue`` / ``missing_value`` -> NaN, then
``scale_factor`` and ``add_offset``); pysteps frames are brought to mm/h by
:func:`pysteps.utils.conversion.to_rainrate` (undoing ``transform``, dividing
accumulations by ``accutime``, Z-R for reflectivity); Zarr frames are decoded by xarray.

Frames leave :meth:`RadarArchive.read` as rain rate in mm/h, ``float32``, NaN where
missing or implausible (``max_rain_rate``, ``dbz_range``), block-averaged by
``downsample``. :func:`read_frames` and :func:`list_frames` are the same readers for a
handful of files (operational nowcasts: the newest ``T_in`` frames of a folder).
"""

from __future__ import annotations

import glob
import logging
import re
import warnings
from collections import OrderedDict
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import netCDF4
import numpy as np
import xarray as xr

from nowcast.data.transforms import dbz_to_rain_rate

log = logging.getLogger(__name__)

#: CF standard names recognised as a precipitation field, in order of preference.
PRECIP_STANDARD_NAMES = (
    "rainfall_rate",
    "precipitation_amount",
    "equivalent_reflectivity_factor",
)
NETCDF_SUFFIXES = (".nc", ".nc4", ".netcdf", ".cdf", ".h5")
#: Plausibility limits (``max_rain_rate`` mm/h, ``dbz_range`` dBZ): beyond them a value is
#: a fault (clutter, a decoding error, a fill value nobody declared), not weather. 500 mm/h
#: is above any rain rate a radar sees over 5-10 minutes (world-record 1-hour rain is
#: ~305 mm); reflectivity of weather, hail included, lies within -40..80 dBZ.
DEFAULT_MAX_RAIN_RATE = 500.0
DEFAULT_DBZ_RANGE = (-40.0, 80.0)
#: The optional dependencies of the readers: ``pip install -e ".[radar]"``.
RADAR_EXTRA = 'pip install -e ".[radar]" (pysteps, h5py, pygrib, zarr, ...)'


# Units spellings -> (kind, factor). kind "rate": mm/h = value * factor; "accumulation":
# mm = value * factor, over the accumulation period; "dbz": reflectivity in dBZ.
_UNITS: dict[str, tuple[str, float]] = {}
for _u in ("mm/h", "mm h-1", "mm hr-1", "mm/hr", "mm h^-1", "mm h**-1", "kg m-2 h-1", "mmh-1"):
    _UNITS[_u] = ("rate", 1.0)
for _u in ("mm/s", "mm s-1", "kg m-2 s-1", "kg m**-2 s**-1", "kg m^-2 s^-1", "mm s^-1"):
    _UNITS[_u] = ("rate", 3600.0)
for _u in ("mm", "kg m-2", "kg m**-2", "kg m^-2", "kg/m2", "kg/m^2"):
    _UNITS[_u] = ("accumulation", 1.0)
_UNITS["m"] = ("accumulation", 1000.0)
_UNITS["dbz"] = ("dbz", 1.0)
_STANDARD_NAME_KIND = {
    "rainfall_rate": ("rate", 1.0),
    "precipitation_amount": ("accumulation", 1.0),
    "equivalent_reflectivity_factor": ("dbz", 1.0),
}


class RadarDataError(ValueError):
    """An archive that cannot be read as asked; the message names the file or setting."""


def parse_units(units: str | None, standard_name: str | None = None) -> tuple[str, float]:
    """Classify a units string (or, without one, a CF standard name).

    Parameters
    ----------
    units
        E.g. ``"mm/h"``, ``"kg m-2"``, ``"mm"``, ``"dBZ"``, ``"kg m-2 s-1"``.
    standard_name
        Fallback when ``units`` is ``None``, e.g. ``"precipitation_amount"``.

    Returns
    -------
    ``(kind, factor)``: kind ``"rate"`` (mm/h = value * factor), ``"accumulation"``
    (mm = value * factor) or ``"dbz"``.
    """
    if units is not None:
        key = " ".join(str(units).strip().lower().split())
        if key in _UNITS:
            return _UNITS[key]
    elif standard_name in _STANDARD_NAME_KIND:
        return _STANDARD_NAME_KIND[standard_name]
    raise RadarDataError(
        f"unknown units {units!r} (standard_name {standard_name!r}); use one of "
        "'mm/h', 'mm s-1', 'mm', 'kg m-2', 'dBZ' (set the `units` option to override)"
    )


def block_mean(frames: np.ndarray, factor: int) -> np.ndarray:
    """NaN-aware block average over the last two axes.

    Parameters
    ----------
    frames
        ``(..., H, W)``; trailing rows/columns that do not fill a block are dropped.
    factor
        Block side in pixels; 1 returns ``frames`` unchanged.

    Returns
    -------
    ``(..., H // factor, W // factor)``: the mean of the finite values of each block,
    NaN where a block has none.
    """
    if factor == 1:
        return frames
    h, w = frames.shape[-2:]
    hh, ww = h // factor, w // factor
    frames = frames[..., : hh * factor, : ww * factor]
    # Sum the factor**2 strided sub-grids: much faster than a reduction over a
    # (hh, f, ww, f) reshape, whose inner axes are not contiguous.
    parts = [frames[..., i::factor, j::factor] for i in range(factor) for j in range(factor)]
    if not np.isnan(frames).any():  # the common case: no missing pixel
        return (sum(parts[1:], parts[0].copy()) / np.float32(factor * factor)).astype(frames.dtype, copy=False)
    total = np.zeros(parts[0].shape, dtype=frames.dtype)
    count = np.zeros(parts[0].shape, dtype=np.int32)
    for part in parts:
        valid = np.isfinite(part)
        total += np.where(valid, part, 0)
        count += valid
    with np.errstate(invalid="ignore", divide="ignore"):
        return (total / count).astype(frames.dtype, copy=False)  # NaN where count == 0


@dataclass
class RadarGrid:
    """Coordinates of the frames a datamodule yields (after ``downsample``).

    ``y``/``x`` are the block means of the native coordinates (pixel indices when the
    files have none); a forecast of shape ``padded_shape`` is cropped to ``shape``
    (``[..., :H, :W]``) before writing it on this grid.
    """

    y: np.ndarray
    x: np.ndarray
    y_name: str = "y"
    x_name: str = "x"
    y_attrs: dict = field(default_factory=dict)
    x_attrs: dict = field(default_factory=dict)
    #: Attributes of the CF ``grid_mapping`` variable (projection), if any.
    crs_attrs: dict = field(default_factory=dict)
    padded_shape: tuple[int, int] | None = None

    @property
    def shape(self) -> tuple[int, int]:
        """``(H, W)`` of the unpadded grid."""
        return (len(self.y), len(self.x))

    def coords(self) -> dict[str, xr.Variable]:
        """Coordinates for an ``xarray.Dataset`` holding fields ``(..., y, x)`` on this grid."""
        return {
            self.y_name: xr.Variable(self.y_name, self.y, self.y_attrs),
            self.x_name: xr.Variable(self.x_name, self.x, self.x_attrs),
        }


@dataclass
class _File:
    path: Path
    times: np.ndarray  # datetime64[ns], (n,)
    time_dim: str | None  # None: one frame, no time dimension


def discover_files(
    path: str | Path | Sequence[str | Path], suffixes: Sequence[str] | None = NETCDF_SUFFIXES
) -> tuple[list[Path], set[Path]]:
    """Files named by a directory (searched recursively), a glob, one file, or a list.

    Parameters
    ----------
    path
        Directory, glob pattern (``**`` recurses), file, or a list of those.
    suffixes
        Lower-case suffixes a file found in a directory must have; ``None``: any file
        (hidden files, whose name starts with ``.``, are always left out of a directory).

    Returns
    -------
    ``(files, explicit)``: every file, and the subset named explicitly (a file or a
    glob match), for which a name that does not parse is an error rather than a file
    to ignore.

    Raises
    ------
    FileNotFoundError
        When a named path does not exist or nothing matches (the message repeats it).
    """
    items = [path] if isinstance(path, (str, Path)) else list(path)
    files: list[Path] = []
    explicit: set[Path] = set()
    for item in items:
        p = Path(str(item)).expanduser()
        if p.is_dir():
            found = sorted(
                f for f in p.rglob("*")
                if f.is_file() and not any(part.startswith(".") for part in f.relative_to(p).parts)
                and (suffixes is None or f.suffix.lower() in suffixes)
            )
            files += found
        elif p.is_file():
            files.append(p)
            explicit.add(p)
        elif glob.has_magic(str(p)):
            found = sorted(Path(f) for f in glob.glob(str(p), recursive=True) if Path(f).is_file())
            files += found
            explicit.update(found)
        else:
            raise FileNotFoundError(f"radar path {str(p)!r} does not exist")
    if not files:
        kind = "netCDF files" if suffixes == NETCDF_SUFFIXES else "files"
        raise FileNotFoundError(f"no {kind} match radar path {path!r}")
    return files, explicit


def resolve_paths(path: str | Path | Sequence[str | Path]) -> list[Path]:
    """netCDF files named by a directory (recursive), a glob, one file, or a list."""
    return discover_files(path)[0]


def is_zarr_store(path: object) -> bool:
    """Whether ``path`` names a Zarr store: ``*.zarr``, a folder holding Zarr metadata,
    or an fsspec URL (``s3://...``; only Zarr is read from URLs)."""
    if not isinstance(path, (str, Path)):
        return False
    text = str(path).rstrip("/")
    if "://" in text and not text.startswith("file://"):
        return True
    if text.startswith("file://"):
        text = text[len("file://"):]
    if text.lower().endswith(".zarr"):
        return True
    p = Path(text).expanduser()
    return p.is_dir() and any((p / m).exists() for m in ("zarr.json", ".zgroup", ".zarray"))


def _strftime_regex(fmt: str) -> str:
    """Regex with one group matching what ``datetime.strftime(fmt)`` writes."""
    widths = {"Y": 4, "m": 2, "d": 2, "H": 2, "M": 2, "S": 2, "y": 2, "j": 3}
    out, i = "", 0
    while i < len(fmt):
        if fmt[i] == "%" and i + 1 < len(fmt):
            code = fmt[i + 1]
            if code not in widths:
                raise RadarDataError(
                    f"filename_time_format {fmt!r}: %{code} not supported; give "
                    "filename_time_regex with one group matching the time text"
                )
            out += rf"\d{{{widths[code]}}}"
            i += 2
        else:
            out += re.escape(fmt[i])
            i += 1
    return f"({out})"


def _decode_nc_time(var: netCDF4.Variable, path: Path) -> np.ndarray:
    units = getattr(var, "units", None)
    if units is None or "since" not in units:
        raise RadarDataError(f"{path}: time variable {var.name!r} has no CF units 'X since ...'")
    values = np.ma.atleast_1d(var[...]).ravel()
    dates = netCDF4.num2date(
        values,
        units,
        calendar=getattr(var, "calendar", "standard"),
        only_use_cftime_datetimes=False,
        only_use_python_datetimes=True,
    )
    return np.array([np.datetime64(d.replace(tzinfo=None), "ns") for d in dates])


def _find_time_dim(ds: netCDF4.Dataset, var: netCDF4.Variable) -> str | None:
    for dim in var.dimensions[:-2]:
        coord = ds.variables.get(dim)
        if dim == "time" or (coord is not None and "since" in getattr(coord, "units", "")):
            return dim
    return None


class RadarArchive:
    """A time-sorted index of radar frames (netCDF, pysteps importer or Zarr), read lazily.

    Parameters
    ----------
    path
        Directory (searched recursively), glob pattern, file, or list of those; or a Zarr
        store (``*.zarr``, a folder with Zarr metadata, or an fsspec URL).
    importer
        Name of a pysteps importer (``pysteps.io.get_method(importer, "importer")``), e.g.
        ``"knmi_hdf5"``, ``"odim_hdf5"``, ``"fmi_pgm"``, ``"mrms_grib"``; ``None``: CF
        netCDF (or Zarr). Needs ``filename_time_format``. Files found in a directory whose
        names do not match it are not frames: they are ignored and counted in the log.
    importer_kwargs
        Passed to the importer, e.g. ``{"qty": "DBZH"}`` or ``{"window_size": 4}``.
    name
        Name of the archive in logs, errors and per-archive scores; default: the last
        component of ``path``.
    variable
        Name of the precipitation variable (netCDF, Zarr); ``None`` picks the one whose
        CF ``standard_name`` is ``rainfall_rate``, ``precipitation_amount`` or
        ``equivalent_reflectivity_factor``.
    time_variable
        Scalar time variable of per-time-step netCDF files (BoM: ``valid_time``).
    filename_time_format
        ``strftime`` format of the time in per-time-step file names (e.g.
        ``"%Y%m%d_%H%M%S"``); when given, files are not opened at scan time.
    filename_time_regex
        Regex with one group capturing the time text; built from
        ``filename_time_format`` when ``None``.
    units
        Units of the values (overrides the file's ``units`` attribute or the importer's
        ``unit``), see :func:`parse_units`.
    accumulation_minutes
        Period of an accumulation in minutes; ``None``: the importer's ``accutime`` or
        the archive's time step.
    zr_a, zr_b
        Z-R relation ``Z = a R^b`` for reflectivity (dBZ) input; ``None``: the
        importer's (FMI: 223, 1.53), else Marshall-Palmer (200, 1.6).
    downsample
        Block-average factor applied to every frame (NaN-aware).
    skip_bad_files
        Warn about and leave out unreadable files (and read a frame of an unreadable file
        found later as all-missing) instead of raising.
    chunks
        Dask chunks for netCDF files with a time dimension (``xarray.open_dataset``),
        e.g. ``{"time": 1}``; ``None`` reads lazily without dask.
    time_step
        Native time step, e.g. ``"10min"``; ``None`` infers the most common spacing.
    cache_frames
        Decoded frames kept per process (LRU); a window's worth serves sliding windows.
    max_rain_rate
        Plausibility ceiling in mm/h: larger values (after conversion) are masked (NaN)
        with a warning naming the file and the count; ``None`` disables the check.
    dbz_range
        ``[min, max]`` plausible reflectivity in dBZ for dBZ input; values outside are
        masked the same way; ``None`` disables the check.
    strict_values
        Raise :class:`RadarDataError` on implausible values instead of masking them.
    """

    def __init__(
        self,
        path: str | Path | Sequence[str | Path],
        variable: str | None = None,
        time_variable: str = "valid_time",
        filename_time_format: str | None = None,
        filename_time_regex: str | None = None,
        units: str | None = None,
        accumulation_minutes: float | None = None,
        zr_a: float | None = None,
        zr_b: float | None = None,
        downsample: int = 1,
        skip_bad_files: bool = False,
        chunks: dict | int | str | None = None,
        time_step: str | None = None,
        cache_frames: int = 16,
        importer: str | None = None,
        importer_kwargs: Mapping[str, Any] | None = None,
        name: str | None = None,
        max_rain_rate: float | None = DEFAULT_MAX_RAIN_RATE,
        dbz_range: Sequence[float] | None = DEFAULT_DBZ_RANGE,
        strict_values: bool = False,
    ) -> None:
        if int(downsample) < 1:
            raise ValueError(f"downsample must be >= 1, got {downsample}")
        if dbz_range is not None and (len(dbz_range) != 2 or dbz_range[0] >= dbz_range[1]):
            raise ValueError(f"dbz_range must be [min, max] with min < max, got {dbz_range!r}")
        self.variable = variable
        self.time_variable = time_variable
        self.filename_time_format = filename_time_format
        self.filename_time_regex = filename_time_regex
        self.zr_a = None if zr_a is None else float(zr_a)
        self.zr_b = None if zr_b is None else float(zr_b)
        self.downsample = int(downsample)
        self.skip_bad_files = skip_bad_files
        self.chunks = chunks
        self.cache_frames = int(cache_frames)
        self.importer = importer
        self.importer_kwargs = dict(importer_kwargs or {})  # DictConfig -> dict
        self.max_rain_rate = None if max_rain_rate is None else float(max_rain_rate)
        self.dbz_range = None if dbz_range is None else (float(dbz_range[0]), float(dbz_range[1]))
        self.strict_values = bool(strict_values)
        self.path = path
        self.name = name or _default_name(path)
        self._handles: OrderedDict[Path, xr.Dataset | netCDF4.Dataset] = OrderedDict()
        self._cache: OrderedDict[int, np.ndarray] = OrderedDict()
        self._warned: set[Path] = set()
        self._zarr: xr.Dataset | None = None
        self._accutime: float | None = None
        self._units = units
        self.ignored_files = 0

        if importer is not None:
            self.backend = "pysteps"
            self._importer_fn = get_importer(importer)
            _check_importer_kwargs(importer, self._importer_fn, self.importer_kwargs)
            files = self._scan_importer(path)
        elif is_zarr_store(path):
            self.backend = "zarr"
            files = self._scan_zarr(str(path), units)
        else:
            self.backend = "netcdf"
            paths = resolve_paths(path)
            self._inspect_first(paths, units)
            files = self._scan(paths)
        self._build_index(files, time_step)
        self._unit_factor = self._factor  # before the accumulation period is divided out
        if self.kind == "accumulation":
            minutes = accumulation_minutes or self._accutime or self.step / np.timedelta64(1, "m")
            self.accumulation_minutes = float(minutes)
            # mm over `minutes` -> mm/h
            self._factor = self._factor * 60.0 / self.accumulation_minutes
        else:
            self.accumulation_minutes = accumulation_minutes
        log.info(
            "radar archive %r (%s): %d frames in %d files, %s .. %s, step %s, variable %r (%s), "
            "grid %dx%d -> %dx%d",
            self.name, importer or self.backend, len(self.times), len(self.files),
            self.times[0], self.times[-1], f"{self.step / np.timedelta64(1, 'm'):g} min",
            self.variable, self.source_units, *self.native_shape, *self.shape,
        )

    @property
    def zr(self) -> tuple[float, float]:
        """``(a, b)`` of the Z-R relation in use."""
        return (self.zr_a if self.zr_a is not None else 200.0,
                self.zr_b if self.zr_b is not None else 1.6)

    # ------------------------------------------------------------------ pysteps importers
    def _scan_importer(self, path: str | Path | Sequence[str | Path]) -> list[_File]:
        """Times from the file names; grid, units and projection from the first frame."""
        if self.filename_time_format is None:
            raise RadarDataError(
                f"radar archive {self.name!r}: importer {self.importer!r} needs "
                "filename_time_format (the strftime pattern of the time in the file names, "
                "e.g. '%Y%m%d%H%M'): pysteps importers do not return the time"
            )
        paths, explicit = discover_files(path, suffixes=None)
        files: list[_File] = []
        ignored: list[Path] = []
        for p in paths:
            times = self._match_time(p)
            if times is None:
                if p in explicit:
                    raise RadarDataError(
                        f"{p}: file name does not match filename_time_format="
                        f"{self.filename_time_format!r} (regex {self._time_regex()!r})"
                    )
                ignored.append(p)
                continue
            files.append(_File(p, times, None))
        if ignored:
            log.info(
                "radar archive %r: ignored %d file(s) whose names do not match "
                "filename_time_format=%r (not frames), e.g. %s",
                self.name, len(ignored), self.filename_time_format, ignored[0],
            )
        self.ignored_files = len(ignored)
        if not files:
            raise RadarDataError(
                f"radar archive {self.name!r}: none of the {len(paths)} files under {path!r} has "
                f"a name matching filename_time_format={self.filename_time_format!r} "
                f"(e.g. {paths[0].name!r})"
            )
        for f in sorted(files, key=lambda f: f.times[0]):
            imported = self._import(f.path)
            if imported is not None:
                self._inspect_import(f.path, *imported)
                return files
        raise RadarDataError(f"none of the {len(files)} radar files could be read")

    def _import(self, path: Path) -> tuple[np.ndarray, dict] | None:
        """``(values, metadata)`` from the importer; ``None`` for a bad file when skipping."""
        from pysteps.exceptions import MissingOptionalDependency

        try:
            values, _, meta = self._importer_fn(str(path), **self.importer_kwargs)
        except MissingOptionalDependency as error:
            raise RadarDataError(
                f"importer {self.importer!r} cannot read {path}: {error}; install the "
                f"readers' extra: {RADAR_EXTRA}"
            ) from error
        except TypeError as error:
            if "keyword argument" in str(error):
                raise RadarDataError(
                    f"importer {self.importer!r}: {error} (importer_kwargs={self.importer_kwargs})"
                ) from error
            return self._bad_read(path, error)
        except Exception as error:  # noqa: BLE001 - importers raise anything on a bad file
            return self._bad_read(path, error)
        return np.asarray(values, dtype=np.float64), dict(meta)

    def _bad_read(self, path: Path, error: Exception) -> None:
        message = f"cannot read radar file {path} with importer {self.importer!r}: " \
                  f"{type(error).__name__}: {error}"
        if not self.skip_bad_files:
            raise RadarDataError(message + " (skip_bad_files=true warns and goes on)") from error
        if path not in self._warned:
            self._warned.add(path)
            log.warning("%s; its frame is treated as missing", message)
            warnings.warn(f"{message}; its frame is treated as missing", RuntimeWarning, stacklevel=4)
        return None

    def _inspect_import(self, path: Path, values: np.ndarray, meta: dict) -> None:
        if values.ndim != 2:
            raise RadarDataError(
                f"{path}: importer {self.importer!r} returned an array of shape {values.shape}; "
                "expected one 2-D frame (y, x)"
            )
        self._first_path = path
        self._geo = _geo_key(meta, values.shape)
        self.native_shape = tuple(int(s) for s in values.shape)
        self.y_name, self.x_name = "y", "x"
        self._y, self._x, self.y_attrs, self.x_attrs = _pysteps_coords(meta, values.shape)
        self.crs_attrs = _crs_attrs(meta.get("projection"))
        self.variable = self.importer_kwargs.get("qty", self.importer)
        self._units_override = self._units
        self.source_units = self._units if self._units is not None else meta.get("unit")
        self.kind, self._factor = parse_units(self.source_units)
        self._accutime = meta.get("accutime")

    def _pysteps_rate(self, path: Path, values: np.ndarray, meta: dict) -> np.ndarray:
        """Importer output -> mm/h with :func:`pysteps.utils.conversion.to_rainrate`."""
        from pysteps.utils.conversion import to_rainrate

        geo = _geo_key(meta, values.shape)
        if geo != self._geo:
            raise RadarDataError(
                f"{path}: grid {_geo_text(geo)} differs from that of {self._first_path} "
                f"({_geo_text(self._geo)}); all frames of archive {self.name!r} must share one grid"
            )
        if self._units_override is not None:
            meta["unit"] = {"rate": "mm/h", "accumulation": "mm", "dbz": "dBZ"}[self.kind]
            if self.kind == "dbz":
                meta["transform"] = "dB"
            else:
                values = values * self._unit_factor
                meta["transform"] = None
        if self.kind == "dbz":
            values = self._plausible(values, self.dbz_range, "dBZ", path)
        if self.kind == "accumulation":
            meta["accutime"] = self.accumulation_minutes
        with np.errstate(invalid="ignore"):
            rate, meta = to_rainrate(values, meta, self.zr_a, self.zr_b)
            threshold = meta.get("threshold")
            if threshold is not None and np.isfinite(threshold):
                rate = np.where(rate < threshold, 0.0, rate)  # "no rain" below it; NaN stays
        return np.maximum(rate, 0.0).astype(np.float32)

    # ------------------------------------------------------------------ Zarr
    def _scan_zarr(self, url: str, units: str | None) -> list[_File]:
        ds = self._open_zarr(url)
        names = {n: ds[n].attrs.get("standard_name") for n in ds.data_vars}
        if self.variable is None:
            found = [n for sn in PRECIP_STANDARD_NAMES for n, s in names.items() if s == sn]
            if not found:
                raise RadarDataError(
                    f"Zarr store {url}: no variable with standard_name in "
                    f"{list(PRECIP_STANDARD_NAMES)}; set `variable` to one of: {', '.join(names)}"
                )
            self.variable = found[0]
        if self.variable not in ds.data_vars:
            raise RadarDataError(
                f"Zarr store {url}: no variable {self.variable!r}; variables present: "
                f"{', '.join(names) or 'none'}"
            )
        da = ds[self.variable]
        time_dims = [d for d in da.dims if d == "time" or (d in ds.coords and ds[d].dtype.kind == "M")]
        if not time_dims:
            raise RadarDataError(
                f"Zarr store {url}: variable {self.variable!r} has dimensions {da.dims}; "
                "expected (time, y, x) with a datetime time coordinate"
            )
        td = time_dims[0]
        if td not in ds.coords or ds[td].dtype.kind != "M":
            raise RadarDataError(f"Zarr store {url}: time dimension {td!r} has no datetime coordinate")
        extra = [d for d in da.dims[:-2] if d != td and da.sizes[d] != 1]
        if extra or da.ndim < 3 or td in da.dims[-2:]:
            raise RadarDataError(
                f"Zarr store {url}: variable {self.variable!r} has dimensions {da.dims}; expected "
                "(time, y, x) with any other dimension of size 1"
            )
        self.y_name, self.x_name = (str(d) for d in da.dims[-2:])
        self.native_shape = (int(da.sizes[self.y_name]), int(da.sizes[self.x_name]))
        coords = []
        for name in (self.y_name, self.x_name):
            c = ds.coords.get(name)
            coords.append(np.arange(da.sizes[name], dtype=float) if c is None else np.asarray(c.values, float))
        self._y, self._x = coords
        self.y_attrs = dict(ds[self.y_name].attrs) if self.y_name in ds.coords else {}
        self.x_attrs = dict(ds[self.x_name].attrs) if self.x_name in ds.coords else {}
        mapping = da.attrs.get("grid_mapping") or da.encoding.get("grid_mapping")
        self.crs_attrs = dict(ds[mapping].attrs) if mapping and mapping in ds.variables else {}
        self.source_units = units if units is not None else da.attrs.get("units")
        self.kind, self._factor = parse_units(self.source_units, da.attrs.get("standard_name"))
        if self.source_units is None:
            self.source_units = {"rate": "mm/h", "accumulation": "mm", "dbz": "dBZ"}[self.kind]
        self._zarr_url = url
        self._zarr = ds
        self._time_dim = td
        return [_File(Path(url), ds[td].values.astype("datetime64[ns]"), td)]

    @staticmethod
    def _open_zarr(url: str) -> xr.Dataset:
        try:
            # chunks=None: lazily indexed arrays without dask, a window reads only its chunks
            return xr.open_zarr(url, chunks=None)
        except ImportError as error:
            raise RadarDataError(f"reading the Zarr store {url} needs {error.name}: {RADAR_EXTRA}") from error
        except (FileNotFoundError, KeyError, ValueError, OSError) as error:
            raise RadarDataError(f"cannot open Zarr store {url}: {type(error).__name__}: {error}") from error

    def _zarr_dataset(self) -> xr.Dataset:
        if self._zarr is None:  # after pickling into a DataLoader worker
            self._zarr = self._open_zarr(self._zarr_url)
        return self._zarr

    # ------------------------------------------------------------------ plausibility
    def _plausible(self, values: np.ndarray, bounds: tuple[float, float] | None, unit: str,
                   where: object) -> np.ndarray:
        """Mask values outside ``bounds`` (NaN), warning once per file; raise if strict."""
        if bounds is None:
            return values
        with np.errstate(invalid="ignore"):
            bad = (values < bounds[0]) | (values > bounds[1])
        count = int(bad.sum())
        if not count:
            return values
        worst = float(np.nanmax(np.abs(values[bad])))
        message = (
            f"{where}: {count} value(s) outside the plausible range "
            f"[{bounds[0]:g}, {bounds[1]:g}] {unit} (largest magnitude {worst:.3g})"
        )
        if self.strict_values:
            raise RadarDataError(message + " (strict_values=true)")
        key = ("implausible", str(where))
        if key not in self._warned:
            self._warned.add(key)  # type: ignore[arg-type]
            log.warning("%s; masked as missing", message)
            warnings.warn(f"{message}; masked as missing", RuntimeWarning, stacklevel=4)
        return np.where(bad, np.nan, values).astype(values.dtype, copy=False)

    # ------------------------------------------------------------------ scanning
    def _bad_file(self, path: Path, error: Exception) -> None:
        message = f"cannot read radar file {path}: {type(error).__name__}: {error}"
        if not self.skip_bad_files:
            raise RadarDataError(message + " (skip_bad_files=True leaves it out)") from error
        log.warning("%s; skipped", message)
        warnings.warn(f"{message}; skipped", RuntimeWarning, stacklevel=3)

    def _readable(self, paths: list[Path]) -> Iterator[tuple[Path, netCDF4.Dataset]]:
        """Open each file in turn (closed after use); unreadable ones go to :meth:`_bad_file`."""
        for path in paths:
            try:
                ds = netCDF4.Dataset(path)
            except OSError as error:
                self._bad_file(path, error)
                continue
            with ds:
                yield path, ds

    def _inspect_first(self, paths: list[Path], units: str | None) -> None:
        """Variable, grid, units and layout from the first readable file."""
        for path, ds in self._readable(paths):
            self._inspect(ds, path, units)
            return
        raise RadarDataError(f"none of the {len(paths)} radar files could be read")

    def _inspect(self, ds: netCDF4.Dataset, path: Path, units: str | None) -> None:
        names = {
            n: getattr(v, "standard_name", None)
            for n, v in ds.variables.items()
            if n not in ds.dimensions
        }
        listing = ", ".join(f"{n} ({s})" if s else n for n, s in names.items())
        if self.variable is None:
            for standard_name in PRECIP_STANDARD_NAMES:
                found = [n for n, s in names.items() if s == standard_name]
                if found:
                    self.variable = found[0]
                    break
            else:
                raise RadarDataError(
                    f"{path}: no variable with standard_name in {list(PRECIP_STANDARD_NAMES)}; "
                    f"set `variable` to one of: {listing}"
                )
        if self.variable not in ds.variables:
            raise RadarDataError(
                f"{path}: no variable {self.variable!r}; variables present: {listing}"
            )
        var = ds.variables[self.variable]
        if var.ndim < 2:
            raise RadarDataError(f"{path}: variable {self.variable!r} is not a 2-D field")
        self._time_dim = _find_time_dim(ds, var)
        extra = [d for d in var.dimensions[:-2] if d != self._time_dim and ds.dimensions[d].size != 1]
        if extra:
            raise RadarDataError(
                f"{path}: variable {self.variable!r} has dimensions {var.dimensions}; expected "
                "([time,] y, x) with any other dimension of size 1"
            )
        self.y_name, self.x_name = var.dimensions[-2:]
        self.native_shape = tuple(int(s) for s in var.shape[-2:])
        self._y, self._x = self._coords(ds, path)
        self.y_attrs = self._attrs(ds, self.y_name)
        self.x_attrs = self._attrs(ds, self.x_name)
        mapping = getattr(var, "grid_mapping", None)
        self.crs_attrs = self._attrs(ds, mapping) if mapping else {}
        self.source_units = units if units is not None else getattr(var, "units", None)
        self.kind, self._factor = parse_units(self.source_units, getattr(var, "standard_name", None))
        if units is None and self.source_units is None:
            self.source_units = {"rate": "mm/h", "accumulation": "mm", "dbz": "dBZ"}[self.kind]

    @staticmethod
    def _attrs(ds: netCDF4.Dataset, name: str) -> dict:
        var = ds.variables.get(name)
        return {} if var is None else {k: var.getncattr(k) for k in var.ncattrs()}

    def _coords(self, ds: netCDF4.Dataset, path: Path) -> tuple[np.ndarray, np.ndarray]:
        out = []
        for name, size in ((self.y_name, self.native_shape[0]), (self.x_name, self.native_shape[1])):
            var = ds.variables.get(name)
            out.append(np.arange(size, dtype=float) if var is None else np.asarray(var[:], dtype=float))
        return out[0], out[1]

    def _time_regex(self) -> str:
        return self.filename_time_regex or _strftime_regex(self.filename_time_format or "")

    def _match_time(self, path: Path) -> np.ndarray | None:
        """``(1,)`` datetime64 from the file name; ``None`` if the name does not match."""
        match = re.search(self._time_regex(), path.name)
        if match is None:
            return None
        text = match.group(1)
        try:
            when = datetime.strptime(text, self.filename_time_format or "")
        except ValueError as error:
            raise RadarDataError(f"{path}: cannot parse time {text!r}: {error}") from error
        return np.array([np.datetime64(when, "ns")])

    def _time_from_name(self, path: Path) -> np.ndarray:
        times = self._match_time(path)
        if times is None:
            raise RadarDataError(
                f"{path}: file name does not match the time pattern {self._time_regex()!r} "
                f"(filename_time_format={self.filename_time_format!r})"
            )
        return times

    def _scan(self, paths: list[Path]) -> list[_File]:
        if self.filename_time_format is not None and self._time_dim is None:
            # Times from the names: no file is opened; grids are checked as frames are read.
            # Files found in a directory whose names do not match are not frames.
            explicit = discover_files(self.path)[1]
            files = []
            for p in paths:
                times = self._match_time(p)
                if times is None and p in explicit:
                    self._time_from_name(p)  # raises, naming the file
                if times is not None:
                    files.append(_File(p, times, None))
            self.ignored_files = len(paths) - len(files)
            if self.ignored_files:
                log.info("radar archive %r: ignored %d file(s) whose names do not match %r",
                         self.name, self.ignored_files, self.filename_time_format)
            if not files:
                raise RadarDataError(
                    f"radar archive {self.name!r}: no file name matches "
                    f"filename_time_format={self.filename_time_format!r}"
                )
            return files
        files = [self._scan_one(ds, path) for path, ds in self._readable(paths)]
        if not files:
            raise RadarDataError(f"none of the {len(paths)} radar files could be read")
        return files

    def _scan_one(self, ds: netCDF4.Dataset, path: Path) -> _File:
        if self.variable not in ds.variables:
            listing = ", ".join(n for n in ds.variables if n not in ds.dimensions)
            raise RadarDataError(
                f"{path}: no variable {self.variable!r}; variables present: {listing}"
            )
        var = ds.variables[self.variable]
        shape = tuple(var.shape[-2:])
        y, x = (None, None)
        if shape == self.native_shape:
            y, x = self._coords(ds, path)
        if shape != self.native_shape or not (np.allclose(y, self._y) and np.allclose(x, self._x)):
            raise RadarDataError(
                f"{path}: grid of {self.variable!r} ({shape[0]}x{shape[1]}, {self.y_name} "
                f"{_span(y)}, {self.x_name} {_span(x)}) differs from the first file's "
                f"({self.native_shape[0]}x{self.native_shape[1]}, {self.y_name} {_span(self._y)}, "
                f"{self.x_name} {_span(self._x)}); all files must share one grid"
            )
        time_dim = _find_time_dim(ds, var)
        if time_dim is not None:
            times = _decode_nc_time(ds.variables[time_dim], path) if time_dim in ds.variables else None
            if times is None:
                raise RadarDataError(f"{path}: time dimension {time_dim!r} has no coordinate")
            return _File(path, times, time_dim)
        if self.filename_time_format is not None:
            return _File(path, self._time_from_name(path), None)
        if self.time_variable not in ds.variables:
            raise RadarDataError(
                f"{path}: no time dimension and no time variable {self.time_variable!r}; "
                "set `time_variable` or `filename_time_format`"
            )
        times = _decode_nc_time(ds.variables[self.time_variable], path)
        if times.size != 1:
            raise RadarDataError(f"{path}: time variable {self.time_variable!r} is not scalar")
        return _File(path, times, None)

    def _build_index(self, files: list[_File], time_step: str | None) -> None:
        self.files = [f.path for f in files]
        self._time_dims = [f.time_dim for f in files]
        times = np.concatenate([f.times for f in files])
        file_index = np.concatenate([np.full(len(f.times), i) for i, f in enumerate(files)])
        local = np.concatenate([np.arange(len(f.times)) for f in files])
        order = np.argsort(times, kind="stable")
        if np.any(order != np.arange(len(order))):
            log.info("radar frames are not in time order; sorting %d frames by time", len(order))
        times, file_index, local = times[order], file_index[order], local[order]
        dup = np.flatnonzero(times[1:] == times[:-1])
        if dup.size:
            shown = [
                f"{times[i]} in {self.files[file_index[i]]} and {self.files[file_index[i + 1]]}"
                for i in dup[:5]
            ]
            raise RadarDataError(
                f"{dup.size} duplicate frame time(s): " + "; ".join(shown)
                + ("; ..." if dup.size > 5 else "")
            )
        infer = time_step is None or time_step == _SINGLE_FRAME_STEP
        if len(times) < 2 and time_step is None:
            raise RadarDataError(
                f"the radar archive {self.name!r} has {len(times)} frame(s); at least one "
                "window is needed"
            )
        self.times = times.astype("datetime64[ns]")
        self._file_index = file_index
        self._local = local
        if len(times) < 2 and infer:
            self.step = np.timedelta64(0, "ns")  # one frame: no step (read_frames only)
        elif not infer:
            self.step = np.timedelta64(_to_timedelta(time_step), "ns")
        else:
            diffs, counts = np.unique(np.diff(self.times), return_counts=True)
            self.step = diffs[np.argmax(counts)]
        # Downsampled grid.
        f = self.downsample
        self.shape = (self.native_shape[0] // f, self.native_shape[1] // f)
        if self.shape[0] == 0 or self.shape[1] == 0:
            raise RadarDataError(f"downsample={f} is larger than the grid {self.native_shape}")
        if f > 1 and (self.native_shape[0] % f or self.native_shape[1] % f):
            log.warning(
                "grid %s is not a multiple of downsample=%d; the last rows/columns are dropped",
                self.native_shape, f,
            )

    # ------------------------------------------------------------------ public
    def __len__(self) -> int:
        return len(self.times)

    def frame_files(self, indices: Sequence[int] | np.ndarray | None = None) -> list[Path]:
        """The file holding each frame ``indices`` (positions on the sorted time axis;
        default: all), in that order. A file with a time dimension appears once per frame;
        a Zarr store's frames all name the store."""
        idx = np.arange(len(self.times)) if indices is None else np.asarray(indices, dtype=np.int64)
        return [Path(str(self.files[int(i)])) for i in self._file_index[idx]]

    def grid(self, pad_multiple: int = 1) -> RadarGrid:
        """The (downsampled) grid; ``padded_shape`` rounds it up to ``pad_multiple``."""
        f = self.downsample
        y = self._y[: self.shape[0] * f].reshape(-1, f).mean(axis=1)  # (H,) block centres
        x = self._x[: self.shape[1] * f].reshape(-1, f).mean(axis=1)  # (W,)
        padded = tuple(-(-s // pad_multiple) * pad_multiple for s in self.shape)
        return RadarGrid(
            y=np.asarray(y), x=np.asarray(x), y_name=self.y_name, x_name=self.x_name,
            y_attrs=dict(self.y_attrs), x_attrs=dict(self.x_attrs),
            crs_attrs=dict(self.crs_attrs), padded_shape=padded,  # type: ignore[arg-type]
        )

    def read(self, indices: Sequence[int] | np.ndarray, cache: bool = True) -> np.ndarray:
        """Frames ``indices`` (positions on the sorted time axis) as rain rate.

        Returns
        -------
        ``(len(indices), H, W)`` float32 in mm/h, NaN where missing; ``(H, W)`` is the
        downsampled grid :attr:`shape`.
        """
        indices = [int(i) for i in indices]
        out = np.empty((len(indices), *self.shape), dtype=np.float32)
        missing = []
        for k, i in enumerate(indices):
            frame = self._cache.get(i) if cache else None
            if frame is None:
                missing.append((k, i))
            else:
                self._cache.move_to_end(i)
                out[k] = frame
        # Group consecutive frames of one time-dimension file into one slice read.
        start = 0
        while start < len(missing):
            end = start + 1
            fi = self._file_index[missing[start][1]]
            while (
                end < len(missing)
                and self._time_dims[fi] is not None
                and self._file_index[missing[end][1]] == fi
                and self._local[missing[end][1]] == self._local[missing[end - 1][1]] + 1
            ):
                end += 1
            group = missing[start:end]
            frames = self._read_rate(fi, int(self._local[group[0][1]]), len(group))
            frames = block_mean(frames, self.downsample)
            for (k, i), frame in zip(group, frames):
                out[k] = frame
                if cache and self.cache_frames > 0:
                    self._cache[i] = frame
                    if len(self._cache) > self.cache_frames:
                        self._cache.popitem(last=False)
            start = end
        return out

    def _read_rate(self, file_index: int, local: int, count: int) -> np.ndarray:
        """``count`` native-grid frames of one file in mm/h, implausible values masked."""
        path = self.files[file_index]
        where = path if self._time_dims[file_index] is None else (
            f"{path} at {self.times[np.flatnonzero((self._file_index == file_index) & (self._local == local))[0]]}"
        )
        if self.backend == "pysteps":
            imported = self._import(path)
            if imported is None:
                return np.full((count, *self.native_shape), np.nan, dtype=np.float32)
            rate = self._pysteps_rate(path, *imported)[None]
        else:
            raw = self._read_native(file_index, local, count)
            if self.kind == "dbz":
                raw = self._plausible(raw, self.dbz_range, "dBZ", where)
            rate = self._to_rain_rate(raw)
        ceiling = None if self.max_rain_rate is None else (-np.inf, self.max_rain_rate)
        return self._plausible(rate, ceiling, "mm/h", where)

    def read_native(self, index: int) -> np.ndarray:
        """Frame ``index`` as stored: ``(H, W)`` float32 in :attr:`source_units`, native
        grid (no downsampling), NaN where missing. Used to re-pack an archive."""
        i = int(index)
        return self._read_native(int(self._file_index[i]), int(self._local[i]), 1)[0]

    # ------------------------------------------------------------------ reading
    def _to_rain_rate(self, raw: np.ndarray) -> np.ndarray:
        """Native values -> mm/h, float32; NaN stays NaN; small negative values -> 0."""
        if self.kind == "dbz":
            rate = dbz_to_rain_rate(raw.astype(np.float32), *self.zr)
        else:
            rate = raw.astype(np.float32) * np.float32(self._factor)
        return np.maximum(rate, np.float32(0.0)).astype(np.float32, copy=False)  # keeps NaN

    def _read_native(self, file_index: int, local: int, count: int) -> np.ndarray:
        path = self.files[file_index]
        time_dim = self._time_dims[file_index]
        try:
            if time_dim is None:
                with netCDF4.Dataset(path) as ds:
                    if self.variable not in ds.variables:
                        listing = ", ".join(n for n in ds.variables if n not in ds.dimensions)
                        raise RadarDataError(
                            f"{path}: no variable {self.variable!r}; variables present: {listing}"
                        )
                    data = _decode_cf(ds.variables[self.variable])
                data = data.reshape(data.shape[-2:]) if data.ndim > 2 else data
                frames = data[None]
            elif self.backend == "zarr":
                da = self._zarr_dataset()[self.variable].isel({time_dim: slice(local, local + count)})
                da = da.squeeze([d for d in da.dims[:-2] if d != time_dim])
                frames = np.asarray(da.transpose(time_dim, *da.dims[-2:]).values, dtype=np.float32)
            else:
                ds = self._open(path)
                if isinstance(ds, netCDF4.Dataset):  # no dask: read the slice directly
                    var = ds.variables[self.variable]
                    key = tuple(
                        slice(local, local + count) if d == time_dim else 0
                        for d in var.dimensions[:-2]
                    )
                    frames = _decode_cf(var, key)  # (count, H, W)
                else:
                    da = ds[self.variable].isel({time_dim: slice(local, local + count)})
                    da = da.squeeze([d for d in da.dims[:-2] if d != time_dim and da.sizes[d] == 1])
                    da = da.transpose(time_dim, *da.dims[-2:])
                    # synchronous: no dask thread pool inside DataLoader workers
                    frames = np.asarray(da.compute(scheduler="synchronous").values, dtype=np.float32)
        except RadarDataError:
            raise
        except (OSError, RuntimeError, KeyError, IndexError) as error:
            message = f"cannot read radar file {path}: {type(error).__name__}: {error}"
            if not self.skip_bad_files:
                raise RadarDataError(message) from error
            if path not in self._warned:
                self._warned.add(path)
                log.warning("%s; its frames are treated as missing", message)
            return np.full((count, *self.native_shape), np.nan, dtype=np.float32)
        if frames.shape[-2:] != self.native_shape:
            raise RadarDataError(
                f"{path}: grid of {self.variable!r} is {frames.shape[-2]}x{frames.shape[-1]}, "
                f"the first file's is {self.native_shape[0]}x{self.native_shape[1]}; all files "
                "must share one grid"
            )
        return frames

    def _open(self, path: Path) -> xr.Dataset | netCDF4.Dataset:
        ds = self._handles.get(path)
        if ds is None:
            if self.chunks is None:
                ds = netCDF4.Dataset(path)
            else:
                ds = xr.open_dataset(path, chunks=self.chunks, cache=False, decode_times=False)
            self._handles[path] = ds
            if len(self._handles) > 8:  # bound the open handles per process
                self._handles.popitem(last=False)[1].close()
        else:
            self._handles.move_to_end(path)
        return ds

    def close(self) -> None:
        """Close the open file handles of this process and drop the frame cache."""
        for ds in self._handles.values():
            ds.close()
        self._handles.clear()
        self._cache.clear()

    def __getstate__(self) -> dict:
        # DataLoader workers get their own handles and cache; handles do not pickle.
        state = self.__dict__.copy()
        state["_handles"] = OrderedDict()
        state["_cache"] = OrderedDict()
        state["_zarr"] = None  # reopened lazily in the worker
        return state


def _decode_cf(var: netCDF4.Variable, key: tuple = ()) -> np.ndarray:
    """Read ``var[key + (:, :)]`` and apply CF decoding as xarray does, in float32.

    ``_FillValue`` and ``missing_value`` become NaN, then ``scale_factor`` and
    ``add_offset`` apply; ``valid_range`` is ignored (as ``xarray.decode_cf`` does).
    25 % faster than netCDF4's own masked-array float64 decoding.
    """
    var.set_auto_maskandscale(False)
    raw = np.asarray(var[(*key, slice(None), slice(None))])
    out = raw.astype(np.float32)
    missing = np.zeros(raw.shape, dtype=bool)
    for name in ("_FillValue", "missing_value"):
        if name in var.ncattrs():
            for value in np.atleast_1d(var.getncattr(name)):
                missing |= np.isnan(out) if np.isnan(value) else raw == value
    if "scale_factor" in var.ncattrs():
        out *= np.float32(var.getncattr("scale_factor"))
    if "add_offset" in var.ncattrs():
        out += np.float32(var.getncattr("add_offset"))
    out[missing] = np.nan
    return out


def _span(values: np.ndarray | None) -> str:
    if values is None or len(values) == 0:
        return "?"
    return f"{values[0]:g}..{values[-1]:g}"


def _to_timedelta(value: str) -> np.timedelta64:
    import pandas as pd

    return pd.Timedelta(value).to_timedelta64()


# ---------------------------------------------------------------------- helpers
def _default_name(path: object) -> str:
    if isinstance(path, (str, Path)):
        text = str(path).rstrip("/")
        name = Path(text.split("://")[-1]).name
        return name[: -len(".zarr")] if name.lower().endswith(".zarr") else (name or text)
    items = list(path)  # type: ignore[call-overload]
    return _default_name(Path(str(items[0])).parent) if items else "radar"


def importer_names() -> list[str]:
    """Names of the pysteps importers (empty without pysteps)."""
    try:
        from pysteps.io import interface
    except ImportError:
        return []
    return sorted(interface._importer_methods)


def get_importer(name: str) -> Any:
    """The pysteps importer called ``name``; the error lists the valid names."""
    try:
        import pysteps.io
    except ImportError as error:
        raise RadarDataError(f"importer {name!r} needs pysteps: {RADAR_EXTRA}") from error
    try:
        return pysteps.io.get_method(name, "importer")
    except ValueError as error:
        raise RadarDataError(
            f"unknown importer {name!r}; valid names: {', '.join(importer_names())} "
            "(null reads CF netCDF or Zarr)"
        ) from error


def _check_importer_kwargs(name: str, fn: Any, kwargs: Mapping[str, Any]) -> None:
    """Unknown ``importer_kwargs`` are typos: pysteps importers would silently put them
    into the metadata (``**kwargs``), so they are an error here, naming the valid ones."""
    import inspect

    params = inspect.signature(fn).parameters
    valid = [p for p, v in params.items() if p != "filename" and v.kind is not v.VAR_KEYWORD]
    valid += ["dtype", "fillna"]  # pysteps' postprocess_import decorator
    unknown = sorted(set(kwargs) - set(valid))
    if unknown:
        raise RadarDataError(
            f"importer {name!r}: unexpected keyword argument(s) {unknown} in importer_kwargs="
            f"{dict(kwargs)}; it takes {valid}"
        )


def _geo_key(meta: dict, shape: tuple[int, ...]) -> tuple:
    """What must not change between the frames of one archive: shape and extent."""
    extent = tuple(round(float(meta[k]), 3) if meta.get(k) is not None else None
                   for k in ("x1", "y1", "x2", "y2"))
    return (tuple(int(s) for s in shape), extent, meta.get("projection"))


def _geo_text(key: tuple) -> str:
    (h, w), (x1, y1, x2, y2), _ = key
    return f"{h}x{w}, x {x1}..{x2}, y {y1}..{y2}"


def _pysteps_coords(meta: dict, shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray, dict, dict]:
    """Pixel-centre coordinates ``(y, x)`` and their CF attributes from pysteps metadata."""
    h, w = shape
    if any(meta.get(k) is None for k in ("x1", "y1", "x2", "y2")):
        return np.arange(h, dtype=float), np.arange(w, dtype=float), {}, {}
    x1, y1, x2, y2 = (float(meta[k]) for k in ("x1", "y1", "x2", "y2"))
    dx, dy = (x2 - x1) / w, (y2 - y1) / h
    x = x1 + (np.arange(w) + 0.5) * dx
    if meta.get("yorigin", "upper") == "upper":  # first row at the top: y descending
        y = y2 - (np.arange(h) + 0.5) * dy
    else:
        y = y1 + (np.arange(h) + 0.5) * dy
    unit = meta.get("cartesian_unit", "m")
    if unit == "degrees":
        y_attrs = {"units": "degrees_north", "standard_name": "latitude"}
        x_attrs = {"units": "degrees_east", "standard_name": "longitude"}
    else:
        y_attrs = {"units": unit, "standard_name": "projection_y_coordinate"}
        x_attrs = {"units": unit, "standard_name": "projection_x_coordinate"}
    return y, x, y_attrs, x_attrs


def _crs_attrs(projection: str | None) -> dict:
    """CF ``grid_mapping`` attributes of a proj4 string (pyproj), keeping the string."""
    if not projection:
        return {}
    attrs: dict[str, Any] = {"proj4_params": str(projection).strip()}
    try:
        from pyproj import CRS

        cf = CRS.from_proj4(str(projection)).to_cf()
    except Exception:  # noqa: BLE001 - no pyproj, or a string it cannot map: keep proj4
        return attrs
    for key, value in cf.items():
        if isinstance(value, (str, int, float)) or (
            isinstance(value, (list, tuple)) and all(isinstance(v, (int, float)) for v in value)
        ):
            attrs[key] = value
    return attrs


# ---------------------------------------------------------------------- a few frames
def list_frames(
    path: str | Path | Sequence[str | Path],
    importer: str | None = None,
    filename_time_format: str | None = None,
    filename_time_regex: str | None = None,
    time_variable: str = "valid_time",
    variable: str | None = None,
) -> list[tuple[np.datetime64, Path]]:
    """The frames of a folder, glob, file list or Zarr store, sorted by time.

    With ``filename_time_format`` (required with ``importer``) no file is opened: the
    times come from the names, and files found in a directory whose names do not match
    are left out (counted in the log). Without it, netCDF files are opened to read their
    time variable or time dimension.

    Returns
    -------
    ``[(time, file), ...]``: datetime64[ns] and the file holding that frame (a file
    with a time dimension appears once per frame; a Zarr store once per frame as well).
    """
    if filename_time_format is not None and not is_zarr_store(path):
        probe = RadarArchive.__new__(RadarArchive)
        probe.filename_time_format = filename_time_format
        probe.filename_time_regex = filename_time_regex
        files, explicit = discover_files(path, suffixes=None if importer else NETCDF_SUFFIXES)
        out = []
        for f in files:
            times = probe._match_time(f) if f not in explicit else probe._time_from_name(f)
            if times is not None:
                out.append((times[0], f))
        if len(out) < len(files):
            log.info("list_frames: ignored %d file(s) whose names do not match %r",
                     len(files) - len(out), filename_time_format)
        out.sort(key=lambda tf: tf[0])
        return out
    archive = RadarArchive(path, variable=variable, time_variable=time_variable,
                           filename_time_format=filename_time_format,
                           filename_time_regex=filename_time_regex, time_step=_SINGLE_FRAME_STEP)
    return list(zip(archive.times, archive.frame_files()))


def read_frames(
    paths: str | Path | Sequence[str | Path],
    importer: str | None = None,
    importer_kwargs: Mapping[str, Any] | None = None,
    filename_time_format: str | None = None,
    units: str | None = None,
    downsample: int = 1,
    variable: str | None = None,
    time_variable: str = "valid_time",
    accumulation_minutes: float | None = None,
    zr_a: float | None = None,
    zr_b: float | None = None,
    max_rain_rate: float | None = DEFAULT_MAX_RAIN_RATE,
    dbz_range: Sequence[float] | None = DEFAULT_DBZ_RANGE,
    strict_values: bool = False,
    skip_bad_files: bool = False,
) -> xr.DataArray:
    """Read frames with the training readers, as one ``xarray.DataArray`` in mm/h.

    The operational entry point: ``read_frames(newest_files, importer=...)`` gives the
    inputs of a nowcast exactly as training saw them (same units, masks, Z-R relation,
    plausibility checks and block-mean ``downsample``). Arguments as :class:`RadarArchive`.

    Returns
    -------
    ``DataArray`` float32 ``(time, y, x)``: rain rate in mm/h, NaN where missing or
    implausible; coordinates ``time`` (datetime64[ns], sorted), ``y``, ``x`` (block
    centres, with their CF attributes) and, if the input has a projection, a scalar
    ``proj`` coordinate holding the CF grid-mapping attributes (``attrs["grid_mapping"]
    == "proj"``); ``attrs`` also carry ``units``, ``standard_name``, ``source`` (files)
    and ``time_step_minutes`` (``NaN`` for one frame).
    """
    archive = RadarArchive(
        paths, importer=importer, importer_kwargs=importer_kwargs,
        filename_time_format=filename_time_format, units=units, downsample=downsample,
        variable=variable, time_variable=time_variable,
        accumulation_minutes=accumulation_minutes, zr_a=zr_a, zr_b=zr_b,
        max_rain_rate=max_rain_rate, dbz_range=dbz_range, strict_values=strict_values,
        skip_bad_files=skip_bad_files, cache_frames=0, time_step=_SINGLE_FRAME_STEP,
    )
    return archive_to_dataarray(archive)


#: Placeholder step for archives of one frame (a step is undefined); never used for windows.
_SINGLE_FRAME_STEP = "__infer__"


def archive_to_dataarray(archive: RadarArchive, indices: Sequence[int] | None = None) -> xr.DataArray:
    """Frames ``indices`` (default: all) of ``archive`` as a ``(time, y, x)`` DataArray in mm/h."""
    idx = np.arange(len(archive)) if indices is None else np.asarray(indices, dtype=np.int64)
    grid = archive.grid()
    data = archive.read(idx, cache=False)  # (T, H, W) float32 mm/h
    coords: dict[str, Any] = {"time": archive.times[idx], **grid.coords()}
    attrs = {
        "units": "mm/h", "standard_name": "rainfall_rate", "long_name": "rain rate",
        "source": ", ".join(str(p) for p in dict.fromkeys(archive.frame_files(idx))),
        "time_step_minutes": float(archive.step / np.timedelta64(1, "m")) if len(archive) > 1 else float("nan"),
    }
    if grid.crs_attrs:
        coords["proj"] = xr.Variable((), np.int32(0), dict(grid.crs_attrs))
        attrs["grid_mapping"] = "proj"
    return xr.DataArray(data, dims=("time", grid.y_name, grid.x_name), coords=coords,
                        attrs=attrs, name="rain_rate")
