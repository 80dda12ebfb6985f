"""``train(cfg)``: build data, model, callbacks, loggers and trainer from a Hydra config
and fit. Returns the final metrics so that tests and sweeps can use them."""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from nowcast import cluster
from nowcast.checkpoints import check_compatible, load_checkpoint

log = logging.getLogger(__name__)


def _instantiate_group(cfg: DictConfig | None) -> list[Any]:
    """Instantiate every entry of a callbacks/logger group (entries may be null)."""
    if not cfg:
        return []
    return [instantiate(c) for c in cfg.values() if c is not None and "_target_" in c]


def _scalar_metrics(metrics: dict[str, Any]) -> dict[str, float]:
    out = {}
    for k, v in metrics.items():
        if torch.is_tensor(v) and v.numel() == 1:
            out[k] = float(v)
        elif isinstance(v, (int, float)):
            out[k] = float(v)
    return out


def train(cfg: DictConfig) -> dict[str, float]:
    """Train (and optionally test) the model described by ``cfg``.

    Returns
    -------
    The trainer's final logged metrics as floats (``val/loss``, ``val/mse``,
    ``val/persistence/mse``, ... and ``test/...`` when ``cfg.test``).
    """
    cluster.log_on_rank_zero_only()  # DDP: one train.log per run, written by rank 0
    L.seed_everything(cfg.seed, workers=True)
    output_dir = Path(cfg.paths.output_dir)

    log.info("data: %s", cfg.data._target_)
    datamodule: L.LightningDataModule = instantiate(cfg.data)
    log.info("model: %s around %s", cfg.model._target_, cfg.model.net._target_)
    model: L.LightningModule = instantiate(cfg.model)
    run_config = OmegaConf.to_container(cfg, resolve=True)
    run_config.pop("hydra", None)  # present when composed with return_hydra_config (tests)
    model.run_config = run_config
    if cfg.get("compile"):
        model.net.compile()  # in place: state-dict keys stay the same as uncompiled

    # A requeued SLURM job resumes from the checkpoint it saved before stopping.
    ckpt_path = cluster.resume_path(output_dir, cfg.get("ckpt_path"),
                                    fresh_if_missing=cfg.get("resume_fresh_if_missing", False))
    if ckpt_path:
        # Fail here with a readable message rather than deep inside Lightning.
        check_compatible(model, load_checkpoint(ckpt_path), ckpt_path)
        log.info("resuming from %s", ckpt_path)

    callbacks = _instantiate_group(cfg.get("callbacks"))
    loggers = _instantiate_group(cfg.get("logger"))
    cluster.check_devices(cfg.trainer.accelerator, cfg.trainer.devices, cfg.trainer.get("num_nodes", 1))
    trainer: L.Trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)
    cluster.set_per_device_batch_size(datamodule, trainer)  # data.batch_size is global

    try:
        trainer.fit(model, datamodule=datamodule, ckpt_path=ckpt_path)
    except FloatingPointError:
        ckpts = sorted(output_dir.glob("checkpoints/*.ckpt"))
        log.error(
            "training stopped on a non-finite loss; checkpoints written before it are kept: %s",
            ", ".join(str(p) for p in ckpts) or "none yet",
        )
        raise
    metrics = _scalar_metrics(trainer.callback_metrics)

    if cfg.get("test"):
        best = getattr(trainer.checkpoint_callback, "best_model_path", "") or None
        trainer.test(model, datamodule=datamodule, ckpt_path=best, weights_only=False)
        metrics.update(_scalar_metrics(trainer.callback_metrics))

    if trainer.is_global_zero:
        _summarise(metrics, trainer, output_dir)
    return metrics


def _summarise(metrics: dict[str, float], trainer: L.Trainer, output_dir: Path) -> None:
    """The run's last lines: model vs persistence, and where everything is."""
    for stage, name in (("val", "validation"), ("test", "test")):
        model_mse = metrics.get(f"{stage}/mse")
        base_mse = metrics.get(f"{stage}/persistence/mse")
        if model_mse is None or base_mse is None or math.isnan(base_mse):
            continue
        gain = 100.0 * (1.0 - model_mse / base_mse) if base_mse > 0 else float("nan")
        verdict = "better than" if model_mse < base_mse else "NOT better than"
        change = f"{gain:.1f}% lower error" if gain >= 0 else f"{-gain:.1f}% higher error"
        log.info(
            "%s MSE: model %.5f vs persistence %.5f -> the model is %s persistence (%s)",
            name, model_mse, base_mse, verdict, change,
        )
        for key in (f"{stage}/ssim", f"{stage}/mse_frame", f"{stage}/csi_1mmh"):
            if key in metrics:
                base = metrics.get(key.replace(f"{stage}/", f"{stage}/persistence/"), float("nan"))
                log.info("%s: model %.4f vs persistence %.4f", key, metrics[key], base)
    ckpt = trainer.checkpoint_callback
    if ckpt is not None:
        log.info("best checkpoint: %s", ckpt.best_model_path or "(none)")
        log.info("last checkpoint: %s", Path(ckpt.dirpath or output_dir) / "last.ckpt")
    for logger in trainer.loggers:
        log.info("metrics (%s): %s", type(logger).__name__, logger.log_dir or logger.save_dir)
    log.info("plots: %s", output_dir / "plots")
    log.info("evaluate with: python evaluate.py ckpt_path=%s",
             (ckpt.best_model_path if ckpt is not None and ckpt.best_model_path else "<checkpoint>"))


def _config_dir() -> str:
    """``configs/`` beside the package (source checkout / editable install) or in the cwd."""
    here = Path(__file__).resolve().parents[1] / "configs"
    return str(here if here.is_dir() else Path.cwd() / "configs")


@hydra.main(version_base="1.3", config_path=_config_dir(), config_name="train")
def main(cfg: DictConfig) -> float | None:
    """Console entry point ``nowcast-train`` (same as ``python train.py``)."""
    metrics = train(cfg)
    return metrics.get(cfg.get("optimized_metric", "val/loss"))
