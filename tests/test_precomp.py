"""fastncl.data: the SCAN/NCR precomputed layout (and CC152K's tsv captions) and the tokenizer."""
from __future__ import annotations

import json
import re
import subprocess
import sys

import numpy as np
import pytest
from precomp_folder import SPLIT_IMAGES, make_cc152k, make_scan, scan_vocab

from fastncl import FastnclError
from fastncl.config import DataConfig
from fastncl.data import load_dataset, tokenize


def load(folder, **kw):
    return load_dataset(DataConfig(source=str(folder), **kw))


def decode(vocab, ids):
    idx2word = {i: w for w, i in vocab.word2idx.items()}
    return [idx2word[int(i)] for i in ids]


# ---------------------------------------------------------------------------------------------
# loading


def test_scan_folder_loads(tmp_path):
    folder = make_scan(tmp_path / "f30k_precomp")
    ds = load(folder)
    assert ds.name == "f30k_precomp"
    assert ds.image_dim == 8
    for split, n in (("train", 6), ("dev", 4), ("test", 3)):
        part = getattr(ds, split)
        assert part.captions_per_image == 5  # inferred from the counts
        assert part.num_images == n and part.num_captions == 5 * n
        assert part.images.shape == (n, 4, 8)
        assert part.tokens.dtype == np.int64 and part.lengths.dtype == np.int64
        np.testing.assert_array_equal(part.images, np.load(folder / f"{split}_ims.npy"))


def test_images_are_memory_mapped(tmp_path):
    ds = load(make_scan(tmp_path / "d"))
    for part in (ds.train, ds.dev, ds.test):
        assert isinstance(part.images, np.memmap)
    batch = ds.train.image_batch(np.array([5, 0, 2]))
    assert batch.dtype.is_floating_point and tuple(batch.shape) == (3, 4, 8)
    np.testing.assert_array_equal(batch.numpy(), np.asarray(ds.train.images[[5, 0, 2]]))


def test_tokens_have_start_end_and_match_the_vocabulary(tmp_path):
    folder = make_scan(tmp_path / "d")
    ds = load(folder)
    w2i = ds.vocab.word2idx
    assert (w2i["<pad>"], w2i["<start>"], w2i["<end>"], w2i["<unk>"]) == (0, 1, 2, 3)
    lines = (folder / "train_caps.txt").read_text().splitlines()
    for k in (0, 7, 29):
        n = int(ds.train.lengths[k])
        words = decode(ds.vocab, ds.train.tokens[k, :n])
        assert words == ["<start>", *tokenize(lines[k]), "<end>"]
        assert np.all(ds.train.tokens[k, n:] == 0)  # padding


def test_unknown_words_become_unk(tmp_path):
    folder = make_scan(tmp_path / "d")
    lines = (folder / "test_caps.txt").read_text().splitlines()
    lines[0] = "a zebra on the moon"
    (folder / "test_caps.txt").write_text("\n".join(lines) + "\n")
    ds = load(folder)
    n = int(ds.test.lengths[0])
    assert decode(ds.vocab, ds.test.tokens[0, :n]) == ["<start>", "a", "<unk>", "on", "the", "<unk>", "<end>"]


def test_vocab_found_under_its_scan_names(tmp_path):
    # {name}_vocab.json in the folder, and ../vocab/{name}_vocab.json (the SCAN release layout)
    folder = make_scan(tmp_path / "a" / "coco_precomp", vocab=None)
    vocab = scan_vocab(["a", "dog"])
    (folder / "coco_precomp_vocab.json").write_text(json.dumps(vocab))
    assert set(load(folder).vocab.word2idx) == set(vocab["word2idx"])
    folder = make_scan(tmp_path / "b" / "f30k_precomp", vocab=None)
    (tmp_path / "b" / "vocab").mkdir()
    (tmp_path / "b" / "vocab" / "f30k_precomp_vocab.json").write_text(json.dumps(vocab))
    assert set(load(folder).vocab.word2idx) == set(vocab["word2idx"])
    other = tmp_path / "explicit.json"
    other.write_text(json.dumps(scan_vocab(["cat"])))
    assert "cat" in load(folder, vocab=str(other)).vocab.word2idx


