// The CUDA kernels' logic on the host, run by CTest on machines without a GPU: task_block.h's
// run_task_block and reduce_column (what maml_cuda.cu's __global__ kernels run) with
// EmulatedBlockLinalg (emulated_block.h) in place of CudaLinalg, every block of the grid in
// turn, on the launch plan's own sizes (launch_plan.h's plan_sizes). Checks, over random
// configurations:
//  1. maml_loss (loss, meta-gradient), adapt and adapt_backward against the CPU ops
//     (float64 1e-10, float32 1e-4, relative to max(1, max |reference|)), at the plan's block
//     size and at others, and at chunk counts below the plan's (several tasks per chunk);
//  2. every block stays inside its workspace slice of block_elems, and the reduction inside
//     the partial sums (guard elements after each, untouched), nothing is read before it is
//     written (workspace, partial sums and outputs start as NaN), and every task runs exactly
//     once whatever the grid (blocks run one after the other here, so a chunk run by two
//     blocks would not show as a race: the loss evaluations are counted instead);
//  3. the bits: the same on a second run, with the virtual threads run in reverse order (no
//     primitive's item depends on another's: no race on the GPU), and for every grid size
//     (number of resident blocks: the chunking depends on T only).
// What it cannot see (GPU-only): the device's rounding where it differs from the host's (nvcc
// contracts a * b + c into fma, CUDA's tanh), barriers and shared-memory races between
// primitives, the 32-bit / launch limits, the shared-memory opt-in, occupancy, the stream.
#include <torch/torch.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "cpu/maml_cpu.h"
#include "cuda/task_block.h"
#include "dispatch.h"
#include "emulated_block.h"
#include "expect.h"

