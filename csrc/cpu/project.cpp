// CPU kernel of semu_fast::project_perpendicular_: per layer, one parallel pass reduces <G,W> and ||W||^2 in
// float64, a second rewrites G -= c W in place and sums ||G_perp||^2 (returned, for the rank rule) on the way.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <array>
#include <functional>

#include "../project.h"
#include "parallel.h"

namespace semu_fast {
namespace {

at::Tensor project_perpendicular_cpu(at::TensorList grads, at::TensorList weights, c10::string_view mode_) {
  const Projection mode = check_project_args(grads, weights, std::string_view(mode_.data(), mode_.size()),
                                             c10::DeviceType::CPU);
  at::Tensor energies = at::empty({static_cast<int64_t>(grads.size())}, at::kDouble);
  double* energy = energies.data_ptr<double>();
  for (size_t t = 0; t < grads.size(); ++t) {
    const at::Tensor w = weights[t].contiguous();
    float* g = grads[t].data_ptr<float>();
    const int64_t numel = grads[t].numel();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, w.scalar_type(), "project_perpendicular_cpu", [&] {
      const scalar_t* wp = w.const_data_ptr<scalar_t>();
      using Pair = std::array<double, 2>;
      const Pair sums = at::parallel_reduce(
          0, numel, kGrain, Pair{0.0, 0.0},
          [&](int64_t begin, int64_t end, Pair acc) {
            for (int64_t i = begin; i < end; ++i) {
              const double wi = static_cast<double>(wp[i]);
              acc[0] += static_cast<double>(g[i]) * wi;
              acc[1] += wi * wi;
            }
            return acc;
          },
          [](Pair a, Pair b) { return Pair{a[0] + b[0], a[1] + b[1]}; });
      const double c = projection_coefficient(sums[0], sums[1], mode);
      energy[t] = at::parallel_reduce(
          0, numel, kGrain, 0.0,
          [&](int64_t begin, int64_t end, double acc) {
            for (int64_t i = begin; i < end; ++i) {
              const float value = static_cast<float>(static_cast<double>(g[i]) - c * static_cast<double>(wp[i]));
              g[i] = value;
              acc += static_cast<double>(value) * value;
            }
            return acc;
          },
          std::plus<double>());
    });
  }
  return energies;
}

}  // namespace

TORCH_LIBRARY_IMPL(semu_fast, CPU, m) { m.impl("project_perpendicular_", &project_perpendicular_cpu); }

}  // namespace semu_fast
