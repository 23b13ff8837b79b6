"""The one tolerance table of the parity tests (house style B7), and the comparison they all use.

Every tolerance is relative, with a floor relative to the tensor's scale:
``|actual - expected| <= rtol * |expected| + rtol * max|expected|``. Hinge outputs and
probabilities are often exactly 0, where a purely relative tolerance would demand bit equality.

The expected values are always float64: the float64 oracle (tests/oracles.py), or the reference
run on the same input values upcast to float64 (for gradients).
"""
from __future__ import annotations

import torch

# (values, gradients) rtol by input dtype. fp16/bf16 rows compare against float64 math on the
# *same* low-precision values, upcast; the inputs' rounding is therefore not part of the error.
TOLERANCES = {
    torch.float32: {"values": 1e-5, "grads": 1e-4},
    torch.float16: {"values": 2e-2, "grads": 5e-2},
    torch.bfloat16: {"values": 2e-2, "grads": 5e-2},
    # float64 inputs are accumulated in float64: the reference must agree with the oracle to
    # round-off; the fp32 numbers are used so that the table has one set of values.
    torch.float64: {"values": 1e-5, "grads": 1e-4},
}


def rtol(dtype: torch.dtype, quantity: str = "values") -> float:
    """The table's rtol for inputs of ``dtype``; ``quantity`` is "values" or "grads"."""
    return TOLERANCES[dtype][quantity]


def assert_close(actual, expected, rtol: float, msg: str = "", *, scale: float | None = None,
                 max_report: int = 5) -> None:
    """Assert ``actual`` matches ``expected`` within ``rtol`` and ``atol = rtol * max|expected|``.

    ``scale`` raises the floor to ``rtol * max(max|expected|, scale)``, for outputs whose natural
    scale is not their own size: an InfoNCE loss is a difference of log-sum-exps of logits of
    size |sim| / tau, so fp32 (as the contract accumulates) only resolves it to about
    eps * |sim| / tau, even when every loss is ~1e-12 (a saturated softmax).

    Non-finite expected entries (masked results: -inf, NaN) must be matched exactly. On failure
    the message gives the number of mismatches, the first few indices with both values, and
    unexpected NaN/inf entries separately (Liger's ``assert_verbose_allclose``).
    """
    actual = torch.as_tensor(actual).detach().cpu()
    expected = torch.as_tensor(expected).detach().cpu()
    prefix = f"{msg}: " if msg else ""
    if actual.shape != expected.shape:
        raise AssertionError(f"{prefix}shape {tuple(actual.shape)} != expected {tuple(expected.shape)}")
    a, e = actual.double(), expected.double()
    e_finite, a_finite = torch.isfinite(e), torch.isfinite(a)
    own_scale = float(e[e_finite].abs().max()) if bool(e_finite.any()) else 0.0
    scale = max(own_scale, scale or 0.0)
    atol = rtol * scale

    same_nonfinite = (a == e) | (torch.isnan(a) & torch.isnan(e))
    wrong_nonfinite = ~e_finite & ~same_nonfinite  # a masked result that is not exactly -inf/NaN
    unexpected_nonfinite = e_finite & ~a_finite  # NaN/inf where a number was expected
    too_far = e_finite & a_finite & ((a - e).abs() > atol + rtol * e.abs())
    bad = wrong_nonfinite | unexpected_nonfinite | too_far
    if not bool(bad.any()):
        return

    lines = [
        f"{prefix}{int(bad.sum())} of {bad.numel()} elements differ "
        f"(rtol={rtol:g}, atol={atol:.3g} = rtol * scale {scale:.3g}; max|expected| {own_scale:.3g})"
    ]
    if bool(unexpected_nonfinite.any()):
        idx = [tuple(i) for i in unexpected_nonfinite.nonzero().tolist()[:max_report]]
        lines.append(f"  NaN/inf in actual where expected is finite: {int(unexpected_nonfinite.sum())}, first at {idx}")
    if bool(wrong_nonfinite.any()):
        idx = [tuple(i) for i in wrong_nonfinite.nonzero().tolist()[:max_report]]
        lines.append(f"  expected non-finite entries not matched exactly: {int(wrong_nonfinite.sum())}, first at {idx}")
    if bool(too_far.any()):
        lines.append(f"  max abs error {float((a - e)[too_far].abs().max()):.3g}; first mismatches:")
        for i in too_far.nonzero().tolist()[:max_report]:
            i = tuple(i)
            lines.append(f"    at {i}: actual {float(a[i]):.9g}, expected {float(e[i]):.9g}")
    raise AssertionError("\n".join(lines))


def assert_argmax_close(index, exp_index, exp_value, query, keys, mask=None, msg: str = "", *,
                        gap: float = 1e-6) -> None:
    """``proxy_argmax``'s rule (style B7): the index must be the expected one wherever the best
    score beats the runner-up by more than ``gap`` times the scores' scale; everywhere the float64
    score at the chosen index must equal the best score (``exp_value``)."""
    import oracles  # the float64 scores, summed as plain fsums

    index, exp_index = torch.as_tensor(index).cpu(), torch.as_tensor(exp_index).cpu()
    n_query, n_keys = query.shape[0], keys.shape[0]
    scores = torch.tensor(oracles.proxy_scores(query, keys), dtype=torch.float64).reshape(n_query, n_keys)
    if mask is not None:
        scores[:, ~mask.cpu()] = float("-inf")
    scale = float(scores[torch.isfinite(scores)].abs().max())
    top2 = scores.topk(min(2, n_keys), dim=1).values
    clear = (top2[:, 0] - top2[:, -1] > gap * scale) if n_keys > 1 else torch.ones(n_query, dtype=torch.bool)
    assert torch.equal(index[clear], exp_index[clear]), f"{msg}: indices differ where the best key wins clearly"
    chosen = scores.gather(1, index.view(-1, 1)).squeeze(1)
    assert_close(chosen, exp_value, 1e-5, f"{msg}: scores at the chosen keys")
