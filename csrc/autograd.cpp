// Autograd for the pymaml ops, in C++ (the Autograd dispatch key), so that a differentiable
// call costs a few microseconds of bookkeeping instead of a Python function on the way in and
// another on the way back. Each kernel wraps the op in a torch::autograd::Function and
// redispatches below autograd to the device's kernel (cpu/, cuda/). The fake kernels stay in
// Python (pymaml/_ops.py). docs/design.md §7.7 says what each backward computes.
//
// Gradients flow to params (and loss_params, and the rates) only: pymaml.functional sends
// calls whose data requires grad to the reference backend, and a backward that would need one
// is an error here. Double backward is an error too: the fused gradient would be a constant to
// autograd, any higher derivative silently wrong.
//
// Inputs are counted two ways: a backward returns one entry per argument of the op, while
// needs_input_grad counts the tensors given (an optional rates that is None is not one). The
// rates come after every other tensor argument, so the others' indices are the same both ways
// whether rates is given or not.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/csrc/autograd/graph_task.h>
#include <torch/csrc/autograd/variable.h>
#include <torch/library.h>

#include <initializer_list>
#include <optional>
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
using OptTensor = std::optional<Tensor>;
using c10::string_view;

// Op `name` typed as Sig, its schema's C++ signature, for a redispatch below autograd.
template <typename Sig>
c10::TypedOperatorHandle<Sig> find_op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Sig>();
}

void refuse_double_backward(const char* op) {
  TORCH_CHECK(!at::GradMode::is_enabled(), op,
              ": double backward (create_graph=True) is not supported by the fused op; use "
              "backend='reference'");
}

// Data tensors are tensors first..last (needs_input_grad's count).
void refuse_data_gradients(const char* op, AutogradContext* ctx, size_t first, size_t last) {
  for (size_t i = first; i <= last; ++i)
    TORCH_CHECK(!ctx->needs_input_grad(i), op,
                ": the fused op differentiates params only, but a data tensor requires grad; "
                "use backend='reference'");
}

// Data made under torch.inference_mode cannot be saved for backward: a normal copy.
Tensor savable(const Tensor& t) { return t.is_inference() ? t.clone() : t; }

// ---- adapt ----------------------------------------------------------------------------------

using AdaptSig = Tensor(const Tensor&, const Tensor&, const Tensor&, c10::IntArrayRef, double,
                        int64_t, string_view, string_view, bool, const OptTensor&,
                        at::OptionalIntArrayRef);
using AdaptBackwardSig = std::tuple<Tensor, Tensor>(
    const Tensor&, const Tensor&, const Tensor&, const Tensor&, c10::IntArrayRef, double,
    int64_t, string_view, string_view, const OptTensor&, at::OptionalIntArrayRef, bool, bool);

// adapt: [T, P] adapted parameters. Backward: the vector-Jacobian product adapt_backward, which
// also gives the rates' gradient; first order with the scalar rate, grad summed over tasks
// (identity Jacobians: no kernel needed).
struct AdaptFunction : torch::autograd::Function<AdaptFunction> {
  static constexpr const char* name = "pymaml::adapt";
  static constexpr size_t kArgs = 11, kRatesArg = 9, kRatesEdge = 3;

