// The Python module semu_fast._C (setup.py's build only: it defines SEMU_FAST_PYTHON_MODULE; the CMake build makes
// a plain libtorch library, without Python). Importing the module runs the static operator registrations of the
// library (TORCH_LIBRARY in ops.cpp, the kernels in cpu/ and cuda/); the module itself exports build_info().
#ifdef SEMU_FAST_PYTHON_MODULE
#include <pybind11/pybind11.h>
#include <torch/version.h>

#include <algorithm>
#include <string>

#ifdef SEMU_FAST_WITH_CUDA
#include <cuda_runtime_api.h>
#endif

namespace py = pybind11;

// SEMU_FAST_CUDA_ARCHS (from setup.py, e.g. sm_90,compute_90) as a string; the variadic form keeps the commas.
#define SEMU_FAST_STRINGIFY(...) #__VA_ARGS__
#define SEMU_FAST_EXPAND_STRINGIFY(...) SEMU_FAST_STRINGIFY(__VA_ARGS__)

namespace {

std::string compiler() {
#if defined(__clang__)
  return "clang " __clang_version__;
#elif defined(__GNUC__)
  return "gcc " __VERSION__;
#elif defined(_MSC_VER)
  return "msvc " + std::to_string(_MSC_FULL_VER);
#else
  return "unknown";
#endif
}

// How this extension was built: which kernels it holds and what it was compiled with and against.
py::dict build_info() {
  py::dict info;
  py::list archs;
  py::object cuda_version = py::none();
#ifdef SEMU_FAST_WITH_CUDA
  info["with_cuda"] = true;
#ifdef SEMU_FAST_CUDA_ARCHS
  const std::string list = SEMU_FAST_EXPAND_STRINGIFY(SEMU_FAST_CUDA_ARCHS);
  for (size_t start = 0; start < list.size();) {
    const size_t end = std::min(list.find(',', start), list.size());
    if (end > start) archs.append(list.substr(start, end - start));
    start = end + 1;
  }
#endif
  cuda_version = py::str(std::to_string(CUDART_VERSION / 1000) + "." + std::to_string(CUDART_VERSION % 1000 / 10));
#else
  info["with_cuda"] = false;
#endif
  info["cuda_archs"] = archs;
  info["cuda_version"] = cuda_version;
  info["compiler"] = compiler();
  info["torch_version"] = TORCH_VERSION;
  return info;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "semu_fast operator library: the kernels register with torch.ops.semu_fast on import";
  m.def("build_info", &build_info,
        "dict: with_cuda (bool), cuda_archs (list of str, e.g. ['sm_90']), cuda_version (str such as '13.0', or "
        "None), compiler (str), torch_version (str: the torch this extension was compiled against)");
}
#endif  // SEMU_FAST_PYTHON_MODULE