namespace {

using pymaml::Activation;
using pymaml::Loss;
using pymaml::cuda::LaunchPlan;
using pymaml::cuda::Op;
using pymaml::cuda::Problem;
using pymaml::cuda::emu::BlockScope;
using pymaml::cuda::emu::EmulatedBlockLinalg;


constexpr int64_t kGuard = 37;  // sentinel elements after every buffer the kernels write

// A NaN with a payload no arithmetic here produces: the sentinel of unwritten memory.
template <typename T>
T sentinel() {
  if constexpr (sizeof(T) == 8) {
    const uint64_t bits = 0x7ff4dead5a5a5a5aull;
    double v;
    std::memcpy(&v, &bits, 8);
    return T(v);
  } else {
    const uint32_t bits = 0x7fa5a5a5u;
    float v;
    std::memcpy(&v, &bits, 4);
    return T(v);
  }
}

template <typename T>
bool is_sentinel(T v) {
  const T s = sentinel<T>();
  return std::memcmp(&v, &s, sizeof(T)) == 0;
}

// A buffer of n elements followed by kGuard guard elements, all the sentinel.
template <typename T>
struct Guarded {
  std::vector<T> mem;
  explicit Guarded(int64_t n) : mem(size_t(n + kGuard), sentinel<T>()) {}
  T* data() { return mem.data(); }
  bool guard_intact(int64_t n) const {
    for (int64_t i = n; i < n + kGuard; ++i)
      if (!is_sentinel(mem[size_t(i)])) return false;
    return true;
  }
};

// One op's inputs (contiguous, on the CPU).
template <typename T>
struct Inputs {
  Problem pb;
  std::vector<int64_t> sizes;
  torch::Tensor params, xs, ys, xq, yq, grad;  // grad [T, P]: adapt_backward's input
  bool first_order = false, need_grad = true;
};

// What an emulated launch returns: the op's outputs flat (maml_loss: [meta-gradient if
// need_grad, loss]; adapt: [T, P]; adapt_backward: [P]), and whether every buffer stayed in
// bounds and every task ran once (ok, else why says what went wrong).
template <typename T>
struct Result {
  std::vector<T> out;
  bool ok = true;
  std::string why;
  int64_t losses = 0;  // loss evaluations (EmulatedBlockLinalg::sum calls) of the launch
};

// One emulated launch of `op`, as maml_cuda.cu's launchers would run it with `plan` (threads,
// grid, chunks, width, block_elems), its workspace one slice of block_elems per block (the
// global-memory path; the shared-memory one is the same with grid = chunks).
template <typename T, Op OP>
Result<T> emulate(const Inputs<T>& in, const LaunchPlan& plan, bool reverse_threads) {
  const Problem& pb = in.pb;
  const int64_t P = pb.shape.num_params, T_ = pb.tasks;
  const int64_t slice = plan.block_elems + kGuard;
  Guarded<T> scratch(int64_t(plan.grid) * slice - kGuard);
  Guarded<T> partial(plan.partial_elems);
  const int64_t n_out = OP == Op::MamlLoss ? plan.width : OP == Op::Adapt ? T_ * P : P;
  Guarded<T> out(n_out);

  pymaml::cuda::KernelArgs<T> args = pymaml::cuda::make_args<T>(
      pb, plan, in.params.template data_ptr<T>(), in.xs.template data_ptr<T>(),
      in.ys.template data_ptr<T>(), scratch.data());
  args.first_order = in.first_order;
  args.need_grad = in.need_grad;
  if constexpr (OP == Op::MamlLoss) {
    args.xq = in.xq.template data_ptr<T>();
    args.yq = in.yq.template data_ptr<T>();
  }
  if constexpr (OP == Op::AdaptBackward) args.grad_in = in.grad.template data_ptr<T>();
  args.partial = partial.data();
  if constexpr (OP == Op::Adapt) args.adapted = out.data();

  const int64_t sums_before = EmulatedBlockLinalg::sum_calls;
  {
    const BlockScope scope(plan.threads, reverse_threads);
    pymaml::dispatch_act_loss(pb.activation, pb.loss, [&](auto a, auto l) {
      for (int b = 0; b < plan.grid; ++b)
        pymaml::cuda::run_task_block<T, decltype(a)::value, decltype(l)::value, OP,
                                     EmulatedBlockLinalg>(args, args.shape,
                                                          args.scratch + b * slice, b, plan.grid);
    });
  }
  // The second kernel, one column per (virtual) thread, as the launchers set it up.
  if constexpr (OP == Op::MamlLoss) {
    const T inv_t = T(1) / T(pb.tasks);
    for (int64_t j = 0; j < plan.width; ++j)
      pymaml::cuda::reduce_column(partial.data(), plan.chunks, plan.width, inv_t, out.data(),
                                  plan.width - 1, out.data() + plan.width - 1, j);
  } else if constexpr (OP == Op::AdaptBackward) {
    for (int64_t j = 0; j < plan.width; ++j)
      pymaml::cuda::reduce_column(partial.data(), plan.chunks, plan.width, T(1), out.data(),
                                  plan.width, static_cast<T*>(nullptr), j);
  }

  Result<T> r;
  r.losses = EmulatedBlockLinalg::sum_calls - sums_before;
  for (int b = 0; b < plan.grid; ++b)
    for (int64_t i = 0; i < kGuard; ++i)
      if (!is_sentinel(scratch.mem[size_t(b * slice + plan.block_elems + i)])) {
        r.ok = false;
        r.why = "block " + std::to_string(b) + " wrote past its workspace";
      }
  if (!partial.guard_intact(plan.partial_elems)) {
    r.ok = false;
    r.why = "partial sums written past chunks * width";
  }
  if (!out.guard_intact(n_out)) {
    r.ok = false;
    r.why = "output written past its end";
  }
  r.out.assign(out.mem.begin(), out.mem.begin() + n_out);
  // Every task run exactly once: S support losses each, and a query loss for maml_loss.
  const int64_t losses = pb.tasks * (pb.steps + (OP == Op::MamlLoss ? 1 : 0));
  if (r.losses != losses) {
    r.ok = false;
    r.why = std::to_string(r.losses) + " loss evaluations, not " + std::to_string(losses) +
            " (a task run twice, or never)";
  }
  return r;
}

template <typename T>
Result<T> emulate_op(Op op, const Inputs<T>& in, const LaunchPlan& plan, bool reverse = false) {
  switch (op) {
    case Op::MamlLoss: return emulate<T, Op::MamlLoss>(in, plan, reverse);
    case Op::Adapt: return emulate<T, Op::Adapt>(in, plan, reverse);
    default: return emulate<T, Op::AdaptBackward>(in, plan, reverse);
  }
}

// The CPU op's outputs, flattened as Result::out.
template <typename T>
std::vector<T> cpu_reference(Op op, const Inputs<T>& in) {
  const Problem& pb = in.pb;
  const char* act = pb.activation == Activation::Tanh ? "tanh" : "relu";
  const char* loss = pb.loss == Loss::CrossEntropy ? "cross_entropy"
                     : pb.loss == Loss::L1        ? "l1"
                                                  : "mse";
  torch::Tensor flat;
  if (op == Op::MamlLoss) {
    const auto out = pymaml::cpu::maml_loss(in.params, in.xs, in.ys, in.xq, in.yq, in.sizes,
                                            pb.inner_lr, pb.steps, act, loss, in.first_order,
                                            in.need_grad);
    const torch::Tensor &l = out[0], &g = out[1];
    flat = torch::cat({g.reshape({-1}), l.reshape({1})});
  } else if (op == Op::Adapt) {
    flat = pymaml::cpu::adapt(in.params, in.xs, in.ys, in.sizes, pb.inner_lr, pb.steps, act,
                              loss, in.first_order)
               .reshape({-1});
  } else {
    flat = std::get<0>(pymaml::cpu::adapt_backward(in.grad, in.params, in.xs, in.ys, in.sizes,
                                                   pb.inner_lr, pb.steps, act, loss));
  }
  flat = flat.contiguous();
  return std::vector<T>(flat.data_ptr<T>(), flat.data_ptr<T>() + flat.numel());
}

double worst_rel[2] = {0, 0};  // worst error / max(1, max |ref|) seen, [float, double]
// What the plans covered: block sizes, and the most tasks one chunk held.
std::vector<int> plan_threads_seen;
int64_t most_tasks_per_chunk = 0;  // worst error / max(1, max |ref|) seen, [float, double]

template <typename T>
void expect_close(const std::vector<T>& got, const std::vector<T>& ref, const std::string& what) {
  const double tol = sizeof(T) == 8 ? 1e-10 : 1e-4;
  if (got.size() != ref.size()) {
    expect(false, what + ": " + std::to_string(got.size()) + " outputs, the CPU op has " +
                      std::to_string(ref.size()));
    return;
  }
  double scale = 1, err = 0;
  for (size_t i = 0; i < ref.size(); ++i) {
    scale = std::max(scale, std::abs(double(ref[i])));
    const double e = std::abs(double(got[i]) - double(ref[i]));
    err = std::isnan(e) ? std::numeric_limits<double>::infinity() : std::max(err, e);
  }
  double& worst = worst_rel[sizeof(T) == 8];
  worst = std::max(worst, err / scale);
  char buf[64];
  std::snprintf(buf, sizeof buf, ": error %.3g (scale %.3g)", err, scale);
  expect(err <= tol * scale, what + buf);
}

template <typename T>
bool same_bits(const std::vector<T>& a, const std::vector<T>& b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(T)) == 0;
}

