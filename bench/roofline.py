"""The roofline of every ``fastncl.kernels`` op: bytes that must move, FLOPs and SFU operations
that must run, and the time they take at a GPU's published peak rates; beside it the same counts
for what the Triton kernels themselves do.

    python bench/roofline.py --markdown                  # print the Roofline section of docs/kernels.md
    python bench/roofline.py --write docs/kernels.md     # regenerate that section in place

Read by bench/conftest.py (every benchmark records its op's bound and, on a known GPU, its time as
a fraction of it) and by tools/gpu_report.py (the report's "% of roofline" column).

What is counted, per pass (forward, backward):
- ``bytes``: HBM traffic at element granularity. Minimum: each (B, B) or (B, D) operand the pass
  needs is read once and each output written once, with the op's own (B,) inputs and outputs and
  the upstream gradients (fp32). Per-sample statistics a kernel saves for its backward are its own
  traffic, not the minimum's.
- ``flops``: matrix-product FLOPs, 2 per multiply-add, on the tensor cores for bf16/fp16 inputs
  (dense rate) and on the FP32 units for fp32 inputs (the kernels' fp32 dots are IEEE, not TF32:
  ``_launch.dot_precision``) and for the consistency ops' closed form (fp32 Grams).
- ``exp``: operations of the special-function units (MUFU): each exp, exp2, log, log2 and
  reciprocal counts one.
Not counted: the adds, multiplies, compares and selects on the FP32 and integer pipes (see
``alu_budget``). The embedding-level ops may hold nothing of size B^2 (their reason to exist), so
their minimum backward recomputes S = img @ txt.T from the embeddings.

Bound of a pass: max(bytes / HBM bandwidth, flops / matrix rate, exp / SFU rate), the three
overlapping perfectly; forward+backward is the sum of its two passes (two launches). Launch
latency is not part of it.

The kernels' own counts follow the launchers' tile choices (``row_block``, ``col_block``,
``embed_blocks``; padded tiles run in full) and estimate HBM re-reads with an L2 model: an operand
read again is an L2 hit when it fits in the L2, else it comes from HBM again; an operand every
program sweeps (the key tower of the embedding kernels, the keys of proxy_argmax) comes from HBM
once per wave of programs (ceil(programs / SMs), one resident program per SM). They need the
``fastncl.kernels`` launchers (torch and triton); the minimum is pure Python, except for the
consistency ops at alpha <= 0, whose algorithm switch is the launcher's.
"""
from __future__ import annotations

import argparse
import re
import sys
from dataclasses import dataclass, replace
from pathlib import Path

if str(Path(__file__).resolve().parent) not in sys.path:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
import targets  # noqa: E402  (bench/targets.py: the benchmarks' shapes)

# CUDA C++ Programming Guide, "Arithmetic Instructions": 32-bit reciprocal, reciprocal square root,
# __log2f, exp2f, __sinf, __cosf run at 16 results per clock per SM on compute capability 8.0 and 9.0
SFU_PER_SM_CLOCK = 16
FP32_LANES_PER_SM = {"sm_80": 64, "sm_90": 128}


@dataclass(frozen=True)
class GPU:
    """A GPU's published peak rates (dense: the datasheets' "with sparsity" figures halved)."""

    name: str
    arch: str
    match: str  # regular expression on torch.cuda.get_device_name()
    hbm: float  # bytes/s
    tensor16: float  # dense BF16/FP16 tensor-core FLOP/s
    tf32: float  # dense TF32 tensor-core FLOP/s (not used: no kernel takes TF32)
    fp32: float  # FP32 FLOP/s on the CUDA cores (an FMA counts 2)
    sms: int
    clock: float  # Hz, maximum boost (the FP32 rate's clock)
    l2: float  # bytes
    source: str

    @property
    def sfu(self) -> float:
        """SFU operations per second: SMs x 16 per clock x the maximum boost clock (derived, not
        on the datasheet; FlashAttention-3 quotes 3.9 T/s for the H100 SXM5 at its 1.83 GHz)."""
        return self.sms * SFU_PER_SM_CLOCK * self.clock

    def matmul_rate(self, unit: str) -> float:
        return self.tensor16 if unit == "MMA" else self.fp32


def _launch_target(gpu: "GPU"):
    """The launchers' plan for ``gpu``'s architecture (kernels/_launch.py: SM80, SM90); the
    backward's own row blocks of the two-tower ops (at most 32 rows) are not modelled."""
    L = _launchers()
    return L.SM90 if gpu.arch == "sm_90" else L.SM80


GPUS = {
    "H100": GPU("H100 SXM5 80GB", "sm_90", r"\bH100\b.*\b(HBM3|SXM)", 3.35e12, 989.4e12, 494.7e12, 66.9e12, 132,
                1.98e9, 50 * 2**20,
                "NVIDIA H100 Tensor Core GPU datasheet, SXM5 column: 3.35 TB/s; BF16/FP16 1,979 and TF32 989 "
                "TFLOPS with sparsity; FP32 67 TFLOPS (132 SMs x 128 FP32 lanes x 2 x 1.98 GHz = 66.9); 50 MB L2"),
    "A100": GPU("A100 SXM4 80GB", "sm_80", r"\bA100-SXM4?-80GB\b", 2.039e12, 312e12, 156e12, 19.5e12, 108, 1.41e9,
                40 * 2**20,
                "NVIDIA A100 Tensor Core GPU datasheet, 80GB SXM column: 2,039 GB/s; BF16/FP16 312 and TF32 156 "
                "TFLOPS dense; FP32 19.5 TFLOPS (108 SMs x 64 FP32 lanes x 2 x 1.41 GHz); 40 MB L2"),
    "A100-40GB": GPU("A100 SXM4 40GB", "sm_80", r"\bA100-SXM4?-40GB\b", 1.555e12, 312e12, 156e12, 19.5e12, 108,
                     1.41e9, 40 * 2**20, "NVIDIA A100 datasheet, 40GB SXM column: 1,555 GB/s; compute as the 80GB"),
    "H200": GPU("H200 SXM 141GB", "sm_90", r"\bH200\b(?!.*NVL)", 4.8e12, 989.4e12, 494.7e12, 66.9e12, 132, 1.98e9,
                50 * 2**20, "NVIDIA H200 datasheet, SXM column: 4.8 TB/s; compute as the H100 SXM5"),
}
DOC_GPUS = ("H100", "A100")
ELEMENT_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}
F32 = 4  # bytes of the fp32 (B,) outputs, statistics and upstream gradients
# each op's parameters that change its counts, with the benchmarks' values as defaults
PARAMS = {
    "esc_anchor_terms": {"normalize": True},
    "triplet_terms": {"margin": "pair", "margin_grad": False},
    "esc_division_terms": {"normalize": True},
    "cross_consistency_embed": {"alpha": 0.01},
    "metric_consistency_embed": {"alpha": 0.01},
}
FWD_ONLY = ("proxy_argmax",)


