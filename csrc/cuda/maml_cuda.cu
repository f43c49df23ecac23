// CUDA kernels of the pymaml ops (the API and the mapping are described in maml_cuda.h): one
// thread block per task running maml_math.h's whole-task functions with CudaLinalg, and the
// deterministic second pass that adds the chunks' partial sums.
#include "maml_cuda.h"

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <map>
#include <mutex>
#include <utility>

#include "../dispatch.h"
#include "cuda_linalg.cuh"
#include "task_block.h"

namespace pymaml::cuda {
namespace {

constexpr size_t kScratchBudget = size_t(1) << 30;    // bytes of global workspace, at most
constexpr int kReduceThreads = 256;

// Dynamic shared memory of every kernel here: one raw byte array (its type cannot depend on
// the kernel's template parameters).
extern __shared__ __align__(16) unsigned char dynamic_smem[];

// One block per task, chunk by chunk (see maml_cuda.h): task_block.h's run_task_block with
// CudaLinalg, on the block's workspace (its slice of scratch, or dynamic shared memory).
template <typename T, Activation A, Loss L, Op OP>
__global__ void __launch_bounds__(kMaxThreads) task_kernel(const KernelArgs<T> args) {
  // The shape in shared memory (read at every layer of every primitive). Raw storage: a
  // __shared__ variable cannot have MlpShape's default member initialisers.
  __shared__ __align__(8) unsigned char shape_storage[sizeof(MlpShape)];
  MlpShape& s = *reinterpret_cast<MlpShape*>(shape_storage);
  if (threadIdx.x == 0) s = args.shape;
  __syncthreads();

  T* base = args.scratch ? args.scratch + int64_t(blockIdx.x) * args.block_elems
                         : reinterpret_cast<T*>(dynamic_smem);
  run_task_block<T, A, L, OP, CudaLinalg>(args, s, base, blockIdx.x, gridDim.x);
}

// out[j] (j < n_out), else *last = scale * sum_c partial[c, j], chunks in order, one thread
// per column j < width (task_block.h's reduce_column).
template <typename T>
__global__ void __launch_bounds__(kReduceThreads)
    reduce_chunks(const T* __restrict__ partial, int64_t chunks, int64_t width, T scale,
                  T* __restrict__ out, int64_t n_out, T* __restrict__ last) {
  const int64_t j = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (j < width) reduce_column(partial, chunks, width, scale, out, n_out, last, j);
}

template <typename T, Op OP>
const void* task_kernel_for(Activation act, Loss loss) {
  const void* kernel = nullptr;
  dispatch_act_loss(act, loss, [&](auto a, auto l) {
    kernel = reinterpret_cast<const void*>(
        &task_kernel<T, decltype(a)::value, decltype(l)::value, OP>);
  });
  return kernel;
}

template <typename T>
const void* task_kernel_for(Op op, Activation act, Loss loss) {
  switch (op) {
    case Op::MamlLoss: return task_kernel_for<T, Op::MamlLoss>(act, loss);
    case Op::Adapt: return task_kernel_for<T, Op::Adapt>(act, loss);
    default: return task_kernel_for<T, Op::AdaptBackward>(act, loss);
  }
}

// What the plan needs to know about a kernel on a device, queried once per (kernel, device):
// at W2's T = 25 a whole meta-step is tens of microseconds, so the host path stays short.
struct KernelFacts {
  int sms = 0;                  // multiprocessors
  int optin = 0;                // opt-in dynamic shared memory per block, bytes
  size_t static_smem = 0;       // the kernel's static shared memory, bytes
  size_t total_memory = 0;      // the device's global memory, bytes
  size_t allowed_dynamic = 0;   // the MaxDynamicSharedMemorySize set here so far (0: none;
                                // the first opt-in always sets it, whatever the default)
};

std::mutex facts_mutex;
std::map<std::pair<const void*, int>, KernelFacts>& facts_cache() {
  static std::map<std::pair<const void*, int>, KernelFacts> cache;
  return cache;
}

cudaError_t kernel_facts(const void* kernel, KernelFacts* out) {
  int device = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err != cudaSuccess) return err;
  const std::lock_guard<std::mutex> lock(facts_mutex);
  auto& cache = facts_cache();
  const auto key = std::make_pair(kernel, device);
  auto it = cache.find(key);
  if (it == cache.end()) {
    KernelFacts f;
    cudaFuncAttributes attr{};
    err = cudaDeviceGetAttribute(&f.sms, cudaDevAttrMultiProcessorCount, device);
    if (err == cudaSuccess)
      err = cudaDeviceGetAttribute(&f.optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
    if (err == cudaSuccess) err = cudaFuncGetAttributes(&attr, kernel);
    size_t free_memory = 0;
    if (err == cudaSuccess) err = cudaMemGetInfo(&free_memory, &f.total_memory);
    if (err != cudaSuccess) return err;
    f.static_smem = attr.sharedSizeBytes;
    it = cache.emplace(key, f).first;
  }
  *out = it->second;
  return cudaSuccess;
}

// Raises the kernel's dynamic shared memory limit on the current device to `bytes` (once).
cudaError_t allow_dynamic_smem(const void* kernel, size_t bytes) {
  int device = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err != cudaSuccess) return err;
  const std::lock_guard<std::mutex> lock(facts_mutex);
  auto it = facts_cache().find(std::make_pair(kernel, device));
  if (it != facts_cache().end() && it->second.allowed_dynamic >= bytes) return cudaSuccess;
  err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(bytes));
  if (err == cudaSuccess && it != facts_cache().end()) it->second.allowed_dynamic = bytes;
  return err;
}

