"""How much GPU memory a training run needs, and the settings that fit a memory budget.

The peak of a training step is the sum of (P = number of parameters):

    weights 4P + gradients 4P + AdamW moments 8P          fp32, always on the GPU
    + EMA 4P per rate                                      unless train.ema_device is cpu
    + half-precision weight copies                         autocast keeps them for backward
    + micro-batch × activations per image                  what autograd saves in one forward
    + micro-batch × recompute per image                    with checkpointing: one block re-run
    + workspace                                            cuDNN/cuBLAS workspaces, allocator rounding

The activation terms are counted, not guessed: `count_activation_bytes` runs the network's
forward on fake tensors at batch 1 and 2 and adds up what autograd saves. The periodic sample
grid runs without gradients in micro-batch-sized chunks with the training weights parked on
the CPU, so it needs less than a training step. Fitted against peaks measured on an H200
(tests/test_memory_plan.py) the sum lands within a few per cent; a plan keeps PLAN_FRACTION of
the budget for what it cannot see (fragmentation, another process on the GPU).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from guided_diffusion.activation_memory import ActivationBytes, count_activation_bytes
from guided_diffusion.training.factory import create_model
from guided_diffusion.training.step import PRECISIONS, check_batching, resolve_precision
from pipeline.common.config import Config
from pipeline.common.errors import UserError

log = logging.getLogger(__name__)

GIB = 1024**3
WORKSPACE_BYTES = GIB // 4
PLAN_FRACTION = 0.8  # plan to 80 % of the budget: 12.0 GiB of a T4's 15.0 usable
EMA_DEVICES = ("auto", "cpu", "same")


@dataclass(frozen=True)
class Settings:
    """The memory-relevant settings a plan chooses."""

    microbatch: int
    ema_device: str  # "same" (beside the model) | "cpu"
    use_checkpoint: bool

    def overrides(self) -> str:
        """The settings as `--set` arguments."""
        return (f"--set train.microbatch={self.microbatch} --set train.ema_device={self.ema_device} "
                f"--set model.use_checkpoint={str(self.use_checkpoint).lower()}")


@dataclass(frozen=True)
class Estimate:
    """The estimated peak of one setting, term by term (bytes)."""

    settings: Settings
    parts: dict[str, int]

    @property
    def peak(self) -> int:
        return sum(self.parts.values())


@dataclass(frozen=True)
class Plan:
    """What `plan_memory` found: what the run will use, and what fits the budget."""

    num_params: int
    precision: str
    budget: int | None  # bytes; None → no budget known
    fitting: Estimate | None  # the fastest of all settings within PLAN_FRACTION of the budget
    chosen: Estimate  # what the run will use: the configured settings, the auto ones filled in

    @property
    def fits(self) -> bool:
        return self.budget is None or self.chosen.peak <= self.budget * PLAN_FRACTION


def estimate(num_params: int, ema_rates: int, settings: Settings, activations: ActivationBytes,
             extra: Mapping[str, int] | None = None) -> Estimate:
    """The peak of a training step with `settings`; `extra` adds named terms (e.g. a second network)."""
    p, mb = num_params, settings.microbatch
    parts = {
        "weights (fp32)": 4 * p,
        "gradients (fp32)": 4 * p,
        "AdamW moments (fp32)": 8 * p,
        f"EMA {ema_rates} x fp32 on the GPU": 4 * p * ema_rates if settings.ema_device == "same" else 0,
        **dict(extra or {}),
        "half-precision weight copies": activations.fixed,
        f"activations {mb} x {activations.per_image / GIB:.3f} GiB": mb * activations.per_image,
        f"recompute {mb} x {activations.recompute / GIB:.3f} GiB (checkpointing)": mb * activations.recompute,
        "workspace": WORKSPACE_BYTES,
    }
    return Estimate(settings, parts)


def _activations(cfg: Config, precision: str, device_type: str, use_checkpoint: bool) -> ActivationBytes:
    """Counted on fake tensors; the half-precision weight copies held by autocast's cache are the
    same with or without checkpointing, so they come from the plain network."""
    def count(checkpointing: bool) -> ActivationBytes:
        model_cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, use_checkpoint=checkpointing,
                                                                        compile=False))  # counted eagerly
        with torch.device("meta"):
            model = create_model(model_cfg)
        return count_activation_bytes(model, cfg.data.image_size, cfg.data.channels, precision, device_type)

    plain = count(False)
    if not use_checkpoint:
        return plain
    return dataclasses.replace(count(True), fixed=plain.fixed)


def _divisors_descending(n: int) -> list[int]:
    return [m for m in range(n, 0, -1) if n % m == 0]


def plan_memory(cfg: Config, per_rank_batch: int, precision: str, budget: int | None,
                device_type: str = "cuda") -> Plan:
    """The settings the run will use and, given `budget` bytes, the fastest of all that fit.

    Fastest: no checkpointing if any micro-batch fits without it, then the largest micro-batch
    (a divisor of the per-process batch), then the EMA beside the model. The run's own choice is
    made among the settings its config leaves open: `train.microbatch: auto` (which may also
    switch `model.use_checkpoint` on, never off) and `train.ema_device: auto`. Without a budget,
    auto settings resolve to the whole batch and the EMA beside the model.
    """
    tc = cfg.train
    with torch.device("meta"):
        eager = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, compile=False))
        num_params = sum(p.numel() for p in create_model(eager).parameters())
    rates = len(tc.ema_rates)
    counts: dict[bool, ActivationBytes] = {}  # counted when first needed (checkpointing rarely is)

    def at(s: Settings) -> Estimate:
        if s.use_checkpoint not in counts:
            counts[s.use_checkpoint] = _activations(cfg, precision, device_type, s.use_checkpoint)
        return estimate(num_params, rates, s, counts[s.use_checkpoint])

    auto_mb, auto_ema = tc.microbatch == "auto", tc.ema_device == "auto"
    everything = [Settings(mb, ema, ckpt) for ckpt in (False, True) for mb in _divisors_descending(per_rank_batch)
                  for ema in ("same", "cpu")]
    allowed = [s for s in everything
               if (auto_mb or s.microbatch == (int(tc.microbatch) or per_rank_batch))
               and (auto_ema or s.ema_device == tc.ema_device)
               and (s.use_checkpoint if cfg.model.use_checkpoint else auto_mb or not s.use_checkpoint)]

    def first_fitting(candidates: list[Settings]) -> Estimate | None:
        if budget is None:
            return None
        return next((e for e in map(at, candidates) if e.peak <= budget * PLAN_FRACTION), None)

    if budget is None:
        chosen = at(allowed[0])
    else:
        chosen = first_fitting(allowed) or min(map(at, allowed), key=lambda e: e.peak)
    return Plan(num_params, precision, budget, first_fitting(everything), chosen)


def suggestion(plan: Plan | None, settings: Settings) -> str:
    """What to change when `settings` do not fit (or ran out of memory): the plan's fitting
    settings if they differ, else one step smaller (micro-batch, then EMA, then checkpointing)."""
    if plan is not None and plan.fitting is not None and plan.fitting.settings != settings:
        return plan.fitting.settings.overrides()
    if settings.microbatch > 1:
        return f"--set train.microbatch={max(m for m in range(1, settings.microbatch) if settings.microbatch % m == 0)}"
    if settings.ema_device == "same":
        return "--set train.ema_device=cpu"
    if not settings.use_checkpoint:
        return "--set model.use_checkpoint=true"
    return "a GPU with more memory, or a smaller model (model.model_channels, model.num_res_blocks)"


def format_plan(plan: Plan, name: str = "this config") -> str:
    """The plan as text; the last line is `peak estimate X.XX GiB` (of the settings the run uses)."""
    s = plan.chosen.settings
    lines = [f"memory plan for {name}: {plan.num_params / 1e6:.1f} M parameters, {plan.precision} "
             f"activations, micro-batch {s.microbatch}, EMA {'on the CPU' if s.ema_device == 'cpu' else 'on the GPU'}, "
             f"checkpointing {'on' if s.use_checkpoint else 'off'}"]
    lines += [f"  {part:<48} {size / GIB:7.2f} GiB" for part, size in plan.chosen.parts.items() if size]
    if plan.budget is not None:
        target = plan.budget * PLAN_FRACTION
        lines.append(f"budget {plan.budget / GIB:.2f} GiB, planned to {PLAN_FRACTION:.0%}: {target / GIB:.2f} GiB")
        if plan.fits:
            lines.append(f"fits; settings: {s.overrides()}")
        elif plan.fitting is None:
            lines.append("nothing fits: even micro-batch 1 with checkpointing and the EMA on the CPU needs more")
        else:
            lines.append(f"the configured settings do not fit; settings that fit: {plan.fitting.settings.overrides()} "
                         f"({plan.fitting.peak / GIB:.2f} GiB)")
    lines.append(f"peak estimate {plan.chosen.peak / GIB:.2f} GiB")
    return "\n".join(lines)


def gpu_budget(device: torch.device, gpu_memory_gib: float = 0.0) -> int | None:
    """The memory the plan may use: `gpu_memory_gib` if > 0, else the GPU's total (None off CUDA)."""
    if gpu_memory_gib < 0:
        raise UserError(f"the GPU memory budget must be >= 0 GiB (0 = the whole GPU), got {gpu_memory_gib}")
    if gpu_memory_gib > 0:
        return round(gpu_memory_gib * GIB)
    if device.type != "cuda":
        return None
    return torch.cuda.get_device_properties(device).total_memory


