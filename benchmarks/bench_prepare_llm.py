"""sf.prepare on Llama-shaped causal LMs (transformers' LlamaForCausalLM built from a LlamaConfig, random init, bf16
on a GPU, every projection Linear targeted), phase by phase, against its anchors in one run:
  - the gradient pass against a plain forward + backward over the same batches (the floor any method pays);
  - the SVD phase per weight shape, on the real summed gradients: ours (auto) against the exact SVD and the Gram
    path (--compare-svd; the exact SVD of every layer would take minutes, so one layer per shape), and whether
    batching same-shape layers would pay (the paths' pieces timed stacked against one by one);
  - peak memory against the floor: the bf16 weights plus the float32 accumulators of the targeted weights.
Sizes: --size 100m | 350m | 1.1b (TinyLlama's shapes) | 7b (Llama-2-7B's); the 7B case is the GPU headline (goal:
whole prepare under 60 s on one H200 at <= 1.2x the floor). --dtype float32 on CPUs without bf16 GEMMs (AVX2 only:
there a bf16 matmul ran 400x slower than float32)."""
from __future__ import annotations

import resource
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import semu_fast as sf  # noqa: E402
from common import Table, alternate, device_name, parser as make_parser, sync, timeit  # noqa: E402
from semu_fast.ops import svd_plan  # noqa: E402
from semu_fast.workflows import llm  # noqa: E402

# hidden, intermediate, layers, attention heads, key-value heads
SIZES = {"tiny": (64, 160, 2, 4, 2), "100m": (768, 2048, 12, 12, 12), "350m": (1024, 2816, 24, 16, 16),
         "1.1b": (2048, 5632, 22, 32, 4), "7b": (4096, 11008, 32, 32, 32)}
TARGETS = ["self_attn.(q|k|v|o)_proj", "mlp.(gate|up|down)_proj"]


def build(size: str, device: torch.device, dtype: torch.dtype):
    from transformers import LlamaConfig, LlamaForCausalLM

    hidden, inter, layers, heads, kv = SIZES[size]
    config = LlamaConfig(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=kv, vocab_size=32000,
                         max_position_embeddings=4096, tie_word_embeddings=False)
    torch.manual_seed(0)
    with torch.device(device):  # initialised where it runs: a 7B model initialised on a CPU takes minutes
        model = LlamaForCausalLM._from_config(config, dtype=dtype)
    return model.eval()


def batches(sequences: int, tokens: int, batch: int, device: torch.device) -> list:
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 32000, (sequences, tokens), generator=gen)
    return [{"input_ids": ids[i:i + batch].to(device)} for i in range(0, sequences, batch)]


def reset_peak(device: torch.device) -> int:
    """Start counting the peak here; returns the memory in use now (bytes)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        return torch.cuda.memory_allocated(device)
    with open("/proc/self/clear_refs", "w") as f:  # Linux: the RSS high-water mark restarts from the current RSS
        f.write("5")
    return _status_bytes("VmRSS:")


def peak(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return _status_bytes("VmHWM:")


def _status_bytes(field: str) -> int:
    return next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith(field))


def plain_backward(model, data, targets) -> float:
    """Forward + backward over the batches with only the targeted weights requiring grad (what any fine-tuning of
    them pays), in seconds."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    for layer in targets.values():
        layer.weight.requires_grad_(True)
    device = next(model.parameters()).device
    # the first pass of the process pays one-time costs (cuBLAS handles, kernel choices, the allocator's growth, the
    # CPU's thread pool and page faults): one batch untimed, as prepare's gradient pass, timed after this, finds them
    # paid
    llm.nll_loss(model, data[0]).backward()
    sync(device)
    start = time.perf_counter()
    for batch in data:
        llm.nll_loss(model, batch).backward()
    sync(device)
    seconds = time.perf_counter() - start
    for p, flag in flags:
        p.grad = None
        p.requires_grad_(flag)
    return seconds


def compare_svd(model, data, targets, gamma, device, table):
    """One layer per weight shape: ours (auto, with the rows the layer saw as its rank hint, as prepare passes them)
    against ours without the hint, the exact SVD and the Gram path on its real gradient."""
    from semu_fast.gradients import accumulate_gradients
    from semu_fast.ops.svd import auto_plan

    first = {}
    for name, layer in targets.items():
        first.setdefault(tuple(layer.weight.shape), name)
    grads = accumulate_gradients(model, data, {n: targets[n] for n in first.values()}, llm.nll_loss)
    for i, (shape, name) in enumerate(first.items()):
        G = grads[name]
        sf.ops.project_perpendicular_([G], [targets[name].weight.detach()])
        runs = {"ours": {"method": "auto", "rank_hint": grads.rows.get(name)}, "no hint": {"method": "auto"},
                "gram": {"method": "gram"}, "exact": {"method": "exact"}}
        small = G[:300, :260].contiguous()  # each path's solvers warmed up (handles, workspaces) before any clock
        for kw in runs.values():
            sf.ops.truncated_svd(small, gamma, **{k: v for k, v in kw.items() if k != "rank_hint"})
        order = list(runs)[i % len(runs):] + list(runs)[:i % len(runs)]  # no path always first
        seconds = {r: timeit(lambda kw=runs[r]: sf.ops.truncated_svd(G, gamma, **kw), device, 1, warmup=0)
                   for r in order}
        ks = {r: sf.ops.truncated_svd(G, gamma, **runs[r]).S.shape[-1] for r in ("ours", "no hint", "exact")}
        best = min(seconds["gram"], seconds["exact"], seconds["no hint"])
        chosen = auto_plan(G.shape, device, gamma, grads.rows.get(name))
        plan = f"{'hinted, ' if chosen.hinted else ''}randomized <= {chosen.max_rank}, else {chosen.fallback}"
        table.add({"shape": "x".join(map(str, shape)), "rows": grads.rows.get(name), "auto's plan": plan,
                   "k exact": ks["exact"],
                   "k ours": ks["ours"], "k no hint": ks["no hint"], "ours s": seconds["ours"],
                   "no hint s": seconds["no hint"], "gram s": seconds["gram"], "exact s": seconds["exact"],
                   "ours / best other": seconds["ours"] / best})