def gpu_for(device_name: str | None) -> GPU | None:
    """The spec of a ``torch.cuda.get_device_name()``, or None (PCIe and NVL parts, other GPUs)."""
    if not device_name:
        return None
    return next((g for g in GPUS.values() if re.search(g.match, device_name)), None)


def alu_budget(gpu: GPU, element_bytes: int) -> float:
    """FP32 instructions per element of a (B, B) operand read once from HBM before the FP32 pipe,
    not HBM, would bind (an FMA is one instruction): the slack the uncounted arithmetic has."""
    return (gpu.fp32 / 2) / (gpu.hbm / element_bytes)


# ---------------------------------------------------------------------------------------------
# counts


@dataclass(frozen=True)
class Work:
    """One pass's HBM bytes, matrix-product FLOPs (on ``unit``: "MMA" tensor cores or "FP32"
    units) and SFU operations."""

    bytes: float = 0.0
    flops: float = 0.0
    exp: float = 0.0
    unit: str = "MMA"

    def time(self, gpu: GPU) -> tuple[float, str]:
        """(seconds, the binding side: "HBM", "MMA", "FP32" or "SFU") at ``gpu``'s peak rates."""
        sides = [(self.bytes / gpu.hbm, "HBM"), (self.flops / gpu.matmul_rate(self.unit), self.unit),
                 (self.exp / gpu.sfu, "SFU")]
        return max(sides, key=lambda s: s[0])


def _e(dtype: str) -> int:
    if dtype not in ELEMENT_BYTES:
        raise ValueError(f"dtype must be one of {tuple(ELEMENT_BYTES)}, got {dtype!r}")
    return ELEMENT_BYTES[dtype]


def _unit(e: int) -> str:
    return "MMA" if e == 2 else "FP32"


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _pad(n: int, block: int) -> int:
    return _cdiv(n, block) * block


def _params(op: str, params: dict) -> dict:
    unknown = set(params) - set(PARAMS.get(op, {}))
    if unknown:
        raise ValueError(f"{op}: no roofline parameter {sorted(unknown)} (known: {sorted(PARAMS.get(op, {}))})")
    return {**PARAMS.get(op, {}), **params}


def _closed_form(op: str, B: int, D: int, dtype: str, alpha: float) -> bool:
    """Whether a consistency op takes its D x D closed form at this shape (the launcher's rule)."""
    if alpha > 0:
        return False
    import torch

    from fastncl.kernels.consistency_embed import CLOSED_FORM_MIN_RATIO

    dt = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype]
    return B >= CLOSED_FORM_MIN_RATIO[dt] * D


def minimum(op: str, B: int, D: int | None = None, dtype: str = "bf16", **params) -> dict[str, Work]:
    """The minimum of each pass: {"fwd": Work, "bwd": Work} ("bwd" absent for proxy_argmax)."""
    p, e = _params(op, params), _e(dtype)
    S = B * B * e  # one (B, B) matrix
    if op == "infonce_terms":  # two log-sum-exps over S (2 B^2 exp, 2 B log), prob = exp(-loss)
        return {"fwd": Work(S + 4 * F32 * B, exp=2 * B * B + 4 * B),
                "bwd": Work(2 * S + 4 * F32 * B, exp=2 * B * B)}  # both softmaxes again
    if op == "cross_consistency":
        return {"fwd": Work(S + F32), "bwd": Work(2 * S + F32)}
    if op == "metric_consistency":
        return {"fwd": Work(2 * S + F32), "bwd": Work(4 * S + F32)}
    if op == "esc_anchor_terms":  # one shared anchor a (the benchmark's): row a and column a, not S
        return {"fwd": Work(2 * B * e + 8 + F32 * B, exp=B if p["normalize"] else 0),
                "bwd": Work(S + 2 * B * e + F32 * B)}  # dS is dense: written whole
    if op == "triplet_terms":
        m_vec = F32 * B if p["margin"] == "pair" else 0
        m_mat = B * B * F32 if p["margin"] == "matrix" else 0
        return {"fwd": Work(S + m_mat + m_vec + F32 * B),
                "bwd": Work(2 * S + m_mat * (2 if p["margin_grad"] else 1) + m_vec + F32 * B)}
    if op == "proxy_argmax":
        return {"fwd": Work(2 * B * D * e + B + 12 * B, flops=2 * B * B * D, unit=_unit(e))}
    if op == "sps_reliable_objective":  # S, C^I, C^T; four scalars out
        return {"fwd": Work(3 * S + 4 * F32, exp=2 * B * B + 2 * B), "bwd": Work(6 * S + 4 * F32, exp=2 * B * B)}
    if op == "esc_division_terms":  # l_hard needs all of S; the anchor and l_ESC are parts of it
        return {"fwd": Work(S + 2 * F32 * B + 8, exp=B if p["normalize"] else 0),
                "bwd": Work(2 * S + 2 * F32 * B)}
    T = B * D * e  # one (B, D) tower
    if op == "infonce_terms_embed":  # S once; backward: S again (nothing B^2 kept), dS @ txt, dS.T @ img
        return {"fwd": Work(2 * T + 4 * F32 * B, 2 * B * B * D, 2 * B * B + 4 * B, _unit(e)),
                "bwd": Work(4 * T + 4 * F32 * B, 6 * B * B * D, 2 * B * B, _unit(e))}
    if op in ("cross_consistency_embed", "metric_consistency_embed"):
        if _closed_form(op, B, D, dtype, p["alpha"]):  # three D x D Grams; four (B, D) @ (D, D)
            return {"fwd": Work(2 * T + F32, 6 * B * D * D, unit="FP32"),
                    "bwd": Work(4 * T + F32, 8 * B * D * D, unit="FP32")}
        return {"fwd": Work(2 * T + F32, 2 * B * B * D, unit=_unit(e)),
                "bwd": Work(4 * T + F32, 6 * B * B * D, unit=_unit(e))}
    raise ValueError(f"no roofline for op {op!r}")


