// Autograd for the pymaml ops, in C++ (the Autograd dispatch key), so that a differentiable
// call costs a few microseconds of bookkeeping instead of a Python function on the way in and
// another on the way back. Each kernel wraps the op in a torch::autograd::Function and
// redispatches below autograd to the device's kernel (cpu/, cuda/). The fake kernels stay in
// Python (pymaml/_ops.py). docs/design.md §7.7 says what each backward computes.
//
// Gradients flow to params only: pymaml.functional sends calls whose data requires grad to the
// reference backend, and a backward that would need one is an error here. Double backward is
// an error too: the fused gradient would be a constant to autograd, any higher derivative
// silently wrong.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/csrc/autograd/graph_task.h>
#include <torch/csrc/autograd/variable.h>
#include <torch/library.h>

#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "real_data.h"

namespace pymaml {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using Tensor = at::Tensor;

// Op `name` typed as Sig, its schema's C++ signature, for a redispatch below autograd.
template <typename Sig>
c10::TypedOperatorHandle<Sig> find_op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Sig>();
}

using AdaptSig = Tensor(const Tensor&, const Tensor&, const Tensor&, c10::IntArrayRef, double,
                        int64_t, c10::string_view, c10::string_view, bool);
using AdaptBackwardSig = Tensor(const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                                c10::IntArrayRef, double, int64_t, c10::string_view,
                                c10::string_view);
using MamlLossSig = std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&,
                                               const Tensor&, const Tensor&, c10::IntArrayRef,
                                               double, int64_t, c10::string_view,
                                               c10::string_view, bool, bool);

void refuse_double_backward(const char* op) {
  TORCH_CHECK(!at::GradMode::is_enabled(), op,
              ": double backward (create_graph=True) is not supported by the fused op; use "
              "backend='reference'");
}

void refuse_data_gradients(const char* op, AutogradContext* ctx, size_t first, size_t last) {
  for (size_t i = first; i <= last; ++i)
    TORCH_CHECK(!ctx->needs_input_grad(i), op,
                ": the fused op differentiates params only, but a data tensor requires grad; "
                "use backend='reference'");
}

// The hyper-parameters a backward needs again, kept in the context.
void save_hyper(AutogradContext* ctx, c10::IntArrayRef sizes, double inner_lr, int64_t steps,
                c10::string_view activation, c10::string_view loss) {
  ctx->saved_data["sizes"] = sizes.vec();
  ctx->saved_data["inner_lr"] = inner_lr;
  ctx->saved_data["steps"] = steps;
  ctx->saved_data["activation"] = std::string(activation);
  ctx->saved_data["loss"] = std::string(loss);
}

// adapt: [T, P] adapted parameters. Backward: the vector-Jacobian product adapt_backward
// (second order), or grad summed over tasks when first_order (identity Jacobians).
struct AdaptFunction : torch::autograd::Function<AdaptFunction> {
  static Tensor forward(AutogradContext* ctx, const Tensor& params, const Tensor& xs,
                        const Tensor& ys, c10::IntArrayRef sizes, double inner_lr, int64_t steps,
                        c10::string_view activation, c10::string_view loss, bool first_order) {
    static const auto op = find_op<AdaptSig>("pymaml::adapt");
    at::AutoDispatchBelowADInplaceOrView below;
    Tensor out = op.call(params, xs, ys, sizes, inner_lr, steps, activation, loss, first_order);
    // Data made under torch.inference_mode cannot be saved for backward: a normal copy.
    const auto savable = [](const Tensor& t) { return t.is_inference() ? t.clone() : t; };
    ctx->save_for_backward({params, savable(xs), savable(ys)});
    save_hyper(ctx, sizes, inner_lr, steps, activation, loss);
    ctx->saved_data["first_order"] = first_order;
    return out;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    constexpr const char* name = "pymaml::adapt";
    refuse_double_backward(name);
    refuse_data_gradients(name, ctx, 1, 2);
    Tensor grad_params;
    if (ctx->saved_data["first_order"].toBool()) {
      grad_params = grads[0].sum(0);
    } else {
      static const auto op = find_op<AdaptBackwardSig>("pymaml::adapt_backward");
      const auto saved = ctx->get_saved_variables();
      const auto& d = ctx->saved_data;
      const std::vector<int64_t> sizes = d.at("sizes").toIntVector();
      grad_params = op.call(grads[0], saved[0], saved[1], saved[2], sizes,
                            d.at("inner_lr").toDouble(), d.at("steps").toInt(),
                            d.at("activation").toStringRef(), d.at("loss").toStringRef());
    }
    return {grad_params, Tensor(), Tensor(), Tensor(), Tensor(), Tensor(), Tensor(), Tensor(),
            Tensor()};
  }
};

