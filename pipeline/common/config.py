"""Typed configuration: YAML file → nested dataclasses, `--set a.b=value` overrides, YAML dump.

Every field has a default, so an empty file is a valid config. Unknown keys and wrong types are
`UserError`s that name the key and list the valid ones.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import yaml

from pipeline.common.errors import UserError


@dataclass
class DataConfig:
    """Where images come from and how they are shaped."""

    path: str = "synthetic"  # an image folder, or "synthetic" for the built-in generator
    image_size: int = 64
    channels: int = 1  # 1 = grey (default), 3 = RGB
    hflip: bool = True
    cache: bool = True  # keep decoded images in memory
    synthetic_count: int = 2000  # images drawn when path is "synthetic"
    synthetic_defects: float = 0.0  # fraction of synthetic images with a labelled defect
    seed: int = 0
    allow_change: bool = False  # --resume on a dataset that differs from the checkpoint's (not remembered)


@dataclass
class ModelConfig:
    """The ADM U-Net (guided_diffusion.unet.UNetModel)."""

    model_channels: int = 128
    num_res_blocks: int = 2
    channel_mult: list[int] = field(default_factory=list)  # empty → chosen by image size
    attention_resolutions: list[int] = field(default_factory=lambda: [16, 8])  # feature-map sizes
    dropout: float = 0.0
    num_heads: int = 4
    num_head_channels: int = -1  # > 0 overrides num_heads
    use_scale_shift_norm: bool = True
    resblock_updown: bool = True
    use_checkpoint: bool = False
    learn_sigma: bool = False
    channels_last: bool = False
    compile: bool = False  # torch.compile (inductor) the U-Net's forward in place; weights and their names unchanged
    conv_algorithm: str = "auto"  # auto | direct | winograd: 3x3 convolutions on the CPU (guided_diffusion/winograd.py)


@dataclass
class DiffusionConfig:
    """The Gaussian diffusion process and its training objective."""

    steps: int = 4000
    noise_schedule: str = "linear"  # linear | cosine
    mean_type: str = "eps"  # eps | x0 | v
    var_type: str = "fixed_small"  # fixed_small | fixed_large | learned_range
    loss_type: str = "mse"  # mse | rescaled_mse | hybrid
    hybrid_lambda: float = 0.001
    timestep_sampler: str = "uniform"  # uniform | loss_aware


@dataclass
class TrainConfig:
    """The diffusion training loop."""

    batch_size: int = 32
    microbatch: int | str = 0  # 0 → no micro-batching (one pass of batch_size); auto → the memory plan's choice
    lr: float = 1e-4
    weight_decay: float = 0.0
    adam_betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    lr_schedule: str = "constant"  # constant | gear | cosine
    gear: list[list[float]] = field(default_factory=list)  # [[at, lr], …], at ascending
    gear_unit: str = "steps"  # steps | epochs
    warmup_steps: int = 0
    min_lr: float = 0.0  # floor of the cosine schedule
    epochs: int = 0  # 0 → limited by max_steps only
    max_steps: int = 0  # 0 → limited by epochs only
    ema_rates: list[float] = field(default_factory=lambda: [0.9999])
    ema_warmup: bool = True  # effective rate min(rate, (1+n)/(10+n)) so early EMA is not noise
    ema_device: str = "auto"  # auto (the memory plan's choice on a GPU) | cpu (off the GPU) | same (beside the model)
    ema_every: int = 1  # fold the weights into the EMA every k steps (with the k steps' decay)
    gpu_memory: float = 0.0  # GiB of the GPU the memory plan may use; 0 → all of it
    grad_clip: float = 1.0  # 0 → off
    precision: str = "auto"  # auto (bf16 on capable GPUs; on CPUs bf16 where native and a self-check finds it faster) | fp32 | bf16 | fp16
    max_bad_steps: int = 20  # consecutive non-finite steps before stopping
    log_every: int = 50
    save_every: int = 1000
    sample_every: int = 1000
    stats_every: int = 500  # dead-activation fraction and per-block grad norms
    keep_last: int = 2  # checkpoints kept, newest first (0 → all); old ones go only once the new one is complete
    save_every_minutes: float = 0.0  # also save at the first step this long after the last save; 0 → off
    save_dtype: str = "fp32"  # fp32 | fp16 | bf16: the EMA weight files (model and optimizer stay fp32)
    final_optimizer: bool = True  # false → the run's last checkpoint drops the optimizer state, model in save_dtype
    on_save_error: str = "stop"  # a save failed (disk full, I/O error): stop | warn (keep training, retry at the next save)
    sample_count: int = 16
    sample_steps: int = 25  # DDIM steps for the periodic sample grid
    seed: int = 0


VAE_CONDITIONS = ("none", "geometry")  # vae.condition: what a conditional VAE is conditioned on


@dataclass
class VAEConfig:
    """Stage 1: the Keras VAE (image size and channels come from `data`)."""

    latent_dim: int = 64
    base_channels: int = 32
    channel_mult: list[int] = field(default_factory=lambda: [1, 2, 4, 4])
    norm: str = "group"  # group | batch
    recon_loss: str = "mse"  # mse | l1
    beta: float = 1.0
    kl_warmup_epochs: int = 5
    free_bits: float = 0.0  # nats per latent dimension; 0 → off
    prior: str = "fitted"  # fitted: Gaussian fitted to the encoded training images | standard: N(0, I)
    lr: float = 1e-3
    lr_schedule: str = "cosine"  # constant | cosine (lr → lr/20 over vae.epochs)
    batch_size: int = 64
    epochs: int = 30
    early_stop_patience: int = 10  # epochs without improvement of the monitored ELBO; 0 → off
    val_fraction: float = 0.05  # images held out for validation (monitor val_elbo); 0 → monitor training elbo
    seed: int = 0
    condition: str = "none"  # none | geometry: a CVAE conditioned on (pupil/iris ratio, iris radius, pupil offset)
    condition_dropout: float = 0.0  # CVAE: share of training rows whose condition is dropped (null condition)


@dataclass
class GenerateConfig:
    """Sampling: from VAE priors, the user's images, or pure noise."""

    n: int = 64
    strength: float = 0.5  # t_start = the kept step nearest strength · T; t_start + 1 network evaluations
    sampler: str = "ddim"  # ddim | ddpm | dpm++2m (DPM-Solver++(2M), good at 10-20 steps)
    steps: int = 50  # respaced steps over the full schedule
    eta: float = 0.0
    batch_size: int = 0  # 0 → auto: 64 on CUDA (mixed precision fills the GPU), 16 elsewhere
    precision: str = "auto"  # auto (bf16 on CUDA where supported, else fp16; on CPUs as train.precision auto) | fp32 | bf16 | fp16
    seed: int = 0
    clip_denoised: bool = True
    use_ema: float = -1.0  # -1 → the slowest EMA rate saved with the checkpoint; 0 → raw weights
    temperature: float = 1.0  # VAE latent temperature
    format: str = "png"  # png | bmp | tiff: the images' file type (grid.png stays PNG)
    bits: int = 8  # 8 | 16 (png and tiff only)
    geometry_feedback: int = 2  # with geometry targets: rounds of per-image correction (0 = open loop)
    geometry_tolerance: float = 0.01  # |measured − target| under which an image is kept as it is


