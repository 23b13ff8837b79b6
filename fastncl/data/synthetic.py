"""The embedded default dataset: a deterministic synthetic image-caption set, made in-process.

It has the structure of the SCAN/NCR benchmarks (images as sets of region feature vectors,
several captions per image, train/dev/test splits), small enough to train on a CPU in minutes.

Design (README, "The embedded default data"):
* Every image is a unique combination of six attributes (object, colour, action, place,
  companion, time of day): about 0.9 M combinations, of which a few thousand are drawn without
  repetition. An image is identified only by the *combination*, not by any single attribute, so
  R@1 measures compositional matching.
* Regions: each attribute is shown by one or two regions whose feature is that attribute value's
  prototype plus noise; the remaining regions are clutter. Every image also carries an
  instance-specific vector in all its regions, so a model can tell any two images apart.
* Captions: each of an image's captions mentions the object and a random subset of the other
  attributes through a few templates, plus one or two "idiosyncratic" words drawn from a large
  pool of content-free words (like the incidental words of real captions). The instance vectors
  and idiosyncratic words give a model the capacity to memorise arbitrary pairs, which is what
  makes noisy correspondence harmful (the memorisation effect all these methods rely on).
"""
from __future__ import annotations

import numpy as np

from fastncl.config import SyntheticConfig

from .split import Dataset, Split, Vocab, pad_captions

ATTRIBUTES = {
    "object": "dog cat horse bird car bicycle boat man woman child ball kite guitar umbrella train cow".split(),
    "color": "red blue green yellow black white orange purple brown gray".split(),
    "action": "running sitting jumping sleeping standing swimming eating playing".split(),
    "place": "beach park street field kitchen forest lake snow market stage".split(),
    "companion": [
        "a tree", "a fence", "a bench", "a bridge", "a car", "a wall",
        "a dog", "a boat", "a tent", "a lamp", "a statue", "a fountain",
    ],
    "time": "morning night rain sunset fog noon".split(),
}
PHRASES = {
    "color": "{}",
    "action": "{}",
    "place": "{}",
    "companion": "next to {}",
    "time": "at {}",
}
_SYLLABLES = "ba be bo ka ki ko la li lo ma mi mo na ne no ra ri ro sa si so ta te to va vi vo za zi zu".split()


def _pseudo_words(rng: np.random.Generator, n: int) -> list[str]:
    words: set[str] = set()
    while len(words) < n:
        words.add("".join(rng.choice(_SYLLABLES, size=3)))
    return sorted(words)


def _caption(rng: np.random.Generator, attrs: dict[str, str], extra: list[str]) -> str:
    mentioned = [s for s in ("color", "action", "place", "companion", "time") if rng.random() < 0.75]
    noun = attrs["object"]
    if "color" in mentioned:
        noun = f"{attrs['color']} {noun}"
    words = [rng.choice(["a", "the", "one"]), *extra[:1], noun]
    if "action" in mentioned:
        words += ["is", attrs["action"]]
    if "place" in mentioned:
        words += [rng.choice(["in the", "on the", "at the"]), attrs["place"]]
    if "companion" in mentioned:
        words += [PHRASES["companion"].format(attrs["companion"])]
    words += extra[1:]
    if "time" in mentioned:
        words += [PHRASES["time"].format(attrs["time"])]
    return " ".join(words) + " ."


def make_synthetic(spec: SyntheticConfig = SyntheticConfig()) -> Dataset:
    rng = np.random.default_rng(spec.seed)
    slots = list(ATTRIBUTES)
    sizes = [len(ATTRIBUTES[s]) for s in slots]
    n_images = spec.train_images + spec.dev_images + spec.test_images
    combos = rng.choice(int(np.prod(sizes)), size=n_images, replace=False)
    values = np.stack(np.unravel_index(combos, sizes), axis=1)  # (N, slots)

    d, r = spec.feature_dim, spec.regions
    prototypes = [rng.standard_normal((n, d)) for n in sizes]
    clutter = rng.standard_normal((64, d))
    idiosyncratic = _pseudo_words(rng, spec.idiosyncratic_words)

    images = np.empty((n_images, r, d), dtype=np.float32)
    captions: list[str] = []
    for i, v in enumerate(values):
        # regions: every attribute once, a random one of them twice, clutter in the rest
        shown = list(range(len(slots))) + [int(rng.integers(len(slots)))]
        feats = [prototypes[s][v[s]] for s in shown]
        feats += [clutter[j] for j in rng.integers(len(clutter), size=r - len(feats))]
        feats = np.stack(feats)[rng.permutation(r)]
        instance = rng.standard_normal(d)
        images[i] = feats + spec.instance_weight * instance + spec.region_noise * rng.standard_normal((r, d))
        attrs = {s: ATTRIBUTES[s][v[k]] for k, s in enumerate(slots)}
        for _ in range(spec.captions_per_image):
            extra = list(rng.choice(idiosyncratic, size=int(rng.integers(1, 3)), replace=False))
            captions.append(_caption(rng, attrs, extra))

    vocab_words = [w for caption in captions for w in caption.split()]
    vocab = Vocab.build(sorted(set(vocab_words)))
    tokens, lengths = pad_captions([vocab.encode(c) for c in captions], max_len=64)
    k = spec.captions_per_image
    bounds = np.cumsum([0, spec.train_images, spec.dev_images, spec.test_images])
    splits = [
        Split(images[a:b], tokens[a * k : b * k], lengths[a * k : b * k], k) for a, b in zip(bounds[:-1], bounds[1:])
    ]
    return Dataset(train=splits[0], dev=splits[1], test=splits[2], vocab=vocab, name="synthetic")