  static Tensor forward(AutogradContext* ctx, const Tensor& params, const Tensor& xs,
                        const Tensor& ys, c10::IntArrayRef sizes, double inner_lr, int64_t steps,
                        string_view activation, string_view loss, bool first_order,
                        const OptTensor& rates, at::OptionalIntArrayRef adapt_layers) {
    static const auto op = find_op<AdaptSig>(name);
    at::AutoDispatchBelowADInplaceOrView below;
    Tensor out = op.call(params, xs, ys, sizes, inner_lr, steps, activation, loss, first_order,
                         rates, adapt_layers);
    variable_list saved{savable(params), savable(xs), savable(ys)};
    if (rates.has_value()) saved.push_back(savable(*rates));
    ctx->save_for_backward(std::move(saved));
    auto& d = ctx->saved_data;
    d["sizes"] = sizes.vec();
    d["inner_lr"] = inner_lr;
    d["steps"] = steps;
    d["activation"] = std::string(activation);
    d["loss"] = std::string(loss);
    d["first_order"] = first_order;
    if (adapt_layers.has_value()) d["adapt_layers"] = adapt_layers->vec();
    return out;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    refuse_double_backward(name);
    refuse_data_gradients(name, ctx, 1, 2);
    const auto saved = ctx->get_saved_variables();
    const auto& d = ctx->saved_data;
    const bool first_order = d.at("first_order").toBool();
    const OptTensor rates = saved.size() > 3 ? OptTensor(saved[3]) : std::nullopt;
    variable_list out(kArgs);
    if (first_order && !rates.has_value()) {
      out[0] = grads[0].sum(0);
      return out;
    }
    static const auto op = find_op<AdaptBackwardSig>("pymaml::adapt_backward");
    const std::vector<int64_t> sizes = d.at("sizes").toIntVector();
    const auto layers = d.find("adapt_layers") == d.end()
                            ? std::nullopt
                            : std::optional(d.at("adapt_layers").toIntVector());
    const bool rate_grad = rates.has_value() && ctx->needs_input_grad(kRatesEdge);
    auto [grad_params, grad_rates] = op.call(
        grads[0], saved[0], saved[1], saved[2], sizes, d.at("inner_lr").toDouble(),
        d.at("steps").toInt(), d.at("activation").toStringRef(), d.at("loss").toStringRef(),
        rates, layers ? at::OptionalIntArrayRef(*layers) : std::nullopt, first_order, rate_grad);
    out[0] = grad_params;
    if (rate_grad) out[kRatesArg] = grad_rates;
    return out;
  }
};

Tensor adapt_autograd(const Tensor& params, const Tensor& xs, const Tensor& ys,
                      c10::IntArrayRef sizes, double inner_lr, int64_t steps,
                      string_view activation, string_view loss, bool first_order,
                      const OptTensor& rates, at::OptionalIntArrayRef adapt_layers) {
  return AdaptFunction::apply(params, xs, ys, sizes, inner_lr, steps, activation, loss,
                              first_order, rates, adapt_layers);
}

// ---- the loss ops: maml_loss, daml_loss -----------------------------------------------------
// Their forward computes the loss and its gradients in one sweep ([loss, then one gradient per
// differentiable input given], ops.cpp), so the backward only has the incoming gradient to
// apply. Without keep_grad the gradients are outputs, saved for the backward, which multiplies
// them by the incoming gradient even when that is 1: the caller may hold them, and a .grad
// made of them (or of a view of them further down) would change under the caller's hands
// (measured: benchmarks/NOTES.md).
// With keep_grad (the value form, the public API's door) the op returns [loss] alone and the
// gradients stay in the context, where nothing else can reach them, so the backward hands
// them over instead of scaling copies: as they are when the incoming gradient is 1 (the usual
// loss.backward()), scaled in place otherwise. A graph kept for another backward
// (retain_graph=True) gets products, as without keep_grad. benchmarks/NOTES.md has the
// measurement.

// A loss op's differentiable input: its name, its index among the tensors given (edge) and
// among the op's arguments (arg).
struct GradInput {
  const char* name;
  size_t edge, arg;
};

const std::string kept_key[] = {"grad0", "grad1", "grad2"};

// Whether a gradient output was computed: a gradient not computed is [0]; params' and
// loss_params' are never empty, the rates' [R, P] always 2-D.
bool computed(const Tensor& g) { return g.dim() == 2 || g.sym_numel() != 0; }