def _reread(nbytes: float, times: int, gpu: GPU) -> float:
    """An operand read ``times`` over: from HBM each time unless it fits in the L2."""
    return nbytes * (times if nbytes > gpu.l2 else 1)


def _swept(nbytes: float, programs: int, gpu: GPU) -> float:
    """An operand every program sweeps in the same order: once per wave of programs unless it fits."""
    return nbytes * (_cdiv(programs, gpu.sms) if nbytes > gpu.l2 else 1)


def _launchers():
    """The launchers' block-size functions (fastncl.kernels._launch imports triton)."""
    from fastncl.kernels import _launch

    return _launch


def kernel(op: str, B: int, D: int | None, dtype: str, gpu: GPU, **params) -> dict[str, Work]:
    """What the Triton kernels of ``op`` move and run per pass on ``gpu`` (see the module docstring)."""
    p, e = _params(op, params), _e(dtype)
    L = _launchers()
    S = B * B * e
    bm, bn = L.row_block(B), L.col_block(B)
    nb = _cdiv(B, bm)
    Bm, Bn = nb * bm, _pad(B, bn)  # padded rows of a 1-D sweep, padded columns of its tiles
    Bt = _pad(B, bm)  # padded side of the 2-D (BLOCK, BLOCK) backward grids
    if op == "infonce_terms":
        # rows, then columns: each program owns a row (or column) block and sweeps it whole
        return {"fwd": Work(_reread(S, 2, gpu) + 2 * B * e + 6 * F32 * B,
                            exp=2 * Bm * Bn + 2 * Bm * _cdiv(B, bn) + 4 * Bm),
                "bwd": Work(2 * S + 8 * F32 * B, exp=2 * Bt * Bt)}
    if op in ("cross_consistency", "metric_consistency"):
        n = 1 if op == "cross_consistency" else 2
        partials = 2 * F32 * nb * nb  # written, then read by the last program
        return {"fwd": Work(n * S + partials + F32), "bwd": Work(2 * n * S + F32)}
    if op == "esc_anchor_terms":
        fwd = Work(2 * B * e + 8 + F32 * B + 5 * F32 * B, exp=Bm if p["normalize"] else 0)
        if p["normalize"]:  # the whole of S for the dense term; W, V by five small torch ops (~20 B fp32)
            return {"fwd": fwd, "bwd": Work(2 * S + 8 + (1 + 4 + 2) * F32 * B + 20 * F32 * B)}
        return {"fwd": fwd, "bwd": Work(S + 8 + (1 + 2) * F32 * B)}
    if op == "triplet_terms":
        m_vec = F32 * B if p["margin"] == "pair" else 0
        m_mat = B * B * F32 if p["margin"] == "matrix" else 0
        swept = S + m_mat  # S[I, :] and S[:, I] (and M's) in one sweep per row block: each entry twice
        return {"fwd": Work(_reread(swept, 2, gpu) + B * e + m_vec + 6 * F32 * B),
                "bwd": Work(2 * S + m_mat * (2 if p["margin_grad"] else 1) + B * e + m_vec + 6 * F32 * B)}
    if op == "proxy_argmax":
        bd = L.feature_block(D)
        flops = 2 * Bm * _pad(B, bm) * _pad(D, bd)
        return {"fwd": Work(B * D * e + _swept(B * D * e, nb, gpu) + B + 12 * B, flops, unit=_unit(e))}
    if op == "sps_reliable_objective":
        from fastncl.kernels.sps_objective import _BLOCK_M, _BLOCK_N

        sm, sn = _pad(B, _BLOCK_M), _pad(B, _BLOCK_N)
        st = _pad(B, _BLOCK_M)
        return {"fwd": Work(_reread(S, 2, gpu) + 2 * S + B * e + 2 * F32 * B + 2 * 4 * F32 * _cdiv(B, _BLOCK_M)
                            + 4 * F32, exp=2 * sm * sn + 2 * sm * _cdiv(B, _BLOCK_N) + 2 * sm),
                "bwd": Work(_reread(S, 2, gpu) + 2 * S + 3 * S + 2 * F32 * B + 4 * F32, exp=2 * st * st)}
    if op == "esc_division_terms":
        # the diagonal (every program finds the anchor), S[I, :] and S[:, I], row a and column a
        fwd = Work(B * e + _reread(S, 2, gpu) + 2 * B * e + 2 * F32 * B + 8 + 10 * F32 * B,
                   exp=Bm if p["normalize"] else 0)
        return {"fwd": fwd, "bwd": Work(2 * S + B * e + 2 * F32 * B + (5 + 4 + 2) * F32 * B + 8)}
    T = B * D * e
    if op == "infonce_terms_embed":
        k = L.embed_blocks(B, D, e, towers=1, target=_launch_target(gpu))
        nbe = _cdiv(B, k.m)
        Bp, Dp, ncol = nbe * k.m, _pad(D, k.d), _cdiv(D, k.do)
        # forward: 2 nb programs, each direction's keys swept by its nb programs
        towers_f = 2 * T if 2 * T <= gpu.l2 else 2 * T + 2 * _cdiv(nbe, gpu.sms) * T
        fwd = Work(towers_f + 6 * F32 * B, 4 * Bp * Bp * Dp,
                   2 * Bp * Bp + 2 * Bp * _cdiv(B, k.n) + 4 * Bp, _unit(e))
        # backward: per block of gradient columns, both directions recompute S and both softmaxes
        towers_b = 2 * T if 2 * T <= gpu.l2 else ncol * (2 * T + 2 * _cdiv(nbe, gpu.sms) * T)
        bwd = Work(towers_b + 2 * T + 8 * F32 * B, 4 * ncol * Bp * Bp * Dp + 4 * Bp * Bp * ncol * k.do,
                   4 * ncol * Bp * Bp, _unit(e))
        return {"fwd": fwd, "bwd": bwd}
    if op in ("cross_consistency_embed", "metric_consistency_embed"):
        if _closed_form(op, B, D, dtype, p["alpha"]):  # torch matmuls; the Grams saved for the backward
            m = minimum(op, B, D, dtype, **params)
            grams = 3 * D * D * F32
            return {"fwd": replace(m["fwd"], bytes=m["fwd"].bytes + grams),
                    "bwd": replace(m["bwd"], bytes=m["bwd"].bytes + grams)}
        k = L.embed_blocks(B, D, e, towers=2, target=_launch_target(gpu))
        # the backward's own launch shape: on a GPU its programs own at most 32 rows (two fp32 accumulators)
        kb = L.embed_blocks(B, D, e, towers=2, target=_launch_target(gpu), backward=True)
        nbe, nbb = _cdiv(B, k.m), _cdiv(B, kb.m)
        Dp, Bpb, Dpb, ncol = _pad(D, k.d), nbb * kb.m, _pad(D, kb.d), _cdiv(D, kb.do)
        tile2 = k.m * D * e * 2  # a row block of both towers
        if 2 * T <= gpu.l2:
            towers_f = towers_b = 2 * T
        else:
            # grid (I, J), I fastest, I <= J active: for each J the row blocks 0..J again, from HBM
            # once they outgrow the L2; backward: each program sweeps every column block
            towers_f = 2 * T + sum((j + 1) * tile2 for j in range(nbe) if (j + 1) * tile2 > gpu.l2)
            towers_b = ncol * (2 * T + _cdiv(nbb, gpu.sms) * 2 * T)
        partials = 2 * F32 * nbe * nbe
        fwd = Work(towers_f + partials + F32, 2 * k.m * k.m * Dp * nbe * (nbe + 1), unit=_unit(e))
        bwd = Work(towers_b + 2 * T + F32, 4 * ncol * Bpb * Bpb * Dpb + 4 * Bpb * Bpb * ncol * kb.do, unit=_unit(e))
        return {"fwd": fwd, "bwd": bwd}
    raise ValueError(f"no roofline for op {op!r}")


