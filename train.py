"""Train a nowcasting model: ``python train.py [group=option ...] [key=value ...]``.

Configs live in ``configs/`` (entry point ``configs/train.yaml``); see README.md.
"""

import hydra
from omegaconf import DictConfig

from nowcast.train import train


@hydra.main(version_base="1.3", config_path="configs", config_name="train")
def main(cfg: DictConfig) -> float | None:
    metrics = train(cfg)
    return metrics.get(cfg.get("optimized_metric", "val/loss"))


if __name__ == "__main__":
    main()
