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

}  // namespace

int main() {
  test_accumulate_matches_reference();
  test_accumulate_rejects_bad_input_untouched();
  if (failures == 0) std::cout << "all semu_fast C++ op tests passed\n";
  return failures == 0 ? 0 : 1;
}