def passes(mode: str) -> tuple[str, ...]:
    if mode not in ("fwd", "bwd", "fwd+bwd"):
        raise ValueError(f"mode must be fwd, bwd or fwd+bwd, got {mode!r}")
    return tuple(mode.split("+"))


@dataclass(frozen=True)
class Bound:
    seconds: float
    sides: tuple[str, ...]  # the binding side of each pass, in order

    @property
    def ms(self) -> float:
        return self.seconds * 1e3


def bound_of(work: dict[str, Work], mode: str, gpu: GPU) -> Bound:
    times = [work[p].time(gpu) for p in passes(mode)]
    return Bound(sum(t for t, _ in times), tuple(s for _, s in times))


def total(work: dict[str, Work], mode: str) -> Work:
    """The passes of ``mode`` summed (for the records' bytes, flops and exp)."""
    ws = [work[p] for p in passes(mode)]
    return Work(sum(w.bytes for w in ws), sum(w.flops for w in ws), sum(w.exp for w in ws), ws[0].unit)


def record_fields(op: str, B: int, D: int | None, dtype: str, mode: str, device_name: str | None,
                  **params) -> dict:
    """What a benchmark record carries: the op's minimum (``bytes``, ``flops``, ``exp``), and on a
    GPU with a spec here its bound (``roofline_ms``, ``roofline_binds``) and the Triton kernels'
    own (``roofline_kernel_ms``); on another GPU ``roofline_note`` says why there is no bound."""
    label_params = {k: v for k, v in params.items() if k in PARAMS.get(op, {})}
    m = minimum(op, B, D, dtype, **label_params)
    tot = total(m, mode)
    out = {"bytes": float(tot.bytes), "flops": float(tot.flops), "exp": float(tot.exp)}
    gpu = gpu_for(device_name)
    if gpu is None:
        out["roofline_note"] = (f"no published spec for {device_name or 'this device'!r} in bench/roofline.py "
                                f"(known: {', '.join(g.name for g in GPUS.values())}): no bound, no fraction")
        return out
    b = bound_of(m, mode, gpu)
    out.update(roofline_gpu=gpu.name, roofline_ms=b.ms, roofline_binds="+".join(b.sides))
    try:
        out["roofline_kernel_ms"] = bound_of(kernel(op, B, D, dtype, gpu, **label_params), mode, gpu).ms
    except ImportError as err:  # no triton: the minimum still stands
        out["roofline_note"] = f"the kernels' own counts need fastncl.kernels' launchers ({err})"
    return out


