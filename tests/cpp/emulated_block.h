// A host emulation of one CUDA thread block running maml_math.h with CudaLinalg
// (csrc/cuda/cuda_linalg.cuh), for the C++ tests on machines without a GPU: EmulatedBlockLinalg
// runs each primitive's share of every virtual thread of a block of `block_dim` threads, one
// thread after the other, dealing out the work exactly as CudaLinalg does, and sums in
// CudaLinalg::sum's exact order (each thread's strided partial sum, the warps' shuffle-down
// trees, the warps' sums in warp order). With task_block.h's run_task_block and reduce_column
// (what the __global__ kernels run), emulate_* below return what the CUDA ops would, up to what
// only a GPU does (see test_cuda_emulation.cpp).
//
// A primitive's work items must not depend on each other (CudaLinalg runs them at once):
// `reverse_threads` runs the virtual threads last to first, and a result that changes with it
// reveals such a dependency (a race on the GPU).
#pragma once

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <vector>

#include "../../csrc/cuda/gemm_tile.h"
#include "../../csrc/maml_math.h"

namespace pymaml::cuda::emu {

struct EmulatedBlockLinalg {
  // blockDim.x of the emulated block: a multiple of 32, at most 1024.
  static inline thread_local int block_dim = 32;
  static inline thread_local bool reverse_threads = false;
  // Calls of sum so far (maml_math.h calls it once per loss evaluation: once per inner step
  // and once per query pass of every task, so it counts the tasks a launch ran).
  static inline thread_local int64_t sum_calls = 0;

  // Virtual thread number i of the block's block_dim, in the order they run.
  static int thread_at(int i) { return reverse_threads ? block_dim - 1 - i : i; }

  template <typename T>
  static void gemm(int64_t M, int64_t N, int64_t P, const T* A, int64_t a_ms, int64_t a_ps,
                   const T* B, int64_t ldb, T* C, int64_t ldc, Init init, const T* bias) {
    const int items = gemm_items(int(M), int(N));
    for (int i = 0; i < block_dim; ++i)
      for (int o = thread_at(i); o < items; o += block_dim)
        gemm_item(o, int(M), int(N), int(P), A, int(a_ms), int(a_ps), B, int(ldb), C, int(ldc),
                  init, bias);
  }

  template <typename F>
  static void each(int64_t n, F&& f) {
    const int count = int(n);
    for (int i = 0; i < block_dim; ++i)
      for (int e = thread_at(i); e < count; e += block_dim) f(int64_t(e));
  }

  template <typename F>
  static auto sum(int64_t n, F&& f) -> decltype(f(int64_t(0))) {
    using T = decltype(f(int64_t(0)));
    ++sum_calls;
    const int count = int(n);
    std::vector<T> acc(static_cast<size_t>(block_dim), T(0));
    for (int i = 0; i < block_dim; ++i) {
      const int tid = thread_at(i);
      for (int e = tid; e < count; e += block_dim) acc[size_t(tid)] += f(int64_t(e));
    }
    // Each warp: acc += __shfl_down_sync(~0u, acc, offset), offset = 16, 8, 4, 2, 1; every lane
    // reads its source before any writes; a lane whose source lane + offset is past the warp
    // (>= 32) gets its own value back. Lane 0 then holds the warp's sum.
    const int warps = block_dim >> 5;
    std::vector<T> warp_sums(static_cast<size_t>(warps));
    for (int w = 0; w < warps; ++w) {
      T lane[32], shifted[32];
      for (int l = 0; l < 32; ++l) lane[l] = acc[size_t(w * 32 + l)];
      for (int offset = 16; offset > 0; offset >>= 1) {
        for (int l = 0; l < 32; ++l) shifted[l] = l + offset < 32 ? lane[l + offset] : lane[l];
        for (int l = 0; l < 32; ++l) lane[l] += shifted[l];
      }
      warp_sums[size_t(w)] = lane[0];
    }
    T total = T(0);
    for (int w = 0; w < warps; ++w) total += warp_sums[size_t(w)];
    return total;
  }
};

// Sets the emulated block's size for the scope (and restores the previous one).
struct BlockScope {
  int saved_dim;
  bool saved_reverse;
  BlockScope(int threads, bool reverse)
      : saved_dim(EmulatedBlockLinalg::block_dim),
        saved_reverse(EmulatedBlockLinalg::reverse_threads) {
    if (threads < 32 || threads > 1024 || threads % 32 != 0) {
      std::fprintf(stderr, "emulated block of %d threads: not a multiple of 32 in [32, 1024]\n",
                   threads);
      std::abort();
    }
    EmulatedBlockLinalg::block_dim = threads;
    EmulatedBlockLinalg::reverse_threads = reverse;
  }
  ~BlockScope() {
    EmulatedBlockLinalg::block_dim = saved_dim;
    EmulatedBlockLinalg::reverse_threads = saved_reverse;
  }
  BlockScope(const BlockScope&) = delete;
  BlockScope& operator=(const BlockScope&) = delete;
};

}  // namespace pymaml::cuda::emu
