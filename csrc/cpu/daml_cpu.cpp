// CPU kernels of the DAML ops (docs/design.md §8.3): tasks spread and summed as for MAML
// (blocks.h), the math from daml_math.h.
#include <ATen/Dispatch.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <algorithm>
#include <string>
#include <string_view>
#include <tuple>
#include <vector>

#include "../op_args.h"
#include "blocks.h"
#include "kernels.h"

namespace pymaml::cpu {
namespace {

// A DAML call's arguments, checked: the base network's config, the loss network's shape, and
// contiguous tensors. x_source is [T, K, n_in] (every step) or [T, steps, K, n_in].
struct DamlArgs {
  OpConfig config;
  MlpShape loss_shape;
  Loss adapt_loss;
  int64_t T = -1, K = 0, Q = 0, batch_stride = 0;
  at::Tensor params, loss_params, xs, xq, yq;
};

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
  TORCH_CHECK_VALUE(loss_sizes[depth] == 1, op, ": loss_sizes must end in 1 (one loss value "
                    "per point), got ", loss_sizes);
  for (int64_t l = 1; l < depth; ++l)
    TORCH_CHECK_VALUE(loss_sizes[l] >= 1 && loss_sizes[l] <= kMaxWidth, op,
                      ": hidden widths of loss_sizes must be in [1, ", kMaxWidth, "], got ",
                      loss_sizes);
  return make_shape(loss_sizes.data(), int(depth));
}

void check_source(const char* op, const at::Tensor& xs, const DamlArgs& a) {
  TORCH_CHECK_TYPE(xs.scalar_type() == a.params.scalar_type(), op,
                   ": x_source must have the dtype of params (", a.params.scalar_type(),
                   "), got ", xs.scalar_type());
  TORCH_CHECK_VALUE(xs.device() == a.params.device(), op,
                    ": x_source must be on the device of params (", a.params.device(), "), got ",
                    xs.device());
  const int64_t n_in = a.config.shape.n[0], steps = a.config.steps;
  const bool per_step = xs.dim() == 4;
  TORCH_CHECK_VALUE((xs.dim() == 3 || (per_step && steps >= 1 && xs.size(1) == steps)) &&
                        xs.size(-1) == n_in && xs.size(-2) >= 1,
                    op, ": x_source must be [T, K, ", n_in, "] or [T, steps, K, ", n_in,
                    "] (steps = ", steps, ", K >= 1), got ", xs.sizes());
  TORCH_CHECK_VALUE(a.T < 0 || xs.size(0) == a.T, op, ": x_source has ", xs.size(0),
                    " tasks but x_query has ", a.T);
  TORCH_CHECK_VALUE(xs.size(0) >= 1, op, ": the meta-batch needs at least one task");
}

DamlArgs check_daml_args(const char* op, const at::Tensor& params, const at::Tensor& loss_params,
                         const at::Tensor& xs, const at::Tensor& xq, const at::Tensor& yq,
                         c10::IntArrayRef sizes, c10::IntArrayRef loss_sizes, double inner_lr,
                         int64_t steps, std::string_view activation, std::string_view loss,
                         std::string_view adapt_loss) {
  DamlArgs a;
  a.config = parse_config(op, sizes, inner_lr, steps, activation, loss);
  a.loss_shape = parse_loss_sizes(op, loss_sizes, a.config.shape);
  a.adapt_loss = parse_adapt_loss(op, adapt_loss);
  check_params(op, params, a.config);
  a.params = params.contiguous();
  TORCH_CHECK_VALUE(loss_params.dim() == 1 && loss_params.size(0) == a.loss_shape.num_params,
                    op, ": loss_params must be [", a.loss_shape.num_params, "] for loss_sizes ",
                    loss_sizes, ", got shape ", loss_params.sizes());
  TORCH_CHECK_TYPE(loss_params.scalar_type() == params.scalar_type(), op,
                   ": loss_params must have the dtype of params (", params.scalar_type(),
                   "), got ", loss_params.scalar_type());
  TORCH_CHECK_VALUE(loss_params.device() == params.device(), op,
                    ": loss_params must be on the device of params");
  if (xq.defined()) {
    a.Q = check_batch(op, "x_query", xq, "y_query", yq, params, a.config.shape, a.T);
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

// Runs fn(kernels, workspace, task, block) over the tasks with psi and theta^0 extended once.
template <typename scalar_t, typename Fn>
void for_each_daml_task(const DamlArgs& a, int64_t nb, int64_t extra, Fn&& fn) {
  const OpConfig& c = a.config;
  std::vector<scalar_t> theta0(size_t(c.shape.num_ext)), psi(size_t(a.loss_shape.num_ext));
  expand_params(c.shape, a.params.data_ptr<scalar_t>(), theta0.data());
  expand_params(a.loss_shape, a.loss_params.data_ptr<scalar_t>(), psi.data());
  const int64_t ws = daml_workspace_size(c.shape, a.loss_shape, c.steps, a.K, a.Q);
  const TaskKernels<scalar_t>& kern = task_kernels<scalar_t>(active_isa());
  for_each_block<scalar_t>(a.T, nb, ws + extra, [&](int64_t b, int64_t t, scalar_t* base) {
    auto w = carve_daml_workspace(base, c.shape, a.loss_shape, c.steps, a.K, a.Q);
    w.theta0 = theta0.data();
    w.psi = psi.data();
    fn(kern, w, t, b);
  });
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> daml_loss(
    const at::Tensor& params, const at::Tensor& loss_params, const at::Tensor& x_source,
    const at::Tensor& x_query, const at::Tensor& y_query, c10::IntArrayRef sizes,
    c10::IntArrayRef loss_sizes, double inner_lr, int64_t steps, std::string_view activation,
    std::string_view loss, std::string_view adapt_loss, bool need_grad) {
  const DamlArgs a = check_daml_args("pymaml::daml_loss", params, loss_params, x_source, x_query,
                                     y_query, sizes, loss_sizes, inner_lr, steps, activation,
                                     loss, adapt_loss);
  const OpConfig& c = a.config;
  const int64_t P = c.shape.num_params, Pl = a.loss_shape.num_params, E = c.shape.num_ext;
  const int64_t width = need_grad ? P + Pl : 0;
  const int64_t nb = num_blocks(a.T, P + Pl);
  at::Tensor partial = at::zeros({nb, width + 1}, a.params.options());  // [grads, loss]
  at::Tensor out_loss = at::empty({}, a.params.options());
  at::Tensor grad = at::empty({need_grad ? P : 0}, a.params.options());
  at::Tensor grad_loss = at::empty({need_grad ? Pl : 0}, a.params.options());
  AT_DISPATCH_FLOATING_TYPES(a.params.scalar_type(), "pymaml_daml_loss_cpu", [&] {
    const scalar_t* Xs = a.xs.data_ptr<scalar_t>();
    const scalar_t* Xq = a.xq.data_ptr<scalar_t>();
    const scalar_t* Yq = a.yq.data_ptr<scalar_t>();
    const int64_t nxs = (a.batch_stride ? steps : 1) * a.K * c.shape.n[0];
    const int64_t nxq = a.Q * c.shape.n[0], nyq = a.Q * c.shape.n_out();
    scalar_t* acc = partial.data_ptr<scalar_t>();
    for_each_daml_task<scalar_t>(a, nb, 0, [&](const TaskKernels<scalar_t>& kern,
                                              const DamlWorkspace<scalar_t>& w, int64_t t,
                                              int64_t b) {
      scalar_t* dst = acc + b * (width + 1);
      dst[width] += kern.daml_task(c.activation, c.loss, a.adapt_loss, c.shape, a.loss_shape,
                                   Xs + t * nxs, a.K, Xq + t * nxq, Yq + t * nyq, a.Q, steps,
                                   scalar_t(c.inner_lr), need_grad, w, a.batch_stride);
      if (!need_grad) return;
      for (int64_t p = 0; p < P; ++p) dst[p] += w.g[p];
      for (int64_t p = 0; p < Pl; ++p) dst[P + p] += w.g[E + p];
    });
    const scalar_t inv_t = scalar_t(1) / scalar_t(a.T);
    reduce_blocks(acc + width, nb, 1, width + 1, inv_t, out_loss.data_ptr<scalar_t>());
    if (need_grad) {
      reduce_blocks(acc, nb, P, width + 1, inv_t, grad.data_ptr<scalar_t>());
      reduce_blocks(acc + P, nb, Pl, width + 1, inv_t, grad_loss.data_ptr<scalar_t>());
    }
  });
  return {out_loss, grad, grad_loss};
}

at::Tensor daml_adapt(const at::Tensor& params, const at::Tensor& loss_params,
                      const at::Tensor& x_source, c10::IntArrayRef sizes,
                      c10::IntArrayRef loss_sizes, double inner_lr, int64_t steps,
                      std::string_view activation, std::string_view adapt_loss) {
  const DamlArgs a = check_daml_args("pymaml::daml_adapt", params, loss_params, x_source,
                                     at::Tensor(), at::Tensor(), sizes, loss_sizes, inner_lr,
                                     steps, activation, "mse", adapt_loss);
  const OpConfig& c = a.config;
  const int64_t P = c.shape.num_params;
  at::Tensor out = at::empty({a.T, P}, a.params.options());
  AT_DISPATCH_FLOATING_TYPES(a.params.scalar_type(), "pymaml_daml_adapt_cpu", [&] {
    const scalar_t* Xs = a.xs.data_ptr<scalar_t>();
    const int64_t nxs = (a.batch_stride ? steps : 1) * a.K * c.shape.n[0];
    scalar_t* adapted = out.data_ptr<scalar_t>();
    for_each_daml_task<scalar_t>(a, num_blocks(a.T, P), 0, [&](const TaskKernels<scalar_t>& kern,
                                                              const DamlWorkspace<scalar_t>& w,
                                                              int64_t t, int64_t) {
      kern.daml_inner_loop(c.activation, a.adapt_loss, c.shape, a.loss_shape, Xs + t * nxs, a.K,
                           steps, scalar_t(c.inner_lr), w, a.batch_stride);
      std::copy_n(w.theta(steps, c.shape), P, adapted + t * P);
    });
  });
  return out;
}

TORCH_LIBRARY_IMPL(pymaml, CPU, m) {
  m.impl("daml_loss", &daml_loss);
  m.impl("daml_adapt", &daml_adapt);
}

}  // namespace pymaml::cpu
