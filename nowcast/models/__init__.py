"""Networks built from :mod:`nowcast.nn` layers; pure torch, no Lightning."""

from nowcast.models.autoregressive import ConvLSTMNet
from nowcast.models.encoder_forecaster import EncoderForecaster, Shi2015, make_output_activation
from nowcast.models.hybrid import ExtrapolationResidual
from nowcast.models.motion import MotionNowcaster

__all__ = ["ConvLSTMNet", "EncoderForecaster", "ExtrapolationResidual", "MotionNowcaster", "Shi2015", "make_output_activation"]
