"""The autoregressive ConvLSTM stack (the "ConvLSTM" of PredRNN and OpenSTL).

One stack of ConvLSTM layers reads the input frames, predicts the next frame from its
last hidden state, and then reads its own predictions to forecast the frames after that.
Unlike the encoder-forecaster, the same weights read and forecast, and every forecast
step sees the previous frame: what the network has to learn is a one-step motion
operator, which it learns from far fewer sequences than the encoder-forecaster needs to
unroll a whole future from a state.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from nowcast.models.encoder_forecaster import (
    _check_input,
    from_patches,
    make_output_activation,
    set_flat_io,
    to_patches,
)
from nowcast.nn import ConvLSTM2D


class ConvLSTMNet(nn.Module):
    """Autoregressive ConvLSTM: ``(B, T_in, C, H, W)`` -> ``(B, T_out, C, H, W)``.

    Parameters
    ----------
    in_channels, out_channels
        Channels of the frames; equal, since forecasts are fed back as inputs.
    hidden_channels, kernel_size
        The stack, as in :class:`~nowcast.nn.ConvLSTM2D` (OpenSTL's Moving-MNIST model is
        ``[128, 128, 128, 128]`` with 5x5 kernels).
    input_steps, output_steps
        ``T_in`` and ``T_out``.
    frame_size
        ``(H, W)`` checked for divisibility by ``patch_size`` at construction (``None``:
        no check).
    patch_size
        Space-to-depth factor: frames are cut into ``p x p`` patches stacked as channels.
    output_activation
        ``sigmoid`` for [0, 1] images, ``softplus``/``relu``/``identity`` for rain.
    peephole, checkpoint_steps
        Passed to :class:`~nowcast.nn.ConvLSTM2D` (checkpointing applies to the reading
        of the input frames).
    """

    def __init__(
        self,
        in_channels: int = 1,
        out_channels: int = 1,
        hidden_channels: Sequence[int] = (128, 128, 128, 128),
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
        if in_channels != out_channels:
            raise ValueError(
                f"ConvLSTMNet feeds its forecasts back as inputs: in_channels ({in_channels}) "
                f"must equal out_channels ({out_channels})"
            )
        set_flat_io(self, in_channels, out_channels, input_steps, output_steps, frame_size, patch_size)
        kernels = kernel_size if isinstance(kernel_size, int) else list(kernel_size)
        hidden = [int(c) for c in hidden_channels]
        self.stack = ConvLSTM2D(in_channels * patch_size**2, hidden, kernels, return_state=True,
                                checkpoint_steps=checkpoint_steps, peephole=peephole)
        self.head = nn.Conv2d(hidden[-1], out_channels * patch_size**2, kernel_size=1)
        self.activation = make_output_activation(output_activation)

    def forward(self, x: Tensor, targets: Tensor | None = None, teacher_forcing: float = 0.0) -> Tensor:
        """``(B, T_in, C, H, W)`` -> forecast ``(B, T_out, C, H, W)``.

        In training, ``targets`` ``(B, T_out, C, H, W)`` with ``teacher_forcing`` ``p``
        feeds the true previous frame instead of the forecast, per sequence and step with
        probability ``p`` (scheduled sampling, Bengio et al. 2015). ``p = 1`` reads the
        whole true sequence in one pass of the fused layers; ``p = 0`` (the default, and
        always at inference) runs free.
        """
        _check_input(x, self.in_channels, self.input_steps, self.spatial_divisor)
        if teacher_forcing > 0 and targets is None:
            raise ValueError("teacher_forcing > 0 needs the targets")
        if teacher_forcing >= 1:
            seq = torch.cat([x, targets[:, :-1]], dim=1)  # (B, T_in + T_out - 1, C, H, W)
            hs, _ = self.stack(to_patches(seq, self.patch_size))
            hs = hs[:, self.input_steps - 1:]  # (B, T_out, Ch, h, w): each predicts the next frame
            b = hs.shape[0]
            out = self.activation(self.head(hs.flatten(0, 1))).unflatten(0, (b, -1))
            return from_patches(out, self.patch_size)
        # Read all input frames at once: the stack's fused path, one batched input conv.
        hs, states = self.stack(to_patches(x, self.patch_size))  # hs: (B, T_in, Ch, h, w)
        truth = to_patches(targets, self.patch_size) if teacher_forcing > 0 else None
        frame = self.activation(self.head(hs[:, -1]))  # (B, C*p*p, h, w): frame T_in + 1
        forecasts = [frame]
        for step in range(self.output_steps - 1):
            inp = frame
            if truth is not None:
                use_truth = torch.rand(frame.shape[0], 1, 1, 1, device=frame.device) < teacher_forcing
                inp = torch.where(use_truth, truth[:, step], frame)
            for layer, cell in enumerate(self.stack.cells):
                states[layer] = cell(inp, states[layer])
                inp = states[layer][0]  # h of this layer is the next layer's input
            frame = self.activation(self.head(inp))
            forecasts.append(frame)
        return from_patches(torch.stack(forecasts, dim=1), self.patch_size)  # (B, T_out, C, H, W)
