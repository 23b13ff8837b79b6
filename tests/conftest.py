"""Test-session set-up shared by every test module.

Without a CUDA GPU the Triton kernels run in Triton's CPU interpreter, which must be switched on
before ``triton`` is first imported; on a GPU machine they are compiled as in production.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
