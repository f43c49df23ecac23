// One instruction set's build of the task kernels: maml_math.h with SimdLinalg, inside the
// namespace PYMAML_ISA. Included only by kernels_<isa>.cpp, which first sets the compiler's
// target and defines PYMAML_ISA, PYMAML_VECTOR_BYTES and PYMAML_VECTOR_REGISTERS.
#include "../dispatch.h"
#include "kernels.h"
#include "simd_linalg.h"

namespace pymaml::cpu::PYMAML_ISA {

template <typename T>
T maml_task(Activation act, Loss loss, const MlpShape& s, const T* Xs, const T* Ys, int64_t K,
            const T* Xq, const T* Yq, int64_t Q, int64_t steps, InnerLR<T> lr, bool first_order,
            bool need_grad, const TaskWorkspace<T>& w, int64_t batch_stride) {
  T value = T(0);
  dispatch_act_loss(act, loss, [&](auto a, auto l) {
    value = pymaml::maml_task<T, decltype(a)::value, decltype(l)::value, SimdLinalg>(
        s, Xs, Ys, K, Xq, Yq, Q, steps, lr, first_order, need_grad, w, batch_stride);
  });
  return value;
}

template <typename T>
void inner_loop(Activation act, Loss loss, const MlpShape& s, const T* Xs, const T* Ys,
                int64_t K, int64_t steps, InnerLR<T> lr, const TaskWorkspace<T>& w,
                int64_t batch_stride) {
  dispatch_act_loss(act, loss, [&](auto a, auto l) {
    pymaml::inner_loop<T, decltype(a)::value, decltype(l)::value, SimdLinalg>(
        s, Xs, Ys, K, steps, lr, w, batch_stride);
  });
}

template <typename T>
void adapt_vjp_task(Activation act, Loss loss, const MlpShape& s, const T* Xs, const T* Ys,
                    int64_t K, int64_t steps, InnerLR<T> lr, const T* grad,
                    const TaskWorkspace<T>& w, int64_t batch_stride, bool first_order) {
  dispatch_act_loss(act, loss, [&](auto a, auto l) {
    pymaml::adapt_vjp_task<T, decltype(a)::value, decltype(l)::value, SimdLinalg>(
        s, Xs, Ys, K, steps, lr, grad, w, batch_stride, first_order);
  });
}

template <typename T>
T daml_task(Activation act, Loss loss, Loss adapt_loss, const MlpShape& s, const MlpShape& ls,
            const T* Xs, int64_t K, const T* Xq, const T* Yq, int64_t Q, int64_t steps,
            InnerLR<T> lr,
            bool need_grad, const DamlWorkspace<T>& w, int64_t batch_stride) {
  T value = T(0);
  dispatch_act_loss(act, loss, [&](auto a, auto l) {
    dispatch_adapt_loss(adapt_loss, [&](auto al) {
      value = pymaml::daml_task<T, decltype(a)::value, decltype(l)::value, decltype(al)::value,
                                SimdLinalg>(s, ls, Xs, K, Xq, Yq, Q, steps, lr, need_grad, w,
                                            batch_stride);
    });
  });
  return value;
}

template <typename T>
void daml_inner_loop(Activation act, Loss adapt_loss, const MlpShape& s, const MlpShape& ls,
                     const T* Xs, int64_t K, int64_t steps, InnerLR<T> lr,
                     const DamlWorkspace<T>& w,
                     int64_t batch_stride) {
  dispatch_act(act, [&](auto a) {
    dispatch_adapt_loss(adapt_loss, [&](auto al) {
      pymaml::daml_inner_loop<T, decltype(a)::value, decltype(al)::value, SimdLinalg>(
          s, ls, Xs, K, steps, lr, w, batch_stride);
    });
  });
}

template <typename T>
const TaskKernels<T>& kernels() {
  static const TaskKernels<T> table{&maml_task<T>, &inner_loop<T>, &adapt_vjp_task<T>,
                                    &daml_task<T>, &daml_inner_loop<T>};
  return table;
}

template const TaskKernels<float>& kernels<float>();
template const TaskKernels<double>& kernels<double>();

}  // namespace pymaml::cpu::PYMAML_ISA
