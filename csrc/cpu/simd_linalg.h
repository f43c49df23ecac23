// SIMD version of maml_math.h's linear-algebra backend (ScalarLinalg): its heavy gemm written
// with GCC / Clang vector extensions so that the same source becomes AVX-512, AVX2 or SSE2 /
// NEON code depending on the target the including file is compiled for (see kernels_impl.h).
// Everything here lives in that file's instruction-set namespace, so the copies never mix at
// link time.
//
// C[m, n] = init + sum_p A[m * a_ms + p * a_ps] * B[p * ldb + n]: the output columns are cut
// into strips of up to 4 vectors, the rows into tiles of MR rows, and each MR x NR tile of C
// is accumulated in registers over the whole sum (one vector load of B per p and vector, one
// broadcast of A per p and row), then stored once. When N is not a multiple of the vector
// width, the last vector of the last strip is moved back to end at column N, overlapping its
// neighbour: any width N >= W works without padding or masks (narrower ones use half,
// quarter, ... vectors).
// The sum over p runs in increasing order with one multiply-add per term, exactly like
// ScalarLinalg, except for products with one output column and contiguous rows of A (the
// output layer's forward pass), which are lane-parallel dot products.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <utility>

#include "../maml_math.h"

#if !defined(PYMAML_ISA) || !defined(PYMAML_VECTOR_BYTES) || !defined(PYMAML_VECTOR_REGISTERS)
#error "include simd_linalg.h through kernels_impl.h"
#endif

namespace pymaml::cpu::PYMAML_ISA {

template <typename T, int W>
struct Lanes {
  typedef T V __attribute__((vector_size(W * sizeof(T))));
  static V load(const T* p) {
    V v;
    std::memcpy(&v, p, sizeof v);  // unaligned load
    return v;
  }
  static void store(T* p, V v) { std::memcpy(p, &v, sizeof v); }
  // A broadcast. Written as x - 0 because that is exact for every x, so the compiler folds it
  // into one broadcast; V{} + x is not (-0.0 + 0.0 = +0.0) and costs an addition per use.
  static V splat(T x) { return x - V{}; }
  static T sum(V v) {
    T s = T(0);
    for (int i = 0; i < W; ++i) s += v[i];
    return s;
  }
};

template <typename T>
struct Lanes<T, 1> {
  typedef T V;
  static V load(const T* p) { return *p; }
  static void store(T* p, V v) { *p = v; }
  static V splat(T x) { return x; }
  static T sum(V v) { return v; }
};

// One MR-row tile of C over NR vectors of columns, at offsets 0, W, ..., (NR - 2) W and `last`
// (= (NR - 1) W, or less so that the last vector ends at the matrix's edge: it then overlaps
// the one before, whose columns it recomputes identically), accumulated over all P in
// registers. Every load of C happens before any store, so Init::Accumulate is safe.
template <typename T, int W, int MR, int NR>
void tile(int64_t P, const T* A, int64_t a_ms, int64_t a_ps, const T* B, int64_t ldb, T* C,
          int64_t ldc, Init init, const T* bias, int64_t last) {
  using L = Lanes<T, W>;
  int64_t off[NR];
#pragma GCC unroll 4
  for (int r = 0; r < NR; ++r) off[r] = r + 1 < NR ? r * W : last;
  typename L::V acc[MR][NR];
#pragma GCC unroll 16
  for (int m = 0; m < MR; ++m)
#pragma GCC unroll 4
    for (int r = 0; r < NR; ++r)
      acc[m][r] = init == Init::Zero   ? L::splat(T(0))
                  : init == Init::Bias ? L::load(bias + off[r])
                                       : L::load(C + m * ldc + off[r]);
  for (int64_t p = 0; p < P; ++p) {
    typename L::V b[NR];
#pragma GCC unroll 4
    for (int r = 0; r < NR; ++r) b[r] = L::load(B + p * ldb + off[r]);
    const T* a = A + p * a_ps;
#pragma GCC unroll 16
    for (int m = 0; m < MR; ++m) {
      const typename L::V am = L::splat(a[m * a_ms]);
#pragma GCC unroll 4
      for (int r = 0; r < NR; ++r) acc[m][r] += am * b[r];
    }
  }
#pragma GCC unroll 16
  for (int m = 0; m < MR; ++m)
#pragma GCC unroll 4
    for (int r = 0; r < NR; ++r) L::store(C + m * ldc + off[r], acc[m][r]);
}

// sum_p a[p] * b[p], W lanes at a time, the rest with narrower vectors.
template <typename T, int W>
T dot(const T* a, const T* b, int64_t n) {
  using L = Lanes<T, W>;
  T total = T(0);
  int64_t p = 0;
  if (n >= W) {
    typename L::V acc = L::splat(T(0));
    for (; p + W <= n; p += W) acc += L::load(a + p) * L::load(b + p);
    total = L::sum(acc);
  }
  if constexpr (W > 1) {
    if (p < n) total += dot<T, W / 2>(a + p, b + p, n - p);
  }
  return total;
}

struct SimdLinalg {
  // The elementwise loops and the loss's sum stay plain loops in order (maml_math.h's
  // contract; the compiler vectorises the elementwise ones): the same as ScalarLinalg, kept
  // here so that each instruction set's copy is its own.
  template <typename F>
  static void each(int64_t n, F&& f) {
    for (int64_t i = 0; i < n; ++i) f(i);
  }

