"""Every reader end to end on real frames from ../shared (skipped when absent): the real
data config (data=radar_knmi, ...) composed with tiny overrides, one training step and
one validation batch of model=radar. Crops, downsampling and the MRMS importer's
window_size keep each run to a few frames."""

from __future__ import annotations

import math

import pytest

from nowcast.train import train
from tests.conftest import compose_config, shared_path

pytest.importorskip("pysteps")

TINY_RADAR = [
    "model=radar", "model.net.hidden_channels=[4,4,4]",
    "data.input_steps=2", "data.output_steps=1", "data.batch_size=1", "data.crop_size=[32,32]",
    "trainer.max_epochs=1", "trainer.check_val_every_n_epoch=1", "+trainer.limit_train_batches=1", "+trainer.limit_val_batches=1",
    "+trainer.num_sanity_val_steps=0", "trainer.enable_model_summary=false",
    "callbacks.progress_bar.refresh_rate=0",
]

READERS = {
    # folder, data config, overrides (periods of a few frames each)
    "knmi_hdf5": ("knmi-2021-pcp", "radar_knmi", [
        "data.downsample=4",
        "data.train_period=[2021-01-01T20:05,2021-01-01T20:30]",
        "data.val_period=[2021-01-02T20:05,2021-01-02T20:30]",
    ]),
    "fmi_pgm": ("fmi-2016-pgm", "radar_fmi", [
        "data.downsample=4",
        "data.train_period=[2016-09-28T14:45,2016-09-28T15:10]",
        "data.val_period=[2017-05-09T10:45,2017-05-09T11:10]",
    ]),
    "odim_hdf5": ("rmi-2021-odim", "radar_rmi", [
        "data.downsample=4",
        "data.train_period=[2021-07-04T15:50,2021-07-04T16:10]",
        "data.val_period=[2021-07-04T17:00,2021-07-04T17:20]",
    ]),
    "mrms_grib": ("mrms-2016-qpe01h", "radar_mrms", [
        "data.importer_kwargs.window_size=20",  # 175x350 at 0.2 deg: 3 s a frame to decode
        "data.train_period=[2016-09-20T00:00,2016-09-20T02:00]",
        "data.val_period=[2016-09-21T00:00,2016-09-21T02:00]",
    ]),
}


@pytest.mark.shared_data
@pytest.mark.parametrize("importer", [
    pytest.param(name, marks=pytest.mark.slow) if name == "mrms_grib" else name for name in READERS
])
def test_reader_trains_one_step_on_real_frames(importer, tmp_path):
    folder, config, overrides = READERS[importer]
    shared_path("radar", folder)
    if importer == "mrms_grib":
        pytest.importorskip("pygrib")
    else:
        pytest.importorskip("h5py")
    cfg = compose_config("train", [f"data={config}", *TINY_RADAR, *overrides], tmp_path)
    assert cfg.data.importer == importer
    metrics = train(cfg)
    assert math.isfinite(metrics["train/loss_epoch"]) and math.isfinite(metrics["val/mse"])
    assert math.isfinite(metrics["val/persistence/mae"])


@pytest.mark.shared_data
def test_zarr_store_of_real_frames_trains_one_step(tmp_path):
    pytest.importorskip("zarr")
    pytest.importorskip("h5py")
    from nowcast.data.radar_io import RadarArchive
    from nowcast.data.radar_zarr import write_zarr

    files = sorted(shared_path("radar", "rmi-2021-odim").rglob("*.hdf"))[:10]
    store = tmp_path / "rmi.zarr"
    write_zarr(RadarArchive(files, importer="odim_hdf5", importer_kwargs={"qty": "RATE"},
                            filename_time_format="%Y%m%d%H%M%S", downsample=4), store)
    cfg = compose_config("train", [
        "data=radar", f"data.path={store}", *TINY_RADAR,
        "data.train_period=[2021-07-04T15:50,2021-07-04T16:10]",
        "data.val_period=[2021-07-04T16:15,2021-07-04T16:35]",
    ], tmp_path)
    metrics = train(cfg)
    assert math.isfinite(metrics["train/loss_epoch"]) and math.isfinite(metrics["val/mse"])


@pytest.mark.shared_data
@pytest.mark.slow
def test_several_real_archives_train_together_and_validate_each(tmp_path):
    shared_path("radar", "knmi-2021-pcp")
    pytest.importorskip("h5py")
    cfg = compose_config("train", [
        "data=radar_multi", *TINY_RADAR, "data.crop_size=[32,32]",
        # the archives' own periods (data=radar_multi); training frames are many, one batch runs
    ], tmp_path)
    metrics = train(cfg)
    names = [a.name for a in cfg.data.archives]
    assert names == ["bom", "knmi", "fmi", "rmi"]
    for name in ("bom", "knmi"):  # the archives with a validation period
        assert math.isfinite(metrics[f"val/{name}/mse"])
    assert "val/fmi/mse" not in metrics
    assert metrics["val/mse"] == pytest.approx((metrics["val/bom/mse"] + metrics["val/knmi/mse"]) / 2, rel=1e-5)
