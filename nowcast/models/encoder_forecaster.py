"""Encoder-forecaster networks built from ConvLSTM layers (no Lightning here).

Two architectures, both mapping ``(B, T_in, C, H, W)`` to ``(B, T_out, C_out, H, W)``:

* :class:`EncoderForecaster`: the hierarchical encoder-forecaster of Shi et al. 2017
  (HKO-7): ConvLSTM levels with 3D max pooling between them; the forecaster mirrors the
  encoder from the coarsest level down, each level starting from the encoder's final
  state at that level, with upsampling between levels.
* :class:`Shi2015`: the flat encoding-forecasting ConvLSTM of Shi et al. 2015: a stack
  of ConvLSTM layers at full resolution, the forecaster stack initialised from the
  encoder's states, and a 1x1 convolution over all forecaster states.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from nowcast.models.warp import advect, warp
from nowcast.nn import ConvLSTM2D, LocalCorrelation, MaxPool3D

OUTPUTS = ("frames", "motion", "translation", "advection", "shift")

_OUTPUT_ACTIVATIONS = {
    "identity": nn.Identity,
    "sigmoid": nn.Sigmoid,
    # Rain rates (or their encodings) cannot be negative: softplus keeps gradients alive
    # below zero where relu would not.
    "softplus": nn.Softplus,
    "relu": nn.ReLU,
}


def make_output_activation(name: str) -> nn.Module:
    """The network's last activation by name: identity, sigmoid, softplus or relu."""
    if name not in _OUTPUT_ACTIVATIONS:
        raise ValueError(
            f"unknown output_activation {name!r}; expected one of {sorted(_OUTPUT_ACTIVATIONS)}"
        )
    return _OUTPUT_ACTIVATIONS[name]()


def to_patches(x: Tensor, patch_size: int) -> Tensor:
    """Space to depth: ``(B, T, C, H, W)`` -> ``(B, T, C*p*p, H/p, W/p)``."""
    if patch_size == 1:
        return x
    b = x.shape[0]
    return F.pixel_unshuffle(x.flatten(0, 1), patch_size).unflatten(0, (b, -1))


def from_patches(x: Tensor, patch_size: int) -> Tensor:
    """Depth to space: ``(B, T, C*p*p, H/p, W/p)`` -> ``(B, T, C, H, W)``."""
    if patch_size == 1:
        return x
    b = x.shape[0]
    return F.pixel_shuffle(x.flatten(0, 1), patch_size).unflatten(0, (b, -1))


def _frame_size(frame_size: int | Sequence[int] | None) -> tuple[int, int]:
    """``(H, W)`` from an int, a pair or ``None`` (no check: ``(0, 0)`` divides anything)."""
    if frame_size is None:
        return 0, 0
    if isinstance(frame_size, int):
        return frame_size, frame_size
    h, w = (int(s) for s in frame_size)
    return h, w


def set_flat_io(
    net: nn.Module,
    in_channels: int,
    out_channels: int,
    input_steps: int,
    output_steps: int,
    frame_size: int | Sequence[int] | None,
    patch_size: int,
) -> None:
    """Check ``frame_size`` against ``patch_size`` and set the I/O attributes of a network
    without spatial pooling (``spatial_divisor`` = ``patch_size``)."""
    h, w = _frame_size(frame_size)
    if h % patch_size or w % patch_size:
        raise ValueError(f"frame_size {(h, w)} is not divisible by patch_size {patch_size}")
    net.in_channels = in_channels
    net.out_channels = out_channels
    net.input_steps = input_steps
    net.output_steps = output_steps
    net.patch_size = patch_size
    net.spatial_divisor = patch_size


def _check_input(x: Tensor, channels: int, steps: int, divisor: int) -> None:
    if x.dim() != 5 or x.shape[2] != channels or x.shape[1] != steps:
        raise ValueError(
            f"expected (B, T, C, H, W) with T={steps}, C={channels}, got {tuple(x.shape)}"
        )
    if x.shape[-2] % divisor or x.shape[-1] % divisor:
        raise ValueError(
            f"frame size {tuple(x.shape[-2:])} must be divisible by {divisor} "
            "(patch_size times the spatial pooling); pad or crop the input"
        )


