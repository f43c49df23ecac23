// One thread's share of CudaLinalg::gemm (cuda_linalg.cuh), apart so that it also compiles for
// the host, where tests/cpp/test_core.cpp checks it against a plain loop: a work item is a
// column n and kGemmRows consecutive rows m0, m0 + 1, ... of C (the last tile clipped at M),
// the sums over p of its rows interleaved (independent FMA chains: latency hidden, one load of
// B per p shared by the rows). Each output's sum runs over p in increasing order with one fused
// multiply-add per term, whatever the tiling: C[m, n] is the same bits as a plain fma loop.
// Torch-free and CUDA-runtime-free.
#pragma once

#include <cmath>

#include "../maml_math.h"

// Loop unrolling, said the way each compiler that sees this file understands.
#if defined(__CUDA_ARCH__)  // nvcc, device code
#define PYMAML_UNROLL _Pragma("unroll")
#elif defined(__CUDACC__)  // nvcc, host code (the kernels never call it there)
#define PYMAML_UNROLL
#else  // a host compiler alone (the C++ tests)
#define PYMAML_UNROLL _Pragma("GCC unroll 4")
#endif

namespace pymaml::cuda {

constexpr int kGemmRows = 4;

// Work items of an M x N product: a column and kGemmRows rows each.
inline PYMAML_HOST_DEVICE int gemm_items(int M, int N) {
  return (M + kGemmRows - 1) / kGemmRows * N;
}

// Work item `item` (< gemm_items(M, N)) of maml_math.h's gemm contract, on 32-bit indices.
// Consecutive items take consecutive columns of the same rows (conflict-free reads of B,
// broadcast reads of A within a warp). Rows past M repeat row M - 1 (valid reads, never
// stored), so the inner loop has no branch.
template <typename T>
PYMAML_HOST_DEVICE void gemm_item(int item, int M, int N, int P, const T* A, int a_ms, int a_ps,
                                  const T* B, int ldb, T* C, int ldc, Init init, const T* bias) {
  using std::fma;
  const int tile = item / N, n = item - tile * N, m0 = tile * kGemmRows;
  const T* a[kGemmRows];
  T acc[kGemmRows];
PYMAML_UNROLL
  for (int r = 0; r < kGemmRows; ++r) {
    const int m = m0 + r < M ? m0 + r : M - 1;
    a[r] = A + m * a_ms;
    acc[r] = init == Init::Zero ? T(0) : init == Init::Bias ? bias[n] : C[m * ldc + n];
  }
  const T* b = B + n;
  for (int p = 0; p < P; ++p) {
    const T bp = b[p * ldb];
PYMAML_UNROLL
    for (int r = 0; r < kGemmRows; ++r) acc[r] = fma(a[r][p * a_ps], bp, acc[r]);
  }
PYMAML_UNROLL
  for (int r = 0; r < kGemmRows; ++r)
    if (m0 + r < M) C[(m0 + r) * ldc + n] = acc[r];
}

}  // namespace pymaml::cuda
