// Shared pieces of semu_fast::project_perpendicular_: argument checks and the projection coefficient, used by the
// CPU and CUDA kernels alike.
#pragma once
#include <ATen/ATen.h>

#include <cmath>
#include <string_view>

#include "disjoint.h"
#include "dtypes.h"
#include "host_device.h"

namespace semu_fast {

enum class Projection { kOrthogonal, kOfficial, kNone };

inline Projection parse_projection(std::string_view mode) {
  if (mode == "orthogonal") return Projection::kOrthogonal;
  if (mode == "official") return Projection::kOfficial;
  TORCH_CHECK(mode == "none", "project_perpendicular_: mode must be 'orthogonal', 'official' or 'none', got '",
              mode, "'");
  return Projection::kNone;
}

// c in G - c W, from gw = <G,W> and ww = ||W||^2: gw / ww ("orthogonal": the result is orthogonal to W),
// gw / ||W|| ("official", as the official code divides by the norm), 0 ("none", or W = 0).
SEMU_HD inline double projection_coefficient(double gw, double ww, Projection mode) {
  if (mode == Projection::kNone || ww <= 0.0) return 0.0;
  return mode == Projection::kOrthogonal ? gw / ww : gw / sqrt(ww);
}

// Returns the parsed mode. Runs over every pair before any grad is written.
inline Projection check_project_args(at::TensorList grads, at::TensorList weights, std::string_view mode,
                                     c10::DeviceType device) {
  const Projection projection = parse_projection(mode);
  TORCH_CHECK(grads.size() == weights.size(), "project_perpendicular_: grads and weights must have the same length, got ",
              grads.size(), " and ", weights.size());
  for (size_t i = 0; i < grads.size(); ++i) {
    TORCH_CHECK(grads[i].scalar_type() == at::kFloat, "project_perpendicular_: grads[", i, "] must be float32, got ",
                grads[i].scalar_type());
    TORCH_CHECK(grads[i].is_contiguous(), "project_perpendicular_: grads[", i, "] must be contiguous");
    TORCH_CHECK(is_kernel_float(weights[i].scalar_type()), "project_perpendicular_: weights[", i,
                "] must be a floating tensor, got ", weights[i].scalar_type());
    TORCH_CHECK(grads[i].sizes() == weights[i].sizes(), "project_perpendicular_: weights[", i, "] has shape ",
                weights[i].sizes(), " but grads[", i, "] has shape ", grads[i].sizes());
    TORCH_CHECK(grads[i].device().type() == device && weights[i].device() == grads[i].device(),
                "project_perpendicular_: grads[", i, "] and weights[", i, "] must both be on one ",
                c10::DeviceTypeName(device), " device, got ", grads[i].device(), " and ", weights[i].device());
  }
  check_disjoint("project_perpendicular_", "grads", grads);
  check_disjoint_reads("project_perpendicular_", "grads", grads, "weights", weights);
  return projection;
}

}  // namespace semu_fast
