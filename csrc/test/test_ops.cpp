// C++ test of the semu_fast operator library as a libtorch user sees it: the ops are found in the dispatcher,
// compute what the reference says, and reject bad arguments before writing anything.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/torch.h>

#include <iostream>

namespace {

int failures = 0;

void expect(bool ok, const char* what) {
  if (!ok) {
    std::cerr << "FAILED: " << what << "\n";
    ++failures;
  }
}

void accumulate(at::TensorList accumulators, at::TensorList grads) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("semu_fast::accumulate_", "")
                       .typed<void(at::TensorList, at::TensorList)>();
  op.call(accumulators, grads);
}

void test_accumulate_matches_reference() {
  for (auto dtype : {at::kFloat, at::kHalf, at::kBFloat16, at::kDouble}) {
    auto acc = torch::randn({37, 129});
    auto grad = torch::randn({129, 37}).to(dtype).t();  // non-contiguous
    auto other = torch::randn({70001});                 // spans several parallel chunks
    auto other_acc = torch::randn({70001});
    auto expected = acc + grad.to(at::kFloat);
    auto expected_other = other_acc + other;
    accumulate({acc, other_acc}, {grad, other});
    expect(torch::equal(acc, expected), "accumulate_ equals acc + grad.float()");
    expect(torch::equal(other_acc, expected_other), "accumulate_ handles a second, larger tensor");
  }
}

void test_accumulate_rejects_bad_input_untouched() {
  auto acc = torch::zeros({4});
  auto good = torch::ones({4});
  bool threw = false;
  try {
    accumulate({acc, torch::zeros({3})}, {good, torch::ones({2})});
  } catch (const c10::Error&) {
    threw = true;
  }
  expect(threw, "shape mismatch raises");
  expect(torch::equal(acc, torch::zeros({4})), "a rejected call leaves earlier accumulators untouched");
  threw = false;
  try {
    accumulate({acc}, {torch::ones({4}, at::kInt)});
  } catch (const c10::Error&) {
    threw = true;
  }
  expect(threw, "integer grads raise");
}

void test_gram_svd_reconstructs_the_batch() {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("semu_fast::gram_svd", "")
                       .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor>(const at::Tensor&)>();
  auto G = torch::randn({5, 32, 9});
  auto [U, S, Vh] = op.call(G);
  auto rebuilt = torch::bmm(U * S.unsqueeze(1), Vh);
  expect(torch::allclose(rebuilt, G, 1e-4, 1e-4), "gram_svd: U diag(S) Vh == G");
  auto reference = torch::linalg_svdvals(G.to(at::kDouble));
  expect(torch::allclose(S.to(at::kDouble), reference, 1e-5, 1e-6), "gram_svd: S equals the LAPACK singular values");
}

void test_projection_is_orthogonal() {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("semu_fast::project_perpendicular_", "")
                       .typed<at::Tensor(at::TensorList, at::TensorList, c10::string_view)>();
  auto g = torch::randn({64, 3, 3, 3});
  auto w = torch::randn({64, 3, 3, 3}).to(at::kBFloat16);
  auto energies = op.call({g}, {w}, "orthogonal");
  const double dot = (g.to(at::kDouble) * w.to(at::kDouble)).sum().item<double>();
  expect(std::abs(dot) < 1e-4 * g.norm().item<double>() * w.to(at::kFloat).norm().item<double>(),
         "project_perpendicular_: <G, W> == 0 afterwards");
  expect(std::abs(energies[0].item<double>() - g.to(at::kDouble).square().sum().item<double>()) <
             1e-9 * energies[0].item<double>(),
         "project_perpendicular_: returns ||G_perp||^2");
}

}  // namespace

int main() {
  test_accumulate_matches_reference();
  test_accumulate_rejects_bad_input_untouched();
  test_gram_svd_reconstructs_the_batch();
  test_projection_is_orthogonal();
  if (failures == 0) std::cout << "all semu_fast C++ op tests passed\n";
  return failures == 0 ? 0 : 1;
}
