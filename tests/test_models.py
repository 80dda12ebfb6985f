"""Encoder-forecaster networks: shapes, pooling, state hand-over, construction errors."""

import pytest
import torch

from nowcast.models import EncoderForecaster, Shi2015, make_output_activation


@pytest.mark.parametrize(
    "pool, t_in, t_out, patch",
    [((1, 2, 2), 4, 4, 1), ((1, 2, 2), 5, 3, 2), ((2, 2, 2), 4, 2, 1), ((2, 2, 2), 4, 6, 2)],
)
def test_encoder_forecaster_shapes(pool, t_in, t_out, patch):
    net = EncoderForecaster(1, 2, [4, 6], 3, pool, t_in, t_out, (16, 16), patch_size=patch)
    x = torch.rand(2, t_in, 1, 16, 16)
    y = net(x)
    assert y.shape == (2, t_out, 2, 16, 16)
    assert (y >= 0).all() and (y <= 1).all()  # sigmoid output


def test_three_levels_and_other_frame_sizes():
    net = EncoderForecaster(1, 1, [4, 4, 4], 3, (1, 2, 2), 3, 2, (16, 16))
    assert net.spatial_divisor == 4
    # A size divisible by the network's divisor works too (full radar domain for eval).
    assert net(torch.rand(1, 3, 1, 24, 20)).shape == (1, 2, 1, 24, 20)
    with pytest.raises(ValueError, match="divisible by 4"):
        net(torch.rand(1, 3, 1, 18, 20))


def test_forecaster_starts_from_encoder_state():
    """Two inputs that differ only in their first frame give different forecasts: the
    forecaster has no input of its own, so the information must travel in the state."""
    torch.manual_seed(0)
    net = EncoderForecaster(1, 1, [4, 4], 3, (1, 2, 2), 3, 2, (8, 8), output_activation="identity")
    x = torch.rand(1, 3, 1, 8, 8)
    x2 = x.clone()
    x2[:, 0] = 0
    assert not torch.allclose(net(x), net(x2))


def test_every_parameter_gets_a_gradient():
    net = EncoderForecaster(1, 1, [4, 6], 3, (2, 2, 2), 4, 4, (8, 8), patch_size=2)
    net(torch.rand(2, 4, 1, 8, 8)).sum().backward()
    # The coarsest forecaster level has no input (Shi et al.): it is fed zeros, so its
    # input kernel gets no gradient by design; its bias and everything else must.
    no_input = f"forecasters.{net.levels - 1}.cells.0.weight_x"
    for name, p in net.named_parameters():
        if name == no_input:
            assert p.grad is not None and p.grad.abs().sum() == 0
        else:
            assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_construction_errors():
    with pytest.raises(ValueError, match="input_steps=5 is not divisible"):
        EncoderForecaster(1, 1, [4, 4], 3, (2, 2, 2), 5, 4, (8, 8))
    with pytest.raises(ValueError, match="output_steps=3 is not divisible"):
        EncoderForecaster(1, 1, [4, 4], 3, (2, 2, 2), 4, 3, (8, 8))
    with pytest.raises(ValueError, match=r"frame_size \(12, 12\) is not divisible .* 8"):
        EncoderForecaster(1, 1, [4, 4], 3, (1, 2, 2), 4, 4, (12, 12), patch_size=4)
    with pytest.raises(ValueError, match="kernel_size has 3 entries for 2 levels"):
        EncoderForecaster(1, 1, [4, 4], [3, 3, 3])
    with pytest.raises(ValueError, match="unknown output_activation 'tanhh'"):
        EncoderForecaster(1, 1, [4], output_activation="tanhh")
    with pytest.raises(ValueError, match=r"frame_size \(10, 10\) is not divisible by patch_size 4"):
        Shi2015(frame_size=(10, 10))


def test_input_shape_error_names_expected_and_got():
    net = EncoderForecaster(1, 1, [4], 3, (1, 2, 2), 3, 2, (8, 8))
    with pytest.raises(ValueError, match=r"expected \(B, T, C, H, W\) with T=3, C=1, got \(2, 3, 8, 8\)"):
        net(torch.rand(2, 3, 8, 8))
    with pytest.raises(ValueError, match=r"T=3, C=1, got \(2, 4, 1, 8, 8\)"):
        net(torch.rand(2, 4, 1, 8, 8))


