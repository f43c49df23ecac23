// How the CPU ops spread a meta-batch's tasks over threads and sum their results, shared by
// the MAML and DAML kernels (maml_cpu.cpp, daml_cpu.cpp).
//
// Determinism: tasks are grouped into a number of blocks that depends only on T and the width
// of a task's result (never on the thread count); each block sums its tasks in order into its
// own partial sum, and the blocks are summed in order at the end. The result is bitwise the
// same for any thread count.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cstdint>
#include <memory>
#include <utility>

namespace pymaml::cpu {
namespace {

// Partial sums of at most this many elements are kept (caps memory for big networks).
constexpr int64_t kPartialBudget = int64_t(1) << 24;
constexpr int64_t kMaxBlocks = 256;

inline int64_t num_blocks(int64_t T, int64_t P) {
  const int64_t by_memory = std::max<int64_t>(1, kPartialBudget / std::max<int64_t>(P, 1));
  return std::min({T, by_memory, kMaxBlocks});
}

// Tasks [first, last) of block b out of nb.
inline std::pair<int64_t, int64_t> block_range(int64_t b, int64_t nb, int64_t T) {
  return {b * T / nb, (b + 1) * T / nb};
}

// Runs fn(b, worker) for every block b in [0, nb), worker < at::get_num_threads() naming the
// caller's scratch. The workers of one parallel region take blocks from a shared counter, so
// uneven tasks balance out. Which worker runs a block never changes a result: each block sums
// into its own partial sum.
//
// Why a parallel region (OpenMP) and not ATen's inter-op pool: after torch's own parallel ops
// (the optimizer step), OpenMP's workers spin on the other cores for a while and an inter-op
// helper thread then got no core (two threads: 1.03x of one, with Adam, on an idle machine).
// The price: when another process keeps the other core busy, the region's end waits for the
// descheduled worker (two threads slower than one; set torch.set_num_threads(1) there).
template <typename Fn>
void run_blocks(int64_t nb, Fn&& fn) {
  const int64_t workers = std::min<int64_t>(nb, at::get_num_threads());
  if (workers <= 1 || at::in_parallel_region()) {
    for (int64_t b = 0; b < nb; ++b) fn(b, 0);
    return;
  }
  std::atomic<int64_t> next{0};
  at::parallel_for(0, workers, 1, [&](int64_t, int64_t) {
    const int worker = at::get_thread_num();
    for (int64_t b = next++; b < nb; b = next++) fn(b, worker);
  });
}

// Runs fn(block, task, workspace) over all tasks, block by block, with one workspace of
// ws_size elements per worker, allocated once.
template <typename scalar_t, typename Fn>
void for_each_block(int64_t T, int64_t nb, int64_t ws_size, Fn&& fn) {
  const size_t workers = static_cast<size_t>(std::max(1, at::get_num_threads()));
  std::unique_ptr<scalar_t[]> scratch(new scalar_t[workers * static_cast<size_t>(ws_size)]);
  run_blocks(nb, [&](int64_t b, int worker) {
    scalar_t* base = scratch.get() + size_t(worker) * size_t(ws_size);
    const auto [first, last] = block_range(b, nb, T);
    for (int64_t t = first; t < last; ++t) fn(b, t, base);
  });
}

// One call's working memory, carved into N pieces of the given element counts. Up to
// kKeptBytes it is kept for the next call on the same thread: the per-call ops used to allocate
// and free their ~100-300 KB (and zero fresh vectors) every time, and malloc, free and the
// allocator's consolidation took ~6 % of a DAML call with one task (perf). A larger problem,
// or a second CallMemory alive on the thread, gets memory of its own, freed with it.
constexpr size_t kKeptBytes = size_t(8) << 20;

template <typename scalar_t, size_t N>
class CallMemory {
 public:
  explicit CallMemory(const std::array<int64_t, N>& counts) {
    thread_local std::unique_ptr<scalar_t[]> kept;
    thread_local size_t kept_size = 0;
    thread_local bool kept_in_use = false;
    size_t offset[N], total = 0;
    for (size_t i = 0; i < N; ++i) {
      offset[i] = total;
      total += (size_t(counts[i]) + 15) / 16 * 16;  // whole 16-element vectors per piece
    }
    scalar_t* base;
    if (kept_in_use || total * sizeof(scalar_t) > kKeptBytes) {
      own_.reset(new scalar_t[total]);
      base = own_.get();
    } else {
      if (kept_size < total) {
        kept.reset(new scalar_t[total]);
        kept_size = total;
      }
      base = kept.get();
      in_use_ = &kept_in_use;
      kept_in_use = true;
    }
    for (size_t i = 0; i < N; ++i) piece_[i] = base + offset[i];
  }
  ~CallMemory() {
    if (in_use_) *in_use_ = false;
  }
  CallMemory(const CallMemory&) = delete;
  CallMemory& operator=(const CallMemory&) = delete;

  scalar_t* operator[](size_t i) const { return piece_[i]; }

 private:
  std::unique_ptr<scalar_t[]> own_;
  bool* in_use_ = nullptr;
  scalar_t* piece_[N];
};

// out[p] = scale * sum_b partial[b * stride + p], p < n, blocks summed in order (parallel over
// p only). Block by block over p, not p by p over the blocks: the same sums in the same order,
// but each pass is a contiguous loop the compiler vectorises (the p-outer form was 6 % of a
// DAML call with one task).
template <typename scalar_t>
void reduce_blocks(const scalar_t* partial, int64_t nb, int64_t n, int64_t stride,
                   scalar_t scale, scalar_t* out) {
  auto reduce = [&](int64_t p0, int64_t p1) {
    scalar_t* __restrict__ o = out;
    for (int64_t p = p0; p < p1; ++p) o[p] = partial[p];
    for (int64_t b = 1; b < nb; ++b) {
      const scalar_t* __restrict__ src = partial + b * stride;
      for (int64_t p = p0; p < p1; ++p) o[p] += src[p];
    }
    for (int64_t p = p0; p < p1; ++p) o[p] *= scale;
  };
  constexpr int64_t grain = 4096;
  if (n <= grain)
    reduce(0, n);  // small: not worth a parallel region
  else
    at::parallel_for(0, n, grain, reduce);
}

}  // namespace
}  // namespace pymaml::cpu