def fractions(rec: dict) -> dict:
    """The bound over the measured times (1 = at the bound): ``roofline_fraction`` (median of
    do_bench), ``roofline_graph_fraction`` (CUDA graph), ``roofline_kernel_fraction`` (the Triton
    kernels' own bound over their median); nothing without a bound or a time."""
    bound, out = rec.get("roofline_ms"), {}
    if not bound or rec.get("oom"):
        return out
    if rec.get("median_ms"):
        out["roofline_fraction"] = bound / rec["median_ms"]
    if rec.get("graph_ms"):
        out["roofline_graph_fraction"] = bound / rec["graph_ms"]
    if rec.get("provider") == "triton" and rec.get("roofline_kernel_ms") and rec.get("median_ms"):
        out["roofline_kernel_fraction"] = rec["roofline_kernel_ms"] / rec["median_ms"]
    return out


# ---------------------------------------------------------------------------------------------
# the Markdown section of docs/kernels.md

BEGIN = ("<!-- roofline:begin: generated by `python bench/roofline.py --write docs/kernels.md`; "
         "edit bench/roofline.py -->")
END = "<!-- roofline:end -->"
BEGIN_PREFIX = "<!-- roofline:begin"

# (title, op, the benchmark's shapes in targets.SHAPES, roofline parameters)
SECTIONS = [
    ("`infonce_terms(sim, tau)`", "infonce_terms", "infonce_terms", {}),
    ("`cross_consistency(sim, alpha)`", "cross_consistency", "cross_consistency", {}),
    ("`metric_consistency(sim_img, sim_txt, alpha)`", "metric_consistency", "metric_consistency", {}),
    ("`esc_anchor_terms(sim, anchor, normalize=True)`, one anchor for the batch", "esc_anchor_terms",
     "esc_anchor_terms", {}),
    ("`triplet_terms(sim, margin, hardest)`, a (B,) fp32 margin", "triplet_terms", "triplet_terms", {}),
    ("`triplet_terms(sim, margin, hardest)`, a (B, B) fp32 margin (NCR's targets; not benchmarked)",
     "triplet_terms", "triplet_terms", {"margin": "matrix"}),
    ("`proxy_argmax(query, keys, key_mask)`", "proxy_argmax", "proxy_argmax", {}),
    ("`sps_reliable_objective(sim, sim_img, sim_txt, ...)`", "sps_reliable_objective", "sps_reliable_objective", {}),
    ("`esc_division_terms(sim, margin, beta, normalize=True)`", "esc_division_terms", "esc_division_terms", {}),
    ("`infonce_terms_embed(img, txt, tau)`", "infonce_terms_embed", "infonce_terms_embed", {}),
    ("`cross_consistency_embed(img, txt, alpha=0.01)`", "cross_consistency_embed", "cross_consistency_embed", {}),
    ("`cross_consistency_embed(img, txt, alpha=0)`: the closed form from B >= 8 D", "cross_consistency_embed",
     "cross_consistency_embed_alpha0", {"alpha": 0.0}),
    ("`metric_consistency_embed(f_img, f_txt, alpha=0.01)`", "metric_consistency_embed", "metric_consistency_embed",
     {}),
]

