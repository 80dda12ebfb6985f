"""predict: the newest real BoM files in, CF netCDF nowcasts + PNG out; bad input gives
clear errors; watch mode driven by files appearing over time."""

from __future__ import annotations

import logging
import os
import shutil
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import xarray as xr

from nowcast.data.radar_io import RadarDataError
from nowcast.predict import predict, sha256
from tests.conftest import compose_config, shared_path
from tests.test_inference import make_checkpoint


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("ckpt"))


def _bom(*times: str) -> list[Path]:
    radar = shared_path("radar", "bom-66-prcp-c10")
    return [radar / f"66_20201031_{t}00.prcp-c10.nc" for t in times]


def _cfg(tmp_path: Path, ckpt: Path, inputs, *extra: str):
    listing = "[" + ",".join(str(p) for p in inputs) + "]" if isinstance(inputs, list) else str(inputs)
    return compose_config("predict", [f"ckpt_path={ckpt}", f"input={listing}",
                                      f"output_dir={tmp_path / 'out'}", *extra], tmp_path)


@pytest.mark.slow
def test_predict_writes_cf_netcdf_panel_and_summary(tmp_path, ckpt, caplog):
    files = _bom("0800", "0810", "0820", "0830", "0840", "0850")
    cfg = _cfg(tmp_path, ckpt, files, "methods=[model,persistence]")
    with caplog.at_level(logging.INFO, logger="nowcast.predict"):
        [result] = predict(cfg)
    out = tmp_path / "out"
    assert result["issue_time"] == np.datetime64("2020-10-31T08:50")
    assert [p.name for p in result["inputs"]] == [p.name for p in files[-4:]]  # the newest T_in
    assert set(result["paths"]) == {"model", "persistence", "png"}
    assert result["paths"]["model"] == out / "nowcast_20201031T0850Z_model.nc"
    assert result["paths"]["png"].stat().st_size > 10_000
    assert not list(out.glob(".*tmp"))  # no temporary file left behind

    ds = xr.open_dataset(result["paths"]["model"])
    rr = ds["rainfall_rate"]
    assert rr.dims == ("lead_time", "y", "x") and rr.shape == (3, 256, 256)  # downsample 2 as trained
    assert rr.attrs["units"] == "mm h-1" and rr.attrs["standard_name"] == "rainfall_rate"
    assert rr.attrs["grid_mapping"] == "proj" and "albers" in ds["proj"].attrs["grid_mapping_name"]
    assert ds.attrs["Conventions"] == "CF-1.8"
    assert ds["forecast_reference_time"].values == np.datetime64("2020-10-31T08:50", "ns")
    np.testing.assert_array_equal(ds["time"].values, np.array(
        ["2020-10-31T09:00", "2020-10-31T09:10", "2020-10-31T09:20"], dtype="datetime64[ns]"))
    assert (ds["lead_time"].values == np.array([10, 20, 30], dtype="timedelta64[m]")).all()
    assert np.all(np.diff(ds["y"].values) < 0) and ds["x"].attrs["units"] == "km"
    assert ds.attrs["model_sha256"] == sha256(ckpt) and ds.attrs["model_file"] == str(ckpt.resolve())
    assert ds.attrs["input_files"].split("\n") == [str(p) for p in files[-4:]]
    assert ds.attrs["nowcast_version"]
    # persistence: the last input (mm/h = 10-min accumulation x 6, 2x2 block mean)
    last = xr.open_dataset(files[-1])["precipitation"].values * 6
    last = last.reshape(256, 2, 256, 2).mean(axis=(1, 3))
    pers = xr.open_dataset(result["paths"]["persistence"])["rainfall_rate"].values
    np.testing.assert_allclose(pers[2], last, rtol=1e-5, atol=1e-5)
    assert pers[2].max() > 20  # the convective event
    # the model's file holds what the network forecasts from those frames
    from nowcast.inference import Tiling, load_forecaster

    fc = load_forecaster(ckpt, Tiling())
    x = torch.from_numpy(np.stack([
        xr.open_dataset(f)["precipitation"].values.reshape(256, 2, 256, 2).mean(axis=(1, 3)) * 6
        for f in files[-4:]]).astype(np.float32))[None, :, None]
    np.testing.assert_allclose(rr.values, fc(x)[0, :, 0].numpy(), rtol=1e-4, atol=1e-4)
    lines = [r.getMessage() for r in caplog.records if "wet area" in r.getMessage()]
    assert len(lines) == 6 and lines[0].startswith("model +10 min (valid 2020-10-31T09:00): wet area")
    assert "km2" in lines[0] and "max" in lines[0]