def test_shi2015_paper_configuration():
    net = Shi2015(1, 1, [128, 64, 64], 5, 10, 10, (64, 64), patch_size=4)
    # encoder 3 layers on 16-channel patches, forecaster 3 layers, 1x1 head over all states
    assert [c.hidden_channels for c in net.encoder.cells] == [128, 64, 64]
    assert net.encoder.cells[0].in_channels == 16
    assert net.head.in_channels == 256 and net.head.kernel_size == (1, 1)
    small = Shi2015(1, 1, [4, 4], 3, 3, 2, (8, 8), patch_size=2)
    assert small(torch.rand(2, 3, 1, 8, 8)).shape == (2, 2, 1, 8, 8)


@pytest.mark.parametrize("name", ["identity", "sigmoid", "softplus", "relu"])
def test_output_activations(name):
    y = make_output_activation(name)(torch.linspace(-3, 3, 7))
    if name != "identity":
        assert (y >= 0).all()


def test_residual_forecast_starts_from_persistence():
    torch.manual_seed(0)
    net = EncoderForecaster(1, 1, [4, 4], 3, (1, 2, 2), 3, 2, (8, 8), output_activation="relu",
                            residual=True)
    torch.nn.init.zeros_(net.head.weight)
    torch.nn.init.zeros_(net.head.bias)
    x = torch.rand(2, 3, 1, 8, 8)
    # a zero head means "no change": every lead equals the last input frame
    torch.testing.assert_close(net(x), x[:, -1:].expand(2, 2, 1, 8, 8))
    with pytest.raises(ValueError, match=r"in_channels \(1\) must equal out_channels \(2\)"):
        EncoderForecaster(1, 2, [4], residual=True)


# -- the autoregressive ConvLSTM stack --------------------------------------------------
def test_convlstm_net_shapes_and_errors():
    from nowcast.models import ConvLSTMNet

    net = ConvLSTMNet(1, 1, [4, 6], 3, input_steps=3, output_steps=5, frame_size=8, patch_size=2)
    assert net(torch.rand(2, 3, 1, 8, 8)).shape == (2, 5, 1, 8, 8)
    with pytest.raises(ValueError, match=r"in_channels \(1\) must equal out_channels \(2\)"):
        ConvLSTMNet(1, 2, [4])
    with pytest.raises(ValueError, match="not divisible by patch_size 4"):
        ConvLSTMNet(1, 1, [4], frame_size=10, patch_size=4)
    with pytest.raises(ValueError, match="teacher_forcing > 0 needs the targets"):
        net(torch.rand(2, 3, 1, 8, 8), teacher_forcing=0.5)


def test_convlstm_net_feeds_back_its_forecasts():
    from nowcast.models import ConvLSTMNet

    torch.manual_seed(0)
    net = ConvLSTMNet(1, 1, [3, 3], 3, input_steps=3, output_steps=4, frame_size=8, patch_size=2).double()
    x = torch.rand(2, 3, 1, 8, 8, dtype=torch.float64)
    y = torch.rand(2, 4, 1, 8, 8, dtype=torch.float64)
    free = net(x)
    # Full teacher forcing reads the true sequence in one fused pass; a probability just
    # below 1 takes the step-wise path and (almost surely) feeds the truth every step too.
    forced = net(x, targets=y, teacher_forcing=1.0)
    torch.testing.assert_close(forced, net(x, targets=y, teacher_forcing=1 - 1e-12))
    # the first lead depends on the inputs only; later ones on what was fed back
    torch.testing.assert_close(forced[:, 0], free[:, 0])
    assert not torch.allclose(forced[:, 1:], free[:, 1:])
    # free-running: lead 2 must change when lead 1's forecast would (through the feedback)
    x2 = x.clone()
    x2[:, -1] += 0.5
    assert not torch.allclose(net(x2)[:, 1], free[:, 1])


# -- optical flow + learned correction ------------------------------------------------------
def _hybrid_and_moving_blob(values, **kwargs):
    """An untrained ExtrapolationResidual (3 -> 2 frames, log rain rate) and an 8x8 rain
    blob ``values`` (mm/h) moving one pixel per step to the right in a 32x32 field."""
    pytest.importorskip("pysteps")
    pytest.importorskip("cv2")
    from nowcast.data.transforms import LogRainRate
    from nowcast.models import ExtrapolationResidual

    torch.manual_seed(0)
    transform = LogRainRate()
    inner = EncoderForecaster(1, 1, [4], 3, input_steps=3, output_steps=2, frame_size=None,
                              output_activation="identity")
    net = ExtrapolationResidual(inner, transform=transform, **kwargs)
    rain = torch.zeros(1, 3, 1, 32, 32)
    for t in range(3):
        rain[0, t, 0, 10:18, 8 + t:16 + t] = values
    return net, inner, transform, rain


