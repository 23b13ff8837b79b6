"""Every Triton kernel compiles for an A100 (sm_80) and an H100 (sm_90) as a GPU launch specialises
it, on a machine without a GPU.

Without a GPU the parity tests run the kernels in Triton's interpreter, which executes them as
Python and misses what only the compiler checks (a global read inside a kernel, branch types,
unsupported operations, layouts, register pressure). This test runs tools/aot_report.py's recorder
and compiler (the code that writes the compile report in docs/kernels.md): every op forward and
backward through its launcher, planned for each target (the tiles, warps, stages and dot
precisions a launch on that GPU takes) and specialised by Triton's own binder as ``JITFunction.run``
specialises a GPU launch (integers equal to 1 become constants, integers divisible by 16 and
aligned pointers carry ``tt.divisibility``). For every kernel, dtype (and D, for the embedding
ops) and target it compiles the config with the largest tile, without the compile cache, and
checks that it compiles, that the shared memory it requests fits the target's block (a launch
over it fails only on the GPU), and that it spills no register on the trained path. The (B, B) ops
are recorded at a ragged B = 1000: their largest tiles without the divisibility hints that
B = 1024 gives (the loads lose their vector width, the addresses take registers); the embedding
ops (above EMBED_MIN_BATCH) at B = 1024, and D = 256 and 1024: for each, the worse of the two in
tools/aot_report.py's sweep before issue 21's fixes. The full sweep (every B, ragged or not, every variant) is the table in
docs/kernels.md. On a GPU the parity tests compile the kernels for real, so the test is skipped
there.
"""
from __future__ import annotations

import importlib
import os

import pytest
import torch

from helpers import load_tool

triton = pytest.importorskip("triton", reason="the Triton kernels need the triton package (pip install triton)")

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the parity tests compile every kernel")

aot = load_tool("aot_report")
# the largest tiles of the (B, B) ops (64 x 128 from B = 256 on) at a ragged B; the embedding ops at B = 1024
SWEEP = aot.Sweep(matrix_b=(1000,), embed_b=(1024,), dims=(256, 1024), dtypes=aot.DTYPE_NAMES)


def _all_kernels() -> set[str]:
    """The kernels the op modules define (their launch entry points)."""
    import fastncl.kernels as K

    names = set()
    for module_name in set(K.OPS.values()):
        module = importlib.import_module(f"fastncl.kernels.{module_name}")
        names |= {name for name, value in vars(module).items() if name.endswith("_kernel")
                  and getattr(getattr(value, "fn", None), "__module__", None) == module.__name__}
    return names


def _largest_tiles(configs: list[dict]) -> list[dict]:
    """Per target, kernel, dtype and D, the config with the largest tile (the first recorded of equals)."""
    best: dict[tuple, dict] = {}
    for config in configs:
        context = config["contexts"][0]
        key = (config["target"], config["kernel"], context["dtype"], context["D"])
        if key not in best or aot.tile_size(config) > aot.tile_size(best[key]):
            best[key] = config
    # one per tile: a kernel whose tile does not depend on D (proxy_argmax) compiles once
    return list({(c["target"], c["kernel"], c["contexts"][0]["dtype"], aot.tile(c)): c for c in best.values()}.values())


def test_the_recorder_specialises_as_a_gpu_launch():
    """Sizes divisible by 16 carry tt.divisibility, a ragged size does not; a unit stride is a constant."""
    launches = aot.record(aot.Sweep(matrix_b=(127, 128), embed_b=(), dims=(), dtypes=("bf16",)), ("sm_90",),
                          ops=("infonce_terms",))
    forward = {launch["context"]["B"]: launch for launch in launches
               if launch["kernel"] == "_infonce_fwd_kernel"}
    assert set(forward) == {127, 128}
    assert forward[128]["attrs"]["B"] == [["tt.divisibility", 16]] and forward[127]["attrs"]["B"] == []
    assert forward[128]["attrs"]["stride_r"] == [["tt.divisibility", 16]] and forward[127]["attrs"]["stride_r"] == []
    for launch in forward.values():
        assert launch["constexprs"]["stride_c"] == 1 and launch["signature"]["stride_c"] == "constexpr"
        assert launch["attrs"]["sim_ptr"] == [["tt.divisibility", 16]]  # a fresh tensor is aligned
        assert launch["signature"]["sim_ptr"] == "*bf16" and launch["signature"]["scale"] == "fp32"


@pytest.fixture(scope="module")
def compiled():
    """(configs, results): the largest tile of every kernel per dtype, D and target, compiled."""
    picked = _largest_tiles(aot.configs(aot.record(SWEEP)))
    missing = _all_kernels() - {c["kernel"] for c in picked}
    assert not missing, f"kernels the recorder never launched: {sorted(missing)}"
    assert {c["target"] for c in picked} == set(aot.TARGETS)
    # one compile process per core (ptxas is single-threaded): about half the time on CI's 2 cores
    out = aot.compile_configs(picked, cache=None, timeout=600, workers=os.cpu_count() or 1)
    print(f"{len(picked)} configs compiled (Triton {out['triton']}, ptxas {out['ptxas']})")
    return picked, out["results"]


def test_largest_tiles_compile_for_sm80_and_sm90_and_fit_in_shared_memory(compiled):
    picked, results = compiled
    failures = aot.problems(picked, results)
    assert not failures, "configs that do not compile or do not fit:\n" + "\n".join(failures)
    assert all(r["regs"] > 0 for r in results)
    print("most shared memory per target (bytes): " + str({
        t: max(r["shared"] for c, r in zip(picked, results) if c["target"] == t) for t in aot.TARGETS}))


def test_no_spills_on_the_trained_path(compiled):
    import fastncl.kernels as K

    picked, results = compiled
    spills = [f"{c['target']}: {r['spill_stores']} B of spill stores, {r['spill_loads']} B of loads: {aot.describe(c)}"
              for c, r in zip(picked, results)
              if r["ok"] and r["spill_stores"] + r["spill_loads"]
              and any(aot.trained(ctx, K.EMBED_MIN_BATCH) for ctx in c["contexts"])]
    assert not spills, "register spills on the trained path:\n" + "\n".join(spills)


def test_bad_options_get_one_line_and_exit_status_2(capsys):
    for argv, option in ((["--targets", "sm_70"], "--targets"), (["--jobs", "0"], "--jobs"),
                         (["--ops", "no_such_op"], "--ops"), (["--dims", "-4"], "--dims")):
        with pytest.raises(SystemExit) as exit_info:
            aot.main(argv)
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and option in err, err


def test_the_report_goes_between_its_markers(tmp_path):
    doc = tmp_path / "kernels.md"
    doc.write_text(f"# head\n{aot.BEGIN}\nold\n{aot.END}\ntail\n")
    aot.write_docs("new\n", doc)
    assert doc.read_text() == f"# head\n{aot.BEGIN}\nnew\n{aot.END}\ntail\n"
    assert aot.BEGIN in aot.DOCS.read_text() and aot.END in aot.DOCS.read_text()
    doc.write_text("no markers\n")
    with pytest.raises(ValueError, match="markers"):
        aot.write_docs("new\n", doc)
    assert doc.read_text() == "no markers\n"  # unchanged