// The forward's end, after the op ran below autograd without keep_grad: out = [loss, the
// gradient of each input in `inputs`] (those given: the rates, last, may not be). With
// keep_grad, gradient i is kept when input i requires grad and it was computed (else None),
// and the loss alone is returned.
variable_list finish_forward(AutogradContext* ctx, variable_list out,
                             std::initializer_list<const Tensor*> inputs, bool keep_grad) {
  if (!keep_grad) {
    const variable_list grads(out.begin() + 1, out.end());
    ctx->save_for_backward(grads);
    ctx->mark_non_differentiable(grads);
    return out;
  }
  size_t i = 0;
  for (const Tensor* in : inputs) {
    Tensor& g = out[i + 1];
    const bool keep = in->requires_grad() && g.sym_sizes() == in->sym_sizes();
    ctx->saved_data[kept_key[i++]] = keep ? c10::IValue(std::move(g)) : c10::IValue();
  }
  out.resize(1);
  return out;
}

// Read on the CPU only: reading a GPU tensor's value would wait for the device.
bool is_exactly_one(const Tensor& g) {
  if (!g.device().is_cpu() || !real_data(g) || g.numel() != 1) return false;
  switch (g.scalar_type()) {
    case at::kFloat: return *g.const_data_ptr<float>() == 1.0f;
    case at::kDouble: return *g.const_data_ptr<double>() == 1.0;
    default: return false;
  }
}

// The kept gradient i times grad_out, handed over (no copy) unless the graph is kept.
Tensor hand_over(AutogradContext* ctx, size_t i, const Tensor& grad_out, bool keep_graph) {
  c10::IValue& kept = ctx->saved_data.at(kept_key[i]);
  if (keep_graph || !real_data(kept.toTensor()) || !real_data(grad_out))
    return grad_out.mul(kept.toTensor());
  Tensor g = std::move(kept).toTensor();
  kept = c10::IValue();
  if (!is_exactly_one(grad_out)) g.mul_(grad_out);
  return g;
}

// The backward of a loss op of n_args arguments whose data tensors are data_first..data_last.
variable_list loss_backward(const char* name, AutogradContext* ctx, const Tensor& grad_out,
                            c10::ArrayRef<GradInput> grad_inputs, size_t data_first,
                            size_t data_last, size_t n_args) {
  refuse_double_backward(name);
  refuse_data_gradients(name, ctx, data_first, data_last);
  // torch's error for a second backward of a freed graph, kept gradients or not
  const variable_list saved = ctx->get_saved_variables();
  const bool kept = saved.empty();  // keep_grad: the gradients are context data
  const size_t given = kept ? ctx->saved_data.size() : saved.size();
  // Every check before any hand-over, so that a refused backward leaves the node whole.
  for (size_t i = 0; i < given; ++i)
    TORCH_CHECK(!ctx->needs_input_grad(grad_inputs[i].edge) ||
                    (kept ? ctx->saved_data.at(kept_key[i]).isTensor() : computed(saved[i])),
                name, " was called with need_grad=False (or need_rate_grad=False), so it has "
                "no gradient for ", grad_inputs[i].name, " to give");
  const bool keep_graph = kept && torch::autograd::get_current_graph_task_keep_graph();
  variable_list out(n_args);
  for (size_t i = 0; i < given; ++i) {
    if (!ctx->needs_input_grad(grad_inputs[i].edge)) continue;
    out[grad_inputs[i].arg] =
        kept ? hand_over(ctx, i, grad_out, keep_graph) : grad_out.mul(saved[i]);
  }
  // torch frees a node's saved tensors after a backward that does not keep the graph, but not
  // its saved_data: drop what was not handed over (a loss kept for logging would hold it
  // otherwise).
  if (kept && !keep_graph)
    for (size_t i = 0; i < given; ++i) ctx->saved_data[kept_key[i]] = c10::IValue();
  return out;
}

using MamlLossSig = std::vector<Tensor>(
    const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&, c10::IntArrayRef,
    double, int64_t, string_view, string_view, bool, bool, bool, const OptTensor&,
    at::OptionalIntArrayRef, bool);

