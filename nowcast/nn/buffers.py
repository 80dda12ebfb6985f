"""Large CPU buffers kept from one training step to the next.

A ConvLSTM training step on the CPU allocates several buffers of hundreds of MB
(every layer's gates of all steps, their gradients, the hidden and cell states). glibc
serves blocks that large (over 32 MiB) with a fresh ``mmap`` and returns them to the OS
when freed, so every step paid for ~1.3 million page faults and the kernel zeroing
5 GB at config S (B 8, T 20, 64x64, hidden [64, 64]): 5.2-5.8 s of system time in a
13.8-15.2 s step. PyTorch's CPU allocator keeps nothing (its CUDA allocator caches), so the
layer keeps these buffers itself: :func:`empty` hands out a cached block that fits
when nothing else uses it any more, else allocates one.

"Nothing else uses it" is the storage's reference count: the pool holds one reference,
and every tensor or view made from the block (autograd's saved tensors, the layer's
outputs still held by the caller) holds another. So a block is reused only once all of
them are gone, and two forward passes before one backward get different blocks.

A request takes the smallest unused block of its size up to twice that. Past
:data:`MAX_BUFFERS` blocks the pool forgets the least recently used unused ones (blocks
in use are never forgotten: their memory is needed anyway); it takes only blocks of at
least :data:`MIN_BYTES` (smaller ones are reused by glibc's heap anyway). What it keeps
stays with the process until :func:`release`, as with ``torch.cuda``'s caching
allocator and ``empty_cache``: about the peak memory of one training step. CUDA and
other devices allocate as usual.
"""

from __future__ import annotations

import math
import threading

import torch
from torch import Tensor

from nowcast.nn.backend import capabilities, settings

__all__ = ["MAX_BUFFERS", "MIN_BYTES", "cached_bytes", "empty", "release"]

#: Blocks smaller than this are plain ``torch.empty`` (glibc reuses them).
MIN_BYTES = 16 * 2**20
#: Unused blocks are forgotten past this many blocks in all.
MAX_BUFFERS = 32

_blocks: list[torch.UntypedStorage] = []  # least recently handed out first
_lock = threading.Lock()
_use_count = getattr(torch._C, "_storage_Use_Count", None)  # private: no pool without it


def _unused(block: torch.UntypedStorage) -> bool:
    return _use_count(block._cdata) == 1  # only this pool's reference


def empty(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device | str = "cpu") -> Tensor:
    """An uninitialised contiguous tensor of ``shape``, from the pool where it applies."""
    device = torch.device(device)
    nbytes = math.prod(shape) * dtype.itemsize
    if (device.type != "cpu" or nbytes < MIN_BYTES or not settings.buffer_pool
            or not capabilities().storage_use_count):
        return torch.empty(shape, dtype=dtype, device=device)
    with _lock:
        # best fit among unused blocks up to twice the size (a bf16 step then fits in
        # the blocks of a float32 one, and so on)
        fits = [i for i, b in enumerate(_blocks) if nbytes <= b.nbytes() <= 2 * nbytes and _unused(b)]
        if fits:
            block = _blocks.pop(min(fits, key=lambda i: _blocks[i].nbytes()))
        else:
            block = torch.UntypedStorage(nbytes)
        _blocks.append(block)
        out = torch.empty(0, dtype=dtype).set_(block, 0, shape)  # now in use
        if len(_blocks) > MAX_BUFFERS:  # forget the least recently used unused blocks
            unused = [i for i, b in enumerate(_blocks) if _unused(b)]
            for i in reversed(unused[: len(_blocks) - MAX_BUFFERS]):
                del _blocks[i]
        return out


def cached_bytes() -> int:
    """Bytes held by the pool, in use or not."""
    with _lock:
        return sum(b.nbytes() for b in _blocks)


def release() -> None:
    """Drop the pool's blocks (those still in use are freed when their tensors are)."""
    with _lock:
        _blocks.clear()
