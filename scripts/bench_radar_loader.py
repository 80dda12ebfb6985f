"""Does the radar loader stream, and does it keep up with training?

Writes synthetic BoM-like archives (one int16-packed, zlib-compressed 512x512 netCDF
file per 10-minute step, moving rain cells) of two sizes in a temporary directory,
iterates shuffled training batches of ``RadarDataModule(downsample=2)`` (256x256) from
each in a fresh process, and prints windows/s and the peak RSS of that process: peak
RSS that does not grow with the archive shows that windows are read lazily. Then it
times a training step of a small ConvLSTM (``ConvLSTM2D`` hidden [32, 32] + a 1x1 head
over the T_in + T_out frames) at the same frame size, to compare the two rates::

    python scripts/bench_radar_loader.py --frames 144 1152 --windows 160

``--layout stacked`` benchmarks one file with a time dimension instead
(what ``scripts/prepare_radar.py`` writes).

``--real SOURCE`` benchmarks a real archive instead: its raw files read through the
importer against a Zarr store of the same frames (written first with
``nowcast.data.radar_zarr.write_zarr``), each in a fresh process, random-order windows
of the full domain (as validation reads them), windows/s and peak RSS. The store is
written at the training resolution (``--downsample``, block means computed once at
conversion); the raw files are block-averaged at every read::

    python scripts/bench_radar_loader.py --real ../shared/data/radar/mrms-2016-qpe01h \
        --importer mrms_grib --importer-kwargs '{"window_size": 1}' \
        --filename-time-format %Y%m%d-%H%M%S --frames 12 --windows 4 --downsample 4
"""

from __future__ import annotations

import argparse
import json
import logging
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import netCDF4
import numpy as np
import torch

log = logging.getLogger("bench_radar_loader")


