// Validation of the pymaml ops' arguments, shared by every backend's torch-aware layer.
// Each check names the op and the argument, and says what was expected.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/ArrayRef.h>
#include <c10/util/OptionalArrayRef.h>

#include <optional>
#include <string_view>

#include "maml_math.h"

namespace pymaml {

// Hyper-parameters common to every op, parsed and checked once.
struct OpConfig {
  MlpShape shape;
  Activation activation;
  Loss loss;
  int64_t steps;
  double inner_lr;
  // The inner rule (check_rule, docs/design.md §8.1-§8.2); a plain call keeps the defaults.
  uint32_t frozen = 0;      // bit l: linear layer l does not move in the inner loop
  int first_adapted = 0;    // the lowest layer that moves
  int64_t rate_rows = 0;    // rows R of the rates tensor [R, P]; 0: the scalar inner_lr
};

constexpr int64_t kMaxSteps = 100;
// Widths are a sanity bound, not a buffer size (every workspace is sized from the call's
// shapes): 2048 admits images flattened to inputs (Omniglot's 784) and 1024-wide layers.
constexpr int64_t kMaxWidth = 2048;

OpConfig parse_config(const char* op, c10::IntArrayRef sizes, double inner_lr, int64_t steps,
                      std::string_view activation, std::string_view loss);

// params: [P] float32 or float64, P matching the sizes, inner_lr finite in that dtype.
void check_params(const char* op, const at::Tensor& params, const OpConfig& config);

// x: [T, K, n_in], y: [T, K, n_out], same dtype and device as params, K >= 1.
// Returns K. `T` is the task count every batch must share (the first batch sets it if < 0).
int64_t check_batch(const char* op, const char* x_name, const at::Tensor& x, const char* y_name,
                    const at::Tensor& y, const at::Tensor& params, const MlpShape& shape,
                    int64_t& T);

// The support set: x_support [T, K, n_in], y_support [T, K, n_out], every inner step's batch;
// or, when `allow_per_step`, [T, steps, K, features]: a batch of its own per inner step
// (docs/design.md §8.4; steps >= 1). Returns K; sets `per_step`.
int64_t check_support(const char* op, const at::Tensor& xs, const at::Tensor& ys,
                      const at::Tensor& params, const OpConfig& config, bool allow_per_step,
                      int64_t& T, bool& per_step);

// grad: [T, P], the dtype and device of params (adapt_backward's cotangent).
void check_adapt_grad(const char* op, const at::Tensor& grad, const at::Tensor& params,
                      int64_t T, int64_t P);

// One op's arguments, checked, with every tensor made contiguous: what each backend's kernel
// starts from. T tasks, K support and Q query points.
struct OpArgs {
  OpConfig config;
  int64_t T = -1, K = 0, Q = 0;
  // Per-step support batches: step k reads points [k * batch_stride, + K) of a task's support
  // (0: one batch for every step), which holds support_batches * K points.
  int64_t batch_stride = 0, support_batches = 1;
  at::Tensor params, xs, ys, xq, yq, grad, rates;
};

// Checks an op's arguments: adapt passes (params, xs, ys); maml_loss also the query batch
// (xq, yq); adapt_backward the cotangent grad. An undefined tensor is an argument the op does
// not have. allow_per_step: the kernels take a support batch per inner step (check_support).
OpArgs check_op_args(const char* op, c10::IntArrayRef sizes, double inner_lr, int64_t steps,
                     std::string_view activation, std::string_view loss,
                     const at::Tensor& params, const at::Tensor& xs, const at::Tensor& ys,
                     const at::Tensor& xq = at::Tensor(), const at::Tensor& yq = at::Tensor(),
                     const at::Tensor& grad = at::Tensor(), bool allow_per_step = false);

// The inner rule's arguments (ops.cpp), into `a` after check_op_args: adapt_layers (None: every
// layer moves) the distinct linear layers that move in the inner loop (negative indices count
// from the last), at least one; rates (None: the scalar inner_lr) [R, P] with R = 1 (every
// step) or steps, the dtype and device of params, finite.
void check_rule(const char* op, OpArgs& a, const std::optional<at::Tensor>& rates,
                at::OptionalIntArrayRef adapt_layers);

// The inner_lr to parse: a call with rates does not read it (nor check it).
inline double scalar_lr(double inner_lr, const std::optional<at::Tensor>& rates) {
  return rates.has_value() ? 0.0 : inner_lr;
}

}  // namespace pymaml
