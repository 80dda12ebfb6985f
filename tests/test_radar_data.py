"""RadarDataModule / RadarArchive on small netCDF archives written here, plus the real BoM day."""

from __future__ import annotations

import warnings
from pathlib import Path

import netCDF4
import numpy as np
import pytest
import torch
import xarray as xr

from nowcast.data.radar import RadarDataModule, window_indices
from nowcast.data.radar_io import RadarArchive, RadarDataError, block_mean
from nowcast.data.transforms import DBZScaled, LogRainRate, ScaledRainRate

T0 = np.datetime64("2020-10-31T00:00", "ns")
STEP = np.timedelta64(10, "m")
ACCUM_ATTRS = {"units": "kg m-2", "standard_name": "precipitation_amount"}
RATE_ATTRS = {"units": "mm h-1", "standard_name": "rainfall_rate"}
SHARED = Path(__file__).parents[1] / ".." / "shared" / "data" / "radar" / "bom-66-prcp-c10"


def fields(n: int = 16, size: int = 16, seed: int = 0) -> np.ndarray:
    """``(n, size, size)`` accumulations in mm, multiples of 0.05 (exact after packing)."""
    rng = np.random.default_rng(seed)
    return rng.integers(0, 40, size=(n, size, size)) * 0.05


def grid_coords(size: int) -> dict:
    y = xr.Variable("y", np.arange(size)[::-1] * 0.5 + 0.25, {"units": "km"})
    x = xr.Variable("x", np.arange(size) * 0.5 + 0.25, {"units": "km"})
    return {"y": y, "x": x}


def write_step(
    path: Path,
    when: np.datetime64 | None,
    field: np.ndarray,
    variable: str = "precipitation",
    attrs: dict | None = None,
    packed: bool = True,
) -> Path:
    """One BoM-like file: a 2-D field, scalar ``valid_time``, int16 packing + _FillValue."""
    ds = xr.Dataset(
        {variable: (("y", "x"), field, dict(attrs or ACCUM_ATTRS))}, coords=grid_coords(field.shape[-1])
    )
    encoding = {}
    if packed:
        encoding[variable] = {"dtype": "int16", "scale_factor": 0.05, "_FillValue": -1, "zlib": True}
    if when is not None:
        ds["valid_time"] = ((), np.datetime64(when, "ns"))
        encoding["valid_time"] = {"units": "seconds since 1970-01-01 00:00:00", "dtype": "int64"}
    ds.to_netcdf(path, encoding=encoding)
    return path


def write_steps(directory: Path, data: np.ndarray, skip: tuple[int, ...] = (), **kwargs) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for k, field in enumerate(data):
        if k in skip:
            continue
        when = T0 + k * STEP
        name = f"66_{np.datetime_as_string(when, 's').replace('-', '').replace(':', '').replace('T', '_')}.prcp-c10.nc"
        paths.append(write_step(directory / name, when, field, **kwargs))
    return paths


def write_stack(path: Path, data: np.ndarray, first: int = 0, attrs: dict | None = None) -> Path:
    """One file with a ``time`` dimension (float32, NaN fill)."""
    times = T0 + (first + np.arange(len(data))) * STEP
    ds = xr.Dataset(
        {"precipitation": (("time", "y", "x"), data.astype(np.float32), dict(attrs or ACCUM_ATTRS))},
        coords={"time": times, **grid_coords(data.shape[-1])},
    )
    ds.to_netcdf(path, encoding={"time": {"units": "minutes since 2020-01-01 00:00:00"}})
    return path


def all_test_windows(dm: RadarDataModule) -> dict[str, torch.Tensor]:
    batches = list(dm.test_dataloader())
    return {k: torch.cat([b[k] for b in batches]) for k in batches[0]}


WHOLE = ["2020-10-31T00:00", "2020-10-31T23:59"]


