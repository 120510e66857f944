"""3x3 convolutions by Winograd's minimal filtering F(4x4, 3x3) on the CPU (Lavin & Gray 2016).

A 3x3 convolution with stride 1 and padding 1 costs 9 multiply-adds per output, input channel and
output channel. F(4x4, 3x3) computes each 4x4 output tile from a 6x6 input tile with 36 products in
a transformed domain, 2.25 per output: the tiles and the weights are transformed (additions and
small constant factors), the 36 products are one batched matrix multiply (PyTorch's BLAS), and an
output transform gives the 4x4 results. Its rounding differs from a direct convolution's by about
1e-5 relative (tests/test_winograd.py), as cuDNN's and oneDNN's Winograd paths do.

The tile transforms are ~280 lines of C (winograd.c, AVX2 where the CPU has it) built on first use with the system's C
compiler (`$CC`, else `cc`; `-O3 -march=native`), cached in `$IRIS_DIFFUSION_CACHE` (by default
~/.cache/iris-diffusion) per source, compiler and CPU. PyTorch has no such kernels on CPUs (oneDNN's
Winograd needs AVX-512), and on 2-core EPYCs the product's HP1 U-Net trains faster with them (README
"Benchmarks"); on a 16-core Xeon they lost, so `model.conv_algorithm: auto` uses them where
`measure_speedup`, timed once per machine, finds them faster. They only pay on large layers, so `applies` restricts them to 3x3 layers
of float32 activations on the CPU, without autocast, with >= 64 channels in and out (multiples of
8) on maps of >= 32x32; every other call is nn.Conv2d's. Backward recomputes the transformed input
from x, so a layer saves what a direct convolution saves (x), plus its transformed weights.
The transformed tiles live in per-thread buffers reused across calls (up to 2 x 64 MiB; larger
batches run in chunks), so training does not page-fault on fresh large allocations every step.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from guided_diffusion.machine import cache_root, cpu_flags, cpu_model
from guided_diffusion.speed_verdicts import time_ratio

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("winograd.c")
CFLAGS = ("-O3", "-march=native", "-shared", "-fPIC")
MIN_CHANNELS = 64  # in and out; measured: smaller layers gain little or lose (README "Benchmarks")
MIN_SIZE = 32  # feature-map height and width; at 16 px and below the transforms cost more than they save
CHUNK_BYTES = 64 * 2**20  # transformed tiles of one chunk of images, per buffer
# F(4x4, 3x3): G maps a 3-tap filter to the 6 points of the transformed domain
G = ((1 / 4, 0, 0), (-1 / 6, -1 / 6, -1 / 6), (-1 / 6, 1 / 6, -1 / 6),
     (1 / 24, 1 / 12, 1 / 6), (1 / 24, -1 / 12, 1 / 6), (0, 0, 1))


class KernelsUnavailable(RuntimeError):
    """The C kernels could not be built or loaded here; the message says why."""


_lib: ctypes.CDLL | None = None
_lib_error: str | None = None
_lib_lock = threading.Lock()


def _compiler() -> str | None:
    return shutil.which(os.environ.get("CC", "cc"))


def library_path(compiler: str) -> Path:
    """The cached build for this source, compiler (path and version) and CPU (model and flags)."""
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=60).stdout
    key = "\n".join([SOURCE.read_text(), compiler, version, " ".join(CFLAGS), cpu_model(),
                     " ".join(sorted(cpu_flags()))])
    return cache_root() / f"winograd-{hashlib.sha256(key.encode()).hexdigest()[:16]}.so"


def _build(compiler: str, target: Path) -> None:
    """Compile winograd.c to `target` atomically (a temp file beside it, then rename)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        done = subprocess.run([compiler, *CFLAGS, str(SOURCE), "-o", tmp], capture_output=True,
                              text=True, timeout=300)
        if done.returncode:
            raise KernelsUnavailable(f"{compiler} failed on {SOURCE.name}: {done.stderr.strip()[-300:]}")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def kernels() -> ctypes.CDLL:
    """The loaded C kernels, built into the cache on first use; KernelsUnavailable if impossible
    (no C compiler, a failed build, an unwritable cache). The outcome is remembered per process."""
    global _lib, _lib_error
    with _lib_lock:
        if _lib is None and _lib_error is None:
            try:
                compiler = _compiler()
                if compiler is None:
                    raise KernelsUnavailable(f"no C compiler ({os.environ.get('CC', 'cc')}) on PATH")
                path = library_path(compiler)
                if not path.exists():
                    log.info("building the Winograd convolution kernels into %s", path)
                    _build(compiler, path)
                _lib = _declare(ctypes.CDLL(str(path)))
            except (OSError, subprocess.SubprocessError, KernelsUnavailable) as exc:
                _lib_error = str(exc)
                log.warning("Winograd convolution kernels unavailable (%s); 3x3 convolutions stay direct",
                            _lib_error)
        if _lib is None:
            raise KernelsUnavailable(_lib_error)
        return _lib


