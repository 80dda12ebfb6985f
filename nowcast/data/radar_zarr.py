"""Write any radar archive the readers accept into one chunked, compressed Zarr store.

The store holds ``rain_rate`` ``(time, y, x)`` float32 in mm/h (NaN missing), exactly what
:meth:`~nowcast.data.radar_io.RadarArchive.read` returns (units converted, Z-R applied,
implausible values masked, ``downsample`` applied), with CF metadata: ``units``,
``standard_name``, the ``y``/``x`` coordinates with their attributes, the projection as a
``grid_mapping`` variable, and a CF-encoded ``time``. One frame per chunk (``time_chunk``)
so that a window decompresses only its own frames; Zstandard compression.
``RadarDataModule(path="archive.zarr")`` (or ``xarray.open_zarr``) reads it back.
An archive grows every few minutes: ``append=True`` adds the frames newer than the store's
last one and leaves the rest untouched.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr

from nowcast.data.radar_io import RadarArchive, RadarDataError, archive_to_dataarray

log = logging.getLogger(__name__)

VARIABLE = "rain_rate"


def _compressor(level: int) -> dict[str, Any]:
    """Encoding entry for Zstandard compression, for Zarr format 3 or 2."""
    import zarr

    if int(zarr.__version__.split(".")[0]) >= 3:
        from zarr.codecs import ZstdCodec

        return {"compressors": [ZstdCodec(level=level)]}
    from numcodecs import Zstd

    return {"compressor": Zstd(level=level)}


def write_zarr(
    archive: RadarArchive,
    store: str | Path,
    append: bool = False,
    time_chunk: int = 1,
    batch_frames: int = 8,
    level: int = 3,
) -> dict[str, int]:
    """Write (or extend) a Zarr store with every frame of ``archive``.

    Parameters
    ----------
    archive
        The scanned archive; frames are read ``batch_frames`` at a time (bounded memory).
    store
        Path or fsspec URL of the store.
    append
        Add only frames later than the store's last time; the grid must match the store's.
        Without it an existing store is an error (nothing is overwritten).
    time_chunk
        Frames per chunk.
    batch_frames
        Frames read and written per step.
    level
        Zstandard level.

    Returns
    -------
    ``{"written": n, "skipped": m}``: frames written, and frames already in the store.
    """
    store = str(store)
    indices = np.arange(len(archive))
    existing = None
    if append:
        try:
            existing = xr.open_zarr(store, chunks=None)
        except (FileNotFoundError, KeyError, ValueError, OSError):
            existing = None  # nothing yet: append starts the store
    elif Path(store).exists():
        raise RadarDataError(f"{store} exists; use append=True (--append) to add newer frames")
    if existing is not None:
        if VARIABLE not in existing:
            raise RadarDataError(f"{store}: no variable {VARIABLE!r} to append to")
        grid = archive.grid()
        shape = existing[VARIABLE].shape[1:]
        if shape != grid.shape or not (
            np.allclose(existing[grid.y_name].values, grid.y) and np.allclose(existing[grid.x_name].values, grid.x)
        ):
            raise RadarDataError(
                f"{store}: grid {shape[0]}x{shape[1]} differs from the archive's "
                f"{grid.shape[0]}x{grid.shape[1]} (or its coordinates do); cannot append"
            )
        last = existing["time"].values.max()
        indices = indices[archive.times > last]
        existing.close()
    skipped = len(archive) - len(indices)
    t0 = time.perf_counter()
    first_write = existing is None
    for start in range(0, len(indices), batch_frames):
        part = indices[start : start + batch_frames]
        ds = archive_to_dataarray(archive, part).to_dataset()
        ds.attrs = {"Conventions": "CF-1.8", "source": f"{archive.name} ({archive.importer or archive.backend})",
                    "history": "written by nowcast.data.radar_zarr.write_zarr"}
        ds[VARIABLE].attrs.pop("source", None)  # the file list would grow without bound
        if first_write:
            h, w = ds[VARIABLE].shape[1:]
            encoding = {
                VARIABLE: {"chunks": (time_chunk, h, w), **_compressor(level)},
                "time": {"units": "seconds since 1970-01-01 00:00:00", "dtype": "int64",
                         "chunks": (max(1024, time_chunk),)},
            }
            ds.to_zarr(store, mode="w", encoding=encoding, consolidated=True)
            first_write = False
        else:
            # only the time-dependent variables grow; coordinates and the projection stay
            ds = ds.drop_vars([v for v in ds.variables if "time" not in ds[v].dims])
            ds.to_zarr(store, append_dim="time", consolidated=True)
        log.info("%s: %d / %d frames written", store, start + len(part), len(indices))
    log.info("%s: wrote %d frames (%d already there) in %.1f s", store, len(indices), skipped,
             time.perf_counter() - t0)
    return {"written": int(len(indices)), "skipped": int(skipped)}
