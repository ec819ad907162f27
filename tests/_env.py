"""Facts about this test run that test modules import (never import conftest itself)."""

from __future__ import annotations

import os

import pytest
import torch

# "ci" (the default, what `make test` runs) or "fuzz" (`make fuzz`); see conftest.py.
PROFILE = os.environ.get("HYPOTHESIS_PROFILE", "ci")
# tests/test_fuzz.py draws this many times its examples
FUZZ_FACTOR = 10 if PROFILE == "fuzz" else 1

HAS_CUDA = torch.cuda.is_available()
# Where the GPU backends' tests put their tensors: a GPU when there is one, else the CPU
# (Triton under its interpreter; the CUDA kernels then only compile).
DEVICE = "cuda" if HAS_CUDA else "cpu"

needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