// maml_loss: (loss, meta-gradient). The meta-gradient is computed in the forward pass, in the
// same sweep as the loss, so the backward is grad_loss * meta_gradient.
struct MamlLossFunction : torch::autograd::Function<MamlLossFunction> {
  static variable_list forward(AutogradContext* ctx, const Tensor& params, const Tensor& xs,
                               const Tensor& ys, const Tensor& xq, const Tensor& yq,
                               c10::IntArrayRef sizes, double inner_lr, int64_t steps,
                               c10::string_view activation, c10::string_view loss,
                               bool first_order, bool need_grad) {
    static const auto op = find_op<MamlLossSig>("pymaml::maml_loss");
    at::AutoDispatchBelowADInplaceOrView below;
    auto [value, meta_grad] = op.call(params, xs, ys, xq, yq, sizes, inner_lr, steps, activation,
                                      loss, first_order, need_grad);
    ctx->save_for_backward({meta_grad});
    ctx->mark_non_differentiable({meta_grad});
    return {value, meta_grad};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    constexpr const char* name = "pymaml::maml_loss";
    refuse_double_backward(name);
    refuse_data_gradients(name, ctx, 1, 4);
    const Tensor meta_grad = ctx->get_saved_variables()[0];
    TORCH_CHECK(meta_grad.sym_numel() != 0 || !ctx->needs_input_grad(0), name,
                " was called with need_grad=False, so it has no meta-gradient to give: call it "
                "with need_grad=True");
    variable_list out(12);
    if (ctx->needs_input_grad(0)) out[0] = grads[0].mul(meta_grad);
    return out;
  }
};

Tensor adapt_autograd(const Tensor& params, const Tensor& xs, const Tensor& ys,
                      c10::IntArrayRef sizes, double inner_lr, int64_t steps,
                      c10::string_view activation, c10::string_view loss, bool first_order) {
  return AdaptFunction::apply(params, xs, ys, sizes, inner_lr, steps, activation, loss,
                              first_order);
}

std::tuple<Tensor, Tensor> maml_loss_autograd(const Tensor& params, const Tensor& xs,
                                              const Tensor& ys, const Tensor& xq,
                                              const Tensor& yq, c10::IntArrayRef sizes,
                                              double inner_lr, int64_t steps,
                                              c10::string_view activation,
                                              c10::string_view loss, bool first_order,
                                              bool need_grad) {
  auto out = MamlLossFunction::apply(params, xs, ys, xq, yq, sizes, inner_lr, steps, activation,
                                     loss, first_order, need_grad);
  return {out[0], out[1]};
}

// The learned-rate forms: gradients to params and rates (docs/design.md §8.1).
using AdaptRatesSig = Tensor(const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                             c10::IntArrayRef, int64_t, c10::string_view, c10::string_view, bool,
                             c10::IntArrayRef);
using AdaptRatesBackwardSig = std::tuple<Tensor, Tensor>(
    const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&, c10::IntArrayRef,
    int64_t, c10::string_view, c10::string_view, bool, c10::IntArrayRef, bool);
using MamlLossRatesSig = std::tuple<Tensor, Tensor, Tensor>(
    const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&,
    c10::IntArrayRef, int64_t, c10::string_view, c10::string_view, bool, c10::IntArrayRef, bool,
    bool);

