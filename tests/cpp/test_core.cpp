// C++ tests of the core, run by CTest:
//  1. the torch-free math (maml_math.h): the Hessian-vector product against central finite
//     differences of the gradient;
//  2. the CPU ops against a LibTorch autograd implementation of MAML (create_graph=true),
//     over random configurations, in float64 and float32;
//  3. the dispatcher sees the registered schemas;
//  4. the CUDA gemm's work items (csrc/cuda/gemm_tile.h, host-compiled here) against a plain
//     loop of fused multiply-adds, bitwise.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/torch.h>

#include <cstdio>
#include <random>
#include <string>
#include <vector>

#include "cpu/maml_cpu.h"
#include "cuda/gemm_tile.h"
#include "maml_math.h"

namespace {

int failures = 0;

void expect(bool ok, const std::string& what) {
  if (!ok) {
    ++failures;
    std::printf("FAIL: %s\n", what.c_str());
  }
}

// ---- 1. math: H v against (grad(theta + h v) - grad(theta - h v)) / 2h ---------------------
template <pymaml::Activation A, pymaml::Loss L>
void test_hvp_finite_differences(unsigned seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<double> normal;
  const int64_t sizes[] = {3, 6, 5, 2};
  const auto s = pymaml::make_shape(sizes, 3);
  const int64_t K = 4, P = s.num_params;
  std::vector<double> theta(P), v(P), X(K * 3), Y(K * 2);
  for (auto* vec : {&theta, &v, &X, &Y})
    for (auto& e : *vec) e = normal(rng);
  if (L == pymaml::Loss::CrossEntropy)  // Y: class weights (soft labels, not summing to 1)
    for (auto& e : Y) e = std::abs(e);
  // Extended vectors (maml_math.h): the params plus transposed weight copies.
  const int64_t E = s.num_ext, B = K * s.sum_width;
  std::vector<double> tape_mem(5 * B), grad_plus(E), grad_minus(E), hv(E), g(E), theta_ext(E),
      v_ext(E);
  pymaml::Tape<double> tape{tape_mem.data(), tape_mem.data() + B, tape_mem.data() + 2 * B};
  pymaml::RTape<double> rtape{tape_mem.data() + 3 * B, tape_mem.data() + 4 * B};
  const double h = 1e-6;
  std::vector<double> shifted(P), shifted_ext(E);
  for (int sign : {1, -1}) {
    for (int64_t p = 0; p < P; ++p) shifted[p] = theta[p] + sign * h * v[p];
    pymaml::expand_params(s, shifted.data(), shifted_ext.data());
    pymaml::loss_and_grad<double, A, L>(s, shifted_ext.data(), X.data(), Y.data(), K, tape,
                                        sign > 0 ? grad_plus.data() : grad_minus.data());
  }
  pymaml::expand_params(s, theta.data(), theta_ext.data());
  pymaml::expand_params(s, v.data(), v_ext.data());
  pymaml::loss_and_grad<double, A, L>(s, theta_ext.data(), X.data(), Y.data(), K, tape, g.data());
  pymaml::hvp<double, A, L>(s, theta_ext.data(), X.data(), Y.data(), K, tape, rtape,
                            v_ext.data(), hv.data());
  double worst = 0, scale = 1;
  for (int64_t p = 0; p < E; ++p) {  // the transposed copies too
    const double fd = (grad_plus[p] - grad_minus[p]) / (2 * h);
    worst = std::max(worst, std::abs(fd - hv[p]));
    scale = std::max(scale, std::abs(hv[p]));
  }
  expect(worst <= 1e-6 * scale, "hvp vs finite differences (act " + std::to_string(int(A)) +
                                    ", loss " + std::to_string(int(L)) + "): " +
                                    std::to_string(worst));
}

// ---- 2. ops vs LibTorch autograd -----------------------------------------------------------
torch::Tensor net(const std::vector<torch::Tensor>& w, torch::Tensor x, bool tanh) {
  const size_t depth = w.size() / 2;
  for (size_t l = 0; l < depth; ++l) {
    x = torch::nn::functional::linear(x, w[2 * l], w[2 * l + 1]);
    if (l + 1 < depth) x = tanh ? torch::tanh(x) : torch::relu(x);
  }
  return x;
}

torch::Tensor task_loss(const torch::Tensor& out, const torch::Tensor& y, bool l1) {
  return l1 ? torch::l1_loss(out, y) : torch::mse_loss(out, y);
}

std::vector<torch::Tensor> split(const torch::Tensor& flat, const std::vector<int64_t>& sizes) {
  std::vector<torch::Tensor> w;
  int64_t off = 0;
  for (size_t l = 0; l + 1 < sizes.size(); ++l) {
    const int64_t i = sizes[l], o = sizes[l + 1];
    w.push_back(flat.narrow(0, off, o * i).view({o, i}));
    off += o * i;
    w.push_back(flat.narrow(0, off, o));
    off += o;
  }
  return w;
}

void test_ops_vs_autograd(unsigned seed, torch::Dtype dtype) {
  std::mt19937 rng(seed);
  auto pick = [&](int lo, int hi) { return std::uniform_int_distribution<int>(lo, hi)(rng); };
  std::vector<int64_t> sizes(pick(2, 5));
  for (auto& n : sizes) n = pick(1, 8);
  const int64_t T = pick(1, 3), K = pick(1, 5), Q = pick(1, 5), S = pick(0, 4);
  const bool tanh = pick(0, 1), l1 = pick(0, 1), first_order = pick(0, 3) == 0;
  const double lr = 0.05;
  torch::manual_seed(seed);
  const auto opt = torch::TensorOptions().dtype(dtype);
  int64_t P = 0;
  for (size_t l = 0; l + 1 < sizes.size(); ++l) P += sizes[l + 1] * (sizes[l] + 1);
  auto params = torch::randn({P}, opt) * 0.5;
  auto xs = torch::randn({T, K, sizes.front()}, opt), ys = torch::randn({T, K, sizes.back()}, opt);
  auto xq = torch::randn({T, Q, sizes.front()}, opt), yq = torch::randn({T, Q, sizes.back()}, opt);
  const char* act = tanh ? "tanh" : "relu";
  const char* loss = l1 ? "l1" : "mse";

  // Autograd reference, as the seed writes it.
  auto p = params.clone().requires_grad_();
  std::vector<torch::Tensor> losses, adapted;
  for (int64_t t = 0; t < T; ++t) {
    auto w = split(p, sizes);
    for (int64_t k = 0; k < S; ++k) {
      auto g = torch::autograd::grad({task_loss(net(w, xs[t], tanh), ys[t], l1)}, w, {},
                                     /*retain_graph=*/true, /*create_graph=*/!first_order);
      for (size_t i = 0; i < w.size(); ++i) w[i] = w[i] - lr * g[i];
    }
    std::vector<torch::Tensor> flat;
    for (auto& e : w) flat.push_back(e.reshape({-1}));
    adapted.push_back(torch::cat(flat));
    losses.push_back(task_loss(net(w, xq[t], tanh), yq[t], l1));
  }
  auto ref_loss = torch::stack(losses).mean();
  auto ref_grad = torch::autograd::grad({ref_loss}, {p})[0];

  const auto out = pymaml::cpu::maml_loss(params, xs, ys, xq, yq, sizes, lr, S, act, loss,
                                          first_order, true);
  const torch::Tensor &loss_val = out[0], &meta_grad = out[1];
  auto fused_adapted = pymaml::cpu::adapt(params, xs, ys, sizes, lr, S, act, loss, first_order);

  const double tol = dtype == torch::kFloat64 ? 1e-10 : 1e-4;
  auto close = [&](const torch::Tensor& a, const torch::Tensor& b, const char* what) {
    const double scale = std::max(1.0, b.abs().max().item<double>());
    const double err = (a - b).abs().max().item<double>();
    expect(err <= tol * scale, std::string(what) + " seed " + std::to_string(seed) + ": " +
                                   std::to_string(err));
  };
  expect(out.size() == 2, "maml_loss without rates: no rates' gradient listed");
  close(loss_val, ref_loss.detach(), "loss");
  close(meta_grad, ref_grad, "meta-gradient");
  close(fused_adapted, torch::stack(adapted).detach(), "adapted params");
}

// ---- 4. the CUDA gemm's work items ----------------------------------------------------------
// Every item of gemm_tile.h run once (any order: items write disjoint outputs) must give
// maml_math.h's gemm contract with one fma per term in increasing p, bitwise, leave C's
// padding alone, over tails of the row tiles, strides (A plain, transposed as in the weight
// gradients, a constant as in the column sums) and the three initialisations.
template <typename T>
void test_cuda_gemm_items(unsigned seed) {
  using pymaml::Init;
  std::mt19937 rng(seed);
  std::uniform_int_distribution<int> dim(1, 13);
  std::normal_distribution<double> normal;
  for (int trial = 0; trial < 300; ++trial) {
    const int kind = trial % 3;  // 0: A [M, P]; 1: A read transposed; 2: A a constant 1
    const int M = kind == 2 ? 1 : dim(rng), N = dim(rng) * 3, P = dim(rng);
    const int ldb = N + trial % 2, ldc = N + 2 * (trial % 2);
    const Init init = Init(trial / 3 % 3);
    const int a_ms = kind == 0 ? P : kind == 1 ? 1 : 0, a_ps = kind == 0 ? 1 : kind == 1 ? M : 0;
    std::vector<T> A(kind == 2 ? 1 : M * P), B(P * ldb), C(M * ldc), bias(N);
    for (auto* v : {&A, &B, &C, &bias})
      for (auto& e : *v) e = T(normal(rng));
    if (kind == 2) A[0] = T(1);
    std::vector<T> expected = C, got = C;
    for (int m = 0; m < M; ++m)
      for (int n = 0; n < N; ++n) {
        T acc = init == Init::Zero ? T(0) : init == Init::Bias ? bias[n] : C[m * ldc + n];
        for (int p = 0; p < P; ++p) acc = std::fma(A[m * a_ms + p * a_ps], B[p * ldb + n], acc);
        expected[m * ldc + n] = acc;
      }
    const int items = pymaml::cuda::gemm_items(M, N);
    for (int item = items - 1; item >= 0; --item)  // backwards: no reliance on the order
      pymaml::cuda::gemm_item(item, M, N, P, A.data(), a_ms, a_ps, B.data(), ldb, got.data(),
                              ldc, init, bias.data());
    expect(got == expected, "CUDA gemm items, seed " + std::to_string(seed) + " trial " +
                                std::to_string(trial) + ": M " + std::to_string(M) + " N " +
                                std::to_string(N) + " P " + std::to_string(P));
  }
}

}  // namespace

