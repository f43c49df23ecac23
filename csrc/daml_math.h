// DAML's fused meta-gradient (docs/design.md §8.3): MAML whose inner loss is a learned network.
//
// The inner loop has no labels. A second MLP, the loss network g_psi (shape `ls`: ReLU hidden
// layers, linear output of any width m = ls.n_out()), reads at every source point the taps
// u = [A_last, A_{depth-2}, ..., A_0] of the base network (maml_math.h tap_offset) and the
// inner loss is La = mean over the points and the m outputs of |g_psi(u)| or g_psi(u)^2
// (LossFn against 0: its seeds and curvature scale by 1 / (K m)). The inner loop moves theta
// only; the outer loss is the supervised loss of the adapted base network.
//
// The walk is MAML's on the vector [theta, psi] with a zero rate on psi: g starts as
// [grad Lq(theta^S), 0] and each step subtracts the Hessian-vector product of La along
// (alpha g_theta, 0). Its theta rows are the base network's R-backward with the loss network's
// R G_u injected at the taps; its psi rows, H_{psi theta} v, are the loss network's R dW: the
// only way psi gets a gradient (DAML is second order by nature).
//
// Torch-free like maml_math.h, and built from its primitives (forward, backward, r_forward,
// r_backward with taps).
#pragma once

#include "maml_math.h"

