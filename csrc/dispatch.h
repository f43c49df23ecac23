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

// Calls f(ActTag<A>{}); inside, `decltype(tag)::value` is a constant expression.
template <typename F>
void dispatch_act(Activation act, F&& f) {
  if (act == Activation::ReLU)
    f(ActTag<Activation::ReLU>{});
  else
    f(ActTag<Activation::Tanh>{});
}

// Calls f(ActTag<A>{}, LossTag<L>{}), for every supervised loss.
template <typename F>
void dispatch_act_loss(Activation act, Loss loss, F&& f) {
  dispatch_act(act, [&](auto act_tag) {
    if (loss == Loss::MSE)
      f(act_tag, LossTag<Loss::MSE>{});
    else if (loss == Loss::L1)
      f(act_tag, LossTag<Loss::L1>{});
    else
      f(act_tag, LossTag<Loss::CrossEntropy>{});
  });
}

// DAML's adaptation loss (daml_math.h), an elementwise loss against 0: calls f(LossTag<L>{})
// for MSE or L1 only (no labels, so no cross-entropy).
template <typename F>
void dispatch_adapt_loss(Loss adapt_loss, F&& f) {
  if (adapt_loss == Loss::MSE)
    f(LossTag<Loss::MSE>{});
  else
    f(LossTag<Loss::L1>{});
}

}  // namespace pymaml