# ------------------------------------------------------------------ reading modes
def test_per_step_files_accumulation_to_rain_rate(tmp_path):
    data = fields()
    write_steps(tmp_path / "arc", data)
    dm = RadarDataModule(
        tmp_path / "arc", transform=ScaledRainRate(1.0), input_steps=2, output_steps=3,
        test_period=WHOLE, batch_size=4,
    )
    out = all_test_windows(dm)
    assert dm.archive.variable == "precipitation"  # found by standard_name
    assert out["inputs"].shape == (12, 2, 1, 16, 16) and out["inputs"].dtype == torch.float32
    assert out["targets"].shape == out["mask"].shape == (12, 3, 1, 16, 16)
    assert out["mask"].dtype == torch.bool and out["mask"].all()
    # 10-min accumulation in mm -> mm/h: x 6, by hand for window 0 (frames 0, 1 | 2, 3, 4)
    np.testing.assert_allclose(out["inputs"][0, :, 0].numpy(), data[0:2] * 6, rtol=1e-6)
    np.testing.assert_allclose(out["targets"][5, :, 0].numpy(), data[7:10] * 6, rtol=1e-6)
    assert out["issue_time"].dtype == torch.int64
    expected = (T0 + np.arange(1, 13) * STEP).astype(np.int64)
    np.testing.assert_array_equal(out["issue_time"].numpy(), expected)
    assert dm.num_leads == 3 and dm.lead_times == ["10min", "20min", "30min"]
    assert dm.grid.shape == (16, 16) and dm.grid.y_attrs["units"] == "km"


def test_filename_time_glob_list_and_unsorted(tmp_path):
    data = fields(12)
    paths = write_steps(tmp_path / "arc", data, packed=False)
    for p in paths:  # strip valid_time: times must come from the names
        with xr.open_dataset(p) as ds:
            ds = ds.drop_vars("valid_time").load()
        ds.to_netcdf(p)
    kwargs = dict(
        filename_time_format="%Y%m%d_%H%M%S", transform=ScaledRainRate(1.0), input_steps=2,
        output_steps=2, test_period=WHOLE, batch_size=16,
    )
    by_glob = all_test_windows(RadarDataModule(str(tmp_path / "arc" / "66_*.nc"), **kwargs))
    # A list in reverse order is sorted by time, not taken as given.
    by_list = all_test_windows(RadarDataModule([str(p) for p in paths[::-1]], **kwargs))
    for out in (by_glob, by_list):
        assert out["inputs"].shape[0] == 9
        np.testing.assert_allclose(out["targets"][3, :, 0].numpy(), data[5:7] * 6, rtol=1e-6)
        assert out["issue_time"][0] == (T0 + STEP).astype(np.int64)
    with pytest.raises(RadarDataError, match=r"no time variable 'valid_time'.*filename_time_format"):
        RadarArchive(tmp_path / "arc")


def test_time_dimension_files_match_per_step_files(tmp_path):
    data = fields(14)
    write_steps(tmp_path / "steps", data)
    write_stack(tmp_path / "one.nc", data)
    (tmp_path / "two").mkdir()
    write_stack(tmp_path / "two" / "b.nc", data[8:], first=8)  # later file first by name
    write_stack(tmp_path / "two" / "a.nc", data[:8])
    kwargs = dict(input_steps=3, output_steps=2, test_period=WHOLE, batch_size=32)
    ref = all_test_windows(RadarDataModule(tmp_path / "steps", **kwargs))
    for path, chunks in [(tmp_path / "one.nc", None), (tmp_path / "two", None), (tmp_path / "one.nc", {"time": 1})]:
        out = all_test_windows(RadarDataModule(path, chunks=chunks, **kwargs))
        for key in ref:
            torch.testing.assert_close(out[key], ref[key], rtol=1e-6, atol=1e-6)
    two = RadarArchive(tmp_path / "two")
    assert len(two.files) == 2
    # the file of every frame, in time order: a.nc holds the first 8, b.nc the rest
    assert [p.name for p in two.frame_files()] == ["a.nc"] * 8 + ["b.nc"] * 6
    assert [p.name for p in two.frame_files([13, 0, 8])] == ["b.nc", "a.nc", "b.nc"]