struct AdaptRatesFunction : torch::autograd::Function<AdaptRatesFunction> {
  static Tensor forward(AutogradContext* ctx, const Tensor& params, const Tensor& rates,
                        const Tensor& xs, const Tensor& ys, c10::IntArrayRef sizes, int64_t steps,
                        c10::string_view activation, c10::string_view loss, bool first_order,
                        c10::IntArrayRef adapt_layers) {
    static const auto op = find_op<AdaptRatesSig>("pymaml::adapt_rates");
    at::AutoDispatchBelowADInplaceOrView below;
    Tensor out = op.call(params, rates, xs, ys, sizes, steps, activation, loss, first_order,
                         adapt_layers);
    const auto savable = [](const Tensor& t) { return t.is_inference() ? t.clone() : t; };
    ctx->save_for_backward({savable(params), savable(rates), savable(xs), savable(ys)});
    save_hyper(ctx, sizes, 0.0, steps, activation, loss);
    ctx->saved_data["first_order"] = first_order;
    ctx->saved_data["adapt_layers"] = adapt_layers.vec();
    return out;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    constexpr const char* name = "pymaml::adapt_rates";
    refuse_double_backward(name);
    refuse_data_gradients(name, ctx, 2, 3);
    static const auto op = find_op<AdaptRatesBackwardSig>("pymaml::adapt_rates_backward");
    const auto saved = ctx->get_saved_variables();
    const auto& d = ctx->saved_data;
    const std::vector<int64_t> sizes = d.at("sizes").toIntVector();
    const std::vector<int64_t> layers = d.at("adapt_layers").toIntVector();
    auto [grad_params, grad_rates] = op.call(
        grads[0], saved[0], saved[1], saved[2], saved[3], sizes, d.at("steps").toInt(),
        d.at("activation").toStringRef(), d.at("loss").toStringRef(),
        d.at("first_order").toBool(), layers, ctx->needs_input_grad(1));
    variable_list out(10);
    out[0] = grad_params;
    if (ctx->needs_input_grad(1)) out[1] = grad_rates;
    return out;
  }
};

// The meta-gradients come from the forward sweep, as in maml_loss; the backward scales them.
struct MamlLossRatesFunction : torch::autograd::Function<MamlLossRatesFunction> {
  static variable_list forward(AutogradContext* ctx, const Tensor& params, const Tensor& rates,
                               const Tensor& xs, const Tensor& ys, const Tensor& xq,
                               const Tensor& yq, c10::IntArrayRef sizes, int64_t steps,
                               c10::string_view activation, c10::string_view loss,
                               bool first_order, c10::IntArrayRef adapt_layers, bool need_grad,
                               bool need_rate_grad) {
    static const auto op = find_op<MamlLossRatesSig>("pymaml::maml_loss_rates");
    at::AutoDispatchBelowADInplaceOrView below;
    auto [value, meta_grad, rate_grad] = op.call(params, rates, xs, ys, xq, yq, sizes, steps,
                                                 activation, loss, first_order, adapt_layers,
                                                 need_grad, need_rate_grad);
    ctx->save_for_backward({meta_grad, rate_grad});
    ctx->mark_non_differentiable({meta_grad, rate_grad});
    return {value, meta_grad, rate_grad};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    constexpr const char* name = "pymaml::maml_loss_rates";
    refuse_double_backward(name);
    refuse_data_gradients(name, ctx, 2, 5);
    const auto saved = ctx->get_saved_variables();
    TORCH_CHECK(saved[0].sym_numel() != 0 || !ctx->needs_input_grad(0), name,
                " was called with need_grad=False, so it has no meta-gradient to give");
    TORCH_CHECK(saved[1].dim() == 2 || !ctx->needs_input_grad(1), name,
                " was called with need_rate_grad=False (or need_grad=False), so it has no "
                "gradient for the rates to give");
    variable_list out(14);
    if (ctx->needs_input_grad(0)) out[0] = grads[0].mul(saved[0]);
    if (ctx->needs_input_grad(1)) out[1] = grads[0].mul(saved[1]);
    return out;
  }
};