// PYMAML_CUDA_WORKSPACE=global keeps every workspace in global memory (to compare the two
// paths, which give the same bits, and to time the slower one); read at every call.
bool force_global_workspace() {
  const char* env = std::getenv("PYMAML_CUDA_WORKSPACE");
  return env && std::strcmp(env, "global") == 0;
}

// Clears a pending CUDA error left by an earlier call elsewhere in the process (another
// library's failed launch, say), so that the cudaGetLastError() after a pymaml launch reports
// that launch's own error, not someone else's as pymaml's (issue 16). Called before every
// launch and before the plan's device queries. A sticky error (a fault that broke the
// context) cannot be cleared: every later call reports it, whoever made it.
inline void clear_stale_error() { (void)cudaGetLastError(); }

std::string mb(double bytes) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%.1f MB", bytes / (1024.0 * 1024.0));
  return buf;
}

template <typename T, Op OP>
cudaError_t launch_tasks(const Problem& pb, const LaunchPlan& plan, const KernelArgs<T>& args,
                         cudaStream_t stream) {
  cudaError_t err = cudaSuccess;
  dispatch_act_loss(pb.activation, pb.loss, [&](auto a, auto l) {
    auto kernel = &task_kernel<T, decltype(a)::value, decltype(l)::value, OP>;
    if (plan.smem_optin) {  // decided by plan_launch on static + dynamic bytes
      err = allow_dynamic_smem(reinterpret_cast<const void*>(kernel), plan.shared_bytes);
      if (err != cudaSuccess) return;
    }
    clear_stale_error();
    kernel<<<plan.grid, plan.threads, plan.shared_bytes, stream>>>(args);
    err = cudaGetLastError();
  });
  return err;
}

template <typename T>
cudaError_t launch_reduce(const LaunchPlan& plan, const T* partial, T scale, T* out,
                          int64_t n_out, T* last, cudaStream_t stream) {
  const int64_t blocks = (plan.width + kReduceThreads - 1) / kReduceThreads;
  clear_stale_error();
  reduce_chunks<T><<<unsigned(blocks), kReduceThreads, 0, stream>>>(partial, plan.chunks,
                                                                     plan.width, scale, out,
                                                                     n_out, last);
  return cudaGetLastError();
}

}  // namespace