# ------------------------------------------------------------------ units
def test_units_rate_override_accumulation_minutes_and_dbz(tmp_path):
    data = fields(12)
    write_stack(tmp_path / "rate.nc", data, attrs=RATE_ATTRS)
    rate = RadarArchive(tmp_path / "rate.nc")
    np.testing.assert_allclose(rate.read([3])[0], data[3], rtol=1e-6)  # mm/h unchanged
    # `units` overrides the attribute; accumulation over 5 minutes: x 12
    acc = RadarArchive(tmp_path / "rate.nc", units="mm", accumulation_minutes=5)
    np.testing.assert_allclose(acc.read([3])[0], data[3] * 12, rtol=1e-6)
    # dBZ with Marshall-Palmer: 10 log10(200) = 23.0103 dBZ is 1 mm/h, +16 dBZ is 10 mm/h
    dbz = np.full((12, 16, 16), 10 * np.log10(200.0))
    dbz[:, 0, 0] += 16.0
    dbz[:, 1, 1] = np.nan
    write_stack(tmp_path / "dbz.nc", dbz, attrs={"units": "dBZ"})
    with pytest.raises(RadarDataError, match=r"no variable with standard_name.*one of: precipitation"):
        RadarArchive(tmp_path / "dbz.nc")  # no standard_name: the variable must be named
    frame = RadarArchive(tmp_path / "dbz.nc", variable="precipitation").read([0])[0]
    assert frame[0, 0] == pytest.approx(10.0, rel=1e-5) and frame[2, 2] == pytest.approx(1.0, rel=1e-5)
    assert np.isnan(frame[1, 1])
    # HKO relation: Z = 58.53 R^1.56, R = 1 mm/h at 10 log10(58.53) dBZ
    hko = RadarArchive(tmp_path / "dbz.nc", variable="precipitation", zr_a=58.53, zr_b=1.56).read([0])[0]
    assert hko[2, 2] == pytest.approx((200 / 58.53) ** (1 / 1.56), rel=1e-5)
    with pytest.raises(RadarDataError, match="unknown units 'furlongs'"):
        RadarArchive(tmp_path / "rate.nc", units="furlongs")


# ------------------------------------------------------------------ mask, space
def test_missing_values_become_mask_and_no_rain_inputs(tmp_path):
    data = fields(12)
    data[:, 0, :4] = np.nan  # packed: written as _FillValue -1
    write_steps(tmp_path / "arc", data)
    transform = LogRainRate()
    dm = RadarDataModule(tmp_path / "arc", transform=transform, input_steps=4, output_steps=2,
                         test_period=WHOLE)
    out = all_test_windows(dm)
    assert torch.isfinite(out["inputs"]).all() and torch.isfinite(out["targets"]).all()
    assert (out["inputs"][..., 0, :4] == transform.encode(torch.zeros(()))).all()
    assert not out["mask"][..., 0, :4].any()
    assert out["mask"][..., 1:, :].all() and out["mask"][..., 0, 4:].all()
    decoded = transform.decode(out["targets"][0, :, 0])
    np.testing.assert_allclose(decoded[:, 1:].numpy(), data[4:6, 1:] * 6, rtol=1e-5, atol=1e-5)


def test_downsample_block_mean_by_hand(tmp_path):
    field = np.arange(16.0).reshape(4, 4)
    field[0, 0] = np.nan  # NaN-aware: mean of the other three
    field[2:, 2:] = np.nan  # an all-missing block stays missing
    expected = np.array([[(1 + 4 + 5) / 3, (2 + 3 + 6 + 7) / 4], [(8 + 9 + 12 + 13) / 4, np.nan]])
    np.testing.assert_allclose(block_mean(field, 2), expected)
    data = np.stack([field] * 12)
    write_stack(tmp_path / "a.nc", data, attrs=RATE_ATTRS)
    dm = RadarDataModule(tmp_path / "a.nc", downsample=2, transform=ScaledRainRate(1.0),
                         input_steps=2, output_steps=2, test_period=WHOLE)
    out = all_test_windows(dm)
    assert out["targets"].shape[-2:] == (2, 2)
    np.testing.assert_allclose(out["targets"][0, 0, 0].numpy(), np.nan_to_num(expected), rtol=1e-6)
    assert out["mask"][0, 0, 0].tolist() == [[True, True], [True, False]]
    np.testing.assert_allclose(dm.grid.x, [0.5, 1.5])  # block centres of 0.25, 0.75, ...