# the minimum, and where the kernels move or run more, why (e: bytes per element of the inputs)
NOTES = {
    "infonce_terms": (
        "Minimum: forward B²e + 16B bytes and 2B² + 4B exp (each entry's exp in its row's and its column's "
        "log-sum-exp); backward 2B²e + 16B (S in, dS out) and 2B² exp (both softmaxes).",
        "Kernel: the forward reads S twice, once by the row programs and once by the column programs (a "
        "program owns whole rows or whole columns so that each log-sum-exp is one program's, with no atomics); "
        "the second read comes from the L2 while S fits in it (B = 1024), from HBM above (B = 8192: 2× the "
        "minimum's bytes). The online log-sum-exp adds one rescaling exp per row and tile (1/128 more)."),
    "cross_consistency": (
        "Minimum: forward B²e + 4, backward 2B²e + 4.",
        "Kernel: at the minimum. Program (I, J) reads the tile pair (I, J) and (J, I), so every entry is read "
        "once; the forward adds one fp32 partial per tile (written, then read by the last program)."),
    "metric_consistency": (
        "Minimum: forward 2B²e + 4, backward 4B²e + 4.",
        "Kernel: at the minimum (elementwise tiles), plus the forward's per-tile partials."),
    "esc_anchor_terms": (
        "Minimum: forward row a and column a of S, 2Be (not S: the benchmark's anchor is one for the batch), "
        "and B reciprocals; backward writes the dense dS, B²e, and reads row a and column a.",
        "Kernel: the normalised backward also reads all of S, B²e, for the dense term S[r, c] W_r − V_r, where "
        "only the anchor rows have W_r ≠ 0 (one row for a shared anchor); W and V come from five small torch "
        "launches. At B = 8192 the backward moves about 2× the minimum's bytes; without normalize it is at "
        "the minimum."),
    "triplet_terms": (
        "Minimum: forward B²e (+ the margins: 4B for (B,), 4B² for (B, B)); backward 2B²e (+ the (B, B) margin "
        "read, and its gradient written when it needs one).",
        "Kernel: the forward reads S twice: program I sweeps S[I, :] and S[:, I] (the row and the column "
        "direction of its pairs in one sweep, no atomics), so every entry is read by two programs; from HBM "
        "twice once S does not fit in the L2 (B = 8192). A (B, B) margin is swept the same way. The backward "
        "is at the minimum."),
    "proxy_argmax": (
        "Minimum: 2BDe (queries and keys once) and 2B²D FLOPs; no backward.",
        "Kernel: each program sweeps all the keys; they stay in the L2 at the benchmark's shapes (keys of "
        "8.4 MB at most), so the bytes are the minimum's, and so are the FLOPs."),
    "sps_reliable_objective": (
        "Minimum: forward 3B²e (S, C^I, C^T) and 2B² + 2B exp; backward 6B²e and 2B² exp.",
        "Kernel: program I reads S[I, :] and S[:, I] (row and column log-sum-exps of its pairs, and the cross "
        "hinge's S_ij − S_ji), in the backward tile (I, J) and tile (J, I): S is read twice in each pass, "
        "from HBM once it outgrows the L2 (B = 8192 here, where the objective is not meant to run: it is "
        "specified for B ≤ 256, and at B = 128 the bound is far below a launch's latency)."),
    "esc_division_terms": (
        "Minimum: forward B²e (l_hard needs all of S; the anchor's diagonal, row and column are parts of it), "
        "backward 2B²e.",
        "Kernel: the forward reads S twice (the triplet sweep: S[I, :] and S[:, I] per program), from HBM at "
        "B = 8192; every program also finds the anchor from the diagonal (an L2 hit after the first). The "
        "backward is at the minimum."),
    "infonce_terms_embed": (
        "Minimum: forward 2BDe, 2B²D FLOPs (S once) and 2B² + 4B exp; backward 4BDe (read both towers, write "
        "both gradients), 6B²D FLOPs (S again, dS @ txt, dSᵀ @ img) and 2B² exp.",
        "Kernel: each direction's programs form their own tiles of S (image rows; caption rows of txt @ "
        "imgᵀ), so that a log-sum-exp is one program's with no atomics: 4B²D FLOPs forward, 2× the "
        "minimum. The backward forms S again in each direction (d_img = dS @ txt by row blocks, d_txt = "
        "dSᵀ @ img by caption blocks, FlashAttention-2's split, no atomics) and both softmaxes with it, per "
        "block of gradient columns: 8B²D FLOPs and 4B² exp with one chunk (bf16, D ≤ 256), "
        "(4⌈D/256⌉ + 4)B²D and 4⌈D/256⌉B² exp above; fp32 takes IEEE dots on the FP32 units in 32-wide "
        "chunks and 64 gradient columns per program (chosen to avoid register spills), "
        "(4⌈D/64⌉ + 4)B²D: 20B²D at D = 256, 68B²D at D = 1024. Where the two towers outgrow the L2 "
        "(B = 32768; fp32 also B = 8192, D = 1024) the key tower comes from HBM once per wave of programs, "
        "still far below the time of the matrix products."),
    "cross_consistency_embed": (
        "Minimum (tiles, alpha > 0): forward 2BDe and 2B²D FLOPs (S once: S_ij and S_ji are both entries); "
        "backward 4BDe and 6B²D FLOPs (S again, E @ txt, E @ img).",
        "Kernel: the forward forms each symmetric tile pair once (2B²D FLOPs, plus the diagonal tiles once "
        "more); the backward recomputes both tile products of every tile in each row block and per block of "
        "gradient columns: 8B²D with one chunk, (4⌈D/256⌉ + 4)B²D above, fp32 (4⌈D/64⌉ + 4)B²D. Bytes: "
        "at the minimum while both towers fit in the L2. Above (bf16 at B = 32768, D = 1024; fp32 at "
        "B = 8192, D = 1024 and at B = 32768), the "
        "forward's grid, (I, J) with I varying fastest, reads the row blocks 0..J again for every J, and once "
        "they outgrow the L2 they come from HBM again: at B = 32768, D = 1024 (bf16) about {xe_gb:.0f} GB, "
        "{xe_ms:.1f} ms on an H100 against {xe_mma:.1f} ms of tensor-core time, so by this estimate that "
        "forward is HBM-bound ({xe_ratio:.1f}× its minimum's bound); a grouped launch order (tiles of J "
        "blocks sharing their I blocks in the L2, as Triton's matmul tutorial groups its programs) would "
        "keep it compute-bound. (fp32 streams as much, but its FP32 units bind first.)"),
    "cross_consistency_embed_alpha0": (
        "With alpha ≤ 0 the hinge never clips and from B ≥ 8D (fp32: 2D) the op takes its closed form: three "
        "D × D fp32 Grams (6BD² FLOPs) and four (B, D) @ (D, D) products (8BD²), on the FP32 units, through "
        "torch; below 8D the tiles above. The minimum here is that of the algorithm the launcher picks.",
        "Kernel: the closed form's bytes add the three saved Grams (3D² fp32). By the peak rates the switch "
        "comes early: the closed form's 14BD² FP32 FLOPs take less time than the tile kernels' 10B²D "
        "tensor-core FLOPs only from B = {cf_h100:.0f}D on an H100 ({cf_a100:.0f}D on an A100; "
        "{cf_min_h100:.0f}D against the tiles' minimum, 8B²D), so at B = 2048, D = 256 and B = 8192, "
        "D = 1024 the tiles' bound is the lower (compare the alpha = 0.01 table); `CLOSED_FORM_MIN_RATIO` "
        "(8 for 16-bit inputs) was set from \"a few hundred TFLOP/s\" of tensor-core rate, below the "
        "dense peak of 989 (H100) or 312 (A100)."),
    "metric_consistency_embed": (
        "Minimum: as cross_consistency_embed's (the two Gram matrices are symmetric: their upper triangles, "
        "2B²D FLOPs forward; backward 6B²D).",
        "Kernel: as cross_consistency_embed's."),
}


def _fmt_bytes(n: float) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.3g} {unit}"
    return f"{n:.0f} B"


def _fmt_count(n: float) -> str:
    for unit, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= scale:
            return f"{n / scale:.3g} {unit}"
    return f"{n:.0f}"


def _fmt_time(t: float, side: str) -> str:
    us = t * 1e6
    return (f"{us:.3g}" if us < 1000 else f"{us:,.0f}") + f" {side}"


def _pair(values) -> str:
    return " / ".join(values)