def test_vocab_missing_special_tokens_gets_them(tmp_path):
    folder = make_scan(tmp_path / "d", vocab={"word2idx": {"<pad>": 0, "a": 1, "dog": 2}})
    ds = load(folder)
    assert {"<start>", "<end>", "<unk>"} <= set(ds.vocab.word2idx)
    assert len(set(ds.vocab.word2idx.values())) == len(ds.vocab.word2idx)  # no index used twice


@pytest.mark.parametrize("split, row, value", [("train", 5, np.nan), ("test", 0, np.inf), ("dev", 3, -np.inf)])
def test_non_finite_features_are_refused_naming_the_row(tmp_path, monkeypatch, split, row, value):
    """NaN test features used to give a chance-level table reported as a result."""
    import fastncl.data.precomp

    monkeypatch.setattr(fastncl.data.precomp, "FINITE_CHUNK_BYTES", 3 * 4 * 8 * 4)  # 3 rows a chunk
    folder = make_scan(tmp_path / "d")
    images = np.load(folder / f"{split}_ims.npy")
    images[row, 1, 2] = value
    np.save(folder / f"{split}_ims.npy", images)
    with pytest.raises(FastnclError, match=rf"{split}_ims.npy: row {row} \(image\) holds NaN or inf"):
        load(folder)


@pytest.mark.parametrize("shape", [(0, 4, 8), (20, 0, 8), (20, 4, 0)])
def test_features_with_an_empty_axis_are_refused(tmp_path, shape):
    """(N, 0, D) features ended in an IndexError of amax()."""
    folder = make_scan(tmp_path / "d")
    np.save(folder / "train_ims.npy", np.zeros(shape, np.float32))
    with pytest.raises(FastnclError, match=r"train_ims.npy: expected float features .*none of them 0"):
        load(folder)


@pytest.mark.parametrize("index, mention", [(10**10, "outside [0,"), (-1, "outside [0,"), (1, "given to two words")])
def test_vocab_indices_in_range_and_unique(tmp_path, index, mention):
    """An index of 1e10 tried to allocate a 320 GB embedding table; a negative one ended in an
    IndexError; a shared one merged two words silently."""
    vocab = scan_vocab(["a", "dog"])
    vocab["word2idx"]["dog"] = index
    folder = make_scan(tmp_path / "d", vocab=vocab)
    with pytest.raises(FastnclError, match=rf"vocab.json: .*{re.escape(mention)}"):
        load(folder)


def test_vocab_is_built_from_training_captions_when_none_is_present(tmp_path):
    folder = make_scan(tmp_path / "d", vocab=None)
    dev = (folder / "dev_caps.txt").read_text().splitlines()
    dev[0] = "a platypus sits"
    (folder / "dev_caps.txt").write_text("\n".join(dev) + "\n")
    ds = load(folder)
    train_words = {w for line in (folder / "train_caps.txt").read_text().splitlines() for w in tokenize(line)}
    assert set(ds.vocab.word2idx) == train_words | {"<pad>", "<start>", "<end>", "<unk>"}
    assert ds.vocab.word2idx["<pad>"] == 0
    n = int(ds.dev.lengths[0])
    assert decode(ds.vocab, ds.dev.tokens[0, :n]) == ["<start>", "a", "<unk>", "sits", "<end>"]


