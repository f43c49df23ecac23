// CPU kernels: tasks spread over threads and summed deterministically (blocks.h), the math
// from maml_math.h.
#include "maml_cpu.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <thread>
#include <memory>
#include <vector>

#include "../op_args.h"
#include "blocks.h"
#include "kernels.h"
#include "meta_batch.h"

namespace pymaml::cpu {
namespace {


template <typename scalar_t>
const scalar_t* data_or_null(const at::Tensor& t) {
  return t.defined() ? t.data_ptr<scalar_t>() : nullptr;
}

// [T, P]: every task's adapted parameters (a.rates defined: learned rates; else the scalar rate).
at::Tensor adapt_impl(const OpArgs& a) {
  const OpConfig& c = a.config;
  const int64_t T = a.T, K = a.K, P = c.shape.num_params, steps = c.steps;
  at::Tensor out = at::empty({T, P}, a.params.options());
  AT_DISPATCH_FLOATING_TYPES(a.params.scalar_type(), "pymaml_adapt_cpu", [&] {
    const scalar_t* X = a.xs.data_ptr<scalar_t>();
    const scalar_t* Y = a.ys.data_ptr<scalar_t>();
    scalar_t* adapted = out.data_ptr<scalar_t>();
    std::vector<scalar_t> rates_ext(static_cast<size_t>(c.rate_rows * c.shape.num_ext));
    const InnerLR<scalar_t> lr = inner_rule(c, data_or_null<scalar_t>(a.rates), rates_ext.data());
    const int64_t points = a.support_batches * K;  // a task's support points
    const int64_t nx = points * c.shape.n[0], ny = points * c.shape.n_out();
    const TaskKernels<scalar_t>& kern = task_kernels<scalar_t>(active_isa());
    std::vector<scalar_t> theta0(static_cast<size_t>(c.shape.num_ext));
    expand_params(c.shape, a.params.data_ptr<scalar_t>(), theta0.data());
    const int64_t ws = task_workspace_size(c.shape, steps, K);
    for_each_block<scalar_t>(T, num_blocks(T, P), ws, [&](int64_t, int64_t t, scalar_t* base) {
      auto w = carve_workspace(base, c.shape, steps, K);
      w.theta0 = theta0.data();
      kern.inner_loop(c.activation, c.loss, c.shape, X + t * nx, Y + t * ny, K, steps, lr, w,
                      a.batch_stride);
      std::copy_n(w.theta(steps, c.shape), P, adapted + t * P);
    });
  });
  return out;
}

// The vector-Jacobian product of adapt_impl for a.grad [T, P]: (d params [P], d rates [R, P]
// if need_rate_grad, else undefined).
std::tuple<at::Tensor, at::Tensor> adapt_backward_impl(const OpArgs& a, bool first_order,
                                                       bool need_rate_grad) {
  const OpConfig& c = a.config;
  const int64_t T = a.T, K = a.K, P = c.shape.num_params, steps = c.steps;
  const int64_t RP = need_rate_grad ? c.rate_rows * P : 0, width = P + RP;
  const int64_t nb = num_blocks(T, width);
  at::Tensor partial = at::zeros({nb, width}, a.params.options());
  at::Tensor out = at::empty({P}, a.params.options());
  at::Tensor rate_out = need_rate_grad ? at::empty({c.rate_rows, P}, a.params.options())
                                       : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES(a.params.scalar_type(), "pymaml_adapt_backward_cpu", [&] {
    const scalar_t* X = a.xs.data_ptr<scalar_t>();
    const scalar_t* Y = a.ys.data_ptr<scalar_t>();
    const scalar_t* G = a.grad.data_ptr<scalar_t>();
    scalar_t* acc = partial.data_ptr<scalar_t>();
    std::vector<scalar_t> rates_ext(static_cast<size_t>(c.rate_rows * c.shape.num_ext));
    const InnerLR<scalar_t> lr = inner_rule(c, data_or_null<scalar_t>(a.rates), rates_ext.data());
    const int64_t points = a.support_batches * K;  // a task's support points
    const int64_t nx = points * c.shape.n[0], ny = points * c.shape.n_out();
    const TaskKernels<scalar_t>& kern = task_kernels<scalar_t>(active_isa());
    std::vector<scalar_t> theta0(static_cast<size_t>(c.shape.num_ext));
    expand_params(c.shape, a.params.data_ptr<scalar_t>(), theta0.data());
    const int64_t ws = task_workspace_size(c.shape, steps, K, need_rate_grad);
    for_each_block<scalar_t>(T, nb, ws + RP, [&](int64_t b, int64_t t, scalar_t* base) {
      auto w = carve_workspace(base, c.shape, steps, K, need_rate_grad);
      w.theta0 = theta0.data();
      if (need_rate_grad) {
        w.rate_grad = base + ws;
        std::fill_n(w.rate_grad, RP, scalar_t(0));
      }
      kern.adapt_vjp_task(c.activation, c.loss, c.shape, X + t * nx, Y + t * ny, K, steps, lr,
                          G + t * P, w, a.batch_stride, first_order);
      scalar_t* dst = acc + b * width;
      for (int64_t p = 0; p < P; ++p) dst[p] += w.g[p];
      for (int64_t j = 0; j < RP; ++j) dst[P + j] += w.rate_grad[j];
    });
    reduce_blocks(acc, nb, P, width, scalar_t(1), out.data_ptr<scalar_t>());
    if (need_rate_grad) reduce_blocks(acc + P, nb, RP, width, scalar_t(1),
                                      rate_out.data_ptr<scalar_t>());
  });
  return {out, rate_out};
}

}  // namespace

at::Tensor adapt(const at::Tensor& params, const at::Tensor& xs, const at::Tensor& ys,
                 c10::IntArrayRef sizes, double inner_lr, int64_t steps,
                 std::string_view activation, std::string_view loss, bool /*first_order*/,
                 const std::optional<at::Tensor>& rates, at::OptionalIntArrayRef adapt_layers) {
  constexpr const char* op = "pymaml::adapt";
  OpArgs a = check_op_args(op, sizes, scalar_lr(inner_lr, rates), steps, activation, loss, params,
                           xs, ys, at::Tensor(), at::Tensor(), at::Tensor(), true);
  check_rule(op, a, rates, adapt_layers);
  return adapt_impl(a);
}

std::tuple<at::Tensor, at::Tensor> adapt_backward(
    const at::Tensor& grad, const at::Tensor& params, const at::Tensor& xs, const at::Tensor& ys,
    c10::IntArrayRef sizes, double inner_lr, int64_t steps, std::string_view activation,
    std::string_view loss, const std::optional<at::Tensor>& rates,
    at::OptionalIntArrayRef adapt_layers, bool first_order, bool need_rate_grad) {
  constexpr const char* op = "pymaml::adapt_backward";
  OpArgs a = check_op_args(op, sizes, scalar_lr(inner_lr, rates), steps, activation, loss, params,
                           xs, ys, at::Tensor(), at::Tensor(), grad, true);
  check_rule(op, a, rates, adapt_layers);
  auto [dparams, drates] =
      adapt_backward_impl(a, first_order, need_rate_grad && rates.has_value());
  if (!drates.defined()) drates = at::empty({0}, params.options());
  return {dparams, drates};
}

template <typename scalar_t>
MetaBatch<scalar_t>::MetaBatch(const OpConfig& config, int64_t T, int64_t K, int64_t Q,
                               int64_t batch_stride, bool rate_grad)
    : config_(config), T_(T), K_(K), Q_(Q), batch_stride_(batch_stride) {
  const int64_t P = config.shape.num_params;
  rate_size_ = rate_grad ? config.rate_rows * P : 0;
  width_ = P + rate_size_;
  blocks_ = num_blocks(T, width_);
  worker_size_ = task_workspace_size(config.shape, config.steps, std::max(K, Q), rate_size_ > 0);
}

template <typename scalar_t>
scalar_t MetaBatch<scalar_t>::run(const scalar_t* theta, const scalar_t* Xs, const scalar_t* Ys,
                                  const scalar_t* Xq, const scalar_t* Yq, Direction direction,
                                  scalar_t* grad, const scalar_t* rates, scalar_t* rate_grad) {
  const OpConfig& c = config_;
  const int64_t P = c.shape.num_params, T = T_, K = K_, Q = Q_, steps = c.steps;
  const bool need_grad = grad != nullptr;
  const bool reptile = direction == Direction::Reptile;
  const bool first_order = direction == Direction::FirstOrder;
  const int64_t RP = need_grad && rate_grad ? rate_size_ : 0;  // rates' gradient entries
  const int64_t workers = std::max(1, at::get_num_threads());
  // The block sums of the losses and gradients, theta and the rates extended, each worker's
  // scratch (all but the sums written before they are read).
  const CallMemory<scalar_t, 5> mem({blocks_, blocks_ * width_, c.shape.num_ext,
                                     c.rate_rows * c.shape.num_ext, workers * worker_size_});
  scalar_t *losses = mem[0], *partial = mem[1], *theta0 = mem[2], *scratch = mem[4];
  std::fill_n(losses, blocks_, scalar_t(0));
  if (need_grad) std::fill_n(partial, blocks_ * width_, scalar_t(0));
  const InnerLR<scalar_t> lr = inner_rule(c, rates, mem[3]);
  const int64_t support = (batch_stride_ ? steps : 1) * K;  // a task's support points
  const int64_t nxs = support * c.shape.n[0], nys = support * c.shape.n_out();
  const int64_t nxq = Q * c.shape.n[0], nyq = Q * c.shape.n_out();
  const int64_t points = std::max(K, Q);
  const TaskKernels<scalar_t>& kern = task_kernels<scalar_t>(active_isa());
  expand_params(c.shape, theta, theta0);  // once for all tasks
  run_blocks(blocks_, [&](int64_t b, int worker) {
    auto w = carve_workspace(scratch + worker * worker_size_, c.shape, steps, points,
                             rate_size_ > 0);
    w.theta0 = theta0;
    // The tasks of a block add their rates' gradient straight into its sum (zeroed above):
    // the walk accumulates into rate_grad, so no per-task buffer is needed.
    if (RP) w.rate_grad = partial + b * width_ + P;
    const auto [first, last] = block_range(b, blocks_, T);
    for (int64_t t = first; t < last; ++t) {
      losses[b] += kern.maml_task(c.activation, c.loss, c.shape, Xs + t * nxs, Ys + t * nys, K,
                                   Xq + t * nxq, Yq + t * nyq, Q, steps, lr, first_order,
                                   need_grad && !reptile, w, batch_stride_);
      if (!need_grad) continue;
      // Reptile sums the adapted weights theta_t^S, the others the meta-gradients.
      const scalar_t* task = reptile ? w.theta(steps, c.shape) : w.g;
      scalar_t* dst = partial + b * width_;
      for (int64_t p = 0; p < P; ++p) dst[p] += task[p];
    }
  });
  // Mean over tasks, blocks summed in order.
  const scalar_t inv_t = scalar_t(1) / scalar_t(T);
  scalar_t mean_loss;
  reduce_blocks(losses, blocks_, 1, 1, inv_t, &mean_loss);
  if (need_grad && !reptile) reduce_blocks(partial, blocks_, P, width_, inv_t, grad);
  if (RP) reduce_blocks(partial + P, blocks_, RP, width_, inv_t, rate_grad);
  if (need_grad && reptile) {
    // theta - mean_t theta_t^S, the mean as sum / T (one rounding, where sum * (1 / T) has
    // two: theta - mean is small where the tasks agree, and Adam scales its rounding up)
    reduce_blocks(partial, blocks_, P, width_, scalar_t(1), grad);
    for (int64_t p = 0; p < P; ++p) grad[p] = theta[p] - grad[p] / scalar_t(T);
  }
  return mean_loss;
}

template class MetaBatch<float>;
template class MetaBatch<double>;

namespace {

// maml_loss: [mean loss, meta-gradient [P] or empty, rates' gradient [R, P] or empty (listed
// with rates)], or [mean loss] alone with keep_grad (ops.cpp).
std::vector<at::Tensor> maml_loss_impl(const OpArgs& a, bool first_order, bool need_grad,
                                       bool need_rate_grad, bool keep_grad) {
  const OpConfig& c = a.config;
  const int64_t P = c.shape.num_params;
  const bool rates = a.rates.defined();
  need_grad = need_grad && !keep_grad;
  need_rate_grad = need_rate_grad && need_grad && rates;
  const auto options = a.params.options();
  std::vector<at::Tensor> out;
  out.reserve(3);
  out.push_back(at::empty({}, options));
  if (!keep_grad) out.push_back(at::empty({need_grad ? P : 0}, options));
  if (!keep_grad && rates)
    out.push_back(need_rate_grad ? at::empty({c.rate_rows, P}, options) : at::empty({0}, options));
  AT_DISPATCH_FLOATING_TYPES(a.params.scalar_type(), "pymaml_maml_loss_cpu", [&] {
    MetaBatch<scalar_t> batch(c, a.T, a.K, a.Q, a.batch_stride, need_rate_grad);
    *out[0].data_ptr<scalar_t>() = batch.run(
        a.params.data_ptr<scalar_t>(), a.xs.data_ptr<scalar_t>(), a.ys.data_ptr<scalar_t>(),
        a.xq.data_ptr<scalar_t>(), a.yq.data_ptr<scalar_t>(),
        first_order ? Direction::FirstOrder : Direction::MAML,
        need_grad ? out[1].data_ptr<scalar_t>() : nullptr, data_or_null<scalar_t>(a.rates),
        need_rate_grad ? out[2].data_ptr<scalar_t>() : nullptr);
  });
  return out;
}

}  // namespace

std::vector<at::Tensor> maml_loss(
    const at::Tensor& params, const at::Tensor& xs, const at::Tensor& ys, const at::Tensor& xq,
    const at::Tensor& yq, c10::IntArrayRef sizes, double inner_lr, int64_t steps,
    std::string_view activation, std::string_view loss, bool first_order, bool need_grad,
    bool keep_grad, const std::optional<at::Tensor>& rates, at::OptionalIntArrayRef adapt_layers,
    bool need_rate_grad) {
  constexpr const char* op = "pymaml::maml_loss";
  OpArgs a = check_op_args(op, sizes, scalar_lr(inner_lr, rates), steps, activation, loss, params,
                           xs, ys, xq, yq, at::Tensor(), true);
  check_rule(op, a, rates, adapt_layers);
  // keep_grad: autograd, which keeps the gradients, calls this kernel without it
  // (autograd.cpp); below autograd nothing would keep them, so none is computed.
  return maml_loss_impl(a, first_order, need_grad, need_rate_grad, keep_grad);
}

std::tuple<at::Tensor, at::Tensor> reptile(const at::Tensor& params_in, const at::Tensor& xs_in,
                                           const at::Tensor& ys_in, const at::Tensor& xq_in,
                                           const at::Tensor& yq_in, c10::IntArrayRef sizes,
                                           double inner_lr, int64_t steps,
                                           std::string_view activation, std::string_view loss) {
  constexpr const char* op = "pymaml::reptile";
  const OpArgs a = check_op_args(op, sizes, inner_lr, steps, activation, loss, params_in, xs_in,
                                 ys_in, xq_in, yq_in, at::Tensor(), true);
  const OpConfig& c = a.config;
  at::Tensor direction = at::empty({c.shape.num_params}, a.params.options());
  at::Tensor mean_loss = at::empty({}, a.params.options());
  AT_DISPATCH_FLOATING_TYPES(a.params.scalar_type(), "pymaml_reptile_cpu", [&] {
    MetaBatch<scalar_t> batch(c, a.T, a.K, a.Q, a.batch_stride);
    *mean_loss.data_ptr<scalar_t>() = batch.run(
        a.params.data_ptr<scalar_t>(), a.xs.data_ptr<scalar_t>(), a.ys.data_ptr<scalar_t>(),
        a.xq.data_ptr<scalar_t>(), a.yq.data_ptr<scalar_t>(), Direction::Reptile,
        direction.data_ptr<scalar_t>());
  });
  return {mean_loss, direction};
}

TORCH_LIBRARY_IMPL(pymaml, CPU, m) {
  m.impl("adapt", &adapt);
  m.impl("adapt_backward", &adapt_backward);
  m.impl("maml_loss", &maml_loss);
  m.impl("reptile", &reptile);
}

}  // namespace pymaml::cpu
