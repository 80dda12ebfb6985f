"""Zarr stores: written from any archive (netCDF steps, pysteps importers), appended to,
read back by the datamodule as the same windows; errors for stores that do not fit."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import xarray as xr

from nowcast.data.radar import RadarDataModule
from nowcast.data.radar_io import RadarArchive, RadarDataError, is_zarr_store
from tests.conftest import ROOT
from tests.test_radar_data import WHOLE, all_test_windows, fields, write_steps

zarr = pytest.importorskip("zarr")
from nowcast.data.radar_zarr import write_zarr  # noqa: E402


def test_zarr_store_gives_the_same_windows_and_appends(tmp_path):
    data = fields(14)
    data[:, 0, :2] = np.nan
    write_steps(tmp_path / "steps", data)
    kwargs = dict(input_steps=3, output_steps=2, test_period=WHOLE, batch_size=32)
    ref = all_test_windows(RadarDataModule(tmp_path / "steps", **kwargs))
    # the first 9 frames, then the archive grows: append adds only the newer frames
    first = RadarArchive(sorted((tmp_path / "steps").glob("*.nc"))[:9], cache_frames=0)
    store = tmp_path / "bom.zarr"
    assert write_zarr(first, store) == {"written": 9, "skipped": 0}
    with pytest.raises(RadarDataError, match="exists; use append=True"):
        write_zarr(first, store)
    assert write_zarr(RadarArchive(tmp_path / "steps"), store, append=True) == {"written": 5, "skipped": 9}
    assert is_zarr_store(store)
    out = all_test_windows(RadarDataModule(store, **kwargs))
    for key in ref:
        torch.testing.assert_close(out[key], ref[key], rtol=1e-6, atol=1e-6)
    ds = xr.open_zarr(store)
    assert ds["rain_rate"].attrs["units"] == "mm/h" and ds["rain_rate"].attrs["standard_name"] == "rainfall_rate"
    assert ds["rain_rate"].dims == ("time", "y", "x") and ds.sizes["time"] == 14
    assert ds["rain_rate"].encoding["chunks"][0] == 1  # one frame per chunk
    assert ds["y"].attrs["units"] == "km"
    # DataLoader workers reopen the store
    workers = all_test_windows(RadarDataModule(store, num_workers=1, **kwargs))
    torch.testing.assert_close(workers, ref, rtol=1e-6, atol=1e-6)


def test_zarr_from_a_pysteps_archive_keeps_the_projection_and_a_url_works(tmp_path):
    pytest.importorskip("h5py")
    pytest.importorskip("pysteps")
    from tests.test_radar_readers import ODIM, odim_archive

    odim_archive(tmp_path / "odim", n=6)
    archive = RadarArchive(tmp_path / "odim", **ODIM)
    url = "memory://radar/odim.zarr"  # any fsspec URL: the in-memory filesystem here
    write_zarr(archive, url)
    back = RadarArchive(url)
    assert back.backend == "zarr" and back.name == "odim"
    np.testing.assert_array_equal(back.times, archive.times)
    np.testing.assert_allclose(back.read([4])[0], archive.read([4])[0], equal_nan=True)
    assert back.grid().crs_attrs["grid_mapping_name"] == "lambert_azimuthal_equal_area"
    np.testing.assert_allclose(back.grid().x, archive.grid().x)


def test_stores_without_the_variable_or_a_time_axis_are_named(tmp_path):
    ds = xr.Dataset({"other": (("time", "y", "x"), np.zeros((3, 4, 4), np.float32), {"units": "mm/h"})},
                    coords={"time": np.arange(3).astype("datetime64[h]").astype("datetime64[ns]")})
    ds.to_zarr(tmp_path / "a.zarr")
    with pytest.raises(RadarDataError, match=r"a.zarr: no variable 'rain_rate'; variables present: other"):
        RadarArchive(tmp_path / "a.zarr", variable="rain_rate")
    flat = xr.Dataset({"rain": (("y", "x"), np.zeros((4, 4), np.float32), {"units": "mm/h"})})
    flat.to_zarr(tmp_path / "b.zarr")
    with pytest.raises(RadarDataError, match=r"b.zarr: variable 'rain' has dimensions \('y', 'x'\); expected \(time, y, x\)"):
        RadarArchive(tmp_path / "b.zarr", variable="rain")
    with pytest.raises(RadarDataError, match="cannot open Zarr store"):
        RadarArchive(tmp_path / "missing.zarr")


def test_prepare_radar_script_writes_and_appends(tmp_path):
    data = fields(12)
    paths = write_steps(tmp_path / "steps", data)
    store = tmp_path / "out.zarr"
    script = [sys.executable, str(ROOT / "scripts" / "prepare_radar.py")]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}  # this checkout's nowcast, not another install
    subprocess.run([*script, str(tmp_path / "steps" / "66_20201031_00*.nc"), str(store), "--no-bench"],
                   check=True, cwd=ROOT, capture_output=True, env=env)
    assert xr.open_zarr(store).sizes["time"] == 6
    run = subprocess.run([*script, str(tmp_path / "steps"), str(store), "--append"],
                         check=True, cwd=ROOT, capture_output=True, text=True, env=env)
    assert "wrote 6 frames (6 already there)" in run.stderr
    back = RadarArchive(store)
    np.testing.assert_allclose(back.read([11])[0], data[11] * 6, rtol=1e-6)
    assert len(paths) == 12
