// The pymaml operator schemas, in one place. Kernels are registered per backend
// (cpu/maml_cpu.cpp, later cuda/*.cu); autograd and fake kernels are attached from Python
// (pymaml/_ops.py).
#include <torch/library.h>

TORCH_LIBRARY(pymaml, m) {
  // Inner loop of every task: [T, P] adapted parameters theta_t^S. `first_order` does not
  // change the value, only the derivative the autograd formula gives (identity Jacobian).
  m.def(
      "adapt(Tensor params, Tensor x_support, Tensor y_support, int[] sizes, float inner_lr, "
      "int steps, str activation, str loss, bool first_order) -> Tensor");
  // Vector-Jacobian product of `adapt` (second order): sum_t (d theta_t^S / d theta)^T grad[t].
  m.def(
      "adapt_backward(Tensor grad, Tensor params, Tensor x_support, Tensor y_support, "
      "int[] sizes, float inner_lr, int steps, str activation, str loss) -> Tensor");
  // MAML / FO-MAML: the mean query loss after adaptation and, if need_grad, its meta-gradient
  // [P] (else an empty tensor), computed together in one pass.
  m.def(
      "maml_loss(Tensor params, Tensor x_support, Tensor y_support, Tensor x_query, "
      "Tensor y_query, int[] sizes, float inner_lr, int steps, str activation, str loss, "
      "bool first_order, bool need_grad) -> (Tensor, Tensor)");
}
