// The math of the fused meta-gradient, written once (DESIGN.md §1-2).
//
// Torch-free on purpose: this header compiles under g++, under nvcc (every function is
// PYMAML_HOST_DEVICE) and in plain C++ tests. Backends (csrc/cpu, later csrc/cuda) only
// decide how tasks are spread over workers and where the workspace lives.
//
// Conventions, shared with the Python side:
//   * params are one flat vector [W0, b0, W1, b1, ...], W_l in nn.Linear's [out, in] layout;
//   * layer l maps n[l] -> n[l+1] inputs to outputs; layers 0..depth-2 are followed by the
//     hidden activation, the last one is linear;
//   * a batch of K points is row-major: X [K, n[0]], Y [K, n[depth]], layer outputs [K, n[l+1]].
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
enum class Loss : int { MSE = 0, L1 = 1 };

// ---------------------------------------------------------------------------------------------
// Architecture: layer sizes and where each layer's weights live in the flat parameter vector.
struct MlpShape {
  int depth = 0;                      // number of linear layers, 1..kMaxDepth
  int64_t n[kMaxDepth + 1] = {};      // n[0] inputs ... n[depth] outputs
  int64_t w_off[kMaxDepth] = {};      // offset of W_l in the flat params
  int64_t b_off[kMaxDepth] = {};      // offset of b_l
  int64_t out_off[kMaxDepth] = {};    // offset of layer l's output in a per-point buffer
  int64_t num_params = 0;             // P
  int64_t sum_width = 0;              // n[1] + ... + n[depth]: per-point activation storage
  int64_t max_width = 0;              // max over n[0..depth]

  PYMAML_HOST_DEVICE int64_t in(int l) const { return n[l]; }
  PYMAML_HOST_DEVICE int64_t out(int l) const { return n[l + 1]; }
  PYMAML_HOST_DEVICE int64_t n_out() const { return n[depth]; }
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
  return s;
}

// ---------------------------------------------------------------------------------------------
// Hidden activations. Derivatives are written in terms of the activation's output a = sigma(z)
// (that is all we store), matching PyTorch's backward formulas and its kink convention
// ReLU'(0) = 0; comparisons are written so that NaN propagates as in torch (relu(NaN) = NaN).
// `curv(d, a, ra)` is the second-order term D * sigma''(z) * Rz of the R-backward
// (DESIGN.md §2), expressed with Ra = sigma'(z) * Rz: for tanh sigma'' = -2 a sigma'.
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

// Losses with mean reduction over all K * n_out elements, as torch.nn.functional.
// `seed` is dLoss/dOutput times N; the caller scales by 1/N. sign(0) = 0 as torch.
template <Loss L>
struct LossFn;

