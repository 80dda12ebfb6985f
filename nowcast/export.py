"""``export(cfg)``: a checkpoint's network as one ONNX or ``torch.export`` (.pt2) file.

``python export.py ckpt_path=<ckpt> format=onnx`` (or ``format=torch_export``) writes the
whole network, mm/h in and out: :class:`PhysicalNowcaster` wraps the value transform's
encode, the encoder-forecaster with its recurrence unrolled over the fixed ``T_in`` and
``T_out``, and the decode. Batch is dynamic, and so are ``H`` and ``W`` (as multiples of
the network's ``spatial_divisor``) unless ``dynamic_hw=false``. The same command checks
the file on a real window (``input``; default: the newest frames of the training data)
against eager torch (ONNX Runtime for ``.onnx``, ``torch.export.load`` for ``.pt2``) and
logs the largest absolute difference in mm/h (all pixels, and where the forecast is <= 100
mm/h, which ``tolerance`` judges), the largest relative difference, and both per forecast
range (<= 10, 10-100, > 100 mm/h).

The ConvLSTM layers take their step-wise (traceable) path under ``torch.export``: they
check ``torch.compiler.is_exporting()`` (``nowcast.nn.convlstm._is_tracing``), so the
fused eager kernels and the timing-based kernel choices are not traced; the exported copy
runs its layers in NCHW (``memory_format="contiguous"``, see :func:`exportable`).

An ONNX file carries ``nowcast`` metadata (JSON of plain values: ``T_in``, ``T_out``,
divisor, lead times, reader settings, training grid spacing, checkpoint sha256) that
:class:`~nowcast.inference.OnnxForecaster` reads; nothing in it is executed.
"""

from __future__ import annotations

import copy
import json
import logging
import time
from pathlib import Path
from typing import Any

import hydra
import numpy as np
import torch
from omegaconf import DictConfig
from torch import Tensor, nn

import nowcast
from nowcast.data.transforms import Transform
from nowcast.inference import Tiling, TorchForecaster, load_forecaster, plain_config
from nowcast.nn import ConvLSTM2D
from nowcast.run_folders import config_dir

log = logging.getLogger(__name__)

FORMATS = {"onnx": ".onnx", "torch_export": ".pt2"}


class PhysicalNowcaster(nn.Module):
    """``(B, T_in, C, H, W)`` mm/h -> ``(B, T_out, C, H, W)`` mm/h: encode, network, decode.

    Parameters
    ----------
    net
        The network, network space in and out (``H``, ``W`` multiples of its
        ``spatial_divisor``).
    transform
        The data's value transform (mm/h <-> network space).
    """

    def __init__(self, net: nn.Module, transform: Transform) -> None:
        super().__init__()
        self.net = net
        self.transform = transform

    def forward(self, x: Tensor) -> Tensor:
        """mm/h ``(B, T_in, C, H, W)`` -> forecast mm/h ``(B, T_out, C, H, W)`` (>= 0)."""
        return self.transform.decode(self.net(self.transform.encode(x))).clamp(min=0.0)


def exportable(forecaster: TorchForecaster) -> PhysicalNowcaster:
    """The forecaster's network as one graph, or a ``ValueError`` saying why not."""
    from nowcast.models.hybrid import ExtrapolationResidual

    if isinstance(forecaster.net, ExtrapolationResidual):
        raise ValueError(
            f"{forecaster.source}: this model corrects a pysteps {forecaster.net.extrapolation!r} "
            "nowcast computed in numpy, which is not a torch graph and cannot be exported; "
            "export a network-only model (e.g. experiment=radar_bom_network) or run it with "
            "predict.py runtime=torch"
        )
    net = copy.deepcopy(forecaster.net)
    for module in net.modules():
        if isinstance(module, ConvLSTM2D):
            # Under tracing the layers default to channels_last; with a dynamic H and W the
            # symbolic strides of channels_last tensors grow into expressions sympy needs
            # minutes to simplify (a 2-level test network had not finished exporting after
            # 6.5 min). ONNX has no memory format: NCHW traces the same graph.
            module.memory_format = "contiguous"
    return PhysicalNowcaster(net, forecaster.transform).eval()


def metadata(forecaster: TorchForecaster, ckpt_sha256: str) -> dict[str, Any]:
    """Plain values predict needs to read inputs for an exported file."""
    return {
        "input_steps": forecaster.input_steps,
        "output_steps": forecaster.output_steps,
        "in_channels": forecaster.in_channels,
        "spatial_divisor": forecaster.spatial_divisor,
        "lead_times": forecaster.lead_times,
        "reader": forecaster.reader,
        "grid_spacing": list(forecaster.grid_spacing) if forecaster.grid_spacing else None,
        "transform": repr(forecaster.transform),
        "checkpoint": Path(forecaster.source).name,
        "checkpoint_sha256": ckpt_sha256,
        "nowcast_version": nowcast.__version__,
        "input": "rain_rate (B, T_in, C, H, W) mm/h",
        "output": "forecast (B, T_out, C, H, W) mm/h",
    }