struct MamlLossFunction : torch::autograd::Function<MamlLossFunction> {
  static constexpr const char* name = "pymaml::maml_loss";
  static constexpr GradInput grad_inputs[] = {{"params", 0, 0}, {"rates", 5, 13}};

  static variable_list forward(AutogradContext* ctx, const Tensor& params, const Tensor& xs,
                               const Tensor& ys, const Tensor& xq, const Tensor& yq,
                               c10::IntArrayRef sizes, double inner_lr, int64_t steps,
                               string_view activation, string_view loss, bool first_order,
                               bool need_grad, bool keep_grad, const OptTensor& rates,
                               at::OptionalIntArrayRef adapt_layers, bool need_rate_grad) {
    static const auto op = find_op<MamlLossSig>(name);
    at::AutoDispatchBelowADInplaceOrView below;
    variable_list out =
        op.call(params, xs, ys, xq, yq, sizes, inner_lr, steps, activation, loss, first_order,
                need_grad, /*keep_grad=*/false, rates, adapt_layers, need_rate_grad);
    if (rates.has_value())
      return finish_forward(ctx, std::move(out), {&params, &*rates}, keep_grad);
    return finish_forward(ctx, std::move(out), {&params}, keep_grad);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    return loss_backward(name, ctx, grads[0], grad_inputs, 1, 4, 16);
  }
};

std::vector<Tensor> maml_loss_autograd(
    const Tensor& params, const Tensor& xs, const Tensor& ys, const Tensor& xq, const Tensor& yq,
    c10::IntArrayRef sizes, double inner_lr, int64_t steps, string_view activation,
    string_view loss, bool first_order, bool need_grad, bool keep_grad, const OptTensor& rates,
    at::OptionalIntArrayRef adapt_layers, bool need_rate_grad) {
  return MamlLossFunction::apply(params, xs, ys, xq, yq, sizes, inner_lr, steps, activation,
                                 loss, first_order, need_grad, keep_grad, rates, adapt_layers,
                                 need_rate_grad);
}

using DamlLossSig = std::vector<Tensor>(
    const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&, c10::IntArrayRef,
    c10::IntArrayRef, double, int64_t, string_view, string_view, string_view, bool, bool,
    const OptTensor&, bool);

struct DamlLossFunction : torch::autograd::Function<DamlLossFunction> {
  static constexpr const char* name = "pymaml::daml_loss";
  static constexpr GradInput grad_inputs[] = {
      {"params", 0, 0}, {"loss_params", 1, 1}, {"rates", 5, 14}};

  static variable_list forward(AutogradContext* ctx, const Tensor& params,
                               const Tensor& loss_params, const Tensor& xs, const Tensor& xq,
                               const Tensor& yq, c10::IntArrayRef sizes,
                               c10::IntArrayRef loss_sizes, double inner_lr, int64_t steps,
                               string_view activation, string_view loss, string_view adapt_loss,
                               bool need_grad, bool keep_grad, const OptTensor& rates,
                               bool need_rate_grad) {
    static const auto op = find_op<DamlLossSig>(name);
    at::AutoDispatchBelowADInplaceOrView below;
    variable_list out =
        op.call(params, loss_params, xs, xq, yq, sizes, loss_sizes, inner_lr, steps, activation,
                loss, adapt_loss, need_grad, /*keep_grad=*/false, rates, need_rate_grad);
    if (rates.has_value())
      return finish_forward(ctx, std::move(out), {&params, &loss_params, &*rates}, keep_grad);
    return finish_forward(ctx, std::move(out), {&params, &loss_params}, keep_grad);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    return loss_backward(name, ctx, grads[0], grad_inputs, 2, 4, 16);
  }
};

