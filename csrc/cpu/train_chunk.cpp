// The fused training op on the CPU: train_chunk runs many meta-iterations (meta-gradient and
// outer optimizer step) in one call, so that a training run of small networks pays the
// per-call cost of Python and the dispatcher once per chunk instead of once per iteration.
//
// Bitwise contract: iteration i of train_chunk gives the weights, loss and optimizer state
// that pymaml.train's per-iteration path gives (maml_loss on the same meta-batch, then
// torch.optim.SGD / Adam(fused=True).step()). It holds by construction, not by imitation:
// the meta-gradient is MetaBatch::run, as in maml_loss, and the update is ATen's own fused
// optimizer kernel, called with the arguments torch.optim's wrapper gives it (OuterStep).
#include <ATen/Dispatch.h>
#include <ATen/ops/_foreach_add.h>
#include <ATen/ops/_fused_adam.h>
#include <ATen/ops/_fused_adamw.h>
#include <ATen/ops/_fused_sgd.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/full.h>
#include <ATen/ops/scalar_tensor.h>
#include <torch/library.h>

#include <cmath>
#include <limits>
#include <optional>
#include <string>
#include <string_view>
#include <tuple>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "../op_args.h"
#include "daml_batch.h"
#include "meta_batch.h"

namespace pymaml::cpu {
namespace {

// The chunk's leading dimension: x and y hold n meta-batches (n >= 1, the same n for every
// tensor; the first tensor checked sets `n`).
void check_chunk_length(const char* op, const char* x_name, const at::Tensor& x,
                        const char* y_name, const at::Tensor& y, int64_t& n) {
  for (const auto& [name, t] : {std::pair{x_name, &x}, std::pair{y_name, &y}}) {
    TORCH_CHECK_VALUE(t->dim() >= 4, op, ": ", name,
                      " must be [n, T, K, features] (n meta-batches), got shape ", t->sizes());
    if (n < 0) n = t->size(0);
    TORCH_CHECK_VALUE(t->size(0) == n, op, ": ", name, " holds ", t->size(0),
                      " meta-batches, expected ", n, " like x_support");
  }
  TORCH_CHECK_VALUE(n >= 1, op, ": the chunk needs at least one meta-batch, got ", x.sizes());
}

bool flag(const char* op, const char* name, double value) {
  TORCH_CHECK_VALUE(value == 0.0 || value == 1.0, op, ": optimizer_hyper entry ", name,
                    " is a flag and must be 0 or 1, got ", value);
  return value == 1.0;
}

// The fused kernels index the state tensors as they index params: refuse any other layout
// rather than let a kernel read out of bounds.
void check_state_tensor(const char* op, const char* what, const at::Tensor& t,
                        const at::Tensor& params) {
  TORCH_CHECK_VALUE(t.device() == params.device() && t.scalar_type() == params.scalar_type() &&
                        t.sizes() == params.sizes() && t.is_contiguous(),
                    op, ": optimizer state ", what, " must be a contiguous ", params.sizes(),
                    " tensor like the tensor it steps (", params.scalar_type(), ", ",
                    params.device(), "), got ", t.scalar_type(), " ", t.sizes(), " on ",
                    t.device());
}

// Makes ATen's parallel regions opened by this thread run on it alone, while it lives (the
// team size is a per-thread OpenMP setting: other threads are not affected). The fused
// kernels open a region for any size; at 2 threads on a busy machine, waiting for the
// region's second thread made a seed iteration about 10x slower (benchmarks/NOTES.md). Their
// results do not depend on the split: they cut the parameters into cache-line units, so
// every element takes the same vector or tail code whatever the thread count
// (test_train_chunk_is_bitwise_over_threads checks it against torch.optim at 2 threads).
class OneOpenMPThread {
 public:
#ifdef _OPENMP
  OneOpenMPThread() : before_(omp_get_max_threads()) { omp_set_num_threads(1); }
  ~OneOpenMPThread() { omp_set_num_threads(before_); }

