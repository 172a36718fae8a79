"""Every test starts from the same random state, so a failure reproduces from its node id.

Without a GPU, Triton runs in its interpreter (``TRITON_INTERPRET=1``), so that the Triton
DCNv3 kernels can be tested on CPU tensors (tests/test_dcnv3_triton.py). ``triton.jit`` reads
the variable when it decorates a function, and Triton's own library (``tl.sum``, ``tl.max``)
is decorated at the first ``import triton``, which timm and torch._dynamo do while the test
modules are collected; the interpreter also reads it again at every launch. So it is set
here, before any test module is imported, for the whole session. Nothing else on a CPU-only
machine runs Triton (inductor compiles C++ for CPU and reads the variable only when it
generates Triton code for a GPU), so the other tests are unaffected. With a GPU visible the
variable is left alone and the Triton tests run the compiled kernels on CUDA tensors.
"""
import os
import random

import numpy as np
import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True)
def _seed_everything():
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    yield
