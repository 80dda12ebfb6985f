"""Building objects from an untrusted config (a checkpoint's stored ``nowcast_config``).

``hydra.utils.instantiate`` calls whatever ``_target_`` names, with whatever arguments the
config holds. A checkpoint is data from someone else (a colleague, a download), so the
config stored in it must not decide which code runs. :func:`instantiate_trusted` walks the
whole config first and only then instantiates it:

* every ``_target_``, at any depth (inside lists, ``_args_``, optimizer partials), must be
  a public class defined in a ``nowcast`` module and reached through ``nowcast`` modules
  only (``nowcast.cluster.os.system`` and ``nowcast.evaluate.instantiate`` are refused),
  or one of the torch / Lightning classes in :data:`ALLOWED_EXTERNAL`;
* no string may hold an interpolation (``${...}``): stored configs are resolved when the
  checkpoint is written, so an interpolation (``${oc.env:...}``, a custom resolver) means
  the file was edited;
* ``_partial_`` / ``_recursive_`` must be booleans, ``_convert_`` one of Hydra's modes,
  ``_args_`` a list; values must be plain YAML scalars, lists and mappings.

Anything else raises :class:`UntrustedConfigError` naming the key and the target, before
anything is imported from outside ``nowcast`` or called. The checked ``_target_`` strings
are replaced by the class objects they were resolved to, so Hydra does not look them up
a second time. See ``docs/security.md``.
"""

from __future__ import annotations

import importlib
import inspect
import re
from collections.abc import Mapping
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

#: Classes from outside ``nowcast`` that the configs in ``configs/`` instantiate, plus the
#: standard optimizers and schedulers that take no callables. ``LambdaLR``-style
#: schedulers (which call a function from the config) are deliberately absent.
ALLOWED_EXTERNAL: frozenset[str] = frozenset({
    # optimizers (model.optimizer, _partial_: true)
    "torch.optim.Adam",
    "torch.optim.AdamW",
    "torch.optim.SGD",
    "torch.optim.RMSprop",
    # LR schedulers (model.scheduler, _partial_: true)
    "torch.optim.lr_scheduler.CosineAnnealingLR",
    "torch.optim.lr_scheduler.CosineAnnealingWarmRestarts",
    "torch.optim.lr_scheduler.OneCycleLR",
    "torch.optim.lr_scheduler.StepLR",
    "torch.optim.lr_scheduler.MultiStepLR",
    "torch.optim.lr_scheduler.ExponentialLR",
    "torch.optim.lr_scheduler.LinearLR",
    "torch.optim.lr_scheduler.ReduceLROnPlateau",
    # trainer, callbacks and loggers (resuming a run from its stored config)
    "lightning.pytorch.trainer.Trainer",
    "lightning.pytorch.Trainer",
    "lightning.pytorch.callbacks.ModelCheckpoint",
    "lightning.pytorch.callbacks.EarlyStopping",
    "lightning.pytorch.callbacks.LearningRateMonitor",
    "lightning.pytorch.callbacks.TQDMProgressBar",
    "lightning.pytorch.loggers.CSVLogger",
    "lightning.pytorch.loggers.TensorBoardLogger",
    "lightning.pytorch.loggers.WandbLogger",
})

#: Hydra's values for ``_convert_``.
CONVERT_MODES = frozenset({"none", "partial", "object", "all"})

_DOTTED = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)+")


class UntrustedConfigError(ValueError):
    """A config from a checkpoint names code that may not run, or was tampered with."""


def _fail(source: str, where: str, message: str) -> UntrustedConfigError:
    return UntrustedConfigError(
        f"refusing to build objects from the config in {source}: {where}: {message}. "
        "Only nowcast's own classes and the torch/Lightning classes listed in "
        "nowcast.safe_config.ALLOWED_EXTERNAL may be instantiated from a stored config "
        "(docs/security.md); nothing was called"
    )


