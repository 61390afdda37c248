// C++ test of the semu_fast operator library as a libtorch user sees it: the ops are found in the dispatcher,
// compute what the reference says, and reject bad arguments before writing anything.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/torch.h>

#include <iostream>
#include <vector>

#include "../gram_svd.h"

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
  threw = false;
  try {
    accumulate({acc, acc}, {good, good});  // the same accumulator twice: the adds would race on a GPU
  } catch (const c10::Error&) {
    threw = true;
  }
  expect(threw, "a duplicated accumulator raises");
  expect(torch::equal(acc, torch::zeros({4})), "a duplicated accumulator leaves it untouched");
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

// The Jacobi of the CUDA gram_svd kernel (csrc/cuda/gram_svd.cu), step for step but serially (the updates of one
// step touch disjoint elements, so their order does not matter): CI machines have no GPU, so this is where its
// math (round-robin schedule with a padding index, rotations, 2x2 block updates, convergence test, sort) is
// checked. Returns the eigenvalues sorted descending.
std::vector<double> gpu_jacobi_on_host(const at::Tensor& gram, at::Tensor& vectors) {
  using namespace semu_fast;
  const int n = static_cast<int>(gram.size(0)), np = jacobi_padded(n), half = np / 2;
  std::vector<double> a(np * np, 0.0), vt(np * np, 0.0);
  for (int i = 0; i < np; ++i) vt[i * np + i] = 1.0;
  auto g = gram.accessor<double, 2>();
  for (int i = 0; i < n; ++i)
    for (int j = 0; j < n; ++j) a[i * np + j] = g[i][j];
  std::vector<JacobiRotation> rot(half);
  std::vector<int> pp(half), pq(half);
  for (int sweep = 0; sweep < kJacobiMaxSweeps; ++sweep) {
    double off = 0.0, diag = 0.0;
    for (int i = 0; i < n; ++i)
      for (int j = i; j < n; ++j) (i == j ? diag : off) += a[i * np + j] * a[i * np + j];
    if (jacobi_converged(off, diag)) break;
    for (int step = 0; step < np - 1; ++step) {
      for (int i = 0; i < half; ++i) {
        jacobi_pair(np, step, i, pp[i], pq[i]);
        rot[i] = jacobi_rotation(a[pp[i] * np + pp[i]], a[pq[i] * np + pq[i]], a[pp[i] * np + pq[i]]);
      }
      for (int i = 0; i < half; ++i) {
        const int p = pp[i], q = pq[i];
        if (rot[i].s != 0.0) jacobi_rotate_diagonal(a[p * np + p], a[q * np + q], a[p * np + q], a[q * np + p], rot[i]);
        for (int j = i + 1; j < half; ++j) {
          if (rot[i].s == 0.0 && rot[j].s == 0.0) continue;
          jacobi_update_block(a.data(), np, p, q, pp[j], pq[j], rot[i], rot[j]);
        }
        if (rot[i].s != 0.0)
          for (int r = 0; r < n; ++r) jacobi_rotate_pair(vt[p * np + r], vt[q * np + r], rot[i]);
      }
    }
  }
  std::vector<double> eig(n), sorted(n);
  for (int i = 0; i < n; ++i) eig[i] = a[i * np + i];
  vectors = torch::empty({n, n}, torch::kDouble);  // column k: eigenvector of sorted[k]
  for (int i = 0; i < n; ++i) {
    const int k = descending_rank(eig.data(), i, n);
    sorted[k] = eig[i];
    for (int r = 0; r < n; ++r) vectors[r][k] = vt[i * np + r];
  }
  return sorted;
}

void test_gpu_jacobi_math_on_the_host() {
  for (int n : {1, 2, 3, 9, 25, 49, 55, 64}) {
    auto G = torch::randn({2 * n + 3, n}, torch::kDouble);
    G.narrow(1, 0, 1).mul_(1e-4);  // a small singular value too
    const auto gram = G.t().mm(G);
    at::Tensor V;
    const auto eig = gpu_jacobi_on_host(gram, V);
    const auto expected = std::get<0>(torch::linalg_eigh(gram)).flip(0);
    const double top = expected[0].item<double>();
    const auto got = torch::tensor(eig, torch::kDouble);
    expect((got - expected).abs().max().item<double>() <= 1e-13 * top, "gpu Jacobi: eigenvalues match LAPACK");
    expect(torch::allclose(V.t().mm(V), torch::eye(n, torch::kDouble), 0, 1e-13), "gpu Jacobi: V orthonormal");
    expect((gram.mm(V) - V * got).abs().max().item<double>() <= 1e-12 * top, "gpu Jacobi: A V = V diag(eig)");
    for (int k = 1; k < n; ++k) expect(eig[k - 1] >= eig[k], "gpu Jacobi: eigenvalues sorted descending");
  }
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
  test_gpu_jacobi_math_on_the_host();
  test_projection_is_orthogonal();
  if (failures == 0) std::cout << "all semu_fast C++ op tests passed\n";
  return failures == 0 ? 0 : 1;
}