def compare_batching(shapes, device, table, count: int = 4):
    """Would same-shape layers gain from one batched call? The pieces the SVD paths spend their time in, on `count`
    stacked matrices at once against `count` calls one by one: the Gram product (per shape class) and, per smaller
    side p, its float64 eigendecomposition (gram path), the range finder's thin QR of a 64-column block and the SVD
    of a 512-column basis's small factor (randomized path). A ratio near 1 says batching would not pay here."""
    seen = set()
    for p, q in sorted({(min(shape), max(shape)) for shape in shapes}):
        A = torch.randn(count, p, q, generator=torch.Generator(device=device).manual_seed(0), device=device)
        l = min(p, 512)
        pieces = {"Gram product": (lambda X: X @ X.mT, A)}
        if p not in seen:
            seen.add(p)
            pieces.update({"eigh (float64, p x p)": (torch.linalg.eigh, (A @ A.mT).double()),
                           "thin QR (p x 64)": (torch.linalg.qr, A[..., :64].contiguous()),
                           f"svdvals ({l} x {l})": (torch.linalg.svdvals, A[..., :l, :l].contiguous())})
        for piece, (fn, X) in pieces.items():
            times = alternate({"batched": lambda: fn(X), "one by one": lambda: [fn(x) for x in X]}, device, 1)
            table.add({"piece": piece, "p x q": f"{p}x{q}", "matrices": count, "batched s": times["batched"],
                       "one by one s": times["one by one"],
                       "one by one / batched": times["one by one"] / times["batched"]})


def main(argv=None):
    parser = make_parser(__doc__, repeats=None)
    parser.add_argument("--size", choices=tuple(SIZES), default="1.1b")
    parser.add_argument("--sequences", type=int, default=None, help="forget sequences (default 2 on CPU, 64 on GPU)")
    parser.add_argument("--tokens", type=int, default=None, help="tokens per sequence (default 256 CPU, 512 GPU)")
    parser.add_argument("--batch", type=int, default=None, help="sequences per batch (default 1 CPU, 4 GPU)")
    parser.add_argument("--gamma", type=float, default=0.95)
    parser.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), default="bfloat16")
    parser.add_argument("--compare-svd", action="store_true", help="time the exact and Gram SVDs per shape too")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    gpu = device.type == "cuda"
    if args.quick:
        args.size, args.sequences, args.tokens, args.batch = "tiny", 2, 16, 1
    args.sequences = args.sequences or (64 if gpu else 2)
    args.tokens = args.tokens or (512 if gpu else 256)
    args.batch = args.batch or (4 if gpu else 1)
    svd_plan.costs(device)  # the cached calibration, or measured now: before the clock starts

    dtype = getattr(torch, args.dtype)
    model = build(args.size, device, dtype)
    data = batches(args.sequences, args.tokens, args.batch, device)
    config = sf.SEMUConfig(gamma=args.gamma, target_modules=TARGETS)
    targets = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and "proj" in n}
    weights_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    floor = weights_bytes + sum(m.weight.numel() * 4 for m in targets.values())

    plain = plain_backward(model, data, targets)
    before = reset_peak(device)
    start = time.perf_counter()
    semu_model = sf.prepare(model, data, loss_fn=llm.nll_loss, config=config)
    sync(device)
    total = time.perf_counter() - start
    # GPU: everything allocated. CPU: the model plus the RSS that prepare added (the process's own RSS also holds the
    # interpreter, libraries and what the allocator kept from the plain backward run before it).
    used = peak(device) if gpu else weights_bytes + peak(device) - before
    report = semu_model.report
    ks = sorted(layer.k for layer in report.layers)
    title = (f"sf.prepare on a Llama-{args.size} shape ({args.dtype}, {len(targets)} projection Linears), "
             f"{args.sequences} x {args.tokens} tokens, gamma {args.gamma}, {device_name(device)}")
    with Table(title, args.json) as table:
        table.add({"plain fwd+bwd s": plain, "gradients s": report.timings["gradients"],
                   "gradients / plain": report.timings["gradients"] / plain,
                   "projection s": report.timings["projection"], "svd s": report.timings["svd"], "prepare s": total,
                   "peak GB": used / 1e9, "floor GB": floor / 1e9,
                   "peak / floor": used / floor,
                   "k min/median/max": f"{ks[0]}/{ks[len(ks) // 2]}/{ks[-1]}",
                   "trainable %": report.trainable_share})
    if not gpu:
        print(f"CPU RSS growth during prepare {(used - weights_bytes) / 1e9:.2f} GB over {before / 1e9:.2f} GB "
              f"before it (the model: {weights_bytes / 1e9:.2f} GB); ru_maxrss "
              f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6:.2f} GB")
    if args.compare_svd:
        model = semu_model.unload()
        with Table(f"SVD per weight shape on the real gradients (one layer each), Llama-{args.size}, "
                   f"{device_name(device)}", args.json) as table:
            compare_svd(model, data, targets, args.gamma, device, table)
        with Table(f"Batching same-shape layers' SVD pieces, Llama-{args.size}, {device_name(device)}",
                   args.json) as table:
            compare_batching([layer.weight.shape for layer in targets.values()], device, table)


if __name__ == "__main__":
    main()