Tensor adapt_rates_autograd(const Tensor& params, const Tensor& rates, const Tensor& xs,
                            const Tensor& ys, c10::IntArrayRef sizes, int64_t steps,
                            c10::string_view activation, c10::string_view loss,
                            bool first_order, c10::IntArrayRef adapt_layers) {
  return AdaptRatesFunction::apply(params, rates, xs, ys, sizes, steps, activation, loss,
                                   first_order, adapt_layers);
}

std::tuple<Tensor, Tensor, Tensor> maml_loss_rates_autograd(
    const Tensor& params, const Tensor& rates, const Tensor& xs, const Tensor& ys,
    const Tensor& xq, const Tensor& yq, c10::IntArrayRef sizes, int64_t steps,
    c10::string_view activation, c10::string_view loss, bool first_order,
    c10::IntArrayRef adapt_layers, bool need_grad, bool need_rate_grad) {
  auto out = MamlLossRatesFunction::apply(params, rates, xs, ys, xq, yq, sizes, steps,
                                          activation, loss, first_order, adapt_layers, need_grad,
                                          need_rate_grad);
  return {out[0], out[1], out[2]};
}

// daml_loss: gradients to params and loss_params, computed in the forward sweep.
using DamlLossSig = std::tuple<Tensor, Tensor, Tensor>(
    const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&, c10::IntArrayRef,
    c10::IntArrayRef, double, int64_t, c10::string_view, c10::string_view, c10::string_view,
    bool);

struct DamlLossFunction : torch::autograd::Function<DamlLossFunction> {
  static variable_list forward(AutogradContext* ctx, const Tensor& params,
                               const Tensor& loss_params, const Tensor& xs, const Tensor& xq,
                               const Tensor& yq, c10::IntArrayRef sizes,
                               c10::IntArrayRef loss_sizes, double inner_lr, int64_t steps,
                               c10::string_view activation, c10::string_view loss,
                               c10::string_view adapt_loss, bool need_grad) {
    static const auto op = find_op<DamlLossSig>("pymaml::daml_loss");
    at::AutoDispatchBelowADInplaceOrView below;
    auto [value, grad, grad_loss] = op.call(params, loss_params, xs, xq, yq, sizes, loss_sizes,
                                            inner_lr, steps, activation, loss, adapt_loss,
                                            need_grad);
    ctx->save_for_backward({grad, grad_loss});
    ctx->mark_non_differentiable({grad, grad_loss});
    return {value, grad, grad_loss};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    constexpr const char* name = "pymaml::daml_loss";
    refuse_double_backward(name);
    refuse_data_gradients(name, ctx, 2, 4);
    const auto saved = ctx->get_saved_variables();
    TORCH_CHECK(saved[0].sym_numel() != 0 || !(ctx->needs_input_grad(0) ||
                                               ctx->needs_input_grad(1)),
                name, " was called with need_grad=False, so it has no gradient to give");
    variable_list out(13);
    if (ctx->needs_input_grad(0)) out[0] = grads[0].mul(saved[0]);
    if (ctx->needs_input_grad(1)) out[1] = grads[0].mul(saved[1]);
    return out;
  }
};

std::tuple<Tensor, Tensor, Tensor> daml_loss_autograd(
    const Tensor& params, const Tensor& loss_params, const Tensor& xs, const Tensor& xq,
    const Tensor& yq, c10::IntArrayRef sizes, c10::IntArrayRef loss_sizes, double inner_lr,
    int64_t steps, c10::string_view activation, c10::string_view loss,
    c10::string_view adapt_loss, bool need_grad) {
  auto out = DamlLossFunction::apply(params, loss_params, xs, xq, yq, sizes, loss_sizes,
                                     inner_lr, steps, activation, loss, adapt_loss, need_grad);
  return {out[0], out[1], out[2]};
}

// daml_loss_rates: gradients to params, loss_params and rates, from the forward sweep.
using DamlLossRatesSig = std::tuple<Tensor, Tensor, Tensor, Tensor>(
    const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&,
    c10::IntArrayRef, c10::IntArrayRef, int64_t, c10::string_view, c10::string_view,
    c10::string_view, bool, bool);

