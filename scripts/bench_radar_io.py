"""Hand-written radar I/O paths against the libraries that do the same job, in one run.

``nowcast.data.radar_io`` keeps three hand-written paths; each is timed here against the
library call that could replace it, on the same data in the same process:

- block-mean downsampling (``block_mean``) vs ``xarray.DataArray.coarsen(...).mean()``
  (dask-free, NaN-aware), on BoM-sized frames with and without missing pixels;
- netCDF frame reads (``netCDF4`` + ``_decode_cf``) vs ``xarray.open_dataset`` with CF
  decoding (and its file-handle cache), on real BoM files;
- dBZ -> mm/h (``dbz_to_rain_rate``) vs ``pysteps.utils.conversion.to_rainrate``.

Each result must be equal (checked) before it is timed::

    python scripts/bench_radar_io.py --bom ../shared/data/radar/bom-66-prcp-c10
"""

from __future__ import annotations

import argparse
import logging
import time
from collections.abc import Callable
from pathlib import Path

import netCDF4
import numpy as np
import xarray as xr

from nowcast.data.radar_io import _decode_cf, block_mean
from nowcast.data.transforms import dbz_to_rain_rate

log = logging.getLogger("bench_radar_io")


def best_of(fn: Callable[[], object], repeat: int) -> float:
    """Smallest wall time of ``repeat`` calls, in ms (the least disturbed by other load)."""
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bom", type=Path, default=Path("../shared/data/radar/bom-66-prcp-c10"))
    parser.add_argument("--repeat", type=int, default=7)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    rows = []

    rng = np.random.default_rng(0)
    frames = (rng.random((10, 512, 512)) * 5).astype(np.float32)  # (T, H, W) a window
    holes = frames.copy()
    holes[:, :100, :] = np.nan
    for label, data in (("block mean 2x2, 10x512x512, no NaN", frames), ("block mean 2x2, 10x512x512, 20 % NaN", holes)):
        da = xr.DataArray(data, dims=("time", "y", "x"))
        ref = block_mean(data, 2)
        lib = da.coarsen(y=2, x=2).mean().values  # skipna: NaN-aware as block_mean
        np.testing.assert_allclose(ref, lib, rtol=1e-5, equal_nan=True)
        rows.append((label, best_of(lambda: block_mean(data, 2), args.repeat),  # noqa: B023
                     best_of(lambda: da.coarsen(y=2, x=2).mean().values, args.repeat),  # noqa: B023
                     "xarray coarsen"))

    files = sorted(args.bom.glob("*.nc"))[:20]
    if files:
        def hand() -> list[np.ndarray]:
            out = []
            for f in files:
                with netCDF4.Dataset(f) as ds:
                    out.append(_decode_cf(ds.variables["precipitation"]))
            return out

        def lib() -> list[np.ndarray]:
            out = []
            for f in files:
                with xr.open_dataset(f) as ds:
                    out.append(ds["precipitation"].values.astype(np.float32))
            return out

        def lib_cached() -> list[np.ndarray]:  # xarray's own handle cache: open once, read
            return [d["precipitation"].values.astype(np.float32) for d in opened]

        opened = [xr.open_dataset(f, cache=False) for f in files]
        for a, b in zip(hand(), lib()):
            np.testing.assert_allclose(a, b, rtol=1e-6, equal_nan=True)
        n = len(files)
        rows.append((f"read + CF-decode {n} BoM files (per file)", best_of(hand, 3) / n, best_of(lib, 3) / n,
                     "xarray.open_dataset"))
        rows.append((f"read + CF-decode {n} BoM files, handles kept open (per file)", best_of(hand, 3) / n,
                     best_of(lib_cached, 3) / n, "xarray, files opened once"))
        for d in opened:
            d.close()

    try:
        from pysteps.utils.conversion import to_rainrate
    except ImportError:
        to_rainrate = None
    if to_rainrate is not None:
        dbz = (rng.random((765, 700)) * 60 - 10).astype(np.float64)
        meta = {"unit": "dBZ", "transform": "dB", "threshold": -10.0, "zerovalue": -32.0,
                "accutime": 5.0, "zr_a": 200.0, "zr_b": 1.6}
        ref = dbz_to_rain_rate(dbz.astype(np.float32), 200.0, 1.6)
        np.testing.assert_allclose(ref, to_rainrate(dbz, meta)[0], rtol=1e-4)
        rows.append(("dBZ -> mm/h, 765x700 (KNMI frame)", best_of(lambda: dbz_to_rain_rate(dbz.astype(np.float32), 200.0, 1.6), args.repeat),
                     best_of(lambda: to_rainrate(dbz, meta), args.repeat), "pysteps to_rainrate"))

    print("| operation | hand-written (ms) | library (ms) | library |")
    print("| --- | --- | --- | --- |")
    for label, hand_ms, lib_ms, name in rows:
        print(f"| {label} | {hand_ms:.2f} | {lib_ms:.2f} | {name} (x{lib_ms / hand_ms:.1f}) |")


if __name__ == "__main__":
    main()
