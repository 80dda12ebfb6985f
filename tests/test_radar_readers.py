"""Radar readers for the formats weather services ship (pysteps importers): small ODIM and
KNMI HDF5 files written here with h5py, real frames of every archive in ../shared (skipped
when absent), plausibility checks, and the reader errors."""

from __future__ import annotations

import gzip
import warnings
from pathlib import Path

import numpy as np
import pytest
import xarray as xr

from nowcast.data.radar import RadarDataModule
from nowcast.data.radar_io import RadarArchive, RadarDataError, list_frames, read_frames
from nowcast.data.transforms import ScaledRainRate
from tests.conftest import shared_path

h5py = pytest.importorskip("h5py")
pytest.importorskip("pysteps")

T0 = np.datetime64("2021-07-04T15:50", "ns")
STEP = np.timedelta64(5, "m")
LAEA = "+proj=laea +lat_0=51 +lon_0=5 +x_0=0 +y_0=0 +ellps=WGS84 +units=m +no_defs"


def stamp(when: np.datetime64, fmt: str = "%Y%m%d%H%M%S") -> str:
    return when.astype("datetime64[s]").item().strftime(fmt)


def write_odim(path: Path, raw: np.ndarray, gain: float = 0.01, nodata: float = 65535.0) -> Path:
    """An ODIM_H5 composite of rain rate (``RATE``, mm/h = raw * gain), 1 km LAEA grid."""
    from pyproj import Proj

    h, w = raw.shape
    proj = Proj(LAEA)
    ll = proj(-w / 2 * 1000.0, -h / 2 * 1000.0, inverse=True)  # lon, lat of the corners
    ur = proj(w / 2 * 1000.0, h / 2 * 1000.0, inverse=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as f:
        f.create_group("what").attrs.update({"object": b"COMP", "version": b"H5rad 2.2"})
        where = f.create_group("where")
        where.attrs.update({
            "projdef": np.bytes_(LAEA.encode()), "LL_lon": ll[0], "LL_lat": ll[1], "UR_lon": ur[0],
            "UR_lat": ur[1], "xscale": 1000.0, "yscale": 1000.0, "xsize": w, "ysize": h,
        })
        data = f.create_group("dataset1").create_group("data1")
        data.create_group("what").attrs.update(
            {"quantity": np.bytes_(b"RATE"), "gain": gain, "offset": 0.0, "nodata": nodata, "undetect": 0.0}
        )
        data.create_dataset("data", data=raw.astype(np.uint16))
    return path


def write_knmi(path: Path, pv: np.ndarray) -> Path:
    """A KNMI ``RAD_NL25_PCP_NA``-like file: uint8 pixel values, dBZ = 0.5 PV - 32."""
    h, w = pv.shape
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as f:
        f.create_group("image1").create_dataset("image_data", data=pv.astype(np.uint8))
        geo = f.create_group("geographic")
        geo.attrs.update({
            "geo_column_offset": np.array([0.0], np.float32),
            "geo_row_offset": np.array([3650.0], np.float32),
            "geo_pixel_size_x": np.array([1.0], np.float32),
            "geo_pixel_size_y": np.array([-1.0], np.float32),
            "geo_number_columns": np.array([w], np.int32),
            "geo_number_rows": np.array([h], np.int32),
            "geo_dim_pixel": np.bytes_(b"KM,KM"),
        })
        geo.create_group("map_projection").attrs["projection_proj4_params"] = np.bytes_(
            b"+proj=stere +lat_0=90 +lon_0=0.0 +lat_ts=60.0 +a=6378.137 +b=6356.752 +x_0=0 +y_0=0"
        )
    return path


def odim_archive(root: Path, n: int = 8, size: int = 16, seed: int = 0) -> tuple[list[Path], np.ndarray]:
    """``n`` ODIM files in YYYY/MM/DD folders; raw values (n, size, size), some nodata."""
    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 3000, size=(n, size, size))  # 0 .. 30 mm/h
    raw[:, 0, :3] = 65535  # nodata
    raw[:, -1, -1] = 0  # undetect: pysteps takes a frame's smallest value as "no rain"
    paths = []
    for k in range(n):
        when = T0 + k * STEP
        day = stamp(when, "%Y/%m/%d")
        paths.append(write_odim(root / day / f"{stamp(when)}.rad.best.comp.rate.qpe.hdf", raw[k]))
    return paths, raw


