"""Every Triton kernel compiles for an H100 (CUDA compute capability 9.0), on a machine without a GPU.

Without a GPU the parity tests run the kernels in Triton's interpreter, which executes them as
Python and misses what only the compiler checks (a global read inside a kernel, branch types,
unsupported operations, layouts). This test records every kernel launch the parity cases make
(argument types and compile-time constants), then compiles each distinct signature to a cubin
with the interpreter switched off, in a subprocess (the triton wheel ships ptxas), and checks that
none asks for more shared memory than an H100 block can have (which fails only at launch). On a GPU the
parity tests compile the kernels for real, so the test is skipped there.
"""
from __future__ import annotations

import functools
import inspect
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

triton = pytest.importorskip("triton", reason="the Triton kernels need the triton package (pip install triton)")

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the parity tests compile every kernel")

_DOT_MODULES = ("fastncl.kernels.infonce_embed", "fastncl.kernels.consistency_embed", "fastncl.kernels.proxy")
_TYPES = {torch.float32: "*fp32", torch.bfloat16: "*bf16", torch.float16: "*fp16", torch.int32: "*i32",
          torch.int64: "*i64", torch.bool: "*i1"}


def _describe(value):
    if isinstance(value, torch.Tensor):
        return ["ptr", _TYPES[value.dtype]]
    if isinstance(value, bool):
        return ["bool", value]
    if isinstance(value, int):
        return ["int", value]
    if isinstance(value, float):
        return ["float", value]
    if isinstance(value, str):  # a constexpr such as input_precision
        return ["str", value]
    raise TypeError(f"unexpected kernel argument {value!r}")


def _record_launches(monkeypatch) -> list[dict]:
    """Run every parity case forward and backward in the interpreter, recording each launch."""
    from triton.runtime.interpreter import InterpretedFunction

    import test_kernels_triton as parity

    launches, seen = [], set()
    run = InterpretedFunction.run

    def recording_run(self, *args, grid, warmup, **kwargs):
        values = dict(zip(self.arg_names, args)) | kwargs
        launch = {"module": self.fn.__module__, "name": self.fn.__name__,
                  "args": {name: _describe(v) for name, v in values.items()}}
        # one compile per signature: runtime numbers (sizes, strides, scalars) do not change the code
        params = inspect.signature(self.fn).parameters
        key = json.dumps([launch["module"], launch["name"], {
            name: kind_value if name not in params or "constexpr" in str(params[name].annotation)
            or kind_value[0] == "ptr" else kind_value[0]
            for name, kind_value in launch["args"].items()}], sort_keys=True)
        # fp32 launches compile the same code as bf16 ones (upcasts become no-ops) except around tl.dot
        low_precision = any(v == ["ptr", "*bf16"] for v in launch["args"].values())
        if key not in seen and (low_precision or launch["module"] in _DOT_MODULES):
            seen.add(key)
            launches.append(launch)
            wide = {**launch, "args": launch["args"] | {"BLOCK_R": ["int", 1024]}}
            wide_key = json.dumps(wide, sort_keys=True)
            if "BLOCK_R" in launch["args"] and wide_key not in seen:  # the reduction's width at large B
                seen.add(wide_key)
                launches.append(wide)
        return run(self, *args, grid=grid, warmup=warmup, **kwargs)

    monkeypatch.setattr(InterpretedFunction, "run", recording_run)
    # record the tl.dot precision that compiled kernels use: the interpreter's bf16 workaround
    # (_launch.dot_precision) off, so bf16 operands reach tl.dot (the values are wrong, the launch is right)
    import fastncl.kernels as K
    from fastncl.kernels import _launch

    for name in K.reference.__all__:
        module = sys.modules[K.triton_impl(name).__module__]
        if hasattr(module, "dot_precision"):
            monkeypatch.setattr(module, "dot_precision", lambda dtype: "ieee" if dtype == torch.float32 else "tf32")
        # and the launch shapes of a GPU (the interpreter's are smaller; see _launch.embed_blocks)
        if hasattr(module, "embed_blocks"):
            monkeypatch.setattr(module, "embed_blocks", functools.partial(_launch.embed_blocks, gpu=True))
    gen = torch.Generator().manual_seed(0)
    for case in parity.CASES:
        for n in (130,):  # two or more tiles per axis
            for dtype in (torch.float32, torch.bfloat16):
                inputs, others = case.make(n, gen, dtype)
                leaves = [x.clone().requires_grad_(True) for x in inputs]
                result = case.call(*leaves, *others, backend="triton")
                result = result if isinstance(result, (tuple, list)) else (result,)
                outs = [o for o in result if o.requires_grad]
                if outs:
                    torch.autograd.backward(outs, [torch.ones_like(o) for o in outs])
    for dtype in (torch.float32, torch.bfloat16):  # proxy_argmax has no gradient, so no parity case
        query, keys = torch.randn(300, 64, generator=gen).to(dtype), torch.randn(200, 64, generator=gen).to(dtype)
        for mask in (None, torch.rand(200, generator=gen) > 0.5):
            K.proxy_argmax(query, keys, mask, backend="triton")
    return launches