@dataclass
class CircularityConfig:
    """Pass/fail thresholds of `circularity-check`: `min_<metric>` / `max_<metric>`, applied in
    this order; an image's reason is the first that fails (see pipeline/check/rules.py).

    Bleed comes first (dark tongues also make a pupil look irregular: name the cause), then the
    ellipse axis ratio before circularity and radial deviation (an oval also scores low on both:
    name the specific shape), then the position and size rules.
    """

    max_bleed_fraction: float = 0.01  # pupil-dark pixels in the visible iris annulus, fraction
    min_pupil_axis_ratio: float = 0.85  # fitted-ellipse minor/major axis
    min_pupil_circularity: float = 0.90  # 4πA/P² of the sub-pixel pupil boundary
    max_pupil_radial_dev: float = 0.06  # std/mean of the pupil boundary's distance from its centre
    max_concentricity: float = 0.15  # pupil-iris centre offset / iris radius
    min_iris_circularity: float = 0.90  # 1 − robust std/mean of the limbus radius (left/right sectors)
    min_pupil_iris_ratio: float = 0.15  # pupil radius / iris radius
    max_pupil_iris_ratio: float = 0.75


@dataclass
class PrepareConfig:
    """`prepare-data`: real frames → iris-centred training crops (see pipeline/prepare.py)."""

    size: int = 128  # side of the square crops, pixels
    margin: float = 1.2  # crop side = 2 · margin · iris radius (1 → the iris touches the edges)
    channels: int = 1  # 1 = grey, 3 = RGB (grey frames repeated, RGB frames → BT.601 luminance for 1)
    min_frame_side: int = 64  # shorter frame side below this → rejected "too small"
    max_iris_outside: float = 0.1  # share of the iris disk's area outside the frame above which → "iris cut by frame"
    min_usable_iris_area: float = 0.5  # usable_iris_area (unoccluded share of the annulus) below this → "occluded"
    workers: int = 0  # processes; 0 → min(4, CPUs); 1 runs inline