def rates(raw: np.ndarray, gain: float = 0.01) -> np.ndarray:
    out = raw * gain
    return np.where(raw == 65535, np.nan, out)


ODIM = dict(importer="odim_hdf5", importer_kwargs={"qty": "RATE"}, filename_time_format="%Y%m%d%H%M%S")
KNMI = dict(importer="knmi_hdf5", importer_kwargs={"qty": "DBZH"}, filename_time_format="%Y%m%d%H%M")


# ------------------------------------------------------------------ written files
def test_odim_recursive_search_ignores_other_files_and_reads_rate(tmp_path):
    paths, raw = odim_archive(tmp_path / "arc")
    (tmp_path / "arc" / "README.txt").write_text("not a frame")
    (tmp_path / "arc" / "2021" / "composite.log").write_text("not a frame either")
    archive = RadarArchive(tmp_path / "arc", **ODIM)
    assert len(archive) == 8 and archive.ignored_files == 2
    assert archive.step == STEP and archive.kind == "rate" and archive.source_units == "mm/h"
    np.testing.assert_array_equal(archive.times, T0 + np.arange(8) * STEP)
    frame = archive.read([3])[0]
    expected = rates(raw[3])
    np.testing.assert_allclose(frame, expected, rtol=1e-6, equal_nan=True)  # nodata -> NaN
    assert np.isnan(frame[0, :3]).all() and (frame[raw[3] == 0] == 0).all()  # undetect -> 0
    grid = archive.grid()
    assert np.allclose(np.diff(grid.x), 1000.0) and np.allclose(np.diff(grid.y), -1000.0)  # y down
    assert abs(grid.x.mean()) < 1.0 and abs(grid.y.mean()) < 1.0  # LAEA centred on the grid
    assert grid.crs_attrs["grid_mapping_name"] == "lambert_azimuthal_equal_area"
    assert "+proj=laea" in grid.crs_attrs["proj4_params"]
    # one file, a glob and a list read the same frames
    one = RadarArchive(paths[2], **ODIM, time_step="5min")
    np.testing.assert_array_equal(one.read([0])[0], archive.read([2])[0])
    globbed = RadarArchive(str(tmp_path / "arc" / "**" / "*.hdf"), **ODIM)
    listed = RadarArchive([str(p) for p in paths[::-1]], **ODIM)
    for other in (globbed, listed):
        np.testing.assert_array_equal(other.times, archive.times)
        np.testing.assert_array_equal(other.read([5])[0], archive.read([5])[0])


