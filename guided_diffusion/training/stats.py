"""Health probes for the network: dead activations and gradient norm per block.

The seed's gear run died silently of dead ReLUs; these numbers make such a failure visible in
`stats.csv` long before the samples go flat.

Blocks are the model's top-level children, with plain ModuleLists expanded into their elements
(for the ADM U-Net: time_embed, input_blocks.0 …, middle_block, output_blocks.0 …, out).

Activations are caught where they are computed — every call of SiLU / ReLU / GELU, functional or
module — through a `TorchFunctionMode`, and attributed to the block that is running. For each
block:

- `near_zero`: the fraction of post-activation values with |a| < ACT_EPS;
- `dead`: the fraction of channels (dim 1) whose |a| < ACT_EPS for every sample and position of
  the step's whole batch (all micro-batches). For ReLU this is "never fired"; SiLU is never
  exactly 0, but |SiLU(x)| < 1e-4 needs x < −11.6, where its gradient is ≈ 1e-4 too, so such a
  channel has stopped learning just the same.
"""

from __future__ import annotations

import logging
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

log = logging.getLogger(__name__)

ACT_EPS = 1e-4
ACTIVATIONS = {F.silu, F.relu, F.gelu, torch.relu}


def named_blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Top-level children of `model`, plain ModuleList/ModuleDict containers expanded one level."""
    blocks = []
    for name, child in model.named_children():
        container = isinstance(child, (nn.ModuleList, nn.ModuleDict)) and type(child).forward is nn.Module.forward
        if container:
            blocks.extend((f"{name}.{sub}", grandchild) for sub, grandchild in child.named_children())
        else:
            blocks.append((name, child))
    return blocks


def block_grad_norms(model: nn.Module) -> dict[str, float]:
    """L2 norm of the current gradients of each block's parameters (0 for blocks without grads)."""
    norms = {}
    for name, block in named_blocks(model):
        grads = [p.grad.detach().float() for p in block.parameters() if p.grad is not None]
        norms[name] = math.sqrt(sum(float(g.pow(2).sum()) for g in grads)) if grads else 0.0
    return norms


class _Tally:
    """Running counts of one activation call site (summed over micro-batches)."""

    def __init__(self):
        self.near_zero = 0
        self.total = 0
        self.channel_max: Tensor | None = None

    def add(self, a: Tensor) -> None:
        a = a.detach().abs().float()
        self.near_zero += int((a < ACT_EPS).sum())
        self.total += a.numel()
        per_channel = a.transpose(0, 1).reshape(a.shape[1], -1).amax(dim=1) if a.ndim > 1 else a.amax().view(1)
        self.channel_max = per_channel if self.channel_max is None else torch.maximum(self.channel_max, per_channel)


class ActivationProbe(TorchFunctionMode):
    """`with ActivationProbe(model) as probe:` forward passes…; then `probe.results()`.

    Activations outside any block (or recomputed during backward by gradient checkpointing) are
    not counted. Each activation call site keeps its own per-channel maxima, keyed by call order
    within the block, so micro-batches of one step combine channel by channel.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self._blocks = named_blocks(model)
        self._current: str | None = None
        self._call_index = 0
        self._tallies: dict[tuple[str, int], _Tally] = {}
        self._handles: list = []

    def __enter__(self):
        for name, block in self._blocks:
            self._handles.append(block.register_forward_pre_hook(self._enter_block(name)))
            self._handles.append(block.register_forward_hook(self._leave_block))
        return super().__enter__()

    def __exit__(self, *exc):
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        return super().__exit__(*exc)

    def _enter_block(self, name: str):
        def hook(module, args):
            self._current, self._call_index = name, 0
        return hook

    def _leave_block(self, module, args, output):
        self._current = None

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func in ACTIVATIONS and self._current is not None and isinstance(out, Tensor):
            key = (self._current, self._call_index)
            self._call_index += 1
            self._tallies.setdefault(key, _Tally()).add(out)
        return out

    def results(self) -> dict[str, dict[str, float]]:
        """{block: {"near_zero": fraction, "dead": fraction of channels}} for blocks with activations."""
        merged: dict[str, list[_Tally]] = {}
        for (name, _), tally in self._tallies.items():
            merged.setdefault(name, []).append(tally)
        out = {}
        for name, tallies in merged.items():
            total = sum(t.total for t in tallies)
            maxima = torch.cat([t.channel_max for t in tallies])
            out[name] = {"near_zero": sum(t.near_zero for t in tallies) / max(total, 1),
                         "dead": float((maxima < ACT_EPS).float().mean())}
        return out


def health_rows(step: int, grad_norms: dict[str, float], activations: dict[str, dict[str, float]]) -> list[dict]:
    """`stats.csv` rows of one step (one per block); warns when a block has lost most of its channels."""
    rows = []
    for block, norm in grad_norms.items():
        act = activations.get(block, {})
        rows.append({"step": step, "block": block, "grad_norm": norm,
                     "near_zero": act.get("near_zero", math.nan), "dead": act.get("dead", math.nan)})
    dead = [block for block, act in activations.items() if act["dead"] > 0.5]
    if dead:
        log.warning("step %d: more than half of the channels are dead in %s", step, ", ".join(dead))
    return rows
