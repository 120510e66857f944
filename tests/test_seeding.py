"""The seed contract: one independent stream per (seed, image index, purpose)."""

import numpy as np
import pytest
import torch

from pipeline.common.errors import UserError
from pipeline.common.seeding import PURPOSES, numpy_stream, stream_seed

N_IMAGES, LENGTH = 64, 16384  # |corr| of independent streams of this length: std 0.008


def _stream(seed: int, index: int, purpose: str) -> np.ndarray:
    """The first LENGTH draws of a stream, as generate draws them (torch for noise, NumPy for the VAE)."""
    if purpose == "vae":
        return numpy_stream(seed, index, purpose).standard_normal(LENGTH)
    g = torch.Generator().manual_seed(stream_seed(seed, index, purpose))
    return torch.randn(LENGTH, generator=g, dtype=torch.float64).numpy()


def test_streams_of_a_run_and_of_the_next_seed_are_independent():
    rows = np.stack([_stream(seed, i, p) for seed in (0, 1) for i in range(N_IMAGES) for p in PURPOSES])
    corr = np.corrcoef(rows)
    np.fill_diagonal(corr, 0.0)
    assert np.abs(corr).max() < 0.05
    assert len({r.tobytes() for r in rows}) == len(rows)  # no two streams are equal


def test_keys_are_distinct_and_stable():
    keys = {stream_seed(s, i, p) for s in range(4) for i in range(256) for p in PURPOSES}
    assert len(keys) == 4 * 256 * len(PURPOSES)
    assert stream_seed(0, 17, "step") == stream_seed(0, 17, "step")
    # the key is SeedSequence(seed).spawn's grandchild: derivable without this module
    child = np.random.SeedSequence(3).spawn(18)[17].spawn(2)[1]
    assert stream_seed(3, 17, "step") == int(child.generate_state(1, np.uint64)[0])


def test_negative_seed_is_a_user_error():
    with pytest.raises(UserError, match="seed"):
        stream_seed(-1, 0, "start")
