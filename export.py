"""Export a checkpoint for deployment: ``python export.py ckpt_path=<ckpt> format=onnx``.

Writes the network with its value transform (mm/h in, mm/h out) and verifies it; see README.md.
"""

import hydra
from omegaconf import DictConfig

from nowcast.export import export


@hydra.main(version_base="1.3", config_path="configs", config_name="export")
def main(cfg: DictConfig) -> None:
    export(cfg)


if __name__ == "__main__":
    main()