def test_dev_split_is_truncated_to_dev_images(tmp_path):
    folder = make_scan(tmp_path / "d")
    ds = load(folder, dev_images=2)
    assert ds.dev.num_images == 2 and ds.dev.num_captions == 10
    full = load(folder)
    np.testing.assert_array_equal(ds.dev.tokens, full.dev.tokens[:10])
    np.testing.assert_array_equal(ds.dev.images, full.dev.images[:2])
    assert isinstance(ds.dev.images, np.memmap)
    assert ds.test.num_images == 3  # only dev is truncated
    assert load(folder, dev_images=100).dev.num_images == 4


def test_other_split_names(tmp_path):
    folder = make_scan(tmp_path / "coco", images={"train": 6, "dev": 4, "testall": 5})
    ds = load(folder, test_split="testall")
    assert ds.test.num_images == 5


def test_captions_are_cut_at_max_len(tmp_path):
    folder = make_scan(tmp_path / "d")
    ds = load(folder, max_len=4)
    assert ds.train.tokens.shape[1] <= 4 and ds.train.lengths.max() <= 4


def test_two_dimensional_features_are_one_region(tmp_path):
    folder = make_scan(tmp_path / "d")
    for split, n in SPLIT_IMAGES.items():
        np.save(folder / f"{split}_ims.npy", np.ones((n, 8), dtype=np.float32))
    ds = load(folder)
    assert ds.train.images.shape == (6, 1, 8)


def test_cc152k_tsv_folder_loads(tmp_path):
    folder = make_cc152k(tmp_path / "cc152k_precomp")
    ds = load(folder)
    for split, n in SPLIT_IMAGES.items():
        part = getattr(ds, split)
        assert part.captions_per_image == 1
        assert part.num_images == part.num_captions == n
    lines = (folder / "train_caps.tsv").read_text().splitlines()
    caption = lines[2].split("\t")[1]
    n = int(ds.train.lengths[2])
    assert decode(ds.vocab, ds.train.tokens[2, :n]) == ["<start>", *tokenize(caption), "<end>"]
    assert "." in ds.vocab.word2idx  # punctuation is its own token
    assert not any(w.isdigit() for w in ds.vocab.word2idx)  # image ids are not caption text


# ---------------------------------------------------------------------------------------------
# errors: FastnclError naming the file


def test_missing_folder(tmp_path):
    with pytest.raises(FastnclError, match=r"--data .*nowhere: not a folder"):
        load(tmp_path / "nowhere")


def test_a_file_instead_of_a_folder(tmp_path):
    path = tmp_path / "file.npy"
    path.write_bytes(b"x")
    with pytest.raises(FastnclError, match="file.npy: not a folder"):
        load(path)


@pytest.mark.parametrize("name", ["train_ims.npy", "dev_ims.npy", "test_caps.txt", "train_caps.txt"])
def test_missing_file(tmp_path, name):
    folder = make_scan(tmp_path / "d")
    (folder / name).unlink()
    with pytest.raises(FastnclError, match=name.replace(".", r"\.")):
        load(folder)


def test_caption_count_not_a_multiple_of_image_count(tmp_path):
    folder = make_scan(tmp_path / "d")
    lines = (folder / "dev_caps.txt").read_text().splitlines()
    (folder / "dev_caps.txt").write_text("\n".join(lines[:-1]) + "\n")  # 19 captions for 4 images
    with pytest.raises(FastnclError, match=r"dev_caps\.txt: 19 captions for 4 images"):
        load(folder)


def test_empty_caption_file(tmp_path):
    folder = make_scan(tmp_path / "d")
    (folder / "test_caps.txt").write_text("\n\n")
    with pytest.raises(FastnclError, match=r"test_caps\.txt: no captions"):
        load(folder)


def test_malformed_tsv_line(tmp_path):
    folder = make_cc152k(tmp_path / "cc")
    lines = (folder / "dev_caps.tsv").read_text().splitlines()
    lines[2] = "a caption without an id"
    (folder / "dev_caps.tsv").write_text("\n".join(lines) + "\n")
    with pytest.raises(FastnclError, match=r"dev_caps\.tsv:3: expected 'image_id<TAB>caption'"):
        load(folder)


