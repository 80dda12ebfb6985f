"""Latency of one nowcast: the ConvLSTM (torch eager, ONNX Runtime) against pysteps.

One nowcast = 4 input frames -> 6 or 12 leads, on real radar domains read from
../shared/data: BoM 512x512 at 0.5 km (netCDF, the training reader), KNMI 765x700 at 1 km
(HDF5, pysteps' ``knmi_hdf5`` importer, dBZ -> mm/h Marshall-Palmer), MRMS 3500x7000
(GRIB2, pysteps' ``mrms_grib`` importer with ``window_size=1``; the model runs tiled).
Every method sees the same input in the same process: the network
(``configs/model/net/radar.yaml``, weights random: the cost does not depend on them) in
eager torch through :class:`nowcast.inference.TorchForecaster`, the same network exported
to ONNX (``nowcast.export``) in ONNX Runtime, and pysteps' Lucas-Kanade + semi-Lagrangian
extrapolation and S-PROG through :mod:`nowcast.baselines`. Reported: median wall seconds
of ``--repeats`` runs after one warm-up run (the first run, with torch's kernel choices, is
reported separately), CPU seconds (user + system of the process) of the median run, and
the process's peak RSS after the method's runs (``ru_maxrss``, monotone: a method's
value includes what ran before it, so methods run from the cheapest).

    python scripts/bench_predict.py --domains bom knmi --leads 6 12 --repeats 3
    python scripts/bench_predict.py --domains mrms --leads 6 --repeats 1 --methods torch optical_flow
"""

from __future__ import annotations

import argparse
import contextlib
import io
import logging
import platform
import resource
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from nowcast.data.transforms import LogRainRate, dbz_to_rain_rate  # noqa: E402
from nowcast.inference import OnnxForecaster, Tiling, TorchForecaster, run_baselines  # noqa: E402

log = logging.getLogger("bench_predict")
SHARED = (ROOT / ".." / "shared" / "data" / "radar").resolve()


def read_bom() -> np.ndarray:
    """4 frames 08:20..08:50 UTC (the convective event), mm/h, 512x512 at 0.5 km."""
    from nowcast.data.radar_io import RadarArchive

    files = [SHARED / "bom-66-prcp-c10" / f"66_20201031_08{m}000.prcp-c10.nc" for m in (2, 3, 4, 5)]
    archive = RadarArchive(files)
    return archive.read(range(4))


def _quiet():
    return contextlib.redirect_stdout(io.StringIO())


def read_knmi() -> np.ndarray:
    """The last 4 frames of the 2021-01-03 evening, mm/h (Z = 200 R^1.6), 765x700 at 1 km."""
    import pysteps.io

    files = sorted((SHARED / "knmi-2021-pcp" / "2021-01-03").glob("*.hf5"))[-4:]
    frames = []
    for f in files:
        with _quiet():
            dbz, _, _ = pysteps.io.import_knmi_hdf5(str(f), qty="DBZH")
        frames.append(dbz_to_rain_rate(np.asarray(dbz, dtype=np.float32)))
    return np.stack(frames)


def read_mrms() -> np.ndarray:
    """4 hourly frames 2016-09-21 00..03 UTC, mm/h, the full 3500x7000 CONUS grid."""
    import pysteps.io

    files = [SHARED / "mrms-2016-qpe01h" / f"MRMS_GaugeCorr_QPE_01H_00.00_20160921-0{h}0000.grib2"
             for h in range(4)]
    frames = []
    for f in files:
        with _quiet(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            rain, _, _ = pysteps.io.import_mrms_grib(str(f), window_size=1)
        frames.append(np.asarray(rain, dtype=np.float32))
    return np.stack(frames)


READERS = {"bom": read_bom, "knmi": read_knmi, "mrms": read_mrms}


class _Module(nn.Module):
    """What :class:`TorchForecaster` reads from a LightningModule: net, transform, leads."""

    def __init__(self, net: nn.Module, leads: int) -> None:
        super().__init__()
        self.net = net
        self.transform = LogRainRate()
        self.lead_times = [f"{10 * (k + 1)}min" for k in range(leads)]


def build_network(leads: int) -> nn.Module:
    """``configs/model/net/radar.yaml`` (the repository's own config) for 4 -> ``leads``."""
    cfg = OmegaConf.load(ROOT / "configs" / "model" / "net" / "radar.yaml")
    base = OmegaConf.load(ROOT / "configs" / "model" / "net" / "encoder_forecaster.yaml")
    cfg = OmegaConf.merge(base, {k: v for k, v in cfg.items() if k != "defaults"})
    cfg.input_steps, cfg.output_steps, cfg.frame_size = 4, leads, None
    torch.manual_seed(0)
    return instantiate(cfg).eval()


def measure(fn, repeats: int) -> dict[str, float]:
    """First-run seconds, median wall and CPU seconds of ``repeats`` runs, peak RSS (GiB)."""
    t0 = time.perf_counter()
    fn()
    first = time.perf_counter() - t0
    walls, cpus = [], []
    for _ in range(repeats):
        r0, c0 = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF)
        fn()
        c1 = resource.getrusage(resource.RUSAGE_SELF)
        walls.append(time.perf_counter() - r0)
        cpus.append(c1.ru_utime - c0.ru_utime + c1.ru_stime - c0.ru_stime)
    k = walls.index(statistics.median_low(walls))
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB
    return {"first_s": first, "median_s": statistics.median(walls), "cpu_s": cpus[k], "peak_rss_gib": rss}


