// The per-task CPU kernels, compiled once per instruction set (kernels_impl.h, included by
// kernels_generic.cpp, kernels_avx2.cpp and kernels_avx512.cpp) and chosen at run time for
// the CPU at hand, as ATen does. Torch-free.
#pragma once

#include "../daml_math.h"

namespace pymaml::cpu {

enum class Isa : int { Generic = 0, Avx2 = 1, Avx512 = 2 };

// maml_math.h's whole-task entry points for run-time activation and loss (theta^0, extended,
// in w.theta0; batch_stride as in inner_loop).
template <typename T>
struct TaskKernels {
  T (*maml_task)(Activation, Loss, const MlpShape&, const T* Xs, const T* Ys, int64_t K,
                 const T* Xq, const T* Yq, int64_t Q, int64_t steps, InnerLR<T> lr,
                 bool first_order, bool need_grad, const TaskWorkspace<T>& w,
                 int64_t batch_stride);
  void (*inner_loop)(Activation, Loss, const MlpShape&, const T* Xs, const T* Ys, int64_t K,
                     int64_t steps, InnerLR<T> lr, const TaskWorkspace<T>& w,
                     int64_t batch_stride);
  void (*adapt_vjp_task)(Activation, Loss, const MlpShape&, const T* Xs, const T* Ys, int64_t K,
                         int64_t steps, InnerLR<T> lr, const T* grad, const TaskWorkspace<T>& w,
                         int64_t batch_stride, bool first_order);
  // daml_math.h's, for run-time base activation, outer loss L and adaptation loss AL.
  T (*daml_task)(Activation, Loss L, Loss AL, const MlpShape&, const MlpShape& loss_shape,
                 const T* Xs, int64_t K, const T* Xq, const T* Yq, int64_t Q, int64_t steps,
                 InnerLR<T> lr, bool need_grad, const DamlWorkspace<T>& w,
                 int64_t batch_stride);
  void (*daml_inner_loop)(Activation, Loss AL, const MlpShape&, const MlpShape& loss_shape,
                          const T* Xs, int64_t K, int64_t steps, InnerLR<T> lr,
                          const DamlWorkspace<T>& w,
                          int64_t batch_stride);
};

// The widest instruction set both compiled in and supported by this CPU.
Isa best_isa();
// The one in use: best_isa(), unless set_isa() or the environment variable PYMAML_CPU_ISA
// (generic, avx2 or avx512, read once) picked a narrower one.
Isa active_isa();
// Returns false (and changes nothing) if this CPU or build cannot run `isa`.
bool set_isa(Isa isa);
const char* isa_name(Isa isa);
bool parse_isa(const char* name, Isa* isa);

template <typename T>
const TaskKernels<T>& task_kernels(Isa isa);

// One table per instruction set (kernels_impl.h).
#define PYMAML_DECLARE_ISA(ns)                  \
  namespace ns {                                \
  template <typename T>                         \
  const TaskKernels<T>& kernels();              \
  }
PYMAML_DECLARE_ISA(generic)
PYMAML_DECLARE_ISA(avx2)
PYMAML_DECLARE_ISA(avx512)
#undef PYMAML_DECLARE_ISA

}  // namespace pymaml::cpu
