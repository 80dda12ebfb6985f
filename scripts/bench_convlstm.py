"""Benchmark ``nowcast.nn.ConvLSTM2D`` against the common reference ConvLSTM.

The reference is the implementation most ConvLSTM code uses (e.g. the widely copied
``ndrplz/ConvLSTM_pytorch`` and OpenSTL's cell): per step one ``Conv2d`` over the
concatenated ``[x_t, h_{t-1}]``, split into the four gates, every layer's outputs
stacked and the next layer slicing ``inp[:, t]``. It computes exactly the same function
(its weights are copied from ours and the outputs compared), in the default NCHW layout
as users write it.

Measured, interleaved in one run (so machine noise hits both alike), median of
``--repeats``:

* training step: forward, MSE loss, backward, ``Adam.step`` -- in sequences/second;
* forward only (``torch.no_grad``);
* the same with ``torch.autocast`` in bf16 (convolutions in bf16); on a CPU without
  native bf16 (x86 without ``avx512_bf16`` / ``amx_bf16``, Arm without ``bf16``) torch
  emulates it, so these rows are skipped there unless ``--force-low-precision``;
* achieved GFLOP/s of the training step (FLOPs counted by
  ``torch.utils.flop_counter.FlopCounterMode``) as a fraction of the machine's practical
  peak, measured in the same run as the best of a few large convolutions
  (forward + backward);
* minor page faults of the process per run (median): large buffers that the allocator
  maps fresh from the OS each time cost a fault per 4 KiB page and the kernel's zeroing;
* peak memory of one training step with and without ``checkpoint_steps``. On CPU torch
  has no allocator statistics, so each measurement runs in a fresh subprocess and
  reports the growth of the peak resident set size (``VmHWM``, reset through
  ``/proc/self/clear_refs`` just before the step) over the resident size then (model, optimizer state and inputs already allocated):
  it includes allocator and oneDNN scratch, so it is an upper bound on tensor memory.
  On CUDA it is ``torch.cuda.max_memory_allocated`` minus the allocation before.

Prints a Markdown table ready to paste into ``docs/benchmarks.md``, headed by the
machine it ran on: CPU model and the flags that decide the fast kernels (AVX2, AVX-512,
native bf16/fp16, AMX), torch version, threads, and the GPU where ``--device cuda``.

Configs: S and P (``--config all``) are the CPU benchmarks; G (B 16, T 10, 1x128x128,
hidden [128, 128, 128], kernel 3) is the GPU one, run by ``scripts/gpu_check.sh``.

Example::

    python scripts/bench_convlstm.py --config all --repeats 3 --threads 2
    python scripts/bench_convlstm.py --config G --device cuda --repeats 3
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

from nowcast.nn import ConvLSTM2D
from nowcast.nn.conv import get_cpu_conv_backend, set_cpu_conv_backend
from nowcast.nn.cpu import cpu_capabilities


@dataclass(frozen=True)
class Config:
    """A benchmark problem: batch, steps, input ``(C, H, W)``, layers, kernel."""

    name: str
    batch: int
    steps: int
    channels: int
    size: int
    hidden: tuple[int, ...]
    kernel: int

    def describe(self) -> str:
        return (
            f"B {self.batch}, T {self.steps}, {self.channels}x{self.size}x{self.size}, "
            f"hidden {list(self.hidden)}, kernel {self.kernel}"
        )


CONFIGS = {
    "S": Config("S", 8, 20, 1, 64, (64, 64), 3),
    "P": Config("P", 4, 20, 1, 64, (128, 64, 64), 5),
    # GPU: T 10 keeps the reference's per-step autograd tensors (~1.8 GB per layer and
    # step in float32) well inside one card's memory.
    "G": Config("G", 16, 10, 1, 128, (128, 128, 128), 3),
}
#: What ``--config all`` runs: the CPU benchmarks (G is hours on a CPU).
ALL = ("S", "P")


# -- the machine ---------------------------------------------------------------------------
#: /proc/cpuinfo flags that decide which CPU kernels torch can use, shown with every table.
CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_fp16", "amx_bf16", "amx_fp16", "bf16", "asimdhp")


def native_on_cpu(dtype: torch.dtype) -> bool:
    """Whether this CPU computes ``dtype`` in hardware; torch emulates it (slowly) otherwise.

    bf16: :func:`nowcast.nn.cpu.cpu_capabilities` (``avx512_bf16`` or ``amx_bf16`` on x86,
    ``bf16`` on Arm); fp16: ``avx512_fp16`` or ``amx_fp16`` on x86, ``asimdhp`` on Arm.
    float32/float64 are always native.
    """
    cpu = cpu_capabilities()
    if dtype == torch.bfloat16:
        return cpu.native_bf16
    if dtype == torch.float16:
        return bool({"avx512_fp16", "amx_fp16", "asimdhp"} & cpu.flags)
    return True


def machine_lines(args: argparse.Namespace, peak: float) -> list[str]:
    """The header every table is printed with: what it ran on."""
    cpu = cpu_capabilities()
    flags = [f for f in CPU_FLAGS if f in cpu.flags]
    peak_text = "not measured" if math.isnan(peak) else f"{peak:.0f} GFLOP/s"
    lines = [
        f"CPU: {cpu.model} ({os.cpu_count()} logical CPUs); flags: "
        f"{', '.join(flags) or 'none of ' + ', '.join(CPU_FLAGS)}; torch CPU dispatch "
        f"{cpu.torch_capability}; bf16 {'native' if cpu.native_bf16 else 'emulated'}",
        f"torch {torch.__version__}, {torch.get_num_threads()} intra-op threads, "
        f"device {args.device}, dtype {args.dtype}, our layer: memory_format "
        f"{args.memory_format}, CPU conv backend {args.conv_backend}; practical peak "
        f"(best large conv fwd+bwd) {peak_text}",
    ]
    if args.device == "cuda" and not torch.cuda.is_available():
        lines.append("GPU: none visible to torch")
    elif args.device == "cuda":
        props = torch.cuda.get_device_properties(0)
        lines.append(
            f"GPU: {props.name}, {props.total_memory / 2**30:.0f} GiB, compute capability "
            f"{props.major}.{props.minor}, CUDA {torch.version.cuda}, cuDNN "
            f"{torch.backends.cudnn.version()}; float32 convolutions in TF32: "
            f"{torch.backends.cudnn.allow_tf32}"
        )
    return lines


# -- the common reference implementation --------------------------------------------------
class ReferenceCell(nn.Module):
    """One step as usually written: a single conv over ``cat([x, h])``, split in 4 gates."""

    def __init__(self, in_channels: int, hidden_channels: int, kernel_size: int) -> None:
        super().__init__()
        self.hidden_channels = hidden_channels
        self.conv = nn.Conv2d(
            in_channels + hidden_channels, 4 * hidden_channels, kernel_size,
            padding=kernel_size // 2,
        )

    def forward(self, x: Tensor, state: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
        h, c = state
        gates = self.conv(torch.cat([x, h], dim=1))  # (B, 4*Ch, H, W)
        i, f, g, o = torch.split(gates, self.hidden_channels, dim=1)
        i, f, g, o = torch.sigmoid(i), torch.sigmoid(f), torch.tanh(g), torch.sigmoid(o)
        c = f * c + i * g
        h = o * torch.tanh(c)
        return h, c


class ReferenceConvLSTM(nn.Module):
    """Stack of :class:`ReferenceCell`; ``(B, T, C, H, W)`` -> last layer ``(B, T, Ch, H, W)``."""

    def __init__(self, in_channels: int, hidden: tuple[int, ...], kernel_size: int) -> None:
        super().__init__()
        chans = [in_channels, *hidden]
        self.cells = nn.ModuleList(
            ReferenceCell(chans[i], chans[i + 1], kernel_size) for i in range(len(hidden))
        )

    def forward(self, x: Tensor) -> Tensor:
        b, t, _, h, w = x.shape
        inp = x
        for cell in self.cells:
            zeros = x.new_zeros(b, cell.hidden_channels, h, w)
            state = (zeros, zeros)
            outs = []
            for step in range(t):
                state = cell(inp[:, step], state)
                outs.append(state[0])
            inp = torch.stack(outs, dim=1)  # (B, T, Ch, H, W)
        return inp

    @torch.no_grad()
    def copy_from(self, model: ConvLSTM2D) -> None:
        """Use ``model``'s weights: conv over [x, h] = [weight_x | weight_h]."""
        for ref, cell in zip(self.cells, model.cells):
            ref.conv.weight.copy_(torch.cat([cell.weight_x, cell.weight_h], dim=1))
            ref.conv.bias.copy_(cell.bias)


