"""Evaluate a checkpoint against baselines: ``python evaluate.py ckpt_path=<ckpt>``.

Model and data are rebuilt from the config stored in the checkpoint; see README.md.
"""

import hydra
from omegaconf import DictConfig

from nowcast.evaluate import evaluate


@hydra.main(version_base="1.3", config_path="configs", config_name="evaluate")
def main(cfg: DictConfig) -> None:
    evaluate(cfg)


if __name__ == "__main__":
    main()
