"""How many bytes autograd keeps for backward in one training forward of a network — counted
without running it.

Definition. One training-mode forward `model(x, timesteps)` of a batch, under the autocast of
the training step; every tensor autograd saves for backward passes a saved_tensors_hooks pack
hook; the bytes are those of the unique storages it sees (a view counts its whole storage, a
storage saved twice counts once), parameters and buffers excluded. Two forwards, of batch 1 and
batch 2, split the count into a part per image and a fixed part:

    per_image = count(batch 2) − count(batch 1),    fixed = count(batch 1) − per_image.

fixed is what does not grow with the batch: under autocast, the half-precision copies of the
weights that the convolutions and linear layers save. (The issue-17 figures for the code before
the half-precision GroupNorm, "ours bf16 autocast: 105.0 / 1563.6 MiB/img" for the small / HP2
U-Nets, were count(batch 1) on the CPU's lists: 47.8 / 712.8 MiB of weight copies and a
per_image of 57.2 / 850.8; under CUDA's lists that code's per_image was 102.2 / 1515.9. The fp32
figures 114.5 / 1701.2 are both: fp32 has nothing fixed.)

Gradient checkpointing. A module with a true `use_checkpoint` attribute (the U-Net's ResBlock
and AttentionBlock) runs under non-reentrant torch.utils.checkpoint: the checkpoint saves the
block's inputs through the outer hooks (so they are counted) and hides what the block saves
inside. `per_image` is then what is kept across the whole forward, and `recompute` the most
bytes per image one block re-creates while its backward runs, measured by a second pair of
forwards with checkpointing switched off (and switched back on) and every storage first saved
inside a block, other than its inputs, charged to that block.

Nothing is computed: the forwards run on fake tensors (torch._subclasses.fake_tensor) that
carry shapes, dtypes and devices only, so a 374 M-parameter model is counted on a CPU in
seconds, whatever the device of its parameters (meta included). Autocast and the saved-tensor
hooks act on fake tensors as on real ones.

device_type picks whose autocast op lists and kernels apply. 'cuda' with a CUDA device counts
on fake CUDA tensors. Without one (a CPU-only PyTorch aborts the process when autograd meets a
fake CUDA tensor) 'cuda' is counted with the CPU's lists and kernels plus CUDA's rules for the
two ops a U-Net runs that the lists treat differently (CUDA_ONLY_FLOAT32_OPS: group_norm and
upsample_nearest2d run in float32 on CUDA, not on the CPU), emulated by a temporary AutocastCPU
kernel. Our GroupNorm and NearestUpsample run both with autocast off, so for today's U-Net the
two device types count the same; torch's nn.GroupNorm and nn.Upsample (the code before issue 17)
count what they saved on a GPU (exp, float32 on CUDA only, gets float32 anyway). Checked on an H200 (torch 2.11, 2026-11-26): for the
small and HP2 U-Nets in bf16 and fp16, and checkpointed in bf16, fake CUDA, CPU lists and a real
CUDA forward's hooks gave the same per_image and fixed. Kernels that differ: dropout with
0 < p < 1 saves a mask of the input's dtype on the CPU but of bool on CUDA, and attention saves
q, k, v, the output and a float32 log-sum-exp on both, the last padded differently.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.func import functional_call

from guided_diffusion.errors import DiffusionSettingError

AUTOCAST_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
DEVICE_TYPES = ("cpu", "cuda")


@dataclass(frozen=True)
class ActivationBytes:
    """Saved bytes of one training forward: per_image·batch + fixed, plus one block's recompute."""

    per_image: int  # bytes autograd keeps for backward per image of the batch
    fixed: int  # batch-independent saved bytes (e.g. the half-precision weight copies autocast keeps)
    recompute: int  # with use_checkpoint: the most bytes one checkpointed block re-creates in its backward, per image

    def total(self, batch: int) -> int:
        """Saved bytes at the peak of backward for a (micro-)batch of `batch` images."""
        return self.fixed + batch * (self.per_image + self.recompute)


def count_activation_bytes(model: nn.Module, image_size: int, channels: int, precision: str,
                           device_type: str = "cpu") -> ActivationBytes:
    """Count what one training forward of `model(x (B, channels, S, S), timesteps (B,))` saves.

    precision in {'fp32', 'bf16', 'fp16'}: the autocast dtype the training step uses;
    device_type 'cpu' or 'cuda' selects whose autocast op lists apply (see the module docstring
    for 'cuda' without a GPU). The model is left as it was (parameters, training flags, hooks,
    use_checkpoint).
    """
    if precision not in AUTOCAST_DTYPES:
        raise DiffusionSettingError(f"unknown precision '{precision}'; valid: {', '.join(AUTOCAST_DTYPES)}")
    if device_type not in DEVICE_TYPES:
        raise DiffusionSettingError(f"unknown device type '{device_type}'; valid: {', '.join(DEVICE_TYPES)}")
    device = torch.device("cuda" if device_type == "cuda" and torch.cuda.is_available() else "cpu")
    emulate = device_type == "cuda" and device.type == "cpu" and precision != "fp32"
    dtype = AUTOCAST_DTYPES[precision]
    blocks = [m for m in model.modules() if getattr(m, "use_checkpoint", False)]

    def saves(batch: int, per_block: bool) -> _SavedStorages:
        return _forward_saves(model, batch, image_size, channels, dtype, device, blocks if per_block else [])

    with _training_mode(model), _cuda_float32_rules() if emulate else contextlib.nullcontext():
        one, two = saves(1, False), saves(2, False)
        recompute = 0
        if blocks:
            with _checkpointing_off(blocks):
                block_one, block_two = saves(1, True).block_bytes, saves(2, True).block_bytes
            recompute = max(block_two.get(b, 0) - block_one.get(b, 0) for b in blocks)
    per_image = two.total - one.total
    return ActivationBytes(per_image=per_image, fixed=one.total - per_image, recompute=recompute)