def _declare(lib: ctypes.CDLL) -> ctypes.CDLL:
    p, i, n = ctypes.c_void_p, ctypes.c_int, ctypes.c_long
    lib.wino_input.argtypes = lib.wino_output_adjoint.argtypes = [p, p, i, i, i, n, n]
    lib.wino_output.argtypes = [p, p, p, i, i, i, n, n]
    lib.wino_input_adjoint.argtypes = [p, p, i, i, i, i, n, n]
    return lib


def available() -> tuple[bool, str]:
    """(True, where the kernels are) or (False, why not), building them if needed."""
    try:
        return True, kernels()._name
    except KernelsUnavailable as exc:
        return False, str(exc)


def applies(x: Tensor, weight: Tensor) -> bool:
    """Whether a 3x3 layer of `weight` on input `x` runs here (see the module's docstring); never for
    tensor subclasses such as FakeTensor (activation counting, torch.compile's tracing), which have
    no memory for the C kernels to read."""
    co, c = weight.shape[:2]
    real = type(x) is torch.Tensor and type(weight) in (torch.Tensor, nn.Parameter)  # not fake/traced: the C reads memory
    return (real and x.device.type == "cpu" and x.dtype == weight.dtype == torch.float32 and x.dim() == 4
            and not torch.is_autocast_enabled("cpu") and c >= MIN_CHANNELS and co >= MIN_CHANNELS
            and c % 8 == 0 and co % 8 == 0 and min(x.shape[-2:]) >= MIN_SIZE)


# ---------------------------------------------------------------------------------- threads


_pool: ThreadPoolExecutor | None = None
_buffers = threading.local()


