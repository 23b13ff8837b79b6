"""The SGR and SAF backbones of SGRAF (Diao et al., AAAI 2021), as NCR, BiCro, ESC and SPS use them.

Image: region features -> Linear(image_dim -> E) (Xavier) -> each region L2-normalised.
Caption: word embeddings (U(-0.1, 0.1)) -> dropout -> bidirectional GRU(E), the two halves
averaged -> each word L2-normalised. Global vectors by self-attention (VisualSA with batch norm
over the regions, TextSA without), over the regions or the caption's valid words.

For every (image i, caption j) pair (``score_block``):
* SCAN text-to-image attention, smooth lambda: A = LeakyReLU_0.1(regions . words^T), each
  region's row L2-normalised across the caption's words, softmax over regions of lambda * A, one
  attended (L2-normalised) image vector per word;
* local similarity vectors l2norm(W_loc (attended - word)^2) (one per word) and a global one
  l2norm(W_glo (img_glo - cap_glo)^2), the global node first;
* SGR: ``sgr_steps`` graph-reasoning steps X <- ReLU(W_g softmax((W_q X)(W_k X)^T) X), node 0 out;
  SAF: gates sigmoid(BN(W_a X)), L1-normalised over the nodes, weighted sum, L2-normalised;
* S = sigmoid(W_out x).

The official code loops over captions in Python (each caption against all images, ~30 small
kernels per caption). Here a block of B_img x B_cap pairs is one set of batched tensor ops:
captions are padded, padded words are zero (so they drop out of the SCAN normalisation) and
masked as graph keys, gates and in SAF's per-caption batch statistics. Under no_grad (the split
pass, evaluation) ``similarity`` scores fixed-size blocks of ``pair_block`` x ``pair_block``
pairs (the tail blocks padded), so memory is bounded and a compiled block sees one shape per
caption-length bucket. bench/sgraf_loop.py is the official per-caption loop; the tests check
that both agree in float64, values and gradients.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fastncl import distributed

from .base import Encoding

EPS = 1e-8  # official l2norm / l1norm: x / (norm + eps)


def l2norm(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    return x / (torch.sqrt((x * x).sum(dim=dim, keepdim=True)) + EPS)


def _xavier(linear: nn.Linear) -> nn.Linear:
    nn.init.xavier_uniform_(linear.weight)  # official: U(+-sqrt(6 / (in + out))), bias 0
    nn.init.zeros_(linear.bias)
    return linear


class BiGRU(nn.Module):
    """Bidirectional GRU over padded sequences, the two directions' outputs averaged.

    Equal to ``nn.GRU(bidirectional=True)`` over packed sequences (the official code; parameters
    of the same names) without packing, whose CPU lengths are a host sync and a graph break: the
    backward direction runs forward over each sequence reversed within its own length. Eager mode
    calls the ATen/cuDNN GRU (``torch.gru``); inside torch.compile the recurrence is written out
    step by step from the same weights (Dynamo does not trace GRUs), so the graph has no break.
    """

    SUFFIXES = ("", "_reverse")

    def __init__(self, input_dim: int, hidden_dim: int):
        super().__init__()
        self.hidden_dim = hidden_dim
        bound = hidden_dim ** -0.5  # nn.GRU's init: U(-1/sqrt(H), 1/sqrt(H))
        for suffix in self.SUFFIXES:
            for name, shape in (("weight_ih_l0", (3 * hidden_dim, input_dim)), ("weight_hh_l0", (3 * hidden_dim, hidden_dim)),
                                ("bias_ih_l0", (3 * hidden_dim,)), ("bias_hh_l0", (3 * hidden_dim,))):
                self.register_parameter(name + suffix, nn.Parameter(torch.empty(shape).uniform_(-bound, bound)))

    def _weights(self, suffix: str) -> list[torch.Tensor]:
        return [getattr(self, name + suffix) for name in ("weight_ih_l0", "weight_hh_l0", "bias_ih_l0", "bias_hh_l0")]

    @staticmethod
    def _reverse_index(lengths: torch.Tensor, length: int) -> torch.Tensor:
        """(B, L) index reversing each sequence within its length (an involution; padding stays)."""
        t = torch.arange(length, device=lengths.device).view(1, -1)
        lengths = lengths.view(-1, 1)
        return torch.where(t < lengths, lengths - 1 - t, t)

    def _run(self, x: torch.Tensor, suffix: str, unrolled: bool) -> torch.Tensor:
        w_ih, w_hh, b_ih, b_hh = self._weights(suffix)
        h = x.new_zeros(x.shape[0], self.hidden_dim)
        if not unrolled:  # in the input's precision (fp32 under autocast: cuDNN GRUs take no bf16)
            with torch.autocast(x.device.type, enabled=False):
                weights = [w.to(x.dtype) for w in (w_ih, w_hh, b_ih, b_hh)]
                return torch.gru(x, h.unsqueeze(0), weights, True, 1, 0.0, self.training, False, True)[0]
        hidden = self.hidden_dim  # PyTorch's GRU equations, one time step at a time
        gates_x = F.linear(x, w_ih, b_ih)  # (B, L, 3H), all steps at once
        outputs = []
        for t in range(x.shape[1]):
            gx, gh = gates_x[:, t], F.linear(h, w_hh, b_hh)
            r = torch.sigmoid(gx[:, :hidden] + gh[:, :hidden])
            z = torch.sigmoid(gx[:, hidden : 2 * hidden] + gh[:, hidden : 2 * hidden])
            n = torch.tanh(gx[:, 2 * hidden :] + r * gh[:, 2 * hidden :])
            h = (1 - z) * n + z * h
            outputs.append(h)
        return torch.stack(outputs, dim=1)

    def forward(self, x: torch.Tensor, lengths: torch.Tensor, unrolled: bool | None = None) -> torch.Tensor:
        """x: (B, L, D), lengths: (B,) -> (B, L, H); positions past a sequence's length are garbage."""
        if unrolled is None:
            unrolled = torch.compiler.is_compiling()
        index = self._reverse_index(lengths, x.shape[1]).unsqueeze(-1)
        fwd = self._run(x, "", unrolled)
        bwd = self._run(x.gather(1, index.expand(-1, -1, x.shape[2])), "_reverse", unrolled)
        return (fwd + bwd.gather(1, index.expand(-1, -1, bwd.shape[2]))) / 2