class _SavedStorages:
    """The pack hook: sizes of the unique storages saved, and those first saved inside each block."""

    def __init__(self, exclude: Iterable[Tensor]):
        self.excluded = {t.untyped_storage()._cdata for t in exclude}
        self.sizes: dict[int, int] = {}
        self.kept: list[Tensor] = []  # holds each storage, so no address is reused during the count
        self.block: nn.Module | None = None
        self.block_inputs: set[int] = set()
        self.block_bytes: dict[nn.Module, int] = {}

    @property
    def total(self) -> int:
        return sum(self.sizes.values())

    def pack(self, t: Tensor) -> Tensor:
        storage = t.untyped_storage()
        key = storage._cdata
        if key in self.excluded or key in self.sizes:
            return t
        self.sizes[key] = storage.nbytes()
        self.kept.append(t)
        if self.block is not None and key not in self.block_inputs:
            self.block_bytes[self.block] = self.block_bytes.get(self.block, 0) + storage.nbytes()
        return t

    def enter(self, module: nn.Module, args: tuple) -> None:
        if self.block is None:  # an outermost block
            self.block = module
            self.block_inputs = {a.untyped_storage()._cdata for a in args if isinstance(a, Tensor)}

    def leave(self, module: nn.Module, args: tuple, output: object) -> None:
        if self.block is module:
            self.block = None


def _forward_saves(model: nn.Module, batch: int, image_size: int, channels: int, dtype: torch.dtype | None,
                   device: torch.device, blocks: list[nn.Module]) -> _SavedStorages:
    """One forward on fake tensors under the hooks; storages per block for the modules in `blocks`."""
    autocast = contextlib.nullcontext() if dtype is None else torch.autocast(device.type, dtype=dtype)
    with FakeTensorMode(), contextlib.ExitStack() as stack:
        state = {name: torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device=device,
                                           requires_grad=t.requires_grad)
                 for name, t in [*model.named_parameters(), *model.named_buffers()]}
        counter = _SavedStorages(state.values())
        for block in blocks:
            stack.callback(block.register_forward_pre_hook(counter.enter).remove)
            stack.callback(block.register_forward_hook(counter.leave).remove)
        x = torch.empty(batch, channels, image_size, image_size, device=device)
        timesteps = torch.zeros(batch, dtype=torch.long, device=device)
        with torch.autograd.graph.saved_tensors_hooks(counter.pack, _unpack), autocast:
            functional_call(model, state, (x, timesteps))
    return counter


def _unpack(t: Tensor) -> Tensor:
    return t


@contextlib.contextmanager
def _training_mode(model: nn.Module) -> Iterator[None]:
    """model.train() for the count, each module's own flag back afterwards."""
    flags = [(m, m.training) for m in model.modules()]
    model.train()
    try:
        yield
    finally:
        for m, training in flags:
            m.training = training


@contextlib.contextmanager
def _checkpointing_off(blocks: list[nn.Module]) -> Iterator[None]:
    """Run the checkpointed blocks plainly, to see what each saves (what its backward re-creates)."""
    for b in blocks:
        b.use_checkpoint = False
    try:
        yield
    finally:
        for b in blocks:
            b.use_checkpoint = True


# Ops CUDA's autocast runs in float32 that the CPU's does not list (torch 2.11-2.13); the only
# difference between the two lists among the ops a U-Net runs.
CUDA_ONLY_FLOAT32_OPS = ("group_norm", "upsample_nearest2d.vec")


@contextlib.contextmanager
def _cuda_float32_rules() -> Iterator[None]:
    """Emulate CUDA's autocast rules for CUDA_ONLY_FLOAT32_OPS on the CPU: an AutocastCPU kernel
    that casts the op's floating tensors to float32 (removed afterwards). With it the pre-issue-17
    U-Net counts here, per image, exactly what it saved on an H200."""
    lib = torch.library.Library("aten", "IMPL")
    autocast_key = torch._C.DispatchKeySet(torch._C.DispatchKey.AutocastCPU)
    for op in CUDA_ONLY_FLOAT32_OPS:
        name, _, overload = op.partition(".")
        target = getattr(getattr(torch.ops.aten, name), overload or "default")

        def float32_kernel(*args, target=target):
            with torch._C._ExcludeDispatchKeyGuard(autocast_key):
                return target(*[a.float() if isinstance(a, Tensor) and a.is_floating_point() else a for a in args])

        lib.impl(op, float32_kernel, "AutocastCPU")
    try:
        yield
    finally:
        lib._destroy()
