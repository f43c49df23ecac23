// maml_math.h's linear-algebra backend for one CUDA thread block: the block runs one task, and
// every primitive is shared out over the block's threads and ends with a barrier, so what it
// wrote is visible to every thread when it returns (maml_math.h's contract). Every thread of
// the block must make the same sequence of calls (maml_math.h's control flow depends only on
// sizes and flags, the same in every thread). blockDim.x must be a multiple of 32.
//
// Deterministic: which thread computes what depends only on blockDim.x, and every sum runs in
// a fixed order, so a result never depends on timing, and not on the GPU either.
#pragma once

#include <cstdint>

#include "../maml_math.h"
#include "gemm_tile.h"

namespace pymaml::cuda {

struct CudaLinalg {
  // Work items of gemm_tile.h dealt out round-robin over the threads: each a column and
  // kGemmRows rows of C, so a thread runs independent FMA chains side by side. Each output's
  // sum over p in increasing order (ScalarLinalg's order) with one fused multiply-add per term;
  // plain FMA units only, no tensor cores (no TF32 rounding). Every index of a task's buffers
  // fits in 32 bits (the launch plan checks), so the work runs on 32-bit integers.
  template <typename T>
  static __device__ void gemm(int64_t M, int64_t N, int64_t P, const T* A, int64_t a_ms,
                              int64_t a_ps, const T* B, int64_t ldb, T* C, int64_t ldc,
                              Init init, const T* bias) {
    const int items = gemm_items(int(M), int(N));
    for (int o = threadIdx.x; o < items; o += blockDim.x)
      gemm_item(o, int(M), int(N), int(P), A, int(a_ms), int(a_ps), B, int(ldb), C, int(ldc),
                init, bias);
    __syncthreads();
  }

  template <typename F>
  static __device__ void each(int64_t n, F&& f) {
    const int count = int(n);
    for (int i = threadIdx.x; i < count; i += blockDim.x) f(int64_t(i));
    __syncthreads();
  }

  // Each thread sums its elements i = thread, thread + blockDim.x, ... in order; each warp then
  // folds its 32 partial sums by a fixed shuffle tree, and every thread adds the warps' sums in
  // warp order: the same value in every thread.
  template <typename F>
  static __device__ auto sum(int64_t n, F&& f) -> decltype(f(int64_t(0))) {
    using T = decltype(f(int64_t(0)));
    __shared__ T warp_sums[32];
    const int count = int(n);
    T acc = T(0);
    for (int i = threadIdx.x; i < count; i += blockDim.x) acc += f(int64_t(i));
    for (int offset = 16; offset > 0; offset >>= 1)
      acc += __shfl_down_sync(0xffffffffu, acc, offset);
    if ((threadIdx.x & 31) == 0) warp_sums[threadIdx.x >> 5] = acc;
    __syncthreads();
    T total = T(0);
    for (int w = 0; w < int(blockDim.x >> 5); ++w) total += warp_sums[w];
    __syncthreads();  // warp_sums is reused by the next call
    return total;
  }
};

}  // namespace pymaml::cuda
