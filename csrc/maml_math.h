// The math of the fused meta-gradient, written once (docs/design.md §1-§2).
//
// Torch-free on purpose: this header compiles under g++, under nvcc (every function is
// PYMAML_HOST_DEVICE) and in plain C++ tests. Backends (csrc/cpu, csrc/cuda) only decide how
// tasks are spread over workers, where the workspace lives and how the linear-algebra backend
// LA runs its primitives: every loop over data below is an LA call (gemm, each, sum), never a
// plain loop, so that a CUDA thread block can share each one out over its threads (with a
// barrier after it) while the CPU runs it as the plain loop it stands for.
//
// Conventions, shared with the Python side:
//   * params are one flat vector [W0, b0, W1, b1, ...], W_l in nn.Linear's [out, in] layout;
//   * layer l maps n[l] -> n[l+1] inputs to outputs; layers 0..depth-2 are followed by the
//     hidden activation, the last one is linear;
//   * a batch of K points is row-major: X [K, n[0]], Y [K, n[depth]], layer outputs [K, n[l+1]].
//
// Inside a task, parameter-shaped vectors (theta^k, gradients, directions) are "extended": the
// flat params [P] followed by a transposed copy W_l^T [in, out] of every weight matrix with
// in > 1 and out > 1. Every product then reads its weights with unit stride along the output
// (the forward pass needs W^T, backprop needs W), which is what SIMD backends vectorise; the
// copies are kept exact by computing each weight gradient in both layouts (the same sums in
// the same order, so the two layouts agree bitwise). A layer with in == 1 or out == 1 needs no
// copy: W [out, in] and W^T [in, out] are then the same memory. (docs/design.md §3.2)
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define PYMAML_HOST_DEVICE __host__ __device__
#else
#define PYMAML_HOST_DEVICE
#endif

namespace pymaml {

constexpr int kMaxDepth = 8;  // linear layers

enum class Activation : int { ReLU = 0, Tanh = 1 };
enum class Loss : int { MSE = 0, L1 = 1, CrossEntropy = 2 };

// ---------------------------------------------------------------------------------------------
// Architecture: layer sizes and where each layer's weights live in the flat parameter vector.
struct MlpShape {
  int depth = 0;                      // number of linear layers, 1..kMaxDepth
  int64_t n[kMaxDepth + 1] = {};      // n[0] inputs ... n[depth] outputs
  int64_t w_off[kMaxDepth] = {};      // offset of W_l in the flat params
  int64_t b_off[kMaxDepth] = {};      // offset of b_l
  int64_t t_off[kMaxDepth] = {};      // offset of W_l^T in the extended vector (W_l if a vector)
  int64_t out_off[kMaxDepth] = {};    // offset of layer l's output in a per-point buffer
  int64_t num_params = 0;             // P
  int64_t num_ext = 0;                // E: P plus the transposed copies
  int64_t sum_width = 0;              // n[1] + ... + n[depth]: per-point activation storage
  int64_t max_width = 0;              // max over n[0..depth]

  PYMAML_HOST_DEVICE int64_t in(int l) const { return n[l]; }
  PYMAML_HOST_DEVICE int64_t out(int l) const { return n[l + 1]; }
  PYMAML_HOST_DEVICE int64_t n_out() const { return n[depth]; }
  PYMAML_HOST_DEVICE bool has_copy(int l) const { return t_off[l] != w_off[l]; }
};

// `sizes` has depth + 1 entries; the caller has checked 1 <= depth <= kMaxDepth, sizes >= 1.
inline PYMAML_HOST_DEVICE MlpShape make_shape(const int64_t* sizes, int depth) {
  MlpShape s;
  s.depth = depth;
  int64_t off = 0, act = 0;
  for (int l = 0; l <= depth; ++l) {
    s.n[l] = sizes[l];
    if (sizes[l] > s.max_width) s.max_width = sizes[l];
  }
  for (int l = 0; l < depth; ++l) {
    s.w_off[l] = off;
    off += s.n[l + 1] * s.n[l];
    s.b_off[l] = off;
    off += s.n[l + 1];
    s.out_off[l] = act;
    act += s.n[l + 1];
  }
  s.num_params = off;
  s.sum_width = act;
  for (int l = 0; l < depth; ++l) {
    const bool matrix = s.n[l] > 1 && s.n[l + 1] > 1;
    s.t_off[l] = matrix ? off : s.w_off[l];
    if (matrix) off += s.n[l] * s.n[l + 1];
  }
  s.num_ext = off;
  return s;
}

// ---------------------------------------------------------------------------------------------
// Hidden activations. Derivatives are written in terms of the activation's output a = sigma(z)
// (that is all we store), matching PyTorch's backward formulas and its kink convention
// ReLU'(0) = 0; comparisons are written so that NaN propagates as in torch (relu(NaN) = NaN).
// `curv(d, a, ra)` is the second-order term D * sigma''(z) * Rz of the R-backward
// (docs/design.md §2.2), expressed with Ra = sigma'(z) * Rz: for tanh sigma'' = -2 a sigma'.
template <Activation A>
struct Act;

template <>
struct Act<Activation::ReLU> {
  static constexpr bool kHasCurvature = false;
  template <typename T>
  static PYMAML_HOST_DEVICE T f(T z) { return z < T(0) ? T(0) : z; }
  template <typename T>
  static PYMAML_HOST_DEVICE T d1(T a) { return a <= T(0) ? T(0) : T(1); }
  template <typename T>
  static PYMAML_HOST_DEVICE T curv(T, T, T) { return T(0); }
};

template <>
struct Act<Activation::Tanh> {
  static constexpr bool kHasCurvature = true;
  template <typename T>
  static PYMAML_HOST_DEVICE T f(T z) { return std::tanh(z); }
  template <typename T>
  static PYMAML_HOST_DEVICE T d1(T a) { return T(1) - a * a; }
  template <typename T>
  static PYMAML_HOST_DEVICE T curv(T d, T a, T ra) { return d * (T(-2) * a) * ra; }
};

// Losses. MSE and L1 are elementwise, with mean reduction over all N = K * n_out elements, as
// torch.nn.functional: `seed` is dLoss/dOutput times N, the caller scales by 1/N; sign(0) = 0
// as torch. Cross-entropy is row-wise (kRowWise): each point's loss reads its whole output
// row, and the mean is over the K points (below).
template <Loss L>
struct LossFn;

template <>
struct LossFn<Loss::MSE> {
  static constexpr bool kRowWise = false;
  static constexpr bool kHasCurvature = true;  // R G = 2 R out / N
  template <typename T>
  static PYMAML_HOST_DEVICE T value(T diff) { return diff * diff; }
  template <typename T>
  static PYMAML_HOST_DEVICE T seed(T diff) { return T(2) * diff; }
  template <typename T>
  static PYMAML_HOST_DEVICE T curv_seed(T r_out) { return T(2) * r_out; }
};

template <>
struct LossFn<Loss::L1> {
  static constexpr bool kRowWise = false;
  static constexpr bool kHasCurvature = false;  // |.|'' = 0 almost everywhere
  template <typename T>
  static PYMAML_HOST_DEVICE T value(T diff) { return diff < T(0) ? -diff : diff; }
  template <typename T>
  static PYMAML_HOST_DEVICE T seed(T diff) {
    return diff > T(0) ? T(1) : (diff < T(0) ? T(-1) : T(0));
  }
  template <typename T>
  static PYMAML_HOST_DEVICE T curv_seed(T) { return T(0); }
};

// Softmax cross-entropy of one point (docs/design.md §2.6): output row z [C] (the logits), target
// row y [C] (class probabilities: one-hot, or soft; they need not sum to 1), w = sum_c y_c.
// With p = softmax(z), computed from z - max(z) so that no exp overflows,
//   loss = sum_c y_c (logsumexp(z) - z_c) = - sum_c y_c log p_c,
// and, the point's share of a mean over K points scaled in by inv_k = 1 / K,
//   seed:       dLoss/dz = (w p - y) / K,
//   curvature:  R(dLoss/dz) = w (p * r - p (p . r)) / K   along r = R z
// (the softmax's Jacobian diag(p) - p p^T applied to r). Each function works on one row and
// writes only that row of its output, so that LA can share the rows out.
template <>
struct LossFn<Loss::CrossEntropy> {
  static constexpr bool kRowWise = true;
  static constexpr bool kHasCurvature = true;

