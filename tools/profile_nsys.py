"""Profile steady-state SGR training steps under Nsight Systems and print the NVTX and kernel summaries.

    python tools/profile_nsys.py [--variant fast|batched|loop] [--steps 5] [--eval] [--out runs/profile/sgr]

It runs itself under

    nsys profile -t cuda,nvtx,osrt --capture-range=cudaProfilerApi --capture-range-end=stop
                 --cuda-graph-trace=node -o OUT python tools/profile_nsys.py --child ...

where the child builds the end-to-end benchmark's setup (bench/e2e.py: SGR at B = 128 on
Flickr30K-shaped data), runs every prepared batch twice (compilation, CUDA-graph recording),
then captures only ``--steps`` steady-state steps between ``torch.cuda.profiler.start()`` and
``stop()`` (and with ``--eval`` one dev evaluation). The report is OUT.nsys-rep; the summaries
are ``nsys stats --report nvtx_sum,cuda_gpu_kern_sum``. The NVTX ranges (domain "fastncl") are
the trainer's: "step N" > "forward <loss group>", "backward", "optimizer"; they sit around the
compiled and graphed calls, never inside them.
"""
from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))


def child(args) -> int:
    import torch

    from e2e import make_setup, synchronize, warm_up
    from fastncl.profiling import nvtx_range

    setup = make_setup(args.variant, "cuda")
    warm_up(setup)
    warm_up(setup)
    if args.eval:
        setup.evaluate()  # compile the evaluation outside the capture
    synchronize(setup.device)
    torch.cuda.profiler.start()
    for k in range(args.steps):
        with nvtx_range(f"step {k}"):
            setup.step()
    if args.eval:
        with nvtx_range("evaluation"):
            setup.evaluate()
    synchronize(setup.device)
    torch.cuda.profiler.stop()
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--variant", choices=("fast", "batched", "loop"), default="fast")
    p.add_argument("--steps", type=int, default=5, help="steady-state training steps captured")
    p.add_argument("--eval", action="store_true", help="also capture one 1000 x 5000 dev evaluation")
    p.add_argument("--out", default="runs/profile/sgr", help="report path without .nsys-rep")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        return child(args)
    import torch

    if not torch.cuda.is_available():
        print("tools/profile_nsys.py: no CUDA GPU on this machine; profiling needs one", file=sys.stderr)
        return 2
    nsys = shutil.which("nsys")
    if nsys is None:
        print("tools/profile_nsys.py: `nsys` (Nsight Systems) is not on PATH", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    cmd = [nsys, "profile", "-t", "cuda,nvtx,osrt", "--capture-range=cudaProfilerApi", "--capture-range-end=stop",
           "--cuda-graph-trace=node", "--force-overwrite=true", "-o", str(out),
           sys.executable, __file__, "--child", "--variant", args.variant, "--steps", str(args.steps)]
    if args.eval:
        cmd.append("--eval")
    subprocess.run(cmd, cwd=ROOT, check=True)
    report = out.with_suffix(".nsys-rep")
    subprocess.run([nsys, "stats", "--report", "nvtx_sum,cuda_gpu_kern_sum", "--format", "table", str(report)],
                   check=True)
    print(f"report: {report}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
