"""A motion-aware ConvLSTM nowcaster: learned advection of the last frame plus a learned change.

Rain mostly moves; a ConvLSTM trained on a few hours of radar that forecasts the rain field
itself has to learn advection pixel by pixel and blurs it away after a few leads. This
network forecasts *how the last frame moves* instead (as TrajGRU and NowcastNet's
evolution network do): a backbone built from :mod:`nowcast.nn` ConvLSTM layers (any
network mapping ``(B, T_in, C, H, W)`` to ``(B, T_out, 3, H, W)``, e.g.
:class:`~nowcast.models.EncoderForecaster`) predicts for every lead a velocity field
``(u, v)`` in pixels per time step and a change of intensity ``r``. The displacement of
lead ``k`` is the sum of the velocities of leads ``1..k``; the last input frame is warped
by it with :func:`torch.nn.functional.grid_sample` (bilinear, differentiable in the flow)
and ``r`` is added:

    y_k(p) = activation(x_last(p - d_k(p)) + r_k(p)),   d_k = sum_{j<=k} v_j

The backbone's last layer starts at zero, so the untrained network is persistence and
training only moves it where the data says so. With ``motion_prior`` every velocity starts
from the inputs' velocity by block matching (one for the whole frame, or one per tile,
interpolated; optionally refined per pixel by Lucas-Kanade and followed along its
trajectories), so the untrained network is an extrapolation of the last frame and the
backbone learns what that motion misses. No pysteps call: the motion is the network's own.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from nowcast.models.encoder_forecaster import (
    REFINE_WEIGHTINGS,
    global_velocity,
    make_output_activation,
    refine_velocity,
    regional_velocity,
)
from nowcast.models.warp import trajectory, warp


class MotionNowcaster(nn.Module):
    """``(B, T_in, C, H, W)`` -> ``(B, T_out, C, H, W)``: the last frame advected by a learned
    flow, plus a learned intensity change.

    Parameters
    ----------
    net
        Backbone mapping ``(B, T_in, C, H, W)`` to ``(B, T_out, 3, H, W)`` with
        exactly 3 output channels (``u``, ``v``, ``r``) and an identity output activation,
        e.g. :class:`~nowcast.models.EncoderForecaster` with ``out_channels=3``. Its
        ``head`` convolution, if it has one, is zeroed (start at persistence).
    max_speed
        Largest speed in pixels per time step (``max_speed * tanh``): 16 px per 10 min
        at 1 km is ~100 km/h, faster than rain systems move.
    flow_smoothing
        Odd box-filter width (pixels) applied to the velocity fields: a patch-wise backbone
        (``patch_size`` 4) gives blocky velocities, and a discontinuous flow tears the
        warped field apart. 1 disables it.
    padding_mode
        What is advected in from outside the domain: ``"border"`` or ``"zeros"``.
    output_activation
        Applied to warped frame + change; ``relu`` keeps log rain rates (and rain) >= 0.
    straight_through
        With ``relu``: pass the gradient through where the sum is <= 0 (the value is still
        clipped). Dry pixels are exactly 0 in log space, where relu's gradient is 0: rain
        arriving on dry ground (the leading edge of a storm) would teach the flow nothing.
    init_std
        Standard deviation of the backbone head's initial weights (bias 0). ``0``: the
        untrained network is exactly persistence, but a zero head passes no gradient to
        the ConvLSTM levels, which then learn only as far as the head's weights grow on
        their untrained features (with rotated and flipped training windows the mean
        motion is zero, so they hardly do). A small value keeps the start near
        persistence with a live gradient; Adam's steps do not depend on its size.
    motion_prior
        Add to every lead's velocity the whole frame's velocity over the inputs, found by
        global block matching (:func:`~nowcast.models.encoder_forecaster.global_velocity`,
        no gradient): the untrained network extrapolates the domain's mean motion, as the
        simplest nowcasts do, instead of standing still.
    prior_radius
        Largest displacement (pixels, each axis) the block matching searches, over
        ``prior_span`` steps.
    prior_span
        Steps between the two frames matched: the last input and the one ``prior_span``
        steps before it (a longer span resolves slow motion better). ``None``: the first
        input.
    prior_tile
        ``None``: one velocity for the whole frame. A size in pixels: block matching on
        tiles of that size (every ``prior_stride`` pixels, default half a tile), the tile
        velocities interpolated to a smooth field
        (:func:`~nowcast.models.encoder_forecaster.regional_velocity`). A frame no larger
        than a tile (a training crop, say) still gets one velocity; a whole radar domain
        gets one per region instead of one for a country's composite.
    prior_stride
        Pixels between tiles; ``None``: ``prior_tile // 2``.
    prior_refine
        ``None``: the block-matching velocity as it is. A window size (px, the standard
        deviation of a Gaussian): that velocity refined pixel by pixel by Lucas-Kanade
        over all inputs (:func:`~nowcast.models.encoder_forecaster.refine_velocity`), so
        showers within a tile (or a crop) that move differently each get their own
        motion. Applies to crops too.
    prior_refine_iterations
        Lucas-Kanade corrections per pyramid level.
    prior_refine_weighting
        How the inputs count in the refinement: ``"intensity"`` (their matching errors, so
        the oldest input weighs most) or ``"velocity"`` (each input's velocity estimate
        the same, so the newest motion is not outweighed); see ``weighting`` of
        :func:`~nowcast.models.encoder_forecaster.refine_velocity`.
    prior_trajectory
        Move the last frame along the prior's backward trajectories (the velocity sampled
        where each trajectory has got to, :func:`~nowcast.models.warp.trajectory`, the
        semi-Lagrangian scheme), not along straight lines. Equal for a uniform prior.
    lagrangian_inputs
        With ``motion_prior``: the backbone reads the inputs moved along the prior's motion
        to the last input's time (input ``t`` displaced by the prior velocity times its
        steps before the last), so rain that only moves stands still in what it reads and
        the ConvLSTM sees what the prior misses: growth, decay and the residual motion
        (the Lagrangian frame of L-CNN, Ritvanen et al. 2023).
    """

    def __init__(
        self,
        net: nn.Module,
        max_speed: float = 16.0,
        flow_smoothing: int = 9,
        padding_mode: str = "border",
        output_activation: str = "relu",
        straight_through: bool = True,
        init_std: float = 0.0,
        motion_prior: bool = False,
        prior_radius: int = 48,
        prior_span: int | None = None,
        prior_tile: int | None = None,
        prior_stride: int | None = None,
        prior_refine: float | None = None,
        prior_refine_iterations: int = 2,
        prior_refine_weighting: str = "intensity",
        prior_trajectory: bool = False,
        lagrangian_inputs: bool = False,
    ) -> None:
        super().__init__()
        if flow_smoothing < 1 or flow_smoothing % 2 == 0:
            raise ValueError(f"flow_smoothing must be an odd width >= 1, got {flow_smoothing}")
        if padding_mode not in ("border", "zeros", "reflection"):
            raise ValueError(f"padding_mode must be border, zeros or reflection, got {padding_mode!r}")
        if getattr(net, "out_channels", 3) != 3 or getattr(net, "in_channels", 1) != 1:
            raise ValueError(
                "the backbone must read 1 channel and give 3 (u, v, intensity change), got "
                f"in_channels={getattr(net, 'in_channels', None)}, out_channels={getattr(net, 'out_channels', None)}"
            )
        self.net = net
        self.max_speed = float(max_speed)
        self.flow_smoothing = int(flow_smoothing)
        self.padding_mode = padding_mode
        self.activation = make_output_activation(output_activation)
        self.straight_through = bool(straight_through) and output_activation == "relu"
        self.in_channels = 1
        self.out_channels = 1
        self.input_steps = int(net.input_steps)
        self.output_steps = int(net.output_steps)
        self.spatial_divisor = int(getattr(net, "spatial_divisor", 1))
        self.motion_prior = bool(motion_prior)
        self.prior_radius = int(prior_radius)
        self.prior_span = self.input_steps - 1 if prior_span is None else int(prior_span)
        if self.motion_prior and not 1 <= self.prior_span < self.input_steps:
            raise ValueError(
                f"prior_span must be in 1..{self.input_steps - 1} (input_steps - 1), got {prior_span}"
            )
        if self.motion_prior and self.prior_radius < 1:
            raise ValueError(f"prior_radius must be >= 1, got {prior_radius}")
        self.prior_tile = None if prior_tile is None else int(prior_tile)
        self.prior_stride = None if prior_stride is None else int(prior_stride)
        if self.motion_prior and self.prior_tile is not None:
            if self.prior_tile < 2 * self.prior_radius + 1:
                raise ValueError(f"prior_tile must be at least 2 * prior_radius + 1 = "
                                 f"{2 * self.prior_radius + 1}, got {prior_tile}")
            if self.prior_stride is not None and not 1 <= self.prior_stride <= self.prior_tile:
                raise ValueError(f"prior_stride must be in 1..prior_tile ({self.prior_tile}), got {prior_stride}")
        self.prior_refine = None if prior_refine is None else float(prior_refine)
        self.prior_refine_iterations = int(prior_refine_iterations)
        if self.prior_refine is not None and (self.prior_refine <= 0 or self.prior_refine_iterations < 1):
            raise ValueError(f"prior_refine must be a window > 0 px and prior_refine_iterations >= 1, got "
                             f"{prior_refine} and {prior_refine_iterations}")
        if prior_refine_weighting not in REFINE_WEIGHTINGS:
            raise ValueError(f"prior_refine_weighting must be 'intensity' or 'velocity', got {prior_refine_weighting!r}")
        self.prior_refine_weighting = prior_refine_weighting
        self.prior_trajectory = bool(prior_trajectory)
        if not self.motion_prior and (self.prior_refine is not None or self.prior_trajectory):
            raise ValueError("prior_refine and prior_trajectory need motion_prior: they change its motion")
        self.lagrangian_inputs = bool(lagrangian_inputs)
        if self.lagrangian_inputs and not self.motion_prior:
            raise ValueError("lagrangian_inputs needs motion_prior: the inputs are moved along its motion")
        head = getattr(net, "head", None)
        if isinstance(head, nn.Conv2d):
            nn.init.normal_(head.weight, std=float(init_std))
            if head.bias is not None:
                nn.init.zeros_(head.bias)

    def prior_velocity(self, x: Tensor) -> Tensor | None:
        """The inputs' velocity by block matching, ``(B, 2, H, W)`` or ``(B, 2, 1, 1)`` in
        pixels per step; ``None`` without ``motion_prior``."""
        if not self.motion_prior:
            return None
        if self.prior_tile is not None:  # the inputs' motion per region
            v = regional_velocity(x, self.prior_radius, self.prior_span, self.prior_tile, self.prior_stride)
        else:
            v = global_velocity(x, self.prior_radius, self.prior_span)[:, :, None, None]  # the whole frame's
        if self.prior_refine is not None:  # per pixel
            v = refine_velocity(x, v, self.prior_refine, self.prior_refine_iterations,
                                weighting=self.prior_refine_weighting)
        return v

    def prior_displacement(self, prior: Tensor, steps: int) -> Tensor:
        """``(B, 2, H|1, W|1)`` prior velocity -> ``(B, steps, 2, H|1, W|1)`` displacement of
        leads ``1..steps``: along its trajectories with ``prior_trajectory`` (a field that
        varies), else ``k`` times the velocity."""
        if self.prior_trajectory and prior.shape[-2:] != (1, 1):
            return trajectory(prior, steps, self.padding_mode)
        k = torch.arange(1, steps + 1, device=prior.device, dtype=prior.dtype)
        return prior[:, None] * k[None, :, None, None, None]

    def motion(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Displacements and intensity changes of every lead.

        Returns
        -------
        ``(displacement, change)``: ``(B, T_out, 2, H, W)`` in pixels (x right, y down),
        cumulative from the last input frame, and ``(B, T_out, 1, H, W)`` in network space.
        """
        prior = self.prior_velocity(x)  # (B, 2, H|1, W|1) or None
        seen = x
        if self.lagrangian_inputs:  # input t moved by the prior over its (T_in - 1 - t) steps
            b, t_in, c, h, w = x.shape
            steps = torch.arange(t_in - 1, -1, -1, device=x.device, dtype=prior.dtype)  # (T_in,)
            along = (prior[:, None] * steps[None, :, None, None, None]).expand(b, t_in, 2, h, w)
            seen = warp(x.flatten(0, 1), along.flatten(0, 1)[:, None], self.padding_mode).view(b, t_in, c, h, w)
        out = self.net(seen)  # (B, T_out, 3, H, W)
        if out.dim() != 5 or out.shape[2] != 3:
            raise ValueError(f"the backbone must return (B, T_out, 3, H, W), got {tuple(out.shape)}")
        b, t = out.shape[:2]
        velocity = self.max_speed * torch.tanh(out[:, :, :2])  # (B, T_out, 2, H, W) px per step
        if self.flow_smoothing > 1:
            k = self.flow_smoothing
            velocity = F.avg_pool2d(velocity.flatten(0, 1), k, stride=1, padding=k // 2,
                                    count_include_pad=False).unflatten(0, (b, t))  # (B, T_out, 2, H, W)
        displacement = velocity.cumsum(dim=1)  # (B, T_out, 2, H, W): lead k moved by v_1 + ... + v_k
        if prior is not None:  # learned corrections on top of the inputs' motion
            displacement = displacement + self.prior_displacement(prior, t)
        return displacement, out[:, :, 2:]

    def forward(self, x: Tensor) -> Tensor:
        """``(B, T_in, 1, H, W)`` (network space) -> forecast ``(B, T_out, 1, H, W)``."""
        if x.dim() != 5 or x.shape[1] != self.input_steps or x.shape[2] != 1:
            raise ValueError(
                f"expected (B, T, C, H, W) with T={self.input_steps}, C=1, got {tuple(x.shape)}"
            )
        b, _, _, h, w = x.shape
        displacement, change = self.motion(x)  # (B, T_out, 2, H, W), (B, T_out, 1, H, W)
        moved = warp(x[:, -1], displacement, self.padding_mode)  # (B, T_out, 1, H, W)
        out = moved + change  # (B, T_out, 1, H, W)
        if self.straight_through:
            return out + (self.activation(out) - out).detach()  # relu's value, identity's gradient
        return self.activation(out)