def _shapes(key: str) -> list[tuple[int, int | None, str]]:
    """(B, D, dtype) of a benchmark (targets.SHAPES), in the order of its parametrisation."""
    s = targets.SHAPES[key]
    combos = [(B, D, dt) for B in s["sizes"] for D in s.get("dims", (None,))
              for dt in s.get("dtypes", targets.BENCH_DTYPES)]
    combos += [(B, D, dt) for B, D, dt, _ in s.get("extra", ())]
    return list(dict.fromkeys(combos))


def op_table(op: str, key: str, params: dict, kernels: bool = True) -> list[str]:
    """One op's table: a row per benchmark shape (B, D, dtype); each cell "forward / backward"."""
    ps = passes("fwd" if op in FWD_ONLY else "fwd+bwd")
    rows = []
    for B, D, dtype in _shapes(key):
        m = minimum(op, B, D, dtype, **params)
        own = {g: kernel(op, B, D, dtype, GPUS[g], **params) for g in DOC_GPUS} if kernels else {}
        rows.append((B, D, dtype, m, own))
    columns = [("bytes", "bytes", _fmt_bytes)]
    columns += [(c, name, _fmt_count) for c, name in (("flops", "FLOP"), ("exp", "SFU ops"))
                if any(getattr(m[p], c) for *_, m, _ in rows for p in ps)]
    what = " / ".join(ps)
    short = {g: GPUS[g].name.split()[0] for g in DOC_GPUS}
    head = ["B"] + (["D"] if rows[0][1] is not None else []) + ["dtype"]
    head += [f"{name} {what}" for _, name, _ in columns] + [f"{short[g]} µs {what}" for g in DOC_GPUS]
    head += [f"kernel, {short[g]} µs {what}" for g in DOC_GPUS] if kernels else []
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for B, D, dtype, m, own in rows:
        cells = [str(B)] + ([str(D)] if D is not None else []) + [dtype]
        cells += [_pair(fmt(getattr(m[p], c)) for p in ps) for c, _, fmt in columns]
        cells += [_pair(_fmt_time(*m[p].time(GPUS[g])) for p in ps) for g in DOC_GPUS]
        cells += [_pair(_fmt_time(*own[g][p].time(GPUS[g])) for p in ps) for g in own]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def spec_table() -> list[str]:
    lines = ["| GPU | HBM | BF16/FP16 tensor (dense) | TF32 tensor (dense) | FP32 | SFU (derived) | SMs | L2 |",
             "|---|---|---|---|---|---|---|---|"]
    for g in GPUS.values():
        lines.append(f"| {g.name} | {g.hbm / 1e12:.4g} TB/s | {g.tensor16 / 1e12:.4g} TFLOP/s | "
                     f"{g.tf32 / 1e12:.4g} TFLOP/s | {g.fp32 / 1e12:.3g} TFLOP/s | {g.sfu / 1e12:.3g} T/s | {g.sms} | "
                     f"{g.l2 / 2**20:.0f} MiB |")
    return lines


def facts() -> dict:
    """The numbers the section's prose quotes, computed here so that the text follows the model."""
    h, a = GPUS["H100"], GPUS["A100"]
    inf = minimum("infonce_terms", 8192, None, "bf16")["fwd"]
    emb = minimum("infonce_terms_embed", 8192, 256, "bf16")["fwd"]
    out = {"sfu_n": inf.exp, "sfu_h": inf.exp / h.sfu * 1e6, "hbm_h": inf.bytes / h.hbm * 1e6,
           "sfu_a": inf.exp / a.sfu * 1e6, "hbm_a": inf.bytes / a.hbm * 1e6,
           "esfu_h": emb.exp / h.sfu * 1e6, "emma_h": emb.flops / h.tensor16 * 1e6,
           # B / D from which the closed form (14 B D^2 on the FP32 units) beats the tiles (B^2 D on the tensor cores)
           "cf_h100": 14 * h.tensor16 / (10 * h.fp32), "cf_a100": 14 * a.tensor16 / (10 * a.fp32),
           "cf_min_h100": 14 * h.tensor16 / (8 * h.fp32)}
    try:
        k = kernel("cross_consistency_embed", 32768, 1024, "bf16", h)["fwd"]
        m = minimum("cross_consistency_embed", 32768, 1024, "bf16")["fwd"]
        out.update(xe_gb=k.bytes / 1e9, xe_ms=k.bytes / h.hbm * 1e3, xe_mma=k.flops / h.tensor16 * 1e3,
                   xe_ratio=k.time(h)[0] / m.time(h)[0])
    except ImportError:  # no launchers: the kernel notes are left out anyway
        out.update(xe_gb=float("nan"), xe_ms=float("nan"), xe_mma=float("nan"), xe_ratio=float("nan"))
    return out


