"""Networks built from :mod:`nowcast.nn` layers; pure torch, no Lightning."""

from nowcast.models.encoder_forecaster import EncoderForecaster, Shi2015, make_output_activation

__all__ = ["EncoderForecaster", "Shi2015", "make_output_activation"]