const char* op_name(Op op) {
  return op == Op::MamlLoss ? "maml_loss" : op == Op::Adapt ? "adapt" : "adapt_backward";
}

struct Config {
  std::vector<int64_t> sizes;
  int64_t T, K, Q, S;
  bool tanh, l1, first_order;
  unsigned seed;
  bool quick;  // big T: fewer variants
  bool ce = false;  // cross-entropy (then `l1` is unused): soft class labels as targets
};

std::string describe(const Config& c, bool dbl) {
  std::string s = std::string(dbl ? "f64" : "f32") + " seed " + std::to_string(c.seed) + " sizes";
  for (auto n : c.sizes) s += " " + std::to_string(n);
  s += " T " + std::to_string(c.T) + " K " + std::to_string(c.K) + " Q " + std::to_string(c.Q) +
       " S " + std::to_string(c.S) + (c.tanh ? " tanh" : " relu") +
       (c.ce ? " cross_entropy" : c.l1 ? " l1" : " mse") +
       (c.first_order ? " first-order" : "");
  return s;
}

template <typename T>
void test_config(const Config& c) {
  const auto dtype = sizeof(T) == 8 ? torch::kFloat64 : torch::kFloat32;
  const auto opt = torch::TensorOptions().dtype(dtype);
  torch::manual_seed(c.seed);
  Inputs<T> in;
  in.sizes = c.sizes;
  in.pb.shape = pymaml::make_shape(c.sizes.data(), int(c.sizes.size()) - 1);
  in.pb.activation = c.tanh ? Activation::Tanh : Activation::ReLU;
  in.pb.loss = c.ce ? Loss::CrossEntropy : c.l1 ? Loss::L1 : Loss::MSE;
  in.pb.steps = c.S;
  in.pb.inner_lr = 0.05;
  in.pb.tasks = c.T;
  in.pb.support = c.K;
  in.first_order = c.first_order;
  const int64_t P = in.pb.shape.num_params;
  in.params = torch::randn({P}, opt) * 0.5;
  in.xs = torch::randn({c.T, c.K, c.sizes.front()}, opt);
  in.ys = torch::randn({c.T, c.K, c.sizes.back()}, opt);
  in.xq = torch::randn({c.T, c.Q, c.sizes.front()}, opt);
  in.yq = torch::randn({c.T, c.Q, c.sizes.back()}, opt);
  if (c.ce) {  // class probabilities
    in.ys = torch::softmax(in.ys * 3, -1);
    in.yq = torch::softmax(in.yq * 3, -1);
  }
  in.grad = torch::randn({c.T, P}, opt);
  const std::string base = describe(c, sizeof(T) == 8);

  for (Op op : {Op::MamlLoss, Op::Adapt, Op::AdaptBackward}) {
    for (bool need_grad : {true, false}) {
      if (op != Op::MamlLoss && !need_grad) continue;
      in.need_grad = need_grad;
      in.pb.query = op == Op::MamlLoss ? c.Q : 0;
      const std::string what = base + " " + op_name(op) + (need_grad ? "" : " (no grad)");
      const std::vector<T> ref = cpu_reference(op, in);

      LaunchPlan plan = pymaml::cuda::plan_sizes(op, in.pb, need_grad);
      plan.grid = int(plan.chunks);  // the shared-memory path: one block per chunk
      expect(plan.threads % 32 == 0 && plan.threads >= 32 &&
                 plan.threads <= pymaml::cuda::kMaxThreads,
             what + ": plan threads " + std::to_string(plan.threads));
      expect(plan.chunks >= 1 && plan.chunks <= std::min<int64_t>(c.T, pymaml::cuda::kMaxChunks),
             what + ": plan chunks " + std::to_string(plan.chunks));
      if (std::find(plan_threads_seen.begin(), plan_threads_seen.end(), plan.threads) ==
          plan_threads_seen.end())
        plan_threads_seen.push_back(plan.threads);
      most_tasks_per_chunk = std::max(most_tasks_per_chunk, (c.T + plan.chunks - 1) / plan.chunks);
      const Result<T> first = emulate_op(op, in, plan);
      expect(first.ok, what + ": " + first.why);
      expect_close(first.out, ref, what + " (plan: " + std::to_string(plan.threads) +
                                       " threads, " + std::to_string(plan.chunks) + " chunks)");

      // The bits: again, threads reversed, and every grid size (the global-memory path).
      expect(same_bits(emulate_op(op, in, plan).out, first.out), what + ": a second run differs");
      const Result<T> reversed = emulate_op(op, in, plan, /*reverse=*/true);
      expect(same_bits(reversed.out, first.out) && reversed.ok,
             what + ": the virtual threads' order changes the result (a race)");
      std::vector<int> grids = {1, 2, 3, int(plan.chunks) - 1};
      if (c.quick) grids = {1, 7};
      for (int grid : grids) {
        if (grid < 1 || grid >= plan.chunks) continue;
        LaunchPlan g = plan;
        g.grid = grid;
        const Result<T> r = emulate_op(op, in, g);
        expect(r.ok, what + " grid " + std::to_string(grid) + ": " + r.why);
        expect(same_bits(r.out, first.out), what + ": grid " + std::to_string(grid) + " of " +
                                                std::to_string(plan.chunks) +
                                                " chunks changes the bits");
      }
      if (c.quick) continue;

      // Other block sizes (another sum order: close, not the same bits).
      for (int threads : {32, 96, 256}) {
        if (threads == plan.threads) continue;
        LaunchPlan t = plan;
        t.threads = threads;
        t.grid = std::max(1, int(plan.chunks) / 2);
        const Result<T> r = emulate_op(op, in, t);
        expect(r.ok, what + " " + std::to_string(threads) + " threads: " + r.why);
        expect_close(r.out, ref, what + " (" + std::to_string(threads) + " threads)");
      }
      // Fewer chunks than the plan's (several tasks per chunk, uneven runs).
      for (int64_t chunks : {int64_t(1), int64_t(2), int64_t(3)}) {
        if (chunks >= plan.chunks) continue;
        LaunchPlan k = plan;
        k.chunks = chunks;
        k.partial_elems = chunks * plan.width;
        k.grid = int(chunks);
        const Result<T> r = emulate_op(op, in, k);
        expect(r.ok, what + " " + std::to_string(chunks) + " chunks: " + r.why);
        expect_close(r.out, ref, what + " (" + std::to_string(chunks) + " chunks)");
        k.grid = 1;
        expect(same_bits(emulate_op(op, in, k).out, r.out),
               what + " " + std::to_string(chunks) + " chunks: grid 1 changes the bits");
      }
    }
  }
}