def test_random_crop_for_training_padding_masked_for_test(tmp_path):
    data = fields(12)
    write_stack(tmp_path / "a.nc", data, attrs=RATE_ATTRS)
    dm = RadarDataModule(tmp_path / "a.nc", transform=ScaledRainRate(1.0), input_steps=2,
                         output_steps=2, crop_size=8, pad_multiple=5,
                         test_period=["2020-10-31T01:00", "2020-10-31T02:00"])
    dm.setup("fit")
    torch.manual_seed(0)
    sample = dm.dataset("train")[0]
    assert sample["inputs"].shape == (2, 1, 8, 8)
    frame = sample["inputs"][0, 0].numpy()
    s = int(dm.dataset("train").starts[0])
    hits = [(i, j) for i in range(9) for j in range(9) if np.allclose(data[s, i : i + 8, j : j + 8], frame)]
    assert len(hits) == 1  # the crop is a sub-array of the frame
    test = dm.dataset("test")[0]
    assert test["targets"].shape == (2, 1, 20, 20) and dm.frame_shape == (20, 20)
    assert dm.grid.shape == (16, 16)
    assert test["mask"][..., :16, :16].all() and not test["mask"][..., 16:, :].any()
    assert not test["mask"][..., :, 16:].any() and (test["inputs"][..., 16:, :] == 0).all()
    with pytest.raises(ValueError, match="crop_size"):
        RadarDataModule(tmp_path / "a.nc", crop_size=32, input_steps=2, output_steps=2).setup("fit")


def test_augmentation_rotates_and_flips_training_windows_only(tmp_path):
    data = fields(12)
    write_stack(tmp_path / "a.nc", data, attrs=RATE_ATTRS)
    dm = RadarDataModule(tmp_path / "a.nc", transform=ScaledRainRate(1.0), input_steps=2,
                         output_steps=2, augment=True,
                         test_period=["2020-10-31T01:00", "2020-10-31T02:00"])
    dm.setup("fit")
    train = dm.dataset("train")
    s = int(train.starts[0])
    original = data[s : s + 4]  # (T, H, W) mm/h
    variants = [np.rot90(original, k, axes=(1, 2)) for k in range(4)]
    variants += [v[:, :, ::-1] for v in variants]
    seen = set()
    torch.manual_seed(0)
    for _ in range(40):
        sample = train[0]
        frames = torch.cat([sample["inputs"], sample["targets"]])[:, 0].numpy()
        # the same transformation applied to every frame of the window
        match = [i for i, v in enumerate(variants) if np.allclose(v, frames, atol=1e-6)]
        assert len(match) == 1
        seen.add(match[0])
    assert len(seen) >= 6  # all eight are possible; 40 draws see most of them
    test = dm.dataset("test")[0]  # evaluation windows are never augmented
    s_test = int(dm.dataset("test").starts[0])
    np.testing.assert_allclose(test["inputs"][0, 0].numpy(), data[s_test], rtol=1e-6)


# ------------------------------------------------------------------ time axis and splits
def test_windows_across_gaps_are_dropped(tmp_path):
    write_steps(tmp_path / "arc", fields(16), skip=(7,))  # 00:00..02:30 without 01:10
    dm = RadarDataModule(tmp_path / "arc", input_steps=2, output_steps=2, test_period=WHOLE)
    issue = dm.dataset("test").issue_times()
    # windows of 4 frames: starts 0..3 (before the gap) and 8..12 (after it)
    expected = T0 + np.array([1, 2, 3, 4, 9, 10, 11, 12, 13]) * STEP
    np.testing.assert_array_equal(issue, expected)
    windows, gaps = window_indices(dm.archive.times, dm.archive.step, 4, np.ones(15, bool))
    assert gaps == 3 and len(windows) == 9


