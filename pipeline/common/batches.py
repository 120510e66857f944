"""Batch order as a pure function of (seed, epoch), shared by the VAE and diffusion trainers.

`epoch_permutation(n, seed, epoch)` is the one shuffle both use, so a trainer resuming in the
middle of epoch e rebuilds that epoch's order and skips the first k batches. Horizontal flips are
decided per (seed, epoch, index) the same way.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from pipeline.common.errors import UserError


def _epoch_rng(seed: int, epoch: int, stream: int) -> np.random.Generator:
    if seed < 0 or epoch < 0:
        raise UserError(f"seed and epoch must be >= 0, got seed={seed}, epoch={epoch}")
    return np.random.default_rng([seed, epoch, stream])


def epoch_permutation(n: int, seed: int, epoch: int) -> np.ndarray:
    """The order of epoch `epoch`: a permutation of range(n) that depends only on (seed, epoch)."""
    return _epoch_rng(seed, epoch, 0).permutation(n)


def flip_mask(n: int, seed: int, epoch: int) -> np.ndarray:
    """Which of the n images are mirrored in epoch `epoch` (by dataset index), from (seed, epoch)."""
    return _epoch_rng(seed, epoch, 1).random(n) < 0.5


def iterate_batches(images: np.ndarray, batch_size: int, seed: int, shuffle: bool = True,
                    hflip: bool = False, drop_last: bool = True, start_epoch: int = 0) -> Iterator[np.ndarray]:
    """One epoch (`start_epoch`) of NumPy batches (B, C, H, W), ordered by `epoch_permutation`."""
    n = len(images)
    if batch_size < 1:
        raise UserError(f"batch size must be >= 1, got {batch_size}")
    order = epoch_permutation(n, seed, start_epoch) if shuffle else np.arange(n)
    flips = flip_mask(n, seed, start_epoch) if hflip else None
    stop = n - n % batch_size if drop_last else n
    for begin in range(0, stop, batch_size):
        idx = order[begin : begin + batch_size]
        batch = images[idx]
        if flips is not None:
            f = flips[idx]
            batch[f] = batch[f][..., ::-1]
        yield batch