def test_extrapolation_residual_starts_as_optical_flow():
    from nowcast.baselines import OpticalFlowExtrapolation
    from nowcast.models import ExtrapolationResidual

    net, inner, transform, rain = _hybrid_and_moving_blob(20.0, output_activation="relu", max_value=50.0)
    out = net(transform.encode(rain))
    expected = OpticalFlowExtrapolation()(rain, 2)
    # zero-initialised head: the untrained model is exactly the extrapolation
    torch.testing.assert_close(transform.decode(out), expected, atol=1e-3, rtol=1e-4)
    assert out.requires_grad  # and the correction network trains
    # the physical upper bound holds whatever the correction does
    torch.nn.init.constant_(inner.head.bias, 10.0)
    assert transform.decode(net(transform.encode(rain))).max() <= 50.0 + 1e-3
    with pytest.raises(ValueError, match=r"in_channels \(1\) must equal net.out_channels \(2\)"):
        ExtrapolationResidual(EncoderForecaster(1, 2, [4], frame_size=None))



def test_extrapolation_residual_can_correct_sprog():
    from nowcast.baselines import SProg
    from nowcast.models import ExtrapolationResidual

    net, _, transform, rain = _hybrid_and_moving_blob(20.0, baseline="sprog")
    assert isinstance(net.extrapolation, SProg)
    torch.testing.assert_close(transform.decode(net(transform.encode(rain))), SProg()(rain, 2),
                               atol=1e-3, rtol=1e-4)
    with pytest.raises(ValueError, match="baseline must be 'optical_flow' or 'sprog', got 'steps'"):
        ExtrapolationResidual(EncoderForecaster(1, 1, [4], frame_size=None), baseline="steps")

def test_probability_matching_restores_the_observed_distribution():
    blob = torch.linspace(1.0, 30.0, 64).view(8, 8)
    net, _, transform, rain = _hybrid_and_moving_blob(blob, probability_matching=True)
    x = transform.encode(rain)
    faded = x[:, -1:].expand(1, 2, 1, 32, 32) * 0.5  # a forecast that lost half its log-intensity
    matched = transform.decode(net.match_distribution(faded, x))
    # same sorted values as the last observation, same dry pixels as the forecast
    observed = torch.sort(rain[0, -1].flatten()).values
    for t in range(2):
        torch.testing.assert_close(torch.sort(matched[0, t].flatten()).values, observed, atol=1e-3, rtol=1e-4)
        assert torch.equal(matched[0, t] > 0, faded[0, t] > 0)
    # applied in eval mode only: training sees the raw forecast and its gradient
    net.train()
    assert net(x).requires_grad
    net.eval()
    with torch.no_grad():
        assert transform.decode(net(x)).max() == pytest.approx(30.0, rel=1e-3)


# -- motion output: the last frame moved ----------------------------------------------
def test_warp_moves_a_frame_by_whole_and_fractional_pixels():
    from nowcast.models.warp import warp

    frame = torch.zeros(1, 1, 8, 8)
    frame[0, 0, 2, 3] = 1.0
    shift = torch.zeros(1, 2, 2, 8, 8)
    shift[:, 0, 0] = 2.0  # lead 1: 2 px right
    shift[:, 1, 1] = -1.5  # lead 2: 1.5 px up
    out = warp(frame, shift)
    assert out.shape == (1, 2, 1, 8, 8)
    assert out[0, 0, 0, 2, 5] == 1.0 and out[0, 0].sum() == 1.0
    # half a pixel between rows 0 and 1 (bilinear), nothing else
    torch.testing.assert_close(out[0, 1, 0, :2, 3], torch.tensor([0.5, 0.5]))
    assert out[0, 1].sum() == pytest.approx(1.0)
    out = warp(frame, torch.full((1, 1, 2, 8, 8), 20.0))  # moved out of the frame: zeros come in
    assert out.abs().sum() == 0
    with pytest.raises(ValueError, match=r"expected frame \(B, C, H, W\) and displacement \(B, T, 2, H, W\)"):
        warp(frame, torch.zeros(1, 2, 8, 8))


