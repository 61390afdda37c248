// Shared pieces of semu_fast::project_perpendicular_: argument checks and the projection coefficient.
#pragma once
#include <ATen/ATen.h>

#include <string_view>

namespace semu_fast {

inline void check_project_args(at::TensorList grads, at::TensorList weights, std::string_view mode,
                               c10::DeviceType device) {
  TORCH_CHECK(mode == "orthogonal" || mode == "official" || mode == "none",
              "project_perpendicular_: mode must be 'orthogonal', 'official' or 'none', got '", mode, "'");
  TORCH_CHECK(grads.size() == weights.size(), "project_perpendicular_: grads and weights must have the same length, got ",
              grads.size(), " and ", weights.size());
  for (size_t i = 0; i < grads.size(); ++i) {
    TORCH_CHECK(grads[i].scalar_type() == at::kFloat, "project_perpendicular_: grads[", i, "] must be float32, got ",
                grads[i].scalar_type());
    TORCH_CHECK(grads[i].is_contiguous(), "project_perpendicular_: grads[", i, "] must be contiguous");
    TORCH_CHECK(at::isFloatingType(weights[i].scalar_type()), "project_perpendicular_: weights[", i,
                "] must be a floating tensor, got ", weights[i].scalar_type());
    TORCH_CHECK(grads[i].sizes() == weights[i].sizes(), "project_perpendicular_: weights[", i, "] has shape ",
                weights[i].sizes(), " but grads[", i, "] has shape ", grads[i].sizes());
    TORCH_CHECK(grads[i].device().type() == device && weights[i].device() == grads[i].device(),
                "project_perpendicular_: grads[", i, "] and weights[", i, "] must both be on one ",
                c10::DeviceTypeName(device), " device, got ", grads[i].device(), " and ", weights[i].device());
  }
}

// c in G - c W: <G,W>/||W||^2 ("orthogonal"), <G,W>/||W|| ("official", as the official code), 0 ("none" or W = 0).
inline double projection_coefficient(double gw, double ww, std::string_view mode) {
  if (mode == "none" || ww <= 0.0) return 0.0;
  return mode == "orthogonal" ? gw / ww : gw / std::sqrt(ww);
}

}  // namespace semu_fast
