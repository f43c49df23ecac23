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
#include <torch/autograd.h>
#include <torch/library.h>

#include <vector>

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

// The forward, on any device: one flat copy.
Tensor flatten_params(at::TensorList parts) {
  check_parts(parts);
  c10::SymInt total = 0;
  for (const Tensor& t : parts) total = total + t.sym_numel();
  Tensor out = at::empty_symint({total}, parts[0].options());
  c10::SymInt off = 0;
  for (const Tensor& t : parts) {
    out.narrow_symint(0, off, t.sym_numel()).view_symint(t.sym_sizes()).copy_(t);
    off = off + t.sym_numel();
  }
  return out;
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
    return flatten_params(parts);
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
      // A view of the flat gradient (no copy, and AccumulateGrad can keep it as .grad); a copy
      // only where the incoming gradient's strides allow no view.
      out.push_back(ctx->needs_input_grad(i) ? flat.narrow_symint(0, off, n).reshape_symint(shape)
                                             : Tensor());
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