// The emulated sum against a direct model of its order on known values, including a block
// whose threads outnumber the terms (idle lanes and warps add zeros).
void test_sum_order() {
  for (int threads : {32, 64, 256}) {
    const BlockScope scope(threads, false);
    for (int n : {0, 1, 5, 31, 32, 33, 100, 1000}) {
      std::vector<double> v(static_cast<size_t>(n));
      for (int i = 0; i < n; ++i) v[size_t(i)] = std::ldexp(1.0 + i % 7, -(i % 40));
      const double got = EmulatedBlockLinalg::sum(n, [&](int64_t i) { return v[size_t(i)]; });
      // Per thread, then each warp: lane 0 = tree over lanes (a0 + a16) + (a8 + a24) + ...
      std::vector<double> acc(static_cast<size_t>(threads), 0.0);
      for (int t = 0; t < threads; ++t)
        for (int i = t; i < n; i += threads) acc[size_t(t)] += v[size_t(i)];
      double total = 0;
      for (int w = 0; w < threads / 32; ++w) {
        auto lane = [&](int l) { return acc[size_t(w * 32 + l)]; };
        // offset 16 then 8, 4, 2, 1, as lane 0 sees it (a binary tree over lane bit-reversal).
        std::vector<double> level(32);
        for (int l = 0; l < 32; ++l) level[size_t(l)] = lane(l);
        for (int width = 16; width >= 1; width >>= 1)
          for (int l = 0; l < width; ++l) level[size_t(l)] += level[size_t(l + width)];
        total += level[0];
      }
      expect(std::memcmp(&got, &total, sizeof got) == 0,
             "emulated sum order, " + std::to_string(threads) + " threads, n " +
                 std::to_string(n));
    }
  }
}

}  // namespace