class VisualSA(nn.Module):
    """Self-attention global image vector (official VisualSA; batch norm over the regions)."""

    def __init__(self, embed_dim: int, dropout: float, num_regions: int):
        super().__init__()
        self.local = nn.Sequential(_xavier(nn.Linear(embed_dim, embed_dim)), nn.BatchNorm1d(num_regions), nn.Tanh(),
                                   nn.Dropout(dropout))
        self.global_ = nn.Sequential(_xavier(nn.Linear(embed_dim, embed_dim)), nn.BatchNorm1d(embed_dim), nn.Tanh(),
                                     nn.Dropout(dropout))
        self.common = _xavier(nn.Linear(embed_dim, 1))

    def forward(self, regions: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
        """regions (B, R, E), mean (B, E) -> (B, E) L2-normalised."""
        weights = self.common(self.local(regions) * self.global_(mean).unsqueeze(1)).squeeze(-1)  # (B, R)
        weights = torch.softmax(weights, dim=1)
        return l2norm((weights.unsqueeze(-1) * regions).sum(dim=1))


class TextSA(nn.Module):
    """Self-attention global caption vector over the valid words (official TextSA: no batch norm)."""

    def __init__(self, embed_dim: int, dropout: float):
        super().__init__()
        self.local = nn.Sequential(_xavier(nn.Linear(embed_dim, embed_dim)), nn.Tanh(), nn.Dropout(dropout))
        self.global_ = nn.Sequential(_xavier(nn.Linear(embed_dim, embed_dim)), nn.Tanh(), nn.Dropout(dropout))
        self.common = _xavier(nn.Linear(embed_dim, 1))

    def forward(self, words: torch.Tensor, mean: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """words (B, L, E), mean (B, E), mask (B, L) -> (B, E) L2-normalised."""
        weights = self.common(self.local(words) * self.global_(mean).unsqueeze(1)).squeeze(-1)  # (B, L)
        if mask is not None:
            weights = weights.masked_fill(~mask, float("-inf"))
        weights = torch.softmax(weights, dim=1)
        return l2norm((weights.unsqueeze(-1) * words).sum(dim=1))


class GraphReasoning(nn.Module):
    """One SGR step: X <- ReLU(W_g softmax((W_q X)(W_k X)^T) X) over the nodes of each pair."""

    def __init__(self, sim_dim: int):
        super().__init__()
        self.query = _xavier(nn.Linear(sim_dim, sim_dim))
        self.key = _xavier(nn.Linear(sim_dim, sim_dim))
        self.out = _xavier(nn.Linear(sim_dim, sim_dim))

    def forward(self, nodes: torch.Tensor, key_mask: torch.Tensor | None = None) -> torch.Tensor:
        """nodes (..., N, S); key_mask broadcastable to (..., 1, N), True at valid nodes."""
        edges = self.query(nodes) @ self.key(nodes).transpose(-1, -2)  # (..., N, N)
        if key_mask is not None:
            edges = edges.masked_fill(~key_mask, float("-inf"))
        return torch.relu(self.out(torch.softmax(edges, dim=-1) @ nodes))


class AttentionFiltration(nn.Module):
    """SAF: per-node gates sigmoid(BN(W_a x)), L1-normalised, weighted sum of the nodes, L2-normalised.

    The official code applies ``BatchNorm1d(1)`` once per caption, to the (n_image, 1, L_j + 1)
    gate logits of that caption: in training the statistics are those of one caption's column of
    pairs, and the running statistics take one momentum update per caption, in caption order.
    Both are reproduced exactly over a whole block (masked statistics per caption; the sequence
    of updates in closed form). Parameter and buffer names are those of ``nn.BatchNorm1d``.
    """

    # (first column, total columns) while the ranks of a torchrun job each score their share of one
    # batch's captions: set for the call by distributed.ShardedBackbone; None: the captions scored
    # are the whole batch
    shard_columns: tuple[int, int] | None = None

    def __init__(self, sim_dim: int, momentum: float = 0.1, eps: float = 1e-5):
        super().__init__()
        self.attn = _xavier(nn.Linear(sim_dim, 1))
        self.momentum, self.eps = momentum, eps
        self.bn_weight = nn.Parameter(torch.ones(1))
        self.bn_bias = nn.Parameter(torch.zeros(1))
        self.register_buffer("running_mean", torch.zeros(1))
        self.register_buffer("running_var", torch.ones(1))

    def _batch_norm(self, z: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """z (Bi, Bc, N) gate logits, valid (Bc, N) -> normalised with per-caption statistics."""
        if not self.training:
            return (z - self.running_mean) / torch.sqrt(self.running_var + self.eps) * self.bn_weight + self.bn_bias
        v = valid.to(z.dtype)
        count = v.sum(dim=1) * z.shape[0]  # (Bc,) values per caption: images x valid nodes
        mean = (z * v).sum(dim=(0, 2)) / count
        centred = (z - mean.view(1, -1, 1)) * v
        var = (centred * centred).sum(dim=(0, 2)) / count  # biased, as BN normalises
        with torch.no_grad():  # one update per caption in order: r <- (1 - m) r + m x_j, in closed form
            unbiased = var * count / (count - 1).clamp_min(1)
            if distributed.size() > 1:  # this rank's captions may be columns of a larger batch
                self._update_running_sharded(mean.double(), unbiased.double())
            else:
                self._update_running(mean.double(), unbiased.double(), 0, z.shape[1])
        normed = (z - mean.view(1, -1, 1)) / torch.sqrt(var.view(1, -1, 1) + self.eps)
        return normed * self.bn_weight + self.bn_bias

    def _update_running(self, means: torch.Tensor, variances: torch.Tensor, first: int, total: int,
                        reduce=lambda x: x) -> None:
        """The running statistics after one momentum update per caption, in order, of a batch of
        ``total`` captions whose columns ``first:first + len(means)`` are these (all of them in
        one process); ``reduce`` sums the ranks' parts under torchrun."""
        m = self.momentum
        decay = (1 - m) ** (total - 1 - first - torch.arange(len(means), device=means.device, dtype=torch.float64))
        both = reduce(torch.stack([(m * decay * means).sum(), (m * decay * variances).sum()]))
        self.running_mean.copy_((1 - m) ** total * self.running_mean + both[0])
        self.running_var.copy_((1 - m) ** total * self.running_var + both[1])

    @torch.compiler.disable
    def _update_running_sharded(self, means: torch.Tensor, variances: torch.Tensor) -> None:
        """Under torchrun this rank's captions may be its columns of the batch (``shard_columns``):
        every rank's updates in the global order, summed over the ranks (one all-reduce of two
        numbers), give every rank the single-process statistics."""
        if self.shard_columns is None:  # a batch every rank scores whole
            self._update_running(means, variances, 0, len(means))
        else:
            self._update_running(means, variances, *self.shard_columns, reduce=distributed.sum_over_ranks)

    def forward(self, nodes: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """nodes (Bi, Bc, N, S), valid (Bc, N) -> (Bi, Bc, S)."""
        gates = torch.sigmoid(self._batch_norm(self.attn(nodes).squeeze(-1), valid)) * valid  # (Bi, Bc, N)
        gates = gates / (gates.abs().sum(dim=-1, keepdim=True) + EPS)  # official l1norm
        return l2norm((gates.unsqueeze(-1) * nodes).sum(dim=2))


class SGRAF(nn.Module):
    """SGR (``head="sgr"``) or SAF (``head="saf"``) image-caption similarity network."""

    # ESC's BiCro labels on a pairwise head: the mean-pooled local features, as BiCro's code
    label_features = "pooled"

    def __init__(self, image_dim: int, vocab_size: int, num_regions: int, head: str = "sgr", embed_dim: int = 1024,
                 word_dim: int = 300, sim_dim: int = 256, sgr_steps: int = 3, dropout: float = 0.4,
                 smooth: float = 9.0, pair_block: int = 128):
        super().__init__()
        if head not in ("sgr", "saf"):
            raise ValueError(f"head must be 'sgr' or 'saf', got {head!r}")
        self.head, self.smooth, self.pair_block = head, smooth, pair_block
        self.region_proj = _xavier(nn.Linear(image_dim, embed_dim))
        self.word_embed = nn.Embedding(vocab_size, word_dim)
        nn.init.uniform_(self.word_embed.weight, -0.1, 0.1)
        self.word_dropout = nn.Dropout(dropout)
        self.gru = BiGRU(word_dim, embed_dim)
        self.visual_sa = VisualSA(embed_dim, dropout, num_regions)
        self.text_sa = TextSA(embed_dim, dropout)
        self.sim_local = _xavier(nn.Linear(embed_dim, sim_dim))
        self.sim_global = _xavier(nn.Linear(embed_dim, sim_dim))
        self.sim_eval = _xavier(nn.Linear(sim_dim, 1))
        if head == "sgr":
            self.reasoning = nn.ModuleList(GraphReasoning(sim_dim) for _ in range(sgr_steps))
        else:
            self.filtration = AttentionFiltration(sim_dim)

    # -- encoders (per modality) ----------------------------------------------------------------
    def encode_images(self, images: torch.Tensor) -> Encoding:
        """images: (B, R, D_in) region features."""
        regions = l2norm(self.region_proj(images))  # (B, R, E)
        pooled = regions.mean(dim=1)
        return Encoding(global_=self.visual_sa(regions, pooled), pooled=pooled, local=regions)

    def encode_captions(self, tokens: torch.Tensor, lengths: torch.Tensor) -> Encoding:
        """tokens: (B, L) ids (any padding id); lengths: (B,) >= 1."""
        x = self.word_dropout(self.word_embed(tokens))  # (B, L, W)
        mask = torch.arange(tokens.shape[1], device=tokens.device).view(1, -1) < lengths.view(-1, 1)  # (B, L)
        words = l2norm(self.gru(x, lengths)) * mask.unsqueeze(-1)  # (B, L, E), zero at padding
        pooled = words.sum(dim=1) / lengths.view(-1, 1).clamp_min(1).to(words.dtype)
        return Encoding(global_=self.text_sa(words, pooled, mask), pooled=pooled, local=words, mask=mask)

    # -- the pairwise head ----------------------------------------------------------------------
    def score_block(self, regions: torch.Tensor, img_glo: torch.Tensor, words: torch.Tensor, mask: torch.Tensor,
                    cap_glo: torch.Tensor) -> torch.Tensor:
        """(Bi, Bc) similarities of every image of the block with every caption (fp32, or float64).

        regions (Bi, R, E), img_glo (Bi, E), words (Bc, L, E) zero at padding, mask (Bc, L), cap_glo (Bc, E).
        """
        bi, r, e = regions.shape
        bc, length, _ = words.shape
        # SCAN text-to-image attention: one GEMM for all (region, word) pairs of the block
        attn = (regions.reshape(bi * r, e) @ words.reshape(bc * length, e).T).view(bi, r, bc, length)
        attn = l2norm(F.leaky_relu(attn, 0.1), dim=3)  # across the caption's words (padding is 0)
        attn = torch.softmax(self.smooth * attn, dim=1)  # over regions: (Bi, R, Bc, L)
        attn = attn.permute(0, 2, 3, 1).reshape(bi, bc * length, r)
        attended = l2norm(torch.bmm(attn, regions)).view(bi, bc, length, e)  # (Bi, Bc, L, E)
        diff = attended - words.unsqueeze(0)
        sim_loc = l2norm(self.sim_local(diff * diff))  # (Bi, Bc, L, S); x*x, not pow: autocast keeps it low
        g = img_glo.unsqueeze(1) - cap_glo.unsqueeze(0)
        sim_glo = l2norm(self.sim_global(g * g))  # (Bi, Bc, S)
        nodes = torch.cat([sim_glo.unsqueeze(2), sim_loc], dim=2)  # (Bi, Bc, L + 1, S), global node first
        valid = torch.cat([mask.new_ones(bc, 1), mask], dim=1)  # (Bc, L + 1)
        if self.head == "sgr":
            key_mask = valid.view(1, bc, 1, length + 1)
            for step in self.reasoning:
                nodes = step(nodes, key_mask)
            vec = nodes[:, :, 0]
        else:
            vec = self.filtration(nodes, valid)
        score = torch.sigmoid(self.sim_eval(vec)).squeeze(-1)
        return score.to(torch.promote_types(score.dtype, torch.float32))  # fp32 for the losses under autocast

    def similarity(self, images: Encoding, captions: Encoding, score_block=None) -> torch.Tensor:
        """(B_img, B_cap) similarities, rows = images.

        With gradients: one block (the training batch). Without: fixed-size blocks of pair_block
        images x pair_block captions (the tail blocks padded by repeating the last row), the
        words cut to the block's longest caption rounded up to a multiple of 8. ``score_block``
        replaces the method of that name (fastncl.step passes its compiled form).
        """
        score_block = score_block or self.score_block
        args = (images.local, images.global_, captions.local, captions.mask, captions.global_)
        n_img, n_cap = images.global_.shape[0], captions.global_.shape[0]
        block = self.pair_block
        if torch.is_grad_enabled() or (n_img <= block and n_cap <= block):
            return score_block(*args)
        device = images.global_.device
        out = torch.empty(n_img, n_cap, device=device, dtype=torch.promote_types(images.global_.dtype, torch.float32))
        starts = range(0, n_img, block)
        img_rows = [torch.arange(s, s + block, device=device).clamp_max(n_img - 1) for s in starts]
        for c in range(0, n_cap, block):
            cols = torch.arange(c, c + block, device=device).clamp_max(n_cap - 1)
            mask = captions.mask[cols]
            length = min(-(-int(mask.sum(dim=1).max()) // 8) * 8, mask.shape[1])  # host sync: once per block column
            words, mask, cap_glo = captions.local[cols, :length], mask[:, :length], captions.global_[cols]
            for s, rows in zip(starts, img_rows):
                scores = score_block(images.local[rows], images.global_[rows], words, mask, cap_glo)
                out[s : s + block, c : c + block] = scores[: n_img - s, : n_cap - c]
        return out