def test_predict_bad_input_errors(tmp_path, ckpt):
    with pytest.raises(RadarDataError, match=r"needs the 4 newest frames, found 3 readable"):
        predict(_cfg(tmp_path, ckpt, _bom("0800", "0810", "0820")))
    with pytest.raises(RadarDataError, match=r"66_20201031_082000.*followed by.*66_20201031_084000.*"
                                             r"2020-10-31T08:30 is missing or late"):
        predict(_cfg(tmp_path, ckpt, _bom("0800", "0810", "0820", "0840", "0850")))
    with pytest.raises(RadarDataError, match=r"512x512 px, spacing 0.5 x 0.5 km.*training grid \(spacing 1 x 1 km"):
        predict(_cfg(tmp_path, ckpt, _bom("0800", "0810", "0820", "0830"), "+data.downsample=1"))
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())
    # an output folder that cannot be created fails before the checkpoint is even read
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    cfg = compose_config("predict", ["ckpt_path=/does/not/exist.ckpt", f"input={tmp_path}",
                                     f"output_dir={blocker / 'out'}"], tmp_path)
    with pytest.raises(PermissionError, match="a_file/out is not writable"):
        predict(cfg)


def test_watch_issues_nowcasts_as_files_arrive(tmp_path, ckpt, caplog):
    """Frames appear one by one (a truncated file, a gap, a late file among them); the
    loop issues a nowcast per completed window and stops on SIGTERM."""
    incoming = tmp_path / "incoming"
    incoming.mkdir()
    out = tmp_path / "out"
    src = {t: p for t, p in zip(["0800", "0810", "0820", "0830", "0840", "0850", "0900"],
                                _bom("0800", "0810", "0820", "0830", "0840", "0850", "0900"))}
    errors: list[BaseException] = []
    before = signal.getsignal(signal.SIGTERM)  # a training earlier in this process may own it

    def wait_for(name: str, timeout: float = 90.0) -> None:
        end = time.monotonic() + timeout
        while not (out / name).exists():
            if time.monotonic() > end:
                raise TimeoutError(f"{name} not written")
            time.sleep(0.05)

    def feed() -> None:
        try:
            for t in ("0800", "0810", "0820", "0830"):
                shutil.copy(src[t], incoming)
                time.sleep(0.05)
            wait_for("nowcast_20201031T0830Z_model.nc")
            # a file still being written: truncated, unreadable -> skipped, nothing issued
            partial = incoming / src["0840"].name
            partial.write_bytes(src["0840"].read_bytes()[:5000])
            time.sleep(1.0)
            assert not (out / "nowcast_20201031T0840Z_model.nc").exists()
            shutil.copy(src["0840"], partial)  # now complete: issued
            wait_for("nowcast_20201031T0840Z_model.nc")
            shutil.copy(src["0900"], incoming)  # 08:50 is late: a gap, nothing issued
            time.sleep(1.0)
            shutil.copy(src["0850"], incoming)  # the late frame completes 08:30..09:00
            wait_for("nowcast_20201031T0900Z_model.nc")
        except BaseException as error:  # noqa: BLE001 - reported by the test below
            errors.append(error)
        finally:
            os.kill(os.getpid(), signal.SIGTERM)

    cfg = _cfg(tmp_path, ckpt, incoming, "watch=true", "poll_seconds=0.1", "timeout_s=240", "plot=false")
    feeder = threading.Thread(target=feed, daemon=True)
    with caplog.at_level(logging.INFO, logger="nowcast.predict"):
        feeder.start()
        issued = predict(cfg)
    feeder.join(5)
    assert not errors, errors
    assert [str(r["issue_time"].astype("datetime64[m]")) for r in issued] == [
        "2020-10-31T08:30", "2020-10-31T08:40", "2020-10-31T09:00"]
    messages = "\n".join(r.getMessage() for r in caplog.records)
    assert "66_20201031_084000.prcp-c10.nc" in messages and "SIGTERM received" in messages
    assert "the frame for 2020-10-31T08:50 is missing or late" in messages
    assert sorted(p.name for p in out.iterdir()) == [
        "nowcast_20201031T0830Z_model.nc", "nowcast_20201031T0840Z_model.nc",
        "nowcast_20201031T0900Z_model.nc"]
    assert signal.getsignal(signal.SIGTERM) is before  # handler restored
