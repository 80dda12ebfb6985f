"""Nowcast from the newest radar files: ``python predict.py ckpt_path=<ckpt> input=<dir>``.

Writes CF netCDF nowcasts and a PNG panel; ``watch=true`` keeps polling; see README.md.
"""

import hydra
from omegaconf import DictConfig

from nowcast.predict import predict


@hydra.main(version_base="1.3", config_path="configs", config_name="predict")
def main(cfg: DictConfig) -> None:
    predict(cfg)


if __name__ == "__main__":
    main()
