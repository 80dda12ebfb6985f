"""One inference path: a trained network (or its ONNX export) and the baselines, on mm/h.

Used by ``predict`` (and meant for ``evaluate``): everything here takes and returns rain
rate in **mm/h** as ``(B, T, C, H, W)`` tensors; encoding to the network's space and
decoding back happen inside.

* :func:`load_forecaster` rebuilds the network from a checkpoint through
  :func:`nowcast.evaluate.load_run` (the one place that turns a checkpoint's stored
  config into objects) and wraps it as a :class:`TorchForecaster`;
  :class:`OnnxForecaster` runs an exported file with ONNX Runtime, same interface.
* A forecaster runs the FULL domain: it pads ``H`` and ``W`` (bottom/right, with 0 mm/h
  as the datamodule pads) to a multiple of the network's ``spatial_divisor`` and, when
  the domain has more than ``Tiling.max_pixels`` pixels, cuts it into overlapping tiles
  (:func:`run_tiled`) whose forecasts are blended back with taper weights, so the
  network's activation memory is bounded by the tile, not by the domain.
* :func:`run_baselines` runs :mod:`nowcast.baselines` on the same input.

Why tiles equal the untiled forecast: every layer of the encoder-forecasters is a
convolution, a pointwise op, a ``p x p`` patching or a ``2 x 2`` pooling, so a pixel of
the forecast depends only on inputs within the network's receptive radius ``R`` and the
computation commutes with shifts by a multiple of ``spatial_divisor``. Tiles therefore
start at multiples of ``spatial_divisor``; inside a tile, pixels nearer than ``R`` to an
edge that is not a domain edge see the tile's zero padding instead of real data, so they
get weight 0 (the first ``margin`` pixels of each overlap) and the remaining overlap is
blended with weights that sum to one. With ``margin >= R`` every kept value equals the
untiled one up to float rounding (``tests/test_inference.py`` checks this). ConvLSTMs
grow ``R`` with every time step (one kernel radius per recurrent convolution and level,
times the level's stride), so ``R`` of a real model is often larger than a practical
margin: then tiles differ from the untiled forecast near their seams by however much the
far field matters, which the taper spreads smoothly instead of leaving an edge.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from nowcast.baselines import get_baseline

log = logging.getLogger(__name__)

#: Methods :func:`run_baselines` knows, besides ``"model"``.
BASELINE_METHODS = ("persistence", "optical_flow", "sprog")


# --------------------------------------------------------------------------- tiling
@dataclass
class Tiling:
    """How a large domain is cut into tiles.

    Parameters
    ----------
    max_pixels
        Largest tile area in pixels (after padding); a domain up to this size runs in one
        piece. Bounds the network's activation memory (about ``max_pixels`` x hidden
        channels x steps x 4 bytes / patch area); ``None``: never tile.
    overlap
        Pixels shared by neighbouring tiles (rounded up to a multiple of the network's
        ``spatial_divisor``).
    margin
        Pixels at each inner tile edge that get weight 0 (the zone where the tile's
        zero padding reaches the forecast); ``None``: ``overlap // 4``. Needs
        ``overlap >= 2 * margin + 1``.
    taper
        Weights across the rest of the overlap: ``"linear"`` or ``"cosine"``; both sum to
        one across a seam.
    """

    max_pixels: int | None = 1024 * 1024
    overlap: int = 64
    margin: int | None = None
    taper: str = "cosine"

    def __post_init__(self) -> None:
        if self.taper not in ("linear", "cosine"):
            raise ValueError(f"tiling.taper must be 'linear' or 'cosine', got {self.taper!r}")
        if self.overlap < 0:
            raise ValueError(f"tiling.overlap must be >= 0, got {self.overlap}")
        if self.max_pixels is not None and self.max_pixels < 1:
            raise ValueError(f"tiling.max_pixels must be >= 1 or null, got {self.max_pixels}")

    def tile_size(self, divisor: int, overlap: int) -> int | None:
        """Side of a square tile: ``sqrt(max_pixels)`` rounded down to ``divisor``."""
        if self.max_pixels is None:
            return None
        side = int(math.isqrt(int(self.max_pixels))) // divisor * divisor
        if side <= overlap:
            raise ValueError(
                f"tiling.max_pixels={self.max_pixels} gives tiles of {side} px, not larger than "
                f"the overlap of {overlap} px; raise max_pixels or lower tiling.overlap"
            )
        return side


def tile_starts(size: int, tile: int, overlap: int) -> list[int]:
    """Start offsets of tiles of ``tile`` px covering ``size`` px, neighbours sharing at
    least ``overlap`` px; the last tile ends at ``size``. Multiples of the divisor when
    ``size``, ``tile`` and ``overlap`` are."""
    if tile >= size:
        return [0]
    stride = tile - overlap
    starts = list(range(0, size - tile, stride))
    return starts + [size - tile]


def _ramp(n: int, margin: int, taper: str) -> np.ndarray:
    """Weights of the first ``n`` pixels of a tile at an inner edge shared over ``n`` px:
    0 for ``margin`` px, then a ramp to 1 such that ``ramp[i] + ramp[n - 1 - i] == 1``."""
    width = n - 2 * margin
    if width < 1:
        raise ValueError(f"tiles overlap by {n} px, too little for a margin of {margin} px")
    r = np.clip((np.arange(n) - margin + 0.5) / width, 0.0, 1.0)
    if taper == "cosine":
        r = 0.5 - 0.5 * np.cos(np.pi * r)
    return r


def axis_weights(starts: Sequence[int], tile: int, margin: int, taper: str) -> list[np.ndarray]:
    """``(tile,)`` weights of each tile along one axis (1 at the domain's own edges)."""
    weights = []
    for k, s in enumerate(starts):
        w = np.ones(tile)
        if k > 0:
            n = starts[k - 1] + tile - s  # overlap with the previous tile
            w[:n] *= _ramp(n, margin, taper)
        if k < len(starts) - 1:
            n = s + tile - starts[k + 1]  # overlap with the next tile
            w[tile - n:] *= _ramp(n, margin, taper)[::-1]
        weights.append(w)
    return weights


def run_tiled(
    fn: Callable[[Tensor], Tensor],
    x: Tensor,
    tiling: Tiling,
    divisor: int,
) -> Tensor:
    """Apply ``fn`` ``(B, T_in, C, h, w) -> (B, T_out, C_out, h, w)`` to ``x`` tile by tile.

    Parameters
    ----------
    fn
        The network (any space: tiles are blended in the space ``fn`` returns).
    x
        ``(B, T_in, C, H, W)``, ``H`` and ``W`` multiples of ``divisor``.
    tiling
        Tile size, overlap, margin and taper (:class:`Tiling`).
    divisor
        The network's ``spatial_divisor``: tile sizes and offsets are multiples of it.

    Returns
    -------
    ``(B, T_out, C_out, H, W)``: ``fn(x)`` when the domain fits in one tile, otherwise the
    weighted blend of the tiles' forecasts (see the module docstring).
    """
    b, _, _, h, w = x.shape
    if h % divisor or w % divisor:
        raise ValueError(f"run_tiled needs H, W multiples of {divisor}, got {(h, w)}")
    overlap = -(-tiling.overlap // divisor) * divisor
    side = tiling.tile_size(divisor, overlap)
    if side is None or h * w <= tiling.max_pixels:  # type: ignore[operator]
        return fn(x)
    margin = tiling.overlap // 4 if tiling.margin is None else int(tiling.margin)
    th, tw = min(side, h), min(side, w)
    ys, xs = tile_starts(h, th, overlap), tile_starts(w, tw, overlap)
    wy, wx = axis_weights(ys, th, margin, tiling.taper), axis_weights(xs, tw, margin, tiling.taper)
    log.info("tiling %dx%d into %d x %d tiles of %dx%d px (overlap %d, margin %d)",
             h, w, len(ys), len(xs), th, tw, overlap, margin)
    out: Tensor | None = None
    for i, y0 in enumerate(ys):
        for j, x0 in enumerate(xs):
            pred = fn(x[..., y0:y0 + th, x0:x0 + tw])  # (B, T_out, C_out, th, tw)
            if out is None:
                out = pred.new_zeros(b, *pred.shape[1:3], h, w)  # (B, T_out, C_out, H, W)
                total = torch.zeros(h, w, dtype=torch.float64)
            weight = torch.from_numpy(np.outer(wy[i], wx[j]))  # (th, tw) float64
            out[..., y0:y0 + th, x0:x0 + tw] += pred * weight.to(pred.dtype)
            total[y0:y0 + th, x0:x0 + tw] += weight
    return out / total.to(out.dtype)


# --------------------------------------------------------------------------- forecasters
def parse_step(text: str | None) -> np.timedelta64 | None:
    """``"10min"`` / ``"5 min"`` / ``"1h"`` -> ``timedelta64[s]``; ``None`` for lead names
    without a unit (``lead01``)."""
    if text is None:
        return None
    match = re.fullmatch(r"\s*([0-9.]+)\s*(s|sec|min|m|h|hr)\s*", str(text))
    if not match:
        return None
    seconds = float(match.group(1)) * {"s": 1, "sec": 1, "min": 60, "m": 60, "h": 3600, "hr": 3600}[match.group(2)]
    return np.timedelta64(int(round(seconds)), "s")


class Forecaster:
    """A nowcasting network on rain rate: ``(B, T_in, C, H, W)`` mm/h -> ``(B, T_out, C, H, W)`` mm/h.

    Subclasses give :meth:`_network` (on a padded tile) and the attributes below; this
    class pads to ``spatial_divisor``, tiles, and crops back.

    Attributes
    ----------
    input_steps, output_steps, in_channels, spatial_divisor
        ``T_in``, ``T_out``, ``C`` and the factor ``H`` and ``W`` must be multiples of.
    time_step
        The frame/lead step the network was trained at (``timedelta64``), or ``None``.
    lead_times
        Names of the leads (``["10min", ...]``).
    reader
        The data config's reader settings (plain values: variable, units, downsample...),
        so that predict reads files as training did.
    grid_spacing
        ``(dy, dx)`` of the training grid in its coordinate units, or ``None`` if unknown.
    """

    input_steps: int
    output_steps: int
    in_channels: int = 1
    spatial_divisor: int = 1
    time_step: np.timedelta64 | None = None
    lead_times: list[str]
    reader: dict[str, Any]
    grid_spacing: tuple[float, float] | None = None
    name: str = "model"

    def __init__(self, tiling: Tiling | None = None) -> None:
        self.tiling = tiling or Tiling()

    def _network(self, x: Tensor) -> Tensor:
        """mm/h ``(B, T_in, C, h, w)`` (h, w multiples of the divisor) -> mm/h forecast."""
        raise NotImplementedError

    def check_input(self, x: Tensor) -> None:
        """Raise ``ValueError`` naming the expected and the given shape."""
        if x.dim() != 5 or x.shape[1] != self.input_steps or x.shape[2] != self.in_channels:
            raise ValueError(
                f"{self.name} expects (B, T_in={self.input_steps}, C={self.in_channels}, H, W) "
                f"mm/h, got {tuple(x.shape)}"
            )

    @torch.no_grad()
    def __call__(self, x: Tensor) -> Tensor:
        """Forecast ``(B, T_out, C, H, W)`` in mm/h from ``x`` ``(B, T_in, C, H, W)`` mm/h
        (NaN counts as 0 mm/h, as in training)."""
        self.check_input(x)
        h, w = x.shape[-2:]
        d = self.spatial_divisor
        x = torch.nan_to_num(x.float(), nan=0.0)
        pad_h, pad_w = -h % d, -w % d
        if pad_h or pad_w:
            x = torch.nn.functional.pad(x, (0, pad_w, 0, pad_h))  # (B, T, C, H', W'), 0 mm/h
        out = self._network(x)
        return out[..., :h, :w].clamp(min=0.0)  # (B, T_out, C, H, W)


class TorchForecaster(Forecaster):
    """A checkpoint's network in eager PyTorch (see :func:`load_forecaster`)."""

    def __init__(self, module: nn.Module, run_cfg: Any = None, tiling: Tiling | None = None,
                 source: str = "") -> None:
        super().__init__(tiling)
        self.module = module.eval()
        self.net = module.net
        self.transform = module.transform
        self.run_cfg = run_cfg
        self.source = source
        net = self.net
        self.input_steps = int(net.input_steps)
        self.output_steps = int(net.output_steps)
        self.in_channels = int(getattr(net, "in_channels", 1))
        self.spatial_divisor = int(getattr(net, "spatial_divisor", 1))
        self.lead_times = list(module.lead_times or [f"lead{k + 1:02d}" for k in range(self.output_steps)])
        self.time_step = parse_step(self.lead_times[0])
        data = {} if run_cfg is None else plain_config(run_cfg.get("data", {}))
        self.reader = reader_settings(data)
        self.grid_spacing = None

    def _encoded(self, xe: Tensor) -> Tensor:
        """Network space in and out, tiled; a hybrid's extrapolation runs on the whole domain."""
        from nowcast.models.hybrid import ExtrapolationResidual

        net = self.net
        d = self.spatial_divisor
        if isinstance(net, ExtrapolationResidual):
            # pysteps' motion field and advection need the whole domain; only the
            # correction network (convolutional) is tiled.
            out = net.activation(net.extrapolate(xe) + run_tiled(net.net, xe, self.tiling, d))
            if net.max_value is not None:
                out = out.clamp(max=net.max_value)
            if net.probability_matching:
                out = net.match_distribution(out, xe)
            return out
        return run_tiled(net, xe, self.tiling, d)

    def _network(self, x: Tensor) -> Tensor:
        device = next(self.net.parameters()).device
        xe = self.transform.encode(x.to(device)).float()  # (B, T_in, C, H, W) network space
        return self.transform.decode(self._encoded(xe).float()).cpu()


def load_forecaster(ckpt_path: str | Path, tiling: Tiling | None = None) -> TorchForecaster:
    """Rebuild a checkpoint's network safely and wrap it as a :class:`TorchForecaster`.

    Goes through :func:`nowcast.evaluate.load_run` (``weights_only=True``; the stored
    config is vetted there before anything is built), never through ``instantiate``
    here. Finds the training grid's spacing when the training data are reachable.
    """
    from nowcast.evaluate import load_run

    module, _datamodule, run_cfg = load_run(ckpt_path)
    forecaster = TorchForecaster(module, run_cfg, tiling, source=str(ckpt_path))
    forecaster.grid_spacing = training_grid_spacing(forecaster.reader, plain_config(run_cfg.data).get("path"),
                                                    forecaster.time_step)
    return forecaster


def reader_settings(data: dict[str, Any]) -> dict[str, Any]:
    """The data config's settings that decide how a file becomes mm/h on the model's
    grid (plain values, as :class:`~nowcast.data.radar_io.RadarArchive` takes them)."""
    keys = ("variable", "time_variable", "filename_time_format", "filename_time_regex", "units",
            "accumulation_minutes", "zr_a", "zr_b", "downsample")
    return {k: data[k] for k in keys if data.get(k) is not None}


def grid_spacing(y: np.ndarray, x: np.ndarray) -> tuple[float, float] | None:
    """``(dy, dx)``: absolute median spacing of the coordinates (``None`` for one pixel)."""
    if len(y) < 2 or len(x) < 2:
        return None
    return float(np.median(np.abs(np.diff(y)))), float(np.median(np.abs(np.diff(x))))


def training_grid_spacing(reader: dict[str, Any], path: Any, step: np.timedelta64 | None
                          ) -> tuple[float, float] | None:
    """The training grid's spacing from its first file, or ``None`` if it is not reachable."""
    if not path:
        return None
    from nowcast.data.radar_io import RadarArchive, resolve_paths

    try:
        first = resolve_paths(path)[:1]
        args = {k: v for k, v in reader.items() if k != "filename_time_regex"}
        archive = RadarArchive(first, time_step=f"{int(step / np.timedelta64(1, 's'))}s" if step else "600s",
                               cache_frames=0, **args)
    except (OSError, ValueError) as error:
        log.warning("training data %s not readable (%s): the input grid's resolution cannot be "
                    "checked against it", path, error)
        return None
    grid = archive.grid()  # coordinates only: no frame is decoded (read_frames would decode one)
    archive.close()
    return grid_spacing(grid.y, grid.x)


class OnnxForecaster(Forecaster):
    """An exported file (``nowcast.export``, mm/h in and out) run by ONNX Runtime.

    Its metadata (written by export: plain numbers and names, nothing executable) gives
    ``T_in``, ``T_out``, the divisor, the time step, the reader settings and the
    training grid's spacing.
    """

    name = "onnx model"

    def __init__(self, path: str | Path, tiling: Tiling | None = None, threads: int | None = None) -> None:
        super().__init__(tiling)
        import json

        try:
            import onnxruntime as ort
        except ImportError as err:
            raise ImportError("runtime=onnx needs onnxruntime: pip install 'nowcast[onnx]'") from err
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"ONNX model {path} does not exist")
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = int(threads)
        try:
            self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        except Exception as err:  # noqa: BLE001 - ORT raises its own exception types
            raise ValueError(f"{path} is not a loadable ONNX model: {err}") from err
        self.source = str(path)
        meta = self.session.get_modelmeta().custom_metadata_map
        if "nowcast" not in meta:
            raise ValueError(f"{path} was not written by nowcast.export (no 'nowcast' metadata)")
        info = json.loads(meta["nowcast"])
        self.input_steps = int(info["input_steps"])
        self.output_steps = int(info["output_steps"])
        self.in_channels = int(info["in_channels"])
        self.spatial_divisor = int(info["spatial_divisor"])
        self.lead_times = list(info["lead_times"])
        self.time_step = parse_step(self.lead_times[0])
        self.reader = dict(info.get("reader", {}))
        spacing = info.get("grid_spacing")
        self.grid_spacing = tuple(spacing) if spacing else None  # type: ignore[assignment]
        inp = self.session.get_inputs()[0]
        self.input_name = inp.name
        self.input_shape = list(inp.shape)  # ints, or names of dynamic axes

    def _fixed_hw(self) -> tuple[int, int] | None:
        """``(H, W)`` of a static export, ``None`` when H/W are dynamic."""
        hw = self.input_shape[3:5]
        return (hw[0], hw[1]) if all(isinstance(s, int) for s in hw) else None

    def check_input(self, x: Tensor) -> None:
        """Also check ``x`` against the file's input shape (static axes must fit)."""
        super().check_input(x)
        d = self.spatial_divisor
        h, w = x.shape[-2:]
        padded = (h + -h % d, w + -w % d)
        wanted = [x.shape[0], self.input_steps, self.in_channels, *padded]
        fixed = self._fixed_hw()
        # a static H x W fits the domain itself, or tiles of that size when it is square
        tiles = (fixed is not None and fixed[0] == fixed[1] and self.tiling.max_pixels is not None
                 and padded[0] >= fixed[0] and padded[1] >= fixed[1])
        bad = [i for i, s in enumerate(self.input_shape)
               if isinstance(s, int) and s != wanted[i] and not (i == 0 and s == 1)
               and not (i >= 3 and tiles)]
        if bad:
            raise ValueError(
                f"ONNX model {self.source} takes input {self.input_shape} (B, T, C, H, W), but "
                f"the data give {wanted} (H, W padded to a multiple of {d}); export it again "
                "with dynamic H/W (the default) or for this domain"
            )

    def _network(self, x: Tensor) -> Tensor:
        tiling = self.tiling
        fixed = self._fixed_hw()
        if fixed is not None and tuple(x.shape[-2:]) != fixed:  # tiles of exactly the static size
            tiling = Tiling(max_pixels=fixed[0] * fixed[1], overlap=tiling.overlap,
                            margin=tiling.margin, taper=tiling.taper)
        one_by_one = self.input_shape[0] == 1

        def run(tile: Tensor) -> Tensor:
            parts = tile.split(1) if one_by_one else [tile]
            outs = [self.session.run(None, {self.input_name: p.contiguous().numpy()})[0] for p in parts]
            return torch.from_numpy(np.concatenate(outs))  # (B, T_out, C, h, w) mm/h

        return run_tiled(run, x, tiling, self.spatial_divisor)


# --------------------------------------------------------------------------- baselines
def run_baselines(x: Tensor, num_leads: int, names: Sequence[str], **kwargs: Any) -> dict[str, Tensor]:
    """Baseline nowcasts of ``x`` ``(B, T_in, C, H, W)`` mm/h: ``{name: (B, num_leads, C, H, W)}``.

    ``names`` among ``persistence``, ``optical_flow``, ``sprog`` (the latter two need the
    ``pysteps`` extra); ``kwargs`` go to each baseline's constructor. NaN counts as 0.
    """
    x = torch.nan_to_num(x.float(), nan=0.0)
    out = {}
    for name in names:
        if name not in BASELINE_METHODS:
            raise ValueError(f"unknown method {name!r}; choose from model, {', '.join(BASELINE_METHODS)}")
        baseline = get_baseline(name, **(kwargs if name != "persistence" else {}))
        out[name] = baseline(x, num_leads).clamp(min=0.0)
    return out


def plain_config(cfg: Any) -> dict[str, Any]:
    """An OmegaConf node (or dict) as plain containers, interpolations resolved."""
    from omegaconf import DictConfig, OmegaConf

    if isinstance(cfg, DictConfig):
        return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]
    return dict(cfg or {})