  template <typename F>
  static auto sum(int64_t n, F&& f) -> decltype(f(int64_t(0))) {
    decltype(f(int64_t(0))) total(0);
    for (int64_t i = 0; i < n; ++i) total += f(i);
    return total;
  }

  // Tallest tile whose accumulators, B vectors and broadcast fit in the vector registers.
  static constexpr int max_rows(int nr) {
    return std::min(12, (PYMAML_VECTOR_REGISTERS - nr - 1) / nr);
  }

  template <typename T, int W, int NR, size_t... MR>
  static void tile_rows(std::index_sequence<MR...>, int mr, int64_t P, const T* A, int64_t a_ms,
                        int64_t a_ps, const T* B, int64_t ldb, T* C, int64_t ldc, Init init,
                        const T* bias, int64_t last) {
    using Fn = void (*)(int64_t, const T*, int64_t, int64_t, const T*, int64_t, T*, int64_t, Init,
                        const T*, int64_t);
    static constexpr Fn table[] = {&tile<T, W, int(MR) + 1, NR>...};
    table[mr - 1](P, A, a_ms, a_ps, B, ldb, C, ldc, init, bias, last);
  }

  // The strip of columns [n0, n0 + last + W) for all M rows, in the fewest tiles of at most
  // max_rows(NR) rows, of even heights (10 rows: 5 + 5, not 9 + 1: every tile reloads B).
  // Long sums are cut into chunks of kChunk terms (cache blocking, issue 26): every tile of
  // the strip runs chunk c before any runs chunk c + 1, so the chunk's rows of B (kChunk x 4
  // vectors: 32 KB of floats) stay in L1 across the tiles, where a whole long strip (1024
  // terms: 256 KB) was read from L2 by every tile (weight gradients over 1024 points: 56
  // GFLOP/s). A tile picks up where the last chunk stored C (Init::Accumulate): the same
  // multiply-adds in the same order, rounded the same, bitwise the unchunked result.
  static constexpr int64_t kChunk = 128;

