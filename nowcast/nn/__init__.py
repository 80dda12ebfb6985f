"""Pure-torch layers: ConvLSTM cell and sequence layer, 3D pooling, local correlation.

Fast paths are switched by :data:`nowcast.nn.backend.settings` (see
:mod:`nowcast.nn.backend`); :mod:`nowcast.nn.cpu` says what this CPU runs natively.
"""

from nowcast.nn import backend
from nowcast.nn.backend import tune
from nowcast.nn.conv import get_cpu_conv_backend, set_cpu_conv_backend
from nowcast.nn.convlstm import (
    ConvLSTM2D,
    ConvLSTMCell,
    conv_output_size,
    get_activation,
)
from nowcast.nn.correlation import LocalCorrelation, correlation_displacements, local_correlation
from nowcast.nn.cpu import cpu_capabilities
from nowcast.nn.pooling import MaxPool3D

__all__ = [
    "ConvLSTM2D",
    "ConvLSTMCell",
    "LocalCorrelation",
    "MaxPool3D",
    "backend",
    "conv_output_size",
    "correlation_displacements",
    "cpu_capabilities",
    "get_activation",
    "get_cpu_conv_backend",
    "local_correlation",
    "set_cpu_conv_backend",
    "tune",
]