@pytest.mark.parametrize("content", ["{not json", "[1, 2]", '{"idx2word": {}}', '{"word2idx": {"a": "one"}}'])
def test_unreadable_vocab_json(tmp_path, content):
    folder = make_scan(tmp_path / "d", vocab=None)
    (folder / "vocab.json").write_text(content)
    with pytest.raises(FastnclError, match=r"vocab\.json: not a vocabulary JSON"):
        load(folder)


def test_vocab_with_pad_not_zero(tmp_path):
    folder = make_scan(tmp_path / "d", vocab={"word2idx": {"a": 0, "<pad>": 1}})
    with pytest.raises(FastnclError, match=r"vocab\.json: '<pad>' must have index 0"):
        load(folder)


def test_explicit_vocab_that_does_not_exist(tmp_path):
    folder = make_scan(tmp_path / "d")
    with pytest.raises(FastnclError, match=r"data\.vocab: .*absent\.json does not exist"):
        load(folder, vocab=str(tmp_path / "absent.json"))


@pytest.mark.parametrize("array", [np.zeros((6,), np.float32), np.zeros((6, 2, 3, 4), np.float32),
                                   np.zeros((6, 4, 8), np.int64), np.zeros((0, 4, 8), np.float32)])
def test_wrong_features(tmp_path, array):
    folder = make_scan(tmp_path / "d")
    np.save(folder / "train_ims.npy", array)
    with pytest.raises(FastnclError, match=r"train_ims\.npy: expected float features"):
        load(folder)


def test_unreadable_features(tmp_path):
    folder = make_scan(tmp_path / "d")
    (folder / "test_ims.npy").write_bytes(b"not an npy file")
    with pytest.raises(FastnclError, match=r"test_ims\.npy: not a readable \.npy array"):
        load(folder)


def test_truncated_features(tmp_path):
    folder = make_scan(tmp_path / "d")
    data = (folder / "train_ims.npy").read_bytes()
    (folder / "train_ims.npy").write_bytes(data[:-40])
    with pytest.raises(FastnclError, match=r"train_ims\.npy: not a readable \.npy array"):
        load(folder)


@pytest.mark.parametrize("make, name, content", [
    (make_scan, "dev_caps.txt", b"caf\xe9 au lait\n" * 30),  # Latin-1, not UTF-8
    (make_scan, "train_caps.txt", b"caf\xe9 au lait\n" * 30),
    (make_cc152k, "test_caps.tsv", b"1\tcaf\xe9\n2\tb\n3\tc\n"),
], ids=["dev_caps.txt", "train_caps.txt", "test_caps.tsv"])
def test_caption_file_that_is_not_utf8(tmp_path, make, name, content):
    folder = make(tmp_path / "d")
    (folder / name).write_bytes(content)
    with pytest.raises(FastnclError, match=name.replace(".", r"\.")):
        load(folder)


def test_pickled_features_are_refused(tmp_path):
    folder = make_scan(tmp_path / "d")
    np.save(folder / "dev_ims.npy", np.array([{"a": 1}] * 4, dtype=object), allow_pickle=True)
    with pytest.raises(FastnclError, match=r"dev_ims\.npy"):
        load(folder)


def test_mismatched_feature_dims(tmp_path):
    folder = make_scan(tmp_path / "d")
    np.save(folder / "test_ims.npy", np.zeros((3, 4, 9), np.float32))
    with pytest.raises(FastnclError, match="feature dimension differs between splits") as info:
        load(folder)
    message = str(info.value)
    assert str(folder) in message
    assert "'test': 9" in message and "'train': 8" in message


# ---------------------------------------------------------------------------------------------
# tokenizer