struct DamlLossRatesFunction : torch::autograd::Function<DamlLossRatesFunction> {
  static variable_list forward(AutogradContext* ctx, const Tensor& params,
                               const Tensor& loss_params, const Tensor& rates, const Tensor& xs,
                               const Tensor& xq, const Tensor& yq, c10::IntArrayRef sizes,
                               c10::IntArrayRef loss_sizes, int64_t steps,
                               c10::string_view activation, c10::string_view loss,
                               c10::string_view adapt_loss, bool need_grad,
                               bool need_rate_grad) {
    static const auto op = find_op<DamlLossRatesSig>("pymaml::daml_loss_rates");
    at::AutoDispatchBelowADInplaceOrView below;
    auto [value, grad, grad_loss, grad_rates] =
        op.call(params, loss_params, rates, xs, xq, yq, sizes, loss_sizes, steps, activation,
                loss, adapt_loss, need_grad, need_rate_grad);
    ctx->save_for_backward({grad, grad_loss, grad_rates});
    ctx->mark_non_differentiable({grad, grad_loss, grad_rates});
    return {value, grad, grad_loss, grad_rates};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    constexpr const char* name = "pymaml::daml_loss_rates";
    refuse_double_backward(name);
    refuse_data_gradients(name, ctx, 3, 5);
    const auto saved = ctx->get_saved_variables();
    TORCH_CHECK(saved[0].sym_numel() != 0 || !(ctx->needs_input_grad(0) ||
                                               ctx->needs_input_grad(1)),
                name, " was called with need_grad=False, so it has no gradient to give");
    TORCH_CHECK(saved[2].dim() == 2 || !ctx->needs_input_grad(2), name,
                " was called with need_rate_grad=False (or need_grad=False), so it has no "
                "gradient for the rates to give");
    variable_list out(14);
    for (size_t i = 0; i < 3; ++i)
      if (ctx->needs_input_grad(i)) out[i] = grads[0].mul(saved[i]);
    return out;
  }
};

std::tuple<Tensor, Tensor, Tensor, Tensor> daml_loss_rates_autograd(
    const Tensor& params, const Tensor& loss_params, const Tensor& rates, const Tensor& xs,
    const Tensor& xq, const Tensor& yq, c10::IntArrayRef sizes, c10::IntArrayRef loss_sizes,
    int64_t steps, c10::string_view activation, c10::string_view loss,
    c10::string_view adapt_loss, bool need_grad, bool need_rate_grad) {
  auto out = DamlLossRatesFunction::apply(params, loss_params, rates, xs, xq, yq, sizes,
                                          loss_sizes, steps, activation, loss, adapt_loss,
                                          need_grad, need_rate_grad);
  return {out[0], out[1], out[2], out[3]};
}

// daml_adapt is not differentiable (pymaml.functional sends calls that need a gradient to the
// reference): a call that would record a graph is refused, rather than handing back a result
// whose missing gradient nothing would report.
Tensor daml_adapt_autograd(const Tensor& params, const Tensor& loss_params, const Tensor& xs,
                           c10::IntArrayRef sizes, c10::IntArrayRef loss_sizes, double inner_lr,
                           int64_t steps, c10::string_view activation,
                           c10::string_view adapt_loss) {
  static const auto op = find_op<decltype(daml_adapt_autograd)>("pymaml::daml_adapt");
  TORCH_CHECK(!at::GradMode::is_enabled() ||
                  !(params.requires_grad() || loss_params.requires_grad() || xs.requires_grad()),
              "pymaml::daml_adapt is not differentiable, and an input requires grad: call it "
              "under torch.no_grad(), or use pymaml.daml_adapt (which runs the reference then)");
  at::AutoDispatchBelowADInplaceOrView below;
  return op.call(params, loss_params, xs, sizes, loss_sizes, inner_lr, steps, activation,
                 adapt_loss);
}