def test_motion_output_starts_as_persistence_and_learns_a_shift():
    """The untrained motion head is persistence; a few Adam steps on one sequence of a
    square moving 2 px right per frame teach it the shift (sharp, unlike a drawn frame)."""
    torch.manual_seed(0)
    net = EncoderForecaster(1, 1, [8, 8], 3, (1, 2, 2), 3, 2, (16, 16), patch_size=2,
                            output="motion", output_activation="identity")
    frames = torch.zeros(1, 5, 1, 16, 16)
    for t in range(5):
        frames[0, t, 0, 5:9, 1 + 2 * t : 5 + 2 * t] = 1.0
    x, y = frames[:, :3], frames[:, 3:]
    torch.testing.assert_close(net(x), x[:, -1:].expand(1, 2, 1, 16, 16))
    persistence = ((x[:, -1:] - y) ** 2).mean()
    opt = torch.optim.Adam(net.parameters(), lr=0.02)
    for _ in range(60):
        opt.zero_grad()
        loss = ((net(x) - y) ** 2).mean()
        loss.backward()
        opt.step()
    assert loss < 0.1 * persistence


def test_translation_output_moves_the_whole_frame_rigidly():
    """One velocity per lead (the head's bias here: 0.5 patch = 1 px right per frame) moves
    every pixel of the last frame alike; lead k is the frame shifted by k pixels."""
    net = EncoderForecaster(1, 1, [4, 4], 3, (1, 2, 2), 3, 2, (16, 16), patch_size=2,
                            output="translation", output_activation="identity")
    with torch.no_grad():
        net.head.bias.copy_(torch.tensor([0.5, 0.0]))  # (dx, dy) in patch widths per frame
    x = torch.rand(2, 3, 1, 16, 16)
    y = net(x)
    last = x[:, -1, 0]
    torch.testing.assert_close(y[:, 0, 0, :, 1:], last[:, :, :-1])  # 1 px right
    torch.testing.assert_close(y[:, 1, 0, :, 2:], last[:, :, :-2])  # 2 px right
    assert y[:, :, 0, :, 0].abs().max() < 1e-6  # zeros came in from the left


def test_motion_output_arguments():
    with pytest.raises(ValueError, match="output='motion' moves the last input frame"):
        EncoderForecaster(1, 1, [4], output="motion")  # sigmoid would squash the frame
    with pytest.raises(ValueError, match="output='motion' moves the last input frame"):
        EncoderForecaster(1, 2, [4], output="motion", output_activation="identity")
    with pytest.raises(ValueError, match="output must be one of 'frames', 'motion', 'translation', 'advection', 'shift', got 'flow'"):
        EncoderForecaster(1, 1, [4], output="flow")
    with pytest.raises(ValueError, match="advection_radius must be >= 1"):
        EncoderForecaster(1, 1, [4], output="advection", output_activation="identity", advection_radius=0)
    with pytest.raises(ValueError, match="correlation_radius must be >= 0"):
        EncoderForecaster(1, 1, [4], correlation_radius=-1)


# -- advection output: each pixel gathers from a window -----------------------------------
def test_advect_gathers_by_window_offset_and_per_block():
    from nowcast.models.warp import advect

    frame = torch.zeros(1, 1, 8, 8)
    frame[0, 0, 2, 3] = 1.0
    weights = torch.zeros(1, 9, 8, 8)
    weights[:, 3] = 1.0  # offset (oy, ox) = (0, -1): read the left neighbour -> 1 px right
    out = advect(frame, weights)
    assert out[0, 0, 2, 4] == 1.0 and out.sum() == 1.0
    # on a 2x coarser grid: the block holding (2, 4) reads from its pixels' left neighbours
    coarse = torch.zeros(1, 9, 4, 4)
    coarse[:, 3] = 1.0
    torch.testing.assert_close(advect(frame, coarse, block=2), out)
    # half and half: mass is shared, the frame stays in [0, 1]
    weights = torch.zeros(1, 9, 8, 8)
    weights[:, 3] = weights[:, 4] = 0.5
    out = advect(frame, weights)
    assert out[0, 0, 2, 3] == out[0, 0, 2, 4] == 0.5
    with pytest.raises(ValueError, match="odd k"):
        advect(frame, torch.zeros(1, 4, 8, 8))
    with pytest.raises(ValueError, match=r"must be \(B, k\*k, H/2, W/2\)"):
        advect(frame, torch.zeros(1, 9, 8, 8), block=2)


