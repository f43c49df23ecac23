// The shared-memory decision of the CUDA launch plan (csrc/cuda/launch_plan.h's
// place_workspace), on the host: torch-, CUDA- and GPU-free, so CTest runs it everywhere in
// milliseconds. A block gets its kernel's static shared memory plus the dynamic bytes; without
// an opt-in the sum may not exceed 48 KB (issue 16: the launch code opted in on the dynamic
// bytes alone, so a workspace just under 48 KB with the kernels' ~0.5 KB of static shared
// memory failed to launch with "invalid argument"). Checks:
//  1. the boundary, for several static sizes: total = 48 KB exactly needs no opt-in, one byte
//     more does, including a dynamic size <= 48 KB (the window the old rule missed);
//  2. the fit: shared up to the device's opt-in limit (static + dynamic), global one byte over
//     it and whenever PYMAML_CUDA_WORKSPACE=global forces it (no opt-in then);
//  3. the two examples, sized by plan_sizes (the kernels' own arithmetic): their
//     dynamic bytes are under 48 KB, yet with the kernels' static shared memory they need the
//     opt-in. The static size used there is an estimate of what cudaFuncGetAttributes reports
//     (the __shared__ arrays in maml_cuda.cu and cuda_linalg.cuh: the MlpShape copy and 32
//     warp sums); the GPU check (scripts/cuda_smoke.py) runs the same sizes on a GPU.
#include <cstdio>
#include <string>

#include "cuda/launch_plan.h"
#include "expect.h"

namespace {

using pymaml::MlpShape;
using pymaml::cuda::kDefaultSharedLimit;
using pymaml::cuda::LaunchPlan;
using pymaml::cuda::Op;
using pymaml::cuda::place_workspace;
using pymaml::cuda::Placement;
using pymaml::cuda::Problem;

std::string describe(size_t dyn, size_t stat, size_t optin, bool force) {
  return "dynamic " + std::to_string(dyn) + " static " + std::to_string(stat) + " optin limit " +
         std::to_string(optin) + (force ? " forced global" : "");
}

void expect_placement(size_t dyn, size_t stat, size_t optin, bool force, bool shared,
                      bool opt) {
  const Placement p = place_workspace(dyn, stat, optin, force);
  const std::string d = describe(dyn, stat, optin, force);
  expect(p.shared == shared, d + ": shared " + std::to_string(p.shared));
  expect(p.optin == opt, d + ": optin " + std::to_string(p.optin));
}

// The tasks' workspace bytes of a 1-w-w-1 network (what plan_launch puts in shared memory).
size_t workspace_bytes(int64_t width, int64_t steps, int64_t points, size_t elem, Op op) {
  const int64_t sizes[4] = {1, width, width, 1};
  Problem pb;
  pb.shape = pymaml::make_shape(sizes, 3);
  pb.steps = steps;
  pb.tasks = 8;
  pb.support = points;
  pb.query = op == Op::MamlLoss ? points : 0;
  return size_t(pymaml::cuda::plan_sizes(op, pb, true).block_elems) * elem;
}

}  // namespace

int main() {
  const size_t k48 = kDefaultSharedLimit;
  const size_t h100 = 227 * 1024;  // cudaDevAttrMaxSharedMemoryPerBlockOptin on sm_90
  expect(k48 == 49152, "the default limit is 48 KB");

  // 1. The opt-in boundary is on static + dynamic.
  for (size_t stat : {size_t(0), size_t(368), size_t(496), size_t(624), size_t(4096)}) {
    expect_placement(k48 - stat, stat, h100, false, true, false);      // exactly 48 KB
    expect_placement(k48 - stat + 1, stat, h100, false, true, true);   // one byte over
    expect_placement(1, stat, h100, false, true, false);
  }
  // The window the old rule (opt in iff dynamic > 48 KB) missed: dynamic <= 48 KB, sum over.
  expect_placement(k48, 1, h100, false, true, true);
  expect_placement(k48 - 100, 496, h100, false, true, true);
  expect_placement(k48 + 1, 0, h100, false, true, true);

  // 2. The fit: static + dynamic up to the device's opt-in limit.
  for (size_t stat : {size_t(0), size_t(496)}) {
    expect_placement(h100 - stat, stat, h100, false, true, true);
    expect_placement(h100 - stat + 1, stat, h100, false, false, false);
    expect_placement(h100 - stat, stat, h100, true, false, false);  // forced global
    expect_placement(1024, stat, h100, true, false, false);
  }
  // A device whose opt-in limit is the default itself: never an opt-in.
  expect_placement(k48 - 496, 496, k48, false, true, false);
  expect_placement(k48 - 495, 496, k48, false, false, false);
  expect_placement(0, 0, h100, false, true, false);  // an empty workspace: shared, no opt-in

  // 3. The examples: 1-12-12-1, S=4, K=Q=8, float64 and 1-22-22-1, S=4, K=Q=5,
  // float32, every op (the workspace does not depend on the op: adapt's K points only).
  // Estimated static shared memory: sizeof(MlpShape) + 32 warp sums of the dtype.
  struct Example {
    int64_t width, steps, points;
    size_t elem;
    const char* name;
  };
  for (const Example& e : {Example{12, 4, 8, sizeof(double), "1-12-12-1 S=4 K=Q=8 float64"},
                           Example{22, 4, 5, sizeof(float), "1-22-22-1 S=4 K=Q=5 float32"}}) {
    const size_t stat = sizeof(MlpShape) + 32 * e.elem;
    for (Op op : {Op::MamlLoss, Op::Adapt, Op::AdaptBackward}) {
      const size_t dyn = workspace_bytes(e.width, e.steps, e.points, e.elem, op);
      const std::string d = std::string(e.name) + " op " + std::to_string(int(op)) + " (" +
                            describe(dyn, stat, h100, false) + ")";
      expect(dyn <= k48, d + ": dynamic bytes at most 48 KB (the old rule's blind spot)");
      expect(dyn + stat > k48, d + ": static + dynamic over 48 KB");
      const Placement p = place_workspace(dyn, stat, h100, false);
      expect(p.shared && p.optin, d + ": shared memory with an opt-in");
      std::printf("%s op %d: dynamic %zu + static (est.) %zu = %zu bytes, 48 KB = %zu\n", e.name,
                  int(op), dyn, stat, dyn + stat, k48);
    }
  }

  std::printf("test_launch_plan: %d checks, %d failures\n", checks, failures);
  return failures ? 1 : 0;
}
