"""Consolidate a directory of per-time-step radar files into one chunked netCDF file.

Reading one file per frame costs a file open per frame; one file with a ``time``
dimension, chunked one frame per chunk and zlib-compressed, costs one open per worker.
The output keeps the variable as stored (values, units, packing, ``_FillValue``,
``grid_mapping``) so ``RadarDataModule`` converts it exactly as it did the originals::

    python scripts/prepare_radar.py ../shared/data/radar/bom-66-prcp-c10 /tmp/bom-66.nc

then ``RadarDataModule(path="/tmp/bom-66.nc", ...)``. Afterwards the script times
iterating the datamodule's windows over the source directory and over the consolidated
file (``--no-bench`` skips it) and prints the speedup.
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

import netCDF4
import numpy as np
import torch

from nowcast.data.radar import RadarDataModule
from nowcast.data.radar_io import RadarArchive

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


def bench(path, n_random: int, downsample: int, seed: int = 0) -> dict[str, float]:
    """Windows/s reading ``path`` sequentially (val/test order) and in random order (training)."""
    dm = RadarDataModule(path, downsample=downsample, test_period=["1900-01-01", "2200-01-01"])
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
    parser.add_argument("source", help="directory, glob or file of per-time-step radar files")
    parser.add_argument("out", type=Path, help="consolidated netCDF file to write")
    parser.add_argument("--variable", default=None)
    parser.add_argument("--time-variable", default="valid_time")
    parser.add_argument("--filename-time-format", default=None)
    parser.add_argument("--time-chunk", type=int, default=1, help="frames per chunk")
    parser.add_argument("--complevel", type=int, default=4)
    parser.add_argument("--skip-bad-files", action="store_true")
    parser.add_argument("--no-bench", action="store_true", help="skip the read-speed comparison")
    parser.add_argument("--bench-downsample", type=int, default=2)
    parser.add_argument("--bench-random", type=int, default=60, help="random-order windows timed")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(1)  # as in a DataLoader worker

    archive = RadarArchive(
        args.source, variable=args.variable, time_variable=args.time_variable,
        filename_time_format=args.filename_time_format, skip_bad_files=args.skip_bad_files,
        cache_frames=0,
    )
    t0 = time.perf_counter()
    consolidate(archive, args.out, args.time_chunk, args.complevel)
    size = args.out.stat().st_size / 2**20
    src_size = sum(f.stat().st_size for f in archive.files) / 2**20
    log.info(
        "wrote %s: %d frames, %.1f MiB (sources %.1f MiB) in %.1f s",
        args.out, len(archive), size, src_size, time.perf_counter() - t0,
    )
    check = RadarArchive(args.out)
    for i in (0, len(archive) // 2, len(archive) - 1):
        np.testing.assert_allclose(check.read([i])[0], archive.read([i])[0], rtol=1e-6, equal_nan=True)
    if args.no_bench:
        return
    results = {}
    for label, path in (("per-file directory", args.source), ("consolidated file", args.out)):
        results[label] = r = bench(path, args.bench_random, args.bench_downsample)
        log.info(
            "%-19s setup %.2f s | sequential %.1f windows/s | random order %.1f windows/s (%d windows, downsample %d)",
            label, r["setup_s"], r["sequential"], r["random"], r["windows"], args.bench_downsample,
        )
    a, b = results["per-file directory"], results["consolidated file"]
    log.info(
        "speedup of the consolidated file: setup x%.1f, sequential x%.2f, random order x%.2f",
        a["setup_s"] / b["setup_s"], b["sequential"] / a["sequential"], b["random"] / a["random"],
    )


if __name__ == "__main__":
    main()