int main() {
  const auto start = std::chrono::steady_clock::now();
  test_sum_order();
  std::mt19937 rng(2024);
  auto pick = [&](int lo, int hi) { return std::uniform_int_distribution<int>(lo, hi)(rng); };
  std::vector<Config> configs;
  for (unsigned seed = 0; seed < 60; ++seed) {
    Config c;
    c.seed = seed;
    c.quick = false;
    const bool big = seed % 12 == 11;  // wider layers, more points, more steps
    c.sizes.resize(size_t(pick(2, 5)));
    for (auto& n : c.sizes) n = big ? pick(1, 40) : pick(1, 8);
    static const int64_t task_counts[] = {1, 2, 3, 5, 7, 11};
    c.T = task_counts[seed % 6];
    c.K = big ? pick(1, 70) : pick(1, 6);
    c.Q = big ? pick(1, 70) : pick(1, 6);
    if (seed % 5 == 0) c.Q = c.K;  // K == Q too, mostly not
    static const int64_t step_counts[] = {0, 1, 3, 2, 1, 3, 4};
    c.S = big ? pick(5, 8) : step_counts[seed % 7];
    c.tanh = seed % 2;
    c.l1 = seed / 2 % 2;
    c.first_order = seed % 3 == 0;
    configs.push_back(c);
  }
  // More tasks than kMaxChunks: the plan's own chunks hold one or two tasks each.
  for (unsigned seed = 100; seed < 102; ++seed)
    configs.push_back(Config{{2, 3, 1}, int64_t(1024 + 37 * (seed - 99)), 3, 2, int64_t(seed - 100),
                             seed == 101, seed == 100, false, seed, true});
  // Cross-entropy (a row-wise loss): the first 12 configurations again (both activations,
  // both orders, a big one), with at least 2 classes.
  for (size_t i = 0; i < 12; ++i) {
    Config c = configs[i];
    c.ce = true;
    c.seed += 200;
    c.sizes.back() = std::max<int64_t>(2, c.sizes.back());
    configs.push_back(c);
  }
  for (const Config& c : configs) {
    test_config<double>(c);
    test_config<float>(c);
  }
  const double secs =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  std::printf("worst error / max(1, max|ref|): float32 %.3g, float64 %.3g\n", worst_rel[0],
              worst_rel[1]);
  std::sort(plan_threads_seen.begin(), plan_threads_seen.end());
  std::printf("plans' block sizes:");
  for (int t : plan_threads_seen) std::printf(" %d", t);
  std::printf("; most tasks in one of a plan's chunks: %lld\n", (long long)most_tasks_per_chunk);
  std::printf("%s (%d configurations, %d checks, %d failures, %.1f s)\n",
              failures ? "FAILED" : "OK", int(configs.size()), checks, failures, secs);
  return failures ? 1 : 0;
}
