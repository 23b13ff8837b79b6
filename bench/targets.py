"""The kernels issue's targets, in one place, and their evaluation against benchmark records.

Read by bench/conftest.py (which benchmarks carry the ``target`` mark and run first) and by
tools/gpu_report.py (the met/missed table). Pure Python: no torch, so it is tested on CPU.

A *record* is one measured (op, provider, B, D, dtype, mode) combination, as the harness writes
it (bench/conftest.py ``record``): times in ms (``median_ms`` with ``p20_ms``/``p80_ms`` from
``triton.testing.do_bench``; ``graph_ms`` from ``do_bench_cudagraph``), ``launches`` (kernels
per call, from torch.profiler), ``loss_peak_mb`` (peak allocation minus the inputs and their
gradients) and ``oom`` (the provider ran out of memory; no times).

Targets (H100, bf16, median, forward+backward; all providers measured side by side in one run):
- every op at B = 1024 and 8192: >= 3x the eager reference and >= 1.5x torch.compile(reference)
  (proxy_argmax has no backward: its forward is compared);
- the fused SPS reliable-batch objective at B = 128: <= 25 us, <= 4 launches, <= 10 us in a CUDA graph;
- embedding-level InfoNCE: <= 0.31 ms at B = 8192, D = 256; <= 20 ms at B = 32768, D = 1024;
  loss-attributable peak <= 40 MB at B = 32768; B = 65536 runs (where the eager reference runs out
  of memory).
"""
from __future__ import annotations

MATRIX_OPS = ("infonce_terms", "cross_consistency", "metric_consistency", "esc_anchor_terms", "triplet_terms",
              "proxy_argmax")
EMBED_OPS = ("infonce_terms_embed", "cross_consistency_embed", "metric_consistency_embed")
FUSED_OPS = ("sps_reliable_objective", "esc_division_terms")
FWD_ONLY = ("proxy_argmax",)
PROVIDERS = ("triton", "eager", "compiled")

SPEEDUP_B = (1024, 8192)
MIN_VS_EAGER = 3.0
MIN_VS_COMPILED = 1.5
SPS_B = 128
SPS_MAX_MS = 0.025
SPS_MAX_LAUNCHES = 4
SPS_MAX_GRAPH_MS = 0.010
EMBED_MAX_MS = {(8192, 256): 0.31, (32768, 1024): 20.0}  # infonce_terms_embed, (B, D) -> ms
EMBED_MEM_B = 32768
EMBED_MAX_MB = 40.0
CAPACITY_B = 65536
TARGET_DTYPE = "bf16"
# The shapes each benchmark times: bench_<key>'s parametrisation (bench/conftest.py ``params``: B
# sizes x D dims x dtypes x modes, plus extra (B, D, dtype, mode)); bench/roofline.py tabulates
# the same shapes. Without dims the op takes (B, B) matrices (D None); dtypes default to
# BENCH_DTYPES, modes to fwd and fwd+bwd.
BENCH_DTYPES = ("bf16", "fp32")
_MATRIX_SIZES = (128, 1024, 8192)
_EMBED = {"sizes": (128, 1024, 8192, 32768), "dims": (256, 1024)}
SHAPES = {
    **{op: {"sizes": _MATRIX_SIZES} for op in ("infonce_terms", "cross_consistency", "metric_consistency",
                                               "esc_anchor_terms", "triplet_terms")},
    "proxy_argmax": {"sizes": _MATRIX_SIZES, "dims": (256,), "modes": ("fwd",)},
    **{op: {"sizes": _MATRIX_SIZES} for op in FUSED_OPS},
    "infonce_terms_embed": {**_EMBED, "extra": ((CAPACITY_B, 1024, "bf16", "fwd+bwd"),)},
    "cross_consistency_embed": _EMBED,
    # the closed form's switch (alpha = 0, B >= 8 D) on both sides, recorded as "op (alpha=0)"
    "cross_consistency_embed_alpha0": {"sizes": (1024, 2048, 8192, 32768), "dims": (256, 1024), "dtypes": ("bf16",),
                                       "modes": ("fwd+bwd",)},
    "metric_consistency_embed": _EMBED,
}
# D of the benchmarks of each op (None: the op takes a (B, B) matrix), for targets with no record yet
BENCH_DIMS = {op: SHAPES[op]["dims"] for op in MATRIX_OPS + EMBED_OPS if "dims" in SHAPES[op]}


def target_mode(op: str) -> str:
    return "fwd" if op in FWD_ONLY else "fwd+bwd"


def is_target(op: str, B: int, D: int | None, dtype: str, mode: str) -> bool:
    """Whether a benchmark's numbers enter a target (such benchmarks are marked and run first)."""
    if dtype != TARGET_DTYPE or mode != target_mode(op):
        return False
    if op in MATRIX_OPS + EMBED_OPS and B in SPEEDUP_B:
        return True
    if op == "sps_reliable_objective":
        return B == SPS_B
    if op == "infonce_terms_embed":
        return (B, D) in EMBED_MAX_MS or B in (EMBED_MEM_B, CAPACITY_B)
    return False


def index(records: list[dict]) -> dict:
    """records keyed by (op, provider, B, D, dtype, mode); a later record replaces an earlier one."""
    return {(r["op"], r["provider"], r["B"], r.get("D"), r["dtype"], r["mode"]): r for r in records}


