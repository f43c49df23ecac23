// The CPU meta-gradient of one meta-batch on raw contiguous buffers, its memory reused across
// calls (blocks.h CallMemory): what the per-call op (maml_loss) and the chunked training op
// share, so the hot loop of a training run does not allocate (up to CallMemory's 8 MB).
#pragma once

#include <cstdint>
#include <memory>
#include <vector>

#include "../op_args.h"

namespace pymaml::cpu {

// What a meta-batch hands the outer optimizer as its gradient (docs/design.md §1.2):
// MAML's exact meta-gradient, FO-MAML's (each inner step's Jacobian taken as I), or Reptile's
// direction theta - mean_t theta_t^S (no walk back, no query gradient).
enum class Direction { MAML, FirstOrder, Reptile };

// The inner rule of a call (maml_math.h InnerLR): the config's scalar rate and frozen layers,
// or the rates [R, P] extended into `ext` [R, E] (the kernels read W^T copies' rates too).
template <typename scalar_t>
inline InnerLR<scalar_t> inner_rule(const OpConfig& c, const scalar_t* rates, scalar_t* ext) {
  InnerLR<scalar_t> lr{scalar_t(c.inner_lr)};
  lr.frozen = c.frozen;
  lr.first_adapted = c.first_adapted;
  if (rates) {
    const int64_t P = c.shape.num_params, E = c.shape.num_ext;
    for (int64_t r = 0; r < c.rate_rows; ++r) expand_params(c.shape, rates + r * P, ext + r * E);
    lr.rates = ext;
    lr.step_stride = c.rate_rows > 1 ? E : 0;
  }
  return lr;
}

template <typename scalar_t>
class MetaBatch {
 public:
  // A meta-batch of T tasks with K support and Q query points each, for the network and inner
  // loop of `config` (already checked by parse_config). batch_stride K: a support batch of its
  // own per inner step (xs [T, steps, K, n_in]); 0: one for every step (OpArgs).
  // rate_grad: run() may be asked for the rates' gradient (config.rate_rows > 0): the
  // workspace then keeps every inner gradient and the block sums are twice as wide, which a
  // call with fixed rates (ANIL's single rate) does not pay for.
  MetaBatch(const OpConfig& config, int64_t T, int64_t K, int64_t Q, int64_t batch_stride = 0,
            bool rate_grad = false);

  // Mean query loss over the tasks after adaptation (on xs, ys). If `grad` is not null, also
  // writes the mean over tasks of `direction` [P] there. Buffers are contiguous: theta [P],
  // xs [T, K, n_in], ys [T, K, n_out], xq / yq likewise with Q points. Bitwise the same
  // result for any thread count. With config.rate_rows > 0, `rates` [R, P] are the inner
  // rates, and `rate_grad` (if not null, with grad, not Reptile; the batch built with
  // rate_grad) receives the mean over tasks of their gradient [R, P] (docs/design.md §8.1).
  scalar_t run(const scalar_t* theta, const scalar_t* xs, const scalar_t* ys,
               const scalar_t* xq, const scalar_t* yq, Direction direction, scalar_t* grad,
               const scalar_t* rates = nullptr, scalar_t* rate_grad = nullptr);

  int64_t num_params() const { return config_.shape.num_params; }

 private:
  OpConfig config_;
  int64_t T_, K_, Q_, batch_stride_;
  int64_t rate_size_;            // R * P: the rates' gradient (0 when not asked for)
  int64_t width_;                // P + rate_size_: what a task adds to its block's sum
  int64_t blocks_;               // tasks are summed in this many fixed blocks (see .cpp)
  int64_t worker_size_;          // scratch elements per worker (maml_math.h TaskWorkspace)
};

extern template class MetaBatch<float>;
extern template class MetaBatch<double>;

}  // namespace pymaml::cpu