 private:
  int before_;
#endif
};

// One step of torch.optim.SGD or Adam with fused=True, as its Python wrapper runs it for the
// parameter tensors of one group (torch/optim/sgd.py _fused_sgd, torch/optim/adam.py
// _fused_adam): the same ATen kernel, on the same tensors, with the same arguments, in the
// same order.
class OuterStep {
 public:
  // `hyper` as documented for train_chunk in csrc/ops.cpp; `state` holds each tensor of
  // `params`' state in turn (SGD with momentum: its buffer; Adam: step, exp_avg, exp_avg_sq
  // (, max_exp_avg_sq)).
  OuterStep(const char* op, std::string_view name, c10::ArrayRef<double> hyper,
            at::TensorList state, at::TensorList params)
      : hyper_(hyper.vec()) {
    for (double h : hyper)
      TORCH_CHECK_VALUE(std::isfinite(h), op, ": optimizer_hyper must be finite, got ", hyper);
    if (name == "sgd") {
      parse_sgd(op, state, params);
    } else if (name == "adam") {
      parse_adam(op, state, params);
    } else {
      TORCH_CHECK_VALUE(false, op, ": optimizer must be 'sgd' or 'adam', got '",
                        std::string(name), "'");
    }
  }

  // params -= update(grads), the state updated in place. grads may be overwritten (the kernels
  // declare them mutable).
  void step(at::TensorList p, at::TensorList g) {
    // One thread (see OneOpenMPThread).
    const OneOpenMPThread serial;
    const auto& h = hyper_;
    if (sgd_) {
      // [lr, momentum, dampening, weight_decay, nesterov, maximize]. torch's wrapper passes
      // is_first_step only while the buffers do not exist yet; here they always do.
      at::_fused_sgd_(p, g, buffers_, /*weight_decay=*/h[3], /*momentum=*/h[1], /*lr=*/h[0],
                      /*dampening=*/h[2], /*nesterov=*/h[4] == 1, /*maximize=*/h[5] == 1,
                      /*is_first_step=*/false, /*grad_scale=*/std::nullopt,
                      /*found_inf=*/std::nullopt);
      return;
    }
    // [lr, beta1, beta2, eps, weight_decay, amsgrad, maximize, decoupled_weight_decay].
    // The wrapper counts the steps before the kernel, which reads the new counts.
    at::_foreach_add_(steps_, 1);
    // Adam(decoupled_weight_decay=True) (AdamW) runs the _fused_adamw_ kernel.
    auto* kernel = h[7] == 1 ? static_cast<AdamKernel*>(&at::_fused_adamw_)
                             : static_cast<AdamKernel*>(&at::_fused_adam_);
    kernel(p, g, exp_avg_, exp_avg_sq_, max_exp_avg_sq_, steps_, /*lr=*/h[0], /*beta1=*/h[1],
           /*beta2=*/h[2], /*weight_decay=*/h[4], /*eps=*/h[3], /*amsgrad=*/h[5] == 1,
           /*maximize=*/h[6] == 1, /*grad_scale=*/std::nullopt, /*found_inf=*/std::nullopt);
  }

 private:
  // at::_fused_adam_ and _fused_adamw_ (their float-lr overloads).
  using AdamKernel = void(at::TensorList, at::TensorList, at::TensorList, at::TensorList,
                          at::TensorList, at::TensorList, double, double, double, double,
                          double, bool, bool, const std::optional<at::Tensor>&,
                          const std::optional<at::Tensor>&);

  void parse_sgd(const char* op, at::TensorList state, at::TensorList params) {
    const auto& h = hyper_;
    TORCH_CHECK_VALUE(h.size() == 6, op, ": optimizer 'sgd' takes optimizer_hyper = [lr, "
                      "momentum, dampening, weight_decay, nesterov, maximize], got ", h);
    sgd_ = true;
    const bool nesterov = flag(op, "nesterov", h[4]);
    flag(op, "maximize", h[5]);
    TORCH_CHECK_VALUE(h[0] >= 0 && h[1] >= 0 && h[3] >= 0, op,
                      ": lr, momentum and weight_decay must be >= 0, got ", h);
    TORCH_CHECK_VALUE(!nesterov || (h[1] > 0 && h[2] == 0), op,
                      ": Nesterov momentum requires a momentum and zero dampening");
    const size_t want = h[1] != 0 ? params.size() : 0;
    TORCH_CHECK_VALUE(state.size() == want, op, ": SGD ",
                      want ? "with momentum takes optimizer_state = [momentum_buffer] per "
                             "stepped tensor"
                           : "without momentum takes no optimizer_state",
                      ", got ", state.size(), " tensor(s)");
    for (size_t i = 0; i < want; ++i) check_state_tensor(op, "momentum_buffer", state[i], params[i]);
    buffers_ = state.vec();
  }

