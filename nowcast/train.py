"""``train(cfg)``: build data, model, callbacks, loggers and trainer from a Hydra config
and fit. Returns the final metrics so that tests and sweeps can use them.

Resuming (``ckpt_path=<run>/checkpoints/last.ckpt`` or ``resume=<run folder>``) continues
the run with the config stored in its checkpoint, checked like any untrusted config
(:mod:`nowcast.safe_config`), plus the overrides on the command line, in the run's own
folder (see :func:`resumed_config`).
"""

from __future__ import annotations

import copy
import logging
import math
import netrc
import os
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict

from nowcast import cluster
from nowcast.checkpoints import (
    check_compatible,
    instantiate_trusted,
    load_checkpoint,
    stored_config,
)
from nowcast.io_utils import AtomicCheckpointIO
from nowcast.run_folders import config_dir
from nowcast.safe_config import to_plain

log = logging.getLogger(__name__)


def _instantiate_group(cfg: DictConfig | None, build: Callable[..., Any] = instantiate) -> list[Any]:
    """Instantiate every entry of a callbacks/logger group (entries may be null)."""
    if not cfg:
        return []
    return [build(c) for c in cfg.values() if c is not None and "_target_" in c]


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
    resume_from = _resume_checkpoint(cfg)
    build: Callable[..., Any] = instantiate
    if resume_from is not None:
        ckpt = load_checkpoint(resume_from)
        if "nowcast_config" in ckpt:
            cfg = resumed_config(cfg, resume_from, ckpt)
            # Everything below comes from the checkpoint's stored config: untrusted.
            build = partial(instantiate_trusted, source=f"checkpoint {resume_from}")
        else:
            log.warning("%s holds no stored nowcast config (not written by nowcast.train): "
                        "resuming with the config as composed now", resume_from)
        del ckpt
    check_wandb(cfg.get("logger"))  # before the (slow) data and model set-up
    warn_without_validation(cfg)
    L.seed_everything(cfg.seed, workers=True)
    output_dir = Path(cfg.paths.output_dir)

    log.info("data: %s", cfg.data._target_)
    datamodule: L.LightningDataModule = build(cfg.data)
    log.info("model: %s around %s", cfg.model._target_, cfg.model.net._target_)
    model: L.LightningModule = build(cfg.model)
    run_config = OmegaConf.to_container(cfg, resolve=True)
    run_config.pop("hydra", None)  # present when composed with return_hydra_config (tests)
    model.run_config = run_config
    if cfg.get("compile"):
        model.net.compile()  # in place: state-dict keys stay the same as uncompiled

    # A requeued SLURM job resumes from the checkpoint it saved before stopping.
    ckpt_path = cluster.resume_path(output_dir, resume_from,
                                    fresh_if_missing=cfg.get("resume_fresh_if_missing", False))
    if ckpt_path:
        # Fail here with a readable message rather than deep inside Lightning.
        check_compatible(model, load_checkpoint(ckpt_path), ckpt_path)
        log.info("resuming from %s", ckpt_path)

    callbacks = _instantiate_group(cfg.get("callbacks"), build)
    loggers = _instantiate_group(cfg.get("logger"), build)
    cluster.check_devices(cfg.trainer.accelerator, cfg.trainer.devices, cfg.trainer.get("num_nodes", 1))
    # Checkpoints are written to a temporary file beside the target and renamed over it:
    # a full disk or a crash never leaves a truncated last.ckpt (nowcast.io_utils).
    trainer: L.Trainer = build(cfg.trainer, callbacks=callbacks, logger=loggers or False,
                               plugins=[AtomicCheckpointIO()])
    cluster.set_per_device_batch_size(datamodule, trainer)  # data.batch_size is global

    try:
        # weights_only=True: the checkpoint holds tensors and plain containers only
        trainer.fit(model, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
    except FloatingPointError:
        ckpts = sorted(output_dir.glob("checkpoints/*.ckpt"))
        log.error(
            "training stopped on a non-finite loss; checkpoints written before it are kept: %s",
            ", ".join(str(p) for p in ckpts) or "none yet",
        )
        raise
    metrics = _scalar_metrics(trainer.callback_metrics)

    if cfg.get("test") and not _has_test_split(datamodule):
        log.warning("test=true, but the data has no test split (no test_period): "
                    "the test run is skipped; set data.test_period to score one")
    elif cfg.get("test"):
        best = getattr(trainer.checkpoint_callback, "best_model_path", "") or None
        trainer.test(model, datamodule=datamodule, ckpt_path=best, weights_only=True)
        metrics.update(_scalar_metrics(trainer.callback_metrics))

    if trainer.is_global_zero:
        _summarise(metrics, trainer, output_dir)
    return metrics


def _has_test_split(datamodule) -> bool:
    """False for a datamodule that says it has no test period (radar archives without
    ``test_period``); Moving-MNIST always has one."""
    periods = getattr(datamodule, "split_periods", None)
    if periods is None:
        return True
    return any(split.get("test") for split in periods().values())


# ------------------------------------------------------------------------------ resume
#: Keys of the composed config that stay as composed when resuming (not the stored ones).
COMPOSED_KEYS = ("paths", "hydra", "task_name", "ckpt_path", "resume", "resume_fresh_if_missing")


def _resume_checkpoint(cfg: DictConfig) -> str | None:
    """The checkpoint to continue from: ``ckpt_path``, or the newest of ``resume``'s run
    folder (``hpc_ckpt_<N>.ckpt`` or ``checkpoints/last.ckpt``, by modification time)."""
    resume, ckpt_path = cfg.get("resume"), cfg.get("ckpt_path")
    if resume and ckpt_path and str(resume) != str(ckpt_path):
        raise ValueError(f"give resume={resume} or ckpt_path={ckpt_path}, not both")
    if ckpt_path or not resume:
        return ckpt_path
    path = Path(resume).expanduser()
    if path.is_file():
        return str(path)
    if not path.is_dir():
        raise FileNotFoundError(f"resume={resume}: no such run folder or checkpoint")
    found = [*cluster.hpc_checkpoints(path), path / "checkpoints" / "last.ckpt"]
    found = [p for p in found if p.is_file()]
    if not found:
        raise FileNotFoundError(
            f"resume={resume}: the run folder holds no checkpoint to continue from (no "
            "checkpoints/last.ckpt, no hpc_ckpt_*.ckpt)"
        )
    return str(max(found, key=lambda p: p.stat().st_mtime))


def _command_line_overrides(cfg: DictConfig) -> list[str]:
    if "hydra" in cfg and OmegaConf.select(cfg, "hydra.overrides.task") is not None:
        return list(cfg.hydra.overrides.task)
    from hydra.core.hydra_config import HydraConfig

    return list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []


def resumed_config(cfg: DictConfig, ckpt_path: str | Path, ckpt: dict[str, Any] | None = None) -> DictConfig:
    """The run config to continue from ``ckpt_path``: the one stored in the checkpoint,
    checked (:func:`nowcast.checkpoints.stored_config`), with this command line's
    overrides applied on top (e.g. ``trainer.max_epochs=20`` to train longer).

    ``paths`` (hence the run folder), ``hydra``, ``ckpt_path`` and ``resume`` stay as
    composed now; stored values under the stored run folder are moved to the current one.
    A command-line override that does not name a key of the composed config (an
    ``experiment=...``) is an error: it cannot be told apart from the stored values.
    """
    from hydra.core.override_parser.overrides_parser import OverridesParser

    ckpt = load_checkpoint(ckpt_path) if ckpt is None else ckpt
    stored = copy.deepcopy(stored_config(ckpt, ckpt_path))
    composed = OmegaConf.to_container(cfg, resolve=True)
    parser = OverridesParser.create()
    for line in _command_line_overrides(cfg):
        override = parser.parse_override(line)
        key = override.key_or_group.replace("/", ".")
        if key.split(".")[0] in COMPOSED_KEYS:
            continue
        if override.is_delete():
            _delete(stored, key)
            continue
        value = OmegaConf.select(OmegaConf.create(composed), key, default=KeyError)
        if value is KeyError:
            raise ValueError(
                f"cannot apply the override {line!r} when resuming from {ckpt_path}: the run "
                "continues with the config stored in the checkpoint and only takes overrides "
                "of its keys (e.g. trainer.max_epochs=20); start a new run for other changes"
            )
        _set(stored, key, to_plain(value))
        log.info("resume: %s overrides the stored config", line)
    old_dir = str((stored.get("paths") or {}).get("output_dir") or "")
    new_dir = str(cfg.paths.output_dir)
    if old_dir and old_dir != new_dir:
        stored = _rebase(stored, old_dir, new_dir)
    for key in COMPOSED_KEYS:
        if key in composed:
            stored[key] = composed[key]
    out = OmegaConf.create(stored)
    if "hydra" in cfg:  # keep HydraConfig-dependent access working as composed
        with open_dict(out):
            out.hydra = cfg.hydra
    log.info("resuming the run stored in %s (its own config, checked against the allowlist)", ckpt_path)
    return out


def _set(tree: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, last = dotted.split(".")
    for part in parents:
        tree = tree.setdefault(part, {})
    tree[last] = copy.deepcopy(value)


def _delete(tree: dict[str, Any], dotted: str) -> None:
    *parents, last = dotted.split(".")
    for part in parents:
        tree = tree.get(part, {})
    tree.pop(last, None)


def _rebase(node: Any, old: str, new: str) -> Any:
    """Strings that are ``old`` or paths under it, moved to ``new`` (the run folder)."""
    if isinstance(node, dict):
        return {k: _rebase(v, old, new) for k, v in node.items()}
    if isinstance(node, list):
        return [_rebase(v, old, new) for v in node]
    if isinstance(node, str) and (node == old or node.startswith(old.rstrip("/") + "/")):
        return new + node[len(old):]
    return node


# --------------------------------------------------------------------- early checks
WANDB_OFFLINE_MODES = ("offline", "dryrun", "disabled")


def wandb_api_key_available(env: dict[str, str] | None = None) -> bool:
    """A W&B API key in ``WANDB_API_KEY`` or the netrc file (``wandb login`` writes it)."""
    env = os.environ if env is None else env
    if env.get("WANDB_API_KEY"):
        return True
    host = (env.get("WANDB_BASE_URL") or "https://api.wandb.ai").split("://")[-1].split("/")[0]
    path = env.get("NETRC") or os.path.join(env.get("HOME") or os.path.expanduser("~"), ".netrc")
    try:
        return netrc.netrc(path).authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


def check_wandb(logger_cfg: DictConfig | None, env: dict[str, str] | None = None) -> None:
    """Fail fast when ``logger=wandb`` is online without an API key.

    Checked before data and model set-up: otherwise wandb's own ``UsageError`` comes
    after minutes of work and does not say how to run without an account.
    """
    env = os.environ if env is None else env
    for name, node in (logger_cfg or {}).items():
        if node is None or not str(node.get("_target_", "")).endswith("WandbLogger"):
            continue
        if node.get("offline") or env.get("WANDB_MODE", "").lower() in WANDB_OFFLINE_MODES:
            continue
        if not wandb_api_key_available(env):
            raise RuntimeError(
                f"logger.{name} (W&B) is online but no API key was found (WANDB_API_KEY unset, "
                "no api.wandb.ai entry in ~/.netrc). Log in with `wandb login`, or run without "
                "an account or network: WANDB_MODE=offline python train.py logger=wandb ... "
                "(or logger.wandb.offline=true); `wandb sync <run>/wandb/offline-run-*` uploads "
                "the run later"
            )


def _archives_validate(data: Any) -> bool:
    """Whether several archives (``data.archives``, used when ``data.path`` is unset) bring
    validation periods of their own."""
    archives = data.get("archives") if data.get("path") is None else None
    return any(a.get("val_period") is not None for a in archives or [])


def warn_without_validation(cfg: DictConfig) -> bool:
    """Warn (and return True) when the run has no validation set; say what that disables."""
    data, trainer = cfg.get("data") or {}, cfg.get("trainer") or {}
    reason = None
    if "val_size" in data and not data.get("val_size"):
        reason = f"data.val_size={data.get('val_size')}"
    elif "val_period" in data and data.get("val_period") is None and not _archives_validate(data):
        reason = "data.val_period=null"
    elif trainer.get("limit_val_batches") in (0, 0.0):
        reason = "trainer.limit_val_batches=0"
    if reason is None:
        return False
    log.warning(
        "%s: training runs WITHOUT validation. This disables: the best checkpoint "
        "(checkpoints/best.ckpt monitors val/loss; only last.ckpt is written), early stopping "
        "(callbacks=default_early_stopping), the persistence comparison, and the sweep metric "
        "(optimized_metric=%s comes back None)", reason, cfg.get("optimized_metric", "val/mse"),
    )
    return True


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


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="train")
def main(cfg: DictConfig) -> float | None:
    """Console entry point ``nowcast-train`` (same as ``python train.py``)."""
    metrics = train(cfg)
    return metrics.get(cfg.get("optimized_metric", "val/loss"))
