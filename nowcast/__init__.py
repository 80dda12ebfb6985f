"""nowcast: ConvLSTM precipitation nowcasting with Hydra + Lightning."""

__version__ = "0.1.0"

from nowcast import run_folders  # noqa: E402,F401 - Hydra resolvers and stores for configs/