def test_advection_output_starts_near_persistence_and_learns_a_shift():
    """The untrained advection head keeps 90% of each pixel in place; Adam steps on a
    square moving 2 px right per frame teach it the shift, with or without the cost
    volume of the inputs (correlation_radius) beside the patches."""
    frames = torch.zeros(1, 5, 1, 16, 16)
    for t in range(5):
        frames[0, t, 0, 5:9, 1 + 2 * t : 5 + 2 * t] = 1.0
    x, y = frames[:, :3], frames[:, 3:]
    persistence = ((x[:, -1:] - y) ** 2).mean()
    losses = {}
    for radius in (0, 3):
        torch.manual_seed(0)
        net = EncoderForecaster(1, 1, [8, 8], 3, (1, 2, 2), 3, 2, (16, 16), patch_size=2,
                                output="advection", output_activation="identity",
                                motion_init_std=0.01, advection_radius=2, correlation_radius=radius)
        with torch.no_grad():
            start = net(x)
        assert ((start - x[:, -1:]) ** 2).mean() < 0.1 * persistence  # close to persistence
        assert 0 <= start.min() and start.max() <= 1  # a convex combination of the frame
        opt = torch.optim.Adam(net.parameters(), lr=0.02)
        for _ in range(40):
            opt.zero_grad()
            loss = ((net(x) - y) ** 2).mean()
            loss.backward()
            opt.step()
        losses[radius] = loss.item()
    assert losses[0] < 0.2 * persistence and losses[3] < 0.2 * persistence


def test_advection_prior_extrapolates_the_last_step_before_training():
    """With ``advection_prior`` the untrained head is block matching of the last two
    inputs: a texture moving 2 px right per frame comes out moved 2 and 4 px further
    (to 2e-3: the softmax over the window leaves near-ties a little weight)."""
    torch.manual_seed(0)
    texture = torch.rand(1, 1, 24, 24)
    frames = torch.stack([torch.roll(texture, 2 * t, dims=-1) for t in range(3)], dim=1)  # (1, 3, 1, 24, 24)
    net = EncoderForecaster(1, 1, [4, 4], 3, (1, 2, 2), 3, 2, (24, 24), patch_size=2,
                            output="advection", output_activation="identity",
                            advection_radius=3, advection_prior=1000.0)
    with torch.no_grad():
        y = net(frames)
    last = frames[0, -1, 0]
    # the interior, away from the edges where content enters from outside the frame
    torch.testing.assert_close(y[0, 0, 0, 6:-6, 6:-6], torch.roll(last, 2, dims=-1)[6:-6, 6:-6], atol=2e-3, rtol=0)
    torch.testing.assert_close(y[0, 1, 0, 6:-6, 8:-6], torch.roll(last, 4, dims=-1)[6:-6, 8:-6], atol=2e-3, rtol=0)
    assert net.prior_scale.requires_grad
    with pytest.raises(ValueError, match="advection_prior must be >= 0 and needs output='advection'"):
        EncoderForecaster(1, 1, [4], output="motion", output_activation="identity", advection_prior=1.0)


# -- shift output: the whole last frame moved by whole pixels ----------------------------
def test_shift_matrix_moves_by_whole_pixels_with_zeros_from_outside():
    from nowcast.models.encoder_forecaster import _shift_matrix

    v = torch.arange(1.0, 9.0)
    weights = torch.zeros(7)  # displacements -3..3
    weights[3 + 2] = 1.0
    torch.testing.assert_close(_shift_matrix(weights, 8) @ v, torch.tensor([0, 0, 1, 2, 3, 4, 5, 6.0]))
    weights = torch.zeros(7)
    weights[3 - 1] = weights[3 + 1] = 0.5  # half one pixel up, half one pixel down
    torch.testing.assert_close(_shift_matrix(weights, 8) @ v, torch.tensor([2, 4, 6, 8, 10, 12, 14, 7]) / 2)


def test_past_shift_scores_repeat_the_motion_of_the_inputs():
    """A block moving (+2, -1) px per frame: lead n's best score is n times that, up to
    the inputs' longest span and beyond it (scaled), and a perfect match scores 0."""
    from nowcast.models.encoder_forecaster import past_shift_scores

    frames = torch.zeros(1, 4, 1, 32, 32)
    for t in range(4):
        frames[0, t, 0, 4 + 2 * t : 10 + 2 * t, 20 - t : 24 - t] = 1.0
    scores = past_shift_scores(frames, radius=12, leads=5)  # spans 1..3 from the inputs, 4-5 scaled
    assert scores.shape == (1, 5, 2 * 25)
    best = scores.unflatten(-1, (2, 25)).argmax(-1) - 12  # (1, leads, 2): (dy, dx)
    assert best[0].tolist() == [[2 * n, -n] for n in range(1, 6)]
    assert scores[0, :3].amax(-1).abs().max() < 1e-4  # the past spans match exactly
    assert scores.min() >= -2.0 - 1e-4  # -2: no overlap at all