// reptile: a direction, not a derivative. Its outputs come back without a gradient function
// (so a backward through them says they do not require grad, rather than warning that autograd
// is not implemented and leaving params.grad empty).
std::tuple<Tensor, Tensor> reptile_autograd(const Tensor& params, const Tensor& xs,
                                            const Tensor& ys, const Tensor& xq, const Tensor& yq,
                                            c10::IntArrayRef sizes, double inner_lr,
                                            int64_t steps, c10::string_view activation,
                                            c10::string_view loss) {
  static const auto op = find_op<decltype(reptile_autograd)>("pymaml::reptile");
  at::AutoDispatchBelowADInplaceOrView below;
  return op.call(params, xs, ys, xq, yq, sizes, inner_lr, steps, activation, loss);
}

// train_chunk updates params and the optimizer state in place: it refuses params that autograd
// tracks, and bumps the version counters, so that a graph which saved them before the update
// fails its backward as after any in-place op instead of using the new values.
std::tuple<Tensor, Tensor> train_chunk_autograd(
    const Tensor& params, at::TensorList state, const Tensor& xs, const Tensor& ys,
    const Tensor& xq, const Tensor& yq, c10::IntArrayRef sizes, double inner_lr, int64_t steps,
    c10::string_view activation, c10::string_view loss, c10::string_view algorithm,
    c10::string_view optimizer, c10::ArrayRef<double> hyper) {
  static const auto op = find_op<decltype(train_chunk_autograd)>("pymaml::train_chunk");
  TORCH_CHECK_VALUE(!params.requires_grad(), "pymaml::train_chunk: params is updated in place "
                    "and must not require grad (pass params.detach())");
  std::tuple<Tensor, Tensor> out;
  {
    at::AutoDispatchBelowADInplaceOrView below;
    out = op.call(params, state, xs, ys, xq, yq, sizes, inner_lr, steps, activation, loss,
                  algorithm, optimizer, hyper);
  }
  torch::autograd::impl::bump_version(params);
  for (const Tensor& t : state) torch::autograd::impl::bump_version(t);
  return out;
}

// As train_chunk.
std::tuple<Tensor, Tensor> train_chunk_rates_autograd(
    const Tensor& params, const Tensor& rates, at::TensorList state, const Tensor& xs,
    const Tensor& ys, const Tensor& xq, const Tensor& yq, c10::IntArrayRef sizes, int64_t steps,
    c10::string_view activation, c10::string_view loss, c10::string_view algorithm,
    c10::IntArrayRef adapt_layers, bool learn_rates, c10::string_view optimizer,
    c10::ArrayRef<double> hyper) {
  static const auto op =
      find_op<decltype(train_chunk_rates_autograd)>("pymaml::train_chunk_rates");
  TORCH_CHECK_VALUE(!params.requires_grad() && !rates.requires_grad(),
                    "pymaml::train_chunk_rates: params and rates are updated in place and must "
                    "not require grad (pass .detach())");
  std::tuple<Tensor, Tensor> out;
  {
    at::AutoDispatchBelowADInplaceOrView below;
    out = op.call(params, rates, state, xs, ys, xq, yq, sizes, steps, activation, loss,
                  algorithm, adapt_layers, learn_rates, optimizer, hyper);
  }
  torch::autograd::impl::bump_version(params);
  torch::autograd::impl::bump_version(rates);
  for (const Tensor& t : state) torch::autograd::impl::bump_version(t);
  return out;
}

// As train_chunk.
std::tuple<Tensor, Tensor> daml_train_chunk_autograd(
    const Tensor& weights, at::TensorList state, const Tensor& xs, const Tensor& xq,
    const Tensor& yq, c10::IntArrayRef sizes, c10::IntArrayRef loss_sizes, double inner_lr,
    int64_t steps, c10::string_view activation, c10::string_view loss,
    c10::string_view adapt_loss, c10::string_view optimizer, c10::ArrayRef<double> hyper) {
  static const auto op =
      find_op<decltype(daml_train_chunk_autograd)>("pymaml::daml_train_chunk");
  TORCH_CHECK_VALUE(!weights.requires_grad(), "pymaml::daml_train_chunk: weights is updated in "
                    "place and must not require grad (pass weights.detach())");
  std::tuple<Tensor, Tensor> out;
  {
    at::AutoDispatchBelowADInplaceOrView below;
    out = op.call(weights, state, xs, xq, yq, sizes, loss_sizes, inner_lr, steps, activation,
                  loss, adapt_loss, optimizer, hyper);
  }
  torch::autograd::impl::bump_version(weights);
  for (const Tensor& t : state) torch::autograd::impl::bump_version(t);
  return out;
}