class EncoderForecaster(nn.Module):
    """Hierarchical ConvLSTM encoder-forecaster (Shi et al. 2017, HKO-7 layout).

    Parameters
    ----------
    in_channels, out_channels
        Channels of the input and of the forecast frames.
    hidden_channels
        ConvLSTM channels of each level, finest first, e.g. ``[64, 96, 96]``.
    kernel_size
        ConvLSTM kernel, one value or one per level.
    pool_size
        ``(t, h, w)`` 3D max pooling between encoder levels (and the matching upsampling
        in the forecaster). The default ``(1, 2, 2)`` pools space only; pooling time needs
        ``input_steps`` and ``output_steps`` divisible by ``t ** (levels - 1)``.
    input_steps, output_steps
        ``T_in`` and ``T_out``; they may differ.
    frame_size
        ``(H, W)`` (or one int) the network is built for; checked for divisibility here
        so that a bad size fails at construction rather than mid-training (``None``: no
        check). Other sizes divisible by :attr:`spatial_divisor` work too (e.g. a full
        radar domain padded for evaluation); ``forward`` checks every input.
    patch_size
        Space-to-depth factor applied before the first level (PredRNN's "patch"): frames
        are cut into ``p x p`` patches stacked as channels, which makes high-resolution
        inputs ``p**2`` times cheaper; undone by pixel shuffle at the output.
    output_activation
        ``sigmoid`` for [0, 1] images, ``softplus``/``relu``/``identity`` for rain.
    peephole, checkpoint_steps
        Passed to every :class:`~nowcast.nn.ConvLSTM2D`.
    residual
        Forecast a change to persistence: the output is
        ``output_activation(last input frame + network output)``. The untrained network
        starts near "no change" and learns motion, growth and decay; with few training
        samples this keeps long leads from fading to the climatological mean. Needs
        ``in_channels == out_channels`` and an activation that keeps the input's range
        (``relu``/``identity`` for rain in log space).
    output
        ``"frames"``: the head draws the forecast frames (Shi et al.). ``"motion"``: the
        head gives, per lead and patch, a velocity (patch widths per frame, upsampled
        bilinearly to pixels); the forecast at lead ``k`` is the last input frame warped
        by the sum of the first ``k`` velocities (:func:`~nowcast.models.warp.warp`), as
        NowcastNet's evolution network moves radar fields. ``"translation"``: the same,
        with the velocities averaged over the frame, weighted by the last frame's content
        (the velocity of what is there, not of the empty background), so each lead moves
        the whole last frame rigidly (one object, or a field moving as one). The head starts at zero, so
        the untrained network is persistence, and forecasts keep the last frame's
        sharpness. Trained with MSE a free ``"motion"`` field can also *contract* the
        frame onto a few pixels, erasing what it is unsure of (on one-digit Moving-MNIST it
        did, stalling at 0.6x persistence's MSE); a translation cannot. Both need
        ``in_channels == out_channels`` and an activation that keeps the input's range
        (``identity`` or ``relu``); ``residual`` does not apply. ``"advection"``: per
        lead and patch, softmax weights over a ``(2r+1) x (2r+1)`` window of source pixels
        (``r = advection_radius``); lead ``k`` is lead ``k-1`` with each pixel gathered
        from its window (:func:`~nowcast.models.warp.advect`, the dynamic neural advection
        of Finn et al. 2016). It starts with 90% of each pixel in place. Unlike a warp it
        can spread a pixel over several places, so under MSE it hedges by blurring where
        the motion field contracts. ``"shift"``: per lead, a probability for every
        whole-pixel displacement up to ``shift_radius`` along each axis (the head's logits
        averaged over the frame where the last input has content, like ``"translation"``);
        the forecast is the last input frame shifted by each displacement, weighted (zeros
        from outside). For one object, or a field moving as one. Each lead's displacement
        is counted from the last input, not summed over leads, so a lead can come back
        (a bounce) and uncertainty does not accumulate. Unlike a warp's velocity, whose
        gradient sees one pixel around each sample point, every displacement's probability
        gets a gradient from the whole frame. It starts with 90% on "no shift" per axis.
    warp_padding
        What a motion output moves in from outside the frame: ``"zeros"`` (no rain),
        ``"border"`` or ``"reflection"``. With zeros, pushing content out of the frame
        erases it, another way to the blank forecast MSE rewards early in training (a
        translation head did exactly that, 0.68x persistence's MSE); with reflection a
        translation keeps all of the frame's content in view.
    motion_init_std
        Standard deviation of the motion head's initial weights (its bias starts at 0).
        ``0`` makes the untrained network exactly persistence, but a zero head passes no
        gradient back to the ConvLSTM levels: they learn only through the head's weights,
        which grow only where the untrained features already correlate with the motion.
        Random directions (Moving-MNIST) do not: a zero-initialised translation head
        stayed at 0.91x persistence's MSE. A small value (``0.01``: displacements of a
        few hundredths of a pixel) starts near persistence with a live gradient.
    correlation_radius
        ``r > 0`` adds the cost volume of consecutive input frames
        (:class:`~nowcast.nn.LocalCorrelation`: for each displacement up to ``r`` pixels
        along each axis, how well the previous frame moved by it matches the current one,
        averaged over each patch) to the first level's input, ``(2r+1)**2`` channels.
        The patches alone show motion finer than a patch only through the loss, which a
        small network learns slowly; the cost volume shows it at pixel resolution, as in
        FlowNet-C and RAFT. ``r`` should cover the fastest motion per step; the cost
        grows as ``r**2``. ``0``: off.
    correlation_cost
        ``"product"`` or ``"sqdiff"``, see :func:`~nowcast.nn.local_correlation`.
    advection_radius
        The window of ``output="advection"``: the largest displacement per lead, pixels.
    advection_prior
        ``beta > 0``: the advection logits get ``beta`` times the block-matching cost of
        the last two input frames (negative mean squared difference per patch for each
        displacement in the window; ``beta`` is learned), and the head starts without its
        bias toward "no motion". The untrained network then extrapolates the last step's
        motion (every lead moved like the last step), and training learns what that
        misses (bounces, uneven steps). ``0``: off.
    shift_radius
        The largest displacement of ``output="shift"``, pixels, counted from the last
        input frame (any lead).
    shift_prior
        ``beta > 0``: the ``"shift"`` logits get ``beta`` times :func:`past_shift_scores`
        (lead ``n`` repeats the whole-frame displacement of the last ``n`` input steps;
        ``beta`` is learned), and the head starts without its "no shift" bias. The
        untrained network extrapolates the past motion; training learns what that misses
        (bounces, positions rounded to whole pixels). ``0``: off.
    coordinates
        Add each patch's position (``y`` and ``x`` from -1 to 1 across the frame) as two
        input channels (CoordConv, Liu et al. 2018), so that the network can tell where in
        the frame something is, e.g. how far a digit is from the wall it will bounce off.
        The network is then no longer the same everywhere in the frame; a larger frame at
        evaluation stretches the coordinates over it.
    """

    def __init__(
        self,
        in_channels: int = 1,
        out_channels: int = 1,
        hidden_channels: Sequence[int] = (64, 96, 96),
        kernel_size: int | Sequence[int] = 3,
        pool_size: Sequence[int] = (1, 2, 2),
        input_steps: int = 10,
        output_steps: int = 10,
        frame_size: int | Sequence[int] | None = (64, 64),
        patch_size: int = 1,
        output_activation: str = "sigmoid",
        peephole: bool = False,
        checkpoint_steps: int = 0,
        residual: bool = False,
        output: str = "frames",
        warp_padding: str = "zeros",
        motion_init_std: float = 0.0,
        correlation_radius: int = 0,
        correlation_cost: str = "product",
        advection_radius: int = 5,
        advection_prior: float = 0.0,
        shift_radius: int = 32,
        shift_prior: float = 0.0,
        coordinates: bool = False,
    ) -> None:
        super().__init__()
        if output not in OUTPUTS:
            raise ValueError(f"output must be one of {', '.join(map(repr, OUTPUTS))}, got {output!r}")
        if output != "frames":
            if in_channels != out_channels or residual or output_activation not in ("identity", "relu"):
                raise ValueError(
                    f"output={output!r} moves the last input frame: it needs in_channels == "
                    f"out_channels (got {in_channels}, {out_channels}), residual=False (got "
                    f"{residual}) and output_activation 'identity' or 'relu' (got "
                    f"{output_activation!r}), which keep the input's range"
                )
        self.output = output
        if warp_padding not in ("zeros", "border", "reflection"):
            raise ValueError(f"warp_padding must be 'zeros', 'border' or 'reflection', got {warp_padding!r}")
        self.warp_padding = warp_padding
        if residual and in_channels != out_channels:
            raise ValueError(
                f"residual=True adds the last input frame to the output: in_channels "
                f"({in_channels}) must equal out_channels ({out_channels})"
            )
        self.residual = residual
        hidden = [int(h) for h in hidden_channels]
        levels = len(hidden)
        if levels < 1:
            raise ValueError("hidden_channels needs at least one level")
        kernels = [int(k) for k in kernel_size] if not isinstance(kernel_size, int) else [kernel_size] * levels
        if len(kernels) != levels:
            raise ValueError(f"kernel_size has {len(kernels)} entries for {levels} levels")
        pool = tuple(int(p) for p in pool_size)
        if len(pool) != 3:
            raise ValueError(f"pool_size must be (t, h, w), got {pool}")
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.input_steps = input_steps
        self.output_steps = output_steps
        self.patch_size = patch_size
        self.pool_size = pool
        self.levels = levels
        self.time_divisor = pool[0] ** (levels - 1)
        self.spatial_divisor = patch_size * math.lcm(pool[1] ** (levels - 1), pool[2] ** (levels - 1))
        for name, steps in (("input_steps", input_steps), ("output_steps", output_steps)):
            if steps % self.time_divisor:
                raise ValueError(
                    f"{name}={steps} is not divisible by the time pooling "
                    f"{pool[0]}**{levels - 1}={self.time_divisor}"
                )
        h, w = _frame_size(frame_size)
        if h % self.spatial_divisor or w % self.spatial_divisor:
            raise ValueError(
                f"frame_size {(h, w)} is not divisible by patch_size * spatial pooling = "
                f"{self.spatial_divisor}"
            )

        stem_channels = in_channels * patch_size**2
        self.coordinates = bool(coordinates)
        if self.coordinates:
            stem_channels += 2
        if correlation_radius < 0:
            raise ValueError(f"correlation_radius must be >= 0, got {correlation_radius}")
        self.correlation = LocalCorrelation(correlation_radius, patch_size, correlation_cost) if correlation_radius else None
        if self.correlation is not None:
            stem_channels += self.correlation.channels
        self.encoders = nn.ModuleList()
        self.forecasters = nn.ModuleList()
        for level in range(levels):
            enc_in = stem_channels if level == 0 else hidden[level - 1]
            self.encoders.append(ConvLSTM2D(enc_in, hidden[level], kernels[level],
                                            return_state=True, checkpoint_steps=checkpoint_steps,
                                            peephole=peephole))
            # The coarsest forecaster has no input but its state (Shi et al.): it gets a
            # single zero channel. Finer levels get the upsampled output of the level above.
            fc_in = 1 if level == levels - 1 else hidden[level + 1]
            self.forecasters.append(ConvLSTM2D(fc_in, hidden[level], kernels[level],
                                               return_state=False, checkpoint_steps=checkpoint_steps,
                                               peephole=peephole))
        self.pool = MaxPool3D(pool)
        if advection_radius < 1:
            raise ValueError(f"advection_radius must be >= 1, got {advection_radius}")
        self.advection_radius = int(advection_radius)
        window = (2 * self.advection_radius + 1) ** 2
        if shift_radius < 1:
            raise ValueError(f"shift_radius must be >= 1, got {shift_radius}")
        self.shift_radius = int(shift_radius)
        shifts = 2 * self.shift_radius + 1
        head_channels = {"frames": out_channels * patch_size**2, "advection": window, "shift": 2 * shifts}.get(output, 2)
        self.head = nn.Conv2d(hidden[0], head_channels, kernel_size=1)
        if output != "frames":  # (almost) no motion at first: the untrained network is persistence
            nn.init.normal_(self.head.weight, std=float(motion_init_std))
            nn.init.zeros_(self.head.bias)
        if advection_prior < 0 or (advection_prior and output != "advection"):
            raise ValueError(
                f"advection_prior must be >= 0 and needs output='advection', got "
                f"{advection_prior} with output={output!r}"
            )
        self.prior = None
        if advection_prior:
            # Block matching of the last two inputs, one window per patch: the untrained
            # head extrapolates the last step's motion; the network learns what changes.
            self.prior = LocalCorrelation(self.advection_radius, patch_size, "sqdiff")
            self.prior_scale = nn.Parameter(torch.tensor(float(advection_prior)))
        elif output == "advection":
            # 90% of each pixel's weight on itself, the rest spread over the window: close
            # to persistence, with a gradient toward every displacement in the window.
            with torch.no_grad():
                self.head.bias[window // 2] = math.log(9.0 * (window - 1))
        elif output == "shift" and not shift_prior:  # 90% of each axis' weight on "no shift"
            with torch.no_grad():
                self.head.bias[shifts // 2] = self.head.bias[shifts + shifts // 2] = math.log(9.0 * (shifts - 1))
        if shift_prior < 0 or (shift_prior and output != "shift"):
            raise ValueError(
                f"shift_prior must be >= 0 and needs output='shift', got {shift_prior} with output={output!r}"
            )
        self.shift_prior = nn.Parameter(torch.tensor(float(shift_prior))) if shift_prior else None
        self.activation = make_output_activation(output_activation)

    def forward(self, x: Tensor) -> Tensor:
        """``(B, T_in, C, H, W)`` -> forecast ``(B, T_out, C_out, H, W)``."""
        _check_input(x, self.in_channels, self.input_steps, self.spatial_divisor)
        b = x.shape[0]
        inputs = x  # the frames themselves: a shift head moves the last and block-matches them
        last = x[:, -1:]  # (B, 1, C, H, W): persistence, for residual=True
        corr = self.correlation(x) if self.correlation is not None else None  # (B, T, K, H/p, W/p)
        # block-matching cost of the last step, flipped from "moved by d" to the window
        # offset -d that reads where the content came from
        prior = self.prior(x[:, -2:])[:, -1].flip(1) if self.prior is not None else None  # (B, k*k, H/p, W/p)
        x = to_patches(x, self.patch_size)  # (B, T, C*p*p, H/p, W/p)
        if corr is not None:
            x = torch.cat((x, corr), dim=2)  # (B, T, C*p*p + K, H/p, W/p)
        if self.coordinates:
            x = torch.cat((x, _coordinates(x)), dim=2)  # (B, T, ... + 2, H/p, W/p)
        states = []
        for level, encoder in enumerate(self.encoders):
            if level > 0:
                x = self.pool(x)  # (B, T/pt, C, H/ph, W/pw)
            x, level_states = encoder(x)  # (B, T_l, Ch_l, H_l, W_l)
            states.append(level_states)
        y = None
        for level in reversed(range(self.levels)):
            steps = self.output_steps // self.pool_size[0] ** level
            if y is None:
                hh, ww = states[level][0][0].shape[-2:]
                y = x.new_zeros(b, steps, 1, hh, ww)  # the coarsest level has no input
            else:
                y = _upsample(y, self.pool_size)  # (B, T_l, Ch_{l+1}, H_l, W_l)
            y = self.forecasters[level](y, initial_state=states[level])  # (B, T_l, Ch_l, H_l, W_l)
        out = self.head(y.flatten(0, 1))  # (B*T_out, C_head, H/p, W/p)
        if self.output == "advection":
            if prior is not None:  # the same cost added to every lead's logits
                out = (out.unflatten(0, (b, self.output_steps)) + self.prior_scale * prior[:, None]).flatten(0, 1)
            return self.activation(self._advect(last[:, 0], out, b))
        if self.output == "shift":
            return self.activation(self._shift(inputs, out))
        if self.output != "frames":
            return self.activation(self._move(last[:, 0], out, b))
        out = out.unflatten(0, (b, self.output_steps))  # (B, T_out, C_out*p*p, H/p, W/p)
        out = from_patches(out, self.patch_size)  # (B, T_out, C_out, H, W)
        if self.residual:
            out = out + last  # broadcast over T_out
        return self.activation(out)


    def _move(self, last: Tensor, velocity: Tensor, b: int) -> Tensor:
        """Warp ``last`` ``(B, C, H, W)`` by the summed per-lead velocities
        ``(B*T_out, 2, H/p, W/p)`` (patch widths per frame) -> ``(B, T_out, C, H, W)``."""
        p = self.patch_size
        h, w = last.shape[-2:]
        if self.output == "translation":  # one velocity per sample and lead
            # Averaged where the last frame has content: the velocity of what is there
            # (the digit), not of the empty background around it.
            ink = self._ink(last).repeat_interleave(self.output_steps, 0)  # (B*T_out, 1, H/p, W/p)
            velocity = (velocity * ink).sum(dim=(-2, -1), keepdim=True).expand(-1, -1, h, w)  # (B*T_out, 2, H, W)
        elif p > 1:  # a smooth field in pixels; nearest (pixel shuffle) would tear at patch edges
            velocity = F.interpolate(velocity, scale_factor=p, mode="bilinear", align_corners=False)
        velocity = (velocity * p).unflatten(0, (b, self.output_steps))  # (B, T_out, 2, H, W), px/frame
        return warp(last, velocity.cumsum(dim=1), self.warp_padding)  # (B, T_out, C, H, W)

    def _shift(self, inputs: Tensor, logits: Tensor) -> Tensor:
        """Shift the last of ``inputs`` ``(B, T_in, C, H, W)`` by a distribution over
        whole-pixel displacements per lead and axis, whose logits ``(B*T_out, 2*(2R+1),
        H/p, W/p)`` are averaged over the frame where it has content -> ``(B, T_out, C, H, W)``."""
        b, last = inputs.shape[0], inputs[:, -1]
        ink = self._ink(last).repeat_interleave(self.output_steps, 0)  # (B*T_out, 1, H/p, W/p)
        logits = (logits * ink).sum(dim=(-2, -1)).unflatten(0, (b, self.output_steps))  # (B, T_out, 2*(2R+1))
        if self.shift_prior is not None:
            logits = logits + self.shift_prior * past_shift_scores(inputs, self.shift_radius, self.output_steps)
        p_y, p_x = logits.unflatten(-1, (2, -1)).softmax(-1).unbind(2)  # (B, T_out, 2R+1)
        h, w = last.shape[-2:]
        s_y, s_x = _shift_matrix(p_y, h), _shift_matrix(p_x, w)  # (B, T_out, H, H), (B, T_out, W, W)
        # out[i, j] = sum_{dy, dx} p_y[dy] p_x[dx] last[i - dy, j - dx], zeros from outside
        return torch.einsum("btik,bckl,btjl->btcij", s_y, last, s_x)

    def _ink(self, last: Tensor) -> Tensor:
        """Where the last frame has content, ``(B, 1, H/p, W/p)`` summing to 1 per sample."""
        ink = F.avg_pool2d(last.abs().sum(1, keepdim=True), self.patch_size) + 1e-3
        return ink / ink.sum(dim=(-2, -1), keepdim=True)

    def _advect(self, last: Tensor, logits: Tensor, b: int) -> Tensor:
        """Advect ``last`` ``(B, C, H, W)`` lead by lead with the window weights whose
        logits are ``(B*T_out, k*k, H/p, W/p)`` (one window per patch) -> ``(B, T_out, C, H, W)``."""
        weights = logits.softmax(dim=1).unflatten(0, (b, self.output_steps))  # (B, T_out, k*k, H/p, W/p)
        frame, out = last, []
        for step in range(self.output_steps):
            # lead step+1 moves lead step; each patch's pixels share its window weights
            frame = advect(frame, weights[:, step], block=self.patch_size)  # (B, C, H, W)
            out.append(frame)
        return torch.stack(out, dim=1)  # (B, T_out, C, H, W)


def _coordinates(x: Tensor) -> Tensor:
    """Each cell's position, ``y`` and ``x`` from -1 to 1, as ``(B, T, 2, H, W)`` channels
    for ``x`` ``(B, T, C, H, W)``."""
    h, w = x.shape[-2:]
    gy = torch.linspace(-1.0, 1.0, h, device=x.device, dtype=x.dtype)[:, None].expand(h, w)
    gx = torch.linspace(-1.0, 1.0, w, device=x.device, dtype=x.dtype)[None, :].expand(h, w)
    return torch.stack((gy, gx)).expand(*x.shape[:2], 2, h, w)


def _shift_matrix(weights: Tensor, size: int) -> Tensor:
    """``(..., 2R+1)`` weights of displacements ``-R..R`` -> ``(..., size, size)`` matrices
    ``S`` with ``(S @ v)[i] = sum_d weights[d] v[i - d]`` (zeros from outside)."""
    radius = weights.shape[-1] // 2
    i = torch.arange(size, device=weights.device)
    offset = i[:, None] - i[None, :] + radius  # (size, size): index of displacement i - j
    inside = (offset >= 0) & (offset <= 2 * radius)
    return weights[..., offset.clamp(0, 2 * radius)] * inside


def shift_costs(x: Tensor, radius: int, spans: int) -> Tensor:
    """Global block matching: the cost of every whole-frame shift of the recent past.

    For ``n = 1..spans`` and every displacement ``d = (dy, dx)`` in ``-R..R``: the sum of
    squared differences between the last frame and the frame ``n`` steps before it moved by
    ``d``, relative to the last frame's energy: 0 is a perfect match, 2 no overlap (zeros
    outside the frame). Computed with FFTs, without gradient (it depends on the data only).
    ``(B, T, C, H, W)`` -> ``(B, spans, 2R+1, 2R+1)``, index ``[..., R + dy, R + dx]``.
    """
    h, w = x.shape[-2:]
    k = 2 * radius + 1
    with torch.no_grad():
        x = x.float().sum(2)  # (B, T, H, W)
        last = x[:, -1]
        past = x[:, -1 - spans:-1].flip(1)  # (B, spans, H, W): 1, 2, ... steps before the last
        size = (h + k - 1, w + k - 1)
        f_last = torch.fft.rfft2(last[:, None], s=size)  # (B, 1, ...): one per sample
        f_past, f_past2 = torch.fft.rfft2(past, s=size), torch.fft.rfft2(past**2, s=size)
        f_ones = torch.fft.rfft2(torch.ones(h, w, device=x.device), s=size)
        # cross-correlation at lag d, sum_i a[i - d] b[i], zero-padded so that lags -R..R
        # do not wrap around; they sit at both ends of the FFT grid, rolled together below
        corr = torch.fft.irfft2(f_last * f_past.conj(), s=size)
        energy = torch.fft.irfft2(f_ones * f_past2.conj(), s=size)
        cost = energy - 2 * corr  # + |last|^2, the same for every d
        cost = torch.roll(cost, (radius, radius), (-2, -1))[..., :k, :k]  # (B, spans, k, k)
        energy_last = (last**2).sum((-2, -1))[:, None, None, None]
        return (cost + energy_last) / (energy_last + 1e-6)  # (B, spans, k, k)


def past_shift_scores(x: Tensor, radius: int, leads: int) -> Tensor:
    """How well each whole-frame shift repeats the past motion: global block matching.

    For lead ``n`` and every displacement ``d`` in ``-R..R`` along each axis: minus the
    :func:`shift_costs` of moving the frame ``n`` steps before the last by ``d`` (the best
    over the other axis), so 0 is a perfect match and -2 no overlap. That is the shift
    lead ``n`` gets if the motion of the last ``n`` steps repeats. Leads beyond the inputs
    use the longest span, scaled (constant velocity). Without gradient.
    ``(B, T_in, C, H, W)`` -> ``(B, leads, 2 * (2R+1))``, ``y`` then ``x``.
    """
    k = 2 * radius + 1
    spans = min(leads, x.shape[1] - 1)
    with torch.no_grad():
        cost = shift_costs(x, radius, spans)  # (B, spans, k, k)
        # per axis: the best match over the other axis
        marginal = torch.cat((cost.amin(-1), cost.amin(-2)), dim=-1)  # (B, spans, 2k)
        if leads > spans:  # constant velocity: lead n moved n / spans times the longest span
            d = torch.arange(-radius, radius + 1, device=x.device, dtype=marginal.dtype)
            scale = spans / torch.arange(spans + 1, leads + 1, device=x.device, dtype=marginal.dtype)
            pos = (radius + d[None] * scale[:, None]).clamp(0, k - 1)  # (extra, k) index into -R..R
            lo = pos.floor().long().clamp(max=k - 2)
            frac = pos - lo
            longest = marginal[:, -1].unflatten(-1, (2, k))  # (B, 2, k)
            extra = longest[..., lo] * (1 - frac) + longest[..., lo + 1] * frac  # (B, 2, extra, k)
            marginal = torch.cat((marginal, extra.permute(0, 2, 1, 3).flatten(-2)), dim=1)
    return -marginal  # (B, leads, 2k)


def _best_shift(cost: Tensor, radius: int) -> Tensor:
    """The sub-pixel displacement ``(dx, dy)`` of the lowest cost: ``(N, k, k)`` ->
    ``(N, 2)``, refined by a parabola through the neighbouring costs along each axis (at the
    edge of the search window it stays on the whole pixel).
    """
    k = 2 * radius + 1
    best = cost.flatten(1).argmin(1)  # (N,)
    iy, ix = best // k, best % k
    rows = torch.arange(cost.shape[0], device=cost.device)

    def refine(i: Tensor, along_y: bool) -> Tensor:
        """Sub-pixel offset of the minimum at index ``i`` along one axis."""
        lo, hi = (i - 1).clamp(0, k - 1), (i + 1).clamp(0, k - 1)
        at = (lambda j: cost[rows, j, ix]) if along_y else (lambda j: cost[rows, iy, j])
        c0, cm, cp = at(i), at(lo), at(hi)
        inner = (i > 0) & (i < k - 1)  # at the edge of the search window: no parabola
        curvature = cm - 2 * c0 + cp
        offset = torch.where(curvature > 1e-9, 0.5 * (cm - cp) / curvature.clamp_min(1e-9),
                             torch.zeros_like(c0))
        return i.to(cost.dtype) + torch.where(inner, offset.clamp(-0.5, 0.5), torch.zeros_like(c0))

    return torch.stack((refine(ix, False), refine(iy, True)), dim=1) - radius  # (N, 2): dx, dy


def global_velocity(x: Tensor, radius: int, span: int = 1) -> Tensor:
    """The whole frame's velocity over the last ``span`` steps, by global block matching.

    The displacement with the lowest :func:`shift_costs` between the last frame and the one
    ``span`` steps before it, refined to a fraction of a pixel by a parabola through the
    neighbouring costs along each axis, divided by ``span``. Without gradient.
    ``(B, T, C, H, W)`` -> ``(B, 2)`` in pixels per step, ``(dx, dy)``: x to the right, y down
    (the order of :func:`nowcast.models.warp.warp`).
    """
    if not 1 <= span < x.shape[1]:
        raise ValueError(f"span must be in 1..{x.shape[1] - 1} (T - 1), got {span}")
    with torch.no_grad():
        # the two frames matched only (x[:, -1 - span] and x[:, -1]): one cost volume, not span
        cost = shift_costs(x[:, -1 - span::span], radius, 1)[:, 0]  # (B, k, k)
        return _best_shift(cost, radius) / span  # (B, 2)


def regional_velocity(x: Tensor, radius: int, span: int, tile: int, stride: int | None = None,
                      min_wet: float = 0.05) -> Tensor:
    """A smooth velocity field from block matching on overlapping tiles (TREC, Rinehart 1979).

    The frame is cut into ``tile`` x ``tile`` tiles every ``stride`` pixels (the last row and
    column of tiles padded with dry pixels); each tile's velocity is found as
    :func:`global_velocity` finds the frame's (the same costs and sub-pixel minimum). A tile with under ``min_wet`` of its pixels wet in
    the last frame has too little rain to match; its velocity is drawn towards the whole
    frame's, in proportion. The tile velocities, placed at the tiles' centres, are
    interpolated bilinearly to every pixel (held constant beyond the outermost centres). A
    frame no larger than one tile (a training crop, say) gets the whole frame's velocity
    everywhere, exactly :func:`global_velocity`. Without gradient.
    ``(B, T, C, H, W)`` -> ``(B, 2, H, W)`` in pixels per step, ``(dx, dy)``.
    """
    b, _, _, h, w = x.shape
    if tile < 2 * radius + 1:
        raise ValueError(f"tile must be at least the search window 2 * radius + 1 = {2 * radius + 1}, got {tile}")
    stride = tile // 2 if stride is None else int(stride)
    if not 1 <= stride <= tile:
        raise ValueError(f"stride must be in 1..tile ({tile}), got {stride}")
    if min_wet < 0:
        raise ValueError(f"min_wet must be >= 0, got {min_wet}")
    whole = global_velocity(x, radius, span)  # (B, 2)
    if h <= tile and w <= tile:
        return whole[:, :, None, None].expand(b, 2, h, w)
    with torch.no_grad():
        ny, nx = (-(-max(n - tile, 0) // stride) + 1 for n in (h, w))
        frames = x[:, -1 - span::span].float().sum(2)  # (B, 2, H, W): the two frames matched
        frames = F.pad(frames, (0, (nx - 1) * stride + tile - w, 0, (ny - 1) * stride + tile - h))
        tiles = frames.unfold(2, tile, stride).unfold(3, tile, stride)  # (B, 2, ny, nx, tile, tile)
        tiles = tiles.permute(0, 2, 3, 1, 4, 5).reshape(b * ny * nx, 2, 1, tile, tile)
        cost = shift_costs(tiles, radius, 1)[:, 0]  # (B*ny*nx, k, k)
        local = (_best_shift(cost, radius) / span).view(b, ny, nx, 2)  # (B, ny, nx, 2)
        wet = (tiles[:, 1] > 0).float().mean((1, 2, 3)).view(b, ny, nx, 1)  # last frame's
        trust = (wet / min_wet).clamp(max=1.0) if min_wet > 0 else torch.ones_like(wet)
        field = trust * local + (1 - trust) * whole[:, None, None, :]  # (B, ny, nx, 2)
        # pixel p lies at tile index (p - (tile - 1) / 2) / stride; grid_sample's [-1, 1] over
        # the centres with align_corners=True, border beyond them
        def axis(n_px: int, n_tiles: int) -> Tensor:
            if n_tiles == 1:
                return torch.zeros(n_px, device=x.device)
            idx = (torch.arange(n_px, device=x.device, dtype=torch.float32) - (tile - 1) / 2) / stride
            return 2 * idx / (n_tiles - 1) - 1

        gy, gx = torch.meshgrid(axis(h, ny), axis(w, nx), indexing="ij")
        grid = torch.stack((gx, gy), dim=-1).expand(b, h, w, 2)  # (B, H, W, 2): x, y
        out = F.grid_sample(field.permute(0, 3, 1, 2), grid, mode="bilinear", padding_mode="border",
                            align_corners=True)  # (B, 2, H, W)
    return out.to(x.dtype)


def _gaussian_blur(x: Tensor, sigma: float) -> Tensor:
    """Separable Gaussian blur of ``(N, C, H, W)`` with the edges repeated (kernel to 3 sigma)."""
    if sigma <= 0:
        return x
    r = max(1, int(3 * sigma + 0.5))
    t = torch.arange(-r, r + 1, device=x.device, dtype=x.dtype)
    kernel = torch.exp(-0.5 * (t / sigma) ** 2)
    kernel = kernel / kernel.sum()
    n, c, h, w = x.shape
    y = F.pad(x.reshape(n * c, 1, h, w), (r, r, r, r), mode="replicate")
    y = F.conv2d(F.conv2d(y, kernel.view(1, 1, 1, -1)), kernel.view(1, 1, -1, 1))
    return y.view(n, c, h, w)


def _gradient(f: Tensor) -> tuple[Tensor, Tensor]:
    """Central differences ``(d/dx, d/dy)`` of ``(N, 1, H, W)``, one-sided at the edges."""
    gx = F.pad(f, (1, 1, 0, 0), mode="replicate")
    gy = F.pad(f, (0, 0, 1, 1), mode="replicate")
    return 0.5 * (gx[..., 2:] - gx[..., :-2]), 0.5 * (gy[..., 2:, :] - gy[..., :-2, :])


#: How :func:`refine_velocity` counts the inputs (see its ``weighting``).
REFINE_WEIGHTINGS = ("intensity", "velocity")


def refine_velocity(x: Tensor, velocity: Tensor, window: float, iterations: int = 2,
                    levels: Sequence[int] = (2, 1), regularisation: float = 0.01,
                    presmooth: float = 1.0, weighting: str = "intensity") -> Tensor:
    """A dense velocity field: ``velocity`` refined by Lucas-Kanade in Gaussian windows.

    Block matching (:func:`global_velocity`, :func:`regional_velocity`) finds large
    displacements robustly but gives one velocity per frame or tile. Starting from it, each
    pixel's velocity is corrected by least squares on the linearised matching error of
    every input against the last one (Lucas and Kanade 1981, in the dense form of Bruhn et
    al. 2005): with input ``t`` moved by ``s = T - 1 - t`` steps of the current velocity,
    ``W_s(p) = x_t(p - s v(p))``, the correction ``dv`` minimises
    ``sum_s G_sigma * (s grad . dv - (W_s - x_last))^2`` in a Gaussian window of standard
    deviation ``window`` px around each pixel, ``grad`` the mean gradient of ``W_s`` and
    the last frame. A term ``regularisation`` x (the frame's mean gradient energy) x
    ``|dv|^2`` keeps the start where the window holds no edge (dry ground, uniform rain).
    ``weighting`` says how the inputs count. ``"intensity"``: as written, the matching
    error itself, in which input ``t``'s equation grows with its ``s`` steps, so the oldest
    input weighs ``s^2`` times the newest. ``"velocity"``: each input's equation divided by
    ``s``, so every input's estimate of the velocity (its displacement over ``s`` steps)
    counts the same and the newest motion is not outweighed by the oldest.
    Coarse to fine over ``levels`` (frames averaged over ``L x L`` pixels, the window
    ``window / L``), ``iterations`` corrections on each. The windowed sums are taken on a
    grid about a quarter of the window apart and interpolated back (bilinear). Without
    gradient. ``(B, T, C, H, W)`` (channels summed) and ``(B, 2, H|1, W|1)`` in px per step
    -> ``(B, 2, H, W)`` in px per step, ``(dx, dy)``.
    """
    b, t, _, h, w = x.shape
    if t < 2:
        raise ValueError(f"refining a velocity needs at least 2 inputs, got {t}")
    if window <= 0 or iterations < 1 or regularisation <= 0:
        raise ValueError(f"window, iterations and regularisation must be > 0, got {window}, {iterations}, "
                         f"{regularisation}")
    if weighting not in REFINE_WEIGHTINGS:
        raise ValueError(f"weighting must be 'intensity' or 'velocity', got {weighting!r}")
    if velocity.dim() != 4 or velocity.shape[:2] != (b, 2):
        raise ValueError(f"velocity must be (B, 2, H|1, W|1) with B={b}, got {tuple(velocity.shape)}")
    # float32 throughout: under bf16 autocast the windowed sums and the 2x2 solve would
    # keep 8 bits of mantissa
    with torch.no_grad(), torch.autocast(x.device.type, enabled=False):
        frames = x.float().sum(2)  # (B, T, H, W)
        v = velocity.float().expand(b, 2, h, w)
        for level in levels:
            f = frames if level == 1 else F.avg_pool2d(frames, level, ceil_mode=True)
            f = _gaussian_blur(f, presmooth)  # (B, T, h_l, w_l)
            size = tuple(f.shape[-2:])
            vl = v if level == 1 else F.interpolate(v, size=size, mode="bilinear", align_corners=False) / level
            last = f[:, -1:]
            last_x, last_y = _gradient(last)
            sigma = window / level
            pool = max(1, int(sigma // 4))  # windowed sums on a grid ~sigma / 4 apart
            for _ in range(iterations):
                terms = []
                for s in range(1, t):
                    moved = warp(f[:, t - 1 - s:t - s], (s * vl)[:, None], "border")[:, 0]  # (B, 1, h_l, w_l)
                    gx, gy = _gradient(moved)
                    gx, gy = 0.5 * (gx + last_x), 0.5 * (gy + last_y)
                    e = moved - last
                    # normal equations of s grad . dv = e, times s^2 ("intensity") or 1
                    k = s * s if weighting == "intensity" else 1
                    terms.append(torch.cat((k * gx * gx, k * gx * gy, k * gy * gy,
                                            k / s * gx * e, k / s * gy * e), dim=1))  # (B, 5, h_l, w_l)
                sums = torch.stack(terms).sum(0)
                if pool > 1:
                    sums = F.avg_pool2d(sums, pool, ceil_mode=True)
                axx, axy, ayy, bx, by = _gaussian_blur(sums, sigma / pool).unbind(1)  # (B, h', w') each
                damp = regularisation * (axx + ayy).mean((-2, -1), keepdim=True) + 1e-9
                axx, ayy = axx + damp, ayy + damp
                det = axx * ayy - axy * axy
                step = torch.stack(((ayy * bx - axy * by) / det, (axx * by - axy * bx) / det), dim=1)
                if pool > 1:
                    step = F.interpolate(step, size=size, mode="bilinear", align_corners=False)
                vl = vl + step
            v = vl if level == 1 else F.interpolate(vl * level, size=(h, w), mode="bilinear", align_corners=False)
    return v.to(x.dtype)


def _upsample(y: Tensor, factor: Sequence[int]) -> Tensor:
    """Nearest-neighbour upsampling of ``(B, T, C, H, W)`` by ``(t, h, w)``."""
    if tuple(factor) == (1, 1, 1):
        return y
    y = F.interpolate(y.transpose(1, 2), scale_factor=tuple(float(f) for f in factor), mode="nearest")
    return y.transpose(1, 2)  # (B, T*t, C, H*h, W*w)


class Shi2015(nn.Module):
    """The flat encoding-forecasting ConvLSTM of Shi et al. 2015.

    The paper's Moving-MNIST model is ``hidden_channels=[128, 64, 64]``,
    ``kernel_size=5``, 10 -> 10 frames, predicting 16x16 patches of 4x4 pixels
    (``patch_size=4``).

    Parameters are as in :class:`EncoderForecaster`; there is no pooling.
    """

    def __init__(
        self,
        in_channels: int = 1,
        out_channels: int = 1,
        hidden_channels: Sequence[int] = (128, 64, 64),
        kernel_size: int | Sequence[int] = 5,
        input_steps: int = 10,
        output_steps: int = 10,
        frame_size: int | Sequence[int] | None = (64, 64),
        patch_size: int = 4,
        output_activation: str = "sigmoid",
        peephole: bool = False,
        checkpoint_steps: int = 0,
    ) -> None:
        super().__init__()
        hidden = [int(h) for h in hidden_channels]
        set_flat_io(self, in_channels, out_channels, input_steps, output_steps, frame_size, patch_size)
        kernels = kernel_size if isinstance(kernel_size, int) else list(kernel_size)
        self.encoder = ConvLSTM2D(in_channels * patch_size**2, hidden, kernels,
                                  return_state=True, checkpoint_steps=checkpoint_steps,
                                  peephole=peephole)
        self.forecaster = ConvLSTM2D(1, hidden, kernels, return_all_layers=True,
                                     checkpoint_steps=checkpoint_steps, peephole=peephole)
        # "all the states in the forecasting network are concatenated and fed into a
        # 1 x 1 convolutional layer to generate the final prediction" (Shi et al. 2015)
        self.head = nn.Conv2d(sum(hidden), out_channels * patch_size**2, kernel_size=1)
        self.activation = make_output_activation(output_activation)

    def forward(self, x: Tensor) -> Tensor:
        """``(B, T_in, C, H, W)`` -> forecast ``(B, T_out, C_out, H, W)``."""
        _check_input(x, self.in_channels, self.input_steps, self.spatial_divisor)
        b = x.shape[0]
        x = to_patches(x, self.patch_size)  # (B, T, C*p*p, H/p, W/p)
        _, states = self.encoder(x)
        hh, ww = states[0][0].shape[-2:]
        zeros = x.new_zeros(b, self.output_steps, 1, hh, ww)  # the forecaster has no input
        ys = self.forecaster(zeros, initial_state=states)  # list of (B, T_out, Ch_l, H/p, W/p)
        y = torch.cat(ys, dim=2)  # (B, T_out, sum Ch, H/p, W/p)
        out = self.head(y.flatten(0, 1)).unflatten(0, (b, self.output_steps))  # (B, T_out, C_out*p*p, H/p, W/p)
        return self.activation(from_patches(out, self.patch_size))  # (B, T_out, C_out, H, W)