def test_shift_prior_forecasts_a_moving_digit_and_its_scale_is_learned():
    """With a strong ``shift_prior`` the untrained network repeats the inputs' motion: a
    texture moving (+1, +2) px per frame comes out where it will be. Training starts
    from there, with a gradient on the prior's weight and on the ConvLSTM levels."""
    torch.manual_seed(0)
    frames = torch.zeros(1, 6, 1, 32, 32)
    texture = torch.rand(8, 8)
    for t in range(6):
        frames[0, t, 0, 4 + t : 12 + t, 2 + 2 * t : 10 + 2 * t] = texture
    x, y = frames[:, :4], frames[:, 4:]
    net = EncoderForecaster(1, 1, [4, 4], 3, (1, 2, 2), 4, 2, (32, 32), patch_size=2,
                            output="shift", output_activation="identity", motion_init_std=0.01,
                            shift_radius=10, shift_prior=50.0)
    out = net(x)
    torch.testing.assert_close(out, y, atol=1e-3, rtol=0)
    ((out - y) ** 2).mean().backward()
    assert net.shift_prior.grad is not None and net.shift_prior.grad.abs() > 0
    assert sum(p.grad.abs().sum() for p in net.encoders[0].parameters()) > 0


def test_shift_output_starts_as_persistence_and_learns_a_shift():
    """Without the prior the head starts with 90% of the frame in place and learns, from
    the loss alone, a shift that a warp's local gradient does not see (a 4 px square moved
    4 px: no overlap with where it was)."""
    frames = torch.zeros(1, 4, 1, 16, 16)
    for t in range(4):
        frames[0, t, 0, 6:10, 4 * t : 4 * t + 4] = 1.0
    x, y = frames[:, :2], frames[:, 2:]
    persistence = ((x[:, -1:] - y) ** 2).mean()
    torch.manual_seed(0)
    net = EncoderForecaster(1, 1, [8, 8], 3, (1, 2, 2), 2, 2, (16, 16), patch_size=2,
                            output="shift", output_activation="identity", motion_init_std=0.01,
                            shift_radius=8)
    with torch.no_grad():
        start = net(x)
    assert ((start - x[:, -1:]) ** 2).mean() < 0.05 * persistence
    opt = torch.optim.Adam(net.parameters(), lr=0.1)
    for _ in range(40):
        opt.zero_grad()
        loss = ((net(x) - y) ** 2).mean()
        loss.backward()
        opt.step()
    assert loss.item() < 0.01 * persistence


def test_shift_output_arguments():
    with pytest.raises(ValueError, match="shift_radius must be >= 1"):
        EncoderForecaster(1, 1, [4], output="shift", output_activation="identity", shift_radius=0)
    with pytest.raises(ValueError, match="shift_prior must be >= 0 and needs output='shift'"):
        EncoderForecaster(1, 1, [4], output="advection", output_activation="identity", shift_prior=1.0)
    with pytest.raises(ValueError, match="output='shift' moves the last input frame"):
        EncoderForecaster(1, 1, [4], output="shift")  # sigmoid would squash the frame


def test_coordinates_are_two_more_input_channels_from_minus_one_to_one():
    from nowcast.models.encoder_forecaster import _coordinates

    grid = _coordinates(torch.zeros(2, 3, 5, 4, 6))
    assert grid.shape == (2, 3, 2, 4, 6)
    torch.testing.assert_close(grid[0, 0, 0, :, 0], torch.linspace(-1, 1, 4))  # y down the rows
    torch.testing.assert_close(grid[1, 2, 1, 0], torch.linspace(-1, 1, 6))  # x along the columns
    torch.manual_seed(0)
    net = EncoderForecaster(1, 1, [4, 4], 3, (1, 2, 2), 2, 2, (16, 16), patch_size=2, coordinates=True)
    assert net.encoders[0].in_channels == 4 + 2
    x = torch.rand(1, 2, 1, 16, 16)
    # the same content elsewhere in the frame gives a different forecast: the network knows where
    moved = torch.roll(x, (4, 4), dims=(-2, -1))
    assert not torch.allclose(torch.roll(net(x), (4, 4), dims=(-2, -1))[..., 6:-6, 6:-6], net(moved)[..., 6:-6, 6:-6])
