"""Real FID/KID features: Inception-v3 pool features through clean-fid (the optional extra
`metrics`: `pip install -e '.[metrics]'`). The default everywhere stays the offline proxy features
of `pipeline.check.metrics`; this module is used only with `--metrics inception`.

Why clean-fid (Parmar et al., 2022) and not torchmetrics / torch-fidelity: the two pieces needed
here — `cleanfid.inception_torchscript.InceptionV3W` (NVIDIA's TorchScript port of the TF
Inception graph behind published FIDs, `inception-2015-12-05.pt`) and `cleanfid.resize` (its
antialiased resize) — import only torch, NumPy, PIL and requests. torchmetrics' FID/KID import
`torch_fidelity.feature_extractor_inceptionv3`, and importing anything from torch-fidelity runs its
package `__init__`, which imports torchvision; torchvision must match torch exactly and is not
always installable beside it. clean-fid's "clean" resize also fixes the aliasing of the legacy
TF/PyTorch resizes, which matters here: 128 px eyes are enlarged to 299 px.

This replaces the former TorchScript recipe built on torchvision's `inception_v3`, which fed the
network ImageNet-normalised input with `transform_input=False`, while those (Google, TF-ported)
weights expect input scaled to [-1, 1]: its features were mis-normalised. The TorchScript file
used here normalises inside the library's `InceptionV3W.forward`: (x − 128) / 128.

Preprocessing, step for step clean-fid's "clean" mode (`cleanfid.fid.get_model_features` for
arrays, `cleanfid.utils.ResizeDataset` for files):
  1. pixels → uint8: images in [-1, 1] are rounded like the PNGs this project writes
     (`common.images.to_uint8`), so an in-memory set and the same set saved to disk score alike;
     files are read as stored (16-bit or float pixels rounded to 8 bits, as clean-fid reads 8-bit);
  2. grey → RGB by repeating the channel (what PIL's `convert("RGB")` does in clean-fid), alpha dropped;
  3. each channel resized to 299 × 299 by PIL bicubic on float32, kept in [0, 255] without
     re-quantising (`cleanfid.resize.build_resizer("clean")`);
  4. `InceptionV3W`: (x − 128) / 128, the TF-ported layers, (N, 2048) pool features.
Values are therefore clean-fid "clean" FID/KID, comparable with clean-fid's, not with legacy-TF
FIDs. Nothing is downloaded: the weights come from a given path, or from clean-fid's own download
location when the file is already there.
"""

from __future__ import annotations

import logging
import os
import platform
import tempfile
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from pipeline.check.folder import read_image
from pipeline.common.errors import UserError
from pipeline.common.images import nchw_to_nhwc, to_uint8

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

WEIGHTS_NAME = "inception-2015-12-05.pt"  # the file name clean-fid loads
FEATURES_LABEL = "inception-v3 (clean-fid)"
INSTALL_HINT = "--metrics inception needs clean-fid: pip install -e '.[metrics]'"


def _cleanfid() -> tuple[type, Callable[[str], Callable[[np.ndarray], np.ndarray]], str]:
    """(InceptionV3W, build_resizer, weights URL) from clean-fid's torchvision-free modules."""
    try:
        from cleanfid.downloads_helper import inception_url
        from cleanfid.inception_torchscript import InceptionV3W
        from cleanfid.resize import build_resizer
    except ImportError:
        raise UserError(INSTALL_HINT) from None
    return InceptionV3W, build_resizer, inception_url


def library_cache() -> Path:
    """Where clean-fid downloads the weights itself (`cleanfid.features.feature_extractor`)."""
    return Path("." if platform.system() == "Windows" else "/tmp") / WEIGHTS_NAME


def find_weights(path: str | Path | None = None) -> Path:
    """The Inception weights file: `path` (a file, or a folder holding WEIGHTS_NAME), else clean-fid's
    download location if the file is already there. UserError (saying how to get it) when absent,
    or when clean-fid is not installed."""
    url = _cleanfid()[2]
    target = Path(path) if path else library_cache()
    if target.is_dir():
        target = target / WEIGHTS_NAME
    if not target.is_file():
        where = "" if path else " (clean-fid's cache; no --inception-weights FILE given)"
        raise UserError(f"Inception weights not found: {target}{where} (how to get them once: "
                        f"curl -L -o {target} {url})")
    return target


