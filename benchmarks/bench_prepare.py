"""sf.prepare end to end, phase by phase, against its anchor in one run: (a) a CIFAR ResNet-18 (SalUn's: 3x3 stem,
no max-pool) with 512 random forget samples, (b) a 4-layer Llama-style MLP stack with 2048 x 5632 weights.

Anchor: the same pipeline with svd="exact" and the official clone-and-sum gradient pass. Also the SVD phase with
svd="gram" (the eigendecomposition of the smaller Gram matrix: the strongest plain-torch path), and the gradient
pass against a plain forward+backward over the same data (the floor: what any method must pay)."""
from __future__ import annotations

import importlib.util
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
import semu_fast as sf  # noqa: E402
from semu_fast.ops import svd_plan  # noqa: E402
from common import Table, device_name, parser as make_parser, sync  # noqa: E402


def cifar_resnet18(num_classes=10):
    import torchvision

    model = torchvision.models.resnet18(num_classes=num_classes)
    model.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
    model.maxpool = nn.Identity()
    return model


class LlamaMLP(nn.Module):
    def __init__(self, dim=2048, hidden=5632):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)

    def forward(self, x):
        return x + self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


def mse_to_zero(model, batch):
    return model(batch[0]).float().square().mean()


def plain_backward(model, loader, loss_fn, device):
    """Forward + backward over the loader with PyTorch's own .grad accumulation: the floor of any gradient pass."""
    start = time.perf_counter()
    for batch in loader:
        loss_fn(model, batch).backward()
    sync(device)
    model.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def clone_and_sum(model, loader, loss_fn, device):
    """The official gradient pass: per-batch gradients cloned, then summed."""
    start = time.perf_counter()
    total = None
    for batch in loader:
        model.zero_grad()
        loss_fn(model, batch).backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        total = grads if total is None else {n: total[n] + g for n, g in grads.items()}
    sync(device)
    model.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def streamed(model, loader, loss_fn, device):
    """sf.prepare's gradient pass alone."""
    from semu_fast.gradients import accumulate_gradients

    layers = {n: m for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))}
    start = time.perf_counter()
    accumulate_gradients(model, loader, layers, loss_fn)
    sync(device)
    return time.perf_counter() - start


def run_case(name, model, loader, loss_fn, device, gamma, repeats=3):
    from semu_fast.losses import cross_entropy_loss

    loss_fn = loss_fn or cross_entropy_loss
    model.to(device).eval()
    # The overhead is a few percent of noisy seconds: alternate the two passes and compare medians.
    floors, passes = [], []
    for _ in range(repeats):
        floors.append(plain_backward(model, loader, loss_fn, device))
        passes.append(streamed(model, loader, loss_fn, device))
    floor, grad_pass = statistics.median(floors), statistics.median(passes)
    official_grad = clone_and_sum(model, loader, loss_fn, device)
    results = {}
    for svd in ("auto", "exact", "gram"):  # gram: the strongest plain-torch SVD path (eigh of the Gram matrix)
        sm = sf.prepare(model, loader, loss_fn=loss_fn, config=sf.SEMUConfig(gamma=gamma, svd=svd))
        results[svd] = (sm.report, sm.report.timings)
        sm.unload()
    ours, (exact_report, exact_t) = results["auto"][1], results["exact"]
    anchor_total = official_grad + exact_t["projection"] + exact_t["svd"] + exact_t["install"]
    ours_total = sum(ours.values())
    ks = [(a.k, b.k) for a, b in zip(results["auto"][0].layers, exact_report.layers)]
    ks_equal = all(a == b for a, b in ks)
    if not all(abs(a - b) <= max(2, 0.02 * b) for a, b in ks):
        sys.exit(f"{name}: k differs from the exact SVD's by more than max(2, 2%): (ours, exact) {ks}")
    return {"case": name, "plain fwd+bwd s": floor, "grad s": grad_pass,
            "grad overhead vs plain": grad_pass / floor - 1, "official grad s": official_grad,
            "projection s": ours["projection"], "svd s": ours["svd"], "exact svd s": exact_t["svd"],
            "gram svd s": results["gram"][1]["svd"],
            "total s": ours_total, "anchor total s": anchor_total, "speedup": anchor_total / ours_total,
            "same k as exact": ks_equal, "trainable %": results["auto"][0].trainable_share}


def main(argv=None):
    parser = make_parser(__doc__, repeats=3)
    parser.add_argument("--forget", type=int, default=512)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--gamma", type=float, default=0.95)
    parser.add_argument("--tokens", default="256,2048",
                        help="forget tokens for the Llama case(s): few tokens give low-rank gradients (the randomized "
                             "SVD's ground), many give nearly flat spectra (the exact SVD's)")
    parser.add_argument("--cases", default="resnet,llama")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if args.quick:
        args.cases, args.tokens, args.repeats = "llama", "16", 1
    svd_plan.costs(device)  # the cached SVD cost calibration, or measured now: before any clock starts
    gen = torch.Generator().manual_seed(0)
    images = torch.randn(args.forget, 3, 32, 32, generator=gen)
    labels = torch.randint(0, 10, (args.forget,), generator=gen)
    image_loader = [(images[i:i + args.batch].to(device), labels[i:i + args.batch].to(device))
                    for i in range(0, args.forget, args.batch)]
    table = Table(f"sf.prepare phases vs the official pipeline (exact SVD, clone-and-sum), gamma {args.gamma}, "
                  f"{device_name(device)}", args.json)
    if "resnet" in args.cases and importlib.util.find_spec("torchvision") is None:
        print("skipping the ResNet case: torchvision is not installed")
    elif "resnet" in args.cases:
        torch.manual_seed(0)
        table.add(run_case(f"CIFAR ResNet-18, {args.forget} forget samples", cifar_resnet18(), image_loader, None,
                           device, args.gamma, args.repeats))
    for n_tokens in map(int, args.tokens.split(",") if "llama" in args.cases else []):
        dim, hidden = (32, 64) if args.quick else (2048, 5632)
        tokens = [(torch.randn(1, n_tokens // 4, dim, generator=gen).to(device),) for _ in range(4)]
        torch.manual_seed(0)
        table.add(run_case(f"Llama MLP x4 ({dim} x {hidden}), {n_tokens} tokens",
                           nn.Sequential(*[LlamaMLP(dim, hidden) for _ in range(4)]), tokens, mse_to_zero, device,
                           args.gamma, args.repeats))


if __name__ == "__main__":
    main()
