// The pymaml operator schemas, in one place: one per op family. Kernels are registered per
// backend (cpu/, cuda/), autograd in C++ (autograd.cpp, flatten.cpp), fake kernels from Python
// (pymaml/_ops.py).
//
// The families' variants are trailing arguments with defaults, so that a plain call names
// none of them (docs/design.md §7; the loss ops take keep_grad first, so that the public
// API's plain call passes it alone):
//   Tensor? rates       learned inner rates [R, P] (R = 1: every step; R = steps: a row per
//                       step) in place of inner_lr, which is then not read (§8.1). None: the
//                       scalar inner_lr, the kernels' scalar path.
//   int[]? adapt_layers the linear layers that move in the inner loop (distinct, at least one;
//                       negative indices count from the last); the others keep their weights
//                       and their rates are not read (§8.2). None: every layer.
//   bool need_rate_grad the rates' gradient [R, P] is computed (with rates and need_grad).
//   bool keep_grad      the value form, the public API's door (pymaml.functional): the loss
//                       ops return [loss] alone, and the gradients their forward computes
//                       stay with autograd, which hands them to the backward without a copy
//                       (csrc/autograd.cpp, §7.7).
// The loss ops return a list: [loss, then the gradient of each differentiable input given]
// (the rates' only with rates), or [loss] with keep_grad. So a call returns as many tensors
// as it has use for (each output costs its caller ~0.5 us at the seed's sizes). A gradient
// not computed (need_grad / need_rate_grad false) is an empty [0] tensor.
#include <torch/library.h>