def markdown(kernels: bool | None = None) -> str:
    """The Roofline section of docs/kernels.md, markers included. ``kernels``: include the
    kernels' own bounds (default: when the launchers import)."""
    if kernels is None:
        try:
            _launchers()
            kernels = True
        except ImportError:
            kernels = False
    h, a = GPUS["H100"], GPUS["A100"]
    f = facts()
    out = [BEGIN, "## Roofline", "",
           "For every op and every shape the benchmarks time (`bench/bench_<op>.py`): the bytes that must move "
           "and the work that must run, forward and backward, and the time they take at the H100's and the "
           "A100's published peak rates. `python bench/roofline.py --write docs/kernels.md` regenerates this "
           "section from `bench/roofline.py`, whose docstring defines every count. No GPU has measured any of "
           "it yet.", "",
           "* **Bytes**: HBM traffic, element granularity: each (B, B) or (B, D) operand the pass needs read "
           "once, each output written once, with the op's (B,) inputs and outputs and the fp32 upstream "
           "gradients. e is the input's bytes per element.",
           "* **FLOP**: matrix-product FLOPs (2 per multiply-add): on the tensor cores for bf16 "
           "(dense rate; sparsity excluded), on the FP32 units for fp32 inputs (the kernels' fp32 dots are "
           "IEEE, not TF32) and for the consistency ops' closed form. The embedding-level ops keep nothing of "
           "size B², so their minimum backward forms S = img @ txtᵀ again.",
           "* **SFU ops**: exp, exp2, log, log2 and reciprocals on the special-function units, one each; their "
           f"rate is SMs × {SFU_PER_SM_CLOCK} per clock (CUDA C++ Programming Guide, arithmetic instruction "
           "throughput, compute capability 8.0 and 9.0) × the maximum boost clock: derived, not on the "
           "datasheets. No op is SFU-bound at these shapes, but InfoNCE comes close: at B = 8192 (bf16) the "
           f"forward's {f['sfu_n'] / 1e6:.0f} M exps take {f['sfu_h']:.0f} µs of SFU time against "
           f"{f['hbm_h']:.0f} µs of HBM time on an H100 ({f['sfu_a']:.0f} against {f['hbm_a']:.0f} µs on an "
           "A100), and the embedding-level forward at D = 256 spends nearly as long on its exps as on its "
           f"matrix products ({f['esfu_h']:.0f} against {f['emma_h']:.0f} µs on an H100).",
           "* **Not counted**: the adds, multiplies, compares and selects on the FP32 and integer pipes. "
           f"They stay below the HBM time while a kernel spends fewer than {alu_budget(h, 2):.0f} FP32 "
           f"instructions per 16-bit element it reads on an H100 ({alu_budget(h, 4):.0f} per fp32 element), "
           f"{alu_budget(a, 2):.1f} ({alu_budget(a, 4):.0f}) on an A100. By a reading of their code the fused "
           "backward passes of the hinge ops (triplet, ESC) do on the order of ten such operations per entry "
           "(two per element moved: S in, dS out), so on an A100 the ALU may bind before the HBM; the "
           "kernels' instructions (SASS) were not counted.",
           "* **Bound** of a pass: max(bytes / HBM bandwidth, FLOP / matrix rate, SFU ops / SFU rate), "
           "the binding side after the time (HBM, MMA: tensor cores, FP32: FP32 units, SFU); forward + "
           "backward is the sum of the two passes. Launch latency (a few µs per launch; no published figure) "
           "is not in it: bounds of a few µs and below (every B = 128 row) say what the hardware could do, "
           "not what a launch reaches.",
           "* **Kernel**: the same counts for what the Triton kernels do, with the launchers' tiles (padded "
           "tiles run in full) and an L2 model for re-reads: an operand read again is an L2 hit if it fits "
           "in the L2, else HBM traffic again; one that every program sweeps in the same order comes from "
           "HBM once per wave of programs (⌈programs / SMs⌉). Estimates from the code, not measurements; "
           "the notes under each table say where and why they exceed the minimum.",
           "* **In the benchmarks**: every record carries the minimum (`bytes`, `flops`, `exp`) and, on a GPU "
           "listed below (matched by `torch.cuda.get_device_name()`), `roofline_ms`, `roofline_binds`, "
           "`roofline_kernel_ms` and the bound over the measured time: `roofline_fraction` (median of "
           "`do_bench`; 1 = at the bound), `roofline_graph_fraction` (CUDA graph), "
           "`roofline_kernel_fraction` (Triton's own bound). On another GPU `roofline_note` says there is no "
           "bound. `tools/gpu_report.py` shows the fraction as `% of roofline`.", "",
           "Peak rates (the datasheets' dense figures). The tables below give the H100 and the 80GB A100; the "
           "benchmarks recognise all four (PCIe and NVL parts have lower rates and no entry):", ""]
    out += spec_table()
    out += ["", "Sources: " + "; ".join(f"{g.name}: {g.source}" for g in GPUS.values()) + ".", ""]
    for title, op, key, params in SECTIONS:
        note_key = key if key in NOTES else op
        out += [f"### {title}", ""]
        minimum_note, kernel_note = NOTES[note_key]
        text = minimum_note + " " + (kernel_note if kernels else "(The kernels' own counts need the "
                                      "fastncl.kernels launchers, which import triton.)")
        out += [text.format(**f), ""]
        out += op_table(op, key, params, kernels)
        out.append("")
    out.append(END)
    return "\n".join(out) + "\n"


def replace_section(text: str, section: str) -> str:
    """``text`` with its roofline section (from the line starting ``<!-- roofline:begin`` through
    ``<!-- roofline:end -->``) replaced by ``section``."""
    start, end = text.find(BEGIN_PREFIX), text.find(END)
    if start < 0 or end < start:
        raise ValueError(f"has no roofline section (a line starting {BEGIN_PREFIX!r}, later a line {END!r})")
    return text[:start] + section + text[end + len(END):].removeprefix("\n")


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2
        self.exit(2, f"{self.prog}: error: {message}\n")


def main(argv: list[str] | None = None) -> int:
    p = _Parser(prog="bench/roofline.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--markdown", action="store_true", help="print the Roofline section of docs/kernels.md (default)")
    p.add_argument("--write", type=Path, metavar="FILE",
                   help="replace the Roofline section of FILE (between its roofline markers) in place")
    args = p.parse_args(argv)
    if args.write is None:
        sys.stdout.write(markdown())
        return 0
    try:
        text = args.write.read_text(encoding="utf-8")
        replace_section(text, "")
    except (OSError, UnicodeDecodeError, ValueError) as err:
        p.error(f"--write: {args.write} {err if isinstance(err, ValueError) else 'cannot be read: ' + str(err)}")
    section = markdown()
    new = replace_section(text, section)
    if new != text:
        from fastncl.run import write_atomic

        write_atomic(args.write, new)
    if args.markdown:
        sys.stdout.write(section)
    return 0


if __name__ == "__main__":
    sys.exit(main())