def test_split_boundaries_and_strides(tmp_path):
    write_stack(tmp_path / "a.nc", fields(20))
    dm = RadarDataModule(
        tmp_path / "a.nc", input_steps=2, output_steps=2,
        val_period=["2020-10-31T01:00", "2020-10-31T01:50"],  # frames 6..11
        test_period=["2020-10-31T02:00", "2020-10-31T03:10"],  # frames 12..19
        window_stride=2, test_window_stride=1,
    )
    dm.setup("fit")
    dm.setup("test")
    start = lambda split: dm.dataset(split).starts.tolist()  # noqa: E731
    assert start("train") == [0, 2]  # frames 0..5 only, every 2nd window
    assert start("val") == [6, 7, 8]
    assert start("test") == [12, 13, 14, 15, 16]
    # An explicit train period: windows need all frames inside it
    dm2 = RadarDataModule(tmp_path / "a.nc", input_steps=2, output_steps=2,
                          train_period=["2020-10-31T00:30", "2020-10-31T01:20"])
    dm2.setup("fit")
    assert dm2.dataset("train").starts.tolist() == [3, 4, 5]
    assert dm2.val_dataloader() == []  # no val_period: no validation
    with pytest.raises(RadarDataError, match="no test_period configured"):
        dm2.setup("test")


def test_dry_window_filter_training_only(tmp_path):
    data = np.zeros((16, 16, 16))
    data[6:9, :8, :] = 1.0  # frames 6..8: half of the domain wet (6 mm/h)
    write_stack(tmp_path / "a.nc", data)
    kwargs = dict(input_steps=2, output_steps=2, test_period=["2020-10-31T01:50", "2020-10-31T02:30"])
    dm = RadarDataModule(tmp_path / "a.nc", min_wet_fraction=0.3, **kwargs)
    dm.setup("fit")
    dm.setup("test")
    # wet fraction of a 4-frame window = 0.5 * (wet frames) / 4 >= 0.3 needs 3 wet frames
    assert dm.dataset("train").starts.tolist() == [5, 6]
    assert len(dm.dataset("test")) == 2  # frames 11..15, not filtered
    dm0 = RadarDataModule(tmp_path / "a.nc", **kwargs)
    assert len(dm0.dataset("train")) == 8
    with pytest.raises(RadarDataError, match="no window has a wet fraction"):
        RadarDataModule(tmp_path / "a.nc", min_wet_fraction=0.9, **kwargs).setup("fit")


def test_cache_frames_keeps_every_training_frame_after_the_dry_filter(tmp_path):
    data = np.zeros((16, 16, 16))
    data[4:12] = 1.0
    write_stack(tmp_path / "a.nc", data)
    kwargs = dict(input_steps=2, output_steps=2, min_wet_fraction=0.1)

    def no_more_reads(*args, **kwargs):
        raise AssertionError("read the file again")

    dm = RadarDataModule(tmp_path / "a.nc", cache_frames=100, **kwargs)
    dm.setup("fit")
    train = dm.dataset("train")
    dm.archive._read_rate = no_more_reads  # the dry filter's one pass filled the cache
    for i in range(len(train)):
        train[i]
    small = RadarDataModule(tmp_path / "a.nc", **kwargs)  # default: one window's worth
    small.setup("fit")
    small.archive._read_rate = no_more_reads
    with pytest.raises(AssertionError, match="read the file again"):
        for i in range(len(small.dataset("train"))):
            small.dataset("train")[i]
    with pytest.raises(ValueError, match="cache_frames must be >= 0"):
        RadarDataModule(tmp_path / "a.nc", cache_frames=-1)