def build(cfg: Config, device: str, dtype: torch.dtype, **kwargs) -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    ours = ConvLSTM2D(cfg.channels, list(cfg.hidden), cfg.kernel, **kwargs).to(device, dtype)
    ref = ReferenceConvLSTM(cfg.channels, cfg.hidden, cfg.kernel).to(device, dtype)
    ref.copy_from(ours)
    return ours, ref


def make_batch(cfg: Config, device: str, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(1)
    x = torch.rand(cfg.batch, cfg.steps, cfg.channels, cfg.size, cfg.size, generator=g)
    y = torch.rand(cfg.batch, cfg.steps, cfg.hidden[-1], cfg.size, cfg.size, generator=g)
    return x.to(device, dtype), y.to(device, dtype)


# -- timing --------------------------------------------------------------------------------
def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def train_step_fn(model: nn.Module, x: Tensor, y: Tensor, autocast: torch.dtype | None) -> Callable[[], None]:
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    device = x.device.type

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device, dtype=autocast or torch.float32, enabled=autocast is not None):
            out = model(x)  # (B, T, Ch, H, W)
            loss = F.mse_loss(out.float(), y)
        loss.backward()
        opt.step()

    return step


def forward_fn(model: nn.Module, x: Tensor, autocast: torch.dtype | None) -> Callable[[], None]:
    device = x.device.type

    def fwd() -> None:
        with torch.no_grad(), torch.autocast(
            device, dtype=autocast or torch.float32, enabled=autocast is not None
        ):
            model(x)

    return fwd


