"""Model-free evidence of which training pairs match: do an image's neighbours and its caption's
neighbours name the same pairs? (``split.structure=knn``)

For pair j (image a_j, caption j), take the ``k`` pairs whose images are nearest a_j (cosine of
the mean-pooled, centred region features as stored, no model) and the ``k`` pairs whose captions
are nearest caption j (cosine of their tf-idf bags of word ids); pairs sharing j's image are no
neighbours. The score is the fraction of pairs in both lists. A matched pair's image and caption
describe the same thing, so similar images tend to come with similar captions, and the two lists
overlap; a mismatched caption describes some other image, and the lists overlap by chance only
(about k / N). It is the data's own cross-modal structure (GSC's and REPAIR's idea, computed
before any training): the losses of a model that memorises its noisy pairs cannot wear it down.

Neighbours are searched among at most ``reference`` pairs (all of them on small sets; a fixed
random subset on large ones), so the cost is N x min(N, reference) similarities for each modality.
"""
from __future__ import annotations

import numpy as np
import torch
from scipy import sparse

from .split import SPECIALS, Split


def _image_vectors(split: Split, chunk: int = 512) -> torch.Tensor:
    """(num_images, D) float32: each image's region features averaged, centred over the set, unit length."""
    n = split.num_images
    rows = [torch.from_numpy(np.array(split.images[s:s + chunk], dtype=np.float32)) for s in range(0, n, chunk)]
    pooled = torch.cat([r.mean(1) if r.dim() == 3 else r for r in rows])
    pooled = pooled - pooled.mean(0, dtype=torch.float64).float()
    return torch.nn.functional.normalize(pooled, dim=1)


def _caption_vectors(split: Split) -> sparse.csr_matrix:
    """(num_captions, V) float32 tf-idf of each caption's set of word ids, unit length; the special
    tokens (padding, start, end, unknown: ids below len(SPECIALS)) and repeats ignored: every
    caption holds the first three, which would make all captions alike."""
    n = split.num_captions
    tokens = np.asarray(split.tokens)
    within = np.arange(tokens.shape[1]) < np.asarray(split.lengths)[:, None]  # each caption's own tokens
    row, col = np.nonzero(within)[0], tokens[within]
    keep = col >= len(SPECIALS)
    bags = sparse.csr_matrix((np.ones(int(keep.sum()), dtype=np.float32), (row[keep], col[keep])),
                             shape=(n, int(tokens.max(initial=0)) + 1))
    bags.data[:] = 1.0  # duplicate entries were summed: a set of words, not counts
    df = np.asarray((bags > 0).sum(0)).ravel()
    idf = (np.log((n + 1) / (df + 1)) + 1).astype(np.float32)
    weighted = bags.multiply(idf[None, :]).tocsr()
    norm = np.sqrt(np.asarray(weighted.multiply(weighted).sum(1)).ravel())
    return sparse.diags(1.0 / np.maximum(norm, 1e-12)).dot(weighted).astype(np.float32).tocsr()


def _nearest(similarity: torch.Tensor, k: int) -> torch.Tensor:
    """(rows, columns) bool: each row's ``k`` most similar columns, ties at the k-th value to the
    lower index (the same on any thread count or device, where topk may pick among ties differently)."""
    kth = similarity.topk(k, dim=1).values[:, -1:]
    above = similarity > kth
    tied = similarity == kth
    room = k - above.sum(1, keepdim=True)
    return above | (tied & (tied.cumsum(1) <= room))


def pair_structure(split: Split, caption_to_image: np.ndarray, k: int = 100, reference: int = 20000,
                   seed: int = 0, chunk: int = 512, device: torch.device | str = "cpu") -> np.ndarray:
    """(N,) float64 in [0, 1]: for every training pair (image ``caption_to_image[j]``, caption j),
    the fraction of its ``k`` image neighbours that are also among its ``k`` caption neighbours
    (see the module docstring). Deterministic for a given ``seed``; the image similarities and
    the neighbour search run on ``device`` (the caption similarities, sparse, on the CPU)."""
    c2i = np.asarray(caption_to_image, dtype=np.int64)
    n = len(c2i)
    if n != split.num_captions:
        raise ValueError(f"caption_to_image has {n} entries, the split {split.num_captions} captions")
    ref = np.arange(n) if n <= reference else np.sort(np.random.default_rng(seed).choice(n, reference, replace=False))
    # at most half of a pair's possible neighbours (all of them would make every pair's lists equal)
    k = min(k, (len(ref) - int(np.bincount(c2i[ref]).max())) // 2)
    if k < 1:
        raise ValueError(f"structure needs pairs of at least two images, got {n} pairs of "
                         f"{len(np.unique(c2i))} image(s)")
    images = _image_vectors(split).to(device)
    captions = _caption_vectors(split)
    owner = torch.from_numpy(c2i).to(device)
    ref_owner = owner[torch.from_numpy(ref).to(device)]
    ref_images, ref_captions = images[ref_owner], captions[ref].T.tocsc()
    out = np.zeros(n)
    for s in range(0, n, chunk):
        rows = np.arange(s, min(s + chunk, n))
        mine = owner[s:s + len(rows)]
        same = mine[:, None] == ref_owner[None, :]  # j's own image: no neighbour
        by_image = (images[mine] @ ref_images.T).masked_fill(same, -2.0)
        by_caption = torch.from_numpy(np.asarray((captions[rows] @ ref_captions).todense(), dtype=np.float32))
        by_caption = by_caption.to(device).masked_fill(same, -2.0)
        both = _nearest(by_image, k) & _nearest(by_caption, k) & ~same
        out[rows] = (both.sum(1).double() / k).cpu().numpy()
    return out