# ------------------------------------------------------------------ bad input
def test_no_files_and_missing_variable(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        RadarArchive(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no netCDF files match"):
        RadarArchive(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="no netCDF files match"):
        RadarArchive(str(tmp_path / "empty" / "*.nc"))
    write_steps(tmp_path / "arc", fields(3), attrs={"units": "mm"})
    with pytest.raises(RadarDataError, match=r"no variable 'rain'; variables present: precipitation, valid_time"):
        RadarArchive(tmp_path / "arc", variable="rain")
    with pytest.raises(RadarDataError, match=r"no variable with standard_name.*set `variable`.*precipitation"):
        RadarArchive(tmp_path / "arc")


def test_corrupt_file_named_or_skipped(tmp_path):
    paths = write_steps(tmp_path / "arc", fields(12))
    bad = paths[5]
    bad.write_bytes(bad.read_bytes()[:200])  # truncated
    with pytest.raises(RadarDataError, match=f"cannot read radar file {bad}"):
        RadarArchive(tmp_path / "arc")
    with pytest.warns(RuntimeWarning, match=bad.name):
        dm = RadarDataModule(tmp_path / "arc", skip_bad_files=True, input_steps=2, output_steps=2,
                             test_period=WHOLE)
        starts = dm.dataset("test").starts
    assert len(dm.archive) == 11 and len(starts) == 5  # windows across the lost frame dropped
    # Times from names: files are opened only when read; the error names the file then.
    for p in paths:
        if p != bad:
            with xr.open_dataset(p) as ds:
                ds = ds.load()
            ds.drop_vars("valid_time").to_netcdf(p)
    dm = RadarDataModule(tmp_path / "arc", filename_time_format="%Y%m%d_%H%M%S", input_steps=2,
                         output_steps=2, test_period=WHOLE)
    with pytest.raises(RadarDataError, match=f"cannot read radar file {bad}"):
        dm.dataset("test")[3]
    dm = RadarDataModule(tmp_path / "arc", filename_time_format="%Y%m%d_%H%M%S", input_steps=2,
                         output_steps=2, test_period=WHOLE, skip_bad_files=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sample = dm.dataset("test")[3]  # frames 3..6: frame 5 is the bad one, a target
    assert not sample["mask"][0].any() and sample["mask"][1].all()


def test_inconsistent_grid_duplicate_times_too_few_frames_empty_period(tmp_path):
    paths = write_steps(tmp_path / "arc", fields(6))
    write_step(paths[3], T0 + 3 * STEP, fields(1, size=8)[0])
    with pytest.raises(RadarDataError, match=f"{paths[3]}: grid of 'precipitation' \\(8x8.*differs"):
        RadarArchive(tmp_path / "arc")
    write_step(paths[3], T0 + 2 * STEP, fields(1)[0])  # same time as paths[2]
    with pytest.raises(RadarDataError, match=f"duplicate frame time.*00:20:00.*{paths[2].name} and .*{paths[3].name}"):
        RadarArchive(tmp_path / "arc")
    write_step(paths[3], T0 + 3 * STEP, fields(1)[0])
    with pytest.raises(RadarDataError, match="has 6 frames, fewer than one window of .* = 10"):
        RadarDataModule(tmp_path / "arc", test_period=WHOLE).setup("test")
    with pytest.raises(RadarDataError, match=r"test_period \[2021-01-01.*selects no frame.*spans 2020-10-31T00:00"):
        RadarDataModule(tmp_path / "arc", input_steps=2, output_steps=2,
                        test_period=["2021-01-01", "2021-01-02"]).setup("test")
    with pytest.raises(RadarDataError, match="test: no window of 4 consecutive frames.*too few frames"):
        RadarDataModule(tmp_path / "arc", input_steps=2, output_steps=2,
                        test_period=["2020-10-31T00:00", "2020-10-31T00:20"]).setup("test")


def test_worker_processes_read_their_own_handles(tmp_path):
    write_stack(tmp_path / "a.nc", fields(12))
    kwargs = dict(input_steps=2, output_steps=2, test_period=WHOLE, batch_size=3)
    ref = all_test_windows(RadarDataModule(tmp_path / "a.nc", **kwargs))
    dm = RadarDataModule(tmp_path / "a.nc", num_workers=1, **kwargs)
    dm.archive.read([0])  # an open handle in the parent must not travel to the worker
    out = all_test_windows(dm)
    torch.testing.assert_close(out, ref)


# ------------------------------------------------------------------ real data
@pytest.mark.shared_data
def test_real_bom_day():
    if not SHARED.is_dir():
        pytest.skip(f"real radar data not found at {SHARED.resolve()}")
    transform = DBZScaled()
    dm = RadarDataModule(SHARED, downsample=2, transform=transform,
                         test_period=["2020-10-31T08:00", "2020-10-31T11:50"], batch_size=15)
    dm.setup("test")
    assert dm.archive.source_units == "kg m-2" and dm.transform.units == "mm/h"
    assert len(dm.archive) == 144 and dm.grid.shape == (256, 256) and dm.frame_shape == (256, 256)
    assert dm.lead_times[0] == "10min" and dm.lead_times[-1] == "60min"
    batch = next(iter(dm.test_dataloader()))
    assert batch["inputs"].shape == (15, 4, 1, 256, 256) and batch["targets"].shape == (15, 6, 1, 256, 256)
    issue = batch["issue_time"].numpy().astype("datetime64[ns]")
    np.testing.assert_array_equal(issue, np.arange("2020-10-31T08:30", "2020-10-31T11:00", 10,
                                                   dtype="datetime64[m]").astype("datetime64[ns]"))
    # first target of the first window: 08:40, accumulation x 6 -> mm/h, then 2x2 means
    with netCDF4.Dataset(SHARED / "66_20201031_084000.prcp-c10.nc") as ds:
        raw = np.ma.filled(ds["precipitation"][:].astype(float), np.nan)
    expected = (raw * 6).reshape(256, 2, 256, 2).mean(axis=(1, 3))
    got = transform.decode(batch["targets"][0, 0, 0]).numpy()
    keep = expected >= transform.r_min  # trace rain below dbz_min is "no rain"
    np.testing.assert_allclose(got[keep], expected[keep], rtol=1e-4)
    assert got.max() > 30 and batch["mask"].all()


class _Persistence(torch.nn.Module):
    """Repeats the last input frame; one weight so that there is something to train."""

    def __init__(self, leads: int) -> None:
        super().__init__()
        self.leads = leads
        self.gain = torch.nn.Parameter(torch.ones(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, T_in, C, H, W) -> (B, T_out, C, H, W)
        return self.gain * x[:, -1:].expand(-1, self.leads, -1, -1, -1)


def test_runs_under_a_lightning_trainer(tmp_path):
    import lightning as L

    class Module(L.LightningModule):
        def __init__(self, leads: int) -> None:
            super().__init__()
            self.net = _Persistence(leads)
            self.seen: dict[str, int] = {"val": 0, "test": 0}

        def _loss(self, batch):
            err = (self.net(batch["inputs"]) - batch["targets"]) ** 2
            return err[batch["mask"]].mean()

        def training_step(self, batch, _):
            return self._loss(batch)

        def validation_step(self, batch, _):
            self.seen["val"] += len(batch["issue_time"])

        def test_step(self, batch, _):
            self.seen["test"] += len(batch["issue_time"])

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.01)

    write_stack(tmp_path / "a.nc", fields(20))
    for val_period in (None, ["2020-10-31T01:00", "2020-10-31T01:50"]):
        dm = RadarDataModule(tmp_path / "a.nc", input_steps=2, output_steps=2, batch_size=4,
                             val_period=val_period, test_period=["2020-10-31T02:00", "2020-10-31T03:10"])
        module = Module(dm.num_leads)
        trainer = L.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                            enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                            default_root_dir=tmp_path)
        trainer.fit(module, datamodule=dm)
        trainer.test(module, datamodule=dm, verbose=False)
        assert module.seen == {"val": 0 if val_period is None else 3, "test": 5}
