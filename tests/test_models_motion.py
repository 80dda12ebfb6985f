"""MotionNowcaster and warp: shapes, persistence at start, a blob moved by the flow,
gradients reaching the flow, the block-matching start, construction and input errors."""

import pytest
import torch

from nowcast.models import EncoderForecaster, MotionNowcaster
from nowcast.models.encoder_forecaster import global_velocity, refine_velocity, regional_velocity
from nowcast.models.warp import trajectory, warp


def _net(**kwargs) -> MotionNowcaster:
    backbone = EncoderForecaster(1, 3, [4, 4], 3, (1, 2, 2), 3, 2, (16, 16), patch_size=2,
                                 output_activation="identity")
    return MotionNowcaster(backbone, **kwargs)


def test_warp_moves_a_blob_by_the_displacement():
    frame = torch.zeros(1, 1, 20, 24)
    frame[0, 0, 5, 7] = 1.0
    d = torch.zeros(1, 1, 2, 20, 24)  # (B, T, 2, H, W)
    d[:, :, 0], d[:, :, 1] = 3.0, 4.0  # 3 px right (columns), 4 px down (rows)
    out = warp(frame, d, padding_mode="border")[:, 0]
    assert out.nonzero().tolist() == [[0, 0, 9, 10]]
    assert out[0, 0, 9, 10] == pytest.approx(1.0)
    # half a pixel: bilinear splits the blob between two columns, mass kept
    d[:, :, 0], d[:, :, 1] = 0.5, 0.0
    out = warp(frame, d, padding_mode="border")[:, 0]
    assert out[0, 0, 5, 7] == pytest.approx(0.5) and out[0, 0, 5, 8] == pytest.approx(0.5)


def test_untrained_network_is_persistence_and_shapes():
    torch.manual_seed(0)
    net = _net()
    x = torch.rand(2, 3, 1, 16, 16)
    y = net(x)
    assert y.shape == (2, 2, 1, 16, 16)
    torch.testing.assert_close(y, x[:, -1:].expand_as(y), atol=1e-5, rtol=0)


def test_forecast_moves_the_last_frame_by_the_predicted_flow():
    """Force the backbone's head to a uniform velocity: the blob moves by k * v at lead k."""
    net = _net(flow_smoothing=1, max_speed=4.0)
    head = net.net.head  # 1x1 conv to 3 * patch**2 channels (u, v, r per sub-pixel)
    with torch.no_grad():
        bias = torch.zeros(3, 4)  # (channel, sub-pixel), pixel_shuffle order
        bias[0] = torch.atanh(torch.tensor(0.5))  # u = 4 * 0.5 = 2 px per step (right)
        bias[1] = torch.atanh(torch.tensor(-0.25))  # v = -1 px per step (up)
        head.bias.copy_(bias.flatten())
    x = torch.zeros(1, 3, 1, 16, 16)
    x[0, -1, 0, 8, 4] = 1.0
    y = net(x)
    for k in (1, 2):
        assert y[0, k - 1, 0].argmax().item() == (8 - k) * 16 + 4 + 2 * k
        assert y[0, k - 1, 0].max().item() == pytest.approx(1.0, abs=1e-4)


def test_gradients_reach_the_flow_and_the_backbone():
    torch.manual_seed(0)
    net = _net()
    rows, cols = torch.meshgrid(torch.arange(16.0), torch.arange(16.0), indexing="ij")
    blob = torch.exp(-((rows - 8) ** 2 + (cols - 7) ** 2) / 8.0)  # (16, 16) smooth rain cell
    x = blob.expand(2, 3, 1, 16, 16).clone()
    target = torch.roll(blob, shifts=1, dims=-1).expand(2, 2, 1, 16, 16)  # moved 1 px right
    loss = (net(x) - target).pow(2).mean()
    loss.backward()
    # The head starts at zero; the loss still reaches the u (rightward velocity) channel
    # through the warp, and it says "more u": the gradient is negative.
    grad = net.net.head.bias.grad.view(3, 4).sum(dim=1)  # (u, v, change)
    assert grad[0] < -1e-4 and abs(grad[1]) < abs(grad[0]) / 10
    opt = torch.optim.SGD(net.parameters(), lr=1.0)
    opt.step()
    opt.zero_grad()
    (net(x) - target).pow(2).mean().backward()
    # after one step the head is nonzero and gradients flow on into the ConvLSTM layers
    lstm_grads = [p.grad for n, p in net.net.named_parameters() if "encoders" in n]
    assert any(g is not None and g.abs().sum() > 0 for g in lstm_grads)


