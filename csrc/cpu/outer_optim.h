// The outer optimizer of the fused training op (train_chunk): torch.optim's SGD and Adam,
// bitwise. torch.optim runs its single-tensor implementation on CPU tensors by default
// (_default_to_fused_or_foreach picks foreach only for CUDA-like devices and never fused);
// each of its elementwise ATen ops rounds as follows on CPU (torch 2.13, measured body and
// scalar tail alike, see tests/test_train_chunk.py), and OuterOptimizer repeats exactly that
// sequence of roundings per element:
//
//   p.add_(g, alpha=a)          fma(g, a, p)           (vectorised: vec::fmadd; the scalar
//   g.add(p, alpha=wd)          fma(p, wd, g)           tail is contracted to an fma too)
//   m.lerp_(g, w)               |w| < 0.5 ? fma(w, g - m, m) : fma(w - 1, g - m, g)
//   v.mul_(b2)                  v * b2
//   v.addcmul_(g, g, value=s)   fma(s * g, g, v)
//   v.sqrt()                    MKL's vmsSqrt / vmdSqrt (VML_HA), not the correctly rounded
//                               sqrt: called through ATen (at::sqrt_out), never re-implemented
//   d / c, d.add_(eps)          plain IEEE division and addition
//   p.addcdiv_(m, d, value=s)   p + (s * m) / d
//   torch.maximum               max, NaN if either is NaN
//
// Python-side scalars (1 - beta1, lr / bias_correction1, bias_correction2 ** 0.5, ...) are
// computed in double as torch.optim computes them in Python (pow from the same libm), then
// cast to the tensor's dtype, as ATen casts a Scalar argument.
//
// Contraction: the kernels are written with std::fma where torch fuses and with no multiply
// feeding an add anywhere else, so -ffp-contract cannot change a result.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/ArrayRef.h>

#include <cstdint>
#include <string_view>

namespace pymaml::cpu {

// What torch.optim.SGD / Adam's param_group holds, parsed from the ops' `optimizer` name and
// flat `optimizer_hyper` list (layout in csrc/ops.cpp).
struct OptimizerConfig {
  enum class Kind { SGD, Adam };
  Kind kind = Kind::SGD;
  double lr = 0, weight_decay = 0;
  bool maximize = false;
  // SGD
  double momentum = 0, dampening = 0;
  bool nesterov = false;
  // Adam
  double beta1 = 0, beta2 = 0, eps = 0;
  bool amsgrad = false, decoupled_weight_decay = false;
};

// Parses and checks the optimizer arguments against params [P] and the state tensors:
//   sgd:  [] when momentum == 0, else [momentum_buffer] (after torch.optim's first step: the
//         op does not create it);
//   adam: [step, exp_avg, exp_avg_sq] (+ [max_exp_avg_sq] with amsgrad), as Adam keeps them.
OptimizerConfig parse_optimizer(const char* op, std::string_view name,
                                c10::ArrayRef<double> hyper, at::TensorList state,
                                const at::Tensor& params);

// Applies steps of the optimizer to raw params, updating the state tensors in place.
template <typename scalar_t>
class OuterOptimizer {
 public:
  OuterOptimizer(const OptimizerConfig& config, at::TensorList state, int64_t P);

  // One optimizer step: params [P] -= update(grad [P]). `grad` is used as scratch and left
  // with unspecified values.
  void step(scalar_t* params, scalar_t* grad);

 private:
  void sgd_step(scalar_t* params, scalar_t* grad);
  void adam_step(scalar_t* params, scalar_t* grad);

  OptimizerConfig c_;
  int64_t P_;
  scalar_t* momentum_buffer_ = nullptr;  // SGD with momentum
  at::Tensor step_;                      // Adam: 0-d float32 / float64 step count
  scalar_t* exp_avg_ = nullptr;          // Adam
  at::Tensor exp_avg_sq_, max_exp_avg_sq_;
  at::Tensor denom_;  // Adam: sqrt of the second moment, [P] scratch reused every step
};

extern template class OuterOptimizer<float>;
extern template class OuterOptimizer<double>;

// True when every element of x[0, n) is finite.
template <typename scalar_t>
bool all_finite(const scalar_t* x, int64_t n);

}  // namespace pymaml::cpu
