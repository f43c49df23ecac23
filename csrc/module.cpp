// The Python extension module pymaml._C: importing it registers the ops (TORCH_LIBRARY in
// ops.cpp and the backends' TORCH_LIBRARY_IMPL); the module itself only reports build facts.
#include <torch/extension.h>

#include "maml_math.h"
#include "op_args.h"

#ifndef PYMAML_VERSION
#define PYMAML_VERSION "0.0.0+unknown"
#endif

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "pymaml's compiled core: fused MAML meta-gradient ops (torch.ops.pymaml.*)";
  m.attr("__version__") = PYMAML_VERSION;
#ifdef PYMAML_WITH_CUDA
  m.attr("cuda_compiled") = true;
#else
  m.attr("cuda_compiled") = false;
#endif
  m.attr("max_depth") = pymaml::kMaxDepth;
  m.attr("max_width") = pymaml::kMaxWidth;
  m.attr("max_steps") = pymaml::kMaxSteps;
}