def to_rgb_uint8(img: np.ndarray) -> np.ndarray:
    """HW / HWC pixels as stored (uint8, uint16, or float in [0, 1]) → HWC uint8 RGB, as clean-fid
    reads a file: a grey channel repeated, alpha dropped; 16-bit and float pixels rounded to 8 bits."""
    img = np.asarray(img)
    if img.dtype == np.uint16:
        img = np.round(img / 257.0).astype(np.uint8)
    elif img.dtype != np.uint8:
        img = np.round(np.clip(img, 0.0, 1.0) * 255.0).astype(np.uint8)
    if img.ndim == 2:
        img = img[:, :, None]
    img = img[:, :, :3] if img.shape[2] >= 3 else img[:, :, :1]
    return np.repeat(img, 3, axis=2) if img.shape[2] == 1 else img


def _load(inception_v3w: type, weights: Path) -> torch.nn.Module:
    """clean-fid's InceptionV3W on `weights` (it loads `<folder>/inception-2015-12-05.pt` only, so a
    file of another name is linked under that name in a temporary folder)."""
    if weights.name == WEIGHTS_NAME:
        return inception_v3w(str(weights.parent), download=False)
    with tempfile.TemporaryDirectory() as tmp:
        os.symlink(weights.resolve(), Path(tmp) / WEIGHTS_NAME)
        return inception_v3w(tmp, download=False)


class InceptionFeatures:
    """clean-fid's Inception-v3 as a feature function: images (N, C, H, W) in [-1, 1] (C = 1 or 3,
    any size) → (N, 2048) float64; `from_pixels` / `from_files` for stored pixels of any size."""

    label = FEATURES_LABEL

    def __init__(self, weights: str | Path | None = None, device: str = "cpu", batch_size: int = 32):
        inception_v3w, build_resizer, _ = _cleanfid()
        self.weights = find_weights(weights)
        self.device, self.batch_size = device, batch_size
        self._resize = build_resizer("clean")
        try:
            self._model = _load(inception_v3w, self.weights).to(device).eval()
        except Exception as exc:  # noqa: BLE001 - any load failure is the user's file
            raise UserError(f"cannot load {self.weights} as clean-fid's TorchScript Inception "
                            f"({WEIGHTS_NAME}): {type(exc).__name__}") from None
        log.info("Inception-v3 features from %s on %s", self.weights, device)

    def __call__(self, images: np.ndarray) -> np.ndarray:
        x = np.asarray(images)
        if x.ndim != 4 or x.shape[1] not in (1, 3):
            raise UserError(f"images must be (N, 1|3, H, W), got shape {x.shape}")
        return self.from_pixels(nchw_to_nhwc(to_uint8(x)))

    def from_files(self, paths: Sequence[Path]) -> np.ndarray:
        """Features of image files, read as stored (see `to_rgb_uint8`)."""
        return self.from_pixels(read_image(p) for p in paths)

    def from_pixels(self, images: Iterable[np.ndarray]) -> np.ndarray:
        """Features of HW / HWC images of any size (see `to_rgb_uint8`), in batches."""
        out, batch = [], []
        for img in images:
            batch.append(np.ascontiguousarray(self._resize(to_rgb_uint8(img)).transpose(2, 0, 1)))
            if len(batch) == self.batch_size:
                out.append(self._features(batch))
                batch = []
        if batch:
            out.append(self._features(batch))
        return np.concatenate(out) if out else np.zeros((0, 2048))

    def _features(self, batch: list[np.ndarray]) -> np.ndarray:
        import torch

        with torch.inference_mode():
            feats = self._model(torch.from_numpy(np.stack(batch)).to(self.device))
        return feats.double().cpu().numpy()
