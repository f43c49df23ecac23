// Whether the C++ autograd code may read a tensor's memory directly (csrc/autograd.cpp,
// csrc/flatten.cpp): a contiguous CPU tensor with real data, not a fake, functional or
// symbolic-size tensor of a torch.compile trace, whose data pointer must not be touched.
#pragma once

#include <ATen/core/Tensor.h>

namespace pymaml {

inline bool plain_cpu(const at::Tensor& t) {
  const c10::TensorImpl* impl = t.unsafeGetTensorImpl();
  return t.device().is_cpu() && t.layout() == at::kStrided && !impl->is_python_dispatch() &&
         !t.key_set().has(c10::DispatchKey::Functionalize) &&
         !impl->has_symbolic_sizes_strides() && t.is_contiguous();
}

}  // namespace pymaml