int main() {
  using pymaml::Activation;
  using pymaml::Loss;
  for (unsigned seed = 0; seed < 3; ++seed) {
    test_hvp_finite_differences<Activation::Tanh, Loss::MSE>(seed);
    test_hvp_finite_differences<Activation::Tanh, Loss::L1>(seed);
    test_hvp_finite_differences<Activation::ReLU, Loss::MSE>(seed);
    test_hvp_finite_differences<Activation::Tanh, Loss::CrossEntropy>(seed);
    test_hvp_finite_differences<Activation::ReLU, Loss::CrossEntropy>(seed);
  }
  for (unsigned seed = 0; seed < 40; ++seed) {
    test_ops_vs_autograd(seed, torch::kFloat64);
    test_ops_vs_autograd(seed, torch::kFloat32);
  }
  for (unsigned seed = 0; seed < 2; ++seed) {
    test_cuda_gemm_items<double>(seed);
    test_cuda_gemm_items<float>(seed);
  }
  for (const char* name : {"pymaml::adapt", "pymaml::adapt_backward", "pymaml::maml_loss"})
    expect(c10::Dispatcher::singleton().findSchema({name, ""}).has_value(),
           std::string("schema registered: ") + name);
  std::printf("%s (%d failures)\n", failures ? "FAILED" : "OK", failures);
  return failures ? 1 : 0;
}
