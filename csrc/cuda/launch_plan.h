// The CUDA kernel layer's problem description and the part of its launch plan that is pure
// size arithmetic (threads per block, task chunks, partial-sum width, workspace per block):
// torch-free and CUDA-runtime-free, so that the C++ tests can plan a launch on a machine without
// CUDA and emulate it (tests/cpp/test_cuda_emulation.cpp). maml_cuda.cu's plan_launch adds what
// needs the device (shared or global workspace, grid size).
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <string>

#include "../maml_math.h"
#include "gemm_tile.h"

namespace pymaml::cuda {

enum class Op : int { MamlLoss = 0, Adapt = 1, AdaptBackward = 2 };

constexpr int kMaxThreads = 256;                      // per block (task_kernel's launch bounds)
constexpr int64_t kMaxChunks = 1024;                  // task chunks of the reduction, at most
constexpr int64_t kPartialBudget = int64_t(1) << 24;  // elements of all partial sums, at most
// Static plus dynamic shared memory a block may use unless its kernel opts in
// (cudaFuncAttributeMaxDynamicSharedMemorySize); the same on every GPU since Volta.
constexpr size_t kDefaultSharedLimit = 48 * 1024;

// One call's network, inner loop and sizes, as checked by op_args (parse_config, check_batch).
struct Problem {
  MlpShape shape;
  Activation activation = Activation::ReLU;
  Loss loss = Loss::MSE;
  int64_t steps = 0;      // S, 0..kMaxSteps
  double inner_lr = 0;    // finite in the dtype
  int64_t tasks = 0;      // T >= 1
  int64_t support = 0;    // K >= 1
  int64_t query = 0;      // Q >= 1 for maml_loss, 0 otherwise
};

// How a call is launched: computed by plan_launch, then handed to the launch function.
struct LaunchPlan {
  int threads = 0;            // per block, a multiple of 32
  int grid = 0;               // blocks
  int64_t chunks = 0;         // runs of consecutive tasks summed in order (depends on T, P only)
  int64_t width = 0;          // elements of one chunk's partial sum (0: the op has none)
  int64_t block_elems = 0;    // workspace per block, elements: theta^0 extended + TaskWorkspace
  size_t shared_bytes = 0;    // dynamic shared memory per block; 0: the workspace is in scratch
  bool smem_optin = false;    // the kernel must opt in to shared_bytes first (place_workspace)
  int64_t scratch_elems = 0;  // global workspace (grid * block_elems), 0 in shared memory
  int64_t partial_elems = 0;  // chunks * width
  std::string error;          // not empty: this call cannot run here, and what to reduce
};

// Threads per block from the sizes alone (so that results never depend on the GPU): one per
// work item (gemm_tile.h) of the largest product of a layer, (points x width) or (width x
// width), capped.
inline int block_threads(const MlpShape& s, int64_t points) {
  int64_t items = gemm_items(int(std::min<int64_t>(points, kMaxThreads)), int(s.max_width));
  for (int l = 0; l < s.depth; ++l)
    items = std::max<int64_t>({items, gemm_items(int(s.in(l)), int(s.out(l))),
                               gemm_items(int(s.out(l)), int(s.in(l)))});
  const int64_t warps = (items + 31) / 32;
  return int(std::min<int64_t>(kMaxThreads, std::max<int64_t>(1, warps) * 32));
}

// The device-independent part of the plan of `op` (need_grad: maml_loss's flag): threads,
// width, chunks, partial_elems and block_elems; grid, shared_bytes, scratch_elems and error are
// left for plan_launch.
inline LaunchPlan plan_sizes(Op op, const Problem& pb, bool need_grad) {
  LaunchPlan p;
  const MlpShape& s = pb.shape;
  const int64_t P = s.num_params;
  const int64_t points = std::max(pb.support, pb.query);
  p.threads = block_threads(s, points);
  p.width = op == Op::MamlLoss ? (need_grad ? P : 0) + 1 : op == Op::AdaptBackward ? P : 0;
  p.chunks = std::min({pb.tasks, kMaxChunks,
                       std::max<int64_t>(1, kPartialBudget / std::max<int64_t>(1, p.width))});
  p.partial_elems = p.chunks * p.width;
  p.block_elems = s.num_ext + task_workspace_size(s, pb.steps, points);
  return p;
}

// Where a block's workspace goes, and whether its kernel must opt in to more shared memory.
struct Placement {
  bool shared = false;  // in dynamic shared memory (else a global scratch slice)
  bool optin = false;   // shared, and static + dynamic bytes exceed kDefaultSharedLimit
};

// workspace_bytes: the dynamic shared memory the workspace needs; static_bytes: the kernel's
// own static shared memory (cudaFuncGetAttributes' sharedSizeBytes, which differs per kernel);
// optin_limit: the device's cudaDevAttrMaxSharedMemoryPerBlockOptin. A block gets static +
// dynamic bytes, so both the fit and the opt-in are decided on the sum: deciding the opt-in on
// the dynamic bytes alone leaves a window of static_bytes just under 48 KB where the launch
// fails with "invalid argument" (issue 16).
inline Placement place_workspace(size_t workspace_bytes, size_t static_bytes,
                                 size_t optin_limit, bool force_global) {
  Placement p;
  const size_t total = workspace_bytes + static_bytes;
  p.shared = !force_global && total <= optin_limit;
  p.optin = p.shared && total > kDefaultSharedLimit;
  return p;
}

}  // namespace pymaml::cuda
