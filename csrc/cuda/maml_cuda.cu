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

namespace pymaml::cuda {
namespace {

constexpr int kMaxThreads = 256;          // per block (__launch_bounds__ below)
constexpr int64_t kMaxChunks = 1024;      // task chunks of the reduction, at most
constexpr int64_t kPartialBudget = int64_t(1) << 24;  // elements of all partial sums, at most
constexpr size_t kScratchBudget = size_t(1) << 30;    // bytes of global workspace, at most
constexpr size_t kDefaultSharedLimit = 48 * 1024;     // dynamic shared memory without opt-in
constexpr int kReduceThreads = 256;

// Dynamic shared memory of every kernel here: one raw byte array (its type cannot depend on
// the kernel's template parameters).
extern __shared__ __align__(16) unsigned char dynamic_smem[];

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

// One block per task, chunk by chunk (see maml_cuda.h). Each block first expands theta^0 into
// the head of its workspace; the rest is maml_math.h's TaskWorkspace. maml_loss sums into the
// chunk's partial [width] = [meta-gradient (P, if need_grad), query loss]; adapt_backward
// sums the tasks' vector-Jacobian products [P]; adapt writes each task's theta^S.
template <typename T, Activation A, Loss L, Op OP>
__global__ void __launch_bounds__(kMaxThreads) task_kernel(const KernelArgs<T> args) {
  using LA = CudaLinalg;
  // The shape in shared memory (read at every layer of every primitive). Raw storage: a
  // __shared__ variable cannot have MlpShape's default member initialisers.
  __shared__ __align__(8) unsigned char shape_storage[sizeof(MlpShape)];
  MlpShape& s = *reinterpret_cast<MlpShape*>(shape_storage);
  if (threadIdx.x == 0) s = args.shape;
  __syncthreads();

  T* base = args.scratch ? args.scratch + int64_t(blockIdx.x) * args.block_elems
                         : reinterpret_cast<T*>(dynamic_smem);
  expand_params<T, LA>(s, args.params, base);  // theta^0, once per block
  const int64_t P = s.num_params, K = args.support, Q = args.query, steps = args.steps;
  TaskWorkspace<T> w = carve_workspace(base + s.num_ext, s, steps, K > Q ? K : Q);
  w.theta0 = base;
  const InnerLR<T> lr{args.inner_lr};
  const int64_t nxs = K * s.n[0], nys = K * s.n_out();
  const int64_t nxq = Q * s.n[0], nyq = Q * s.n_out();

  for (int64_t c = blockIdx.x; c < args.chunks; c += gridDim.x) {
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

// out[j] (j < n_out), else *last = scale * sum_c partial[c, j], chunks in order, one thread
// per column j < width.
template <typename T>
__global__ void __launch_bounds__(kReduceThreads)
    reduce_chunks(const T* __restrict__ partial, int64_t chunks, int64_t width, T scale,
                  T* __restrict__ out, int64_t n_out, T* __restrict__ last) {
  const int64_t j = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (j >= width) return;
  T acc = T(0);
#pragma unroll 8
  for (int64_t c = 0; c < chunks; ++c) acc += partial[c * width + j];
  acc *= scale;
  if (j < n_out)
    out[j] = acc;
  else
    *last = acc;
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

// Threads per block from the sizes alone (so that results never depend on the GPU): one per
// work item (gemm_tile.h) of the largest product of a layer, (points x width) or (width x
// width), capped.
int block_threads(const MlpShape& s, int64_t points) {
  int64_t items = gemm_items(int(std::min<int64_t>(points, kMaxThreads)), int(s.max_width));
  for (int l = 0; l < s.depth; ++l)
    items = std::max<int64_t>({items, gemm_items(int(s.in(l)), int(s.out(l))),
                               gemm_items(int(s.out(l)), int(s.in(l)))});
  const int64_t warps = (items + 31) / 32;
  return int(std::min<int64_t>(kMaxThreads, std::max<int64_t>(1, warps) * 32));
}

// What the plan needs to know about a kernel on a device, queried once per (kernel, device):
// at W2's T = 25 a whole meta-step is tens of microseconds, so the host path stays short.
struct KernelFacts {
  int sms = 0;                  // multiprocessors
  int optin = 0;                // opt-in dynamic shared memory per block, bytes
  size_t static_smem = 0;       // the kernel's static shared memory, bytes
  size_t total_memory = 0;      // the device's global memory, bytes
  size_t allowed_dynamic = kDefaultSharedLimit;  // its MaxDynamicSharedMemorySize so far
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
    if (plan.shared_bytes > kDefaultSharedLimit) {
      err = allow_dynamic_smem(reinterpret_cast<const void*>(kernel), plan.shared_bytes);
      if (err != cudaSuccess) return;
    }
    kernel<<<plan.grid, plan.threads, plan.shared_bytes, stream>>>(args);
    err = cudaGetLastError();
  });
  return err;
}

template <typename T>
cudaError_t launch_reduce(const LaunchPlan& plan, const T* partial, T scale, T* out,
                          int64_t n_out, T* last, cudaStream_t stream) {
  const int64_t blocks = (plan.width + kReduceThreads - 1) / kReduceThreads;
  reduce_chunks<T><<<unsigned(blocks), kReduceThreads, 0, stream>>>(partial, plan.chunks,
                                                                     plan.width, scale, out,
                                                                     n_out, last);
  return cudaGetLastError();
}

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

}  // namespace

template <typename T>
cudaError_t plan_launch(Op op, const Problem& pb, bool need_grad, LaunchPlan* plan) {
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
  KernelFacts facts;
  cudaError_t err = kernel_facts(kernel, &facts);
  if (err != cudaSuccess) return err;

  if (bytes + double(facts.static_smem) <= double(facts.optin) && !force_global_workspace()) {
    // The fast path: the whole workspace in shared memory, one block per chunk.
    p.shared_bytes = size_t(bytes);
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
