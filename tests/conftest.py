"""Shared test settings: quiet TensorFlow, deterministic torch, small thread pools. Keras runs on the
backend the project picks (vae/__init__.py: torch unless KERAS_BACKEND says otherwise)."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("MPLBACKEND", "Agg")
if "IRIS_DIFFUSION_CACHE" not in os.environ:  # the CPU bf16 verdict of the tests' runs stays out of ~/.cache
    import tempfile

    os.environ["IRIS_DIFFUSION_CACHE"] = tempfile.mkdtemp(prefix="iris-diffusion-cache-")

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


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """An untrained 32 px grey diffusion checkpoint (raw weights only): enough wherever the pixels
    need not look like eyes (priors at strength 0, file formats, …); made in about a second."""
    import torch

    from guided_diffusion.training.checkpoint import save_checkpoint
    from guided_diffusion.training.factory import create_model
    from pipeline.common.config import config_from_dict
    from tests.test_train_cli import TINY

    cfg = config_from_dict({**TINY, "data": {**TINY["data"], "image_size": 32},
                            "model": {**TINY["model"], "attention_resolutions": [16]}})
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("run32")
    save_checkpoint(root, 0, cfg, create_model(cfg).state_dict(), {}, {"step": 0}, keep_last=0)
    return root


@pytest.fixture(scope="session")
def trained_pair(tmp_path_factory):
    """A tiny 32 px VAE file and diffusion run trained here (2 diffusion steps, 1 VAE epoch: the recipe
    of tests/test_generate.py; the pixels need not look like eyes): (vae.keras path, diffusion run)."""
    from functools import partial

    from pipeline.cli import train_diffusion
    from pipeline.common.config import load_config
    from pipeline.data.folders import load_image_array
    from tests.test_generate import TINY
    from vae import train as vae_train

    root = tmp_path_factory.mktemp("pair")
    cfg_path = root / "tiny.yaml"
    cfg_path.write_text("{}\n")
    train_diffusion.main.__wrapped__(["--config", str(cfg_path), *sum((["--set", s] for s in TINY), []),
                                      "--out", str(root / "diffusion"), "--device", "cpu"])
    cfg = load_config(cfg_path, TINY)
    vae_train.train(cfg, partial(load_image_array, cfg.data), root / "vae", verbose=0)
    return root / "vae" / "vae.keras", root / "diffusion"
