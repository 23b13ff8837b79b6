"""The Flickr30K-shaped synthetic data (`--data synthetic-f30k`): shapes, determinism, memory."""
from __future__ import annotations

import numpy as np
import pytest

from fastncl.config import DataConfig
from fastncl.data import load_dataset
from fastncl.data.fullshape import GeneratedRegions


@pytest.fixture(scope="module")
def data():
    return load_dataset(DataConfig(source="synthetic-f30k"))


def test_flickr30k_shapes(data):
    assert data.train.images.shape == (29_000, 36, 2048)
    assert data.train.num_captions == 145_000 and data.train.captions_per_image == 5
    assert data.dev.num_images == 1000 and data.test.num_images == 1000  # dev cut to 1000, as the official code
    assert data.test.num_captions == 5000
    assert len(data.vocab) == 8500 and int(data.train.tokens.max()) < len(data.vocab)
    assert data.image_dim == 2048


def test_caption_lengths_are_flickr_like(data):
    words = data.train.lengths - 2  # without <start> and <end>
    assert 11 <= words.mean() <= 14 and words.min() >= 3 and np.percentile(words, 99) < 40
    tokens, lengths = data.train.tokens, data.train.lengths
    assert (tokens[:, 0] == 1).all() and (tokens[np.arange(len(tokens)), lengths - 1] == 2).all()
    assert (tokens[np.arange(tokens.shape[1])[None] >= lengths[:, None]] == 0).all()


def test_rows_are_generated_deterministically_in_any_order(data):
    images = data.train.images
    assert isinstance(images, GeneratedRegions)
    batch = data.train.image_batch(np.array([28_999, 5, 17]))
    assert batch.shape == (3, 36, 2048) and batch.dtype.is_floating_point
    again = load_dataset(DataConfig(source="synthetic-f30k")).train.image_batch(np.array([17, 5]))
    np.testing.assert_array_equal(again.numpy(), batch[[2, 1]].numpy())
    assert not np.array_equal(batch[1].numpy(), batch[2].numpy())
    np.testing.assert_array_equal(images[10:20][np.array([3])], images[np.array([13])])


def test_features_are_never_materialised(data):
    images = data.train.images
    held = images.pool.nbytes + images.codes.nbytes + images.scale.nbytes
    assert held < 25e6  # against 8.6 GB for the dense array
    assert data.train.tokens.nbytes < 100e6


def test_batches_have_a_fixed_size_and_caption_lengths_in_multiples_of_8(data):
    from fastncl.data.batches import PairBatches

    train = data.train
    subset = np.arange(1000)
    loader = PairBatches(train, np.arange(train.num_captions) // 5, subset, 128, np.random.default_rng(0),
                         length_multiple=8)
    widths = set()
    for batch in loader:
        assert batch.images.shape == (128, 36, 2048) and batch.tokens.shape[0] == 128
        width = batch.tokens.shape[1]
        assert int(batch.lengths.max()) <= width and (width % 8 == 0 or width == train.tokens.shape[1])
        assert width - int(batch.lengths.max()) < 8
        widths.add(width)
    assert len(loader) == 8 and len(widths) <= 4  # 1000 pairs: 7 full batches and one filled up
