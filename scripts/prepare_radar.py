"""Convert a radar archive into one chunked, compressed store: Zarr (any reader) or netCDF.

Zarr (``OUT`` ending in ``.zarr``, or any fsspec URL): every archive the readers accept
(CF netCDF files, any pysteps importer) becomes one store of rain rate in mm/h with CF
metadata (``nowcast.data.radar_zarr.write_zarr``), one frame per Zstandard-compressed
chunk; ``--append`` adds the frames newer than the store's last one::

    python scripts/prepare_radar.py ../shared/data/radar/knmi-2021-pcp /tmp/knmi.zarr \
        --importer knmi_hdf5 --importer-kwargs '{"qty": "DBZH"}' --filename-time-format %Y%m%d%H%M
    python scripts/prepare_radar.py /archive/knmi/2021/02 /tmp/knmi.zarr --append ...

then ``RadarDataModule(path="/tmp/knmi.zarr", ...)`` (``data.path=/tmp/knmi.zarr``).

netCDF (``OUT`` ending in ``.nc``; netCDF sources only): one file with a ``time``
dimension that keeps the variable as stored (values, units, packing, ``_FillValue``,
``grid_mapping``), so ``RadarDataModule`` converts it exactly as it did the originals::

    python scripts/prepare_radar.py ../shared/data/radar/bom-66-prcp-c10 /tmp/bom-66.nc

Afterwards the script times iterating the datamodule's windows over the source and over
the written store (``--no-bench`` skips it) and prints the speedup.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import netCDF4
import numpy as np
import torch

from nowcast.data.radar import RadarDataModule
from nowcast.data.radar_io import RadarArchive, is_zarr_store

log = logging.getLogger("prepare_radar")
_PACKING = ("_FillValue", "missing_value", "scale_factor", "add_offset")


def consolidate(
    archive: RadarArchive, out: Path, time_chunk: int = 1, complevel: int = 4
) -> Path:
    """Write every frame of ``archive`` (in time order) to ``out`` along a ``time`` dimension.

    Parameters
    ----------
    archive
        The scanned per-time-step archive.
    out
        Output netCDF-4 file.
    time_chunk
        Frames per chunk; 1 lets a window read decompress only its own frames.
    complevel
        zlib level (1-9).
    """
    first = archive.files[0]
    h, w = archive.native_shape
    with netCDF4.Dataset(first) as src, netCDF4.Dataset(out, "w") as dst:
        svar = src.variables[archive.variable]
        dst.setncatts({k: src.getncattr(k) for k in src.ncattrs()})
        dst.history = (
            f"{time.strftime('%Y-%m-%dT%H:%M:%S')} scripts/prepare_radar.py: "
            f"{len(archive)} frames from {len(archive.files)} files"
        )
        dst.createDimension("time", None)
        dst.createDimension(archive.y_name, h)
        dst.createDimension(archive.x_name, w)
        tvar = dst.createVariable("time", "i8", ("time",))
        tvar.setncatts({"standard_name": "time", "units": "seconds since 1970-01-01 00:00:00", "calendar": "standard"})
        for name in (archive.y_name, archive.x_name):
            if name in src.variables:
                cvar = dst.createVariable(name, src.variables[name].dtype, (name,))
                # bounds variables are not copied, so neither is the reference to them
                attrs = src.variables[name].ncattrs()
                cvar.setncatts({k: src.variables[name].getncattr(k) for k in attrs if k != "bounds"})
                cvar[:] = src.variables[name][:]
        mapping = getattr(svar, "grid_mapping", None)
        if mapping and mapping in src.variables:
            mvar = dst.createVariable(mapping, src.variables[mapping].dtype, ())
            mvar.setncatts({k: src.variables[mapping].getncattr(k) for k in src.variables[mapping].ncattrs()})
        fill = getattr(svar, "_FillValue", np.nan if svar.dtype.kind == "f" else None)
        var = dst.createVariable(
            archive.variable, svar.dtype, ("time", archive.y_name, archive.x_name),
            zlib=True, complevel=complevel, shuffle=True, chunksizes=(time_chunk, h, w),
            fill_value=fill,
        )
        var.setncatts({k: svar.getncattr(k) for k in svar.ncattrs() if k not in ("_FillValue",)})
        seconds = (archive.times - np.datetime64("1970-01-01", "ns")) // np.timedelta64(1, "s")
        for i in range(len(archive)):
            with np.errstate(invalid="ignore"):  # NaN under the mask is never written
                var[i] = np.ma.masked_invalid(archive.read_native(i))  # packed on write
            tvar[i] = seconds[i]
            if i % 500 == 0:
                log.info("frame %d / %d", i, len(archive))
    return out


def bench(path, n_random: int, downsample: int, seed: int = 0, **reader) -> dict[str, float]:
    """Windows/s reading ``path`` sequentially (val/test order) and in random order (training)."""
    dm = RadarDataModule(path, downsample=downsample, test_period=["1900-01-01", "2200-01-01"], **reader)
    t0 = time.perf_counter()
    ds = dm.dataset("test")
    setup = time.perf_counter() - t0
    t0 = time.perf_counter()
    for i in range(len(ds)):
        ds[i]
    sequential = len(ds) / (time.perf_counter() - t0)
    order = np.random.default_rng(seed).permutation(len(ds))[:n_random]
    dm.archive._cache.clear()
    t0 = time.perf_counter()
    for i in order:
        ds[int(i)]
    shuffled = len(order) / (time.perf_counter() - t0)
    return {"setup_s": setup, "sequential": sequential, "random": shuffled, "windows": len(ds)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("source", help="directory (searched recursively), glob or file of radar files")
    parser.add_argument("out", help="Zarr store (*.zarr or fsspec URL) or netCDF file (*.nc) to write")
    parser.add_argument("--importer", default=None, help="pysteps importer name (default: CF netCDF)")
    parser.add_argument("--importer-kwargs", type=json.loads, default={}, help="JSON, e.g. '{\"qty\": \"DBZH\"}'")
    parser.add_argument("--variable", default=None)
    parser.add_argument("--time-variable", default="valid_time")
    parser.add_argument("--filename-time-format", default=None)
    parser.add_argument("--units", default=None)
    parser.add_argument("--downsample", type=int, default=1, help="block mean before writing (Zarr)")
    parser.add_argument("--append", action="store_true", help="add frames newer than the store's last (Zarr)")
    parser.add_argument("--time-chunk", type=int, default=1, help="frames per chunk")
    parser.add_argument("--complevel", type=int, default=4, help="zlib (netCDF) or Zstandard (Zarr) level")
    parser.add_argument("--skip-bad-files", action="store_true")
    parser.add_argument("--no-bench", action="store_true", help="skip the read-speed comparison")
    parser.add_argument("--bench-downsample", type=int, default=2)
    parser.add_argument("--bench-random", type=int, default=60, help="random-order windows timed")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(1)  # as in a DataLoader worker

    reader = dict(
        importer=args.importer, importer_kwargs=args.importer_kwargs, variable=args.variable,
        time_variable=args.time_variable, filename_time_format=args.filename_time_format,
        units=args.units, skip_bad_files=args.skip_bad_files,
    )
    to_zarr = is_zarr_store(args.out) or not args.out.endswith(".nc")
    archive = RadarArchive(args.source, cache_frames=0, downsample=args.downsample if to_zarr else 1, **reader)
    t0 = time.perf_counter()
    if to_zarr:
        from nowcast.data.radar_zarr import write_zarr

        write_zarr(archive, args.out, append=args.append, time_chunk=args.time_chunk,
                   level=min(args.complevel, 22))
        check = RadarArchive(args.out)
        for i in (0, len(archive) // 2, len(archive) - 1):
            j = int(np.searchsorted(check.times, archive.times[i]))
            np.testing.assert_allclose(check.read([j])[0], archive.read([i])[0], rtol=1e-6, equal_nan=True)
        if args.no_bench or args.append:
            return
        bench_args = [(f"source ({args.importer or 'netCDF'})", args.source, reader), ("Zarr store", args.out, {})]
    else:
        if args.importer is not None:
            parser.error("netCDF output keeps netCDF sources as stored; write a .zarr store for an importer")
        out = Path(args.out)
        consolidate(archive, out, args.time_chunk, args.complevel)
        size = out.stat().st_size / 2**20
        src_size = sum(f.stat().st_size for f in archive.files) / 2**20
        log.info(
            "wrote %s: %d frames, %.1f MiB (sources %.1f MiB) in %.1f s",
            out, len(archive), size, src_size, time.perf_counter() - t0,
        )
        check = RadarArchive(out)
        for i in (0, len(archive) // 2, len(archive) - 1):
            np.testing.assert_allclose(check.read([i])[0], archive.read([i])[0], rtol=1e-6, equal_nan=True)
        if args.no_bench:
            return
        bench_args = [("per-file directory", args.source, reader), ("consolidated file", str(out), {})]
    results = {}
    for label, path, kwargs in bench_args:
        results[label] = r = bench(path, args.bench_random, args.bench_downsample, **kwargs)
        log.info(
            "%-19s setup %.2f s | sequential %.1f windows/s | random order %.1f windows/s (%d windows, downsample %d)",
            label, r["setup_s"], r["sequential"], r["random"], r["windows"], args.bench_downsample,
        )
    a, b = results.values()
    log.info(
        "speedup of the written store: setup x%.1f, sequential x%.2f, random order x%.2f",
        a["setup_s"] / b["setup_s"], b["sequential"] / a["sequential"], b["random"] / a["random"],
    )


if __name__ == "__main__":
    main()