  // e[c] = exp(z_c - max z), into e; returns their sum S (so p = e / S, log p = z - max - log S).
  template <typename T>
  static PYMAML_HOST_DEVICE T shifted_exp(int64_t C, const T* z, T* e, T& max) {
    max = z[0];
    for (int64_t c = 1; c < C; ++c) max = z[c] > max ? z[c] : max;
    T sum = T(0);
    for (int64_t c = 0; c < C; ++c) {
      e[c] = std::exp(z[c] - max);
      sum += e[c];
    }
    return sum;
  }

  // Writes g = dLoss/dz of this point (seed above, 1/K included); returns its loss (without 1/K).
  template <typename T>
  static PYMAML_HOST_DEVICE T row_seed(int64_t C, const T* z, const T* y, T inv_k, T* g) {
    T max;
    const T sum = shifted_exp(C, z, g, max);
    const T log_sum = std::log(sum);
    T loss = T(0), w = T(0);
    for (int64_t c = 0; c < C; ++c) {
      loss -= y[c] * ((z[c] - max) - log_sum);  // y_c log p_c
      w += y[c];
    }
    for (int64_t c = 0; c < C; ++c) g[c] = (w * (g[c] / sum) - y[c]) * inv_k;
    return loss;
  }

  // Writes rg = R(dLoss/dz) of this point along r (curvature above, 1/K included).
  template <typename T>
  static PYMAML_HOST_DEVICE void row_curv(int64_t C, const T* z, const T* y, const T* r,
                                          T inv_k, T* rg) {
    T max;
    const T sum = shifted_exp(C, z, rg, max);
    T w = T(0), p_dot_r = T(0);
    for (int64_t c = 0; c < C; ++c) {
      rg[c] /= sum;  // p_c
      w += y[c];
      p_dot_r += rg[c] * r[c];
    }
    const T scale = w * inv_k;
    for (int64_t c = 0; c < C; ++c) rg[c] = scale * rg[c] * (r[c] - p_dot_r);
  }
};

// ---------------------------------------------------------------------------------------------
// The linear-algebra backend LA: three primitives every loop over data goes through.
//
// gemm, the one heavy primitive: a small matrix product with unit stride along the output
// columns,
//   C[m, n] = init + sum_p A[m * a_ms + p * a_ps] * B[p * ldb + n],   m < M, n < N, p < P,
// init = 0, bias[n], or C's current value; the sum over p runs in increasing order. A may be
// read transposed (a_ms = 1), which is how the weight gradients G^T A are formed. C never
// overlaps A, B or bias.
// each(n, f): f(i) for every i < n, in any order or at once: f(i) may write element i of its
// outputs and read anything no other f(j) of the same call writes.
// sum(n, f): sum over i < n of f(i) (f as for each, returning the term), the same value for
// every caller. ScalarLinalg sums in increasing order; parallel backends in a fixed order of
// their own (deterministic, but rounded differently).
// After any of them returns, its writes are visible to everything that follows (on CUDA, a
// barrier of the thread block). Backends provide faster versions with the same contract
// (csrc/cpu/simd_linalg.h, csrc/cuda/cuda_linalg.cuh); this is the plain one, for the host.
enum class Init : int { Zero, Bias, Accumulate };

struct ScalarLinalg {
  template <typename F>
  static PYMAML_HOST_DEVICE void each(int64_t n, F&& f) {
    for (int64_t i = 0; i < n; ++i) f(i);
  }

  template <typename F>
  static PYMAML_HOST_DEVICE auto sum(int64_t n, F&& f) -> decltype(f(int64_t(0))) {
    decltype(f(int64_t(0))) total(0);
    for (int64_t i = 0; i < n; ++i) total += f(i);
    return total;
  }

