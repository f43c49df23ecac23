// CPU kernels of the DAML ops (docs/design.md §8.3): tasks spread and summed as for MAML
// (blocks.h), the math from daml_math.h.
#include <ATen/Dispatch.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>
#include <string>
#include <string_view>
#include <tuple>
#include <vector>

#include "../op_args.h"
#include "blocks.h"
#include "daml_batch.h"
#include "kernels.h"
#include "meta_batch.h"  // inner_rule

namespace pymaml::cpu {
namespace {

Loss parse_adapt_loss(const char* op, std::string_view adapt_loss) {
  if (adapt_loss == "l1") return Loss::L1;
  TORCH_CHECK_VALUE(adapt_loss == "mse", op, ": adapt_loss must be 'l1' or 'mse', got '",
                    std::string(adapt_loss), "'");
  return Loss::MSE;
}

MlpShape parse_loss_sizes(const char* op, c10::IntArrayRef loss_sizes, const MlpShape& base) {
  const int64_t depth = int64_t(loss_sizes.size()) - 1;
  TORCH_CHECK_VALUE(depth >= 1 && depth <= kMaxDepth, op, ": loss_sizes must list 2 to ",
                    kMaxDepth + 1, " layer widths, got ", loss_sizes);
  TORCH_CHECK_VALUE(loss_sizes[0] == base.sum_width, op, ": loss_sizes[0] must be ",
                    base.sum_width, " (the base network's output plus hidden widths, the taps "
                    "the loss network reads), got ", loss_sizes);
  // Any output width: the adaptation loss is the mean of |h| or h^2 over all of the loss
  // network's K * loss_sizes[-1] outputs (loss_and_seed, LossFn).
  for (int64_t l = 1; l <= depth; ++l)
    TORCH_CHECK_VALUE(loss_sizes[l] >= 1 && loss_sizes[l] <= kMaxWidth, op,
                      ": the hidden and output widths of loss_sizes must be in [1, ", kMaxWidth,
                      "], got ", loss_sizes);
  return make_shape(loss_sizes.data(), int(depth));
}

void check_source(const char* op, const at::Tensor& xs, const DamlArgs& a) {
  TORCH_CHECK_TYPE(xs.scalar_type() == a.params.scalar_type(), op,
                   ": x_source must have the dtype of params (", a.params.scalar_type(),
                   "), got ", xs.scalar_type());
  TORCH_CHECK_VALUE(xs.device() == a.params.device(), op,
                    ": x_source must be on the device of params (", a.params.device(), "), got ",
                    xs.device());
  const int64_t n_in = a.config.base.shape.n[0], steps = a.config.base.steps;
  const bool per_step = xs.dim() == 4;
  TORCH_CHECK_VALUE((xs.dim() == 3 || (per_step && steps >= 1 && xs.size(1) == steps)) &&
                        xs.size(-1) == n_in && xs.size(-2) >= 1,
                    op, ": x_source must be [T, K, ", n_in, "] or [T, steps, K, ", n_in,
                    "] (steps = ", steps, ", K >= 1), got ", xs.sizes());
  TORCH_CHECK_VALUE(a.T < 0 || xs.size(0) == a.T, op, ": x_source has ", xs.size(0),
                    " tasks but x_query has ", a.T);
  TORCH_CHECK_VALUE(xs.size(0) >= 1, op, ": the meta-batch needs at least one task");
}

void check_loss_params(const char* op, const at::Tensor& loss_params, const at::Tensor& params,
                       const MlpShape& loss_shape) {
  TORCH_CHECK_VALUE(loss_params.dim() == 1 && loss_params.size(0) == loss_shape.num_params, op,
                    ": loss_params must be [", loss_shape.num_params, "] for the loss_sizes, "
                    "got shape ", loss_params.sizes());
  TORCH_CHECK_TYPE(loss_params.scalar_type() == params.scalar_type(), op,
                   ": loss_params must have the dtype of params (", params.scalar_type(),
                   "), got ", loss_params.scalar_type());
  TORCH_CHECK_VALUE(loss_params.device() == params.device(), op,
                    ": loss_params must be on the device of params");
}

}  // namespace

DamlArgs check_daml_args(const char* op, DamlConfig config, const at::Tensor& params,
                         const at::Tensor& loss_params, const at::Tensor& xs,
                         const at::Tensor& xq, const at::Tensor& yq) {
  DamlArgs a;
  a.config = config;
  check_params(op, params, a.config.base);
  a.params = params.contiguous();
  check_loss_params(op, loss_params, params, a.config.loss_shape);
  if (xq.defined()) {
    a.Q = check_batch(op, "x_query", xq, "y_query", yq, params, a.config.base.shape, a.T);
    a.xq = xq.contiguous();
    a.yq = yq.contiguous();
  }
  check_source(op, xs, a);
  a.T = xs.size(0);
  a.K = xs.size(-2);
  a.batch_stride = xs.dim() == 4 ? a.K : 0;
  a.loss_params = loss_params.contiguous();
  a.xs = xs.contiguous();
  return a;
}

DamlConfig parse_daml_config(const char* op, c10::IntArrayRef sizes, c10::IntArrayRef loss_sizes,
                             double inner_lr, int64_t steps, std::string_view activation,
                             std::string_view loss, std::string_view adapt_loss) {
  DamlConfig c;
  c.base = parse_config(op, sizes, inner_lr, steps, activation, loss);
  c.loss_shape = parse_loss_sizes(op, loss_sizes, c.base.shape);
  c.adapt_loss = parse_adapt_loss(op, adapt_loss);
  return c;
}

template <typename scalar_t>
DamlBatch<scalar_t>::DamlBatch(const DamlConfig& config, int64_t T, int64_t K, int64_t Q,
                               int64_t batch_stride, bool rate_grad)
    : config_(config), T_(T), K_(K), Q_(Q), batch_stride_(batch_stride) {
  const MlpShape &s = config.base.shape, &ls = config.loss_shape;
  rate_size_ = rate_grad ? config.base.rate_rows * s.num_params : 0;
  width_ = s.num_params + ls.num_params + rate_size_ + 1;
  blocks_ = num_blocks(T, width_);
  worker_size_ = daml_workspace_size(s, ls, config.base.steps, K, Q, rate_size_ > 0);
}

template <typename scalar_t>
scalar_t DamlBatch<scalar_t>::run(const scalar_t* theta, const scalar_t* psi, const scalar_t* Xs,
                                  const scalar_t* Xq, const scalar_t* Yq, scalar_t* grad,
                                  scalar_t* grad_psi, const scalar_t* rates,
                                  scalar_t* rate_grad) {
  const OpConfig& c = config_.base;
  const MlpShape &s = c.shape, &ls = config_.loss_shape;
  const int64_t P = s.num_params, Pl = ls.num_params, E = s.num_ext, steps = c.steps;
  const int64_t W = width_, loss_at = W - 1;
  const int64_t workers = std::max(1, at::get_num_threads());
  // The block sums, theta and psi extended, the rates extended, each worker's scratch (all
  // but the sums written before they are read).
  const CallMemory<scalar_t, 5> mem({blocks_ * W, E, ls.num_ext, c.rate_rows * E,
                                     workers * worker_size_});
  scalar_t *partial = mem[0], *theta0 = mem[1], *psi_ext = mem[2], *scratch = mem[4];
  std::fill_n(partial, blocks_ * W, scalar_t(0));
  expand_params(s, theta, theta0);
  expand_params(ls, psi, psi_ext);
  const int64_t nxs = (batch_stride_ ? steps : 1) * K_ * s.n[0];
  const int64_t nxq = Q_ * s.n[0], nyq = Q_ * s.n_out();
  const TaskKernels<scalar_t>& kern = task_kernels<scalar_t>(active_isa());
  const bool need_grad = grad != nullptr;
  const int64_t RP = need_grad && rate_grad ? rate_size_ : 0;
  const InnerLR<scalar_t> lr = inner_rule(c, rates, mem[3]);
  run_blocks(blocks_, [&](int64_t b, int worker) {
    auto w = carve_daml_workspace(scratch + worker * worker_size_, s, ls, steps, K_, Q_,
                                  rate_size_ > 0);
    w.theta0 = theta0;
    w.psi = psi_ext;
    scalar_t* dst = partial + b * W;
    if (RP) w.rate_grad = dst + P + Pl;  // the tasks of a block accumulate into its sum
    const auto [first, last] = block_range(b, blocks_, T_);
    for (int64_t t = first; t < last; ++t) {
      dst[loss_at] += kern.daml_task(c.activation, c.loss, config_.adapt_loss, s, ls,
                                     Xs + t * nxs, K_, Xq + t * nxq, Yq + t * nyq, Q_, steps,
                                     lr, need_grad, w, batch_stride_);
      if (!need_grad) continue;
      for (int64_t p = 0; p < P; ++p) dst[p] += w.g[p];
      for (int64_t p = 0; p < Pl; ++p) dst[P + p] += w.g[E + p];
    }
  });
  const scalar_t inv_t = scalar_t(1) / scalar_t(T_);
  scalar_t mean_loss;
  reduce_blocks(partial + loss_at, blocks_, 1, W, inv_t, &mean_loss);
  if (need_grad) {
    reduce_blocks(partial, blocks_, P, W, inv_t, grad);
    reduce_blocks(partial + P, blocks_, Pl, W, inv_t, grad_psi);
  }
  if (RP) reduce_blocks(partial + P + Pl, blocks_, RP, W, inv_t, rate_grad);
  return mean_loss;
}

template class DamlBatch<float>;
template class DamlBatch<double>;

namespace {

// The rates, checked as the MAML ops check them (op_args.h check_rule), every layer adapting:
// the contiguous rates, with their rows in a.config, or an undefined tensor without rates.
at::Tensor check_daml_rates(const char* op, DamlArgs& a,
                            const std::optional<at::Tensor>& rates) {
  if (!rates.has_value()) return at::Tensor();
  OpArgs rule;
  rule.config = a.config.base;
  rule.params = a.params;
  check_rule(op, rule, rates, std::nullopt);
  a.config.base = rule.config;
  return rule.rates;
}

}  // namespace

// [loss, params' and loss_params' gradients, the rates' (listed with rates)], or [loss] alone
// with keep_grad (ops.cpp).
std::vector<at::Tensor> daml_loss(
    const at::Tensor& params, const at::Tensor& loss_params, const at::Tensor& x_source,
    const at::Tensor& x_query, const at::Tensor& y_query, c10::IntArrayRef sizes,
    c10::IntArrayRef loss_sizes, double inner_lr, int64_t steps, std::string_view activation,
    std::string_view loss, std::string_view adapt_loss, bool need_grad, bool keep_grad,
    const std::optional<at::Tensor>& rates_in, bool need_rate_grad) {
  constexpr const char* op = "pymaml::daml_loss";
  const DamlConfig config = parse_daml_config(
      op, sizes, loss_sizes, scalar_lr(inner_lr, rates_in), steps, activation, loss, adapt_loss);
  DamlArgs a = check_daml_args(op, config, params, loss_params, x_source, x_query, y_query);
  const at::Tensor rates = check_daml_rates(op, a, rates_in);
  need_grad = need_grad && !keep_grad;  // as maml_loss: below autograd nothing would keep them
  need_rate_grad = need_rate_grad && need_grad && rates.defined();
  const int64_t P = a.config.base.shape.num_params, Pl = a.config.loss_shape.num_params;
  const auto options = a.params.options();
  std::vector<at::Tensor> out;
  out.reserve(4);
  out.push_back(at::empty({}, options));
  if (!keep_grad) {
    out.push_back(at::empty({need_grad ? P : 0}, options));
    out.push_back(at::empty({need_grad ? Pl : 0}, options));
  }
  if (!keep_grad && rates.defined())
    out.push_back(need_rate_grad ? at::empty({a.config.base.rate_rows, P}, options)
                                 : at::empty({0}, options));
  AT_DISPATCH_FLOATING_TYPES(a.params.scalar_type(), "pymaml_daml_loss_cpu", [&] {
    const auto ptr = [&](size_t i, bool use) {
      return use ? out[i].data_ptr<scalar_t>() : nullptr;
    };
    DamlBatch<scalar_t> batch(a.config, a.T, a.K, a.Q, a.batch_stride, need_rate_grad);
    *out[0].data_ptr<scalar_t>() = batch.run(
        a.params.data_ptr<scalar_t>(), a.loss_params.data_ptr<scalar_t>(),
        a.xs.data_ptr<scalar_t>(), a.xq.data_ptr<scalar_t>(), a.yq.data_ptr<scalar_t>(),
        ptr(1, need_grad), ptr(2, need_grad),
        rates.defined() ? rates.data_ptr<scalar_t>() : nullptr, ptr(3, need_rate_grad));
  });
  return out;
}

at::Tensor daml_adapt(const at::Tensor& params, const at::Tensor& loss_params,
                      const at::Tensor& x_source, c10::IntArrayRef sizes,
                      c10::IntArrayRef loss_sizes, double inner_lr, int64_t steps,
                      std::string_view activation, std::string_view adapt_loss) {
  constexpr const char* op = "pymaml::daml_adapt";
  const DamlArgs a = check_daml_args(
      op, parse_daml_config(op, sizes, loss_sizes, inner_lr, steps, activation, "mse", adapt_loss),
      params, loss_params, x_source, at::Tensor(), at::Tensor());
  const OpConfig& c = a.config.base;
  const MlpShape &s = c.shape, &ls = a.config.loss_shape;
  const int64_t P = s.num_params;
  at::Tensor out = at::empty({a.T, P}, a.params.options());
  AT_DISPATCH_FLOATING_TYPES(a.params.scalar_type(), "pymaml_daml_adapt_cpu", [&] {
    std::vector<scalar_t> theta0(size_t(s.num_ext)), psi(size_t(ls.num_ext));
    expand_params(s, a.params.data_ptr<scalar_t>(), theta0.data());
    expand_params(ls, a.loss_params.data_ptr<scalar_t>(), psi.data());
    const scalar_t* Xs = a.xs.data_ptr<scalar_t>();
    const int64_t nxs = (a.batch_stride ? steps : 1) * a.K * s.n[0];
    scalar_t* adapted = out.data_ptr<scalar_t>();
    const TaskKernels<scalar_t>& kern = task_kernels<scalar_t>(active_isa());
    const int64_t ws = daml_workspace_size(s, ls, steps, a.K, 0);
    for_each_block<scalar_t>(a.T, num_blocks(a.T, P), ws, [&](int64_t, int64_t t, scalar_t* base) {
      auto w = carve_daml_workspace(base, s, ls, steps, a.K, int64_t(0));
      w.theta0 = theta0.data();
      w.psi = psi.data();
      kern.daml_inner_loop(c.activation, a.config.adapt_loss, s, ls, Xs + t * nxs, a.K, steps,
                           inner_rule(c, (const scalar_t*)nullptr, (scalar_t*)nullptr), w,
                           a.batch_stride);
      std::copy_n(w.theta(steps, s), P, adapted + t * P);
    });
  });
  return out;
}

TORCH_LIBRARY_IMPL(pymaml, CPU, m) {
  m.impl("daml_loss", &daml_loss);
  m.impl("daml_adapt", &daml_adapt);
}

}  // namespace pymaml::cpu
