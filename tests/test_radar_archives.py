"""Several archives in one datamodule: time steps, phases, mixing weights, per-archive
validation, split periods and their overlaps (small netCDF archives written here)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import xarray as xr
from hydra.utils import instantiate
from omegaconf import OmegaConf

from nowcast.data.archives import RadarSource
from nowcast.data.radar import RadarDataModule, window_indices
from nowcast.data.radar_io import RadarDataError
from nowcast.data.transforms import ScaledRainRate
from tests.conftest import compose_config

T0 = np.datetime64("2021-01-01T00:00", "ns")
RATE = {"units": "mm h-1", "standard_name": "rainfall_rate"}


def write_archive(path, n: int, minutes: int, size: int = 16, seed: int = 0, first: int = 0):
    """One netCDF file with a time axis: ``(n, size, size)`` rain rates, ``minutes`` apart."""
    rng = np.random.default_rng(seed)
    data = rng.integers(0, 100, size=(n, size, size)).astype(np.float32) / 10
    times = T0 + (first + np.arange(n)) * np.timedelta64(minutes, "m")
    ds = xr.Dataset({"rain": (("time", "y", "x"), data, RATE)},
                    coords={"time": times, "y": np.arange(size) * 1.0, "x": np.arange(size) * 1.0})
    ds.to_netcdf(path, encoding={"time": {"units": "minutes since 2021-01-01 00:00:00"}})
    return data


def test_window_indices_at_a_multiple_of_the_native_step():
    times = T0 + np.arange(10) * np.timedelta64(5, "m")
    times = np.delete(times, 6)  # a gap at 00:30
    windows, gaps = window_indices(times, np.timedelta64(10, "m"), 3, np.ones(len(times), bool))
    # frame times 00:00..00:45 without 00:30; windows of 3 frames 10 min apart
    got = [[str(times[i])[11:16] for i in w] for w in windows]
    assert got == [["00:00", "00:10", "00:20"], ["00:05", "00:15", "00:25"],
                   ["00:15", "00:25", "00:35"], ["00:25", "00:35", "00:45"]]
    assert gaps == 2  # 00:10 and 00:20 would need 00:30


def test_five_minute_archive_gives_ten_minute_windows_at_both_phases(tmp_path):
    ten = write_archive(tmp_path / "ten.nc", 12, 10, seed=1)
    five = write_archive(tmp_path / "five.nc", 20, 5, seed=2)
    period = ["2021-01-01", "2021-01-02"]
    dm = RadarDataModule(
        archives=[RadarSource(tmp_path / "ten.nc", name="ten", test_period=period),
                  RadarSource(tmp_path / "five.nc", name="five", test_period=period)],
        time_step="10min", input_steps=2, output_steps=1, transform=ScaledRainRate(1.0), batch_size=4,
    )
    parts = dm.datasets("test")
    assert len(parts["ten"]) == 10 and len(parts["five"]) == 16  # 5-min: every phase
    sample = parts["five"][1]  # frames 1, 3 | 5
    np.testing.assert_allclose(sample["inputs"][:, 0].numpy(), five[[1, 3]], rtol=1e-6)
    np.testing.assert_allclose(sample["targets"][0, 0].numpy(), five[5], rtol=1e-6)
    np.testing.assert_allclose(parts["ten"][0]["targets"][0, 0].numpy(), ten[2], rtol=1e-6)
    assert dm.lead_times == ["10min"]
    batches = list(dm.test_dataloader())
    assert sum(len(b["issue_time"]) for b in batches) == 26
    assert len(batches) == 3 + 4  # batches never mix archives
    with pytest.raises(RadarDataError, match=r"different time steps \(ten 10 min, five 5 min\); set data.time_step"):
        _ = RadarDataModule(archives=[RadarSource(tmp_path / "ten.nc", name="ten"),
                                      RadarSource(tmp_path / "five.nc", name="five")]).lead_times


def test_a_step_that_does_not_divide_the_experiment_step_is_named(tmp_path):
    write_archive(tmp_path / "ten.nc", 12, 10)
    dm = RadarDataModule(tmp_path / "ten.nc", time_step="15min", input_steps=2, output_steps=1,
                         test_period=["2021-01-01", "2021-01-02"])
    with pytest.raises(RadarDataError, match=r"archive 'ten.nc': its time step 10 min does not divide the experiment's time_step 15 min"):
        dm.setup("test")


def test_training_mixes_archives_by_weight_in_crops_of_one_size(tmp_path):
    write_archive(tmp_path / "a.nc", 30, 10, size=16)
    write_archive(tmp_path / "b.nc", 12, 10, size=24)
    kwargs = dict(input_steps=2, output_steps=1, batch_size=4)
    sources = lambda **w: [RadarSource(tmp_path / "a.nc", name="a", weight=w.get("a")),  # noqa: E731
                           RadarSource(tmp_path / "b.nc", name="b", weight=w.get("b"))]
    with pytest.raises(RadarDataError, match=r"different grids .*set data.crop_size"):
        RadarDataModule(archives=sources(), **kwargs).setup("fit")
    dm = RadarDataModule(archives=sources(), crop_size=8, **kwargs)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["inputs"].shape == (4, 2, 1, 8, 8)
    assert dm.val_dataloader() == [] and len(dm.dataset("train")) == 28 + 10
    # weights 1:3 draw a quarter of the samples from archive a (28 windows) whatever its size
    weighted = RadarDataModule(archives=sources(a=1.0, b=3.0), crop_size=8, **kwargs)
    weighted.setup("fit")
    torch.manual_seed(0)
    drawn = np.array([i for _ in range(40) for i in weighted.train_dataloader().sampler])
    assert abs((drawn < 28).mean() - 0.25) < 0.03
    with pytest.raises(ValueError, match="give a weight to every archive or to none"):
        RadarDataModule(archives=sources(a=1.0), **kwargs)
    with pytest.raises(ValueError, match="archive names must be unique"):
        RadarDataModule(archives=[RadarSource(tmp_path / "a.nc"), RadarSource(tmp_path / "a.nc")])


def test_overlapping_periods_are_an_error_naming_both(tmp_path):
    write_archive(tmp_path / "a.nc", 30, 10)
    kwargs = dict(input_steps=2, output_steps=1)
    dm = RadarDataModule(tmp_path / "a.nc", train_period=["2021-01-01T00:00", "2021-01-01T02:00"],
                         test_period=["2021-01-01T01:30", "2021-01-01T04:00"], **kwargs)
    with pytest.raises(RadarDataError, match=r"archive 'a.nc': train_period \[2021-01-01T00:00, 2021-01-01T02:00\] overlaps test_period \[2021-01-01T01:30, 2021-01-01T04:00\].*allow_overlapping_periods"):
        dm.setup("fit")
    src = RadarSource(tmp_path / "a.nc", name="radar", val_period=["2021-01-01T03:00", "2021-01-01T04:00"],
                      test_period=[["2021-01-01T00:00", "2021-01-01T01:00"], ["2021-01-01T03:50", "2021-01-01T04:50"]])
    with pytest.raises(RadarDataError, match=r"archive 'radar': val_period \[2021-01-01T03:00, 2021-01-01T04:00\] overlaps test_period \[2021-01-01T03:50"):
        RadarDataModule(archives=[src], **kwargs).setup("test")
    allowed = RadarDataModule(archives=[src], allow_overlapping_periods=True, **kwargs)
    allowed.setup("test")
    assert len(allowed.dataset("test")) > 0


def test_split_periods_and_a_period_without_windows(tmp_path):
    write_archive(tmp_path / "a.nc", 36, 10)  # 00:00 .. 05:50
    dm = RadarDataModule(
        tmp_path / "a.nc", input_steps=2, output_steps=1,
        val_period=["2021-01-01T02:00", "2021-01-01T02:50"],
        test_period=[["2021-01-01T04:00", "2021-01-01T04:30"], ["2021-01-01T05:00", "2021-01-01T05:50"]],
    )
    dm.setup("fit")
    periods = dm.split_periods()
    assert periods == {"a.nc": {
        # implicit training: every frame outside val and test, as runs of frames
        "train": [["2021-01-01T00:00:00", "2021-01-01T01:50:00"], ["2021-01-01T03:00:00", "2021-01-01T03:50:00"],
                  ["2021-01-01T04:40:00", "2021-01-01T04:50:00"]],
        "val": [["2021-01-01T02:00:00", "2021-01-01T02:50:00"]],
        "test": [["2021-01-01T04:00:00", "2021-01-01T04:30:00"], ["2021-01-01T05:00:00", "2021-01-01T05:50:00"]],
    }}
    dm.setup("test")
    assert len(dm.dataset("test")) == 2 + 4
    short = RadarDataModule(
        tmp_path / "a.nc", input_steps=2, output_steps=1,
        test_period=[["2021-01-01T04:00", "2021-01-01T04:30"], ["2021-01-01T05:00", "2021-01-01T05:10"]],
    )
    with pytest.raises(RadarDataError, match=r"archive 'a.nc': test_period \[2021-01-01T05:00, 2021-01-01T05:10\] selects no window of 3 frames 10 min apart"):
        short.setup("test")


def test_archives_from_a_config_with_nested_targets(tmp_path):
    write_archive(tmp_path / "a.nc", 12, 10)
    write_archive(tmp_path / "b.nc", 24, 5)
    cfg = OmegaConf.create({
        "_target_": "nowcast.data.radar.RadarDataModule", "time_step": "10min",
        "input_steps": 2, "output_steps": 1,
        "archives": [
            {"_target_": "nowcast.data.archives.RadarSource", "path": str(tmp_path / "a.nc"), "name": "a",
             "test_period": ["2021-01-01", "2021-01-02"], "downsample": 2, "weight": 1.0},
            {"_target_": "nowcast.data.archives.RadarSource", "path": str(tmp_path / "b.nc"), "name": "b",
             "weight": 2.0},
        ],
    })
    dm = instantiate(cfg)
    assert [s.name for s in dm.sources] == ["a", "b"] and dm.sources[1].weight == 2.0
    dm.setup("test")
    assert list(dm.datasets("test")) == ["a"]  # b has no test period
    assert dm.dataset("test")[0]["inputs"].shape == (2, 1, 8, 8)


def test_validation_scores_each_archive_and_their_mean(tmp_path):
    write_archive(tmp_path / "a.nc", 24, 10, size=16, seed=1)
    write_archive(tmp_path / "b.nc", 48, 5, size=24, seed=2)
    sources = ",".join(
        f"{{_target_:nowcast.data.archives.RadarSource,path:'{tmp_path / n}.nc',name:{n},"
        f"val_period:['2021-01-01T02:00','2021-01-01T03:50']}}" for n in ("a", "b")
    )
    cfg = compose_config("train", [
        "data=radar", "model=radar", "data.path=null", f"data.archives=[{sources}]",
        "data.time_step=10min", "data.input_steps=2", "data.output_steps=2", "data.crop_size=[16,16]",
        "data.batch_size=4", "model.net.hidden_channels=[4,4,4]", "trainer.max_epochs=1", "trainer.check_val_every_n_epoch=1",
        "+trainer.limit_train_batches=1", "callbacks.progress_bar.refresh_rate=0",
        "trainer.enable_model_summary=false",
    ], tmp_path)
    from nowcast.train import train

    metrics = train(cfg)
    for name in ("a", "b"):
        assert math.isfinite(metrics[f"val/{name}/mse"]) and f"val/{name}/persistence/csi_1mmh" in metrics
    assert metrics["val/mse"] == pytest.approx((metrics["val/a/mse"] + metrics["val/b/mse"]) / 2, rel=1e-5)
    assert metrics["val/loss"] == pytest.approx((metrics["val/a/loss"] + metrics["val/b/loss"]) / 2, rel=1e-5)
    assert isinstance(instantiate(cfg.data).sources[0], RadarSource)
