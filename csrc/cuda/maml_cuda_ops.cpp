// The CUDA kernels of the pymaml ops as torch sees them: checks the arguments (op_args, shared
// with the CPU ops), allocates outputs and scratch with torch's allocator on the tensors'
// device, and launches the kernel layer (maml_cuda.h) on the current torch stream under a
// device guard, checking every returned CUDA error. Only device-generic c10 APIs (no ATen/cuda
// headers), so that this file also compiles against a torch without CUDA (scripts/check_cuda.sh).
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/core/DeviceGuard.h>
#include <c10/core/impl/VirtualGuardImpl.h>
#include <torch/library.h>

#include <optional>
#include <string_view>
#include <tuple>
#include <vector>

#include "../op_args.h"
#include "maml_cuda.h"

namespace pymaml::cuda {
namespace {

// The current torch stream of `device` (what at::cuda::getCurrentCUDAStream gives).
cudaStream_t current_stream(c10::Device device) {
  const c10::impl::VirtualGuardImpl impl(device.type());
  return static_cast<cudaStream_t>(impl.getStream(device).native_handle());
}

void check_cuda(const char* op, cudaError_t err) {
  TORCH_CHECK(err == cudaSuccess, op, ": CUDA error ", cudaGetErrorName(err), ": ",
              cudaGetErrorString(err));
}

Problem make_problem(const OpConfig& c, int64_t T, int64_t K, int64_t Q) {
  Problem pb;
  pb.shape = c.shape;
  pb.activation = c.activation;
  pb.loss = c.loss;
  pb.steps = c.steps;
  pb.inner_lr = c.inner_lr;
  pb.tasks = T;
  pb.support = K;
  pb.query = Q;
  return pb;
}

template <typename scalar_t>
LaunchPlan plan_or_throw(const char* op, Op which, const Problem& pb, bool need_grad) {
  LaunchPlan plan;
  check_cuda(op, plan_launch<scalar_t>(which, pb, need_grad, &plan));
  TORCH_CHECK_VALUE(plan.error.empty(), op, ": ", plan.error);
  return plan;
}

template <typename scalar_t>
scalar_t* ptr(const at::Tensor& t) {
  return t.defined() && t.numel() ? t.data_ptr<scalar_t>() : nullptr;
}

// A buffer of n elements like `like`, or an undefined tensor (no allocation) when n is 0.
at::Tensor buffer(int64_t n, const at::Tensor& like) {
  return n ? at::empty({n}, like.options()) : at::Tensor();
}

// The CUDA kernels have one scalar rate and every layer adapting: learned rates and frozen
// layers run on the CPU kernels (pymaml.functional sends such calls to the reference on a GPU).
void refuse_rule(const char* op, const std::optional<at::Tensor>& rates,
                 at::OptionalIntArrayRef adapt_layers) {
  TORCH_CHECK_NOT_IMPLEMENTED(!rates.has_value() && !adapt_layers.has_value(), op,
                              ": rates and adapt_layers run on the CPU kernels only");
}

at::Tensor adapt_op(const at::Tensor& params_in, const at::Tensor& xs_in, const at::Tensor& ys_in,
                    c10::IntArrayRef sizes, double inner_lr, int64_t steps,
                    std::string_view activation, std::string_view loss, bool /*first_order*/,
                    const std::optional<at::Tensor>& rates, at::OptionalIntArrayRef adapt_layers) {
  constexpr const char* op = "pymaml::adapt";
  refuse_rule(op, rates, adapt_layers);
  const c10::DeviceGuard guard(params_in.device());
  const OpArgs a = check_op_args(op, sizes, inner_lr, steps, activation, loss, params_in, xs_in,
                                 ys_in);
  const OpConfig& c = a.config;
  const int64_t T = a.T, K = a.K;
  const at::Tensor &params = a.params, &xs = a.xs, &ys = a.ys;
  const Problem pb = make_problem(c, T, K, 0);
  at::Tensor out = at::empty({T, c.shape.num_params}, params.options());
  AT_DISPATCH_FLOATING_TYPES(params.scalar_type(), "pymaml_adapt_cuda", [&] {
    const LaunchPlan plan = plan_or_throw<scalar_t>(op, Op::Adapt, pb, false);
    const at::Tensor scratch = buffer(plan.scratch_elems, params);
    check_cuda(op, cuda::adapt<scalar_t>(pb, plan, ptr<scalar_t>(params), ptr<scalar_t>(xs),
                                         ptr<scalar_t>(ys), ptr<scalar_t>(scratch),
                                         ptr<scalar_t>(out), current_stream(params.device())));
  });
  return out;
}

// Second order (adapt's autograd sums grad over the tasks itself for the first-order product).
std::tuple<at::Tensor, at::Tensor> adapt_backward_op(
    const at::Tensor& grad_in, const at::Tensor& params_in, const at::Tensor& xs_in,
    const at::Tensor& ys_in, c10::IntArrayRef sizes, double inner_lr, int64_t steps,
    std::string_view activation, std::string_view loss, const std::optional<at::Tensor>& rates,
    at::OptionalIntArrayRef adapt_layers, bool first_order, bool /*need_rate_grad*/) {
  constexpr const char* op = "pymaml::adapt_backward";
  refuse_rule(op, rates, adapt_layers);
  TORCH_CHECK_NOT_IMPLEMENTED(!first_order, op, ": the CUDA kernel computes the second-order "
                              "product only (first order: grad.sum(0))");
  const c10::DeviceGuard guard(params_in.device());
  const OpArgs a = check_op_args(op, sizes, inner_lr, steps, activation, loss, params_in, xs_in,
                                 ys_in, at::Tensor(), at::Tensor(), grad_in);
  const OpConfig& c = a.config;
  const int64_t T = a.T, K = a.K;
  const at::Tensor &params = a.params, &xs = a.xs, &ys = a.ys, &grad = a.grad;
  const Problem pb = make_problem(c, T, K, 0);
  at::Tensor out = at::empty({c.shape.num_params}, params.options());
  AT_DISPATCH_FLOATING_TYPES(params.scalar_type(), "pymaml_adapt_backward_cuda", [&] {
    const LaunchPlan plan = plan_or_throw<scalar_t>(op, Op::AdaptBackward, pb, false);
    const at::Tensor scratch = buffer(plan.scratch_elems, params);
    const at::Tensor partial = buffer(plan.partial_elems, params);
    check_cuda(op, cuda::adapt_backward<scalar_t>(
                       pb, plan, ptr<scalar_t>(grad), ptr<scalar_t>(params), ptr<scalar_t>(xs),
                       ptr<scalar_t>(ys), ptr<scalar_t>(scratch), ptr<scalar_t>(partial),
                       ptr<scalar_t>(out), current_stream(params.device())));
  });
  return {out, at::empty({0}, params.options())};
}

// [loss, meta-gradient [P] or empty], or [loss] with keep_grad (as on the CPU, maml_cpu.cpp).
std::vector<at::Tensor> maml_loss_op(
    const at::Tensor& params_in, const at::Tensor& xs_in, const at::Tensor& ys_in,
    const at::Tensor& xq_in, const at::Tensor& yq_in, c10::IntArrayRef sizes, double inner_lr,
    int64_t steps, std::string_view activation, std::string_view loss, bool first_order,
    bool need_grad, bool keep_grad, const std::optional<at::Tensor>& rates,
    at::OptionalIntArrayRef adapt_layers, bool /*need_rate_grad*/) {
  constexpr const char* op = "pymaml::maml_loss";
  refuse_rule(op, rates, adapt_layers);
  need_grad = need_grad && !keep_grad;
  const c10::DeviceGuard guard(params_in.device());
  const OpArgs a = check_op_args(op, sizes, inner_lr, steps, activation, loss, params_in, xs_in,
                                 ys_in, xq_in, yq_in);
  const OpConfig& c = a.config;
  const int64_t T = a.T, K = a.K, Q = a.Q;
  const at::Tensor &params = a.params, &xs = a.xs, &ys = a.ys, &xq = a.xq, &yq = a.yq;
  const Problem pb = make_problem(c, T, K, Q);
  at::Tensor meta_grad = at::empty({need_grad ? c.shape.num_params : 0}, params.options());
  at::Tensor mean_loss = at::empty({}, params.options());
  AT_DISPATCH_FLOATING_TYPES(params.scalar_type(), "pymaml_maml_loss_cuda", [&] {
    const LaunchPlan plan = plan_or_throw<scalar_t>(op, Op::MamlLoss, pb, need_grad);
    const at::Tensor scratch = buffer(plan.scratch_elems, params);
    const at::Tensor partial = buffer(plan.partial_elems, params);
    check_cuda(op, cuda::maml_loss<scalar_t>(
                       pb, plan, ptr<scalar_t>(params), ptr<scalar_t>(xs), ptr<scalar_t>(ys),
                       ptr<scalar_t>(xq), ptr<scalar_t>(yq), first_order, need_grad,
                       ptr<scalar_t>(scratch), ptr<scalar_t>(partial), ptr<scalar_t>(mean_loss),
                       ptr<scalar_t>(meta_grad), current_stream(params.device())));
  });
  if (keep_grad) return {mean_loss};
  return {mean_loss, meta_grad};
}

}  // namespace

TORCH_LIBRARY_IMPL(pymaml, CUDA, m) {
  m.impl("adapt", &adapt_op);
  m.impl("adapt_backward", &adapt_backward_op);
  m.impl("maml_loss", &maml_loss_op);
}

}  // namespace pymaml::cuda
