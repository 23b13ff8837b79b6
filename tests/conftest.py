"""Test-session set-up shared by every test module.

Without a CUDA GPU the Triton kernels run in Triton's CPU interpreter, which must be switched on
before ``triton`` is first imported; on a GPU machine they are compiled as in production.
"""
import os

# The interpreter runs every tl.dot as a numpy matmul on a small tile: with BLAS threads on the
# shared 2-core CI machine, those threads fight each other and a B = 130 parity test runs several
# times slower. Set before numpy (imported by torch) loads BLAS.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
# Under pytest-xdist (`pytest -n auto`: one worker per core) every worker, and every process a test
# starts, takes one thread: workers with a thread per core each oversubscribe the cores.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("MKL_NUM_THREADS", "1")

import torch  # noqa: E402

if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