def resolve_target(target: Any, where: str = "_target_", source: str = "config") -> type:
    """The class an allowed ``_target_`` string names; :class:`UntrustedConfigError` otherwise.

    Imports only modules inside ``nowcast`` (trusted code) and, for the exact names in
    :data:`ALLOWED_EXTERNAL`, their torch/Lightning module. Nothing is called.
    """
    if not isinstance(target, str):
        raise _fail(source, where, f"_target_ must be a dotted class name, got {type(target).__name__}")
    if not _DOTTED.fullmatch(target):
        raise _fail(source, where, f"_target_ {target!r} is not a dotted Python name")
    module_name, _, attr = target.rpartition(".")
    if target in ALLOWED_EXTERNAL:
        obj = getattr(importlib.import_module(module_name), attr)
        if not inspect.isclass(obj):  # pragma: no cover - the list holds classes only
            raise _fail(source, where, f"_target_ {target!r} is not a class")
        return obj
    parts = target.split(".")
    if parts[0] != "nowcast":
        raise _fail(source, where, f"_target_ {target!r} is not allowed")
    # Walk modules from the package root: every step must be a nowcast module, so an
    # attribute path such as nowcast.cluster.os.system or nowcast.train.hydra.utils never
    # reaches a module imported by nowcast.
    module = importlib.import_module("nowcast")
    i = 1
    while i < len(parts) - 1:
        name = ".".join(parts[: i + 1])
        child = getattr(module, parts[i], None)
        if child is not None and not inspect.ismodule(child):
            break  # an attribute, not a submodule: stop walking modules
        if inspect.ismodule(child) and child.__name__ != name:
            raise _fail(source, where, f"_target_ {target!r} goes through module {child.__name__!r}, "
                                       "which is not part of nowcast")
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as err:
            raise _fail(source, where, f"_target_ {target!r}: no nowcast module {name!r}") from err
        i += 1
    rest = parts[i:]
    if len(rest) != 1:
        raise _fail(source, where, f"_target_ {target!r} is not a class defined at the top level "
                                   f"of a nowcast module ({'.'.join(parts[:i])} has no submodule {rest[0]!r})")
    name = rest[0]
    obj = getattr(module, name, None)
    if obj is None:
        raise _fail(source, where, f"_target_ {target!r}: {module.__name__} has no attribute {name!r}")
    if name.startswith("_"):
        raise _fail(source, where, f"_target_ {target!r} is private")
    if inspect.ismodule(obj):
        raise _fail(source, where, f"_target_ {target!r} is a module, not a class")
    defined_in = getattr(obj, "__module__", None) or ""
    if not inspect.isclass(obj):
        raise _fail(source, where, f"_target_ {target!r} is a {type(obj).__name__} "
                                   f"(from {defined_in or 'unknown module'}), not a nowcast class")
    if not (defined_in == "nowcast" or defined_in.startswith("nowcast.")) or obj.__qualname__ != name:
        raise _fail(source, where, f"_target_ {target!r} is {defined_in}.{obj.__qualname__}, "
                                   "which is not defined in nowcast")
    return obj


def check_config(cfg: Any, source: str = "config", where: str = "") -> Any:
    """Validate an untrusted config tree; return a copy with ``_target_`` resolved to classes.

    Parameters
    ----------
    cfg
        Plain containers (``dict``/``list`` of YAML scalars), as ``torch.load`` returns
        them, or an ``omegaconf`` node (converted without resolving, so interpolations
        are seen and refused).
    source
        What the config came from, for messages (``"checkpoint run/last.ckpt"``).

    Raises
    ------
    UntrustedConfigError
        A target outside the allowlist, an interpolation, a bad special key, or a value
        that is not a YAML scalar/list/mapping. Nothing has been called.
    """
    if isinstance(cfg, (DictConfig, ListConfig)):
        cfg = OmegaConf.to_container(cfg, resolve=False)
    return _walk(cfg, source, where)


def _walk(node: Any, source: str, where: str) -> Any:
    here = where or "<root>"
    if isinstance(node, Mapping):
        out: dict[Any, Any] = {}
        for key, value in node.items():
            if not isinstance(key, (str, int)) or isinstance(key, bool):
                raise _fail(source, here, f"key {key!r} is not a string")
            if isinstance(key, str) and "${" in key:
                raise _fail(source, here, f"key {key!r} holds an interpolation")
            sub = f"{where}.{key}" if where else str(key)
            if key == "_target_":
                out[key] = resolve_target(value, sub, source)
                continue
            if key in ("_partial_", "_recursive_") and not isinstance(value, bool):
                raise _fail(source, sub, f"must be true or false, got {value!r}")
            if key == "_convert_" and str(value) not in CONVERT_MODES:
                raise _fail(source, sub, f"must be one of {sorted(CONVERT_MODES)}, got {value!r}")
            if key == "_args_" and not isinstance(value, (list, tuple)):
                raise _fail(source, sub, f"must be a list, got {type(value).__name__}")
            out[key] = _walk(value, source, sub)
        return out
    if isinstance(node, (list, tuple)):
        return [_walk(v, source, f"{where}[{i}]") for i, v in enumerate(node)]
    if isinstance(node, str):
        if "${" in node:
            raise _fail(source, here, f"value {node!r} is an interpolation; stored configs are "
                                      "resolved when the checkpoint is written, so this one was edited")
        return node
    if node is None or isinstance(node, (bool, int, float)):
        return node
    raise _fail(source, here, f"value of type {type(node).__name__} is not a YAML scalar, list or mapping")


def to_plain(cfg: Any) -> Any:
    """A trusted omegaconf node (or plain container) as plain containers, interpolations
    resolved in their own config (e.g. command-line overrides of ``evaluate``)."""
    if isinstance(cfg, (DictConfig, ListConfig)):
        return OmegaConf.to_container(cfg, resolve=True)
    return cfg


def instantiate_trusted(cfg: Any, source: str = "stored config", **kwargs: Any) -> Any:
    """``hydra.utils.instantiate`` after :func:`check_config` has passed the whole ``cfg``.

    ``kwargs`` (objects built by trusted code, e.g. ``callbacks=[...]``) go to the
    top-level target unchecked.
    """
    from hydra.utils import instantiate

    checked = check_config(cfg, source)
    return instantiate(checked, **kwargs)