def test_a_small_random_head_passes_gradient_to_the_convlstm_at_the_first_step():
    """init_std=0 is exactly persistence but its first backward reaches no ConvLSTM
    weight; init_std>0 reaches them at once and stays within a hair of persistence."""
    x = torch.rand(2, 3, 1, 16, 16)
    target = torch.roll(x[:, -1:], shifts=1, dims=-1).expand(2, 2, 1, 16, 16)
    for std, reaches in ((0.0, False), (1e-3, True)):
        torch.manual_seed(0)
        net = _net(init_std=std)
        out = net(x)
        assert (out - x[:, -1:]).abs().max() < (0.05 if std else 1e-6)  # ~persistence
        (out - target).pow(2).mean().backward()
        grads = [p.grad for n, p in net.net.named_parameters() if "encoders" in n]
        assert any(g is not None and g.abs().sum() > 0 for g in grads) == reaches


def _blobs(velocity: tuple[float, float], steps: int, size: int = 48, count: int = 6, seed: int = 3,
           wrap: bool = False) -> torch.Tensor:
    """``count`` Gaussian blobs drifting at ``velocity`` (dx, dy) px per step:
    ``(1, steps, 1, size, size)``. ``wrap``: anywhere in the frame, wrapping around at its
    edges (a dense field with no edge effects); otherwise starting 10 px inside it."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.rand(count, 2, generator=g)  # (x, y)
    centres = centres * size if wrap else centres * (size - 20) + 10
    ys, xs = torch.meshgrid(torch.arange(float(size)), torch.arange(float(size)), indexing="ij")
    frames = []
    for t in range(steps):
        c = centres + torch.tensor(velocity) * t
        dx, dy = xs[None] - c[:, 0, None, None], ys[None] - c[:, 1, None, None]
        if wrap:
            dx, dy = (dx + size / 2) % size - size / 2, (dy + size / 2) % size - size / 2
        frames.append(torch.exp(-(dx**2 + dy**2) / (2 * 3.0**2)).sum(0))
    return torch.stack(frames)[None, :, None]


@pytest.mark.parametrize("velocity", [(2.5, -1.25), (-3.0, 0.0), (0.4, 1.7)])
def test_global_velocity_finds_a_sub_pixel_drift(velocity):
    x = _blobs(velocity, 4)
    for span in (1, 3):
        v = global_velocity(x, radius=12, span=span)
        assert v.shape == (1, 2)
        torch.testing.assert_close(v[0], torch.tensor(velocity), atol=0.15, rtol=0)
    with pytest.raises(ValueError, match="span must be in 1..3"):
        global_velocity(x, radius=12, span=4)


def test_motion_prior_starts_as_the_drift_of_the_inputs():
    """Untrained, with a zero head: the last frame moved at the inputs' velocity, which
    forecasts drifting blobs far better than persistence; the backbone still gets a gradient."""
    torch.manual_seed(0)
    seq = _blobs((2.0, 1.0), 5)  # 3 inputs, 2 leads
    x, y = seq[:, :3], seq[:, 3:]
    prior = _net(motion_prior=True, prior_radius=8, init_std=0.0)
    persistence_mse = ((x[:, -1:] - y) ** 2).mean()
    prior_mse = ((prior(x) - y) ** 2).mean()
    assert prior_mse < 0.02 * persistence_mse
    torch.testing.assert_close(_net(init_std=0.0)(x), x[:, -1:].expand_as(y))  # no prior: persistence
    net = _net(motion_prior=True, prior_radius=8, init_std=0.01)
    ((net(x) - y) ** 2).mean().backward()
    assert net.net.head.weight.grad.abs().sum() > 0


def _two_regions(steps: int = 4) -> torch.Tensor:
    """Blobs that drift right (3 px per step) in the left half of a 96 x 160 frame and up
    (2 px per step) in the right half: ``(1, steps, 1, 96, 160)``."""
    left = _blobs((3.0, 0.0), steps, 160, count=80, seed=5, wrap=True)
    right = _blobs((0.0, -2.0), steps, 160, count=80, seed=5, wrap=True)
    return torch.cat((left[..., 32:128, :80], right[..., 32:128, 80:]), dim=-1)


def test_regional_velocity_follows_each_region_and_falls_back_to_the_whole_frame():
    x = _two_regions()
    v = regional_velocity(x, radius=12, span=3, tile=40, stride=20)  # (1, 2, 96, 160)
    assert v.shape == (1, 2, 96, 160)
    # within 0.4 px per step: what enters a tile during the span pulls its match towards 0
    torch.testing.assert_close(v[0, :, 48, 20], torch.tensor([3.0, 0.0]), atol=0.4, rtol=0)
    torch.testing.assert_close(v[0, :, 48, 140], torch.tensor([0.0, -2.0]), atol=0.4, rtol=0)
    # the whole frame's single velocity is right in neither half
    whole = global_velocity(x, radius=12, span=3)[0]
    assert (whole - torch.tensor([3.0, 0.0])).abs().max() > 1.0 or (whole - torch.tensor([0.0, -2.0])).abs().max() > 1.0
    # a frame no larger than a tile: the whole frame's velocity everywhere
    crop = x[..., :40, :40]
    torch.testing.assert_close(regional_velocity(crop, 12, 3, tile=40),
                               global_velocity(crop, 12, 3)[:, :, None, None].expand(1, 2, 40, 40))
    # a dry region takes the whole frame's velocity, not a match of nothing
    dry = x.clone()
    dry[..., 80:] = 0.0
    v = regional_velocity(dry, radius=12, span=3, tile=40, stride=20)
    torch.testing.assert_close(v[0, :, 48, 150], global_velocity(dry, 12, 3)[0], atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="tile must be at least"):
        regional_velocity(x, radius=12, span=3, tile=20)
    with pytest.raises(ValueError, match=r"stride must be in 1..tile \(40\), got 41"):
        regional_velocity(x, radius=12, span=3, tile=40, stride=41)


def test_regional_prior_forecasts_two_motions_that_one_velocity_cannot():
    seq = _two_regions(steps=5)
    x, y = seq[:, :3], seq[:, 3:]
    backbone = EncoderForecaster(1, 3, [4, 4], 3, (1, 2, 2), 3, 2, (96, 160), patch_size=2,
                                 output_activation="identity")
    regional = MotionNowcaster(backbone, motion_prior=True, prior_radius=12, prior_tile=40, prior_stride=20)
    whole = MotionNowcaster(backbone, motion_prior=True, prior_radius=12)
    inner = (..., slice(16, -16), slice(16, -16))  # away from what enters at the edges
    regional_mse = ((regional(x) - y)[inner] ** 2).mean()
    whole_mse = ((whole(x) - y)[inner] ** 2).mean()
    assert regional_mse < 0.2 * whole_mse
    with pytest.raises(ValueError, match="prior_tile must be at least"):
        _net(motion_prior=True, prior_radius=8, prior_tile=10)


def test_refined_velocity_follows_two_motions_within_one_block_match():
    """Lucas-Kanade refinement of the whole frame's single velocity finds each half's own
    motion, and keeps the start where there is nothing to match."""
    x = _two_regions()
    start = global_velocity(x, radius=12, span=3)[:, :, None, None]  # (1, 2, 1, 1)
    v = refine_velocity(x, start, window=8.0)
    assert v.shape == (1, 2, 96, 160)
    start_error = 0.0
    for col, truth in ((40, (3.0, 0.0)), (120, (0.0, -2.0))):  # each half's centre
        region = v[0, :, 24:72, col - 12:col + 12].mean((-2, -1))
        # within 0.3 px per step: rain entering at the edges during the inputs biases it
        torch.testing.assert_close(region, torch.tensor(truth), atol=0.3, rtol=0)
        start_error = max(start_error, (start[0, :, 0, 0] - torch.tensor(truth)).abs().max().item())
    assert start_error > 1.0  # one velocity was wrong in one half at least
    with torch.autocast("cpu", dtype=torch.bfloat16):  # a bf16-mixed run computes it in float32
        torch.testing.assert_close(refine_velocity(x, start, window=8.0), v)
    dry = x.clone()
    dry[..., 80:] = 0.0
    v = refine_velocity(dry, start, window=8.0)
    torch.testing.assert_close(v[0, :, :, 130:], start[0].expand(2, 96, 30), atol=1e-4, rtol=0)
    with pytest.raises(ValueError, match="window, iterations and regularisation must be > 0"):
        refine_velocity(x, start, window=0.0)
    with pytest.raises(ValueError, match=r"velocity must be \(B, 2, H\|1, W\|1\) with B=1"):
        refine_velocity(x, start[0], window=6.0)


def test_velocity_weighting_counts_every_input_the_same_and_follows_a_speed_up():
    """Blobs that moved 1 px per step and then 2 px in the last step: each input's own
    velocity over its span is 2, 1.5 and 4/3. Weighting by velocity gives about their mean
    (1.61); weighting by intensity error leans towards the oldest input's (about 1.43)."""
    positions = (0.0, 1.0, 2.0, 4.0)  # x of the blobs at each input
    base = _blobs((1.0, 0.0), 1, size=64, count=8, wrap=True)[:, 0]  # (1, 1, 64, 64)
    shifts = [torch.tensor([p, 0.0]).view(1, 1, 2, 1, 1).expand(1, 1, 2, 64, 64) for p in positions]
    x = torch.stack([warp(base, d, "border")[:, 0] for d in shifts], dim=1)  # (1, 4, 1, 64, 64)
    start = torch.tensor([1.5, 0.0]).view(1, 2, 1, 1)
    inner = (0, 0, slice(16, -16), slice(16, -16))
    by_velocity = refine_velocity(x, start, window=12.0, iterations=4, weighting="velocity")[inner].mean()
    by_intensity = refine_velocity(x, start, window=12.0, iterations=4, weighting="intensity")[inner].mean()
    assert abs(by_velocity - (2 + 1.5 + 4 / 3) / 3) < 0.08
    assert abs(by_intensity - (2 + 1.5 * 4 + 4 / 3 * 9) / 14) < 0.08
    with pytest.raises(ValueError, match="weighting must be 'intensity' or 'velocity'"):
        refine_velocity(x, start, window=12.0, weighting="recent")
    with pytest.raises(ValueError, match="prior_refine_weighting must be"):
        _net(motion_prior=True, prior_refine=8.0, prior_refine_weighting="recent")


