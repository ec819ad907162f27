"""The extension's build facts, and every CUDA source compiles for sm_80 and sm_90 (nvcc -c;
nothing can run without a GPU, so compiling is the check here)."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.cpp_extension import include_paths

import screening_attn

ROOT = Path(__file__).resolve().parents[1]
CU_SOURCES = sorted((ROOT / "csrc").rglob("*.cu"))
NVCC = shutil.which("nvcc") or (
    str(Path(os.environ["CUDA_HOME"], "bin", "nvcc")) if "CUDA_HOME" in os.environ else None
)


def test_extension_loaded_with_openmp():
    info = screening_attn.build_info()
    assert info["loaded"], info.get("error")
    assert info["openmp"], "built without -fopenmp: at::parallel_for would run on one thread"
    assert info["cuda"] == (os.environ.get("FORCE_CUDA") == "1" or torch.version.cuda is not None)


def _build_info_with_extension(path: Path) -> dict:
    code = (
        "import json, screening_attn; i = screening_attn.build_info(); "
        "print(json.dumps({k: i.get(k) for k in ('loaded', 'path', 'error')}))"
    )
    env = {**os.environ, "SCREENING_ATTN_EXTENSION": str(path)}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.splitlines()[-1])


def test_extension_file_named_by_the_environment(tmp_path):
    """SCREENING_ATTN_EXTENSION (how `make sanitize` loads build/sanitize) replaces the in-place
    build; a wrong path leaves the package importable and says why the kernels are missing."""
    built = Path(screening_attn.build_info()["path"])
    copy = tmp_path / built.name
    shutil.copy(built, copy)
    assert _build_info_with_extension(copy) == {"loaded": True, "path": str(copy), "error": None}
    info = _build_info_with_extension(tmp_path / "missing" / built.name)
    assert not info["loaded"] and "SCREENING_ATTN_EXTENSION=" in info["error"], info


def test_there_are_cuda_sources():
    assert CU_SOURCES, "csrc/**/*.cu is empty"


def _nvcc(source: Path, out: Path) -> list[str]:
    includes = [*include_paths(), str(ROOT / "csrc" / "include")]
    toolkit_include = Path(NVCC).resolve().parents[1] / "include"
    includes.append(str(toolkit_include / "cccl"))  # CUB and Thrust live here from CUDA 13 on
    if not any(Path(p, "c10/cuda/impl/cuda_cmake_macros.h").exists() for p in include_paths()):
        includes.append(str(ROOT / "tests" / "cuda_shim"))  # CPU torch wheel lacks this header
    return [
        NVCC, "-c", str(source), "-o", str(out),
        "-std=c++20", "-O3", "--expt-relaxed-constexpr", "-Xcompiler", "-fPIC",
        "-DSCREENING_ATTN_WITH_CUDA", "-DTORCH_EXTENSION_NAME=_C",
        "-gencode", "arch=compute_80,code=sm_80",
        "-gencode", "arch=compute_90,code=sm_90",
        "-diag-suppress", "3306",  # torch headers: bit-field initialisers (C++20 in nvcc's eyes)
        *[f"-I{p}" for p in includes],
    ]  # fmt: skip


@pytest.fixture(scope="module")
def nvcc_runs(tmp_path_factory):
    """Every source's nvcc, started at once (each is one process, a minute or more: together
    they take the longest one's time on two cores, not the sum); the tests wait for theirs."""
    out = tmp_path_factory.mktemp("nvcc")
    runs = {}
    for i, source in enumerate(CU_SOURCES):
        obj = out / f"{i}.o"
        proc = subprocess.Popen(_nvcc(source, obj), stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)  # fmt: skip
        runs[source] = (proc, obj)
    yield runs
    for proc, _ in runs.values():
        proc.kill()
        proc.communicate()


@pytest.mark.skipif(NVCC is None, reason="nvcc not found (no CUDA toolkit on this machine)")
@pytest.mark.parametrize("source", CU_SOURCES, ids=lambda p: str(p.relative_to(ROOT)))
def test_cuda_source_compiles(source, nvcc_runs):
    proc, obj = nvcc_runs[source]
    _, stderr = proc.communicate(timeout=1200)
    assert proc.returncode == 0, stderr[-4000:]
    assert obj.stat().st_size > 0