  void parse_adam(const char* op, at::TensorList state, at::TensorList params) {
    const auto& h = hyper_;
    TORCH_CHECK_VALUE(h.size() == 8, op, ": optimizer 'adam' takes optimizer_hyper = [lr, "
                      "beta1, beta2, eps, weight_decay, amsgrad, maximize, "
                      "decoupled_weight_decay], got ", h);
    const bool amsgrad = flag(op, "amsgrad", h[5]);
    flag(op, "maximize", h[6]);
    flag(op, "decoupled_weight_decay", h[7]);
    TORCH_CHECK_VALUE(0 <= h[1] && h[1] < 1 && 0 <= h[2] && h[2] < 1, op,
                      ": Adam's betas must be in [0, 1), got ", h[1], ", ", h[2]);
    TORCH_CHECK_VALUE(h[0] >= 0 && h[3] >= 0 && h[4] >= 0, op,
                      ": lr, eps and weight_decay must be >= 0, got ", h);
    const size_t per = amsgrad ? 4 : 3;
    TORCH_CHECK_VALUE(state.size() == per * params.size(), op, ": Adam takes optimizer_state = "
                      "[step, exp_avg, exp_avg_sq", amsgrad ? ", max_exp_avg_sq" : "",
                      "] per stepped tensor, got ", state.size(), " tensor(s)");
    const char* names[] = {"step", "exp_avg", "exp_avg_sq", "max_exp_avg_sq"};
    for (size_t k = 0; k < params.size(); ++k) {
      // The fused kernel reads the count as float32, as Adam(fused=True) keeps it.
      const at::Tensor& step = state[per * k];
      TORCH_CHECK_VALUE(step.dim() == 0 && step.device() == params[k].device() &&
                            step.scalar_type() == at::kFloat,
                        op, ": Adam's step must be a 0-d float32 tensor on the device of params "
                        "(as torch.optim.Adam(fused=True) keeps it), got ", step.scalar_type(),
                        " ", step.sizes(), " on ", step.device());
      for (size_t i = 1; i < per; ++i) check_state_tensor(op, names[i], state[per * k + i], params[k]);
      steps_.push_back(step);
      exp_avg_.push_back(state[per * k + 1]);
      exp_avg_sq_.push_back(state[per * k + 2]);
      if (amsgrad) max_exp_avg_sq_.push_back(state[per * k + 3]);
    }
  }

