"""nowcast: ConvLSTM precipitation nowcasting with Hydra + Lightning."""

import torch as _torch

__version__ = "0.1.0"

# torch 2.4 (the oldest supported, docs/compatibility.md) has no torch.compiler.is_exporting,
# which nowcast.nn asks; torch.export runs under Dynamo there, which is_compiling() sees.
if not hasattr(_torch.compiler, "is_exporting"):  # pragma: no cover - torch < 2.5
    _torch.compiler.is_exporting = lambda: False