def _parallel(fn, rows: int, *args) -> None:
    """fn(*args, first, last) over [0, rows) split across torch's thread count (ctypes releases
    the GIL, so the calls run at once; each writes only the rows it was given)."""
    global _pool
    parts = max(1, min(torch.get_num_threads(), rows))
    if parts > 1 and (_pool is None or _pool._max_workers != parts - 1):
        _pool = ThreadPoolExecutor(parts - 1, thread_name_prefix="winograd")
    bounds = [rows * k // parts for k in range(parts + 1)]
    futures = [_pool.submit(fn, *args, bounds[k], bounds[k + 1]) for k in range(1, parts)]
    failed = fn(*args, bounds[0], bounds[1])
    failed |= any([f.result() for f in futures])
    if failed:
        raise MemoryError("out of memory for the Winograd kernels' scratch buffers")


def _buffer(slot: int, tiles: int, channels: int) -> Tensor:
    """A reused [tiles, 36, channels] float32 buffer of this thread (grown when too small)."""
    store = _buffers.__dict__.setdefault("slots", {})
    need = tiles * 36 * channels
    if slot not in store or store[slot].numel() < need:
        store[slot] = torch.empty(need)
    return store[slot][:need].view(tiles, 36, channels)


def _chunks(n: int, tiles_per_image: int, channels: int) -> list[tuple[int, int]]:
    step = max(1, CHUNK_BYTES // (tiles_per_image * 36 * channels * 4))
    return [(i, min(n, i + step)) for i in range(0, n, step)]


# ---------------------------------------------------------------------------------- the layer


# [36, 9] float32: row 6a + b holds the weights of tap (i, j) in transformed point (a, b): G ⊗ G
WEIGHT_MATRIX = torch.kron(torch.tensor(G, dtype=torch.float64), torch.tensor(G, dtype=torch.float64)).float()


def tiling(h: int, w: int) -> tuple[int, int]:
    """(tile rows, tiles) of one h x w image: 4x4 output tiles, the last row and column partial."""
    rows = -(-h // 4)
    return rows, rows * -(-w // 4)


class _Winograd3x3(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
        lib = kernels()
        x = x.contiguous()
        n, c, h, w = x.shape
        co = weight.shape[0]
        rows, tiles = tiling(h, w)
        u = (WEIGHT_MATRIX @ weight.reshape(co * c, 9).t()).view(36, co, c).transpose(1, 2).contiguous()  # [36, c, co]
        y = x.new_empty(n, co, h, w)
        for i, j in _chunks(n, tiles, max(c, co)):
            v = _buffer(0, (j - i) * tiles, c)
            _parallel(lib.wino_input, (j - i) * rows, x[i].data_ptr(), v.data_ptr(), c, h, w)
            m = _buffer(1, (j - i) * tiles, co)
            torch.bmm(v.transpose(0, 1), u, out=m.transpose(0, 1))
            _parallel(lib.wino_output, (j - i) * rows, m.data_ptr(), bias.data_ptr(), y[i].data_ptr(), co, h, w)
        ctx.save_for_backward(x, u)
        return y

    @staticmethod
    def backward(ctx, dy: Tensor) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
        lib = kernels()
        x, u = ctx.saved_tensors
        dy = dy.contiguous()
        n, c, h, w = x.shape
        co = dy.shape[1]
        rows, tiles = tiling(h, w)
        du = torch.zeros_like(u) if ctx.needs_input_grad[1] else None
        dx = dy.new_zeros(n, c, h, w) if ctx.needs_input_grad[0] else None
        for i, j in _chunks(n, tiles, max(c, co)):
            v = _buffer(0, (j - i) * tiles, c)
            dm = _buffer(1, (j - i) * tiles, co)
            _parallel(lib.wino_output_adjoint, (j - i) * rows, dy[i].data_ptr(), dm.data_ptr(), co, h, w)
            if du is not None:
                _parallel(lib.wino_input, (j - i) * rows, x[i].data_ptr(), v.data_ptr(), c, h, w)
                du.baddbmm_(v.transpose(0, 1).transpose(1, 2), dm.transpose(0, 1))
            if dx is not None:  # v is free now: it takes the gradient of the transformed input
                torch.bmm(dm.transpose(0, 1), u.transpose(1, 2), out=v.transpose(0, 1))
                for parity in (0, 1):  # tile rows i and i + 1 overlap; one parity at a time never does
                    _parallel(lib.wino_input_adjoint, (j - i) * ((rows - parity + 1) // 2), v.data_ptr(),
                              dx[i].data_ptr(), c, h, w, parity)
        dw = None
        if du is not None:
            dw = (WEIGHT_MATRIX.t() @ du.transpose(1, 2).reshape(36, co * c)).view(9, co, c).permute(1, 2, 0).reshape(co, c, 3, 3)
        db = dy.sum((0, 2, 3)) if ctx.needs_input_grad[2] else None
        return dx, dw, db


def winograd_conv3x3(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """conv2d(x, weight, bias, padding=1) for a [co, c, 3, 3] weight, by F(4x4, 3x3) (float32, CPU;
    c and co multiples of 8). KernelsUnavailable where the C kernels cannot be built."""
    if bias is None:
        bias = weight.new_zeros(weight.shape[0])
    return _Winograd3x3.apply(x, weight, bias)


class Conv3x3(nn.Conv2d):
    """nn.Conv2d(in, out, 3, padding=1) whose forward uses Winograd F(4x4, 3x3) where `winograd`
    is set and `applies` (same parameters, state_dict keys and, within ~1e-5, results). Where the
    kernels cannot be built (`kernels` logs why, once) it stays direct."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__(in_channels, out_channels, 3, padding=1)
        self.winograd = False

    def forward(self, x: Tensor) -> Tensor:
        if self.winograd and applies(x, self.weight):
            try:
                return winograd_conv3x3(x, self.weight, self.bias)
            except KernelsUnavailable:
                self.winograd = False
        return F.conv2d(x, self.weight, self.bias, padding=1)


def layer_pass(conv: Callable[..., Tensor], x: Tensor, w: Tensor, b: Tensor, dy: Tensor) -> Callable[[], None]:
    """One forward + backward of conv(x, w, b) against the output gradient dy, gradients cleared first."""
    def run() -> None:
        x.grad = w.grad = b.grad = None
        conv(x, w, b).backward(dy)
    return run


def layer_passes(batch: int, c: int, co: int, size: int,
                 generator: torch.Generator) -> tuple[Tensor, Tensor, dict[str, Callable[[], None]]]:
    """Random input x and weights w of one 3x3 layer (c → co channels on size x size maps; on the CPU
    even inside `with torch.device("meta")`: the C kernels read memory), and its forward + backward
    by oneDNN's direct convolution and by Winograd, under "direct" and "winograd"."""
    x = torch.randn(batch, c, size, size, generator=generator, device="cpu", requires_grad=True)
    w = (torch.randn(co, c, 3, 3, generator=generator, device="cpu") / (3 * c**0.5)).requires_grad_()
    b = torch.randn(co, generator=generator, device="cpu", requires_grad=True)
    dy = torch.randn(batch, co, size, size, generator=generator, device="cpu")
    return x, w, {"direct": layer_pass(lambda x, w, b: F.conv2d(x, w, b, padding=1), x, w, b, dy),
                  "winograd": layer_pass(winograd_conv3x3, x, w, b, dy)}


# The layer timed by the self-check: an HP1 layer that Winograd takes (256 channels on 32 px maps).
# Measured per layer (batch 4), it ran at about the ratio of 128 channels on 64 px on each CPU tried
# (0.57-0.71x of direct on 2-core EPYCs, 1.6x on a 16-core Xeon); at batch 2, or summed with the
# larger 64 px layer, the verdict varied more from run to run (0.98-1.29x and 1.3-2.0x on a 2-core EPYC).
SELF_CHECK_CHANNELS, SELF_CHECK_SIZE = 256, 32


def measure_speedup(batch: int = 4, channels: int = SELF_CHECK_CHANNELS, size: int = SELF_CHECK_SIZE,
                    repeats: int = 3) -> float:
    """Direct time / Winograd time of one 3x3 layer's forward + backward (`channels` in and out, on
    `size` x `size` maps) on the CPU at torch's thread count (best of `repeats` each, in turns; > 1
    means Winograd is faster): under a second on 2 cores. KernelsUnavailable where the kernels
    cannot be built."""
    kernels()
    _, _, passes = layer_passes(batch, channels, channels, size, torch.Generator().manual_seed(0))
    return time_ratio(passes["direct"], passes["winograd"], repeats)


def set_winograd(model: nn.Module, on: bool) -> None:
    """Turn Winograd on or off in every Conv3x3 of `model`."""
    for m in model.modules():
        if isinstance(m, Conv3x3):
            m.winograd = on


def conv_algorithm(model: nn.Module, device_type: str = "cpu", precision: str = "fp32") -> str:
    """The 3x3 convolutions `model` runs on `device_type` under `precision`: "winograd" where
    set_winograd turned them on and they run on a CPU in fp32 (where `applies` lets them), else "direct"."""
    on = any(isinstance(m, Conv3x3) and m.winograd for m in model.modules())
    return "winograd" if on and device_type == "cpu" and precision == "fp32" else "direct"
