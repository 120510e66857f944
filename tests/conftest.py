"""Shared test settings: quiet TensorFlow, deterministic torch, small thread pools. Keras runs on the
backend the project picks (vae/__init__.py: torch unless KERAS_BACKEND says otherwise)."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("MPLBACKEND", "Agg")

import pytest  # noqa: E402

import vae  # noqa: E402, F401  (picks Keras' backend before any test imports keras)


@pytest.fixture(autouse=True)
def _seed_torch():
    """Every test starts from the same torch RNG state."""
    try:
        import torch
    except ImportError:  # pragma: no cover
        yield
        return
    torch.manual_seed(0)
    yield


@pytest.fixture
def one_torch_thread():
    """One torch thread: on a small, shared CPU two threads contend and run several times slower."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
