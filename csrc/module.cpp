// The Python extension module pymaml._C: importing it registers the ops (TORCH_LIBRARY in
// ops.cpp and the backends' TORCH_LIBRARY_IMPL); the module itself only reports build facts.
#include <torch/extension.h>

#include "cpu/kernels.h"
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
  namespace cpu = pymaml::cpu;
  m.def("cpu_isa", [] { return std::string(cpu::isa_name(cpu::active_isa())); },
        "The instruction set the CPU kernels run with: generic, avx2 or avx512.");
  m.def("best_cpu_isa", [] { return std::string(cpu::isa_name(cpu::best_isa())); },
        "The widest instruction set this CPU and build support.");
  m.def(
      "set_cpu_isa",
      [](const std::string& name) {
        cpu::Isa isa;
        if (!cpu::parse_isa(name.c_str(), &isa))
          throw pybind11::value_error("isa must be 'generic', 'avx2' or 'avx512', got '" + name +
                                      "'");
        if (!cpu::set_isa(isa))
          throw pybind11::value_error("this CPU or build cannot run '" + name + "' (best: '" +
                                      cpu::isa_name(cpu::best_isa()) + "')");
      },
      "Selects the instruction set of the CPU kernels (for tests and comparisons).");
}