  template <typename T>
  static PYMAML_HOST_DEVICE void gemm(int64_t M, int64_t N, int64_t P, const T* A, int64_t a_ms,
                                     int64_t a_ps, const T* B, int64_t ldb, T* C, int64_t ldc,
                                     Init init, const T* bias) {
    for (int64_t m = 0; m < M; ++m)
      for (int64_t n = 0; n < N; ++n) {
        T acc = init == Init::Zero ? T(0) : init == Init::Bias ? bias[n] : C[m * ldc + n];
        for (int64_t p = 0; p < P; ++p) acc += A[m * a_ms + p * a_ps] * B[p * ldb + n];
        C[m * ldc + n] = acc;
      }
  }
};

// Extended copy (see the top of this file) of a flat parameter-shaped vector src [P].
// (Every function template here takes the linear-algebra backend LA, even where it does not
// call it: the CPU backend compiles this header once per instruction set, and a distinct LA
// per instruction set keeps their instantiations from being merged at link time.)
template <typename T, typename LA = ScalarLinalg>
PYMAML_HOST_DEVICE void expand_params(const MlpShape& s, const T* src, T* dst) {
  LA::each(s.num_params, [&](int64_t p) { dst[p] = src[p]; });
  for (int l = 0; l < s.depth; ++l) {
    if (!s.has_copy(l)) continue;
    const int64_t ni = s.in(l), no = s.out(l);
    const T* W = src + s.w_off[l];
    T* Wt = dst + s.t_off[l];
    LA::each(no, [&](int64_t i) {  // row i of W is column i of W^T
      for (int64_t j = 0; j < ni; ++j) Wt[j * no + i] = W[i * ni + j];
    });
  }
}

// ---------------------------------------------------------------------------------------------
// What one forward + backward pass over a batch of K points keeps, each buffer [K, sum_width]
// with layer l's block at K * out_off[l] ([K, n[l+1]]). The caller owns the memory (no
// allocation here, so the hot loop never allocates).
template <typename T>
struct Tape {
  T* act;    // A_l: layer outputs (post-activation for hidden layers)
  T* grad;   // G_l = dLoss/dZ_l
  T* pre;    // D_l = G_{l+1} W_{l+1} = dLoss/dA_l (hidden layers; tanh's curvature term needs it)
};

// Scratch of a Hessian-vector product, laid out like a Tape.
template <typename T>
struct RTape {
  T* r_act;   // R A_l: directional derivative of A_l along v
  T* r_grad;  // R G_l
};

template <typename T>
PYMAML_HOST_DEVICE inline T* layer_of(T* buf, const MlpShape& s, int64_t K, int l) {
  return buf + K * s.out_off[l];
}

template <typename T>
PYMAML_HOST_DEVICE inline const T* layer_input(const Tape<T>& tp, const MlpShape& s,
                                                const T* X, int64_t K, int l) {
  return l == 0 ? X : layer_of(tp.act, s, K, l - 1);
}

// Forward (docs/design.md §1.1): Z_l = A_{l-1} W_l^T + b_l, A_l = sigma(Z_l), last layer linear.
// theta is extended. Starts at layer `first` (the tape already holds the layers below it).
template <typename T, Activation A, typename LA = ScalarLinalg>
PYMAML_HOST_DEVICE void forward(const MlpShape& s, const T* theta, const T* X, int64_t K,
                                const Tape<T>& tp, int first = 0) {
  for (int l = first; l < s.depth; ++l) {
    const int64_t ni = s.in(l), no = s.out(l);
    const T* in = layer_input(tp, s, X, K, l);
    T* out = layer_of(tp.act, s, K, l);
    LA::gemm(K, no, ni, in, ni, int64_t(1), theta + s.t_off[l], no, out, no, Init::Bias,
             theta + s.b_off[l]);
    if (l + 1 < s.depth) LA::each(K * no, [&](int64_t e) { out[e] = Act<A>::f(out[e]); });
  }
}

// Loss of the network output (after `forward`) against Y (null: against 0, DAML's adaptation
// loss of the loss network's output; elementwise losses only); writes G_last = dLoss/dZ_last.
template <typename T, Loss L, typename LA = ScalarLinalg>
PYMAML_HOST_DEVICE T loss_and_seed(const MlpShape& s, const T* Y, int64_t K, const Tape<T>& tp) {
  if constexpr (LossFn<L>::kRowWise) {  // cross-entropy: the mean over the K points (rows)
    const int64_t C = s.n_out();
    const T* out = layer_of(tp.act, s, K, s.depth - 1);
    T* G = layer_of(tp.grad, s, K, s.depth - 1);
    const T inv_k = T(1) / T(K);
    const T total = LA::sum(K, [&](int64_t k) {
      return LossFn<L>::row_seed(C, out + k * C, Y + k * C, inv_k, G + k * C);
    });
    return total * inv_k;
  } else {  // elementwise: the mean over the K * n_out entries
    const int last = s.depth - 1;
    const int64_t count = K * s.n_out();
    const T* out = layer_of(tp.act, s, K, last);
    T* G = layer_of(tp.grad, s, K, last);
    const T inv_n = T(1) / T(count);
    const T total = LA::sum(count, [&](int64_t e) {
      const T diff = Y ? out[e] - Y[e] : out[e];
      G[e] = LossFn<L>::seed(diff) * inv_n;
      return LossFn<L>::value(diff);
    });
    return total * inv_n;
  }
}

// dW_l = G^T In [out, in] into dtheta's W_l, and In^T G into its transposed copy if it has one
// (and `copy`: a frozen layer's copy is never read, §8.2); db_l = column sums of G. Shared by
// backprop (G_l, A_{l-1}) and the R-backward.
// A backend may offer transpose(rows, cols, src, dst) and transposed_copy_pays(K, in, out)
// (csrc/cpu/simd_linalg.h): the copy is then, where that says it pays, the transposition of
// the [out, in] result (which already holds the Init::Accumulate sum), not a product of its
// own: the same values (the two products agree bitwise), without the second product's K
// multiply-adds per entry.
template <typename LA>
PYMAML_HOST_DEVICE constexpr auto has_transpose(int) -> decltype(&LA::transposed_copy_pays, true) {
  return true;
}
template <typename LA>
PYMAML_HOST_DEVICE constexpr bool has_transpose(...) { return false; }

template <typename T, typename LA>
PYMAML_HOST_DEVICE void weight_grad(const MlpShape& s, int l, int64_t K, const T* G,
                                    const T* In, T* dtheta, Init init, bool copy = true) {
  const int64_t ni = s.in(l), no = s.out(l);
  LA::gemm(no, ni, K, G, int64_t(1), no, In, ni, dtheta + s.w_off[l], ni, init, (const T*)nullptr);
  if (!copy || !s.has_copy(l)) return;
  if constexpr (has_transpose<LA>(0)) {
    if (LA::transposed_copy_pays(K, ni, no))
      return LA::transpose(no, ni, dtheta + s.w_off[l], dtheta + s.t_off[l]);
  }
  LA::gemm(ni, no, K, In, int64_t(1), ni, G, no, dtheta + s.t_off[l], no, init,
           (const T*)nullptr);
}

// out[i] = sum_k G[k, i], as the product ones[1, K] G[K, n] (vectorised like the rest).
template <typename T, typename LA>
PYMAML_HOST_DEVICE void column_sums(int64_t K, int64_t n, const T* G, T* out) {
  const T one = T(1);
  LA::gemm(int64_t(1), n, K, &one, int64_t(0), int64_t(0), G, n, out, n, Init::Zero,
           (const T*)nullptr);
}

// Taps (DAML, docs/design.md §8.3): a per-point vector u = [A_last, A_{depth-2}, ..., A_0]
// (the output, then the hidden layers from the last to the first), [K, sum_width] row-major,
// read by another network. Layer l's block starts at column tap_offset(s, l).
inline PYMAML_HOST_DEVICE int64_t tap_offset(const MlpShape& s, int l) {
  return s.sum_width - s.out_off[l] - s.out(l);
}

// dst[k, i] (+)= taps[k, tap_offset(l) + i]: layer l's block of the taps, [K, n[l+1]].
template <typename T, typename LA>
PYMAML_HOST_DEVICE void tap_block(const MlpShape& s, int l, int64_t K, const T* taps, T* dst,
                                  bool add) {
  const int64_t no = s.out(l), off = tap_offset(s, l), ld = s.sum_width;
  if (add) LA::each(K * no, [&](int64_t e) { dst[e] += taps[(e / no) * ld + off + e % no]; });
  else LA::each(K * no, [&](int64_t e) { dst[e] = taps[(e / no) * ld + off + e % no]; });
}

// Backprop (docs/design.md §2.1) from G_last: dW_l = G_l^T A_{l-1}, db_l = colsum G_l,
// D_{l-1} = G_l W_l, G_{l-1} = D_{l-1} * sigma'(Z_{l-1}). Writes the (extended) gradient of
// layers `last`..depth-1 to dtheta and stops there (the layers below are frozen: §8.2);
// dtheta's entries of the layers below are left as they were. `taps` (DAML): the loss also
// reads the hidden layers, dLoss/dA_l += taps' block of layer l (D_l holds the sum).
// The transposed copies of layers below `copies_from` are not written (frozen layers: §8.2).
template <typename T, Activation A, typename LA = ScalarLinalg>
PYMAML_HOST_DEVICE void backward(const MlpShape& s, const T* theta, const T* X, int64_t K,
                                 const Tape<T>& tp, T* dtheta, int last = 0,
                                 const T* taps = nullptr, int copies_from = 0) {
  for (int l = s.depth - 1; l >= last; --l) {
    const int64_t ni = s.in(l), no = s.out(l);
    const T* in = layer_input(tp, s, X, K, l);
    const T* G = layer_of(tp.grad, s, K, l);
    weight_grad<T, LA>(s, l, K, G, in, dtheta, Init::Zero, l >= copies_from);
    column_sums<T, LA>(K, no, G, dtheta + s.b_off[l]);
    if (l == last) break;
    T* D = layer_of(tp.pre, s, K, l - 1);
    T* Gin = layer_of(tp.grad, s, K, l - 1);
    LA::gemm(K, ni, no, G, no, int64_t(1), theta + s.w_off[l], ni, D, ni, Init::Zero,
             (const T*)nullptr);
    if (taps) tap_block<T, LA>(s, l - 1, K, taps, D, true);
    LA::each(K * ni, [&](int64_t e) { Gin[e] = D[e] * Act<A>::d1(in[e]); });
  }
}

// Loss, gradient and tape at theta on one batch: one forward and one backward pass.
// `first`: the forward starts there (the tape holds the layers below); `last`: the backward
// stops there (the gradient of the layers below is not written); `copies_from` as backward.
template <typename T, Activation A, Loss L, typename LA = ScalarLinalg>
PYMAML_HOST_DEVICE T loss_and_grad(const MlpShape& s, const T* theta, const T* X, const T* Y,
                                   int64_t K, const Tape<T>& tp, T* dtheta, int first = 0,
                                   int last = 0, int copies_from = 0) {
  forward<T, A, LA>(s, theta, X, K, tp, first);
  const T value = loss_and_seed<T, L, LA>(s, Y, K, tp);
  backward<T, A, LA>(s, theta, X, K, tp, dtheta, last, (const T*)nullptr, copies_from);
  return value;
}

// Hessian-vector product Hv of the loss at theta along v (both extended), by forward-over-
// reverse differentiation of backprop (docs/design.md §2.2), in three parts: r_forward, the
// loss's curvature (R G_last), r_backward. The tape must hold the forward and backward of
// `loss_and_grad` at the same theta and batch, the backward down to layer `l0`.
// v must be zero on the layers below l0 (frozen, §8.2): then R A_l = 0 below l0, so the
// R-forward starts at l0, and below it the R-backward is a plain backprop of R G (which still
// reaches layer 0: the frozen layers' entries of Hv carry the meta-gradient into them).

// R-forward: R Z_l = A_{l-1} V_l^T + v_l + R A_{l-1} W_l^T;  R A_l = sigma'(Z_l) R Z_l.
template <typename T, Activation A, typename LA = ScalarLinalg>
PYMAML_HOST_DEVICE void r_forward(const MlpShape& s, const T* theta, const T* X, int64_t K,
                                  const Tape<T>& tp, const RTape<T>& rt, const T* v, int l0 = 0) {
  for (int l = l0; l < s.depth; ++l) {
    const int64_t ni = s.in(l), no = s.out(l);
    const T* in = layer_input(tp, s, X, K, l);
    const T* out = layer_of(tp.act, s, K, l);
    T* r_out = layer_of(rt.r_act, s, K, l);
    LA::gemm(K, no, ni, in, ni, int64_t(1), v + s.t_off[l], no, r_out, no, Init::Bias,
             v + s.b_off[l]);
    if (l > l0)  // R A_{l0 - 1} = 0
      LA::gemm(K, no, ni, layer_of(rt.r_act, s, K, l - 1), ni, int64_t(1), theta + s.t_off[l],
               no, r_out, no, Init::Accumulate, (const T*)nullptr);
    if (l + 1 < s.depth)
      LA::each(K * no, [&](int64_t e) { r_out[e] = Act<A>::d1(out[e]) * r_out[e]; });
  }
}

// R-backward from R G_last (already in rt.r_grad): R dW_l = R G_l^T A_{l-1} + G_l^T R A_{l-1};
// R db_l = colsum R G_l;
// R G_{l-1} = (R G_l W_l + G_l V_l) sigma'(Z_{l-1}) + (G_l W_l) sigma''(Z_{l-1}) R Z_{l-1}.
// `r_taps` (DAML): R of the taps' gradient, added to R(G_l W_l) as backward adds the taps
// (D_{l-1} in the tape then holds the sum, as the curvature term needs).
// frozen_acc (with l0 > 0): stops at layer l0 and adds R G_{l0-1} [K, n[l0]] to frozen_acc
// instead of running below it; Hv's entries of the layers below l0 are then not written:
// below l0 it is linear in R G_{l0-1}, with weights and activations that do not change from
// step to step, so the walk runs it once, on the sum (frozen_backprop).
template <typename T, Activation A, typename LA = ScalarLinalg>
PYMAML_HOST_DEVICE void r_backward(const MlpShape& s, const T* theta, const T* X, int64_t K,
                                   const Tape<T>& tp, const RTape<T>& rt, const T* v, T* Hv,
                                   int l0 = 0, T* frozen_acc = nullptr,
                                   const T* r_taps = nullptr) {
  for (int l = s.depth - 1; l >= 0; --l) {
    const int64_t ni = s.in(l), no = s.out(l);
    const T* in = layer_input(tp, s, X, K, l);
    const T* G = layer_of(tp.grad, s, K, l);
    const T* RG = layer_of(rt.r_grad, s, K, l);
    weight_grad<T, LA>(s, l, K, RG, in, Hv, Init::Zero);
    column_sums<T, LA>(K, no, RG, Hv + s.b_off[l]);
    if (l == 0) break;
    const bool moving_in = l - 1 >= l0;  // R A_{l-1} != 0, and the tape has G_l, D_{l-1}
    const T* r_in = layer_of(rt.r_act, s, K, l - 1);
    if (moving_in) weight_grad<T, LA>(s, l, K, G, r_in, Hv, Init::Accumulate);
    T* RGin = layer_of(rt.r_grad, s, K, l - 1);
    LA::gemm(K, ni, no, RG, no, int64_t(1), theta + s.w_off[l], ni, RGin, ni, Init::Zero,
             (const T*)nullptr);
    if (l >= l0)  // V_l = 0 below l0
      LA::gemm(K, ni, no, G, no, int64_t(1), v + s.w_off[l], ni, RGin, ni, Init::Accumulate,
               (const T*)nullptr);
    if (r_taps) tap_block<T, LA>(s, l - 1, K, r_taps, RGin, true);
    const T* act_in = layer_of(tp.act, s, K, l - 1);
    const T* D = layer_of(tp.pre, s, K, l - 1);
    if (Act<A>::kHasCurvature && moving_in) {
      LA::each(K * ni, [&](int64_t e) {
        const T a = act_in[e];
        RGin[e] = RGin[e] * Act<A>::d1(a);
        RGin[e] += Act<A>::curv(D[e], a, r_in[e]);
      });
    } else {
      LA::each(K * ni, [&](int64_t e) { RGin[e] = RGin[e] * Act<A>::d1(act_in[e]); });
    }
    if (frozen_acc && l == l0) {
      LA::each(K * ni, [&](int64_t e) { frozen_acc[e] += RGin[e]; });
      break;
    }
  }
}

// MAML's Hessian-vector product of the supervised loss L on the batch (X, Y) (see r_backward
// for l0, frozen_acc). Only a row-wise loss reads Y (its curvature depends on the targets).
template <typename T, Activation A, Loss L, typename LA = ScalarLinalg>
PYMAML_HOST_DEVICE void hvp(const MlpShape& s, const T* theta, const T* X, const T* Y, int64_t K,
                            const Tape<T>& tp, const RTape<T>& rt, const T* v, T* Hv,
                            int l0 = 0, T* frozen_acc = nullptr) {
  r_forward<T, A, LA>(s, theta, X, K, tp, rt, v, l0);
  // R G_last from the loss's curvature.
  const int last = s.depth - 1;
  const T* r_out = layer_of(rt.r_act, s, K, last);
  T* RG = layer_of(rt.r_grad, s, K, last);
  if constexpr (LossFn<L>::kRowWise) {  // cross-entropy, row by row from the logits (tape)
    const int64_t C = s.n_out();
    const T* out = layer_of(tp.act, s, K, last);
    const T inv_k = T(1) / T(K);
    LA::each(K, [&](int64_t k) {
      LossFn<L>::row_curv(C, out + k * C, Y + k * C, r_out + k * C, inv_k, RG + k * C);
    });
  } else {
    const int64_t count = K * s.n_out();
    const T inv_n = T(1) / T(count);
    LA::each(count, [&](int64_t e) { RG[e] = LossFn<L>::curv_seed(r_out[e]) * inv_n; });
  }
  r_backward<T, A, LA>(s, theta, X, K, tp, rt, v, Hv, l0, frozen_acc);
}

// The R-backward below l0 (see hvp's frozen_acc) on RG = the sum over steps of R G_{l0-1}:
// writes Hv's entries of layers 0..l0-1, not their transposed copies, which nothing reads
// (R dW_l = R G_l^T A_{l-1}, R G_{l-1} = R G_l W_l
// sigma'(Z_{l-1}): R A = 0 there, so no other term). theta and the tape: any step's (the
// frozen layers and their activations are the same at every step).
template <typename T, Activation A, typename LA = ScalarLinalg>
PYMAML_HOST_DEVICE void frozen_backprop(const MlpShape& s, const T* theta, const T* X, int64_t K,
                                        const Tape<T>& tp, const RTape<T>& rt, const T* RG,
                                        int l0, T* Hv) {
  for (int l = l0 - 1; l >= 0; --l) {
    const int64_t ni = s.in(l), no = s.out(l);
    weight_grad<T, LA>(s, l, K, RG, layer_input(tp, s, X, K, l), Hv, Init::Zero, false);
    column_sums<T, LA>(K, no, RG, Hv + s.b_off[l]);
    if (l == 0) break;
    T* RGin = layer_of(rt.r_grad, s, K, l - 1);
    LA::gemm(K, ni, no, RG, no, int64_t(1), theta + s.w_off[l], ni, RGin, ni, Init::Zero,
             (const T*)nullptr);
    const T* act_in = layer_of(tp.act, s, K, l - 1);
    LA::each(K * ni, [&](int64_t e) { RGin[e] = RGin[e] * Act<A>::d1(act_in[e]); });
    RG = RGin;
  }
}

// ---------------------------------------------------------------------------------------------
// One task's inner loop and meta-gradient walk, with the inner rule of docs/design.md §8.1:
// a rate per step and per parameter, alpha[k, p], and frozen layers that do not move.

// The inner rule. `rates` (if not null) holds the rates extended like theta ([R, E], row k at
// k * step_stride: step_stride 0 shares one row among the steps); null means `value` for every
// step and parameter. Layer l is frozen when bit l of `frozen` is set; `first_adapted` is the
// lowest layer that moves (the forward below it is the same at every step, the inner backward
// stops at it). The rates of frozen layers are never read.
template <typename T>
struct InnerLR {
  T value;  // the rate of every step and parameter when `rates` is null
  const T* rates = nullptr;
  int64_t step_stride = 0;
  uint32_t frozen = 0;
  int first_adapted = 0;
  PYMAML_HOST_DEVICE bool moves(int l) const { return !((frozen >> l) & 1u); }
};

// Calls f(first, count, moves) for each piece of the extended vector that holds layer l's
// parameters: [W_l, b_l], then W_l^T if the layer has a copy.
template <typename F>
PYMAML_HOST_DEVICE void layer_pieces(const MlpShape& s, int l, F&& f) {
  f(s.w_off[l], s.out(l) * (s.in(l) + 1));
  if (s.has_copy(l)) f(s.t_off[l], s.out(l) * s.in(l));
}

// Calls f(first, count, moves) over the extended vector: one piece when no layer is frozen,
// else each layer's pieces (layer_pieces) with whether the layer moves.
template <typename T, typename F>
PYMAML_HOST_DEVICE void rate_pieces(const MlpShape& s, const InnerLR<T>& lr, F&& f) {
  if (!lr.frozen) return f(int64_t(0), s.num_ext, true);
  for (int l = 0; l < s.depth; ++l)
    layer_pieces(s, l, [&](int64_t p0, int64_t n) { f(p0, n, lr.moves(l)); });
}

// out[p] = in[p] - rate_k[p] * grad[p] (SGD step k: step) or out[p] = rate_k[p] * in[p]
// (the walk's direction; grad unused) over the whole extended vector; on frozen layers
// out = in (step) or 0 (direction), without reading their grad or rate.
template <typename T, typename LA>
PYMAML_HOST_DEVICE void apply_rates(const MlpShape& s, const InnerLR<T>& lr, int64_t k,
                                    bool step, const T* in, const T* grad, T* out) {
  const T* r = lr.rates ? lr.rates + k * lr.step_stride : nullptr;
  const T v = lr.value;
  rate_pieces(s, lr, [&](int64_t p0, int64_t n, bool moves) {
    const T* x = in + p0;
    T* y = out + p0;
    if (!moves) {
      if (step) LA::each(n, [&](int64_t i) { y[i] = x[i]; });
      else LA::each(n, [&](int64_t i) { y[i] = T(0); });
    } else if (step) {
      const T* d = grad + p0;
      if (r) LA::each(n, [&](int64_t i) { y[i] = x[i] - r[p0 + i] * d[i]; });
      else LA::each(n, [&](int64_t i) { y[i] = x[i] - v * d[i]; });
    } else {
      if (r) LA::each(n, [&](int64_t i) { y[i] = r[p0 + i] * x[i]; });
      else LA::each(n, [&](int64_t i) { y[i] = v * x[i]; });
    }
  });
}

// The walk's update after step k + 1's Hessian-vector product, in one pass: g -= hv, and the
// direction of step k, dir = rate_k * g (0 on frozen layers, whose g still takes the update).
template <typename T, typename LA>
PYMAML_HOST_DEVICE void walk_update(const MlpShape& s, const InnerLR<T>& lr, int64_t k, T* g,
                                    const T* hv, T* dir) {
  const T* r = lr.rates ? lr.rates + k * lr.step_stride : nullptr;
  const T v = lr.value;
  rate_pieces(s, lr, [&](int64_t p0, int64_t n, bool moves) {
    T* x = g + p0;
    const T* h = hv + p0;
    T* y = dir + p0;
    if (!moves) {
      LA::each(n, [&](int64_t i) {
        x[i] -= h[i];
        y[i] = T(0);
      });
    } else if (r) {
      LA::each(n, [&](int64_t i) {
        x[i] -= h[i];
        y[i] = r[p0 + i] * x[i];
      });
    } else {
      LA::each(n, [&](int64_t i) {
        x[i] -= h[i];
        y[i] = v * x[i];
      });
    }
  });
}

// Per-task scratch, sized by `task_workspace_size` (elements of T). The inner loop keeps the
// tape of every step, so the walk back never recomputes a forward or backward pass.
template <typename T>
struct TaskWorkspace {
  const T* theta0;  // theta^0 = the shared initialisation, extended (set by the caller)
  T* thetas;     // [S, E]: theta^1 ... theta^S of the inner loop, extended
  T* g;          // [E] the walked-back gradient
  T* tmp;        // [E] inner gradient, then the direction lr * g
  T* hv;         // [E] Hessian-vector product
  T* tapes;      // [S + 1, 3, B]: the tape at each theta^k (k < S) and the query pass (S)
  int64_t tape_stride;  // B = max_points * sum_width
  RTape<T> rtape;       // [2, B]
  // With keep_grads: [S, E], the inner gradient of every step (the rates' gradient needs
  // them in the walk); null: each step's gradient goes to tmp.
  T* grads = nullptr;
  // Set by the caller to get the rates' gradient: [R, P] (R rows as InnerLR's rates), to
  // which the walk adds - sum_k g_{k+1}[p] grad_k[p] per row (§8.1): the caller zeroes it,
  // or lets the tasks of a block accumulate into one sum.
  T* rate_grad = nullptr;
  PYMAML_HOST_DEVICE const T* theta(int64_t k, const MlpShape& s) const {
    return k == 0 ? theta0 : thetas + (k - 1) * s.num_ext;
  }
  PYMAML_HOST_DEVICE Tape<T> tape(int64_t k) const {
    T* base = tapes + 3 * k * tape_stride;
    return Tape<T>{base, base + tape_stride, base + 2 * tape_stride};
  }
  PYMAML_HOST_DEVICE T* grad(int64_t k, const MlpShape& s) const {
    return grads ? grads + k * s.num_ext : tmp;
  }
};

inline PYMAML_HOST_DEVICE int64_t task_workspace_size(const MlpShape& s, int64_t steps,
                                                      int64_t max_points,
                                                      bool keep_grads = false) {
  const int64_t B = max_points * s.sum_width;
  return (steps + 3 + (keep_grads ? steps : 0)) * s.num_ext + (3 * (steps + 1) + 2) * B;
}

template <typename T>
PYMAML_HOST_DEVICE TaskWorkspace<T> carve_workspace(T* base, const MlpShape& s, int64_t steps,
                                                     int64_t max_points,
                                                     bool keep_grads = false) {
  TaskWorkspace<T> w;
  const int64_t E = s.num_ext, B = max_points * s.sum_width;
  w.theta0 = nullptr;
  w.thetas = base;
  w.g = w.thetas + steps * E;
  w.tmp = w.g + E;
  w.hv = w.tmp + E;
  w.tapes = w.hv + E;
  w.tape_stride = B;
  w.rtape.r_act = w.tapes + 3 * (steps + 1) * B;
  w.rtape.r_grad = w.rtape.r_act + B;
  if (keep_grads) w.grads = w.rtape.r_grad + B;
  return w;
}

// Inner loop (docs/design.md §1.2): theta^{k+1} = theta^k - alpha_k * grad Ls(theta^k),
// k = 0..S-1, from theta^0 = w.theta0. Leaves theta^1..theta^S and the tapes of
// theta^0..theta^{S-1} in w. Step k reads the K points from point k * batch_stride of Xs / Ys:
// 0 gives every step the same batch, K a batch of its own per step (docs/design.md §8.4).
// Frozen layers below lr.first_adapted: their activations are computed at step 0 and copied
// (same batch) and their gradient is never formed (§8.2).
template <typename T, Activation A, Loss L, typename LA = ScalarLinalg>
PYMAML_HOST_DEVICE void inner_loop(const MlpShape& s, const T* Xs, const T* Ys, int64_t K,
                                   int64_t steps, InnerLR<T> lr, const TaskWorkspace<T>& w,
                                   int64_t batch_stride = 0) {
  const int l0 = lr.first_adapted;
  const int64_t frozen_acts = K * s.out_off[l0];  // layers 0..l0-1 of a tape's act
  for (int64_t k = 0; k < steps; ++k) {
    const T* cur = w.theta(k, s);
    const Tape<T> tape = w.tape(k);
    int first = 0;
    if (k > 0 && batch_stride == 0 && l0 > 0) {
      const T* acts0 = w.tape(0).act;
      LA::each(frozen_acts, [&](int64_t e) { tape.act[e] = acts0[e]; });
      first = l0;
    }
    T* grad = w.grad(k, s);
    loss_and_grad<T, A, L, LA>(s, cur, Xs + k * batch_stride * s.n[0],
                               Ys + k * batch_stride * s.n_out(), K, tape, grad, first, l0);
    apply_rates<T, LA>(s, lr, k, true, cur, grad, w.thetas + k * s.num_ext);
  }
}

// The rates' gradient of step k (§8.1): rate_grad[row k] -= g[p] * grad_k[p] over the moving
// layers' flat entries, g = g_{k+1} (the walk's g before step k).
template <typename T, typename LA>
PYMAML_HOST_DEVICE void add_rate_grad(const MlpShape& s, const InnerLR<T>& lr, int64_t k,
                                      const T* g, const T* grad_k, T* rate_grad) {
  T* row = rate_grad + (lr.step_stride ? k * s.num_params : 0);
  for (int l = 0; l < s.depth; ++l) {
    if (!lr.moves(l)) continue;
    const int64_t p0 = s.w_off[l];
    LA::each(s.out(l) * (s.in(l) + 1), [&](int64_t i) { row[p0 + i] -= g[p0 + i] * grad_k[p0 + i]; });
  }
}

// Meta-gradient walk (docs/design.md §2.3): given w.g = dLoss/dtheta^S (extended), for
// k = S-1..0, g <- g - H_s(theta^k) (alpha_k * g). Leaves dLoss/dtheta^0 in w.g, and the rates'
// gradient in w.rate_grad if set. Needs the thetas and tapes of `inner_loop`, and its support
// batches (Xs, Ys) and batch_stride: step k's Hessian is that of step k's batch (only a row-wise
// loss reads Ys, for its curvature).
//
// Frozen layers below l0 = lr.first_adapted, one batch for every step: their part of each
// H_s v is deferred (hvp's frozen_acc) and formed once at the end. The sum of R G_{l0-1} is
// kept in the query tape's `pre` block, free by then.
template <typename T, Activation A, Loss L, typename LA = ScalarLinalg>
PYMAML_HOST_DEVICE void walk_back(const MlpShape& s, const T* Xs, const T* Ys, int64_t K,
                                  int64_t steps, InnerLR<T> lr, const TaskWorkspace<T>& w,
                                  int64_t batch_stride = 0) {
  const int64_t E = s.num_ext;
  const int l0 = lr.first_adapted;
  T* acc = l0 > 0 && batch_stride == 0 && steps > 0 ? w.tape(steps).pre : nullptr;
  if (acc) {
    LA::each(K * s.n[l0], [&](int64_t e) { acc[e] = T(0); });
    for (int l = 0; l < l0; ++l)  // hvp leaves these entries alone: g -= 0 there
      layer_pieces(s, l, [&](int64_t p0, int64_t n) {
        LA::each(n, [&](int64_t i) { w.hv[p0 + i] = T(0); });
      });
  }
  if (steps > 0) apply_rates<T, LA>(s, lr, steps - 1, false, w.g, (const T*)nullptr, w.tmp);
  for (int64_t k = steps - 1; k >= 0; --k) {
    if (w.rate_grad) add_rate_grad<T, LA>(s, lr, k, w.g, w.grad(k, s), w.rate_grad);
    hvp<T, A, L, LA>(s, w.theta(k, s), Xs + k * batch_stride * s.n[0],
                     Ys + k * batch_stride * s.n_out(), K, w.tape(k), w.rtape, w.tmp, w.hv, l0,
                     acc);
    if (k > 0) walk_update<T, LA>(s, lr, k - 1, w.g, w.hv, w.tmp);  // g, and the next direction
    else LA::each(E, [&](int64_t p) { w.g[p] -= w.hv[p]; });
  }
  if (!acc) return;
  frozen_backprop<T, A, LA>(s, w.theta0, Xs, K, w.tape(0), w.rtape, acc, l0, w.hv);
  for (int l = 0; l < l0; ++l)
    layer_pieces(s, l, [&](int64_t p0, int64_t n) {
      LA::each(n, [&](int64_t i) { w.g[p0 + i] -= w.hv[p0 + i]; });
    });
}

// First order: every g_{k+1} is the gradient at theta^S itself (w.g).
template <typename T, typename LA>
PYMAML_HOST_DEVICE void first_order_rate_grad(const MlpShape& s, int64_t steps,
                                              const InnerLR<T>& lr, const TaskWorkspace<T>& w) {
  for (int64_t k = steps - 1; k >= 0; --k)
    add_rate_grad<T, LA>(s, lr, k, w.g, w.grad(k, s), w.rate_grad);
}

// ---------------------------------------------------------------------------------------------
// Whole-task entry points, shared by every backend.

// Both take theta^0 extended in w.theta0 (see expand_params), shared by the tasks of a batch,
// and the support batches as inner_loop does (batch_stride). The rates' gradient needs a
// workspace carved with keep_grads and w.rate_grad set.

// MAML / FO-MAML on one task: runs the inner loop on the support set, returns the query loss
// at theta^S and, if `need_grad`, leaves this task's meta-gradient dLq(theta^S)/dtheta in
// w.g[0, P) (first order: the gradient at theta^S itself, each inner step's Jacobian taken
// as I).
template <typename T, Activation A, Loss L, typename LA = ScalarLinalg>
PYMAML_HOST_DEVICE T maml_task(const MlpShape& s, const T* Xs, const T* Ys, int64_t K,
                               const T* Xq, const T* Yq, int64_t Q, int64_t steps, InnerLR<T> lr,
                               bool first_order, bool need_grad, const TaskWorkspace<T>& w,
                               int64_t batch_stride = 0) {
  inner_loop<T, A, L, LA>(s, Xs, Ys, K, steps, lr, w, batch_stride);
  const T* adapted = w.theta(steps, s);
  const Tape<T> query = w.tape(steps);
  if (!need_grad) {
    forward<T, A, LA>(s, adapted, Xq, Q, query);
    return loss_and_seed<T, L, LA>(s, Yq, Q, query);
  }
  // The frozen layers' copies in g are never read (their direction is 0; the result is
  // g[0, P)), so the query backward leaves them out; they start at 0 rather than as whatever
  // the workspace held, so that the walk's g -= hv never computes on stale values.
  const T query_loss = loss_and_grad<T, A, L, LA>(s, adapted, Xq, Yq, Q, query, w.g, 0, 0,
                                                  lr.first_adapted);
  for (int l = 0; l < lr.first_adapted; ++l) {
    if (!s.has_copy(l)) continue;
    T* copy = w.g + s.t_off[l];
    LA::each(s.in(l) * s.out(l), [&](int64_t e) { copy[e] = T(0); });
  }
  if (!first_order) walk_back<T, A, L, LA>(s, Xs, Ys, K, steps, lr, w, batch_stride);
  else if (w.rate_grad) first_order_rate_grad<T, LA>(s, steps, lr, w);
  return query_loss;
}

// Vector-Jacobian product of one task's adaptation: given grad = dOut/dtheta^S [P], leaves
// dOut/dtheta^0 in w.g[0, P) (first order: grad itself) and the rates' gradient as maml_task.
template <typename T, Activation A, Loss L, typename LA = ScalarLinalg>
PYMAML_HOST_DEVICE void adapt_vjp_task(const MlpShape& s, const T* Xs, const T* Ys, int64_t K,
                                       int64_t steps, InnerLR<T> lr, const T* grad,
                                       const TaskWorkspace<T>& w, int64_t batch_stride = 0,
                                       bool first_order = false) {
  inner_loop<T, A, L, LA>(s, Xs, Ys, K, steps, lr, w, batch_stride);
  expand_params<T, LA>(s, grad, w.g);
  if (!first_order) walk_back<T, A, L, LA>(s, Xs, Ys, K, steps, lr, w, batch_stride);
  else if (w.rate_grad) first_order_rate_grad<T, LA>(s, steps, lr, w);
}

}  // namespace pymaml
