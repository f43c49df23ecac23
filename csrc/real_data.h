// Whether a tensor's data may be read and written in C++: not a fake, functional or
// symbolic-size tensor of a torch.compile trace (whose data pointer must not be touched).
// The fast paths that skip the dispatcher (flatten.cpp's memcpy and views, autograd.cpp's
// gradient hand-over) take it only for such tensors.
#pragma once

#include <ATen/core/Tensor.h>

namespace pymaml {

inline bool real_data(const at::Tensor& t) {
  const c10::TensorImpl* impl = t.unsafeGetTensorImpl();
  return t.layout() == at::kStrided && !impl->is_python_dispatch() &&
         !t.key_set().has(c10::DispatchKey::Functionalize) && !impl->has_symbolic_sizes_strides();
}

}  // namespace pymaml
