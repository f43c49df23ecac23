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

namespace pymaml::cuda {

struct CudaLinalg {
  // One thread per output element (m, n), elements dealt out round-robin (consecutive threads
  // take consecutive columns: conflict-free reads of B, broadcast reads of A). The sum over p
  // in increasing order with one fused multiply-add per term, as ScalarLinalg; plain FMA units
  // only, no tensor cores (no TF32 rounding). Every index of a task's buffers fits in 32 bits
  // (the launch plan checks), so the loop runs on 32-bit integers.
  template <typename T>
  static __device__ void gemm(int64_t M, int64_t N, int64_t P, const T* A, int64_t a_ms,
                              int64_t a_ps, const T* B, int64_t ldb, T* C, int64_t ldc,
                              Init init, const T* bias) {
    const int n_cols = int(N), total = int(M * N), depth = int(P);
    const int ams = int(a_ms), aps = int(a_ps), lb = int(ldb), lc = int(ldc);
    for (int o = threadIdx.x; o < total; o += blockDim.x) {
      const int m = o / n_cols, n = o - m * n_cols;
      const T* a = A + m * ams;
      const T* b = B + n;
      T acc = init == Init::Zero ? T(0) : init == Init::Bias ? bias[n] : C[m * lc + n];
      for (int p = 0; p < depth; ++p) acc = fma(a[p * aps], b[p * lb], acc);
      C[m * lc + n] = acc;
    }
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