_COMPILE = textwrap.dedent("""
    import concurrent.futures, importlib, json, os, sys
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    H100_SHARED_PER_BLOCK = 232448  # cudaDevAttrMaxSharedMemoryPerBlockOptin on sm_90 (227 KiB)

    def compile_one(launch):
        fn = getattr(importlib.import_module(launch["module"]), launch["name"])
        signature, constants = {}, {}
        options = {k: launch["args"][k][1] for k in ("num_warps", "num_stages") if k in launch["args"]}
        for param in fn.params:
            kind, value = launch["args"][param.name]
            if param.is_constexpr:
                signature[param.name], constants[param.name] = "constexpr", value
            else:
                signature[param.name] = {"ptr": value, "int": "i32", "float": "fp32", "bool": "i1"}[kind]
        where = f"{launch['module']}.{launch['name']} ({sorted(set(signature.values()))}, {constants}, {options})"
        try:
            kernel = triton.compile(ASTSource(fn, signature, constexprs=constants), target=GPUTarget("cuda", 90, 32),
                                    options=options)
        except Exception as e:  # noqa: BLE001 - every failure is reported
            lines = str(e).strip().splitlines() or [""]
            return launch["name"], None, f"{where}: {type(e).__name__}: {lines[-1][:300]}"
        # a launch asking for more shared memory than a block may have fails at run time, not here
        shared = kernel.metadata.shared
        if shared > H100_SHARED_PER_BLOCK:
            return launch["name"], shared, f"{where}: needs {shared} bytes of shared memory, over {H100_SHARED_PER_BLOCK}"
        return launch["name"], shared, None

    if __name__ == "__main__":
        launches = json.load(open(sys.argv[1]))
        with concurrent.futures.ProcessPoolExecutor(max_workers=min(4, os.cpu_count() or 1)) as pool:
            results = list(pool.map(compile_one, launches))
        shared = {}
        for name, nbytes, _ in results:
            shared[name] = max(shared.get(name, 0), nbytes or 0)
        print(json.dumps({"failures": [f for _, _, f in results if f], "shared": shared}))
""")


def test_every_kernel_compiles_for_sm90(monkeypatch, tmp_path):
    launches = _record_launches(monkeypatch)
    assert launches, "no kernel launch was recorded"
    path = tmp_path / "launches.json"
    path.write_text(json.dumps(launches))
    env = {**os.environ, "TRITON_INTERPRET": "0", "TRITON_CACHE_DIR": str(tmp_path / "cache"),
           "TRITON_DEFAULT_FP_FUSION": "1"}
    script = tmp_path / "compile_kernels.py"  # a file: the worker processes import it as __mp_main__
    script.write_text(_COMPILE)
    proc = subprocess.run([sys.executable, str(script), str(path)], capture_output=True, text=True, env=env,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert not report["failures"], "kernels that do not compile for sm_90:\n" + "\n".join(report["failures"])
    print(f"{len(launches)} launch signatures; most shared memory per kernel (bytes): {report['shared']}")
    names = {launch["name"] for launch in launches}
    assert len(names) >= 2, names