template <>
struct LossFn<Loss::MSE> {
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

// ---------------------------------------------------------------------------------------------
// Per-batch buffers, each [K, sum_width] with layer l's block at K * out_off[l] ([K, n[l+1]]).
// The caller owns the memory (no allocation here, so the hot loop never allocates).
template <typename T>
struct Tape {
  T* act;    // A_l: layer outputs (post-activation for hidden layers)
  T* grad;   // G_l = dLoss/dZ_l
  T* pre;    // D_l = G_{l+1} W_{l+1} = dLoss/dA_l (hidden layers; tanh's curvature term needs it)
  T* r_act;  // R A_l: directional derivative of A_l along v (Hessian-vector product)
  T* r_grad; // R G_l
  PYMAML_HOST_DEVICE T* layer(T* buf, const MlpShape& s, int64_t K, int l) const {
    return buf + K * s.out_off[l];
  }
};

template <typename T>
PYMAML_HOST_DEVICE inline const T* layer_input(const Tape<T>& tp, const MlpShape& s,
                                                const T* X, int64_t K, int l) {
  return l == 0 ? X : tp.layer(tp.act, s, K, l - 1);
}

// Forward pass (DESIGN.md §1): Z_l = A_{l-1} W_l^T + b_l, A_l = sigma(Z_l), last layer linear.
template <typename T, Activation A>
PYMAML_HOST_DEVICE void forward(const MlpShape& s, const T* theta, const T* X, int64_t K,
                                const Tape<T>& tp) {
  for (int l = 0; l < s.depth; ++l) {
    const int64_t ni = s.in(l), no = s.out(l);
    const T* W = theta + s.w_off[l];
    const T* b = theta + s.b_off[l];
    const T* in = layer_input(tp, s, X, K, l);
    T* out = tp.layer(tp.act, s, K, l);
    const bool hidden = l + 1 < s.depth;
    for (int64_t k = 0; k < K; ++k) {
      for (int64_t i = 0; i < no; ++i) {
        T z = T(0);
        for (int64_t j = 0; j < ni; ++j) z += in[k * ni + j] * W[i * ni + j];
        z += b[i];
        out[k * no + i] = hidden ? Act<A>::f(z) : z;
      }
    }
  }
}

// Loss of the network output (after `forward`) against Y; writes G_last = dLoss/dZ_last.
template <typename T, Loss L>
PYMAML_HOST_DEVICE T loss_and_seed(const MlpShape& s, const T* Y, int64_t K, const Tape<T>& tp) {
  const int last = s.depth - 1;
  const int64_t count = K * s.n_out();
  const T* out = tp.layer(tp.act, s, K, last);
  T* G = tp.layer(tp.grad, s, K, last);
  const T inv_n = T(1) / T(count);
  T total = T(0);
  for (int64_t e = 0; e < count; ++e) {
    const T diff = out[e] - Y[e];
    total += LossFn<L>::value(diff);
    G[e] = LossFn<L>::seed(diff) * inv_n;
  }
  return total * inv_n;
}

// Backprop (DESIGN.md §2) from G_last: dW_l = G_l^T A_{l-1}, db_l = colsum G_l,
// D_{l-1} = G_l W_l, G_{l-1} = D_{l-1} * sigma'(Z_{l-1}). Writes the full gradient to dtheta.
template <typename T, Activation A>
PYMAML_HOST_DEVICE void backward(const MlpShape& s, const T* theta, const T* X, int64_t K,
                                 const Tape<T>& tp, T* dtheta) {
  for (int l = s.depth - 1; l >= 0; --l) {
    const int64_t ni = s.in(l), no = s.out(l);
    const T* W = theta + s.w_off[l];
    const T* in = layer_input(tp, s, X, K, l);
    const T* G = tp.layer(tp.grad, s, K, l);
    T* dW = dtheta + s.w_off[l];
    T* db = dtheta + s.b_off[l];
    for (int64_t e = 0; e < no * ni; ++e) dW[e] = T(0);
    for (int64_t i = 0; i < no; ++i) db[i] = T(0);
    for (int64_t k = 0; k < K; ++k) {
      for (int64_t i = 0; i < no; ++i) {
        const T g = G[k * no + i];
        db[i] += g;
        for (int64_t j = 0; j < ni; ++j) dW[i * ni + j] += g * in[k * ni + j];
      }
    }
    if (l == 0) break;
    T* D = tp.layer(tp.pre, s, K, l - 1);
    T* Gin = tp.layer(tp.grad, s, K, l - 1);
    for (int64_t k = 0; k < K; ++k) {
      for (int64_t j = 0; j < ni; ++j) D[k * ni + j] = T(0);
      for (int64_t i = 0; i < no; ++i) {
        const T g = G[k * no + i];
        for (int64_t j = 0; j < ni; ++j) D[k * ni + j] += g * W[i * ni + j];
      }
      for (int64_t j = 0; j < ni; ++j) Gin[k * ni + j] = D[k * ni + j] * Act<A>::d1(in[k * ni + j]);
    }
  }
}

// Loss, gradient and tape at theta on one batch: one forward and one backward pass.
template <typename T, Activation A, Loss L>
PYMAML_HOST_DEVICE T loss_and_grad(const MlpShape& s, const T* theta, const T* X, const T* Y,
                                   int64_t K, const Tape<T>& tp, T* dtheta) {
  forward<T, A>(s, theta, X, K, tp);
  const T value = loss_and_seed<T, L>(s, Y, K, tp);
  backward<T, A>(s, theta, X, K, tp, dtheta);
  return value;
}

// Hessian-vector product Hv of the loss at theta along v, by forward-over-reverse
// differentiation of backprop (DESIGN.md §2). The tape must hold the forward and backward of
// `loss_and_grad` at the same theta and batch.
template <typename T, Activation A, Loss L>
PYMAML_HOST_DEVICE void hvp(const MlpShape& s, const T* theta, const T* X, int64_t K,
                            const Tape<T>& tp, const T* v, T* Hv) {
  // R-forward: R Z_l = R A_{l-1} W_l^T + A_{l-1} V_l^T + v_l;  R A_l = sigma'(Z_l) R Z_l.
  for (int l = 0; l < s.depth; ++l) {
    const int64_t ni = s.in(l), no = s.out(l);
    const T* W = theta + s.w_off[l];
    const T* V = v + s.w_off[l];
    const T* vb = v + s.b_off[l];
    const T* in = layer_input(tp, s, X, K, l);
    const T* r_in = l == 0 ? nullptr : tp.layer(tp.r_act, s, K, l - 1);  // R A_0 = 0
    const T* out = tp.layer(tp.act, s, K, l);
    T* r_out = tp.layer(tp.r_act, s, K, l);
    const bool hidden = l + 1 < s.depth;
    for (int64_t k = 0; k < K; ++k) {
      for (int64_t i = 0; i < no; ++i) {
        T rz = T(0);
        if (r_in)
          for (int64_t j = 0; j < ni; ++j) rz += r_in[k * ni + j] * W[i * ni + j];
        for (int64_t j = 0; j < ni; ++j) rz += in[k * ni + j] * V[i * ni + j];
        rz += vb[i];
        r_out[k * no + i] = hidden ? Act<A>::d1(out[k * no + i]) * rz : rz;
      }
    }
  }
  // R G_last from the loss's curvature.
  {
    const int last = s.depth - 1;
    const int64_t count = K * s.n_out();
    const T inv_n = T(1) / T(count);
    const T* r_out = tp.layer(tp.r_act, s, K, last);
    T* RG = tp.layer(tp.r_grad, s, K, last);
    for (int64_t e = 0; e < count; ++e) RG[e] = LossFn<L>::curv_seed(r_out[e]) * inv_n;
  }
  // R-backward: R dW_l = R G_l^T A_{l-1} + G_l^T R A_{l-1};  R db_l = colsum R G_l;
  // R G_{l-1} = (R G_l W_l + G_l V_l) sigma'(Z_{l-1}) + (G_l W_l) sigma''(Z_{l-1}) R Z_{l-1}.
  for (int l = s.depth - 1; l >= 0; --l) {
    const int64_t ni = s.in(l), no = s.out(l);
    const T* W = theta + s.w_off[l];
    const T* V = v + s.w_off[l];
    const T* in = layer_input(tp, s, X, K, l);
    const T* r_in = l == 0 ? nullptr : tp.layer(tp.r_act, s, K, l - 1);
    const T* G = tp.layer(tp.grad, s, K, l);
    const T* RG = tp.layer(tp.r_grad, s, K, l);
    T* HW = Hv + s.w_off[l];
    T* Hb = Hv + s.b_off[l];
    for (int64_t e = 0; e < no * ni; ++e) HW[e] = T(0);
    for (int64_t i = 0; i < no; ++i) Hb[i] = T(0);
    for (int64_t k = 0; k < K; ++k) {
      for (int64_t i = 0; i < no; ++i) {
        const T rg = RG[k * no + i];
        Hb[i] += rg;
        for (int64_t j = 0; j < ni; ++j) HW[i * ni + j] += rg * in[k * ni + j];
        if (r_in) {
          const T g = G[k * no + i];
          for (int64_t j = 0; j < ni; ++j) HW[i * ni + j] += g * r_in[k * ni + j];
        }
      }
    }
    if (l == 0) break;
    const T* act_in = tp.layer(tp.act, s, K, l - 1);
    const T* D = tp.layer(tp.pre, s, K, l - 1);
    T* RGin = tp.layer(tp.r_grad, s, K, l - 1);
    for (int64_t k = 0; k < K; ++k) {
      T* row = RGin + k * ni;
      for (int64_t j = 0; j < ni; ++j) row[j] = T(0);
      for (int64_t i = 0; i < no; ++i) {
        const T rg = RG[k * no + i], g = G[k * no + i];
        for (int64_t j = 0; j < ni; ++j) row[j] += rg * W[i * ni + j] + g * V[i * ni + j];
      }
      for (int64_t j = 0; j < ni; ++j) {
        const T a = act_in[k * ni + j];
        row[j] = row[j] * Act<A>::d1(a);
        if (Act<A>::kHasCurvature) row[j] += Act<A>::curv(D[k * ni + j], a, r_in[k * ni + j]);
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------
// One task's inner loop and meta-gradient walk. The inner learning rate is applied through
// `InnerLR` so that learned rates (per step and per parameter, Meta-SGD) change only this type.
template <typename T>
struct InnerLR {
  T value;  // scalar rate for every step and parameter
  PYMAML_HOST_DEVICE T at(int /*step*/, int64_t /*param*/) const { return value; }
};

// Per-task scratch, sized by `task_workspace_size` (elements of T).
template <typename T>
struct TaskWorkspace {
  T* thetas;  // [(S + 1), P]: theta^0 ... theta^S of the inner loop
  T* g;       // [P] the walked-back gradient
  T* tmp;     // [P] inner gradient, then the direction lr * g
  T* hv;      // [P] Hessian-vector product
  Tape<T> tape;
};

inline PYMAML_HOST_DEVICE int64_t task_workspace_size(const MlpShape& s, int64_t steps,
                                                      int64_t max_points) {
  return (steps + 1 + 3) * s.num_params + 5 * max_points * s.sum_width;
}

template <typename T>
PYMAML_HOST_DEVICE TaskWorkspace<T> carve_workspace(T* base, const MlpShape& s, int64_t steps,
                                                     int64_t max_points) {
  TaskWorkspace<T> w;
  const int64_t P = s.num_params, B = max_points * s.sum_width;
  w.thetas = base;
  w.g = w.thetas + (steps + 1) * P;
  w.tmp = w.g + P;
  w.hv = w.tmp + P;
  w.tape.act = w.hv + P;
  w.tape.grad = w.tape.act + B;
  w.tape.pre = w.tape.grad + B;
  w.tape.r_act = w.tape.pre + B;
  w.tape.r_grad = w.tape.r_act + B;
  return w;
}

// Inner loop (DESIGN.md §1): theta^{k+1} = theta^k - lr_k * grad Ls(theta^k), k = 0..S-1,
// from theta^0 = theta. Leaves theta^0..theta^S in w.thetas.
template <typename T, Activation A, Loss L>
PYMAML_HOST_DEVICE void inner_loop(const MlpShape& s, const T* theta, const T* Xs, const T* Ys,
                                   int64_t K, int64_t steps, InnerLR<T> lr,
                                   const TaskWorkspace<T>& w) {
  const int64_t P = s.num_params;
  for (int64_t p = 0; p < P; ++p) w.thetas[p] = theta[p];
  for (int64_t k = 0; k < steps; ++k) {
    const T* cur = w.thetas + k * P;
    T* next = w.thetas + (k + 1) * P;
    loss_and_grad<T, A, L>(s, cur, Xs, Ys, K, w.tape, w.tmp);
    for (int64_t p = 0; p < P; ++p) next[p] = cur[p] - lr.at(int(k), p) * w.tmp[p];
  }
}

// Meta-gradient walk (DESIGN.md §2): given w.g = dLoss/dtheta^S, for k = S-1..0,
// g <- g - H_s(theta^k) (lr_k * g). Leaves dLoss/dtheta^0 in w.g. Needs w.thetas from
// `inner_loop`. The gradient recomputed at each theta^k is also what d/d(lr_k) would need.
template <typename T, Activation A, Loss L>
PYMAML_HOST_DEVICE void walk_back(const MlpShape& s, const T* Xs, const T* Ys, int64_t K,
                                  int64_t steps, InnerLR<T> lr, const TaskWorkspace<T>& w) {
  const int64_t P = s.num_params;
  for (int64_t k = steps - 1; k >= 0; --k) {
    const T* cur = w.thetas + k * P;
    loss_and_grad<T, A, L>(s, cur, Xs, Ys, K, w.tape, w.tmp);  // tape at theta^k
    for (int64_t p = 0; p < P; ++p) w.tmp[p] = lr.at(int(k), p) * w.g[p];
    hvp<T, A, L>(s, cur, Xs, K, w.tape, w.tmp, w.hv);
    for (int64_t p = 0; p < P; ++p) w.g[p] -= w.hv[p];
  }
}

// ---------------------------------------------------------------------------------------------
// Whole-task entry points, shared by every backend.

// MAML / FO-MAML on one task: runs the inner loop on the support set, returns the query loss
// at theta^S and, if `need_grad`, leaves this task's meta-gradient dLq(theta^S)/dtheta in w.g
// (first order: the gradient at theta^S itself, each inner step's Jacobian taken as I).
template <typename T, Activation A, Loss L>
PYMAML_HOST_DEVICE T maml_task(const MlpShape& s, const T* theta, const T* Xs, const T* Ys,
                               int64_t K, const T* Xq, const T* Yq, int64_t Q, int64_t steps,
                               InnerLR<T> lr, bool first_order, bool need_grad,
                               const TaskWorkspace<T>& w) {
  inner_loop<T, A, L>(s, theta, Xs, Ys, K, steps, lr, w);
  const T* adapted = w.thetas + steps * s.num_params;
  if (!need_grad) {
    forward<T, A>(s, adapted, Xq, Q, w.tape);
    return loss_and_seed<T, L>(s, Yq, Q, w.tape);
  }
  const T query_loss = loss_and_grad<T, A, L>(s, adapted, Xq, Yq, Q, w.tape, w.g);
  if (!first_order) walk_back<T, A, L>(s, Xs, Ys, K, steps, lr, w);
  return query_loss;
}

// Vector-Jacobian product of one task's adaptation: given dOut/dtheta^S in w.g, leaves
// dOut/dtheta^0 in w.g (second order).
template <typename T, Activation A, Loss L>
PYMAML_HOST_DEVICE void adapt_vjp_task(const MlpShape& s, const T* theta, const T* Xs,
                                       const T* Ys, int64_t K, int64_t steps, InnerLR<T> lr,
                                       const TaskWorkspace<T>& w) {
  inner_loop<T, A, L>(s, theta, Xs, Ys, K, steps, lr, w);
  walk_back<T, A, L>(s, Xs, Ys, K, steps, lr, w);
}

}  // namespace pymaml
