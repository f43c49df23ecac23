// What one thread block of maml_cuda.cu's kernels does, over maml_math.h's linear-algebra
// backend LA: the __global__ kernels call these with CudaLinalg (cuda_linalg.cuh) and their
// blockIdx / gridDim, and the C++ tests call them with a host emulation of CudaLinalg
// (tests/cpp/emulated_block.h), block after block, to check the kernels' indexing, chunking and
// reduction on a machine without a GPU. Torch-free and CUDA-runtime-free.
#pragma once

#include <cstdint>

#include "../maml_math.h"
#include "launch_plan.h"

// Loop unrolling of the reduction, said the way each compiler that sees this file understands.
#if defined(__CUDA_ARCH__)
#define PYMAML_UNROLL_8 _Pragma("unroll 8")
#else
#define PYMAML_UNROLL_8
#endif

namespace pymaml::cuda {

// Everything a task kernel reads, by value (the kernel parameter space; well under 4 KB).
template <typename T>
struct KernelArgs {
  MlpShape shape;
  int64_t tasks, support, query, steps, chunks, width, block_elems;
  T inner_lr;
  bool first_order, need_grad;
  const T* params;   // [P]
  const T* xs;       // [T, K, n_in]
  const T* ys;       // [T, K, n_out]
  const T* xq;       // [T, Q, n_in] (maml_loss)
  const T* yq;       // [T, Q, n_out] (maml_loss)
  const T* grad_in;  // [T, P] (adapt_backward)
  T* scratch;        // [grid, block_elems], or null: the workspace is in shared memory
  T* partial;        // [chunks, width] (maml_loss, adapt_backward)
  T* adapted;        // [T, P] (adapt)
};

// The arguments every op shares; each op's launcher adds its own.
template <typename T>
KernelArgs<T> make_args(const Problem& pb, const LaunchPlan& plan, const T* params, const T* xs,
                        const T* ys, T* scratch) {
  KernelArgs<T> a{};
  a.shape = pb.shape;
  a.tasks = pb.tasks;
  a.support = pb.support;
  a.query = pb.query;
  a.steps = pb.steps;
  a.chunks = plan.chunks;
  a.width = plan.width;
  a.block_elems = plan.block_elems;
  a.inner_lr = T(pb.inner_lr);
  a.params = params;
  a.xs = xs;
  a.ys = ys;
  a.scratch = plan.shared_bytes ? nullptr : scratch;
  return a;
}

// Block `block` of a grid of `grid` blocks, with its workspace [args.block_elems] at `base` and
// the shape `s` (a copy of args.shape; the kernel keeps it in shared memory). The block first
// expands theta^0 into the head of its workspace; the rest is maml_math.h's TaskWorkspace. It
// then takes chunks c = block, block + grid, ... and runs each chunk's tasks in order:
// maml_loss sums into the chunk's partial [width] = [meta-gradient (P, if need_grad), query
// loss]; adapt_backward sums the tasks' vector-Jacobian products [P]; adapt writes each task's
// theta^S. The chunk's first task sets its partial sum (partial is uninitialised).
template <typename T, Activation A, Loss L, Op OP, typename LA>
PYMAML_HOST_DEVICE void run_task_block(const KernelArgs<T>& args, const MlpShape& s, T* base,
                                       int64_t block, int64_t grid) {
  expand_params<T, LA>(s, args.params, base);  // theta^0, once per block
  const int64_t P = s.num_params, K = args.support, Q = args.query, steps = args.steps;
  TaskWorkspace<T> w = carve_workspace(base + s.num_ext, s, steps, K > Q ? K : Q);
  w.theta0 = base;
  const InnerLR<T> lr{args.inner_lr};
  const int64_t nxs = K * s.n[0], nys = K * s.n_out();
  const int64_t nxq = Q * s.n[0], nyq = Q * s.n_out();

  for (int64_t c = block; c < args.chunks; c += grid) {
    const int64_t first = c * args.tasks / args.chunks, last = (c + 1) * args.tasks / args.chunks;
    T* part = args.partial + c * args.width;
    for (int64_t t = first; t < last; ++t) {
      const bool start = t == first;  // the chunk's first task sets its partial sum
      const T* Xs = args.xs + t * nxs;
      const T* Ys = args.ys + t * nys;
      if constexpr (OP == Op::MamlLoss) {
        const T value = maml_task<T, A, L, LA>(s, Xs, Ys, K, args.xq + t * nxq, args.yq + t * nyq,
                                               Q, steps, lr, args.first_order, args.need_grad, w);
        const int64_t n_grad = args.width - 1;
        LA::each(args.width, [&](int64_t p) {
          const T v = p < n_grad ? w.g[p] : value;
          part[p] = start ? v : part[p] + v;
        });
      } else if constexpr (OP == Op::Adapt) {
        inner_loop<T, A, L, LA>(s, Xs, Ys, K, steps, lr, w);
        const T* adapted = w.theta(steps, s);
        T* out = args.adapted + t * P;
        LA::each(P, [&](int64_t p) { out[p] = adapted[p]; });
      } else {
        adapt_vjp_task<T, A, L, LA>(s, Xs, Ys, K, steps, lr, args.grad_in + t * P, w);
        LA::each(P, [&](int64_t p) { part[p] = start ? w.g[p] : part[p] + w.g[p]; });
      }
    }
  }
}

// Column j < width of the reduction: scale * sum_c partial[c, j], chunks in order, into out[j]
// if j < n_out, else into *last.
template <typename T>
PYMAML_HOST_DEVICE void reduce_column(const T* __restrict__ partial, int64_t chunks,
                                      int64_t width, T scale, T* __restrict__ out, int64_t n_out,
                                      T* __restrict__ last, int64_t j) {
  T acc = T(0);
  PYMAML_UNROLL_8
  for (int64_t c = 0; c < chunks; ++c) acc += partial[c * width + j];
  acc *= scale;
  if (j < n_out)
    out[j] = acc;
  else
    *last = acc;
}

}  // namespace pymaml::cuda