template <typename T>
cudaError_t plan_launch(Op op, const Problem& pb, bool need_grad, LaunchPlan* plan) {
  LaunchPlan p = plan_sizes(op, pb, need_grad);  // threads, width, chunks, block_elems
  const MlpShape& s = pb.shape;
  const int64_t points = std::max(pb.support, pb.query);
  const double bytes = double(p.block_elems) * sizeof(T);
  auto too_big = [&](const std::string& limit) {  // the plan's error: what to reduce, and why
    p.error = "the workspace of one task is " + mb(bytes) + " (" +
              std::to_string(pb.steps + 4) + " parameter-sized vectors of " +
              std::to_string(s.num_ext) + " and " + std::to_string(3 * (pb.steps + 1) + 2) +
              " activation buffers of " + std::to_string(points) + " points x " +
              std::to_string(s.sum_width) + " units), over " + limit +
              ": reduce the inner steps, the points per task (K, Q) or the widths";
    *plan = p;
    return cudaSuccess;
  };
  // Every index into a task's buffers (workspace and data) must fit in 32 bits (CudaLinalg).
  if (p.block_elems + points * s.n[0] > std::numeric_limits<int32_t>::max())
    return too_big("the 2^31 elements a CUDA block can index");

  const void* kernel = task_kernel_for<T>(op, pb.activation, pb.loss);
  clear_stale_error();
  KernelFacts facts;
  cudaError_t err = kernel_facts(kernel, &facts);
  if (err != cudaSuccess) return err;

  // bytes < 2^31 * 8 here (checked above), exact in a double and a size_t.
  const Placement where = place_workspace(size_t(bytes), facts.static_smem, size_t(facts.optin),
                                          force_global_workspace());
  if (where.shared) {
    // The fast path: the whole workspace in shared memory, one block per chunk.
    p.shared_bytes = size_t(bytes);
    p.smem_optin = where.optin;
    p.grid = int(p.chunks);
  } else {
    // The workspace in global memory: one slice per block, as many blocks as can be resident
    // (the grid-stride loop over chunks does the rest), within the scratch budget.
    int per_sm = 0;
    err = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, p.threads, 0);
    if (err != cudaSuccess) return err;
    if (bytes > 0.5 * double(facts.total_memory))
      return too_big("half the GPU's " + mb(double(facts.total_memory)));
    const int64_t resident = std::max<int64_t>(1, int64_t(per_sm) * facts.sms);
    const int64_t by_memory = std::max<int64_t>(1, int64_t(double(kScratchBudget) / bytes));
    p.grid = int(std::min({p.chunks, resident, by_memory}));
    p.scratch_elems = int64_t(p.grid) * p.block_elems;
  }
  *plan = p;
  return cudaSuccess;
}

template <typename T>
cudaError_t maml_loss(const Problem& pb, const LaunchPlan& plan, const T* params, const T* xs,
                      const T* ys, const T* xq, const T* yq, bool first_order, bool need_grad,
                      T* scratch, T* partial, T* loss, T* grad, cudaStream_t stream) {
  KernelArgs<T> args = make_args(pb, plan, params, xs, ys, scratch);
  args.xq = xq;
  args.yq = yq;
  args.first_order = first_order;
  args.need_grad = need_grad;
  args.partial = partial;
  cudaError_t err = launch_tasks<T, Op::MamlLoss>(pb, plan, args, stream);
  if (err != cudaSuccess) return err;
  // The mean over the tasks: the sum times 1 / T, as the CPU op.
  const T inv_t = T(1) / T(pb.tasks);
  return launch_reduce(plan, partial, inv_t, grad, plan.width - 1, loss, stream);
}

template <typename T>
cudaError_t adapt(const Problem& pb, const LaunchPlan& plan, const T* params, const T* xs,
                  const T* ys, T* scratch, T* adapted, cudaStream_t stream) {
  KernelArgs<T> args = make_args(pb, plan, params, xs, ys, scratch);
  args.adapted = adapted;
  return launch_tasks<T, Op::Adapt>(pb, plan, args, stream);
}

template <typename T>
cudaError_t adapt_backward(const Problem& pb, const LaunchPlan& plan, const T* grad,
                           const T* params, const T* xs, const T* ys, T* scratch, T* partial,
                           T* out, cudaStream_t stream) {
  KernelArgs<T> args = make_args(pb, plan, params, xs, ys, scratch);
  args.grad_in = grad;
  args.partial = partial;
  cudaError_t err = launch_tasks<T, Op::AdaptBackward>(pb, plan, args, stream);
  if (err != cudaSuccess) return err;
  return launch_reduce(plan, partial, T(1), out, plan.width, static_cast<T*>(nullptr), stream);
}

#define PYMAML_INSTANTIATE(T)                                                                  \
  template cudaError_t plan_launch<T>(Op, const Problem&, bool, LaunchPlan*);                  \
  template cudaError_t maml_loss<T>(const Problem&, const LaunchPlan&, const T*, const T*,     \
                                    const T*, const T*, const T*, bool, bool, T*, T*, T*, T*,  \
                                    cudaStream_t);                                             \
  template cudaError_t adapt<T>(const Problem&, const LaunchPlan&, const T*, const T*,         \
                                const T*, T*, T*, cudaStream_t);                               \
  template cudaError_t adapt_backward<T>(const Problem&, const LaunchPlan&, const T*, const T*, \
                                         const T*, const T*, T*, T*, T*, cudaStream_t);
PYMAML_INSTANTIATE(float)
PYMAML_INSTANTIATE(double)
#undef PYMAML_INSTANTIATE

}  // namespace pymaml::cuda
