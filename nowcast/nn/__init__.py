"""Pure-torch layers: ConvLSTM cell and sequence layer, 3D pooling."""

from nowcast.nn.conv import get_cpu_conv_backend, set_cpu_conv_backend
from nowcast.nn.convlstm import (
    ConvLSTM2D,
    ConvLSTMCell,
    MaxPool3D,
    conv_output_size,
    get_activation,
)

__all__ = [
    "ConvLSTM2D",
    "ConvLSTMCell",
    "MaxPool3D",
    "conv_output_size",
    "get_activation",
    "get_cpu_conv_backend",
    "set_cpu_conv_backend",
]
