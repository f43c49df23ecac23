// torch.optim's SGD and Adam on raw buffers, bitwise (see outer_optim.h for each op's rounding).
#include "outer_optim.h"

#include <ATen/ops/empty.h>
#include <ATen/ops/sqrt.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <cstdlib>
#include <limits>
#include <string>
#include <type_traits>

namespace pymaml::cpu {
namespace {

// ---- the elementwise kernels ----------------------------------------------------------------
// Each is written once (always inlined) and compiled twice: as is, and inside a function
// built for AVX2+FMA, chosen at run time, so that std::fma vectorises to vfmadd instead of a
// libm call per element where the CPU has it. Both give the same bits: std::fma is exact by
// definition, and nothing else can be contracted (see outer_optim.h).

#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
#define PYMAML_FMA_CLONES 1
#define PYMAML_INLINE __attribute__((always_inline)) inline
#define PYMAML_TARGET_FMA __attribute__((target("avx2,fma")))
#else
#define PYMAML_INLINE inline
#endif

template <typename T>
struct SgdScalars {
  T neg_lr, weight_decay, momentum, one_minus_dampening;
  bool maximize, has_weight_decay, has_momentum, nesterov;
};

// params -= lr * direction, where direction is the gradient after maximize, weight decay,
// momentum and Nesterov as _single_tensor_sgd applies them.
template <typename T>
PYMAML_INLINE void sgd_kernel(const SgdScalars<T> s, int64_t P, T* __restrict p,
                              const T* __restrict g, T* __restrict buf) {
  for (int64_t i = 0; i < P; ++i) {
    T d = s.maximize ? -g[i] : g[i];
    if (s.has_weight_decay) d = std::fma(p[i], s.weight_decay, d);  // grad.add(p, alpha=wd)
    if (s.has_momentum) {
      // buf.mul_(momentum).add_(grad, alpha=1 - dampening)
      const T b = std::fma(d, s.one_minus_dampening, buf[i] * s.momentum);
      buf[i] = b;
      d = s.nesterov ? std::fma(b, s.momentum, d) : b;  // grad.add(buf, alpha=momentum)
    }
    p[i] = std::fma(d, s.neg_lr, p[i]);  // param.add_(grad, alpha=-lr)
  }
}

template <typename T>
struct AdamScalars {
  T weight_decay, decay;   // L2 term, or the decoupled factor 1 - lr * wd
  T w, w_minus_1;          // lerp weight 1 - beta1
  T beta2, one_minus_beta2;
  bool maximize, l2, decoupled, lerp_small;
};

// Adam's first pass: weight decay and the two moments. The options are selects (every
// store unconditional), so the loop vectorises without unswitching on each of them.
template <typename T>
PYMAML_INLINE void adam_moments_kernel(const AdamScalars<T> s, int64_t P, T* __restrict p,
                                       const T* __restrict g, T* __restrict m,
                                       T* __restrict v) {
  for (int64_t i = 0; i < P; ++i) {
    const T g0 = s.maximize ? -g[i] : g[i];
    const T d = s.l2 ? std::fma(p[i], s.weight_decay, g0) : g0;  // grad.add(param, alpha=wd)
    p[i] = s.decoupled ? p[i] * s.decay : p[i];                  // param.mul_(1 - lr * wd)
    // exp_avg.lerp_(grad, 1 - beta1), as ATen's lerp (either branch is one fma)
    const T diff = d - m[i];
    const T small = std::fma(s.w, diff, m[i]), large = std::fma(s.w_minus_1, diff, d);
    m[i] = s.lerp_small ? small : large;
    // exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    v[i] = std::fma(s.one_minus_beta2 * d, d, v[i] * s.beta2);
  }
}

// amsgrad: torch.maximum(max_exp_avg_sq, exp_avg_sq, out=max_exp_avg_sq), NaN if either is.
template <typename T>
PYMAML_INLINE void maximum_kernel(int64_t P, T* __restrict vmax, const T* __restrict v) {
  for (int64_t i = 0; i < P; ++i) {
    const T a = vmax[i], b = v[i];
    vmax[i] = (a != a || b != b) ? std::numeric_limits<T>::quiet_NaN() : (a < b ? b : a);
  }
}

// Adam's last pass, after denom = sqrt(second moment):
// denom = denom / bias_correction2_sqrt + eps; param.addcdiv_(exp_avg, denom, value=-step_size)
template <typename T>
PYMAML_INLINE void adam_update_kernel(int64_t P, T* __restrict p, const T* __restrict m,
                                      const T* __restrict denom, T bc2_sqrt, T eps,
                                      T neg_step_size) {
  for (int64_t i = 0; i < P; ++i) {
    const T den = denom[i] / bc2_sqrt + eps;
    p[i] = p[i] + (neg_step_size * m[i]) / den;
  }
}

template <typename T>
PYMAML_INLINE bool all_finite_kernel(const T* __restrict x, int64_t n) {
  // No early exit, so that it vectorises; NaN fails the comparison.
  int bad = 0;
  for (int64_t i = 0; i < n; ++i) bad |= !(std::fabs(x[i]) <= std::numeric_limits<T>::max());
  return bad == 0;
}

template <typename T>
void sgd_portable(const SgdScalars<T> s, int64_t P, T* p, const T* g, T* buf) {
  sgd_kernel(s, P, p, g, buf);
}
template <typename T>
void adam_moments_portable(const AdamScalars<T> s, int64_t P, T* p, const T* g, T* m, T* v) {
  adam_moments_kernel(s, P, p, g, m, v);
}
template <typename T>
void maximum_portable(int64_t P, T* vmax, const T* v) {
  maximum_kernel(P, vmax, v);
}
template <typename T>
void adam_update_portable(int64_t P, T* p, const T* m, const T* denom, T bc2_sqrt, T eps,
                          T neg_step_size) {
  adam_update_kernel(P, p, m, denom, bc2_sqrt, eps, neg_step_size);
}
template <typename T>
bool all_finite_portable(const T* x, int64_t n) {
  return all_finite_kernel(x, n);
}

#ifdef PYMAML_FMA_CLONES
template <typename T>
PYMAML_TARGET_FMA void sgd_fma(const SgdScalars<T> s, int64_t P, T* p, const T* g, T* buf) {
  sgd_kernel(s, P, p, g, buf);
}
template <typename T>
PYMAML_TARGET_FMA void adam_moments_fma(const AdamScalars<T> s, int64_t P, T* p, const T* g,
                                        T* m, T* v) {
  adam_moments_kernel(s, P, p, g, m, v);
}
template <typename T>
PYMAML_TARGET_FMA void maximum_fma(int64_t P, T* vmax, const T* v) {
  maximum_kernel(P, vmax, v);
}
template <typename T>
PYMAML_TARGET_FMA void adam_update_fma(int64_t P, T* p, const T* m, const T* denom, T bc2_sqrt,
                                       T eps, T neg_step_size) {
  adam_update_kernel(P, p, m, denom, bc2_sqrt, eps, neg_step_size);
}
template <typename T>
PYMAML_TARGET_FMA bool all_finite_fma(const T* x, int64_t n) {
  return all_finite_kernel(x, n);
}

// Whether to run the AVX2+FMA clones. PYMAML_PORTABLE_KERNELS=1 in the environment forces the
// portable ones (read once), so that tests can check them on machines that have FMA.
bool cpu_has_fma() {
  static const bool has = [] {
    const char* portable = std::getenv("PYMAML_PORTABLE_KERNELS");
    if (portable != nullptr && std::string(portable) == "1") return false;
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  }();
  return has;
}
#define PYMAML_CALL(name, ...) \
  (cpu_has_fma() ? name##_fma(__VA_ARGS__) : name##_portable(__VA_ARGS__))
#else
#define PYMAML_CALL(name, ...) name##_portable(__VA_ARGS__)
#endif

// torch.optim passes these as Python floats; ATen casts a Scalar to the tensor's dtype, and
// raises where a finite value overflows it (c10's checked_convert): so does this.
template <typename T>
T cast(double x) {
  TORCH_CHECK_VALUE(!std::isfinite(x) || std::abs(x) <= double(std::numeric_limits<T>::max()),
                    "pymaml's outer optimizer: the scalar ", x, " (from its hyper-parameters) "
                    "overflows ", std::is_same_v<T, float> ? "float32" : "float64",
                    ", the dtype of params");
  return static_cast<T>(x);
}

// Python's float ** float for the finite, positive base and exponent torch.optim gives it:
// CPython's float_pow calls the C library's pow. `volatile` keeps the compiler from
// rewriting pow(x, 0.5) as sqrt(x), which may round differently.
double python_pow(double base, double exponent) {
  volatile double e = exponent;
  return std::pow(base, e);
}

void check_state_tensor(const char* op, const char* what, const at::Tensor& t,
                        const at::Tensor& params) {
  TORCH_CHECK_VALUE(t.device() == params.device() && t.scalar_type() == params.scalar_type() &&
                        t.dim() == 1 && t.size(0) == params.size(0) && t.is_contiguous(),
                    op, ": optimizer state ", what, " must be a contiguous [", params.size(0),
                    "] tensor like params (", params.scalar_type(), ", ", params.device(),
                    "), got ", t.scalar_type(), " ", t.sizes(), " on ", t.device());
}

bool flag(const char* op, const char* name, double value) {
  TORCH_CHECK_VALUE(value == 0.0 || value == 1.0, op, ": optimizer_hyper entry ", name,
                    " is a flag and must be 0 or 1, got ", value);
  return value == 1.0;
}

}  // namespace

OptimizerConfig parse_optimizer(const char* op, std::string_view name,
                                c10::ArrayRef<double> hyper, at::TensorList state,
                                const at::Tensor& params) {
  OptimizerConfig c;
  for (double h : hyper)
    TORCH_CHECK_VALUE(std::isfinite(h), op, ": optimizer_hyper must be finite, got ", hyper);
  if (name == "sgd") {
    TORCH_CHECK_VALUE(hyper.size() == 6, op, ": optimizer 'sgd' takes optimizer_hyper = [lr, "
                      "momentum, dampening, weight_decay, nesterov, maximize], got ", hyper);
    c.kind = OptimizerConfig::Kind::SGD;
    c.lr = hyper[0];
    c.momentum = hyper[1];
    c.dampening = hyper[2];
    c.weight_decay = hyper[3];
    c.nesterov = flag(op, "nesterov", hyper[4]);
    c.maximize = flag(op, "maximize", hyper[5]);
    TORCH_CHECK_VALUE(!c.nesterov || (c.momentum > 0 && c.dampening == 0), op,
                      ": Nesterov momentum requires a momentum and zero dampening");
    const size_t want = c.momentum != 0 ? 1 : 0;
    TORCH_CHECK_VALUE(state.size() == want, op, ": SGD ",
                      want ? "with momentum takes optimizer_state = [momentum_buffer]"
                           : "without momentum takes no optimizer_state",
                      ", got ", state.size(), " tensor(s)");
    if (want) check_state_tensor(op, "momentum_buffer", state[0], params);
  } else if (name == "adam") {
    TORCH_CHECK_VALUE(hyper.size() == 8, op, ": optimizer 'adam' takes optimizer_hyper = [lr, "
                      "beta1, beta2, eps, weight_decay, amsgrad, maximize, "
                      "decoupled_weight_decay], got ", hyper);
    c.kind = OptimizerConfig::Kind::Adam;
    c.lr = hyper[0];
    c.beta1 = hyper[1];
    c.beta2 = hyper[2];
    c.eps = hyper[3];
    c.weight_decay = hyper[4];
    c.amsgrad = flag(op, "amsgrad", hyper[5]);
    c.maximize = flag(op, "maximize", hyper[6]);
    c.decoupled_weight_decay = flag(op, "decoupled_weight_decay", hyper[7]);
    TORCH_CHECK_VALUE(0 <= c.beta1 && c.beta1 < 1 && 0 <= c.beta2 && c.beta2 < 1, op,
                      ": Adam's betas must be in [0, 1), got ", c.beta1, ", ", c.beta2);
    const size_t want = c.amsgrad ? 4 : 3;
    TORCH_CHECK_VALUE(state.size() == want, op, ": Adam takes optimizer_state = [step, exp_avg, "
                      "exp_avg_sq", c.amsgrad ? ", max_exp_avg_sq" : "", "], got ",
                      state.size(), " tensor(s)");
    const at::Tensor& step = state[0];
    TORCH_CHECK_VALUE(step.dim() == 0 && step.device().is_cpu() &&
                          (step.scalar_type() == at::kFloat || step.scalar_type() == at::kDouble),
                      op, ": Adam's step must be a 0-d float32 or float64 CPU tensor (as "
                      "torch.optim.Adam keeps it), got ", step.scalar_type(), " ", step.sizes(),
                      " on ", step.device());
    const char* names[] = {"step", "exp_avg", "exp_avg_sq", "max_exp_avg_sq"};
    for (size_t i = 1; i < want; ++i) check_state_tensor(op, names[i], state[i], params);
  } else {
    TORCH_CHECK_VALUE(false, op, ": optimizer must be 'sgd' or 'adam', got '",
                      std::string(name), "'");
  }
  TORCH_CHECK_VALUE(c.lr >= 0 && c.weight_decay >= 0 && c.momentum >= 0 && c.eps >= 0, op,
                    ": lr, momentum, eps and weight_decay must be >= 0, got ", hyper);
  return c;
}

template <typename scalar_t>
OuterOptimizer<scalar_t>::OuterOptimizer(const OptimizerConfig& config, at::TensorList state,
                                         int64_t P)
    : c_(config), P_(P) {
  if (c_.kind == OptimizerConfig::Kind::SGD) {
    if (c_.momentum != 0) momentum_buffer_ = state[0].data_ptr<scalar_t>();
    return;
  }
  step_ = state[0];
  exp_avg_ = state[1].data_ptr<scalar_t>();
  exp_avg_sq_ = state[2];
  if (c_.amsgrad) max_exp_avg_sq_ = state[3];
  denom_ = at::empty({P}, exp_avg_sq_.options());
}

template <typename scalar_t>
void OuterOptimizer<scalar_t>::step(scalar_t* params, scalar_t* grad) {
  if (c_.kind == OptimizerConfig::Kind::SGD)
    sgd_step(params, grad);
  else
    adam_step(params, grad);
}

template <typename scalar_t>
void OuterOptimizer<scalar_t>::sgd_step(scalar_t* params, scalar_t* grad) {
  using T = scalar_t;
  SgdScalars<T> s;
  s.neg_lr = cast<T>(-c_.lr);
  s.weight_decay = cast<T>(c_.weight_decay);
  s.momentum = cast<T>(c_.momentum);
  s.one_minus_dampening = cast<T>(1 - c_.dampening);
  s.maximize = c_.maximize;
  s.has_weight_decay = c_.weight_decay != 0;
  s.has_momentum = c_.momentum != 0;
  s.nesterov = c_.nesterov;
  PYMAML_CALL(sgd, s, P_, params, grad, momentum_buffer_);
}

template <typename scalar_t>
void OuterOptimizer<scalar_t>::adam_step(scalar_t* params, scalar_t* grad) {
  using T = scalar_t;
  // step_t += 1, in the step tensor's own dtype (a float32 count stops at 2**24, as torch's)
  double step;
  if (step_.scalar_type() == at::kFloat) {
    float* t = step_.data_ptr<float>();
    *t = *t + 1.0f;
    step = *t;
  } else {
    double* t = step_.data_ptr<double>();
    *t = *t + 1.0;
    step = *t;
  }
  AdamScalars<T> s;
  s.weight_decay = cast<T>(c_.weight_decay);
  s.decay = cast<T>(1 - c_.lr * c_.weight_decay);
  s.w = cast<T>(1 - c_.beta1);
  s.w_minus_1 = s.w - T(1);
  s.beta2 = cast<T>(c_.beta2);
  s.one_minus_beta2 = cast<T>(1 - c_.beta2);
  s.maximize = c_.maximize;
  s.l2 = c_.weight_decay != 0 && !c_.decoupled_weight_decay;
  s.decoupled = c_.weight_decay != 0 && c_.decoupled_weight_decay;
  s.lerp_small = std::abs(s.w) < T(0.5);  // ATen's is_lerp_weight_small
  T* v = exp_avg_sq_.data_ptr<T>();
  PYMAML_CALL(adam_moments, s, P_, params, grad, exp_avg_, v);
  if (c_.amsgrad) PYMAML_CALL(maximum, P_, max_exp_avg_sq_.data_ptr<T>(), v);

  // The bias corrections, in double as torch.optim computes them in Python.
  const double bias_correction1 = 1 - python_pow(c_.beta1, step);
  const double bias_correction2 = 1 - python_pow(c_.beta2, step);
  const double step_size = c_.lr / bias_correction1;
  const double bias_correction2_sqrt = python_pow(bias_correction2, 0.5);

  // (max_)exp_avg_sq.sqrt(): ATen's own kernel (MKL's VML on x86 builds), the one that
  // torch.optim's call runs.
  at::sqrt_out(denom_, c_.amsgrad ? max_exp_avg_sq_ : exp_avg_sq_);
  PYMAML_CALL(adam_update, P_, params, exp_avg_, denom_.data_ptr<T>(),
              cast<T>(bias_correction2_sqrt), cast<T>(c_.eps), cast<T>(-step_size));
}

template <typename scalar_t>
bool all_finite(const scalar_t* x, int64_t n) {
  return PYMAML_CALL(all_finite, x, n);
}

template class OuterOptimizer<float>;
template class OuterOptimizer<double>;
template bool all_finite<float>(const float*, int64_t);
template bool all_finite<double>(const double*, int64_t);

}  // namespace pymaml::cpu
