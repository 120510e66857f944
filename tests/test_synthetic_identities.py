"""Synthetic identities (pipeline.data.synthetic_identities): captures of one eye share its iris
texture, other eyes do not; and the built-in renderers they reuse still draw the same pixels."""

import hashlib
import json

import pytest

from pipeline.data.synthetic import generate_irises
from pipeline.data.synthetic_frames import iter_frames

# SHA-256 of the images' bytes and their records (JSON), drawn before the renderers were split
# into pieces the identities reuse: any change to a pixel or a record of the existing sets shows.
IRIS_DIGESTS = {
    32: "ee2e23255f25496681620cd386740034426c165bf7454c7ee43aaf1a5c5f3b14",
    64: "b7823beab7fedfb4c4734cd35c7b58488d21d5d314a694656f5eadf9bdc7f883",
    96: "8bec6ba146644826295a71d9fd082c8d6bcd9a179f95240bcbf5e67a5f611dd1",
    128: "3b39d716267194923a4832f3c089ba72688ae6534139b0b910d3f325cf2d58a8",
}
FRAMES_DIGEST = "cf3214d1975793f96df6763f1c5f4d7dc5ef9a94036eeec315a9b6708a9b7193"


def _digest(pairs) -> str:
    h = hashlib.sha256()
    for img, rec in pairs:
        h.update(img.tobytes())
        h.update(json.dumps(rec).encode())
    return h.hexdigest()


@pytest.mark.parametrize("size", sorted(IRIS_DIGESTS))
def test_built_in_irises_are_unchanged(size):
    images, records = generate_irises(40, size, seed=3, defects=0.3)
    assert _digest(zip(images, records, strict=True)) == IRIS_DIGESTS[size]


def test_built_in_frames_are_unchanged():
    assert _digest(iter_frames(5, 480, 640, seed=1, kinds=(0.3, 0.2))) == FRAMES_DIGEST