@dataclass
class IdentityConfig:
    """`identity-check`: iris codes of generated eyes, their impostor statistics and their nearest
    training eyes (see pipeline/identity.py)."""

    grid: list[int] = field(default_factory=lambda: [16, 256])  # rings × angles of the code (pipeline.check.iris_code)
    max_shift: int = 8  # angular samples tried either way for rotation (8 of 256: ±11°)
    # A pair below this Hamming distance counts as the same eye: 0.32 is the decision criterion of
    # J. Daugman's iris recognition ("How iris recognition works", IEEE TCSVT 14(1), 2004), at which
    # his impostor distribution's binomial tail gives odds of a false match of about 1 in 26 million.
    near_copy_hd: float = 0.32
    max_pairs: int = 20000  # impostor pairs compared per set; more pairs than this → this many sampled with `seed`
    seed: int = 0
    workers: int = 0  # processes coding images; 0 → min(4, CPUs); 1 runs inline
    # Report Daugman's rescaled HD, 0.5 − (0.5 − HD)·√(n / n_typ), n the bits compared: fewer bits, nearer
    # 0.5. n_typ is the median bits compared of the reference's pairs, else the generated ones (Daugman's 911 fits his 2048-bit code).
    rescale: bool = True


@dataclass
class Config:
    """A whole run: every section, each with defaults."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    vae: VAEConfig = field(default_factory=VAEConfig)
    generate: GenerateConfig = field(default_factory=GenerateConfig)
    circularity: CircularityConfig = field(default_factory=CircularityConfig)
    prepare: PrepareConfig = field(default_factory=PrepareConfig)
    identity: IdentityConfig = field(default_factory=IdentityConfig)


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against the annotation `tp`, converting only where it is lossless."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        for arg in args[:-1]:  # the first type that takes the value, e.g. int | str: 3 → 3, "auto" → "auto"
            try:
                return _coerce(value, arg, key)
            except UserError:
                continue
        return _coerce(value, args[-1], key)
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise UserError(f"config key '{key}' must be a list of {_type_name(typing.get_args(tp)[0])}, got {value!r}")
        (item_tp,) = typing.get_args(tp)
        return [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # PyYAML reads 1e-4 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, int) and not isinstance(value, bool):  # e.g. a folder named 2024
            return str(value)
    raise UserError(f"config key '{key}' must be {_type_name(tp)}, got {value!r}")


def _build(cls: type, data: Any, prefix: str) -> Any:
    """Build dataclass `cls` from a mapping, rejecting unknown keys."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise UserError(f"config section '{prefix or 'top level'}' must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        full = f"{prefix}.{key}" if prefix else str(key)
        if key not in names:
            raise UserError(f"unknown config key '{full}'; valid keys: {', '.join(names)}")
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            kwargs[key] = _build(tp, value, full)
        else:
            kwargs[key] = _coerce(value, tp, full)
    return cls(**kwargs)


def _upgrade(data: dict | None) -> dict | None:
    """Read the keys of older saved configs (checkpoints' config.yaml is re-read) as their
    replacements: generate.png16 (before issue 19) → generate.bits 16 when true and bits is unset."""
    gen = data.get("generate") if isinstance(data, dict) else None
    if not isinstance(gen, dict) or "png16" not in gen:
        return data
    gen = dict(gen)
    if _coerce(gen.pop("png16"), bool, "generate.png16"):
        gen.setdefault("bits", 16)
    return {**data, "generate": gen}


def config_from_dict(data: dict | None) -> Config:
    """Build a `Config` from a nested mapping (e.g. parsed YAML)."""
    return _build(Config, _upgrade(data), "")


def _parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise UserError(f"--set expects key=value, got '{item}'")
    key, raw = item.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.strip().split("."), value


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply `a.b=value` strings (values parsed as YAML) onto a nested mapping, in order."""
    for item in overrides:
        path, value = _parse_override(item)
        node = data
        for part in path[:-1]:
            if node.get(part) is None:  # absent, or an empty section in the YAML file
                node[part] = {}
            node = node[part]
            if not isinstance(node, dict):
                raise UserError(f"--set {item}: '{part}' is not a section")
        node[path[-1]] = value
    return data


def read_yaml(path: str | Path) -> dict:
    """Read a YAML mapping, turning I/O and syntax problems into `UserError`s."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark else ""
        raise UserError(f"invalid YAML in {path}{where}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"config file {path} must contain a mapping of sections")
    return data


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Load a YAML config (or the defaults) and apply `--set` overrides."""
    data = read_yaml(path) if path else {}
    return config_from_dict(apply_overrides(data, list(overrides or [])))


def config_to_dict(cfg: Config) -> dict:
    """The config as plain nested dicts/lists, ready for YAML or JSON."""
    return dataclasses.asdict(cfg)


def dump_config(cfg: Config) -> str:
    """The config as YAML text that `load_config` reads back to an equal `Config`."""
    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False)
