// Run-time choice of the instruction set of the task kernels (see kernels.h).
#include "kernels.h"

#include <atomic>
#include <cstdlib>
#include <cstring>
#include <initializer_list>

#if (defined(__x86_64__) || defined(_M_X64)) && (defined(__GNUC__) || defined(__clang__))
#define PYMAML_X86_KERNELS 1
#endif

namespace pymaml::cpu {

Isa best_isa() {
#ifdef PYMAML_X86_KERNELS
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
      __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq"))
    return Isa::Avx512;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return Isa::Avx2;
#endif
  return Isa::Generic;
}

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::Avx512: return "avx512";
    case Isa::Avx2: return "avx2";
    default: return "generic";
  }
}

bool parse_isa(const char* name, Isa* isa) {
  for (Isa candidate : {Isa::Generic, Isa::Avx2, Isa::Avx512})
    if (std::strcmp(name, isa_name(candidate)) == 0) {
      *isa = candidate;
      return true;
    }
  return false;
}

namespace {

Isa initial_isa() {
  const Isa best = best_isa();
  Isa wanted;
  const char* env = std::getenv("PYMAML_CPU_ISA");
  // An unknown or unsupported request falls back to the best one (pymaml.info shows which).
  if (env && parse_isa(env, &wanted) && int(wanted) <= int(best)) return wanted;
  return best;
}

std::atomic<int>& current() {
  static std::atomic<int> isa{int(initial_isa())};
  return isa;
}

}  // namespace

Isa active_isa() { return Isa(current().load(std::memory_order_relaxed)); }

bool set_isa(Isa isa) {
  if (int(isa) > int(best_isa())) return false;
  current().store(int(isa), std::memory_order_relaxed);
  return true;
}

template <typename T>
const TaskKernels<T>& task_kernels(Isa isa) {
#ifdef PYMAML_X86_KERNELS
  if (isa == Isa::Avx512) return avx512::kernels<T>();
  if (isa == Isa::Avx2) return avx2::kernels<T>();
#endif
  (void)isa;
  return generic::kernels<T>();
}

template const TaskKernels<float>& task_kernels<float>(Isa);
template const TaskKernels<double>& task_kernels<double>(Isa);

}  // namespace pymaml::cpu