def synthetic_field(rng: np.random.Generator, size: int) -> np.ndarray:
    """A smooth ``(size, size)`` noise field, mean 0, std ~1."""
    low = rng.standard_normal((size // 32 + 2, size // 32 + 2))
    field = np.kron(low, np.ones((32, 32)))  # (size + 64, size + 64), blocky
    kernel = np.ones(33) / 33.0  # box blur along both axes: smooth cells
    field = np.apply_along_axis(np.convolve, 0, field, kernel, mode="same")
    field = np.apply_along_axis(np.convolve, 1, field, kernel, mode="same")
    field = field[32 : 32 + size, 32 : 32 + size]
    return (field - field.mean()) / field.std()


def write_archive(directory: Path, frames: int, size: int, layout: str, seed: int = 0) -> Path:
    """BoM-like accumulations in mm (10 min), packed int16 x 0.05, _FillValue -1, zlib."""
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    base = synthetic_field(rng, size * 2)  # advected across the domain, 1 px per step
    t0 = np.datetime64("2020-01-01T00:00")
    stacked = None

    def create(ds: netCDF4.Dataset, time_dims: tuple[str, ...]) -> netCDF4.Variable:
        ds.createDimension("y", size)
        ds.createDimension("x", size)
        for name in ("y", "x"):
            v = ds.createVariable(name, "f8", (name,))
            v.units = "km"
            v[:] = (np.arange(size) - size / 2 + 0.5) * 0.5
        chunks = (1, size, size) if time_dims else (size, size)
        var = ds.createVariable("precipitation", "i2", (*time_dims, "y", "x"), zlib=True,
                                complevel=5, chunksizes=chunks, fill_value=-1)
        var.setncatts({"units": "kg m-2", "standard_name": "precipitation_amount",
                       "scale_factor": 0.05, "add_offset": 0.0})
        return var

    if layout == "stacked":
        stacked = netCDF4.Dataset(directory / "archive.nc", "w")
        stacked.createDimension("time", None)
        tvar = stacked.createVariable("time", "i8", ("time",))
        tvar.units = "seconds since 1970-01-01 00:00:00"
        svar = create(stacked, ("time",))
    for k in range(frames):
        shift = k % size
        field = base[shift : shift + size, shift : shift + size]
        rain = np.clip(field - 0.8, 0, None) * 3.0  # ~20 % wet, up to ~10 mm / 10 min
        when = t0 + np.timedelta64(10 * k, "m")
        seconds = int((when - np.datetime64("1970-01-01T00:00")) / np.timedelta64(1, "s"))
        if stacked is not None:
            svar[k] = rain
            tvar[k] = seconds
            continue
        name = f"synth_{np.datetime_as_string(when).replace('-', '').replace(':', '').replace('T', '_')}00.nc"
        with netCDF4.Dataset(directory / name, "w") as ds:
            create(ds, ())[:] = rain
            v = ds.createVariable("valid_time", "i8", ())
            v.units = "seconds since 1970-01-01 00:00:00"
            v.assignValue(seconds)
    if stacked is not None:
        stacked.close()
        return directory / "archive.nc"
    return directory


def run_loader(path: str, windows: int, batch_size: int, num_workers: int, downsample: int) -> dict:
    """In this (fresh) process: iterate ``windows`` shuffled training windows."""
    from nowcast.data.radar import RadarDataModule

    torch.set_num_threads(1)  # what a DataLoader worker gets; the trainer keeps the rest
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    t0 = time.perf_counter()
    dm = RadarDataModule(path, downsample=downsample, batch_size=batch_size, num_workers=num_workers)
    dm.setup("fit")
    setup_s = time.perf_counter() - t0
    loader = dm.train_dataloader()
    seen, t0 = 0, time.perf_counter()
    for batch in loader:
        seen += batch["inputs"].shape[0]
        if seen >= windows:
            break
    rate = seen / (time.perf_counter() - t0)
    peak = max(
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
        resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss,
    ) / 1024
    return {
        "frames": len(dm.archive), "setup_s": setup_s, "windows_per_s": rate,
        "peak_rss_mib": peak, "rss_after_imports_mib": rss0,
        "frame_shape": list(batch["inputs"].shape[-2:]),
    }


def _vm_hwm_mib() -> float:
    """Peak RSS of this process in MiB (``VmHWM``; unlike ``ru_maxrss`` it starts afresh
    at ``exec``, so a large parent does not leak into the child's number)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_windows(path: str, reader: dict, windows: int, t_in: int, t_out: int, downsample: int) -> dict:
    """In this (fresh) process: read ``windows`` random full-domain windows of ``path``."""
    from nowcast.data.radar import RadarDataModule

    torch.set_num_threads(1)
    rss0 = _vm_hwm_mib()
    t0 = time.perf_counter()
    dm = RadarDataModule(path, input_steps=t_in, output_steps=t_out, downsample=downsample,
                         test_period=["1900-01-01", "2200-01-01"], **reader)
    ds = dm.dataset("test")
    setup_s = time.perf_counter() - t0
    order = np.random.default_rng(0).permutation(len(ds))[:windows]
    t0 = time.perf_counter()
    for i in order:
        sample = ds[int(i)]
    rate = len(order) / (time.perf_counter() - t0)
    return {"setup_s": setup_s, "windows_per_s": rate, "windows": len(order),
            "peak_rss_mib": _vm_hwm_mib(),
            "rss_after_imports_mib": rss0, "frame_shape": list(sample["inputs"].shape[-2:]),
            "native_shape": list(dm.archive.native_shape)}


def bench_real(args: argparse.Namespace, tmp: str) -> None:
    """Raw files through the importer vs a Zarr store of the same frames."""
    from nowcast.data.radar_io import RadarArchive, list_frames
    from nowcast.data.radar_zarr import write_zarr

    reader = {"importer": args.importer, "importer_kwargs": args.importer_kwargs,
              "filename_time_format": args.filename_time_format}
    files = [str(f) for _, f in list_frames(args.real, args.importer, args.filename_time_format)]
    files = files[: args.frames[0]]
    store = Path(tmp) / "archive.zarr"
    t0 = time.perf_counter()
    # the store holds the training resolution: block means computed once, at conversion
    write_zarr(RadarArchive(files, cache_frames=0, downsample=args.downsample, **reader), store)
    size = sum(f.stat().st_size for f in store.rglob("*") if f.is_file()) / 2**20
    raw_size = sum(Path(f).stat().st_size for f in files) / 2**20
    log.info("wrote the Zarr store of %d frames in %.0f s: %.0f MiB (raw files %.0f MiB)",
             len(files), time.perf_counter() - t0, size, raw_size)
    rows = []
    for label, path, kwargs, downsample in (("raw files", files, reader, args.downsample),
                                            ("Zarr store", str(store), {}, 1)):
        out = subprocess.run(
            [sys.executable, __file__, "--child-real", json.dumps([path, kwargs]), "--windows",
             str(args.windows), "--downsample", str(downsample), "--t-in", str(args.t_in),
             "--t-out", str(args.t_out)],
            check=True, capture_output=True, text=True,
        )
        r = json.loads(out.stdout.strip().splitlines()[-1])
        rows.append((label, r))
        log.info("  %-10s native %s -> %s: scan %.2f s, %.3f windows/s (%d windows of %d frames), "
                 "peak RSS %.0f MiB (%.0f after imports)", label, r["native_shape"], r["frame_shape"],
                 r["setup_s"], r["windows_per_s"], r["windows"], args.t_in + args.t_out,
                 r["peak_rss_mib"], r["rss_after_imports_mib"])
    log.info("Zarr / raw: x%.1f windows/s", rows[1][1]["windows_per_s"] / rows[0][1]["windows_per_s"])
    # the same window from both: identical values
    from nowcast.data.radar import RadarDataModule

    period = ["1900-01-01", "2200-01-01"]
    a = RadarDataModule(files, downsample=args.downsample, input_steps=args.t_in, output_steps=args.t_out,
                        test_period=period, **reader).dataset("test")[0]
    b = RadarDataModule(str(store), input_steps=args.t_in, output_steps=args.t_out,
                        test_period=period).dataset("test")[0]
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6)
    log.info("window 0 is identical from both")


def time_train_step(batch_size: int, t_in: int, t_out: int, size: int, steps: int = 2) -> float:
    """Windows/s of an Adam step of ConvLSTM2D(1, [32, 32]) + 1x1 head at ``size``^2."""
    from nowcast.nn import ConvLSTM2D

    net = ConvLSTM2D(1, [32, 32], kernel_size=3)
    head = torch.nn.Conv2d(32, 1, 1)
    params = list(net.parameters()) + list(head.parameters())
    opt = torch.optim.Adam(params, lr=1e-3)
    x = torch.rand(batch_size, t_in, 1, size, size)
    y = torch.rand(batch_size, t_out, 1, size, size)

    def step() -> None:
        frames = torch.cat([x, torch.zeros_like(y)], dim=1)  # (B, T_in + T_out, 1, H, W)
        h = net(frames)[:, t_in:]  # (B, T_out, 32, H, W)
        pred = head(h.flatten(0, 1)).view_as(y)  # (B, T_out, 1, H, W)
        loss = torch.nn.functional.mse_loss(pred, y)
        opt.zero_grad()
        loss.backward()
        opt.step()

    step()  # warm-up
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    return batch_size * steps / (time.perf_counter() - t0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--frames", type=int, nargs="+", default=[144, 1152],
                        help="archive sizes in frames (10-minute steps)")
    parser.add_argument("--size", type=int, default=512, help="native grid side (pixels)")
    parser.add_argument("--downsample", type=int, default=2)
    parser.add_argument("--layout", choices=["steps", "stacked"], default="steps")
    parser.add_argument("--windows", type=int, default=160, help="training windows timed")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--num-workers", type=int, default=0)
    parser.add_argument("--train-batch-size", type=int, default=1, help="batch of the timed train step")
    parser.add_argument("--train-steps", type=int, default=1, help="timed train steps (after a warm-up)")
    parser.add_argument("--workdir", type=Path, default=None, help="where to write the archives (default: a temp dir)")
    parser.add_argument("--real", default=None, help="a real archive: raw files vs Zarr (see above)")
    parser.add_argument("--importer", default=None)
    parser.add_argument("--importer-kwargs", type=json.loads, default={})
    parser.add_argument("--filename-time-format", default=None)
    parser.add_argument("--t-in", type=int, default=4)
    parser.add_argument("--t-out", type=int, default=2)
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--child-real", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    if args.child_real is not None:
        path, reader = json.loads(args.child_real)
        print(json.dumps(run_windows(path, reader, args.windows, args.t_in, args.t_out, args.downsample)))
        return
    if args.real is not None:
        with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
            bench_real(args, tmp)
        return

    if args.child is not None:
        print(json.dumps(run_loader(args.child, args.windows, args.batch_size, args.num_workers,
                                    args.downsample)))
        return
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        results = []
        for frames in args.frames:
            t0 = time.perf_counter()
            path = write_archive(Path(tmp) / f"archive_{frames}", frames, args.size, args.layout)
            disk = sum(f.stat().st_size for f in Path(tmp, f"archive_{frames}").iterdir()) / 2**20
            decoded = frames * args.size**2 * 4 / 2**20
            log.info("wrote %d frames (%s, %.0f MiB on disk, %.0f MiB as float32) in %.0f s",
                     frames, args.layout, disk, decoded, time.perf_counter() - t0)
            out = subprocess.run(
                [sys.executable, __file__, "--child", str(path), "--windows", str(args.windows),
                 "--batch-size", str(args.batch_size), "--num-workers", str(args.num_workers),
                 "--downsample", str(args.downsample)],
                check=True, capture_output=True, text=True,
            )
            r = json.loads(out.stdout.strip().splitlines()[-1])
            r["decoded_mib"] = decoded
            results.append(r)
            log.info(
                "  loader: %d frames -> %s windows of %dx%d: scan %.2f s, %.1f windows/s, "
                "peak RSS %.0f MiB (%.0f MiB after imports)",
                r["frames"], args.windows, *r["frame_shape"], r["setup_s"], r["windows_per_s"],
                r["peak_rss_mib"], r["rss_after_imports_mib"],
            )
    side = args.size // args.downsample
    train = time_train_step(args.train_batch_size, 4, 6, side, args.train_steps)
    log.info("train step ConvLSTM2D(1, [32, 32]) + head, %dx%d, batch %d, %d torch threads: "
             "%.2f windows/s", side, side, args.train_batch_size, torch.get_num_threads(), train)
    loader = min(r["windows_per_s"] for r in results)
    log.info("loader / training = %.1f (>1: the loader outpaces training with %d worker(s))",
             loader / train, max(args.num_workers, 1))


if __name__ == "__main__":
    main()