def _time(rec: dict | None) -> float | None:
    if rec is None or rec.get("oom"):
        return None
    return rec.get("median_ms")


def _row(name: str, required: str, measured: str | None, ok: bool | None) -> dict:
    status = "not measured" if measured is None else ("met" if ok else "missed")
    return {"target": name, "required": required, "measured": measured or "—", "status": status}


def fmt_ms(ms: float | None) -> str:
    """A time for humans: microseconds below 1 ms."""
    if ms is None:
        return "—"
    return f"{ms * 1e3:.1f} µs" if ms < 1 else f"{ms:.2f} ms"


def evaluate(records: list[dict]) -> list[dict]:
    """One row per target: {target, required, measured, status}, status "met", "missed" or
    "not measured" (the run has no number for it: skipped, failed, out of time or out of memory)."""
    by_key = index(records)
    rows = []
    for op in MATRIX_OPS + EMBED_OPS:
        mode = target_mode(op)
        measured_dims = {r.get("D") for r in records if r["op"] == op}
        dims = sorted(measured_dims | set(BENCH_DIMS.get(op, (None,))), key=lambda d: d or 0)
        for B in SPEEDUP_B:
            for D in dims:
                shape = f"B={B}" + (f" D={D}" if D else "")
                key = lambda p: (op, p, B, D, TARGET_DTYPE, mode)  # noqa: E731
                t, e, c = (_time(by_key.get(key(p))) for p in PROVIDERS)
                for base, base_t, need in (("eager", e, MIN_VS_EAGER), ("compiled", c, MIN_VS_COMPILED)):
                    name = f"{op} {shape} {TARGET_DTYPE} {mode}: vs {base}"
                    if t is not None and by_key.get(key(base), {}).get("oom"):
                        rows.append(_row(name, f">= {need:g}x", f"{fmt_ms(t)}; {base} out of memory", True))
                        continue
                    if t is None or base_t is None:
                        rows.append(_row(name, f">= {need:g}x", None, None))
                        continue
                    ratio = base_t / t
                    rows.append(_row(name, f">= {need:g}x", f"{ratio:.2f}x ({fmt_ms(t)} vs {fmt_ms(base_t)})",
                                     ratio >= need))
    sps = by_key.get(("sps_reliable_objective", "triton", SPS_B, None, TARGET_DTYPE, "fwd+bwd"))
    t = _time(sps)
    rows.append(_row(f"sps_reliable_objective B={SPS_B}: time", f"<= {fmt_ms(SPS_MAX_MS)}",
                     fmt_ms(t) if t is not None else None, t is not None and t <= SPS_MAX_MS))
    n = None if sps is None else sps.get("launches")
    rows.append(_row(f"sps_reliable_objective B={SPS_B}: launches", f"<= {SPS_MAX_LAUNCHES}",
                     None if n is None else str(n), n is not None and n <= SPS_MAX_LAUNCHES))
    g = None if sps is None else sps.get("graph_ms")
    rows.append(_row(f"sps_reliable_objective B={SPS_B}: in a CUDA graph", f"<= {fmt_ms(SPS_MAX_GRAPH_MS)}",
                     fmt_ms(g) if g is not None else None, g is not None and g <= SPS_MAX_GRAPH_MS))
    for (B, D), limit in EMBED_MAX_MS.items():
        t = _time(by_key.get(("infonce_terms_embed", "triton", B, D, TARGET_DTYPE, "fwd+bwd")))
        rows.append(_row(f"infonce_terms_embed B={B} D={D}: time", f"<= {fmt_ms(limit)}",
                         fmt_ms(t) if t is not None else None, t is not None and t <= limit))
    mem = [r for r in records if (r["op"], r["provider"], r["B"], r["dtype"], r["mode"]) ==
           ("infonce_terms_embed", "triton", EMBED_MEM_B, TARGET_DTYPE, "fwd+bwd") and not r.get("oom")]
    for r in sorted(mem, key=lambda r: r.get("D") or 0) or [None]:
        mb = None if r is None else r.get("loss_peak_mb")
        shape = f"B={EMBED_MEM_B}" + (f" D={r['D']}" if r is not None and r.get("D") else "")
        rows.append(_row(f"infonce_terms_embed {shape}: loss-attributable peak", f"<= {EMBED_MAX_MB:g} MB",
                         None if mb is None else f"{mb:.1f} MB", mb is not None and mb <= EMBED_MAX_MB))
    cap = {p: [r for r in records if (r["op"], r["provider"], r["B"], r["dtype"], r["mode"]) ==
               ("infonce_terms_embed", p, CAPACITY_B, TARGET_DTYPE, "fwd+bwd")] for p in PROVIDERS}
    if cap["triton"]:
        ran = not any(r.get("oom") for r in cap["triton"])
        eager = ("not run" if not cap["eager"] else
                 "out of memory" if any(r.get("oom") for r in cap["eager"]) else "ran too")
        peak = max((r.get("loss_peak_mb") or 0.0) for r in cap["triton"])
        measured = (f"triton ran (loss peak {peak:.1f} MB); eager {eager}" if ran
                    else f"triton out of memory; eager {eager}")
        rows.append(_row(f"infonce_terms_embed B={CAPACITY_B}: runs", "triton runs where eager runs out of memory",
                         measured, ran))
    else:
        rows.append(_row(f"infonce_terms_embed B={CAPACITY_B}: runs", "triton runs where eager runs out of memory",
                         None, None))
    return rows