  template <typename T, int W, int NR>
  static void strip(int64_t M, int64_t P, const T* A, int64_t a_ms, int64_t a_ps, const T* B,
                    int64_t ldb, T* C, int64_t ldc, Init init, const T* bias, int64_t n0,
                    int64_t last) {
    constexpr int rows = max_rows(NR);
    const int64_t tiles = (M + rows - 1) / rows;
    // A chunk shorter than kChunk / 2 joins the one before it (no 1-term passes over C).
    for (int64_t p0 = 0; p0 < P || p0 == 0;) {
      const int64_t len = P - p0 < kChunk + kChunk / 2 ? P - p0 : kChunk;
      const Init chunk_init = p0 == 0 ? init : Init::Accumulate;
      for (int64_t i = 0, m0 = 0; i < tiles; ++i) {
        const int mr = int((M - m0) / (tiles - i));  // spread the remainder over the last tiles
        tile_rows<T, W, NR>(std::make_index_sequence<rows>{}, mr, len, A + m0 * a_ms + p0 * a_ps,
                            a_ms, a_ps, B + p0 * ldb + n0, ldb, C + m0 * ldc + n0, ldc,
                            chunk_init, bias ? bias + n0 : bias, last);
        m0 += mr;
      }
      p0 += len;
      if (len == 0) break;
    }
  }

  // Fewer than W columns in all: the widest narrower vector that fits, the rest recursively.
  template <typename T, int W>
  static void narrow(int64_t M, int64_t N, int64_t P, const T* A, int64_t a_ms, int64_t a_ps,
                     const T* B, int64_t ldb, T* C, int64_t ldc, Init init, const T* bias,
                     int64_t n0) {
    if (N - n0 >= W) {
      strip<T, W, 1>(M, P, A, a_ms, a_ps, B, ldb, C, ldc, init, bias, n0, 0);
      n0 += W;
    }
    if constexpr (W > 1)
      if (n0 < N) narrow<T, W / 2>(M, N, P, A, a_ms, a_ps, B, ldb, C, ldc, init, bias, n0);
  }

  template <typename T, int W>
  static void gemm_w(int64_t M, int64_t N, int64_t P, const T* A, int64_t a_ms, int64_t a_ps,
                     const T* B, int64_t ldb, T* C, int64_t ldc, Init init, const T* bias) {
    if (N < W) return narrow<T, W / 2>(M, N, P, A, a_ms, a_ps, B, ldb, C, ldc, init, bias, 0);
    // Strips of 4 vectors, leaving at least one whole vector for the last strip, whose last
    // vector is moved back to end at column N (no partial vectors, no masks).
    int64_t n0 = 0;
    while (N - n0 > 4 * W) {
      const int nr = N - n0 - 4 * W >= W ? 4 : 3;
      if (nr == 4)
        strip<T, W, 4>(M, P, A, a_ms, a_ps, B, ldb, C, ldc, init, bias, n0, 3 * W);
      else
        strip<T, W, 3>(M, P, A, a_ms, a_ps, B, ldb, C, ldc, init, bias, n0, 2 * W);
      n0 += nr * W;
    }
    const int64_t rest = N - n0;  // in [W, 4W]
    const int64_t last = rest - W;
    switch ((rest + W - 1) / W) {
      case 4: strip<T, W, 4>(M, P, A, a_ms, a_ps, B, ldb, C, ldc, init, bias, n0, last); break;
      case 3: strip<T, W, 3>(M, P, A, a_ms, a_ps, B, ldb, C, ldc, init, bias, n0, last); break;
      case 2: strip<T, W, 2>(M, P, A, a_ms, a_ps, B, ldb, C, ldc, init, bias, n0, last); break;
      default: strip<T, W, 1>(M, P, A, a_ms, a_ps, B, ldb, C, ldc, init, bias, n0, last); break;
    }
  }

