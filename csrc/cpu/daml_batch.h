// The CPU DAML meta-gradient of one meta-batch on raw contiguous buffers, its memory reused
// across calls (blocks.h CallMemory): what daml_loss and the chunked DAML training op share
// (as meta_batch.h for MAML).
#pragma once

#include <cstdint>
#include <memory>
#include <string_view>
#include <vector>

#include <ATen/core/Tensor.h>

#include "../op_args.h"

namespace pymaml::cpu {

// A DAML network pair and inner loop: the base network's OpConfig, the loss network's shape
// and the adaptation loss (docs/design.md §8.3).
struct DamlConfig {
  OpConfig base;
  MlpShape loss_shape;
  Loss adapt_loss;
};

// Parses and checks loss_sizes (against the base network's taps) and adapt_loss.
DamlConfig parse_daml_config(const char* op, c10::IntArrayRef sizes, c10::IntArrayRef loss_sizes,
                             double inner_lr, int64_t steps, std::string_view activation,
                             std::string_view loss, std::string_view adapt_loss);

// A DAML call's arguments, checked, with contiguous tensors: T tasks, K source points per step
// (x_source [T, K, n_in], or [T, steps, K, n_in]: batch_stride K), Q query points.
struct DamlArgs {
  DamlConfig config;
  int64_t T = -1, K = 0, Q = 0, batch_stride = 0;
  at::Tensor params, loss_params, xs, xq, yq;
};

// Checks the tensors of one meta-batch against `config` (xq undefined: daml_adapt).
DamlArgs check_daml_args(const char* op, DamlConfig config, const at::Tensor& params,
                         const at::Tensor& loss_params, const at::Tensor& xs,
                         const at::Tensor& xq, const at::Tensor& yq);

template <typename scalar_t>
class DamlBatch {
 public:
  // T tasks, K source points per step, Q query points; batch_stride K: a source batch of its
  // own per inner step (xs [T, steps, K, n_in]), 0: one for every step.
  // rate_grad: run() may be asked for the gradient of learned rates (config.base.rate_rows > 0).
  DamlBatch(const DamlConfig& config, int64_t T, int64_t K, int64_t Q, int64_t batch_stride,
            bool rate_grad = false);

  // The mean query loss after adapting on the source inputs and, if `grad` is not null, the
  // mean gradients: theta's in grad [P], psi's in grad_psi [P_psi]. Bitwise the same for any
  // thread count. With config.base.rate_rows > 0, `rates` [R, P] are the inner rates and
  // `rate_grad` (with grad, the batch built with rate_grad) receives their mean gradient.
  scalar_t run(const scalar_t* theta, const scalar_t* psi, const scalar_t* xs,
               const scalar_t* xq, const scalar_t* yq, scalar_t* grad, scalar_t* grad_psi,
               const scalar_t* rates = nullptr, scalar_t* rate_grad = nullptr);

 private:
  DamlConfig config_;
  int64_t T_, K_, Q_, batch_stride_;
  int64_t rate_size_;  // R * P when the rates' gradient may be asked for, else 0
  int64_t width_;      // P + P_psi + rate_size_ + 1: a task's gradients and its loss
  int64_t blocks_;
  int64_t worker_size_;  // scratch elements per worker
};

extern template class DamlBatch<float>;
extern template class DamlBatch<double>;

}  // namespace pymaml::cpu