namespace pymaml {

constexpr Activation kLossNetAct = Activation::ReLU;  // the loss network's hidden activation

// u [K, sum_width] = the taps of a per-layer buffer `layers` (act or r_act of a tape).
template <typename T, typename LA>
PYMAML_HOST_DEVICE void gather_taps(const MlpShape& s, int64_t K, const T* layers, T* u) {
  const int64_t ld = s.sum_width;
  for (int l = 0; l < s.depth; ++l) {
    const int64_t no = s.out(l), off = tap_offset(s, l);
    const T* src = layer_of(layers, s, K, l);
    LA::each(K * no, [&](int64_t e) { u[(e / no) * ld + off + e % no] = src[e]; });
  }
}

// dLoss/dInput [K, n[0]] of an MLP after its forward and loss seed: backprop of G without the
// weight gradients (psi does not move in the inner loop). Leaves G_l and D_l in the tape.
template <typename T, Activation A, typename LA>
PYMAML_HOST_DEVICE void input_grad(const MlpShape& ls, const T* psi, int64_t K,
                                   const Tape<T>& tp, T* g_in) {
  for (int l = ls.depth - 1; l >= 0; --l) {
    const int64_t ni = ls.in(l), no = ls.out(l);
    const T* G = layer_of(tp.grad, ls, K, l);
    T* D = l == 0 ? g_in : layer_of(tp.pre, ls, K, l - 1);
    LA::gemm(K, ni, no, G, no, int64_t(1), psi + ls.w_off[l], ni, D, ni, Init::Zero,
             (const T*)nullptr);
    if (l == 0) break;
    T* Gin = layer_of(tp.grad, ls, K, l - 1);
    const T* a = layer_of(tp.act, ls, K, l - 1);
    LA::each(K * ni, [&](int64_t e) { Gin[e] = D[e] * Act<A>::d1(a[e]); });
  }
}

// R-forward of an MLP whose weights stay fixed and whose input moves along r_in [K, n[0]].
template <typename T, Activation A, typename LA>
PYMAML_HOST_DEVICE void r_forward_input(const MlpShape& ls, const T* psi, int64_t K,
                                        const Tape<T>& tp, const RTape<T>& rt, const T* r_in) {
  for (int l = 0; l < ls.depth; ++l) {
    const int64_t ni = ls.in(l), no = ls.out(l);
    const T* rin = l == 0 ? r_in : layer_of(rt.r_act, ls, K, l - 1);
    T* r_out = layer_of(rt.r_act, ls, K, l);
    LA::gemm(K, no, ni, rin, ni, int64_t(1), psi + ls.t_off[l], no, r_out, no, Init::Zero,
             (const T*)nullptr);
    if (l + 1 < ls.depth) {
      const T* out = layer_of(tp.act, ls, K, l);
      LA::each(K * no, [&](int64_t e) { r_out[e] = Act<A>::d1(out[e]) * r_out[e]; });
    }
  }
}

// Its R-backward from R G_last (in rt.r_grad): R dW_l = R G_l^T A_{l-1} + G_l^T R A_{l-1} (with
// A_{-1} = in, R A_{-1} = r_in) into Hpsi's first P_psi entries, and R of dLoss/dInput into
// r_gin. Hpsi's transposed-copy slots are left unwritten: psi never moves in the inner loop,
// so only its gradient reads these rows (skipping the copies halves the weight products).
template <typename T, Activation A, typename LA>
PYMAML_HOST_DEVICE void r_backward_input(const MlpShape& ls, const T* psi, const T* in,
                                         const T* r_in, int64_t K, const Tape<T>& tp,
                                         const RTape<T>& rt, T* Hpsi, T* r_gin) {
  for (int l = ls.depth - 1; l >= 0; --l) {
    const int64_t ni = ls.in(l), no = ls.out(l);
    const T* a_in = l == 0 ? in : layer_of(tp.act, ls, K, l - 1);
    const T* ra_in = l == 0 ? r_in : layer_of(rt.r_act, ls, K, l - 1);
    const T* G = layer_of(tp.grad, ls, K, l);
    const T* RG = layer_of(rt.r_grad, ls, K, l);
    weight_grad<T, LA>(ls, l, K, RG, a_in, Hpsi, Init::Zero, false);
    column_sums<T, LA>(K, no, RG, Hpsi + ls.b_off[l]);
    weight_grad<T, LA>(ls, l, K, G, ra_in, Hpsi, Init::Accumulate, false);
    T* dst = l == 0 ? r_gin : layer_of(rt.r_grad, ls, K, l - 1);
    LA::gemm(K, ni, no, RG, no, int64_t(1), psi + ls.w_off[l], ni, dst, ni, Init::Zero,
             (const T*)nullptr);
    if (l == 0) break;
    const T* D = layer_of(tp.pre, ls, K, l - 1);
    LA::each(K * ni, [&](int64_t e) {
      dst[e] = dst[e] * Act<A>::d1(a_in[e]);
      if (Act<A>::kHasCurvature) dst[e] += Act<A>::curv(D[e], a_in[e], ra_in[e]);
    });
  }
}

// What one DAML inner step keeps at theta^k: the base tape, the taps u and the loss network's
// tape. g_u [K, sum_width] is scratch (dLa/du).
template <typename T>
struct DamlStep {
  Tape<T> base;
  T* u;
  Tape<T> loss;
};

// La and its gradient in theta (extended) at theta on the source batch X [K, n[0]].
template <typename T, Activation A, Loss AL, typename LA>
PYMAML_HOST_DEVICE T daml_inner_grad(const MlpShape& s, const MlpShape& ls, const T* theta,
                                     const T* psi, const T* X, int64_t K, const DamlStep<T>& st,
                                     T* g_u, T* dtheta) {
  static_assert(!LossFn<AL>::kRowWise, "the adaptation loss is elementwise, against 0");
  forward<T, A, LA>(s, theta, X, K, st.base);
  gather_taps<T, LA>(s, K, st.base.act, st.u);
  forward<T, kLossNetAct, LA>(ls, psi, st.u, K, st.loss);
  const T value = loss_and_seed<T, AL, LA>(ls, (const T*)nullptr, K, st.loss);
  input_grad<T, kLossNetAct, LA>(ls, psi, K, st.loss, g_u);
  const int last = s.depth - 1;
  tap_block<T, LA>(s, last, K, g_u, layer_of(st.base.grad, s, K, last), false);  // output linear
  backward<T, A, LA>(s, theta, X, K, st.base, dtheta, 0, g_u);
  return value;
}

// Scratch of a DAML Hessian-vector product.
template <typename T>
struct DamlRScratch {
  RTape<T> base, loss;
  T* r_u;    // [K, sum_width] R u
  T* r_gu;   // [K, sum_width] R dLa/du
};

// H v of La at theta along (v, 0) (v extended): the theta rows into Hv (extended), the psi rows
// (H_{psi theta} v) into Hpsi's first P_psi entries (r_backward_input). The step's tapes must
// be daml_inner_grad's.
template <typename T, Activation A, Loss AL, typename LA>
PYMAML_HOST_DEVICE void daml_hvp(const MlpShape& s, const MlpShape& ls, const T* theta,
                                 const T* psi, const T* X, int64_t K, const DamlStep<T>& st,
                                 const DamlRScratch<T>& r, const T* v, T* Hv, T* Hpsi) {
  r_forward<T, A, LA>(s, theta, X, K, st.base, r.base, v);
  gather_taps<T, LA>(s, K, r.base.r_act, r.r_u);
  r_forward_input<T, kLossNetAct, LA>(ls, psi, K, st.loss, r.loss, r.r_u);
  {  // R G of the loss network's output from La's curvature
    const int last = ls.depth - 1;
    const T inv_n = T(1) / T(K * ls.n_out());
    const T* r_out = layer_of(r.loss.r_act, ls, K, last);
    T* RG = layer_of(r.loss.r_grad, ls, K, last);
    LA::each(K * ls.n_out(), [&](int64_t e) { RG[e] = LossFn<AL>::curv_seed(r_out[e]) * inv_n; });
  }
  r_backward_input<T, kLossNetAct, LA>(ls, psi, st.u, r.r_u, K, st.loss, r.loss, Hpsi, r.r_gu);
  const int last = s.depth - 1;
  tap_block<T, LA>(s, last, K, r.r_gu, layer_of(r.base.r_grad, s, K, last), false);
  r_backward<T, A, LA>(s, theta, X, K, st.base, r.base, v, Hv, 0, (T*)nullptr, r.r_gu);
}

// Per-task scratch of daml_task, sized by daml_workspace_size (elements of T). E: theta's
// extended size, F: psi's.
template <typename T>
struct DamlWorkspace {
  const T* theta0;  // theta^0, extended (set by the caller)
  const T* psi;     // psi, extended (set by the caller)
  T* thetas;        // [S, E] theta^1 ... theta^S
  T* g;             // [E + F] the walked-back gradient: theta's rows, then psi's
  T* tmp;           // [E] inner gradient, then the direction alpha g_theta
  T* hv;            // [E + F]
  T* g_u;           // [B_u] dLa/du of the current step
  T* tapes;         // [S + 1, 3, B] base tapes (S: the query pass)
  T* us;            // [S, B_u] taps
  T* loss_tapes;    // [S, 3, B_l]
  int64_t B, B_u, B_l;
  DamlRScratch<T> r;
  T* grads = nullptr;      // with keep_grads: [S, E] every step's inner gradient
  T* rate_grad = nullptr;  // as TaskWorkspace::rate_grad (set by the caller)
  PYMAML_HOST_DEVICE T* grad(int64_t k, const MlpShape& s) const {
    return grads ? grads + k * s.num_ext : tmp;
  }
  PYMAML_HOST_DEVICE const T* theta(int64_t k, const MlpShape& s) const {
    return k == 0 ? theta0 : thetas + (k - 1) * s.num_ext;
  }
  PYMAML_HOST_DEVICE Tape<T> base_tape(int64_t k) const {
    T* b = tapes + 3 * k * B;
    return Tape<T>{b, b + B, b + 2 * B};
  }
  PYMAML_HOST_DEVICE DamlStep<T> step(int64_t k) const {
    T* l = loss_tapes + 3 * k * B_l;
    return DamlStep<T>{base_tape(k), us + k * B_u, Tape<T>{l, l + B_l, l + 2 * B_l}};
  }
};

// K source points per step, Q query points; keep_grads: the rates' gradient needs every
// step's inner gradient.
inline PYMAML_HOST_DEVICE int64_t daml_workspace_size(const MlpShape& s, const MlpShape& ls,
                                                     int64_t steps, int64_t K, int64_t Q,
                                                     bool keep_grads = false) {
  const int64_t E = s.num_ext, F = ls.num_ext;
  const int64_t B = (K > Q ? K : Q) * s.sum_width, B_u = K * s.sum_width, B_l = K * ls.sum_width;
  return (steps + 1 + (keep_grads ? steps : 0)) * E + 2 * (E + F) + B_u +
         3 * (steps + 1) * B + steps * (B_u + 3 * B_l) + 2 * B + 2 * B_l + 2 * B_u;
}

template <typename T>
PYMAML_HOST_DEVICE DamlWorkspace<T> carve_daml_workspace(T* base, const MlpShape& s,
                                                         const MlpShape& ls, int64_t steps,
                                                         int64_t K, int64_t Q,
                                                         bool keep_grads = false) {
  DamlWorkspace<T> w;
  const int64_t E = s.num_ext, F = ls.num_ext;
  w.B = (K > Q ? K : Q) * s.sum_width;
  w.B_u = K * s.sum_width;
  w.B_l = K * ls.sum_width;
  w.theta0 = w.psi = nullptr;
  w.thetas = base;
  w.g = w.thetas + steps * E;
  w.tmp = w.g + E + F;
  w.hv = w.tmp + E;
  w.g_u = w.hv + E + F;
  w.tapes = w.g_u + w.B_u;
  w.us = w.tapes + 3 * (steps + 1) * w.B;
  w.loss_tapes = w.us + steps * w.B_u;
  T* r = w.loss_tapes + 3 * steps * w.B_l;
  w.r.base = RTape<T>{r, r + w.B};
  r += 2 * w.B;
  w.r.loss = RTape<T>{r, r + w.B_l};
  r += 2 * w.B_l;
  w.r.r_u = r;
  w.r.r_gu = r + w.B_u;
  if (keep_grads) w.grads = w.r.r_gu + w.B_u;
  return w;
}

// DAML's inner loop: theta^{k+1} = theta^k - lr grad La(theta^k) on source batch k (point
// k * batch_stride of Xs, as maml_math.h inner_loop).
template <typename T, Activation A, Loss AL, typename LA = ScalarLinalg>
PYMAML_HOST_DEVICE void daml_inner_loop(const MlpShape& s, const MlpShape& ls, const T* Xs,
                                        int64_t K, int64_t steps, InnerLR<T> lr,
                                        const DamlWorkspace<T>& w, int64_t batch_stride) {
  const int64_t E = s.num_ext;
  for (int64_t k = 0; k < steps; ++k) {
    const T* cur = w.theta(k, s);
    T* grad = w.grad(k, s);
    daml_inner_grad<T, A, AL, LA>(s, ls, cur, w.psi, Xs + k * batch_stride * s.n[0], K,
                                  w.step(k), w.g_u, grad);
    apply_rates<T, LA>(s, lr, k, true, cur, grad, w.thetas + k * E);
  }
}

// One task: the supervised loss L of the adapted base network on (Xq, Yq) and, if need_grad,
// its gradient in theta (w.g[0, P)) and in psi (w.g[E, E + P_psi)), and the rates' gradient
// in w.rate_grad if set (learned rates, maml_math.h §8.1; no frozen layers here).
template <typename T, Activation A, Loss L, Loss AL, typename LA = ScalarLinalg>
PYMAML_HOST_DEVICE T daml_task(const MlpShape& s, const MlpShape& ls, const T* Xs, int64_t K,
                               const T* Xq, const T* Yq, int64_t Q, int64_t steps,
                               InnerLR<T> lr, bool need_grad, const DamlWorkspace<T>& w,
                               int64_t batch_stride) {
  daml_inner_loop<T, A, AL, LA>(s, ls, Xs, K, steps, lr, w, batch_stride);
  const T* adapted = w.theta(steps, s);
  const Tape<T> query = w.base_tape(steps);
  if (!need_grad) {
    forward<T, A, LA>(s, adapted, Xq, Q, query);
    return loss_and_seed<T, L, LA>(s, Yq, Q, query);
  }
  const T query_loss = loss_and_grad<T, A, L, LA>(s, adapted, Xq, Yq, Q, query, w.g);
  const int64_t E = s.num_ext, Pl = ls.num_params;  // psi's rows: its P_psi parameters only
  LA::each(Pl, [&](int64_t p) { w.g[E + p] = T(0); });  // the outer loss reads no psi
  if (steps > 0) apply_rates<T, LA>(s, lr, steps - 1, false, w.g, (const T*)nullptr, w.tmp);
  for (int64_t k = steps - 1; k >= 0; --k) {
    if (w.rate_grad) add_rate_grad<T, LA>(s, lr, k, w.g, w.grad(k, s), w.rate_grad);
    daml_hvp<T, A, AL, LA>(s, ls, w.theta(k, s), w.psi, Xs + k * batch_stride * s.n[0], K,
                           w.step(k), w.r, w.tmp, w.hv, w.hv + E);
    LA::each(Pl, [&](int64_t p) { w.g[E + p] -= w.hv[E + p]; });  // psi's rows
    if (k > 0) walk_update<T, LA>(s, lr, k - 1, w.g, w.hv, w.tmp);
    else LA::each(E, [&](int64_t p) { w.g[p] -= w.hv[p]; });
  }
  return query_loss;
}

}  // namespace pymaml
