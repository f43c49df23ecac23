// CPU kernels of the pymaml ops (registered with the dispatcher in maml_cpu.cpp; declared here
// so that C++ tests can call them directly). Arguments as csrc/ops.cpp's schemas name them.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/OptionalArrayRef.h>

#include <optional>
#include <string_view>
#include <tuple>
#include <vector>

namespace pymaml::cpu {

at::Tensor adapt(const at::Tensor& params, const at::Tensor& x_support,
                 const at::Tensor& y_support, c10::IntArrayRef sizes, double inner_lr,
                 int64_t steps, std::string_view activation, std::string_view loss,
                 bool first_order, const std::optional<at::Tensor>& rates = std::nullopt,
                 at::OptionalIntArrayRef adapt_layers = std::nullopt);

std::tuple<at::Tensor, at::Tensor> adapt_backward(
    const at::Tensor& grad, const at::Tensor& params, const at::Tensor& x_support,
    const at::Tensor& y_support, c10::IntArrayRef sizes, double inner_lr, int64_t steps,
    std::string_view activation, std::string_view loss,
    const std::optional<at::Tensor>& rates = std::nullopt,
    at::OptionalIntArrayRef adapt_layers = std::nullopt, bool first_order = false,
    bool need_rate_grad = false);

std::vector<at::Tensor> maml_loss(
    const at::Tensor& params, const at::Tensor& x_support, const at::Tensor& y_support,
    const at::Tensor& x_query, const at::Tensor& y_query, c10::IntArrayRef sizes,
    double inner_lr, int64_t steps, std::string_view activation, std::string_view loss,
    bool first_order, bool need_grad, bool keep_grad = false,
    const std::optional<at::Tensor>& rates = std::nullopt,
    at::OptionalIntArrayRef adapt_layers = std::nullopt, bool need_rate_grad = false);

std::tuple<at::Tensor, at::Tensor> reptile(const at::Tensor& params,
                                           const at::Tensor& x_support,
                                           const at::Tensor& y_support,
                                           const at::Tensor& x_query, const at::Tensor& y_query,
                                           c10::IntArrayRef sizes, double inner_lr,
                                           int64_t steps, std::string_view activation,
                                           std::string_view loss);

}  // namespace pymaml::cpu
