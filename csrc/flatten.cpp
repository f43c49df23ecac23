// pymaml::flatten_params: a module's weight tensors [W0, b0, W1, b1, ...] as one flat [P]
// tensor (pymaml's layout, pymaml/_layout.py), whose backward hands each tensor its slice of
// the flat gradient as a view. It is what pymaml.MAML feeds the fused ops.
//
// Why an op of our own when torch.cat([t.reshape(-1) for t in parts]) computes the same: that
// route records a reshape node per tensor and a cat node, and on an nn.Sequential of three
// Linear layers their backward cost more than the fused MAML op itself
// (benchmarks/api_layers.py: pymaml.MAML 212-290 us against 72-90 us for the functional call,
// benchmarks/NOTES.md). This op is one node: one copy forward, views backward.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <cstring>
#include <vector>

#include "real_data.h"

namespace pymaml {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using Tensor = at::Tensor;

void check_parts(at::TensorList parts) {
  TORCH_CHECK_VALUE(!parts.empty(), "pymaml::flatten_params: parts must hold at least one tensor");
  for (size_t i = 0; i < parts.size(); ++i) {
    TORCH_CHECK_TYPE(parts[i].scalar_type() == parts[0].scalar_type(),
                     "pymaml::flatten_params: parts[", i, "] has dtype ", parts[i].scalar_type(),
                     " but parts[0] has ", parts[0].scalar_type());
    TORCH_CHECK_VALUE(parts[i].device() == parts[0].device(), "pymaml::flatten_params: parts[",
                      i, "] is on ", parts[i].device(), " but parts[0] is on ", parts[0].device());
  }
}

// A contiguous CPU tensor with real data (real_data.h).
bool plain_cpu(const Tensor& t) {
  return t.device().is_cpu() && real_data(t) && t.is_contiguous();
}

bool all_plain_cpu(at::TensorList parts) {
  for (const Tensor& t : parts)
    if (!plain_cpu(t)) return false;
  return true;
}

// The forward: one flat copy. Contiguous CPU parts are copied with memcpy: a dispatched copy_
// per part cost ~5 us each here (six parts: more than the fused W1 op), at::cat of flat views
// serves the rest (other devices, strided parts, symbolic shapes under torch.compile).
Tensor flatten_params(at::TensorList parts) {
  check_parts(parts);
  if (all_plain_cpu(parts)) {
    int64_t total = 0;
    for (const Tensor& t : parts) total += t.numel();
    Tensor out = at::empty({total}, parts[0].options());
    char* dst = static_cast<char*>(out.data_ptr());
    for (const Tensor& t : parts) {
      const size_t bytes = size_t(t.numel()) * t.element_size();
      if (bytes) std::memcpy(dst, t.const_data_ptr(), bytes);
      dst += bytes;
    }
    return out;
  }
  std::vector<Tensor> flat;
  flat.reserve(parts.size());
  for (const Tensor& t : parts) flat.push_back(t.reshape_symint({t.sym_numel()}));
  return at::cat(flat);
}

// Entries [off, off + n) of the flat gradient as a tensor of `shape`: a view (no copy, and
// AccumulateGrad can keep it as .grad), or a copy where the incoming gradient's strides allow
// no view. A contiguous CPU gradient's views are made directly on its storage: through the
// dispatcher (narrow + reshape) the six views of a 3-layer MLP cost ~25 us, a third of the
// fused W1 op.
Tensor part_of(const Tensor& flat, const c10::SymInt& off, const c10::SymInt& n,
               c10::SymIntArrayRef shape) {
  if (!plain_cpu(flat) || off.is_symbolic())
    return flat.narrow_symint(0, off, n).reshape_symint(shape);
  auto impl = c10::make_intrusive<c10::TensorImpl>(c10::TensorImpl::VIEW, c10::Storage(flat.storage()),
                                                   flat.key_set(), flat.dtype());
  impl->set_sizes_contiguous(c10::asIntArrayRefUnchecked(shape));
  impl->set_storage_offset(flat.storage_offset() + off.expect_int());
  return Tensor(std::move(impl));
}

struct FlattenFunction : torch::autograd::Function<FlattenFunction> {
  static Tensor forward(AutogradContext* ctx, at::TensorList parts) {
    at::AutoDispatchBelowADInplaceOrView below;
    // Each part's shape, kept as [dim, sizes...] runs one after another (symbolic sizes under
    // torch.compile's dynamic shapes).
    std::vector<c10::SymInt> shapes;
    for (const Tensor& t : parts) {
      shapes.emplace_back(t.dim());
      shapes.insert(shapes.end(), t.sym_sizes().begin(), t.sym_sizes().end());
    }
    ctx->saved_data["shapes"] = shapes;
    // Through the dispatcher, so that fake tensors (torch.compile) reach the fake kernel.
    static const auto op = c10::Dispatcher::singleton()
                               .findSchemaOrThrow("pymaml::flatten_params", "")
                               .typed<Tensor(at::TensorList)>();
    return op.call(parts);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto shapes = ctx->saved_data["shapes"].toSymIntVector();
    const Tensor& flat = grads[0];
    variable_list out;
    c10::SymInt off = 0;
    for (size_t at = 0, i = 0; at < shapes.size(); ++i) {
      const int64_t dim = shapes[at].expect_int();
      const c10::SymIntArrayRef shape(shapes.data() + at + 1, size_t(dim));
      at += 1 + size_t(dim);
      c10::SymInt n = 1;
      for (const auto& d : shape) n = n * d;
      if (ctx->needs_input_grad(i)) out.push_back(part_of(flat, off, n, shape));
      else out.emplace_back();
      off = off + n;
    }
    return out;
  }
};

Tensor flatten_params_autograd(at::TensorList parts) {
  return FlattenFunction::apply(parts);
}

}  // namespace

TORCH_LIBRARY_IMPL(pymaml, CompositeExplicitAutograd, m) {
  m.impl("flatten_params", &flatten_params);
}

TORCH_LIBRARY_IMPL(pymaml, Autograd, m) {
  m.impl("flatten_params", &flatten_params_autograd);
}

}  // namespace pymaml
