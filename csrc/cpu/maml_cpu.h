// CPU kernels of the pymaml ops (registered with the dispatcher in maml_cpu.cpp; declared here
// so that C++ tests can call them directly).
#pragma once

#include <ATen/core/Tensor.h>

#include <string_view>
#include <tuple>

namespace pymaml::cpu {

at::Tensor adapt(const at::Tensor& params, const at::Tensor& x_support,
                 const at::Tensor& y_support, c10::IntArrayRef sizes, double inner_lr,
                 int64_t steps, std::string_view activation, std::string_view loss,
                 bool first_order);

at::Tensor adapt_backward(const at::Tensor& grad, const at::Tensor& params,
                          const at::Tensor& x_support, const at::Tensor& y_support,
                          c10::IntArrayRef sizes, double inner_lr, int64_t steps,
                          std::string_view activation, std::string_view loss);

std::tuple<at::Tensor, at::Tensor> maml_loss(const at::Tensor& params,
                                             const at::Tensor& x_support,
                                             const at::Tensor& y_support,
                                             const at::Tensor& x_query,
                                             const at::Tensor& y_query, c10::IntArrayRef sizes,
                                             double inner_lr, int64_t steps,
                                             std::string_view activation,
                                             std::string_view loss, bool first_order,
                                             bool need_grad);

// The learned-rate / frozen-layer forms (docs/design.md §8.1): rates [R, P] (R = 1 or steps)
// instead of inner_lr, adapt_layers the layers that move.
at::Tensor adapt_rates(const at::Tensor& params, const at::Tensor& rates,
                       const at::Tensor& x_support, const at::Tensor& y_support,
                       c10::IntArrayRef sizes, int64_t steps, std::string_view activation,
                       std::string_view loss, bool first_order, c10::IntArrayRef adapt_layers);

std::tuple<at::Tensor, at::Tensor> adapt_rates_backward(
    const at::Tensor& grad, const at::Tensor& params, const at::Tensor& rates,
    const at::Tensor& x_support, const at::Tensor& y_support, c10::IntArrayRef sizes,
    int64_t steps, std::string_view activation, std::string_view loss, bool first_order,
    c10::IntArrayRef adapt_layers, bool need_rate_grad);

std::tuple<at::Tensor, at::Tensor, at::Tensor> maml_loss_rates(
    const at::Tensor& params, const at::Tensor& rates, const at::Tensor& x_support,
    const at::Tensor& y_support, const at::Tensor& x_query, const at::Tensor& y_query,
    c10::IntArrayRef sizes, int64_t steps, std::string_view activation, std::string_view loss,
    bool first_order, c10::IntArrayRef adapt_layers, bool need_grad, bool need_rate_grad);

std::tuple<at::Tensor, at::Tensor> reptile(const at::Tensor& params,
                                           const at::Tensor& x_support,
                                           const at::Tensor& y_support,
                                           const at::Tensor& x_query, const at::Tensor& y_query,
                                           c10::IntArrayRef sizes, double inner_lr,
                                           int64_t steps, std::string_view activation,
                                           std::string_view loss);

}  // namespace pymaml::cpu
