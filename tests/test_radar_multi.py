"""experiment=radar_multi: the real configs compose into the motion-aware network on four
archives, and one training step plus one validation batch per archive runs on real frames
from ../shared (skipped when absent)."""

from __future__ import annotations

import math

import pytest
from hydra.utils import instantiate

from nowcast.models import EncoderForecaster, MotionNowcaster
from nowcast.train import train
from tests.conftest import compose_config, shared_path


def test_experiment_composes_into_the_motion_network(tmp_path):
    cfg = compose_config("train", ["experiment=radar_multi"], tmp_path)
    assert cfg.data.time_step == "10min"
    assert (cfg.data.input_steps, cfg.data.output_steps) == (4, 6)
    assert [a.name for a in cfg.data.archives] == ["bom", "knmi", "fmi", "rmi"]
    assert cfg.trainer.max_time == "00:00:45:00"
    # the checkpoint is chosen on CSI, which every archive's rain weighs alike
    assert (cfg.callbacks.model_checkpoint.monitor, cfg.callbacks.model_checkpoint.mode) == ("val/csi_1mmh", "max")
    # held out (issue 13): BoM 08:00-11:50, KNMI 2021-02-02 and -04, FMI 2017-05-09
    tests = {a.name: a.get("test_period") for a in cfg.data.archives}
    assert list(tests["bom"]) == ["2020-10-31T08:00", "2020-10-31T11:50"]
    assert [p[0][:10] for p in tests["knmi"]] == ["2021-02-02", "2021-02-04"]
    assert tests["fmi"][0].startswith("2017-05-09") and tests["rmi"] is None
    model = instantiate(cfg.model)
    assert isinstance(model.net, MotionNowcaster) and isinstance(model.net.net, EncoderForecaster)
    assert model.net.net.out_channels == 3 and model.net.output_steps == 6
    # the flow starts from the inputs' whole-frame velocity; 16 px a step over 3 steps fit the search
    assert model.net.motion_prior and model.net.prior_radius >= model.net.max_speed * model.net.prior_span
    # refined per pixel and followed along its trajectories, on crops and whole domains
    assert model.net.prior_refine is not None and model.net.prior_trajectory
    # every input's velocity estimate counts the same in the refinement
    assert model.net.prior_refine_weighting == "velocity"
    assert model.scheduler_factory is None  # max_time decides, not an epoch count


@pytest.mark.shared_data
@pytest.mark.slow
def test_one_training_step_on_four_real_archives(tmp_path):
    shared_path("radar", "knmi-2021-pcp")
    pytest.importorskip("pysteps")
    pytest.importorskip("h5py")
    cfg = compose_config("train", [
        "experiment=radar_multi", "model.net.net.hidden_channels=[4,4,4]",
        "data.batch_size=2", "data.crop_size=[32,32]", "data.min_wet_fraction=0",
        "trainer.max_epochs=1", "trainer.check_val_every_n_epoch=1",
        "+trainer.limit_train_batches=1", "+trainer.limit_val_batches=1",
        "trainer.enable_model_summary=false",
        "callbacks.progress_bar.refresh_rate=0",
    ], tmp_path)
    metrics = train(cfg)
    assert math.isfinite(metrics["train/loss_epoch"])
    for name in ("bom", "knmi"):  # the archives with a validation period, full domains
        assert math.isfinite(metrics[f"val/{name}/mae"])
    assert (tmp_path / "run" / "checkpoints" / "best.ckpt").exists()


@pytest.mark.shared_data
def test_validation_periods_have_rain(tmp_path):
    """The validation set chooses the checkpoint: a dry period scores every checkpoint the
    same (2021-02-08 did: MAE 0.00 mm/h). Every validation frame of radar_multi has rain
    on at least 1% of its valid pixels (>= 0.1 mm/h), as the training windows must
    (the dry filter's measure)."""
    shared_path("radar", "knmi-2021-pcp")
    pytest.importorskip("pysteps")
    pytest.importorskip("h5py")
    import numpy as np

    cfg = compose_config("train", ["experiment=radar_multi"], tmp_path)
    checked = []
    for spec in cfg.data.archives:
        source = instantiate(spec)
        (period,) = source.periods["val"] or [None]
        if period is None:
            continue
        archive = source.open()
        times = archive.times
        index = np.flatnonzero((times >= period[0]) & (times <= period[1]))
        assert len(index) >= 10, f"{source.name}: {len(index)} frames in its validation period"
        frames = archive.read(index[:: max(1, len(index) // 12)], cache=False)  # (T, H, W) mm/h
        wet = (frames >= 0.1).sum(axis=(1, 2)) / np.isfinite(frames).sum(axis=(1, 2))  # NaN >= x is False
        assert wet.min() >= cfg.data.min_wet_fraction, f"{source.name}: wet fractions {wet.round(3)}"
        checked.append(source.name)
        archive.close()
    assert checked == ["bom", "knmi"]