def timed(fn: Callable[[], None], device: str) -> float:
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def count_flops(fn: Callable[[], None]) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def machine_peak(device: str, dtype: torch.dtype, autocast: torch.dtype | None) -> float:
    """Practical peak GFLOP/s: best of a few large conv forward+backward shapes."""
    shapes = [(16, 128, 512, 16, 5), (16, 256, 256, 32, 3), (8, 64, 256, 64, 3)]
    best = 0.0
    for b, cin, cout, size, k in shapes:
        for fmt in (torch.contiguous_format, torch.channels_last):
            x = torch.randn(b, cin, size, size, device=device, dtype=dtype)
            x = x.contiguous(memory_format=fmt).requires_grad_()
            conv = nn.Conv2d(cin, cout, k, padding=k // 2).to(device, dtype, memory_format=fmt)

            def fn(x=x, conv=conv) -> None:
                with torch.autocast(device, dtype=autocast or torch.float32, enabled=autocast is not None):
                    out = conv(x)
                out.sum().backward()

            flops = count_flops(fn)
            fn()
            secs = min(timed(fn, device) for _ in range(3))
            best = max(best, flops / secs / 1e9)
    return best


# -- peak memory (subprocess per measurement) ---------------------------------------------------
def _rss_kib() -> int:
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * resource.getpagesize() // 1024


def _vm_hwm_kib() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    raise RuntimeError("no VmHWM in /proc/self/status")


def memory_child(spec: dict) -> dict:
    """Run one training step in this (fresh) process; report peak memory growth in MiB."""
    torch.set_num_threads(spec["threads"])
    # "auto" would time candidate kernels (and memory_format="auto" layouts) inside the
    # measured step (extra full-size outputs); with "native" every layer is channels_last
    # oneDNN. The layout changes strides, not tensor sizes.
    set_cpu_conv_backend("native" if spec["conv_backend"] == "auto" else spec["conv_backend"])
    cfg = replace(CONFIGS[spec["config"]], steps=spec["steps"])
    device, dtype = spec["device"], getattr(torch, spec["dtype"])
    ours, ref = build(cfg, device, dtype, checkpoint_steps=spec["checkpoint_steps"],
                      memory_format=spec["memory_format"])
    model = ref if spec["model"] == "reference" else ours
    x, y = make_batch(cfg, device, dtype)
    step = train_step_fn(model, x, y, None)
    if device == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        return {"peak_mib": (torch.cuda.max_memory_allocated() - base) / 2**20}
    base = _rss_kib()
    # Reset the peak-RSS mark (VmHWM) to the current RSS: ru_maxrss would also count
    # the parent's memory inherited over fork/exec.
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    step()
    return {"peak_mib": (_vm_hwm_kib() - base) / 1024}


def measure_memory(cfg: Config, args: argparse.Namespace, model: str, checkpoint_steps: int) -> float:
    spec = {
        "config": cfg.name, "device": args.device, "dtype": args.dtype, "threads": args.threads,
        "model": model, "checkpoint_steps": checkpoint_steps, "steps": cfg.steps,
        "memory_format": args.memory_format, "conv_backend": args.conv_backend,
    }
    out = subprocess.run(
        [sys.executable, __file__, "--memory-child", json.dumps(spec)],
        check=True, capture_output=True, text=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_mib"]


# -- main ---------------------------------------------------------------------------------------
def bench_config(cfg: Config, args: argparse.Namespace, peak: float) -> Iterator[str]:
    """The table rows of one config, each yielded as soon as it is measured."""
    device, dtype = args.device, getattr(torch, args.dtype)
    ours, ref = build(cfg, device, dtype, memory_format=args.memory_format)
    x, y = make_batch(cfg, device, dtype)
    with torch.no_grad():
        diff = (ours(x) - ref(x)).abs().max().item()
    print(f"[{cfg.name}] {cfg.describe()}: max |ours - reference| = {diff:.2e}", file=sys.stderr)

    half = getattr(torch, args.autocast) if args.autocast != "none" else None
    if half is not None and device == "cpu" and not args.force_low_precision:
        if not native_on_cpu(half):
            print(f"[{cfg.name}] {args.autocast} rows skipped: this CPU emulates {args.autocast} "
                  "(--force-low-precision runs them)", file=sys.stderr)
            half = None
    cases: dict[str, Callable[[], None]] = {
        "reference train": train_step_fn(ref, x, y, None),
        "ours train": train_step_fn(ours, x, y, None),
        "reference forward": forward_fn(ref, x, None),
        "ours forward": forward_fn(ours, x, None),
    }
    if half is not None:
        cases[f"reference train {args.autocast}"] = train_step_fn(ref, x, y, half)
        cases[f"ours train {args.autocast}"] = train_step_fn(ours, x, y, half)
    # FLOPs of the direct convolutions (NNPACK's Winograd/FFT kernels do fewer
    # multiplications for the same result; counting those would flatter the slower
    # kernel), so GFLOP/s is "direct-convolution equivalent" for every case alike.
    backend = get_cpu_conv_backend()
    set_cpu_conv_backend("native")
    flops = {name: count_flops(fn) for name, fn in cases.items()}
    set_cpu_conv_backend(backend)
    for fn in cases.values():  # warm-up, incl. the per-shape kernel choice of conv2d
        fn()
    times: dict[str, list[float]] = {name: [] for name in cases}
    faults: dict[str, list[int]] = {name: [] for name in cases}
    for r in range(args.repeats):
        for name, fn in cases.items():  # interleaved: noise hits every case alike
            before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            times[name].append(timed(fn, device))
            faults[name].append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
        print(f"[{cfg.name}] repeat {r + 1}/{args.repeats} done", file=sys.stderr)
    med = {name: statistics.median(ts) for name, ts in times.items()}

    def row(name: str, baseline: str) -> str:
        secs = med[name]
        gflops = flops[name] / secs / 1e9
        spread = f"{min(times[name]):.2f}-{max(times[name]):.2f}"
        return (
            f"| {cfg.name} | {name} | {secs:.2f} ({spread}) | {cfg.batch / secs:.3f} | "
            f"{med[baseline] / secs:.2f}x | {gflops:.0f} | {gflops / peak:.0%} | "
            f"{statistics.median(faults[name]) / 1000:.0f}k |"
        )

    for name in cases:
        yield row(name, "reference train" if "train" in name else "reference forward")
    if not args.skip_memory:
        if device == "cuda":  # hand the cached blocks back: the children need the card's memory
            cases.clear()
            torch.cuda.empty_cache()
        chunk = max(cfg.steps // 4, 1)
        mem = {
            "reference": measure_memory(cfg, args, "reference", 0),
            "ours": measure_memory(cfg, args, "ours", 0),
            f"ours, checkpoint_steps={chunk}": measure_memory(cfg, args, "ours", chunk),
        }
        yield (
            f"| {cfg.name} | peak memory of a train step (MiB) | "
            + ", ".join(f"{k}: {v:.0f}" for k, v in mem.items())
            + " | | | | | |"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="all", choices=[*CONFIGS, "all"],
                        help="S, P, G (GPU) or all (= S and P)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--dtype", default="float32", help="parameter and input dtype")
    parser.add_argument("--autocast", default="bfloat16", help="autocast row dtype: bfloat16, float16 or none")
    parser.add_argument("--steps", type=int, help="override the sequence length T (quick runs)")
    parser.add_argument("--memory-format", default="auto", choices=["auto", "channels_last", "contiguous"],
                        help="ConvLSTM2D(memory_format=...) of our layer (its default: auto)")
    parser.add_argument("--conv-backend", default="auto", choices=["auto", "native", "nnpack"],
                        help="CPU convolution kernels of our layer (nowcast.nn.conv)")
    parser.add_argument("--skip-memory", action="store_true", help="skip the peak-memory subprocesses")
    parser.add_argument("--force-low-precision", action="store_true",
                        help="run the autocast rows on a CPU that emulates that dtype (slow)")
    parser.add_argument("--dry-run", action="store_true",
                        help="print the machine header and the configs, run nothing")
    parser.add_argument("--memory-child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_child:
        print(json.dumps(memory_child(json.loads(args.memory_child))))
        return
    torch.set_num_threads(args.threads)
    set_cpu_conv_backend(args.conv_backend)
    if args.device == "cuda" and not torch.cuda.is_available() and not args.dry_run:
        parser.error("--device cuda: torch sees no CUDA GPU")
    names = list(ALL) if args.config == "all" else [args.config]
    if args.steps:
        for name in names:
            CONFIGS[name] = replace(CONFIGS[name], steps=args.steps)
    dtype = getattr(torch, args.dtype)
    peak = float("nan") if args.dry_run else machine_peak(args.device, dtype, None)
    lines = [
        f"Command: `python {' '.join(sys.argv)}`",
        "",
        *machine_lines(args, peak),
        "",
        *[f"- {n}: {CONFIGS[n].describe()}" for n in names],
        "",
        "| config | case | seconds, median (min-max) | sequences/s | vs reference | GFLOP/s | of peak "
        "| page faults |",
        "|---|---|---|---|---|---|---|---|",
    ]
    # The header first and each config's rows as they finish: a run stopped by a time
    # limit (scripts/gpu_check.sh) keeps what it measured.
    print("\n".join(lines), flush=True)
    if args.dry_run:
        return
    for name in names:
        for row in bench_config(CONFIGS[name], args, peak):
            print(row, flush=True)


if __name__ == "__main__":
    main()