  // dst [cols, rows] = src [rows, cols]^T: W x W blocks transposed in registers (GCC's
  // __builtin_shuffle: log2 W rounds of two-vector permutes), the edges element by element.
  // maml_math.h's weight_grad uses it for a layer's transposed copy where
  // transposed_copy_pays says so (issue 26). A copy: exact.
  template <typename T>
  static void transpose(int64_t rows, int64_t cols, const T* src, T* dst) {
    constexpr int W = PYMAML_VECTOR_BYTES / int(sizeof(T));
    int64_t r0 = 0, c0 = 0;
#if defined(__GNUC__) && !defined(__clang__)
    for (; r0 + W <= rows; r0 += W)
      for (int64_t c = 0; c + W <= cols; c += W)
        transpose_block<T, W>(src + r0 * cols + c, cols, dst + c * rows + r0, rows);
    c0 = cols - cols % W;
#endif
    for (int64_t i = 0; i < rows; ++i)  // what the blocks left: rows >= r0 or columns >= c0
      for (int64_t j = i < r0 ? c0 : 0; j < cols; ++j) dst[j * rows + i] = src[i * cols + j];
  }

#if defined(__GNUC__) && !defined(__clang__)
  // One W x W block: round d swaps bit d of every element's row and column index (the
  // off-diagonal d x d sub-blocks), so after the rounds d = W/2 ... 1 element (r, c) is at (c, r).
  template <typename T, int W>
  static void transpose_block(const T* src, int64_t ld_src, T* dst, int64_t ld_dst) {
    using L = Lanes<T, W>;
    typedef std::conditional_t<sizeof(T) == 4, int32_t, int64_t> I;
    typedef I Idx __attribute__((vector_size(W * sizeof(T))));
    typename L::V v[W];
#pragma GCC unroll 16
    for (int r = 0; r < W; ++r) v[r] = L::load(src + r * ld_src);
#pragma GCC unroll 8
    for (int d = W / 2; d >= 1; d /= 2) {
      Idx lo, hi;
#pragma GCC unroll 16
      for (int c = 0; c < W; ++c) {
        lo[c] = (c & d) ? W + c - d : c;
        hi[c] = (c & d) ? W + c : c + d;
      }
#pragma GCC unroll 16
      for (int r = 0; r < W; ++r) {
        if (r & d) continue;
        const typename L::V a = v[r], b = v[r + d];
        v[r] = __builtin_shuffle(a, b, lo);
        v[r + d] = __builtin_shuffle(a, b, hi);
      }
    }
#pragma GCC unroll 16
    for (int r = 0; r < W; ++r) L::store(dst + r * ld_dst, v[r]);
  }
#endif

  // Whether a weight gradient's transposed copy [in, out] is cheaper as a transposition of the
  // [out, in] one than as its own product over K points: the product costs K multiply-adds
  // per entry, the transposition a load and a store, ~0.45 ns an entry where the product
  // runs ~0.011 ns an entry and point (measured: benchmarks/NOTES.md, issue 26): it pays from
  // K ~ 40. Small layers (W1, W2) keep their two products, bitwise as before either way.
  static bool transposed_copy_pays(int64_t K, int64_t n_in, int64_t n_out) {
    return K >= kTransposeMinPoints && n_in * n_out >= kTransposeMinEntries;
  }
  static constexpr int64_t kTransposeMinPoints = 48;
  static constexpr int64_t kTransposeMinEntries = 4096;

  template <typename T>
  static void gemm(int64_t M, int64_t N, int64_t P, const T* A, int64_t a_ms, int64_t a_ps,
                   const T* B, int64_t ldb, T* C, int64_t ldc, Init init, const T* bias) {
    constexpr int W = PYMAML_VECTOR_BYTES / int(sizeof(T));
    if (N == 1 && M > 1 && ldc == 1 && init != Init::Bias && a_ms == 1) {
      // One output column, A's column contiguous: C^T [1, M] = B^T [1, P] A^T [P, M].
      gemm_w<T, W>(1, M, P, B, 0, ldb, A, a_ps, C, M, init, bias);
      return;
    }
    if (N == 1 && a_ps == 1 && ldb == 1) {
      // One output column, A's rows contiguous: dot products.
      for (int64_t m = 0; m < M; ++m) {
        const T init_value = init == Init::Zero ? T(0) : init == Init::Bias ? bias[0] : C[m * ldc];
        C[m * ldc] = init_value + dot<T, W>(A + m * a_ms, B, P);
      }
      return;
    }
    gemm_w<T, W>(M, N, P, A, a_ms, a_ps, B, ldb, C, ldc, init, bias);
  }
};

}  // namespace pymaml::cpu::PYMAML_ISA