def test_trajectories_follow_a_rotating_flow_and_equal_straight_lines_in_a_uniform_one():
    uniform = torch.tensor([1.5, -0.5]).view(1, 2, 1, 1).expand(1, 2, 16, 16)
    d = trajectory(uniform, 4)
    assert d.shape == (1, 4, 2, 16, 16)
    k = torch.arange(1.0, 5.0).view(1, 4, 1, 1, 1)
    torch.testing.assert_close(d, uniform[:, None] * k)
    # solid rotation about the centre, 0.1 rad per step: the origin of what arrives at p
    # lies on p's circle; a straight line k v(p) leaves it
    ys, xs = torch.meshgrid(torch.arange(64.0), torch.arange(64.0), indexing="ij")
    ry, rx = ys - 31.5, xs - 31.5
    omega = 0.1
    rotation = torch.stack((-omega * ry, omega * rx))[None]  # (1, 2, 64, 64): dx, dy
    radius = (rx**2 + ry**2).sqrt()
    inner = (radius >= 8) & (radius <= 20)
    radius = radius[inner]

    def radius_error(displacement):
        ox, oy = rx - displacement[0, -1, 0], ry - displacement[0, -1, 1]
        return ((ox**2 + oy**2).sqrt()[inner] - radius).abs().mean()

    steps = torch.arange(1.0, 7.0).view(1, 6, 1, 1, 1)
    assert radius_error(trajectory(rotation, 6)) < 0.25 * radius_error(rotation[:, None] * steps)
    with pytest.raises(ValueError, match="steps must be >= 1"):
        trajectory(rotation, 0)


