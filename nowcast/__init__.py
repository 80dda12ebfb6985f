"""nowcast: ConvLSTM precipitation nowcasting with Hydra + Lightning."""

__version__ = "0.1.0"