// ---- The loss ops' values alone: the public API's door ----
// maml_loss_value and its siblings return the loss alone. The gradients their forward
// computes are kept in the context, where nothing else can reach them, so the backward hands
// them over instead of scaling copies: as they are when the incoming gradient is 1 (the usual
// loss.backward()), scaled in place otherwise. The full ops above cannot: their gradient
// outputs may still be held by the caller. A graph kept for another backward
// (retain_graph=True) gets products, as the full ops always give. benchmarks/NOTES.md has the
// measurement.

// Read on the CPU only: reading a GPU tensor's value would wait for the device.
bool is_exactly_one(const Tensor& g) {
  if (!g.device().is_cpu() || !real_data(g) || g.numel() != 1) return false;
  switch (g.scalar_type()) {
    case at::kFloat: return *g.const_data_ptr<float>() == 1.0f;
    case at::kDouble: return *g.const_data_ptr<double>() == 1.0;
    default: return false;
  }
}

const std::string kept_key[] = {"grad0", "grad1", "grad2"};

// The gradient for input i: kept gradient i times grad_out.
Tensor hand_over(AutogradContext* ctx, size_t i, const Tensor& grad_out, bool keep_graph) {
  c10::IValue& kept = ctx->saved_data.at(kept_key[i]);
  if (keep_graph || !real_data(kept.toTensor()) || !real_data(grad_out))
    return grad_out.mul(kept.toTensor());
  Tensor g = std::move(kept).toTensor();
  kept = c10::IValue();
  if (!is_exactly_one(grad_out)) g.mul_(grad_out);
  return g;
}

// Spec names the value op, its full op, the inputs its gradients are for (its first
// inputs, in order) and the range of its data inputs; FullSig is the full op's signature.
template <typename Spec, typename FullSig>
struct LossValue;

template <typename Spec, typename... Grads, typename... Args>
struct LossValue<Spec, std::tuple<Tensor, Grads...>(Args...)> {
  using FullSig = std::tuple<Tensor, Grads...>(Args...);
  static constexpr size_t n_grads = sizeof...(Grads);

  static const c10::TypedOperatorHandle<FullSig>& full_op() {
    static const auto op = find_op<FullSig>(Spec::full);
    return op;
  }

  struct Fn : torch::autograd::Function<Fn> {
    static Tensor forward(AutogradContext* ctx, Args... args) {
      at::AutoDispatchBelowADInplaceOrView below;
      auto out = full_op().call(args...);
      keep(ctx, out, std::forward_as_tuple(args...), std::make_index_sequence<n_grads>());
      return std::get<0>(out);
    }

    static variable_list backward(AutogradContext* ctx, variable_list grads) {
      refuse_double_backward(Spec::name);
      refuse_data_gradients(Spec::name, ctx, Spec::data_first, Spec::data_last);
      ctx->get_saved_variables();  // torch's error for a second backward of a freed graph
      // Every check before any hand-over, so that a refused backward leaves the node whole.
      for (size_t i = 0; i < n_grads; ++i)
        TORCH_CHECK(!ctx->needs_input_grad(i) || ctx->saved_data.at(kept_key[i]).isTensor(),
                    Spec::name, " was called with need_grad=False (or need_rate_grad=False), so "
                    "it has no gradient for ", Spec::inputs[i], " to give");
      const bool keep_graph = torch::autograd::get_current_graph_task_keep_graph();
      variable_list out(sizeof...(Args));
      for (size_t i = 0; i < n_grads; ++i)
        if (ctx->needs_input_grad(i)) out[i] = hand_over(ctx, i, grads[0], keep_graph);
      // torch frees a node's saved tensors after a backward that does not keep the graph, but
      // not its saved_data: drop what was not handed over (a loss kept for logging would hold
      // it otherwise).
      if (!keep_graph)
        for (size_t i = 0; i < n_grads; ++i) ctx->saved_data[kept_key[i]] = c10::IValue();
      return out;
    }
  };