def test_read_frames_and_list_frames_for_operational_use(tmp_path):
    paths, raw = odim_archive(tmp_path / "arc")
    frames = list_frames(tmp_path / "arc", importer="odim_hdf5", filename_time_format="%Y%m%d%H%M%S")
    assert [t for t, _ in frames] == list(T0 + np.arange(8) * STEP)
    assert [f for _, f in frames] == paths
    newest = [f for _, f in frames[-4:]]
    da = read_frames(newest, downsample=2, **ODIM)
    assert da.dims == ("time", "y", "x") and da.shape == (4, 8, 8) and da.dtype == np.float32
    assert da.attrs["units"] == "mm/h" and da.attrs["grid_mapping"] == "proj"
    assert da.attrs["source"] == ", ".join(str(p) for p in newest)
    assert da["proj"].attrs["grid_mapping_name"] == "lambert_azimuthal_equal_area"
    np.testing.assert_array_equal(da["time"].values, T0 + np.arange(4, 8) * STEP)
    # 2x2 block means of the valid pixels, by hand
    r = rates(raw[7])
    blocks = r.reshape(8, 2, 8, 2).transpose(0, 2, 1, 3).reshape(8, 8, 4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        expected = np.nanmean(blocks, axis=-1)
    np.testing.assert_allclose(da.values[-1], expected, rtol=1e-5, equal_nan=True)
    assert da.attrs["time_step_minutes"] == 5.0
    # it writes as CF netCDF with its projection
    da.to_dataset().to_netcdf(tmp_path / "frames.nc")
    with xr.open_dataset(tmp_path / "frames.nc") as back:
        assert back["rain_rate"].attrs["grid_mapping"] == "proj"
    one = read_frames(newest[-1], **ODIM)  # a single frame works too
    assert one.shape == (1, 16, 16)


def test_knmi_reflectivity_through_the_zr_relation_and_plausibility(tmp_path):
    rng = np.random.default_rng(1)
    pv = rng.integers(0, 140, size=(6, 12, 10))  # up to 37.5 dBZ
    pv[:, 0, 0] = 255  # outside coverage
    pv[2, 5, 5] = 254  # 95 dBZ: clutter, outside the plausible range
    for k in range(6):
        write_knmi(tmp_path / "knmi" / f"{stamp(T0 + k * STEP, '%Y%m%d%H%M')}.hf5", pv[k])
    archive = RadarArchive(tmp_path / "knmi", **KNMI)
    assert archive.kind == "dbz" and archive.zr == (200.0, 1.6)
    dbz = 0.5 * pv[1] - 32.0
    expected = (10 ** (dbz / 10) / 200.0) ** (1 / 1.6)  # Marshall-Palmer, by hand
    expected[pv[1] <= 1] = 0.0  # below the importer's threshold (-31.5 dBZ): no rain
    expected[0, 0] = np.nan
    np.testing.assert_allclose(archive.read([1])[0], expected, rtol=1e-5, equal_nan=True)
    assert archive.grid().y_attrs["units"] == "km" and archive.grid().shape == (12, 10)
    with pytest.warns(RuntimeWarning, match=r"knmi/.*\.hf5: 1 value\(s\) outside the plausible range \[-40, 80\] dBZ"):
        clutter = archive.read([2])[0]
    assert np.isnan(clutter[5, 5]) and np.isfinite(clutter[5, 4])
    strict = RadarArchive(tmp_path / "knmi", strict_values=True, **KNMI)
    with pytest.raises(RadarDataError, match=r"\.hf5: 1 value\(s\) outside .*strict_values=true"):
        strict.read([2])
    hko = RadarArchive(tmp_path / "knmi", zr_a=58.53, zr_b=1.56, **KNMI).read([1])[0]
    np.testing.assert_allclose(hko[3, 3], (10 ** (dbz[3, 3] / 10) / 58.53) ** (1 / 1.56), rtol=1e-5)


def test_absurd_rain_rates_are_masked_with_a_warning_or_an_error(tmp_path):
    raw = np.full((6, 8, 8), 100)  # 1 mm/h
    raw[:, -1, -1] = 0  # undetect
    raw[3, :2, :2] = 60000  # 600 mm/h: a fault, not rain
    for k in range(6):
        write_odim(tmp_path / "arc" / f"{stamp(T0 + k * STEP)}.hdf", raw[k])
    dm = RadarDataModule(tmp_path / "arc", transform=ScaledRainRate(1.0), input_steps=2,
                         output_steps=2, test_period=["2021-07-04", "2021-07-05"], **ODIM)
    with pytest.warns(RuntimeWarning, match=r"20210704160500\.hdf: 4 value\(s\) outside the plausible range \[-inf, 500\] mm/h"):
        sample = dm.dataset("test")[1]  # frames 1..4: frame 3 is the first target
    assert not sample["mask"][0, 0, :2, :2].any() and sample["mask"][0, 0, 2:].all()
    assert float(sample["targets"].max()) == pytest.approx(1.0)
    assert float(sample["targets"][0, 0, 3, 3]) == pytest.approx(1.0)
    strict = RadarDataModule(tmp_path / "arc", strict_values=True, input_steps=2, output_steps=2,
                             test_period=["2021-07-04", "2021-07-05"], **ODIM)
    with pytest.raises(RadarDataError, match=r"160500\.hdf: 4 value\(s\).*strict_values=true"):
        strict.dataset("test")[1]
    loose = RadarArchive(tmp_path / "arc", max_rain_rate=None, **ODIM)
    assert loose.read([3])[0].max() == pytest.approx(600.0)


# ------------------------------------------------------------------ errors
def test_importer_errors_name_what_is_wrong(tmp_path, monkeypatch):
    paths, _ = odim_archive(tmp_path / "arc", n=6)
    with pytest.raises(RadarDataError, match=r"unknown importer 'odim'; valid names: .*knmi_hdf5.*odim_hdf5"):
        RadarArchive(tmp_path / "arc", importer="odim", filename_time_format="%Y%m%d%H%M%S")
    with pytest.raises(RadarDataError, match="importer 'odim_hdf5' needs filename_time_format"):
        RadarArchive(tmp_path / "arc", importer="odim_hdf5")
    stray = tmp_path / "stray.hdf"
    stray.write_bytes(paths[0].read_bytes())
    with pytest.raises(RadarDataError, match=f"{stray}: file name does not match filename_time_format"):
        RadarArchive([*paths, stray], **ODIM)
    with pytest.raises(RadarDataError, match=r"importer 'odim_hdf5': .*keyword.*importer_kwargs"):
        RadarArchive(tmp_path / "arc", importer="odim_hdf5", importer_kwargs={"quantity": "RATE"},
                     filename_time_format="%Y%m%d%H%M%S")
    # a file the importer cannot parse is named; skip_bad_files warns and goes on
    bad = paths[3]
    bad.write_bytes(b"\x89HDF garbage")
    archive = RadarArchive(tmp_path / "arc", **ODIM)
    with pytest.raises(RadarDataError, match=f"cannot read radar file {bad} with importer 'odim_hdf5'.*skip_bad_files"):
        archive.read([3])
    skipping = RadarArchive(tmp_path / "arc", skip_bad_files=True, **ODIM)
    with pytest.warns(RuntimeWarning, match=bad.name):
        assert np.isnan(skipping.read([3])[0]).all()
    assert np.isfinite(skipping.read([4])[0]).any()
    # the grid changes within the archive
    write_odim(paths[4], np.zeros((8, 8)))
    with pytest.raises(RadarDataError, match=f"{paths[4]}: grid 8x8.*differs from that of .*all frames of archive 'arc'"):
        archive.read([4])
    # a missing optional dependency names the extra (the importer's own check, made to fail)
    import pysteps.io.importers as importers

    monkeypatch.setattr(importers, "H5PY_IMPORTED", False)
    with pytest.raises(RadarDataError, match=r"h5py.*install the readers' extra: pip install -e \"\.\[radar\]\""):
        RadarArchive(tmp_path / "arc", **ODIM)


# ------------------------------------------------------------------ real frames
def _real(folder: str, **kwargs) -> RadarArchive:
    return RadarArchive(shared_path("radar", folder), **kwargs)


@pytest.mark.shared_data
def test_real_knmi_frames_match_the_raw_pixel_values():
    archive = _real("knmi-2021-pcp", **KNMI)
    assert len(archive) == 720 and archive.native_shape == (765, 700)
    assert archive.step == np.timedelta64(5, "m")
    i = int(np.searchsorted(archive.times, np.datetime64("2021-02-04T22:00")))
    [path] = archive.frame_files([i])
    assert path.name == "202102042200.hf5"
    with h5py.File(path, "r") as f:  # independent decoding: dBZ = 0.5 PV - 32, 255 outside
        pv = f["image1/image_data"][...].astype(float)
    dbz = 0.5 * pv - 32.0
    expected = np.where(pv == 255, np.nan, (10 ** (dbz / 10) / 200.0) ** (1 / 1.6))
    expected[pv == 0] = 0.0  # -32 dBZ, below the importer's threshold (-31.5): no rain
    got = archive.read([i])[0]
    keep = np.isfinite(got)  # plausibility may mask clutter
    assert keep.sum() >= np.isfinite(expected).sum() - 50
    np.testing.assert_allclose(got[keep], expected[keep], rtol=1e-4)
    assert 0.15 < np.isnan(got).mean() < 0.25  # ~20 % outside coverage
    assert archive.grid().crs_attrs["grid_mapping_name"] == "polar_stereographic"


@pytest.mark.shared_data
def test_real_rmi_odim_frames_match_h5py():
    archive = _real("rmi-2021-odim", **ODIM)
    assert len(archive) == 39 and archive.native_shape == (700, 700) and archive.kind == "rate"
    path = archive.files[20]
    with h5py.File(path, "r") as f:
        what = dict(f["dataset1/data1/what"].attrs)  # ODIM defaults where absent
        gain, offset = what.get("gain", 1.0), what.get("offset", 0.0)
        raw = f["dataset1/data1/data"][...].astype(float)
        expected = np.where(raw == what.get("nodata", np.nan), np.nan, raw * gain + offset)
        expected[raw == what.get("undetect", 0.0)] = offset
    got = archive.read([20])[0]
    np.testing.assert_allclose(got, np.maximum(expected, 0), rtol=1e-5, atol=1e-6, equal_nan=True)
    assert np.nanmax(got) > 10


@pytest.mark.shared_data
def test_real_fmi_pgm_frames_use_the_fmi_zr_relation():
    archive = _real("fmi-2016-pgm", importer="fmi_pgm", importer_kwargs={"gzipped": True},
                    filename_time_format="%Y%m%d%H%M")
    assert len(archive) == 80 and archive.native_shape == (1226, 760) and archive.kind == "dbz"
    path = archive.files[10]
    with gzip.open(path, "rb") as f:  # independent PGM decoding: P5, comments, size, maxval
        content = f.read()
    lines = content.split(b"\n")
    body = [k for k, line in enumerate(lines) if not line.startswith(b"#")]
    width, height = (int(v) for v in lines[body[1]].split())
    offset = sum(len(line) + 1 for line in lines[: body[2] + 1])  # after the maxval line
    values = np.frombuffer(content[offset : offset + width * height], np.uint8).reshape(height, width)
    dbz = 0.5 * values.astype(float) - 32.0  # FMI's pixel-value convention
    expected = np.where(values == 255, np.nan, (10 ** (dbz / 10) / 223.0) ** (1 / 1.53))
    got = archive.read([10])[0]
    wet = np.isfinite(expected) & (values > 0) & np.isfinite(got) & (got > 0)
    assert wet.sum() > 1000
    np.testing.assert_allclose(got[wet], expected[wet], rtol=1e-4)


@pytest.mark.shared_data
def test_real_mrms_grib_downsampled_by_the_importer():
    pytest.importorskip("pygrib")
    folder = shared_path("radar", "mrms-2016-qpe01h")
    files = sorted(folder.glob("*.grib2"))[:2]
    da = read_frames(files, importer="mrms_grib", importer_kwargs={"window_size": 20},
                     filename_time_format="%Y%m%d-%H%M%S")
    assert da.shape == (2, 175, 350) and da.attrs["time_step_minutes"] == 60.0
    assert da["x"].attrs["units"] == "degrees_east" and -130 < float(da["x"][0]) < -129.8
    assert np.all(np.diff(da["y"].values) < 0)  # north at the top
    assert 0 < float(da.max()) < 500 and 0.1 < float(np.isnan(da).mean()) < 0.6
