// The CUDA kernel layer of the pymaml ops: torch-free (raw device pointers, sizes, a stream),
// so it compiles with nvcc on a machine whose torch has no CUDA; maml_cuda_ops.cpp is the thin
// torch-aware binding. The math is maml_math.h's, run with CudaLinalg (cuda_linalg.cuh).
//
// Mapping: one thread block per task, the tasks cut into `chunks` fixed runs of consecutive
// tasks (their number depends only on T and P); a block takes chunks in a grid-stride loop and
// runs each chunk's tasks in order, summing their meta-gradients into the chunk's partial sum
// [width]. A second kernel adds the chunks' partial sums in chunk order: the same result on
// every run and every GPU. The block's workspace (theta^0 extended, then maml_math.h's
// TaskWorkspace) lives in dynamic shared memory when it fits the device's opt-in limit, else in
// a global scratch buffer, one slice per block of the grid (slower, never wrong).
//
// Every launch function runs asynchronously on `stream` (no host synchronisation) and returns
// cudaGetLastError() after each launch. Pointers are device pointers to contiguous buffers.
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>
#include <string>

#include "../maml_math.h"
#include "launch_plan.h"  // Op, Problem, LaunchPlan

namespace pymaml::cuda {

// Plans op on the current device for element type T (float or double). need_grad is
// maml_loss's flag (the others ignore it). Returns a CUDA error from the device queries;
// a problem too big to run is not a CUDA error: plan->error then says what to reduce.
template <typename T>
cudaError_t plan_launch(Op op, const Problem& pb, bool need_grad, LaunchPlan* plan);

// maml_loss: params [P]; xs [T, K, n_in], ys [T, K, n_out]; xq [T, Q, n_in], yq [T, Q, n_out].
// Writes loss [1] = the mean query loss over the tasks and, if need_grad, grad [P] = the mean
// meta-gradient (first_order: FO-MAML's). scratch [plan.scratch_elems] (may be null if 0) and
// partial [plan.partial_elems] are the caller's, uninitialised. Two launches.
template <typename T>
cudaError_t maml_loss(const Problem& pb, const LaunchPlan& plan, const T* params, const T* xs,
                      const T* ys, const T* xq, const T* yq, bool first_order, bool need_grad,
                      T* scratch, T* partial, T* loss, T* grad, cudaStream_t stream);

// adapt: adapted [T, P] = every task's theta^S. One launch.
template <typename T>
cudaError_t adapt(const Problem& pb, const LaunchPlan& plan, const T* params, const T* xs,
                  const T* ys, T* scratch, T* adapted, cudaStream_t stream);

// adapt_backward: out [P] = sum_t (d theta_t^S / d theta)^T grad[t], grad [T, P]. Two launches.
template <typename T>
cudaError_t adapt_backward(const Problem& pb, const LaunchPlan& plan, const T* grad,
                           const T* params, const T* xs, const T* ys, T* scratch, T* partial,
                           T* out, cudaStream_t stream);

}  // namespace pymaml::cuda