TORCH_LIBRARY(pymaml, m) {
  // A module's weight tensors [W0, b0, W1, b1, ...] as one flat [P] tensor, pymaml's layout;
  // differentiable, each tensor's gradient a view of the flat one (csrc/flatten.cpp).
  m.def("flatten_params(Tensor[] parts) -> Tensor");
  // Inner loop of every task: [T, P] adapted parameters theta_t^S. `first_order` does not
  // change the value, only the derivative the autograd formula gives (identity Jacobians).
  m.def(
      "adapt(Tensor params, Tensor x_support, Tensor y_support, int[] sizes, float inner_lr, "
      "int steps, str activation, str loss, bool first_order, Tensor? rates=None, "
      "int[]? adapt_layers=None) -> Tensor");
  // Vector-Jacobian product of `adapt`: (sum_t (d theta_t^S / d theta)^T grad[t] [P], the
  // rates' gradient [R, P] or empty), second order unless first_order.
  m.def(
      "adapt_backward(Tensor grad, Tensor params, Tensor x_support, Tensor y_support, "
      "int[] sizes, float inner_lr, int steps, str activation, str loss, Tensor? rates=None, "
      "int[]? adapt_layers=None, bool first_order=False, bool need_rate_grad=False) "
      "-> (Tensor, Tensor)");
  // MAML / FO-MAML: [the mean query loss after adaptation, its meta-gradient [P] (need_grad),
  // the rates' gradient [R, P] (with rates; need_rate_grad)], computed together in one pass.
  m.def(
      "maml_loss(Tensor params, Tensor x_support, Tensor y_support, Tensor x_query, "
      "Tensor y_query, int[] sizes, float inner_lr, int steps, str activation, str loss, "
      "bool first_order, bool need_grad, bool keep_grad=False, Tensor? rates=None, "
      "int[]? adapt_layers=None, bool need_rate_grad=False) -> Tensor[]");
  // Reptile: the mean query loss after adapting on (x_support, y_support), and the direction
  // params - mean_t theta_t^S [P] that Reptile feeds its outer optimizer as a gradient. Not
  // differentiable (a direction, not a derivative).
  m.def(
      "reptile(Tensor params, Tensor x_support, Tensor y_support, Tensor x_query, "
      "Tensor y_query, int[] sizes, float inner_lr, int steps, str activation, str loss) "
      "-> (Tensor, Tensor)");
  // DAML (docs/design.md §8.3): the inner loop adapts the base network (params, `sizes`) on
  // unlabeled x_source ([T, K, n_in], or [T, steps, K, n_in]: a batch per step) with the loss
  // mean |h| ("l1") or mean h^2 ("mse") of the loss network h = g(u) (loss_params, `loss_sizes`,
  // ReLU hidden layers, u = [output, last hidden, ..., first hidden] of the base network);
  // daml_loss returns [the mean `loss` of the adapted network on (x_query, y_query), its
  // gradients in params and loss_params (need_grad), the rates' gradient (with rates; every
  // layer adapts: no adapt_layers)]; daml_adapt returns the adapted parameters [T, P] (not
  // differentiable).
  m.def(
      "daml_loss(Tensor params, Tensor loss_params, Tensor x_source, Tensor x_query, "
      "Tensor y_query, int[] sizes, int[] loss_sizes, float inner_lr, int steps, str activation, "
      "str loss, str adapt_loss, bool need_grad, bool keep_grad=False, Tensor? rates=None, "
      "bool need_rate_grad=False) -> Tensor[]");
  m.def(
      "daml_adapt(Tensor params, Tensor loss_params, Tensor x_source, int[] sizes, "
      "int[] loss_sizes, float inner_lr, int steps, str activation, str adapt_loss) -> Tensor");
  // Training: n meta-iterations in one call (pymaml.train's fast path). Iteration i computes
  // the meta-loss and the optimizer's gradient of meta-batch i (x_support[i]: [T, K, n_in], ...;
  // the chunk's tensors are [n, T, K, features]) for `algorithm`: "maml" / "fomaml" as maml_loss
  // does with first_order false / true, "reptile" as the reptile op does; then applies
  // one step of the outer optimizer in place to params and optimizer_state: ATen's fused
  // kernel, as torch.optim.SGD / Adam(fused=True).step() runs it (so bitwise the same):
  //   optimizer "sgd":  optimizer_hyper = [lr, momentum, dampening, weight_decay, nesterov,
  //                     maximize]; optimizer_state = [] (momentum 0) or [momentum_buffer]
  //   optimizer "adam": optimizer_hyper = [lr, beta1, beta2, eps, weight_decay, amsgrad,
  //                     maximize, decoupled_weight_decay]; optimizer_state = [step, exp_avg,
  //                     exp_avg_sq] (+ [max_exp_avg_sq] with amsgrad); step a 0-d float32
  //                     tensor; decoupled_weight_decay 1 runs AdamW's kernel
  // (flags as 0 / 1; the state as torch.optim keeps it after its first step). It stops at the
  // first non-finite meta-loss, before updating with it, or after an update that made a
  // weight non-finite. Returns (losses [n], done): done (0-d int64) iterations completed;
  // losses[i] for i < done, and when done < n, losses[done] is the loss of the iteration that
  // stopped (non-finite: no update made; finite: its update made the weights non-finite);
  // later entries are NaN.
  // The inner rule as maml_loss takes it (rates, adapt_layers); with learn_rates the optimizer
  // steps params and rates together (one group, in that order: optimizer_state holds params'
  // state tensors, then the rates'), as pymaml.train's Meta-SGD does; without, the rates are
  // fixed (e.g. ANIL's single rate).
  m.def(
      "train_chunk(Tensor(a!) params, Tensor(b!)[] optimizer_state, Tensor x_support, "
      "Tensor y_support, Tensor x_query, Tensor y_query, int[] sizes, float inner_lr, int steps, "
      "str activation, str loss, str algorithm, str optimizer, float[] optimizer_hyper, "
      "Tensor(c!)? rates=None, int[]? adapt_layers=None, bool learn_rates=False) "
      "-> (Tensor, Tensor)");
  // DAML's training chunk: as train_chunk, for daml_loss's meta-gradient, with `weights` =
  // [params, loss_params] in one flat tensor updated in place (one optimizer over both, as
  // pymaml.train's DAML path keeps them); x_source [n, T, K, n_in] or [n, T, steps, K, n_in].
  m.def(
      "daml_train_chunk(Tensor(a!) weights, Tensor(b!)[] optimizer_state, Tensor x_source, "
      "Tensor x_query, Tensor y_query, int[] sizes, int[] loss_sizes, float inner_lr, int steps, "
      "str activation, str loss, str adapt_loss, str optimizer, float[] optimizer_hyper) "
      "-> (Tensor, Tensor)");
}
