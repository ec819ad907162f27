// CPU wheels of torch ship c10/cuda headers but not this file, which a CUDA build generates.
// Used only by tests/test_build.py to compile csrc/cuda/*.cu against a CPU torch.
#pragma once
#define C10_CUDA_BUILD_SHARED_LIBS
