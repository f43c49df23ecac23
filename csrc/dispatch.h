// Turns the run-time activation and loss enums into compile-time template parameters, in the
// style of AT_DISPATCH_FLOATING_TYPES, so every kernel is specialised (no branch per element).
// Torch-free: usable from CPU and CUDA host code alike.
#pragma once

#include <type_traits>

#include "maml_math.h"

namespace pymaml {

template <Activation A>
using ActTag = std::integral_constant<Activation, A>;
template <Loss L>
using LossTag = std::integral_constant<Loss, L>;

// Calls f(ActTag<A>{}, LossTag<L>{}); inside, `decltype(tag)::value` is a constant expression.
template <typename F>
void dispatch_act_loss(Activation act, Loss loss, F&& f) {
  auto with_loss = [&](auto act_tag) {
    if (loss == Loss::MSE)
      f(act_tag, LossTag<Loss::MSE>{});
    else
      f(act_tag, LossTag<Loss::L1>{});
  };
  if (act == Activation::ReLU)
    with_loss(ActTag<Activation::ReLU>{});
  else
    with_loss(ActTag<Activation::Tanh>{});
}

}  // namespace pymaml
