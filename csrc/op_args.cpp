// Argument checks of the pymaml ops (see op_args.h).
#include "op_args.h"

#include <ATen/Dispatch.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <string>

namespace pymaml {

OpConfig parse_config(const char* op, c10::IntArrayRef sizes, double inner_lr, int64_t steps,
                      std::string_view activation, std::string_view loss) {
  const int64_t depth = int64_t(sizes.size()) - 1;
  TORCH_CHECK_VALUE(depth >= 1 && depth <= kMaxDepth, op, ": sizes must list 2 to ",
                    kMaxDepth + 1, " layer widths (1 to ", kMaxDepth, " linear layers), got ",
                    sizes);
  for (int64_t n : sizes)
    TORCH_CHECK_VALUE(n >= 1 && n <= kMaxWidth, op, ": every entry of sizes must be in [1, ",
                      kMaxWidth, "], got ", sizes);
  TORCH_CHECK_VALUE(steps >= 0 && steps <= kMaxSteps, op, ": steps must be in [0, ", kMaxSteps,
                    "], got ", steps);
  TORCH_CHECK_VALUE(std::isfinite(inner_lr), op, ": inner_lr must be finite, got ", inner_lr);

  OpConfig c;
  c.shape = make_shape(sizes.data(), int(depth));
  c.steps = steps;
  c.inner_lr = inner_lr;
  if (activation == "relu")
    c.activation = Activation::ReLU;
  else if (activation == "tanh")
    c.activation = Activation::Tanh;
  else
    TORCH_CHECK_VALUE(false, op, ": activation must be 'relu' or 'tanh', got '",
                      std::string(activation), "'");
  if (loss == "mse")
    c.loss = Loss::MSE;
  else if (loss == "l1")
    c.loss = Loss::L1;
  else if (loss == "cross_entropy")
    c.loss = Loss::CrossEntropy;
  else
    TORCH_CHECK_VALUE(false, op, ": loss must be 'mse', 'l1' or 'cross_entropy', got '",
                      std::string(loss), "'");
  return c;
}

void check_params(const char* op, const at::Tensor& params, const OpConfig& config) {
  const MlpShape& shape = config.shape;
  TORCH_CHECK_VALUE(params.dim() == 1, op, ": params must be a 1-D flat tensor [P], got shape ",
                    params.sizes());
  TORCH_CHECK_TYPE(params.scalar_type() == at::kFloat || params.scalar_type() == at::kDouble,
                   op, ": params must be float32 or float64, got ", params.scalar_type());
  TORCH_CHECK_VALUE(params.size(0) == shape.num_params, op, ": params has ", params.size(0),
                    " elements but the sizes need ", shape.num_params);
  TORCH_CHECK_VALUE(params.scalar_type() != at::kFloat || std::isfinite(float(config.inner_lr)),
                    op, ": inner_lr ", config.inner_lr, " overflows float32, the dtype of params");
}

int64_t check_batch(const char* op, const char* x_name, const at::Tensor& x, const char* y_name,
                    const at::Tensor& y, const at::Tensor& params, const MlpShape& shape,
                    int64_t& T) {
  for (const auto& [name, t] : {std::pair{x_name, &x}, std::pair{y_name, &y}}) {
    TORCH_CHECK_TYPE(t->scalar_type() == params.scalar_type(), op, ": ", name,
                     " must have the dtype of params (", params.scalar_type(), "), got ",
                     t->scalar_type());
    TORCH_CHECK_VALUE(t->device() == params.device(), op, ": ", name,
                      " must be on the device of params (", params.device(), "), got ",
                      t->device());
    TORCH_CHECK_VALUE(t->dim() == 3, op, ": ", name, " must be 3-D [T, K, features], got shape ",
                      t->sizes());
  }
  TORCH_CHECK_VALUE(x.size(2) == shape.n[0], op, ": ", x_name, " must be [T, K, ", shape.n[0],
                    "] (sizes[0] inputs), got ", x.sizes());
  TORCH_CHECK_VALUE(y.size(2) == shape.n_out(), op, ": ", y_name, " must be [T, K, ",
                    shape.n_out(), "] (sizes[-1] outputs), got ", y.sizes());
  TORCH_CHECK_VALUE(x.size(1) == y.size(1), op, ": ", x_name, " and ", y_name,
                    " must have the same number of points, got ", x.sizes(), " and ", y.sizes());
  TORCH_CHECK_VALUE(x.size(1) >= 1, op, ": ", x_name, " needs at least one point, got ",
                    x.sizes());
  TORCH_CHECK_VALUE(x.size(0) == y.size(0), op, ": ", x_name, " and ", y_name,
                    " must have the same number of tasks, got ", x.sizes(), " and ", y.sizes());
  if (T < 0) T = x.size(0);
  TORCH_CHECK_VALUE(x.size(0) == T, op, ": ", x_name, " has ", x.size(0),
                    " tasks, expected ", T, " like the support set");
  TORCH_CHECK_VALUE(T >= 1, op, ": the meta-batch needs at least one task, got ", x.sizes());
  return x.size(1);
}

int64_t check_support(const char* op, const at::Tensor& xs, const at::Tensor& ys,
                      const at::Tensor& params, const OpConfig& config, bool allow_per_step,
                      int64_t& T, bool& per_step) {
  per_step = xs.dim() == 4;
  if (!per_step)
    return check_batch(op, "x_support", xs, "y_support", ys, params, config.shape, T);
  TORCH_CHECK_VALUE(allow_per_step, op, ": x_support [T, steps, K, features] (a batch per inner "
                    "step) runs on the CPU kernels only, got shape ", xs.sizes());
  TORCH_CHECK_VALUE(ys.dim() == 4, op, ": y_support must be 4-D [T, steps, K, features] like "
                    "x_support, got shape ", ys.sizes());
  TORCH_CHECK_VALUE(config.steps >= 1 && xs.size(1) == config.steps && ys.size(1) == config.steps,
                    op, ": x_support and y_support [T, steps, K, features] hold one batch per "
                    "inner step (steps = ", config.steps, ", at least 1), got ", xs.sizes(),
                    " and ", ys.sizes());
  return check_batch(op, "x_support", xs.select(1, 0), "y_support", ys.select(1, 0), params,
                     config.shape, T);
}

void check_adapt_grad(const char* op, const at::Tensor& grad, const at::Tensor& params,
                      int64_t T, int64_t P) {
  TORCH_CHECK_VALUE(grad.dim() == 2 && grad.size(0) == T && grad.size(1) == P, op,
                    ": grad must be [T, P] = [", T, ", ", P, "], got ", grad.sizes());
  TORCH_CHECK_TYPE(grad.scalar_type() == params.scalar_type(), op,
                   ": grad must have the dtype of params, got ", grad.scalar_type());
  TORCH_CHECK_VALUE(grad.device() == params.device(), op,
                    ": grad must be on the device of params (", params.device(), "), got ",
                    grad.device());
}

OpArgs check_op_args(const char* op, c10::IntArrayRef sizes, double inner_lr, int64_t steps,
                     std::string_view activation, std::string_view loss,
                     const at::Tensor& params, const at::Tensor& xs, const at::Tensor& ys,
                     const at::Tensor& xq, const at::Tensor& yq, const at::Tensor& grad,
                     bool allow_per_step) {
  OpArgs a;
  a.config = parse_config(op, sizes, inner_lr, steps, activation, loss);
  check_params(op, params, a.config);
  bool per_step = false;
  a.K = check_support(op, xs, ys, params, a.config, allow_per_step, a.T, per_step);
  if (per_step) {
    a.batch_stride = a.K;
    a.support_batches = steps;
  }
  if (xq.defined()) {
    a.Q = check_batch(op, "x_query", xq, "y_query", yq, params, a.config.shape, a.T);
    a.xq = xq.contiguous();
    a.yq = yq.contiguous();
  }
  if (grad.defined()) {
    check_adapt_grad(op, grad, params, a.T, a.config.shape.num_params);
    a.grad = grad.contiguous();
  }
  a.params = params.contiguous();
  a.xs = xs.contiguous();
  a.ys = ys.contiguous();
  return a;
}

namespace {

void check_adapt_layers(const char* op, OpConfig& c, c10::IntArrayRef adapt_layers) {
  const int64_t depth = c.shape.depth;
  TORCH_CHECK_VALUE(!adapt_layers.empty(), op, ": adapt_layers must name at least one layer");
  uint32_t moving = 0;
  for (int64_t l : adapt_layers) {
    TORCH_CHECK_VALUE(l >= -depth && l < depth, op, ": adapt_layers entries must be in [",
                      -depth, ", ", depth, ") for ", depth, " layers, got ", adapt_layers);
    const int64_t layer = l < 0 ? l + depth : l;
    TORCH_CHECK_VALUE(!((moving >> layer) & 1u), op, ": adapt_layers names layer ", layer,
                      " twice, got ", adapt_layers);
    moving |= 1u << layer;
  }
  c.frozen = ~moving & ((1u << depth) - 1u);
  while (!((moving >> c.first_adapted) & 1u)) ++c.first_adapted;
}

void check_rates(const char* op, OpArgs& a, const at::Tensor& rates) {
  OpConfig& c = a.config;
  const int64_t P = c.shape.num_params;
  TORCH_CHECK_TYPE(rates.scalar_type() == a.params.scalar_type(), op,
                   ": rates must have the dtype of params (", a.params.scalar_type(), "), got ",
                   rates.scalar_type());
  TORCH_CHECK_VALUE(rates.device() == a.params.device(), op,
                    ": rates must be on the device of params (", a.params.device(), "), got ",
                    rates.device());
  const bool rows_ok = rates.dim() == 2 && (rates.size(0) == 1 || rates.size(0) == c.steps);
  TORCH_CHECK_VALUE(rows_ok && rates.size(1) == P, op, ": rates must be [1, ", P, "] or [steps, ",
                    P, "] = [", c.steps, ", ", P, "], got ", rates.sizes());
  a.rates = rates.contiguous();
  bool finite = true;  // a plain loop: a few microseconds less than isfinite().all()
  AT_DISPATCH_FLOATING_TYPES(a.rates.scalar_type(), "pymaml_check_rates", [&] {
    const scalar_t* r = a.rates.data_ptr<scalar_t>();
    for (int64_t i = 0; i < a.rates.numel(); ++i) finite = finite && std::isfinite(r[i]);
  });
  TORCH_CHECK_VALUE(finite, op, ": rates must be finite");
  c.rate_rows = rates.size(0);  // 0 with steps = 0: no rate is read
}

}  // namespace

void check_rule(const char* op, OpArgs& a, const std::optional<at::Tensor>& rates,
                at::OptionalIntArrayRef adapt_layers) {
  if (adapt_layers.has_value()) check_adapt_layers(op, a.config, *adapt_layers);
  if (rates.has_value()) check_rates(op, a, *rates);
}

}  // namespace pymaml