def _dynamic_shapes(divisor: int, dynamic_hw: bool) -> dict[str, dict[int, Any]]:
    dims: dict[int, Any] = {0: torch.export.Dim("batch", min=1, max=1024)}
    if dynamic_hw:
        # H = divisor * k: patching and pooling need multiples of the divisor
        dims[3] = divisor * torch.export.Dim("h_blocks", min=1, max=65536 // divisor)
        dims[4] = divisor * torch.export.Dim("w_blocks", min=1, max=65536 // divisor)
    return {"x": dims}


def export_program(model: PhysicalNowcaster, example: Tensor, dynamic_hw: bool = True
                   ) -> torch.export.ExportedProgram:
    """``torch.export`` of ``model`` with a dynamic batch (and ``H``, ``W``)."""
    import torch.fx.config

    divisor = int(getattr(model.net, "spatial_divisor", 1))
    if example.shape[0] == 1:  # torch.export specialises a size-1 axis to a constant
        example = example.expand(2, *example.shape[1:]).contiguous()
    # Stack traces per graph node cost most of the export time of an unrolled recurrence.
    previous = torch.fx.config.do_not_emit_stack_traces
    torch.fx.config.do_not_emit_stack_traces = True
    try:
        with torch.no_grad():
            return torch.export.export(model, (example,), dynamic_shapes=_dynamic_shapes(divisor, dynamic_hw))
    finally:
        torch.fx.config.do_not_emit_stack_traces = previous


def save_onnx(program: torch.export.ExportedProgram, example: Tensor, path: Path, meta: dict[str, Any]) -> Path:
    """Convert an exported program to ONNX (opset 18) with the ``nowcast`` metadata."""
    import onnx

    from nowcast.io_utils import atomic_path

    onnx_program = torch.onnx.export(program, (example.expand(2, *example.shape[1:]),), input_names=["rain_rate"],
                                     output_names=["forecast"], dynamo=True, opset_version=18)
    model = onnx_program.model_proto
    entry = model.metadata_props.add()
    entry.key, entry.value = "nowcast", json.dumps(meta)
    with atomic_path(path) as tmp:
        onnx.save(model, str(tmp))
    return path


#: Forecast ranges (mm/h) the verification reports separately: float32 rounding grows with
#: the rain rate (the decode ``10 ** (scale y + log10 offset)`` turns an error of ``y`` into
#: a relative error of the rate), so one number over all rates says little.
MAGNITUDE_EDGES = (10.0, 100.0)


def diff_by_magnitude(out: np.ndarray, reference: np.ndarray,
                      edges: tuple[float, ...] = MAGNITUDE_EDGES) -> list[dict[str, Any]]:
    """Largest absolute (mm/h) and relative difference of ``out`` to ``reference`` (same
    shape, mm/h) per range of ``reference``: ``<= edges[0]``, ..., ``> edges[-1]``.

    Returns
    -------
    One dict per range: ``range`` (text), ``pixels``, ``max_abs_diff_mmh``, ``max_rel_diff``
    (relative to ``max(reference, 1e-3 mm/h)``); the maxima are 0 for an empty range.
    """
    diff = np.abs(out.astype(np.float64) - reference.astype(np.float64))
    rel = diff / np.maximum(np.abs(reference.astype(np.float64)), 1e-3)
    bounds = [-np.inf, *edges, np.inf]
    rows = []
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        inside = (reference > lo) & (reference <= hi)
        name = f"<= {hi:g}" if lo == -np.inf else (f"> {lo:g}" if hi == np.inf else f"{lo:g}-{hi:g}")
        rows.append({"range": f"{name} mm/h", "pixels": int(inside.sum()),
                     "max_abs_diff_mmh": float(diff[inside].max()) if inside.any() else 0.0,
                     "max_rel_diff": float(rel[inside].max()) if inside.any() else 0.0})
    return rows


def verify(path: Path, fmt: str, model: PhysicalNowcaster, x: Tensor) -> dict[str, Any]:
    """Run the file on ``x`` (mm/h) and compare with eager torch; largest differences.

    Returns
    -------
    ``max_abs_diff_mmh`` (all pixels), ``max_abs_diff_mmh_below_100`` (where the eager
    forecast is <= 100 mm/h: what the 1e-4 mm/h target is judged on), ``max_rel_diff``,
    ``by_magnitude`` (:func:`diff_by_magnitude`), ``max_mmh`` (the forecast's maximum) and
    ``seconds`` (one run of the file).
    """
    with torch.no_grad():
        reference = model(x).numpy()
    started = time.perf_counter()
    if fmt == "onnx":
        import onnxruntime as ort

        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        out = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    else:
        with torch.no_grad():
            out = torch.export.load(str(path)).module()(x).numpy()
    seconds = time.perf_counter() - started
    diff = np.abs(out - reference)
    # float32 carries ~7 digits: one float32 step of the network output y near 100 mm/h
    # is already ~1e-4 mm/h after the decode (docs/operational.md, "Export notes"), so
    # the absolute target is judged where the forecast is <= 100 mm/h
    usual = reference <= 100.0
    return {"max_abs_diff_mmh": float(diff.max()),
            "max_abs_diff_mmh_below_100": float(diff[usual].max()) if usual.any() else 0.0,
            "max_rel_diff": float((diff / np.maximum(np.abs(reference), 1e-3)).max()),
            "by_magnitude": diff_by_magnitude(out, reference),
            "max_mmh": float(reference.max()), "seconds": seconds}


def example_window(forecaster: TorchForecaster, source: Any, run_data: dict[str, Any]) -> tuple[Tensor, list[Path]]:
    """A real input window ``(1, T_in, C, H, W)`` mm/h, padded to the divisor: the newest
    frames of ``source`` (default: the training data)."""
    from nowcast.predict import list_input_files, read_window

    source = source or run_data.get("path")
    if not source:
        raise ValueError("export needs input=<radar files> to verify on (the checkpoint names no training data)")
    window = read_window(list_input_files(source), forecaster.input_steps, forecaster.time_step,
                         forecaster.reader)
    x = torch.nan_to_num(torch.from_numpy(window.frames), nan=0.0)[None, :, None]  # (1, T_in, 1, H, W)
    d = forecaster.spatial_divisor
    pad_h, pad_w = -x.shape[-2] % d, -x.shape[-1] % d
    return torch.nn.functional.pad(x, (0, pad_w, 0, pad_h)), window.files


def export(cfg: DictConfig) -> dict[str, Any]:
    """Export ``cfg.ckpt_path`` as ``cfg.format`` and verify it on a real window.

    Returns
    -------
    ``{"path": file, "format": ..., "export_seconds": ..., "input_files": [...]}`` plus
    :func:`verify`'s differences (``max_abs_diff_mmh``, ``max_abs_diff_mmh_below_100``,
    ``max_rel_diff``, ``by_magnitude``, ...), for either format.
    """
    from nowcast.predict import check_writable, sha256

    fmt = cfg.format
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {sorted(FORMATS)}, got {fmt!r}")
    if fmt == "torch_export" and cfg.dynamic_hw:
        # Found only after minutes of tracing otherwise (docs/operational.md).
        raise ValueError(
            "format=torch_export with dynamic_hw=true is not supported: torch.export.save "
            "cannot serialize the math.ceil of a symbolic frame size (torch 2.13: "
            "SerializeError after 265 s of tracing a tiny network). Use dynamic_hw=false "
            "(predict tiles larger domains) or format=onnx"
        )
    output = Path(cfg.output) if cfg.get("output") else Path(cfg.paths.output_dir) / f"{Path(cfg.ckpt_path).stem}{FORMATS[fmt]}"
    check_writable(output.parent)
    forecaster = load_forecaster(cfg.ckpt_path, Tiling(max_pixels=None))
    model = exportable(forecaster)
    x, files = example_window(forecaster, cfg.get("input"), plain_config(forecaster.run_cfg.data))
    log.info("exporting %s (%s) as %s, example input %s from %s .. %s", cfg.ckpt_path,
             type(forecaster.net).__name__, fmt, tuple(x.shape), files[0].name, files[-1].name)
    started = time.perf_counter()
    program = export_program(model, x, dynamic_hw=bool(cfg.dynamic_hw))
    meta = metadata(forecaster, sha256(Path(cfg.ckpt_path)))
    if fmt == "onnx":
        save_onnx(program, x, output, meta)
    else:
        from nowcast.io_utils import atomic_path

        # to an open file: given a path, torch.export warns about the temporary name's suffix
        with atomic_path(output) as tmp, open(tmp, "wb") as f:
            torch.export.save(program, f, extra_files={"nowcast.json": json.dumps(meta)})
    seconds = time.perf_counter() - started
    check = verify(output, fmt, model, x)
    log.info("exported %s in %.1f s; on the window ending %s (forecast max %.1f mm/h) the file "
             "differs from eager torch by at most %.3g mm/h (%.3g mm/h where <= 100 mm/h; "
             "relative %.3g)", output, seconds, files[-1].name, check["max_mmh"],
             check["max_abs_diff_mmh"], check["max_abs_diff_mmh_below_100"], check["max_rel_diff"])
    for row in check["by_magnitude"]:
        log.info("  forecast %s (%d px): max abs diff %.3g mm/h, max rel diff %.3g", row["range"],
                 row["pixels"], row["max_abs_diff_mmh"], row["max_rel_diff"])
    if check["max_abs_diff_mmh_below_100"] > float(cfg.tolerance):
        log.warning("the difference where the forecast is <= 100 mm/h (%.3g mm/h) exceeds tolerance=%g mm/h",
                    check["max_abs_diff_mmh_below_100"], cfg.tolerance)
    return {"path": output, "format": fmt, "export_seconds": seconds, "input_files": files, **check}


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="export")
def main(cfg: DictConfig) -> None:
    """Console entry point ``nowcast-export`` (same as ``python export.py``)."""
    export(cfg)