def export_onnx(net: nn.Module, example: torch.Tensor, path: Path) -> None:
    from nowcast.export import export_program, exportable, save_onnx

    model = exportable(TorchForecaster(_Module(net, net.output_steps)))
    program = export_program(model, example, dynamic_hw=False)
    save_onnx(program, example, path, {
        "input_steps": 4, "output_steps": net.output_steps, "in_channels": 1,
        "spatial_divisor": net.spatial_divisor, "lead_times": [f"{10 * (k + 1)}min" for k in range(net.output_steps)],
    })


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--domains", nargs="+", default=["bom", "knmi"], choices=sorted(READERS))
    parser.add_argument("--leads", nargs="+", type=int, default=[6, 12])
    parser.add_argument("--methods", nargs="+", default=["torch", "onnx", "optical_flow", "sprog"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--onnx-domains", nargs="+", default=["bom"],
                        help="domains the ONNX model is exported for (one export per shape and lead count)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--max-pixels", type=int, default=1024 * 1024, help="tile area of the model")
    parser.add_argument("--conv-backend", default="auto", choices=["auto", "native", "nnpack"],
                        help="nowcast.nn.conv policy (predict.py uses native: no per-shape timing)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from nowcast.nn.conv import set_cpu_conv_backend

    set_cpu_conv_backend(args.conv_backend)
    torch.set_num_threads(args.threads)
    log.info("machine: %s, %s, torch %s, %d threads", platform.processor() or platform.machine(),
             platform.platform(), torch.__version__, torch.get_num_threads())
    rows = []
    tmp = Path(tempfile.mkdtemp(prefix="bench_predict_"))
    for domain in args.domains:
        frames = READERS[domain]()  # (4, H, W) mm/h
        x = torch.from_numpy(np.nan_to_num(frames, nan=0.0))[None, :, None]  # (1, 4, 1, H, W)
        log.info("%s: %s frames, max %.1f mm/h, %.1f%% >= 0.1 mm/h", domain, tuple(frames.shape),
                 float(x.max()), 100 * float((x >= 0.1).float().mean()))
        for leads in args.leads:
            net = build_network(leads)
            tiling = Tiling(max_pixels=args.max_pixels)
            for method in args.methods:
                if method == "torch":
                    forecaster = TorchForecaster(_Module(net, leads), tiling=tiling)
                    fn = lambda f=forecaster, x=x: f(x)  # noqa: E731
                elif method == "onnx":
                    if domain not in args.onnx_domains:
                        continue
                    d = net.spatial_divisor
                    hw = (-(-x.shape[-2] // d) * d, -(-x.shape[-1] // d) * d)  # the padded domain
                    path = tmp / f"radar_{leads}_{hw[0]}x{hw[1]}.onnx"
                    if not path.exists():
                        t0 = time.perf_counter()
                        export_onnx(net, torch.rand(1, 4, 1, *hw), path)
                        log.info("exported %s in %.0f s", path.name, time.perf_counter() - t0)
                    forecaster = OnnxForecaster(path, tiling, threads=args.threads)
                    fn = lambda f=forecaster, x=x: f(x)  # noqa: E731
                else:
                    fn = lambda m=method, x=x, n=leads: run_baselines(x, n, [m])  # noqa: E731
                result = measure(fn, args.repeats)
                rows.append((domain, "x".join(map(str, frames.shape[1:])), leads, method, result))
                log.info("%s %s leads=%d %-12s first %.2f s, median %.2f s, CPU %.2f s, peak RSS %.2f GiB",
                         domain, rows[-1][1], leads, method, result["first_s"], result["median_s"],
                         result["cpu_s"], result["peak_rss_gib"])
    print("| domain | grid | leads | method | first run s | median s | CPU s | peak RSS GiB |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for domain, grid, leads, method, r in rows:
        print(f"| {domain} | {grid} | {leads} | {method} | {r['first_s']:.2f} | {r['median_s']:.2f} | "
              f"{r['cpu_s']:.2f} | {r['peak_rss_gib']:.2f} |")


if __name__ == "__main__":
    main()
