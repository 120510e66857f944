"""Priors of another size than the diffusion model: resize and convert channels to the model's (C, H, W).

Shrinking uses area averaging (cv2.INTER_AREA, the anti-aliased choice); enlarging uses bicubic
interpolation (cv2.INTER_CUBIC); the result is clipped back to [-1, 1] (cubic overshoots at edges).
Height and width are judged separately: area only when neither grows. Channels follow
`pipeline.common.images.convert_channels` (grey → RGB repeated, RGB → grey by BT.601 luminance).
"""

from __future__ import annotations

import cv2
import numpy as np

from pipeline.common.errors import UserError
from pipeline.common.images import convert_channels

CHANNEL_NOTES = {(1, 3): "grey→rgb (repeated)", (3, 1): "rgb→grey (BT.601)"}


def _check_channels(what: str, c: int) -> None:
    if c not in (1, 3):
        raise UserError(f"{what} must have 1 (grey) or 3 (RGB) channels, got {c}")


def resize_method(src_hw: tuple[int, int], dst_hw: tuple[int, int]) -> str:
    """'none' when equal, 'area' when no side grows, else 'cubic'."""
    if src_hw == dst_hw:
        return "none"
    return "area" if dst_hw[0] <= src_hw[0] and dst_hw[1] <= src_hw[1] else "cubic"


def _resize(images_nhwc: np.ndarray, dst_hw: tuple[int, int], method: str) -> np.ndarray:
    flag = cv2.INTER_AREA if method == "area" else cv2.INTER_CUBIC
    n, _, _, c = images_nhwc.shape
    out = np.empty((n, *dst_hw, c), np.float32)
    for i, img in enumerate(images_nhwc):
        resized = cv2.resize(img, (dst_hw[1], dst_hw[0]), interpolation=flag)  # cv2 takes (width, height)
        out[i] = resized.reshape(*dst_hw, c)  # cv2 drops a single channel axis
    return out


def fit_priors(priors: np.ndarray, shape: tuple[int, int, int]) -> tuple[np.ndarray, dict]:
    """Priors (N, C, H, W) float32 in [-1, 1] → (N, *shape) and a note of what was done.

    Unchanged (the same array) when the shapes already agree. The note is
    {"from": [C, H, W], "to": [C, H, W], "method": "none" | "area" | "cubic",
    "channels": "kept" | "grey→rgb (repeated)" | "rgb→grey (BT.601)"}.
    """
    priors = np.asarray(priors, np.float32)
    if priors.ndim != 4:
        raise UserError(f"priors must be an (N, C, H, W) array, got shape {priors.shape}")
    c, h, w = priors.shape[1:]
    to_c, to_h, to_w = (int(v) for v in shape)
    _check_channels("priors", c)
    _check_channels("the diffusion model's images", to_c)
    method = resize_method((h, w), (to_h, to_w))
    info = {"from": [c, h, w], "to": [to_c, to_h, to_w], "method": method,
            "channels": CHANNEL_NOTES.get((c, to_c), "kept")}
    if method == "none" and c == to_c:
        return priors, info
    x = np.transpose(priors, (0, 2, 3, 1))
    if to_c < c:  # resize the fewer channels: convert first when they drop, after when they grow
        x = convert_channels(x, to_c)
    if method != "none":
        x = _resize(np.ascontiguousarray(x), (to_h, to_w), method)
    x = np.clip(convert_channels(x, to_c), -1.0, 1.0)  # cubic overshoots edges; luminance may round past ±1
    return np.ascontiguousarray(np.transpose(x, (0, 3, 1, 2)), dtype=np.float32), info


def describe_fit(info: dict) -> str:
    """'64x64x1 resized to 128x128x1 (cubic)' (width x height x channels), for the log."""
    def size(chw: list[int]) -> str:
        return f"{chw[2]}x{chw[1]}x{chw[0]}"

    channels = "" if info["channels"] == "kept" else f", {info['channels']}"
    return f"{size(info['from'])} resized to {size(info['to'])} ({info['method']}{channels})"