  // Gradient i (output i + 1) kept for input i when input i requires grad; one not computed
  // (need_grad=False) comes back empty, not input i's shape, and is kept as None, as is one
  // nothing will ask for.
  template <typename Out, typename In, size_t... I>
  static void keep(AutogradContext* ctx, Out& out, const In& in, std::index_sequence<I...>) {
    ((ctx->saved_data[kept_key[I]] =
          std::get<I>(in).requires_grad() &&
                  std::get<I + 1>(out).sym_sizes() == std::get<I>(in).sym_sizes()
              ? c10::IValue(std::move(std::get<I + 1>(out)))
              : c10::IValue()),
     ...);
  }

  static Tensor autograd(Args... args) { return Fn::apply(args...); }

  // Below autograd (inference mode, or nothing to differentiate): the full op's value.
  static Tensor value(Args... args) { return std::get<0>(full_op().call(args...)); }
};

struct MamlLossSpec {
  static constexpr const char* name = "pymaml::maml_loss_value";
  static constexpr const char* full = "pymaml::maml_loss";
  static constexpr const char* inputs[] = {"params"};
  static constexpr size_t data_first = 1, data_last = 4;
};
struct MamlLossRatesSpec {
  static constexpr const char* name = "pymaml::maml_loss_rates_value";
  static constexpr const char* full = "pymaml::maml_loss_rates";
  static constexpr const char* inputs[] = {"params", "rates"};
  static constexpr size_t data_first = 2, data_last = 5;
};
struct DamlLossSpec {
  static constexpr const char* name = "pymaml::daml_loss_value";
  static constexpr const char* full = "pymaml::daml_loss";
  static constexpr const char* inputs[] = {"params", "loss_params"};
  static constexpr size_t data_first = 2, data_last = 4;
};
struct DamlLossRatesSpec {
  static constexpr const char* name = "pymaml::daml_loss_rates_value";
  static constexpr const char* full = "pymaml::daml_loss_rates";
  static constexpr const char* inputs[] = {"params", "loss_params", "rates"};
  static constexpr size_t data_first = 3, data_last = 5;
};

using MamlLossValue = LossValue<MamlLossSpec, MamlLossSig>;
using MamlLossRatesValue = LossValue<MamlLossRatesSpec, MamlLossRatesSig>;
using DamlLossValue = LossValue<DamlLossSpec, DamlLossSig>;
using DamlLossRatesValue = LossValue<DamlLossRatesSpec, DamlLossRatesSig>;

}  // namespace

TORCH_LIBRARY_IMPL(pymaml, Autograd, m) {
  m.impl("adapt", &adapt_autograd);
  m.impl("maml_loss", &maml_loss_autograd);
  m.impl("reptile", &reptile_autograd);
  m.impl("train_chunk", &train_chunk_autograd);
  m.impl("adapt_rates", &adapt_rates_autograd);
  m.impl("maml_loss_rates", &maml_loss_rates_autograd);
  m.impl("daml_loss", &daml_loss_autograd);
  m.impl("daml_adapt", &daml_adapt_autograd);
  m.impl("daml_loss_rates", &daml_loss_rates_autograd);
  m.impl("daml_train_chunk", &daml_train_chunk_autograd);
  m.impl("train_chunk_rates", &train_chunk_rates_autograd);
  m.impl("maml_loss_value", &MamlLossValue::autograd);
  m.impl("maml_loss_rates_value", &MamlLossRatesValue::autograd);
  m.impl("daml_loss_value", &DamlLossValue::autograd);
  m.impl("daml_loss_rates_value", &DamlLossRatesValue::autograd);
}

TORCH_LIBRARY_IMPL(pymaml, CompositeExplicitAutograd, m) {
  m.impl("maml_loss_value", &MamlLossValue::value);
  m.impl("maml_loss_rates_value", &MamlLossRatesValue::value);
  m.impl("daml_loss_value", &DamlLossValue::value);
  m.impl("daml_loss_rates_value", &DamlLossRatesValue::value);
}

}  // namespace pymaml
