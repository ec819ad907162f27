"""Builds screening_attn._C (C++ CPU kernels always; CUDA kernels when torch has CUDA and a
toolkit is found, or FORCE_CUDA=1). DEBUG=1 builds with -O0 -g; SANITIZE=1 with AddressSanitizer
and UndefinedBehaviorSanitizer (`make sanitize` builds that into build/sanitize and tests it);
MAX_JOBS is honoured by ninja. SCREENING_ATTN_NO_EXT=1 installs the Python package alone (the
Makefile then builds _C in place, once)."""

import glob
import os

import torch
from setuptools import setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

ROOT = os.path.dirname(os.path.abspath(__file__))
DEBUG = os.environ.get("DEBUG", "0") == "1"
SANITIZE = os.environ.get("SANITIZE", "0") == "1"
# -O1: fast enough to run the tests, with exact stack traces; -fno-sanitize-recover makes a UB
# report abort the run instead of scrolling past; -fno-wrapv undoes Python's -fwrapv (first on
# the command line), under which signed overflow is defined and UBSan would not check it.
SANITIZE_FLAGS = [
    "-fsanitize=address,undefined",
    "-fno-omit-frame-pointer",
    "-fno-sanitize-recover=undefined",
    "-fno-wrapv",
    "-O1",
    "-g",
]
WITH_CUDA = os.environ.get("FORCE_CUDA", "0") == "1" or (
    torch.version.cuda is not None and CUDA_HOME is not None
)


def extension():
    opt = ["-O0", "-g"] if DEBUG else ["-O3"]
    sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
    # -fno-trapping-math lets GCC vectorize branch-free selects (exp_nonpositive in screening.h)
    cxx = [*(SANITIZE_FLAGS if SANITIZE else opt), "-fopenmp", "-fno-trapping-math", "-std=c++20"]
    define = []
    kwargs = {}
    if WITH_CUDA:
        sources += sorted(glob.glob("csrc/cuda/*.cu"))
        archs = os.environ.get("TORCH_CUDA_ARCH_LIST", "")
        define = [("SCREENING_ATTN_WITH_CUDA", None), ("SCREENING_ATTN_CUDA_ARCHS", f'"{archs}"')]
        cccl = os.path.join(CUDA_HOME or "/usr/local/cuda", "include", "cccl")
        kwargs["extra_compile_args"] = {
            "cxx": cxx,
            "nvcc": [*opt, "--expt-relaxed-constexpr", f"-I{cccl}"],
        }
        ext_cls = CUDAExtension
    else:
        kwargs["extra_compile_args"] = {"cxx": cxx}
        ext_cls = CppExtension
    return ext_cls(
        "screening_attn._C",
        sources,
        include_dirs=[os.path.join(ROOT, "csrc", "include")],
        define_macros=define,
        extra_link_args=["-fopenmp", *(SANITIZE_FLAGS if SANITIZE else [])],
        **kwargs,
    )


setup(
    name="screening_attn",
    version="0.1.0",
    description="Relevancy-screened attention and CNN-F recurrent feedback kernels for PyTorch",
    python_requires=">=3.10",
    packages=[
        "screening_attn",
        "screening_attn.attention",
        "screening_attn.rnn",
        "screening_attn.feedback",
        "screening_attn._kernels",
    ],
    package_dir={"screening_attn._kernels": "kernels"},
    ext_modules=[] if os.environ.get("SCREENING_ATTN_NO_EXT") == "1" else [extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
    install_requires=["torch>=2.4"],
    extras_require={"triton": ["triton"], "hf": ["transformers>=5.24,<6"]},
)
