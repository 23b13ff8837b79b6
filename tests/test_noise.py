"""fastncl.data.noise: NCR-protocol synthetic noise and saved noise index files."""
from __future__ import annotations

import io

import numpy as np
import pytest

from fastncl import FastnclError
from fastncl.data.noise import load_noise_index, noisy_caption_index

NUM_IMAGES, CPI = 1000, 5
NUM_CAPTIONS = NUM_IMAGES * CPI
CLEAN = np.arange(NUM_CAPTIONS) // CPI  # caption k belongs to image k // 5 before noise


@pytest.mark.parametrize("rate", (0.2, 0.5, 0.8))
def test_noisy_caption_index_dtype_shape_and_noise_fraction(rate):
    index = noisy_caption_index(NUM_CAPTIONS, CPI, rate, seed=0)
    assert index.dtype == np.int64 and index.shape == (NUM_CAPTIONS,)
    assert index.min() >= 0 and index.max() < NUM_IMAGES
    noisy = np.mean(index != CLEAN)
    # int(rate * N) captions are shuffled among themselves; a few land on their own image again
    assert noisy <= int(rate * NUM_CAPTIONS) / NUM_CAPTIONS <= rate
    assert noisy >= rate - 0.01


@pytest.mark.parametrize("rate", (0.0, 0.2, 0.6))
@pytest.mark.parametrize("cpi", (1, 5))
def test_every_image_keeps_its_number_of_captions(rate, cpi):
    num_images = 300
    index = noisy_caption_index(num_images * cpi, cpi, rate, seed=3)
    assert np.array_equal(np.bincount(index, minlength=num_images), np.full(num_images, cpi))


def test_noisy_caption_index_is_deterministic_per_seed():
    a = noisy_caption_index(NUM_CAPTIONS, CPI, 0.4, seed=11)
    b = noisy_caption_index(NUM_CAPTIONS, CPI, 0.4, seed=11)
    assert np.array_equal(a, b)
    c = noisy_caption_index(NUM_CAPTIONS, CPI, 0.4, seed=12)
    assert not np.array_equal(a, c)
    # a different seed chooses different captions, not merely a different shuffle of the same ones
    assert not np.array_equal(a != CLEAN, c != CLEAN)


def test_noisy_caption_index_only_moves_the_chosen_captions():
    index = noisy_caption_index(NUM_CAPTIONS, CPI, 0.3, seed=5)
    # whichever caption moved was a chosen one; the others keep their image
    moved = index != CLEAN
    assert moved.sum() <= int(0.3 * NUM_CAPTIONS)
    assert np.array_equal(index[~moved], CLEAN[~moved])


def test_rate_zero_is_the_identity():
    for seed in (0, 1):
        index = noisy_caption_index(NUM_CAPTIONS, CPI, 0.0, seed=seed)
        assert index.dtype == np.int64
        assert np.array_equal(index, CLEAN)


@pytest.mark.parametrize("rate", (1.0, 1.5, -0.1, -1e-9))
def test_rate_outside_unit_interval_raises(rate):
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        noisy_caption_index(NUM_CAPTIONS, CPI, rate, seed=0)


def test_captions_not_a_multiple_of_captions_per_image_raises():
    with pytest.raises(ValueError, match="multiple"):
        noisy_caption_index(11, 5, 0.2, seed=0)


# ---------------------------------------------------------------------------------------------
# load_noise_index


@pytest.mark.parametrize("dtype", (np.int64, np.int32, np.uint16))
def test_load_noise_index_round_trips(tmp_path, dtype):
    index = noisy_caption_index(NUM_CAPTIONS, CPI, 0.5, seed=2)
    path = tmp_path / "noise_index.npy"
    np.save(path, index.astype(dtype))
    loaded = load_noise_index(path, NUM_CAPTIONS, NUM_IMAGES)
    assert loaded.dtype == np.int64
    assert np.array_equal(loaded, index)
    assert np.array_equal(load_noise_index(str(path), NUM_CAPTIONS, NUM_IMAGES), index)  # str paths too


def _save(tmp_path, name, array):
    path = tmp_path / name
    np.save(path, array)
    return path


@pytest.mark.parametrize(
    "name, array, match",
    [
        ("short.npy", np.arange(NUM_CAPTIONS - 1) // CPI, "expected an integer vector of 5000 entries"),
        ("long.npy", np.arange(NUM_CAPTIONS + 5) // CPI, "expected an integer vector of 5000 entries"),
        ("float.npy", (np.arange(NUM_CAPTIONS) // CPI).astype(np.float64), "dtype float64"),
        ("matrix.npy", (np.arange(NUM_CAPTIONS) // CPI).reshape(NUM_IMAGES, CPI), "shape"),
        ("bool.npy", np.ones(NUM_CAPTIONS, dtype=bool), "dtype bool"),
        ("negative.npy", np.r_[-1, np.arange(1, NUM_CAPTIONS) // CPI], r"\[0, 1000\)"),
        ("too_big.npy", np.r_[np.arange(NUM_CAPTIONS - 1) // CPI, NUM_IMAGES], r"\[0, 1000\)"),
    ],
)
def test_load_noise_index_rejects_bad_files(tmp_path, name, array, match):
    path = _save(tmp_path, name, array)
    with pytest.raises(FastnclError, match=match) as info:
        load_noise_index(path, NUM_CAPTIONS, NUM_IMAGES)
    assert str(path) in str(info.value)
    assert "--noise-file" in str(info.value)


def _npy_bytes(array) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


@pytest.mark.parametrize(
    "content",
    [
        pytest.param(b"not a numpy file", id="garbage"),
        pytest.param(b"", id="empty"),  # e.g. an interrupted copy
        pytest.param(_npy_bytes(CLEAN)[:20], id="truncated-header"),
        pytest.param(_npy_bytes(CLEAN)[:1000], id="truncated-data"),
    ],
)
def test_load_noise_index_rejects_unreadable_files(tmp_path, content):
    path = tmp_path / "garbage.npy"
    path.write_bytes(content)
    with pytest.raises(FastnclError, match="cannot read it as a .npy array") as info:
        load_noise_index(path, NUM_CAPTIONS, NUM_IMAGES)
    assert str(path) in str(info.value)


def test_load_noise_index_rejects_pickled_objects(tmp_path):
    path = tmp_path / "objects.npy"
    np.save(path, np.array([object()] * 3, dtype=object), allow_pickle=True)
    with pytest.raises(FastnclError) as info:
        load_noise_index(path, 3, 1)
    assert str(path) in str(info.value)


def test_load_noise_index_missing_file(tmp_path):
    path = tmp_path / "missing.npy"
    with pytest.raises(FastnclError) as info:
        load_noise_index(path, NUM_CAPTIONS, NUM_IMAGES)
    assert str(path) in str(info.value)
