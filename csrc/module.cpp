// The Python module screening_attn._C: build facts only. The ops register themselves with
// TORCH_LIBRARY_FRAGMENT / TORCH_LIBRARY_IMPL when this library is loaded.
#include <ATen/Parallel.h>
#include <torch/extension.h>

#ifndef SCREENING_ATTN_CUDA_ARCHS
#define SCREENING_ATTN_CUDA_ARCHS ""
#endif

namespace {

py::dict build_info() {
  py::dict info;
#ifdef SCREENING_ATTN_WITH_CUDA
  info["cuda"] = true;
#else
  info["cuda"] = false;
#endif
  info["cuda_archs"] = std::string(SCREENING_ATTN_CUDA_ARCHS);
#ifdef _OPENMP
  info["openmp"] = true;
#else
  info["openmp"] = false;
#endif
#ifdef __SANITIZE_ADDRESS__  // SANITIZE=1 (make sanitize)
  info["address_sanitizer"] = true;
#else
  info["address_sanitizer"] = false;
#endif
  info["num_threads"] = at::get_num_threads();
  info["parallel_info"] = at::get_parallel_info();
  return info;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "screening_attn compiled ops (registered under torch.ops.screening_attn)";
  m.def("build_info", &build_info,
        "dict: cuda (bool), cuda_archs (str), openmp (bool), address_sanitizer (bool), "
        "num_threads (int), parallel_info");
}