std::vector<Tensor> daml_loss_autograd(
    const Tensor& params, const Tensor& loss_params, const Tensor& xs, const Tensor& xq,
    const Tensor& yq, c10::IntArrayRef sizes, c10::IntArrayRef loss_sizes, double inner_lr,
    int64_t steps, string_view activation, string_view loss, string_view adapt_loss,
    bool need_grad, bool keep_grad, const OptTensor& rates, bool need_rate_grad) {
  return DamlLossFunction::apply(params, loss_params, xs, xq, yq, sizes, loss_sizes, inner_lr,
                                 steps, activation, loss, adapt_loss, need_grad, keep_grad,
                                 rates, need_rate_grad);
}

// ---- the ops without a derivative ------------------------------------------------------------

// daml_adapt is not differentiable (pymaml.functional sends calls that need a gradient to the
// reference): a call that would record a graph is refused, rather than handing back a result
// whose missing gradient nothing would report.
Tensor daml_adapt_autograd(const Tensor& params, const Tensor& loss_params, const Tensor& xs,
                           c10::IntArrayRef sizes, c10::IntArrayRef loss_sizes, double inner_lr,
                           int64_t steps, string_view activation, string_view adapt_loss) {
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
                                            int64_t steps, string_view activation,
                                            string_view loss) {
  static const auto op = find_op<decltype(reptile_autograd)>("pymaml::reptile");
  at::AutoDispatchBelowADInplaceOrView below;
  return op.call(params, xs, ys, xq, yq, sizes, inner_lr, steps, activation, loss);
}

// The training ops update their weights (and the rates they learn) and the optimizer state in
// place: they refuse weights that autograd tracks, and bump the version counters, so that a
// graph which saved them before the update fails its backward as after any in-place op
// instead of using the new values.
void bump_versions(std::initializer_list<const Tensor*> updated, at::TensorList state) {
  for (const Tensor* t : updated) torch::autograd::impl::bump_version(*t);
  for (const Tensor& t : state) torch::autograd::impl::bump_version(t);
}

std::tuple<Tensor, Tensor> train_chunk_autograd(
    const Tensor& params, at::TensorList state, const Tensor& xs, const Tensor& ys,
    const Tensor& xq, const Tensor& yq, c10::IntArrayRef sizes, double inner_lr, int64_t steps,
    string_view activation, string_view loss, string_view algorithm, string_view optimizer,
    c10::ArrayRef<double> hyper, const OptTensor& rates, at::OptionalIntArrayRef adapt_layers,
    bool learn_rates) {
  static const auto op = find_op<decltype(train_chunk_autograd)>("pymaml::train_chunk");
  TORCH_CHECK_VALUE(!params.requires_grad() && !(rates.has_value() && rates->requires_grad()),
                    "pymaml::train_chunk: params and rates are updated in place and must not "
                    "require grad (pass .detach())");
  std::tuple<Tensor, Tensor> out;
  {
    at::AutoDispatchBelowADInplaceOrView below;
    out = op.call(params, state, xs, ys, xq, yq, sizes, inner_lr, steps, activation, loss,
                  algorithm, optimizer, hyper, rates, adapt_layers, learn_rates);
  }
  if (rates.has_value()) bump_versions({&params, &*rates}, state);
  else bump_versions({&params}, state);
  return out;
}

std::tuple<Tensor, Tensor> daml_train_chunk_autograd(
    const Tensor& weights, at::TensorList state, const Tensor& xs, const Tensor& xq,
    const Tensor& yq, c10::IntArrayRef sizes, c10::IntArrayRef loss_sizes, double inner_lr,
    int64_t steps, string_view activation, string_view loss, string_view adapt_loss,
    string_view optimizer, c10::ArrayRef<double> hyper) {
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
  bump_versions({&weights}, state);
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(pymaml, Autograd, m) {
  m.impl("adapt", &adapt_autograd);
  m.impl("maml_loss", &maml_loss_autograd);
  m.impl("reptile", &reptile_autograd);
  m.impl("daml_loss", &daml_loss_autograd);
  m.impl("daml_adapt", &daml_adapt_autograd);
  m.impl("train_chunk", &train_chunk_autograd);
  m.impl("daml_train_chunk", &daml_train_chunk_autograd);
}

}  // namespace pymaml