def test_refined_prior_forecasts_two_motions_in_one_crop():
    """On a frame no larger than one tile, block matching gives one velocity; the refined
    prior forecasts both halves' motions, at under 0.2x that MSE."""
    seq = _two_regions(steps=5)
    x, y = seq[:, :3], seq[:, 3:]
    backbone = EncoderForecaster(1, 3, [4, 4], 3, (1, 2, 2), 3, 2, (96, 160), patch_size=2,
                                 output_activation="identity")
    refined = MotionNowcaster(backbone, motion_prior=True, prior_radius=12, prior_refine=6.0,
                              prior_trajectory=True)
    whole = MotionNowcaster(backbone, motion_prior=True, prior_radius=12)
    inner = (..., slice(16, -16), slice(16, -16))
    assert ((refined(x) - y)[inner] ** 2).mean() < 0.2 * ((whole(x) - y)[inner] ** 2).mean()
    with pytest.raises(ValueError, match="prior_refine and prior_trajectory need motion_prior"):
        _net(prior_trajectory=True)
    with pytest.raises(ValueError, match="prior_refine must be a window > 0 px"):
        _net(motion_prior=True, prior_refine=0.0)


def test_lagrangian_inputs_hold_moving_rain_still_for_the_backbone():
    """With lagrangian_inputs the backbone reads the inputs moved along the prior's motion:
    drifting blobs stand still there. A zero head forecasts as without it."""
    seq = _blobs((2.0, 1.0), 5)
    x = seq[:, :3]
    net = _net(motion_prior=True, prior_radius=8, init_std=0.0, lagrangian_inputs=True)
    seen = []
    net.net.register_forward_hook(lambda module, args, out: seen.append(args[0]))
    y = net(x)
    inner = (..., slice(6, -6), slice(6, -6))  # what enters at the edges is repeated border
    drift = (x[:, :1] - x[:, -1:])[inner].abs().max()
    held = (seen[0][:, :1] - seen[0][:, -1:])[inner].abs().max()
    assert held < 0.1 * drift
    torch.testing.assert_close(seen[0][:, -1], x[:, -1])  # the last input as it is
    torch.testing.assert_close(y, _net(motion_prior=True, prior_radius=8, init_std=0.0)(x))
    with pytest.raises(ValueError, match="lagrangian_inputs needs motion_prior"):
        _net(lagrangian_inputs=True)


def test_bad_input_and_bad_backbone():
    net = _net()
    with pytest.raises(ValueError, match=r"expected \(B, T, C, H, W\)"):
        net(torch.rand(2, 3, 16, 16))
    with pytest.raises(ValueError, match="3 \\(u, v"):
        MotionNowcaster(EncoderForecaster(1, 1, [4], 3, (1, 2, 2), 3, 2, (16, 16)))
    with pytest.raises(ValueError, match="odd width"):
        _net(flow_smoothing=4)
    with pytest.raises(ValueError, match=r"prior_span must be in 1..2"):
        _net(motion_prior=True, prior_span=3)
    with pytest.raises(ValueError, match="prior_radius must be >= 1"):
        _net(motion_prior=True, prior_radius=0)
    with pytest.raises(ValueError, match=r"displacement \(B, T, 2, H, W\)"):
        warp(torch.rand(1, 1, 8, 8), torch.rand(1, 1, 3, 8, 8))
