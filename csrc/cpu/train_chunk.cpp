// The fused training ops on the CPU: train_chunk runs many meta-iterations (meta-gradient and
// outer optimizer step) in one call, so that a training run of small networks pays the
// per-call cost of Python and the dispatcher once per chunk instead of once per iteration;
// optimizer_step is its optimizer on its own (one step from a given gradient).
//
// Bitwise contract: iteration i of train_chunk gives the weights, loss and optimizer state
// that pymaml.train's per-iteration path gives (maml_loss on the same meta-batch, then
// torch.optim's step): the meta-gradient is MetaBatch::run, as in maml_loss, and the update
// is OuterOptimizer (outer_optim.h), as torch.optim's.
#include <ATen/Dispatch.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/full.h>
#include <ATen/ops/scalar_tensor.h>
#include <torch/library.h>

#include <cmath>
#include <limits>
#include <string_view>
#include <tuple>
#include <vector>

#include "../op_args.h"
#include "meta_batch.h"
#include "outer_optim.h"

namespace pymaml::cpu {
namespace {

// x: [n, T, K, n_in], y: [n, T, K, n_out] (n meta-batches of T tasks). Checks them as a
// chunk (same n for every tensor, n >= 1), then the first meta-batch as maml_loss checks its
// batch; returns K. `n` and `T` are set by the first chunk checked (when < 0).
int64_t check_chunk(const char* op, const char* x_name, const at::Tensor& x, const char* y_name,
                    const at::Tensor& y, const at::Tensor& params, const MlpShape& shape,
                    int64_t& n, int64_t& T) {
  for (const auto& [name, t] : {std::pair{x_name, &x}, std::pair{y_name, &y}}) {
    TORCH_CHECK_VALUE(t->dim() == 4, op, ": ", name,
                      " must be 4-D [n, T, K, features] (n meta-batches), got shape ",
                      t->sizes());
    if (n < 0) n = t->size(0);
    TORCH_CHECK_VALUE(t->size(0) == n, op, ": ", name, " holds ", t->size(0),
                      " meta-batches, expected ", n, " like x_support");
  }
  TORCH_CHECK_VALUE(n >= 1, op, ": the chunk needs at least one meta-batch, got ", x.sizes());
  return check_batch(op, x_name, x.select(0, 0), y_name, y.select(0, 0), params, shape, T);
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> train_chunk(
    const at::Tensor& params, at::TensorList optimizer_state, const at::Tensor& xs_in,
    const at::Tensor& ys_in, const at::Tensor& xq_in, const at::Tensor& yq_in,
    c10::IntArrayRef sizes, double inner_lr, int64_t steps, std::string_view activation,
    std::string_view loss, bool first_order, std::string_view optimizer,
    c10::ArrayRef<double> optimizer_hyper) {
  constexpr const char* op = "pymaml::train_chunk";
  const OpConfig c = parse_config(op, sizes, inner_lr, steps, activation, loss);
  check_params(op, params, c);
  TORCH_CHECK_VALUE(params.is_contiguous(), op,
                    ": params is updated in place and must be contiguous");
  int64_t n = -1, T = -1;
  const int64_t K = check_chunk(op, "x_support", xs_in, "y_support", ys_in, params, c.shape, n, T);
  const int64_t Q = check_chunk(op, "x_query", xq_in, "y_query", yq_in, params, c.shape, n, T);
  const OptimizerConfig oc = parse_optimizer(op, optimizer, optimizer_hyper, optimizer_state,
                                             params);
  const at::Tensor xs = xs_in.contiguous(), ys = ys_in.contiguous(), xq = xq_in.contiguous(),
                   yq = yq_in.contiguous();
  const int64_t P = c.shape.num_params;
  // Iterations not run keep NaN.
  at::Tensor losses = at::full({n}, std::numeric_limits<double>::quiet_NaN(), params.options());
  int64_t done = 0;

  AT_DISPATCH_FLOATING_TYPES(params.scalar_type(), "pymaml_train_chunk_cpu", [&] {
    // Everything the loop needs is allocated here, once.
    MetaBatch<scalar_t> batch(c, T, K, Q);
    OuterOptimizer<scalar_t> outer(oc, optimizer_state, P);
    std::vector<scalar_t> grad(static_cast<size_t>(P));
    scalar_t* theta = params.data_ptr<scalar_t>();
    scalar_t* out = losses.data_ptr<scalar_t>();
    const scalar_t* Xs = xs.data_ptr<scalar_t>();
    const scalar_t* Ys = ys.data_ptr<scalar_t>();
    const scalar_t* Xq = xq.data_ptr<scalar_t>();
    const scalar_t* Yq = yq.data_ptr<scalar_t>();
    // Elements per meta-batch of each tensor.
    const int64_t nxs = T * K * c.shape.n[0], nys = T * K * c.shape.n_out();
    const int64_t nxq = T * Q * c.shape.n[0], nyq = T * Q * c.shape.n_out();
    for (int64_t i = 0; i < n; ++i) {
      const scalar_t value = batch.run(theta, Xs + i * nxs, Ys + i * nys, Xq + i * nxq,
                                       Yq + i * nyq,
                                       first_order ? Direction::FirstOrder : Direction::MAML,
                                       grad.data());
      out[i] = value;
      if (!std::isfinite(value)) break;  // before updating the weights with it
      outer.step(theta, grad.data());
      if (!all_finite(theta, P)) break;  // the update made a weight NaN or infinite
      ++done;
    }
  });
  return {losses, at::scalar_tensor(done, at::TensorOptions().dtype(at::kLong))};
}

void optimizer_step(const at::Tensor& params, at::TensorList optimizer_state,
                    const at::Tensor& grad_in, std::string_view optimizer,
                    c10::ArrayRef<double> optimizer_hyper) {
  constexpr const char* op = "pymaml::optimizer_step";
  TORCH_CHECK_TYPE(params.scalar_type() == at::kFloat || params.scalar_type() == at::kDouble,
                   op, ": params must be float32 or float64, got ", params.scalar_type());
  TORCH_CHECK_VALUE(params.dim() == 1 && params.is_contiguous(), op,
                    ": params must be a contiguous 1-D tensor [P] (updated in place), got ",
                    params.sizes());
  TORCH_CHECK_VALUE(grad_in.sizes() == params.sizes() &&
                        grad_in.scalar_type() == params.scalar_type() &&
                        grad_in.device() == params.device(),
                    op, ": grad must be like params (", params.scalar_type(), " ",
                    params.sizes(), "), got ", grad_in.scalar_type(), " ", grad_in.sizes());
  const OptimizerConfig oc = parse_optimizer(op, optimizer, optimizer_hyper, optimizer_state,
                                             params);
  const int64_t P = params.size(0);
  AT_DISPATCH_FLOATING_TYPES(params.scalar_type(), "pymaml_optimizer_step_cpu", [&] {
    // The step uses its gradient as scratch: work on a copy, grad is an input.
    const at::Tensor g = grad_in.contiguous();
    std::vector<scalar_t> grad(g.data_ptr<scalar_t>(), g.data_ptr<scalar_t>() + P);
    OuterOptimizer<scalar_t> outer(oc, optimizer_state, P);
    outer.step(params.data_ptr<scalar_t>(), grad.data());
  });
}

TORCH_LIBRARY_IMPL(pymaml, CPU, m) {
  m.impl("train_chunk", &train_chunk);
  m.impl("optimizer_step", &optimizer_step);
}

}  // namespace pymaml::cpu