def resolve_settings(cfg: Config, device: torch.device, per_rank_batch: int, precision: str) -> tuple[Settings, Plan | None]:
    """The micro-batch, EMA place and checkpointing the run uses (train.microbatch already checked).
    On CUDA from the plan for this GPU (logged); elsewhere auto means the whole batch and the EMA
    beside the model."""
    tc = cfg.train
    if tc.ema_device not in EMA_DEVICES:
        raise UserError(f"unknown train.ema_device '{tc.ema_device}'; valid: {', '.join(EMA_DEVICES)}")
    if tc.ema_every < 1:
        raise UserError(f"train.ema_every must be >= 1, got {tc.ema_every}")
    budget = gpu_budget(device, tc.gpu_memory)
    if device.type != "cuda":
        microbatch = per_rank_batch if tc.microbatch == "auto" else tc.microbatch or per_rank_batch
        return Settings(microbatch, "same" if tc.ema_device == "auto" else tc.ema_device, cfg.model.use_checkpoint), None
    plan = plan_memory(cfg, per_rank_batch, precision, budget)
    log.info("%s", format_plan(plan, torch.cuda.get_device_name(device)))
    if not plan.fits:
        log.warning("the memory plan says this run may not fit the GPU; try %s", suggestion(plan, plan.chosen.settings))
    return plan.chosen.settings, plan


def plan_for_gpu(cfg: Config, device: torch.device, gpu_memory_gib: float | None = None) -> Plan:
    """`train-diffusion --plan`: the plan of one GPU process, for a GPU of `gpu_memory_gib` (else
    train.gpu_memory, else this machine's GPU). Planned from a machine without CUDA, precision
    auto means half precision (bf16 and fp16 activations take the same memory)."""
    tc = cfg.train
    check_batching(tc.batch_size, tc.microbatch)
    if gpu_memory_gib is not None and gpu_memory_gib <= 0:
        raise UserError(f"--gpu-memory must be > 0 GiB, got {gpu_memory_gib}")
    if device.type == "cuda" or tc.precision not in PRECISIONS:
        precision = resolve_precision(tc.precision, device)  # the real choice, or the error naming the valid ones
    else:
        precision = "fp16" if tc.precision == "auto" else tc.precision
    return plan_memory(cfg, tc.batch_size, precision, gpu_budget(device, gpu_memory_gib or tc.gpu_memory))
