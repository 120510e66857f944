"""Per-image random streams for `generate`: one key per (seed, image index, purpose).

Key = numpy.random.SeedSequence(entropy=seed, spawn_key=(index, purpose number)), the same key
`SeedSequence(seed).spawn` gives its children's children; SeedSequence hashes entropy and spawn
key together, so distinct (seed, index, purpose) give unrelated streams: seeds s and s + 1 share
no image, and no image's step noise repeats its starting noise. Image i's streams depend on
nothing else (not the batch, the batch size or the other images), so one image can be re-made
alone. Pure NumPy: the keys can be derived without torch.
"""

from __future__ import annotations

import numpy as np

from pipeline.common.errors import UserError

SCHEME = "numpy.random.SeedSequence(seed, spawn_key=(image index, purpose)), v1"
PURPOSES = ("start", "step", "vae")  # starting noise x_T / SDEdit noise, each step's noise, VAE latent ε
# Streams of optional features, keyed after PURPOSES (so theirs never change), described where used:
# a geometry VAE's targets drawn from its training geometry (pipeline.geometry_targets).
EXTRA_PURPOSES = ("geometry",)


def _sequence(seed: int, index: int, purpose: str) -> np.random.SeedSequence:
    if seed < 0:
        raise UserError(f"seed must be >= 0, got {seed}")
    if index < 0:
        raise ValueError(f"image index must be >= 0, got {index}")
    return np.random.SeedSequence(seed, spawn_key=(index, (*PURPOSES, *EXTRA_PURPOSES).index(purpose)))


def stream_seed(seed: int, index: int, purpose: str) -> int:
    """A 64-bit seed (for torch.Generator.manual_seed) of image `index`'s `purpose` stream."""
    return int(_sequence(seed, index, purpose).generate_state(1, np.uint64)[0])


def numpy_stream(seed: int, index: int, purpose: str) -> np.random.Generator:
    """A NumPy generator on image `index`'s `purpose` stream."""
    return np.random.default_rng(_sequence(seed, index, purpose))


def describe(seed: int) -> dict:
    """How the streams were derived, for metadata.json."""
    return {"seed": seed, "scheme": SCHEME, "purposes": {p: i for i, p in enumerate(PURPOSES)},
            "torch": "torch.Generator().manual_seed(stream_seed(seed, index, purpose)); 'step' on the sampling device",
            "numpy": "numpy.random.default_rng(SeedSequence(...)) for 'vae'"}