  bool sgd_ = false;
  std::vector<double> hyper_;
  std::vector<at::Tensor> buffers_, steps_, exp_avg_, exp_avg_sq_, max_exp_avg_sq_;
};

// The gradient `algorithm` hands the optimizer.
Direction parse_algorithm(const char* op, std::string_view algorithm) {
  if (algorithm == "maml") return Direction::MAML;
  if (algorithm == "fomaml") return Direction::FirstOrder;
  TORCH_CHECK_VALUE(algorithm == "reptile", op,
                    ": algorithm must be 'maml', 'fomaml' or 'reptile', got '",
                    std::string(algorithm), "'");
  return Direction::Reptile;
}

// True when every element of x[0, n) is finite. No early exit, so that it vectorises; NaN
// fails the comparison.
template <typename T>
bool all_finite(const T* x, int64_t n) {
  int bad = 0;
  for (int64_t i = 0; i < n; ++i) bad |= !(std::fabs(x[i]) <= std::numeric_limits<T>::max());
  return bad == 0;
}

// The loop of a chunk: for i < n, value = meta_grad(i) (the loss of meta-batch i, its gradient
// left in `grad`), then one optimizer step of `weights`; it stops as csrc/ops.cpp documents
// for train_chunk. Writes the losses to out and returns the count of iterations done.
template <typename scalar_t, typename MetaGrad>
int64_t run_chunk(int64_t n, at::TensorList weights, at::TensorList grads, OuterStep& outer,
                  scalar_t* out, MetaGrad&& meta_grad) {
  int64_t done = 0;
  auto finite = [&] {
    for (const at::Tensor& w : weights)
      if (!all_finite(w.data_ptr<scalar_t>(), w.numel())) return false;
    return true;
  };
  for (int64_t i = 0; i < n; ++i) {
    const scalar_t value = meta_grad(i);
    out[i] = value;
    if (!std::isfinite(value)) break;  // before updating the weights with it
    outer.step(weights, grads);
    if (!finite()) break;  // the update made a weight NaN or infinite
    ++done;
  }
  return done;
}

}  // namespace

namespace {

// train_chunk: `a` holds the checked config (with the inner rule, and a.rates defined with
// learned rates) and params; the optimizer steps params, and the rates too when learn_rates.
std::tuple<at::Tensor, at::Tensor> maml_chunk(const char* op, OpArgs a, Direction direction,
                                              bool learn_rates, at::TensorList optimizer_state,
                                              const at::Tensor& xs_in, const at::Tensor& ys_in,
                                              const at::Tensor& xq_in, const at::Tensor& yq_in,
                                              std::string_view optimizer,
                                              c10::ArrayRef<double> optimizer_hyper) {
  const OpConfig& c = a.config;
  const at::Tensor& params = a.params;
  // Each meta-batch as maml_loss checks its own: the support [T, K, n_in] or, a batch per inner
  // step, [T, steps, K, n_in]; the query [T, Q, n_in].
  int64_t n = -1, T = -1;
  bool per_step = false;
  check_chunk_length(op, "x_support", xs_in, "y_support", ys_in, n);
  check_chunk_length(op, "x_query", xq_in, "y_query", yq_in, n);
  const int64_t K = check_support(op, xs_in.select(0, 0), ys_in.select(0, 0), params, c, true, T,
                                  per_step);
  TORCH_CHECK_VALUE(xq_in.dim() == 4 && yq_in.dim() == 4, op, ": x_query and y_query must be 4-D "
                    "[n, T, Q, features], got ", xq_in.sizes(), " and ", yq_in.sizes());
  const int64_t Q = check_batch(op, "x_query", xq_in.select(0, 0), "y_query", yq_in.select(0, 0),
                                params, c.shape, T);
  const int64_t support = (per_step ? c.steps : 1) * K;  // a task's support points
  std::vector<at::Tensor> weights{params};
  if (learn_rates) weights.push_back(a.rates);
  OuterStep outer(op, optimizer, optimizer_hyper, optimizer_state, weights);
  const at::Tensor xs = xs_in.contiguous(), ys = ys_in.contiguous(), xq = xq_in.contiguous(),
                   yq = yq_in.contiguous();
  // Iterations not run keep NaN.
  at::Tensor losses = at::full({n}, std::numeric_limits<double>::quiet_NaN(), params.options());
  int64_t done = 0;

  AT_DISPATCH_FLOATING_TYPES(params.scalar_type(), "pymaml_train_chunk_cpu", [&] {
    // Everything the loop needs is allocated here, once (the batch's working memory is kept
    // per thread up to blocks.h's kKeptBytes; a bigger problem allocates it per iteration).
    MetaBatch<scalar_t> batch(c, T, K, Q, per_step ? K : 0, learn_rates);
    std::vector<at::Tensor> grads;
    for (const at::Tensor& w : weights) grads.push_back(at::empty_like(w));
    const scalar_t* theta = params.data_ptr<scalar_t>();
    const scalar_t* rates = a.rates.defined() ? a.rates.data_ptr<scalar_t>() : nullptr;
    scalar_t* g = grads[0].data_ptr<scalar_t>();
    scalar_t* g_rates = learn_rates ? grads[1].data_ptr<scalar_t>() : nullptr;
    const scalar_t* Xs = xs.data_ptr<scalar_t>();
    const scalar_t* Ys = ys.data_ptr<scalar_t>();
    const scalar_t* Xq = xq.data_ptr<scalar_t>();
    const scalar_t* Yq = yq.data_ptr<scalar_t>();
    // Elements per meta-batch of each tensor.
    const int64_t nxs = T * support * c.shape.n[0], nys = T * support * c.shape.n_out();
    const int64_t nxq = T * Q * c.shape.n[0], nyq = T * Q * c.shape.n_out();
    done = run_chunk(n, weights, grads, outer, losses.data_ptr<scalar_t>(), [&](int64_t i) {
      return batch.run(theta, Xs + i * nxs, Ys + i * nys, Xq + i * nxq, Yq + i * nyq, direction,
                       g, rates, g_rates);
    });
  });
  return {losses, at::scalar_tensor(done, at::TensorOptions().dtype(at::kLong))};
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> train_chunk(
    const at::Tensor& params, at::TensorList optimizer_state, const at::Tensor& xs,
    const at::Tensor& ys, const at::Tensor& xq, const at::Tensor& yq, c10::IntArrayRef sizes,
    double inner_lr, int64_t steps, std::string_view activation, std::string_view loss,
    std::string_view algorithm, std::string_view optimizer,
    c10::ArrayRef<double> optimizer_hyper, const std::optional<at::Tensor>& rates,
    at::OptionalIntArrayRef adapt_layers, bool learn_rates) {
  constexpr const char* op = "pymaml::train_chunk";
  OpArgs a;
  a.config = parse_config(op, sizes, scalar_lr(inner_lr, rates), steps, activation, loss);
  const Direction direction = parse_algorithm(op, algorithm);
  TORCH_CHECK_VALUE(!learn_rates || rates.has_value(), op, ": learn_rates needs the rates to "
                    "learn (rates is None)");
  TORCH_CHECK_VALUE(!(learn_rates && direction == Direction::Reptile), op,
                    ": Reptile's direction gives the rates no gradient: learn_rates must be "
                    "false with algorithm 'reptile'");
  check_params(op, params, a.config);
  a.params = params;
  check_rule(op, a, rates, adapt_layers);
  TORCH_CHECK_VALUE(params.is_contiguous() && (!rates.has_value() || rates->is_contiguous()),
                    op, ": params", rates.has_value() ? " and rates are" : " is",
                    " updated in place and must be contiguous");
  if (rates.has_value()) a.rates = *rates;  // the tensor itself: the optimizer steps it in place
  return maml_chunk(op, a, direction, learn_rates, optimizer_state, xs, ys, xq, yq, optimizer,
                    optimizer_hyper);
}

// DAML's chunk: `weights` is [theta (P), psi (P_psi)] in one tensor, stepped as one.
std::tuple<at::Tensor, at::Tensor> daml_train_chunk(
    const at::Tensor& weights, at::TensorList optimizer_state, const at::Tensor& xs_in,
    const at::Tensor& xq_in, const at::Tensor& yq_in, c10::IntArrayRef sizes,
    c10::IntArrayRef loss_sizes, double inner_lr, int64_t steps, std::string_view activation,
    std::string_view loss, std::string_view adapt_loss, std::string_view optimizer,
    c10::ArrayRef<double> optimizer_hyper) {
  constexpr const char* op = "pymaml::daml_train_chunk";
  const DamlConfig c =
      parse_daml_config(op, sizes, loss_sizes, inner_lr, steps, activation, loss, adapt_loss);
  const int64_t P = c.base.shape.num_params, Pl = c.loss_shape.num_params;
  TORCH_CHECK_VALUE(weights.dim() == 1 && weights.size(0) == P + Pl && weights.is_contiguous(),
                    op, ": weights must be a contiguous [P + P_loss] = [", P + Pl,
                    "] tensor (params, then loss_params), got shape ", weights.sizes());
  int64_t n = -1;
  TORCH_CHECK_VALUE(xs_in.dim() >= 4, op, ": x_source must be [n, T, K, n_in] or "
                    "[n, T, steps, K, n_in] (n meta-batches), got shape ", xs_in.sizes());
  n = xs_in.size(0);
  check_chunk_length(op, "x_query", xq_in, "y_query", yq_in, n);
  const DamlArgs a = check_daml_args(op, c, weights.narrow(0, 0, P), weights.narrow(0, P, Pl),
                                     xs_in.select(0, 0), xq_in.select(0, 0), yq_in.select(0, 0));
  OuterStep outer(op, optimizer, optimizer_hyper, optimizer_state, weights);
  const at::Tensor xs = xs_in.contiguous(), xq = xq_in.contiguous(), yq = yq_in.contiguous();
  at::Tensor losses = at::full({n}, std::numeric_limits<double>::quiet_NaN(), weights.options());
  int64_t done = 0;
  AT_DISPATCH_FLOATING_TYPES(weights.scalar_type(), "pymaml_daml_train_chunk_cpu", [&] {
    DamlBatch<scalar_t> batch(c, a.T, a.K, a.Q, a.batch_stride);
    const at::Tensor grad = at::empty({P + Pl}, weights.options());
    const scalar_t* w = weights.data_ptr<scalar_t>();
    scalar_t* g = grad.data_ptr<scalar_t>();
    const scalar_t* Xs = xs.data_ptr<scalar_t>();
    const scalar_t* Xq = xq.data_ptr<scalar_t>();
    const scalar_t* Yq = yq.data_ptr<scalar_t>();
    const int64_t nxs = xs.numel() / n, nxq = xq.numel() / n, nyq = yq.numel() / n;
    done = run_chunk(n, weights, grad, outer, losses.data_ptr<scalar_t>(), [&](int64_t i) {
      return batch.run(w, w + P, Xs + i * nxs, Xq + i * nxq, Yq + i * nyq, g, g + P);
    });
  });
  return {losses, at::scalar_tensor(done, at::TensorOptions().dtype(at::kLong))};
}

TORCH_LIBRARY_IMPL(pymaml, CPU, m) {
  m.impl("train_chunk", &train_chunk);
  m.impl("daml_train_chunk", &daml_train_chunk);
}

}  // namespace pymaml::cpu
