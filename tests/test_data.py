"""Image folders and batches: decoding, channel conversion, resize/crop, errors, deterministic order."""

import logging

import cv2
import numpy as np
import pytest
from PIL import Image

from pipeline.common.batches import epoch_permutation, flip_mask, iterate_batches
from pipeline.common.config import DataConfig
from pipeline.common.errors import UserError
from pipeline.data.folders import list_image_files, load_image_array, read_image
from pipeline.data.synthetic import generate_irises


def _write(path, img):
    """Write HW / HWC (RGB or RGBA order) uint8/uint16 with OpenCV."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if img.ndim == 3:
        img = img[:, :, [2, 1, 0, 3][: img.shape[2]]]
    assert cv2.imwrite(str(path), img)
    return path


def _const(h, w, value, channels=None, dtype=np.uint8):
    shape = (h, w) if channels is None else (h, w, channels)
    return np.full(shape, value, dtype)


@pytest.mark.parametrize("name,img,expected", [
    ("grey8.png", _const(40, 40, 255), 1.0),
    ("grey8_zero.bmp", _const(40, 40, 0), -1.0),
    ("grey16.png", _const(40, 40, 65535, dtype=np.uint16), 1.0),
    ("grey16_mid.tif", _const(40, 40, 16384, dtype=np.uint16), 16384 / 65535 * 2 - 1),
    ("grey8.tiff", _const(40, 40, 51), 51 / 255 * 2 - 1),
])
def test_exact_values_of_8_and_16_bit_files(tmp_path, name, img, expected):
    out = read_image(_write(tmp_path / name, img), 32, 1)
    assert out.shape == (1, 32, 32) and out.dtype == np.float32
    np.testing.assert_allclose(out, expected, atol=1e-6)


def test_jpeg_is_close(tmp_path):
    out = read_image(_write(tmp_path / "a.JPG", _const(40, 40, 200)), 32, 1)
    np.testing.assert_allclose(out, 200 / 255 * 2 - 1, atol=3 / 255)


def test_rgb_to_grey_is_luminance_and_alpha_is_dropped(tmp_path):
    rgb = (30, 200, 90)
    expect = (0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2]) / 255 * 2 - 1
    rgba = np.dstack([np.full((36, 36), v, np.uint8) for v in (*rgb, 0)])  # fully transparent
    for name, img in [("rgb.png", rgba[:, :, :3]), ("rgba.png", rgba)]:
        grey = read_image(_write(tmp_path / name, img), 32, 1)
        np.testing.assert_allclose(grey, expect, atol=1e-5)
        colour = read_image(tmp_path / name, 32, 3)
        np.testing.assert_allclose(colour[:, 0, 0], np.array(rgb) / 255 * 2 - 1, atol=1e-6)


def test_16_bit_rgb_keeps_precision(tmp_path):
    img = np.dstack([np.full((32, 32), v, np.uint16) for v in (1000, 40000, 65535)])
    out = read_image(_write(tmp_path / "rgb16.png", img), 32, 3)
    np.testing.assert_allclose(out[:, 5, 5], np.array([1000, 40000, 65535]) / 65535 * 2 - 1, atol=1e-6)


def test_grey_to_rgb_replicates_and_grey_alpha_is_read(tmp_path):
    grey = np.tile(np.arange(32, dtype=np.uint8) * 8, (32, 1))
    out = read_image(_write(tmp_path / "g.png", grey), 32, 3)
    assert np.array_equal(out[0], out[1]) and np.array_equal(out[1], out[2])
    np.testing.assert_allclose(out[0], grey / 255 * 2 - 1, atol=1e-6)
    Image.fromarray(np.dstack([grey, np.full_like(grey, 128)])).save(tmp_path / "la.png")  # mode LA
    np.testing.assert_allclose(read_image(tmp_path / "la.png", 32, 1)[0], grey / 255 * 2 - 1, atol=1e-6)


def test_resize_shorter_side_then_centre_crop(tmp_path):
    # 64 wide, 32 high, value 4·x: shrinking by 2 (INTER_AREA) averages column pairs,
    # and the centre crop keeps resized columns 8..23.
    ramp = np.tile((np.arange(64) * 4).astype(np.uint8), (32, 1))
    out = read_image(_write(tmp_path / "wide.png", ramp), 16, 1)[0]
    cols = np.arange(8, 24)
    expected = (4 * (2 * cols + 0.5)) / 255 * 2 - 1
    np.testing.assert_allclose(out, np.tile(expected, (16, 1)), atol=1e-5)
    # A tall image: rows are cropped instead, no resize needed when the short side already fits.
    tall = np.tile((np.arange(48) * 5).astype(np.uint8)[:, None], (1, 20))
    out = read_image(_write(tmp_path / "tall.png", tall), 20, 1)[0]
    np.testing.assert_allclose(out[:, 0], (np.arange(14, 34) * 5) / 255 * 2 - 1, atol=1e-6)


def test_folder_scan_is_recursive_sorted_and_skips_other_files(tmp_path, caplog):
    _write(tmp_path / "b.png", _const(32, 32, 10))
    _write(tmp_path / "sub" / "deeper" / "a.PNG", _const(32, 32, 20))
    _write(tmp_path / "sub" / "c.jpeg", _const(40, 48, 30, 3))
    (tmp_path / "notes.txt").write_text("not an image")
    (tmp_path / "sub" / "labels.json").write_text("[]")
    with caplog.at_level(logging.WARNING):
        files = list_image_files(tmp_path)
    assert [p.relative_to(tmp_path).as_posix() for p in files] == ["b.png", "sub/c.jpeg", "sub/deeper/a.PNG"]
    assert "skipped 2 non-image file(s)" in caplog.text
    images = load_image_array(DataConfig(path=str(tmp_path), image_size=32, channels=1, cache=False))
    assert images.shape == (3, 1, 32, 32) and images.dtype == np.float32
    np.testing.assert_allclose(images[:, 0, 0, 0], np.array([10, 30, 20]) / 255 * 2 - 1, atol=2 / 255)


def test_folder_errors(tmp_path):
    with pytest.raises(UserError, match="not found"):
        load_image_array(DataConfig(path=str(tmp_path / "missing")))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UserError, match="is empty"):
        load_image_array(DataConfig(path=str(empty)))
    other = tmp_path / "other"
    other.mkdir()
    (other / "readme.md").write_text("hi")
    with pytest.raises(UserError, match="has no image files"):
        load_image_array(DataConfig(path=str(other)))


def test_bad_image_files_are_user_errors_naming_the_file(tmp_path):
    good = _write(tmp_path / "ok" / "good.png", (np.arange(64 * 64) % 251).astype(np.uint8).reshape(64, 64))
    truncated = tmp_path / "t" / "cut.png"
    truncated.parent.mkdir()
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(UserError, match=r"cut\.png"):
        load_image_array(DataConfig(path=str(truncated.parent), image_size=32, cache=False))
    fake = tmp_path / "f" / "fake.jpg"
    fake.parent.mkdir()
    fake.write_text("this is not a jpeg")
    with pytest.raises(UserError, match=r"fake\.jpg"):
        read_image(fake, 32, 1)
    small = _write(tmp_path / "s" / "small.png", _const(12, 10, 5))
    with pytest.raises(UserError, match=r"small\.png is 10x12, smaller than the target size 32"):
        read_image(small, 32, 1)


def test_synthetic_path_and_cache():
    cfg = DataConfig(path="synthetic", image_size=32, synthetic_count=5, seed=3, synthetic_defects=0.4)
    images = load_image_array(cfg)
    assert np.array_equal(images, generate_irises(5, 32, seed=3, defects=0.4)[0])
    assert load_image_array(cfg) is images  # cached
    assert not images.flags.writeable
    uncached = DataConfig(path="synthetic", image_size=32, synthetic_count=5, seed=3, cache=False, synthetic_defects=0.4)
    again = load_image_array(uncached)
    assert again is not images and np.array_equal(again, images)
    with pytest.raises(UserError, match="channels"):
        load_image_array(DataConfig(channels=2))


def test_the_folder_cache_notices_added_and_replaced_files(tmp_path):
    """A notebook that adds or replaces images and trains again in the same process gets them."""
    cfg = DataConfig(path=str(tmp_path), image_size=16)
    _write(tmp_path / "a.png", _const(16, 16, 10))
    first = load_image_array(cfg)
    assert load_image_array(cfg) is first  # unchanged folder: cached
    _write(tmp_path / "b.png", _const(16, 16, 200))
    assert len(load_image_array(cfg)) == 2
    _write(tmp_path / "a.png", _const(20, 20, 250))  # replaced: another size
    assert load_image_array(cfg)[0].min() > 0.9


def test_epoch_permutation_is_a_pure_function_of_seed_and_epoch():
    p = epoch_permutation(50, seed=1, epoch=3)
    assert np.array_equal(np.sort(p), np.arange(50))
    assert np.array_equal(p, epoch_permutation(50, seed=1, epoch=3))
    assert not np.array_equal(p, epoch_permutation(50, seed=1, epoch=4))
    assert not np.array_equal(p, epoch_permutation(50, seed=2, epoch=3))
    epoch_permutation(50, seed=9, epoch=0)  # no hidden state: other calls change nothing
    assert np.array_equal(p, epoch_permutation(50, seed=1, epoch=3))
    with pytest.raises(UserError, match="seed and epoch must be >= 0"):
        epoch_permutation(5, seed=-1, epoch=0)


def _images(n=10):
    return np.arange(n * 2 * 4, dtype=np.float32).reshape(n, 1, 2, 4)


def test_iterate_batches_order_flips_and_drop_last():
    images = _images()
    batches = list(iterate_batches(images, 3, seed=5, start_epoch=2))
    assert len(batches) == 3 and all(b.shape == (3, 1, 2, 4) for b in batches)
    order = epoch_permutation(10, 5, 2)
    assert np.array_equal(np.concatenate(batches), images[order[:9]])
    assert len(list(iterate_batches(images, 3, seed=5, drop_last=False))[-1]) == 1
    assert np.array_equal(np.concatenate(list(iterate_batches(images, 4, 0, shuffle=False, drop_last=False))), images)
    flipped = np.concatenate(list(iterate_batches(images, 5, seed=5, hflip=True, start_epoch=2)))
    flips = flip_mask(10, 5, 2)
    assert 0 < flips.sum() < 10
    for got, i in zip(flipped, order, strict=True):
        assert np.array_equal(got, images[i][..., ::-1] if flips[i] else images[i])
    assert np.array_equal(images, _images())  # the source array is never modified