def test_tokenize_splits_punctuation_and_lower_cases():
    assert tokenize("A Dog, running!") == ["a", "dog", ",", "running", "!"]
    assert tokenize("two dogs.") == ["two", "dogs", "."]
    assert tokenize("a hat (red)") == ["a", "hat", "(", "red", ")"]
    assert tokenize("3 cats;  \t 12 birds") == ["3", "cats", ";", "12", "birds"]
    assert tokenize("") == []


# The SCAN/NCR vocabularies were built with nltk.word_tokenize (Penn Treebank rules): hyphenated
# words stay whole ("t-shirts", "white-walled" and "upside-down" are entries of SCAN's
# f30k_precomp_vocab.json) and clitics are split off ("'s" and "'m" are entries, "man's" is not).


def test_tokenize_keeps_hyphenated_words_whole_like_the_scan_vocabulary():
    assert tokenize("A man in a t-shirt stands upside-down.") == ["a", "man", "in", "a", "t-shirt", "stands",
                                                                  "upside-down", "."]


def test_tokenize_splits_clitics_like_the_scan_vocabulary():
    assert tokenize("The man's dog") == ["the", "man", "'s", "dog"]
    assert tokenize("I'm here") == ["i", "'m", "here"]


def test_scan_vocabulary_words_are_found(tmp_path):
    folder = make_scan(tmp_path / "d", vocab=scan_vocab(["a", "man", "'s", "t-shirt", "."]))
    lines = (folder / "test_caps.txt").read_text().splitlines()
    lines[0] = "A man's t-shirt."
    (folder / "test_caps.txt").write_text("\n".join(lines) + "\n")
    ds = load(folder)
    n = int(ds.test.lengths[0])
    assert decode(ds.vocab, ds.test.tokens[0, :n]) == ["<start>", "a", "man", "'s", "t-shirt", ".", "<end>"]


def test_tokenizer_needs_no_downloads_and_no_nltk():
    code = (
        "import socket, sys\n"
        "sys.modules['nltk'] = None\n"  # any `import nltk` now fails
        "def refuse(*a, **k):\n"
        "    raise RuntimeError('network access')\n"
        "socket.socket.connect = refuse\n"
        "socket.create_connection = refuse\n"
        "from fastncl.data import tokenize\n"
        "print(tokenize('A dog, running.'))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "['a', 'dog', ',', 'running', '.']"


def test_empty_caption_line_is_an_error_naming_the_line(tmp_path):
    """A dropped blank line would shift every later caption onto the wrong image."""
    folder = make_scan(tmp_path / "f30k_precomp")
    path = folder / "train_caps.txt"
    lines = path.read_text(encoding="utf-8").splitlines()
    lines[7] = "   "
    path.write_text("\n".join(lines) + "\n\n", encoding="utf-8")
    with pytest.raises(FastnclError, match=r"train_caps\.txt:8: empty caption line"):
        load(folder)


def test_trailing_blank_lines_are_ignored(tmp_path):
    folder = make_scan(tmp_path / "f30k_precomp")
    path = folder / "train_caps.txt"
    path.write_text(path.read_text(encoding="utf-8") + "\n\n", encoding="utf-8")
    assert load(folder).train.num_captions == SPLIT_IMAGES["train"] * 5


def test_the_fingerprint_follows_the_features_and_captions_a_run_sees(tmp_path):
    """env.json's data_sha256: the same folder loaded twice agrees; a changed feature (another
    rasteriser's pixels) or a changed caption does not."""
    cfg = DataConfig(source=str(make_scan(tmp_path / "f30k_precomp")))
    first, again = load_dataset(cfg), load_dataset(cfg)
    assert len(first.fingerprint()) == 64 and first.fingerprint() == again.fingerprint()
    again.train.images = np.array(again.train.images)
    again.train.images[0, 0, 0] += 1e-3
    assert again.fingerprint() != first.fingerprint()
    other = load_dataset(cfg)
    other.test.tokens = np.array(other.test.tokens)
    other.test.tokens[0, 1] += 1
    assert other.fingerprint() != first.fingerprint()
