"""Loading checkpoints safely, with errors that say what is wrong.

A checkpoint is untrusted input: its tensors load with ``weights_only=True`` and the run
config stored in it (``nowcast_config``) only builds objects through
:func:`instantiate_trusted` (see :mod:`nowcast.safe_config`, ``docs/security.md``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from nowcast.safe_config import UntrustedConfigError, check_config, instantiate_trusted

__all__ = ["UntrustedConfigError", "check_compatible", "instantiate_trusted", "load_checkpoint",
           "stored_config"]


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a Lightning checkpoint with ``weights_only=True``.

    Raises
    ------
    FileNotFoundError
        The path does not exist.
    ValueError
        The file is not a checkpoint (not a torch file, truncated, or no ``state_dict``).
    """
    path = Path(path)
    if not path.is_file():
        hint = ""
        if path.parent.is_dir():
            found = sorted(p.name for p in path.parent.glob("*.ckpt"))
            hint = f"; checkpoints in {path.parent}: {found}" if found else ""
        raise FileNotFoundError(f"checkpoint {path} does not exist{hint}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - torch raises anything from IndexError to UnpicklingError on junk
        raise ValueError(
            f"{path} is not a readable checkpoint (corrupt, truncated or not a torch file): {err}"
        ) from err
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise ValueError(f"{path} is not a Lightning checkpoint: it has no 'state_dict'")
    return ckpt


def stored_config(ckpt: dict[str, Any], path: str | Path) -> dict[str, Any]:
    """The run config stored in a checkpoint by ``nowcast.train``, checked by
    :func:`nowcast.safe_config.check_config` (targets allowlisted, no interpolations).

    Returns plain containers with the original ``_target_`` strings; build objects from
    them with :func:`instantiate_trusted`.

    Raises
    ------
    ValueError
        The checkpoint holds no ``nowcast_config`` (not written by ``nowcast.train``).
    UntrustedConfigError
        The config names a target outside the allowlist or holds an interpolation.
    """
    raw = ckpt.get("nowcast_config")
    if raw is None:
        raise ValueError(
            f"{path} has no stored nowcast config: it was not written by nowcast.train, "
            "so the model cannot be rebuilt from it"
        )
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: the stored nowcast_config is a {type(raw).__name__}, not a mapping")
    check_config(raw, source=f"checkpoint {path}")  # raises before anything is built
    return raw


def check_compatible(model: nn.Module, ckpt: dict[str, Any], path: str | Path) -> None:
    """Raise ``ValueError`` listing missing, unexpected and mis-shaped weights."""
    own = model.state_dict()
    theirs = ckpt["state_dict"]
    missing = sorted(set(own) - set(theirs))
    unexpected = sorted(set(theirs) - set(own))
    shapes = [
        f"{k}: checkpoint {tuple(theirs[k].shape)} vs model {tuple(own[k].shape)}"
        for k in sorted(set(own) & set(theirs))
        if tuple(own[k].shape) != tuple(theirs[k].shape)
    ]
    if missing or unexpected or shapes:
        lines = [f"checkpoint {path} does not fit the configured model:"]
        if shapes:
            lines.append("  shape mismatches: " + "; ".join(shapes[:8]))
        if missing:
            lines.append(f"  missing in checkpoint: {missing[:8]}")
        if unexpected:
            lines.append(f"  not in the model: {unexpected[:8]}")
        lines.append("  use the model config the checkpoint was trained with (its run's "
                     ".hydra/config.yaml) or start without ckpt_path")
        raise ValueError("\n".join(lines))
