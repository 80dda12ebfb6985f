"""nowcast.inference: tiles blended back equal the untiled forecast, checkpoints load
through the one safe path, baselines run on the same mm/h input."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from nowcast.inference import (
    Tiling,
    axis_weights,
    load_forecaster,
    parse_step,
    run_baselines,
    run_tiled,
    tile_starts,
)
from nowcast.models import EncoderForecaster
from tests.conftest import compose_config, shared_path

#: A radar network small enough to build and run in a second (encoder-forecaster,
#: 2 levels on 4x4 patches: spatial_divisor 8).
TINY_RADAR = [
    "experiment=radar_bom_network",
    "model.net.hidden_channels=[4,4]",
    "model.net.frame_size=[64,64]",
    "data.output_steps=3",
    "model.lead_times=[10min,20min,30min]",
]


def make_checkpoint(tmp_path: Path, overrides: list[str] = (), seed: int = 0,
                    base: list[str] = TINY_RADAR) -> Path:
    """Build the LightningModule from the real configs (tiny sizes) and save a checkpoint
    the way ``nowcast.train`` does: Lightning's ``state_dict`` plus the module's
    ``on_save_checkpoint`` (which stores the resolved run config as ``nowcast_config``)."""
    radar = shared_path("radar", "bom-66-prcp-c10")
    cfg = compose_config("train", [*base, f"data.path={radar}", *overrides], tmp_path / "train")
    torch.manual_seed(seed)
    model = instantiate(cfg.model)
    run_config = OmegaConf.to_container(cfg, resolve=True)
    run_config.pop("hydra", None)
    model.run_config = run_config
    with torch.no_grad():  # an untrained head is ~0 everywhere; give the forecast some texture
        for p in model.net.parameters():
            p.add_(0.02 * torch.randn_like(p))
    ckpt = {"state_dict": model.state_dict(), "epoch": 0, "global_step": 0}
    model.on_save_checkpoint(ckpt)
    path = tmp_path / "tiny.ckpt"
    torch.save(ckpt, path)
    return path


def _net(**kw) -> EncoderForecaster:
    torch.manual_seed(0)
    args = dict(hidden_channels=[4, 4], kernel_size=3, pool_size=(1, 2, 2), input_steps=2,
                output_steps=2, frame_size=None, patch_size=2, output_activation="identity")
    net = EncoderForecaster(**(args | kw)).eval()
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return net


@pytest.fixture
def deterministic():
    """No timing-based kernel choice (NNPACK vs oneDNN, layouts): bit-stable reruns, and
    no timing of every tile shape."""
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(before)


def _receptive_radius(net, size: int = 96) -> int:
    """Largest distance (px, Chebyshev) at which changing one input pixel changes the output."""
    x = torch.rand(1, net.input_steps, 1, size, size)
    c = size // 2
    y = x.clone()
    y[..., c, c] += 1.0
    with torch.no_grad():
        diff = (net(x) - net(y)).abs().amax(dim=(0, 1, 2))  # (H, W)
    rows, cols = torch.nonzero(diff > 0, as_tuple=True)
    return int(max((rows - c).abs().max(), (cols - c).abs().max()))


def test_taper_weights_sum_to_one_across_seams():
    starts = tile_starts(200, 64, 24)
    assert starts[0] == 0 and starts[-1] == 200 - 64
    for taper in ("linear", "cosine"):
        total = np.zeros(200)
        for s, w in zip(starts, axis_weights(starts, 64, 5, taper)):
            total[s:s + 64] += w
        np.testing.assert_allclose(total, 1.0, atol=1e-12)
    # inside the margin of an inner edge the weight is 0
    w = axis_weights(starts, 64, 5, "linear")
    assert (w[1][:5] == 0).all() and (w[0][-5:] == 0).all() and w[0][0] == 1.0


def test_tiled_equals_untiled_when_margin_covers_receptive_field(deterministic):
    """Tiles aligned to the divisor whose zero margin is at least the receptive radius
    give the untiled forecast to float rounding; a margin below it does not."""
    net = _net()
    radius = _receptive_radius(net)
    assert 0 < radius < 40  # small network, few steps: a finite, measurable radius
    d = net.spatial_divisor
    margin = -(-radius // d) * d
    x = torch.rand(1, 2, 1, 160, 128)
    with torch.no_grad():
        full = net(x)
        tiling = Tiling(max_pixels=96 * 96, overlap=2 * margin + d, margin=margin, taper="cosine")
        tiled = run_tiled(net, x, tiling, d)
        assert tiled.shape == full.shape
        torch.testing.assert_close(tiled, full, rtol=0, atol=1e-5)
        # with no margin the seams see the tiles' zero padding: the check above can fail
        crude = run_tiled(net, x, Tiling(max_pixels=96 * 96, overlap=d, margin=0, taper="linear"), d)
    assert (crude - full).abs().max() > 1e-3


def test_tiling_refuses_bad_settings():
    with pytest.raises(ValueError, match="taper"):
        Tiling(taper="gauss")
    net = _net()
    with pytest.raises(ValueError, match="not larger than the overlap"):
        run_tiled(net, torch.rand(1, 2, 1, 64, 64), Tiling(max_pixels=16 * 16, overlap=16), 4)
    with pytest.raises(ValueError, match="multiples of 4"):
        run_tiled(net, torch.rand(1, 2, 1, 62, 64), Tiling(), 4)


def test_parse_step():
    assert parse_step("10min") == np.timedelta64(600, "s")
    assert parse_step("1h") == np.timedelta64(3600, "s")
    assert parse_step("lead01") is None


def test_forecaster_from_checkpoint_matches_network_and_tiles(tmp_path, deterministic):
    ckpt = make_checkpoint(tmp_path)
    forecaster = load_forecaster(ckpt, Tiling(max_pixels=None))
    assert forecaster.input_steps == 4 and forecaster.output_steps == 3
    assert forecaster.time_step == np.timedelta64(600, "s")
    assert forecaster.grid_spacing == pytest.approx((1.0, 1.0))  # BoM at downsample 2
    assert forecaster.reader["downsample"] == 2
    assert forecaster.spatial_divisor == 8  # 4x4 patches, one 2x2 pooling
    x = torch.rand(1, 4, 1, 100, 90) * 20  # mm/h; not a multiple of the divisor
    out = forecaster(x)
    assert out.shape == (1, 3, 1, 100, 90) and (out >= 0).all()
    # the same as the network on the padded, encoded input, decoded and cropped
    tf, net = forecaster.transform, forecaster.net
    with torch.no_grad():
        padded = torch.nn.functional.pad(x, (0, 6, 0, 4))  # to 104 x 96
        ref = tf.decode(net(tf.encode(padded)))[..., :100, :90]
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    # tiles of 64 px: the ConvLSTM's receptive field (~100 px after 7 steps on 4 px
    # patches) is wider than the 8 px margin, so tiles differ from the whole, a little
    forecaster.tiling = Tiling(max_pixels=64 * 64, overlap=32)
    tiled = forecaster(x)
    assert tiled.shape == out.shape
    err = (tiled - out).abs()
    assert err.max() > 0 and err.mean() < 0.05 * out.mean()
    with pytest.raises(ValueError, match="T_in=4"):
        forecaster(torch.rand(1, 3, 1, 32, 32))


def test_run_baselines_same_input():
    pytest.importorskip("pysteps")
    x = torch.zeros(1, 4, 1, 64, 64)
    for t in range(4):  # a block of rain moving 2 px per step to the right
        x[0, t, 0, 20:30, 10 + 2 * t:20 + 2 * t] = 5.0
    out = run_baselines(x, 3, ["persistence", "optical_flow"])
    assert set(out) == {"persistence", "optical_flow"}
    assert out["persistence"].shape == (1, 3, 1, 64, 64)
    torch.testing.assert_close(out["persistence"][0, 2], x[0, 3])
    # the advected block keeps moving right: its centre of mass is ahead of persistence
    cols = torch.arange(64.0)
    com = (out["optical_flow"][0, 2, 0].sum(0) * cols).sum() / out["optical_flow"][0, 2, 0].sum()
    assert com > 17.0 + 2
    with pytest.raises(ValueError, match="unknown method"):
        run_baselines(x, 3, ["magic"])
