import copy
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import semu_fast as sf
from semu_fast.adapters import SEMUConv2d, SEMULinear
from conftest import requires_cuda
from helpers import assert_same_state, forget_batches, small_cnn, snapshot


def _brute_force(model, batches, gamma, projection="orthogonal", rank_rule="at_least"):
    """SEMU from scratch in float64: clone-and-sum gradients, projection, full SVD, rank by a loop over k."""
    model = model.double().train()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.eval()
    layers = {n: m for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))}
    total = {n: torch.zeros_like(m.weight) for n, m in layers.items()}
    for x, y in batches:
        model.zero_grad()
        F.cross_entropy(model(x.double()), y).backward()
        for n, m in layers.items():
            total[n] += m.weight.grad.clone()
    out = {}
    for n, G in total.items():
        W = layers[n].weight.detach()
        dot = (G * W).sum()
        if projection == "orthogonal":
            G = G - dot / (W * W).sum() * W
        elif projection == "official":
            G = G - dot / torch.linalg.norm(W) * W
        mats = G.permute(1, 0, 2, 3).flatten(2) if G.dim() == 4 else G[None]
        U, S, _ = torch.linalg.svd(mats, full_matrices=False)
        ks = []
        for s in S:
            ratios = (s ** 2).cumsum(0) / (s ** 2).sum()
            if rank_rule == "at_least":
                ks.append(next(i + 1 for i, r in enumerate(ratios) if r >= gamma or i == len(ratios) - 1))
            else:
                ks.append(max(1, int((ratios <= gamma).sum())))
        out[n] = (U, ks)
    return out


def _projector_distance(U, V):
    return torch.linalg.norm(U @ U.transpose(-1, -2) - V @ V.transpose(-1, -2)).item()


@pytest.mark.parametrize("projection", ["orthogonal", "official", "none"])
@pytest.mark.parametrize("rank_rule", ["at_least", "official"])
def test_prepare_matches_float64_brute_force(projection, rank_rule):
    batches = forget_batches()
    expected = _brute_force(small_cnn(), batches, 0.9, projection, rank_rule)
    sm = sf.prepare(small_cnn(), batches, config=sf.SEMUConfig(gamma=0.9, projection=projection,
                                                              rank_rule=rank_rule))
    reports = {r.name: r for r in sm.report.layers}
    assert set(sm.adapters) == set(expected)
    for name, adapter in sm.adapters.items():
        U_ref, ks = expected[name]
        if isinstance(adapter, SEMUConv2d):
            assert reports[name].ranks == ks
            assert adapter.rank == max(ks)
        else:
            assert [adapter.rank] == ks
        k = adapter.rank
        U = adapter.U if adapter.U.dim() == 3 else adapter.U[None]
        for n in range(U.shape[0]):
            # Compare only the leading directions with a clear spectral gap: the subspace is then unique.
            kn = ks[n] if len(ks) > 1 else k
            if kn:
                assert _projector_distance(U[n, :, :kn].double(), U_ref[n, :, :kn]) < 1e-3, (name, n)


def test_prepared_model_with_zero_R_gives_the_original_outputs_exactly():
    model, batches = small_cnn(), forget_batches()
    model.eval()
    x = forget_batches(seed=1)[0][0]
    expected = model(x)
    sm = sf.prepare(model, batches)
    assert len(sm.adapters) == 4
    assert torch.equal(sm(x), expected)


def test_prepare_never_writes_base_weights_and_unload_gives_them_back():
    model = small_cnn()
    model.eval()
    before = snapshot(model)
    sm = sf.prepare(model, forget_batches())
    with torch.no_grad():
        for adapter in sm.adapters.values():
            adapter.R.normal_()
    restored = sm.unload()
    assert restored is model
    assert_same_state(model, before)
    assert all(p.requires_grad for p in model.parameters())
    assert not any(isinstance(m, sf.adapters.SEMUAdapter) for m in model.modules())


def test_only_R_is_trainable_after_prepare():
    sm = sf.prepare(small_cnn(), forget_batches())
    trainable = [n for n, p in sm.named_parameters() if p.requires_grad]
    assert trainable and all(n.endswith(".R") for n in trainable)
    assert all((a.R == 0).all() for a in sm.adapters.values())


def test_per_channel_conv_rank_masks_each_channel():
    sm = sf.prepare(small_cnn(), forget_batches(), config=sf.SEMUConfig(gamma=0.8, conv_rank="per_channel"))
    conv = sm.adapters["0"]
    assert isinstance(conv, SEMUConv2d) and conv.ranks is not None
    for n, kn in enumerate(conv.ranks):
        assert (conv.U[n, :, kn:] == 0).all() and (conv.Vh[n, kn:] == 0).all()
        assert (conv.U[n, :, :kn] != 0).any() or kn == 0
    report = {r.name: r for r in sm.report.layers}["0"]
    assert report.trainable_params == sum(k * k for k in conv.ranks) < conv.R.numel()


def test_max_conv_rank_uses_the_largest_channel_rank():
    sm = sf.prepare(small_cnn(), forget_batches(), config=sf.SEMUConfig(gamma=0.8))
    report = {r.name: r for r in sm.report.layers}["0"]
    assert report.k == max(report.ranks) == sm.adapters["0"].rank
    assert report.trainable_params == 3 * report.k ** 2


def test_gamma_overrides_apply_by_pattern():
    config = sf.SEMUConfig(gamma=0.5, gamma_overrides={r"^9$": 1.0})
    sm = sf.prepare(small_cnn(), forget_batches(), config=config)
    reports = {r.name: r for r in sm.report.layers}
    assert reports["9"].gamma == 1.0 and reports["7"].gamma == 0.5
    assert reports["9"].captured_variance > 1 - 1e-6


def test_target_and_exclude_modules_select_layers():
    config = sf.SEMUConfig(target_modules=[r"^[79]$"], exclude_modules=["9"])
    sm = sf.prepare(small_cnn(), forget_batches(), config=config)
    assert list(sm.adapters) == ["7"]
    assert isinstance(sm.adapters["7"], SEMULinear)


@pytest.mark.parametrize("config, match", [
    (sf.SEMUConfig(target_modules=["attn"]), "pattern 'attn' matches no layer; candidates: 0, 3, 7, 9"),
    (sf.SEMUConfig(exclude_modules=["nothing"]), "matches no layer"),
    (sf.SEMUConfig(target_modules=["0"], exclude_modules=["0"]), "no layer left"),
])
def test_bad_layer_selection_fails_before_touching_the_model(config, match):
    model = small_cnn()
    before = snapshot(model)
    with pytest.raises(ValueError, match=match):
        sf.prepare(model, forget_batches(), config=config)
    assert_same_state(model, before)
    assert all(p.requires_grad for p in model.parameters())


def test_a_deep_model_lists_its_layer_kinds_not_every_layer():
    blocks = nn.ModuleList(nn.ModuleDict({"up": nn.Linear(4, 8), "down": nn.Linear(8, 4)}) for _ in range(12))
    model = nn.Module()
    model.blocks, model.head = blocks, nn.Linear(4, 2)
    with pytest.raises(ValueError) as info:
        sf.prepare(model, forget_batches(), config=sf.SEMUConfig(target_modules=["attn"]))
    assert str(info.value).endswith("candidates: 25 layers of 3 kinds: blocks.N.down, blocks.N.up, head")


def test_unsupported_layers_are_skipped_by_default_and_rejected_when_named():
    model = nn.Sequential(nn.Conv2d(4, 4, 3, groups=2, padding=1), nn.Flatten(), nn.Linear(4 * 4 * 4, 3))
    batches = [(torch.randn(8, 4, 4, 4), torch.randint(0, 3, (8,)))]
    sm = sf.prepare(model, batches)
    assert list(sm.adapters) == ["2"]
    sm.unload()
    with pytest.raises(ValueError, match="grouped Conv2d"):
        sf.prepare(model, batches, config=sf.SEMUConfig(target_modules=["^0$"]))

    emb = nn.Sequential(nn.Embedding(10, 4), nn.Flatten(), nn.Linear(8, 2))
    with pytest.raises(ValueError, match="Embedding is not supported"):
        sf.prepare(emb, [(torch.randint(0, 10, (3, 2)), torch.zeros(3, dtype=torch.long))],
                   config=sf.SEMUConfig(target_modules=["0"]))


def test_layers_whose_class_overrides_forward_are_skipped_with_a_warning_and_adapted_only_when_named():
    class Scaled(nn.Linear):  # an adapter calling the plain op would drop the factor 2
        def forward(self, x):
            return 2 * super().forward(x)

    class Padded(nn.Conv2d):
        def _conv_forward(self, x, weight, bias):
            return super()._conv_forward(nn.functional.pad(x, (1, 1, 1, 1)), weight, bias)

    class Plain(nn.Linear):  # a subclass that keeps nn.Linear's forward is adapted
        pass

    def model():
        return nn.Sequential(Padded(2, 2, 3), nn.Flatten(), Scaled(2 * 4 * 4, 8), nn.ReLU(), Plain(8, 3))

    batches = [(torch.randn(8, 2, 4, 4), torch.randint(0, 3, (8,)))]
    with pytest.warns(UserWarning, match="overrides forward .* 0, 2"):
        sm = sf.prepare(model(), batches)
    assert list(sm.adapters) == ["4"] and "Scaled overrides nn.Linear's forward" in sm.report.skipped["2"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # excluded: no warning about it
        sf.prepare(model(), batches, config=sf.SEMUConfig(exclude_modules=["^0$", "^2$"]))
    with pytest.warns(UserWarning, match="adapting 2 as target_modules names them, although their class overrides"):
        sm = sf.prepare(model(), batches, config=sf.SEMUConfig(target_modules=["^2$"]))
    assert list(sm.adapters) == ["2"]


def test_subclasses_known_to_compute_the_plain_op_are_adapted():
    transformers = pytest.importorskip("transformers")
    config = transformers.FalconConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, vocab_size=50,
                                       new_decoder_architecture=False, tie_word_embeddings=False)
    model = transformers.FalconForCausalLM(config)
    ids = torch.randint(0, 50, (2, 6))
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        sm = sf.prepare(model, [{"input_ids": ids}], loss_fn=lambda m, b: m(**b, labels=b["input_ids"]).loss)
    assert {name.rsplit(".", 1)[-1] for name in sm.adapters} >= {"query_key_value", "dense", "dense_h_to_4h",
                                                                  "dense_4h_to_h"}


@pytest.mark.parametrize("kind", ["parametrization", "hook"])
def test_layers_with_a_computed_weight_are_skipped_and_rejected_when_named(kind):
    from torch.nn.utils import parametrizations

    def model():
        norm = parametrizations.weight_norm if kind == "parametrization" else nn.utils.weight_norm
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # the hook form is deprecated, still widely used
            return nn.Sequential(norm(nn.Linear(4, 4)), nn.ReLU(), nn.Linear(4, 3))

    batches = [(torch.randn(8, 4), torch.randint(0, 3, (8,)))]
    sm = sf.prepare(model(), batches)
    assert list(sm.adapters) == ["2"] and "weight is computed from other tensors" in sm.report.skipped["0"]
    with pytest.raises(ValueError, match="'0', which SEMU cannot adapt: its weight is computed"):
        sf.prepare(model(), batches, config=sf.SEMUConfig(target_modules=["^0$"]))


def test_multihead_attention_out_proj_is_not_adapted():
    class Attn(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
            self.head = nn.Linear(8, 3)

        def forward(self, x):
            return self.head(self.attn(x, x, x)[0].mean(1))

    sm = sf.prepare(Attn(), [(torch.randn(4, 5, 8), torch.randint(0, 3, (4,)))])
    assert list(sm.adapters) == ["head"]


def test_non_contiguous_weights_are_handled():
    model = small_cnn()
    with torch.no_grad():
        model[7].weight = nn.Parameter(model[7].weight.detach().t().contiguous().t())
    assert not model[7].weight.is_contiguous()
    model.eval()
    x = forget_batches(seed=3)[0][0]
    expected = model(x)
    sm = sf.prepare(model, forget_batches())
    assert sm.adapters["7"].rank >= 1
    assert torch.equal(sm(x), expected)


def test_all_zero_gradients_install_no_adapters_and_say_so():
    model = small_cnn()
    sm = sf.prepare(model, forget_batches(), loss_fn=lambda m, b: (m(b[0]) * 0).sum())
    assert sm.adapters == {}
    assert all(r.k == 0 and "zero gradient" in r.note for r in sm.report.layers)
    assert sm.report.trainable_params == 0


def test_report_has_totals_shares_and_timings():
    model = small_cnn()
    total = sum(p.numel() for p in model.parameters())
    sm = sf.prepare(model, forget_batches())
    report = sm.report
    assert report.total_params == total
    assert report.trainable_params == sum(a.R.numel() for a in sm.adapters.values())
    assert report.trainable_share == pytest.approx(100 * report.trainable_params / total)
    assert set(report.timings) == {"gradients", "projection", "svd", "install"}
    assert all(0 <= r.captured_variance <= 1 + 1e-9 and r.captured_variance >= 0.95 - 1e-9
               for r in report.layers)
    text = str(report)
    assert "trainable:" in text and "conv2d" in text and "linear" in text


def test_preparing_twice_is_refused():
    sm = sf.prepare(small_cnn(), forget_batches())
    with pytest.raises(ValueError, match="already holds SEMU adapters"):
        sf.prepare(sm.model, forget_batches())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64])
def test_prepare_on_other_dtypes(dtype):
    model = small_cnn(dtype=dtype)
    model.eval()
    x = forget_batches(seed=2, dtype=dtype)[0][0]
    expected = model(x)
    sm = sf.prepare(model, forget_batches(dtype=dtype))
    assert torch.equal(sm(x), expected)
    assert all(a.U.dtype == torch.float32 for a in sm.adapters.values())


def test_default_fast_path_agrees_with_exact_svd_on_large_layers(monkeypatch):
    """Large Linear gradients take the randomized SVD under svd="auto", sized by the rows each layer saw (128 here,
    the hinted sketch): same ranks, same subspaces as exact."""
    import semu_fast.ops.svd as svd_module

    hints = []
    real = svd_module._hinted
    monkeypatch.setattr(svd_module, "_hinted", lambda *a: hints.append((a[0].shape, a[-1])) or real(*a))
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(300, 400), nn.Tanh(), nn.Linear(400, 280), nn.Tanh(), nn.Linear(280, 4))
    gen = torch.Generator().manual_seed(0)
    batches = [(torch.randn(64, 300, generator=gen), torch.randint(0, 4, (64,), generator=gen)) for _ in range(2)]
    fast = sf.prepare(model, batches, config=sf.SEMUConfig(gamma=0.9))
    assert hints == [((400, 300), 128), ((280, 400), 128)]
    fast_adapters = {n: (a.rank, a.U.clone()) for n, a in fast.adapters.items()}
    fast.unload()
    exact = sf.prepare(model, batches, config=sf.SEMUConfig(gamma=0.9, svd="exact"))
    for name, adapter in exact.adapters.items():
        k, U = fast_adapters[name]
        assert k == adapter.rank, name
        assert _projector_distance(U.double(), adapter.U.double()) < 1e-2, name


def test_a_fixed_seed_gives_identical_ranks_and_adapters():
    """Twice on fresh copies, with the randomized SVD in play (a Linear above RANDOMIZED_MIN_DIM)."""
    def run():
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(300, 280), nn.Tanh(), nn.Linear(280, 5))
        gen = torch.Generator().manual_seed(1)
        batches = [(torch.randn(64, 300, generator=gen), torch.randint(0, 5, (64,), generator=gen))]
        sm = sf.prepare(model, batches, config=sf.SEMUConfig(gamma=0.9, svd="randomized", seed=7))
        return {n: (a.U, a.Vh, a.rank) for n, a in sm.adapters.items()}

    first, second = run(), run()
    assert first.keys() == second.keys() and "0" in first
    for name, (U, Vh, k) in first.items():
        assert k == second[name][2] and torch.equal(U, second[name][0]) and torch.equal(Vh, second[name][1])


@requires_cuda
def test_prepare_on_cuda_matches_cpu():
    """The same model and forget data on the GPU: the same ranks, and the same subspaces up to sign (the kept U
    and Vh span what the CPU's do), within float32 tolerance."""
    torch.manual_seed(0)
    wide = nn.Sequential(nn.Linear(300, 260), nn.Tanh(), nn.Linear(260, 5))  # its first layer takes the range finder
    cases = [(small_cnn(), forget_batches(), sf.SEMUConfig(gamma=0.9)),
             (wide, [(torch.randn(24, 300), torch.randint(0, 5, (24,))) for _ in range(2)],
              sf.SEMUConfig(gamma=0.8))]
    for model, batches, config in cases:
        gpu_model = copy.deepcopy(model).cuda()
        cpu = sf.prepare(model, batches, config=config)
        gpu = sf.prepare(gpu_model, [(x.cuda(), y.cuda()) for x, y in batches], config=config)
        assert [layer.k for layer in cpu.report.layers] == [layer.k for layer in gpu.report.layers]
        for name, a in cpu.adapters.items():
            b = gpu.adapters[name]
            for part in ("U", "Vh"):
                x, y = getattr(a, part).double(), getattr(b, part).double().cpu()
                if part == "Vh":
                    x, y = x.transpose(-1, -2), y.transpose(-1, -2)
                # projector distance, free of sign and rotation within the kept space
                dist = (x @ x.transpose(-1, -2) - y @ y.transpose(-1, -2)).abs().max().item()
                assert dist < 1e-3, (name, part, dist)


def test_accumulator_budget_splits_the_pass_and_gives_the_same_adapters(monkeypatch):
    """With max_accumulator_bytes holding one layer's float32 gradient at a time, every forget pass keeps within the
    budget, the data is passed once per group, and the factors equal the one-pass run's bit for bit."""
    from semu_fast import pipeline

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 20), nn.Tanh(), nn.Linear(20, 16), nn.Tanh(), nn.Linear(16, 5))
    batches = [(torch.randn(8, 12), torch.randint(0, 5, (8,))) for _ in range(3)]
    one_pass = sf.prepare(copy.deepcopy(model), batches, config=sf.SEMUConfig(gamma=0.9))
    budget = 20 * 16 * 4  # the largest layer's gradient
    held, calls = [], []
    original = pipeline.accumulate_gradients

    def recording(model, loader, layers, *args):
        calls.append(list(layers))
        grads = original(model, loader, layers, *args)
        held.append(sum(g.numel() * g.element_size() for g in grads.values()))
        return grads

    monkeypatch.setattr(pipeline, "accumulate_gradients", recording)
    split = sf.prepare(model, batches, config=sf.SEMUConfig(gamma=0.9, max_accumulator_bytes=budget))
    assert calls == [["0"], ["2"], ["4"]] and max(held) <= budget
    assert split.report.gradient_passes == 3 and one_pass.report.gradient_passes == 1
    for name, adapter in one_pass.adapters.items():
        assert torch.equal(adapter.U, split.adapters[name].U) and torch.equal(adapter.Vh, split.adapters[name].Vh)


def test_accumulator_budget_errors_name_the_layer_and_the_one_shot_loader():
    model = nn.Sequential(nn.Linear(12, 20), nn.Tanh(), nn.Linear(20, 5))
    batches = [(torch.randn(8, 12), torch.randint(0, 5, (8,)))]
    with pytest.raises(ValueError, match="cannot hold the float32 gradient of layer '0'"):
        sf.prepare(model, batches, config=sf.SEMUConfig(max_accumulator_bytes=100))
    with pytest.raises(ValueError, match="one-shot iterator"):
        sf.prepare(model, iter(batches), config=sf.SEMUConfig(max_accumulator_bytes=20 * 12 * 4))
    assert all(isinstance(m, (nn.Linear, nn.Tanh)) for m in model)  # nothing installed
    with pytest.raises(ValueError, match="max_accumulator_bytes must be an int >= 1 or None"):
        sf.SEMUConfig(max_accumulator_bytes=0)
    with pytest.raises(ValueError, match=r"seed must be an int in \[0, 2\*\*63\)"):
        sf.SEMUConfig(seed=2 ** 64)


def test_accumulator_budget_under_train_norm_mode_moves_the_statistics_once():
    """Several passes must act as one: the norm statistics move as one pass moves them, and the factors equal the
    one-pass run's (dropout draws rewound too)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.Dropout(0.3), nn.ReLU(),
                          nn.Flatten(), nn.Linear(8 * 6 * 6, 5))
    batches = forget_batches()
    config = sf.SEMUConfig(gamma=0.9, norm_mode="train")
    one = copy.deepcopy(model)
    torch.manual_seed(1)
    a = sf.prepare(one, batches, config=config)
    torch.manual_seed(1)
    budget = 8 * 36 * 5 * 4  # the Linear's gradient: the conv goes in a pass of its own
    b = sf.prepare(model, batches, config=sf.SEMUConfig(gamma=0.9, norm_mode="train", max_accumulator_bytes=budget))
    assert b.report.gradient_passes == 2
    assert torch.equal(one[1].running_mean, model[1].running_mean)
    assert int(one[1].num_batches_tracked) == int(model[1].num_batches_tracked) == len(batches)
    for name, adapter in a.adapters.items():
        torch.testing.assert_close(adapter.U, b.adapters[name].U)


def test_a_stream_loader_without_a_length_is_accepted():
    from torch.utils.data import DataLoader, IterableDataset

    class Stream(IterableDataset):  # a DataLoader over it has __len__, which raises TypeError
        def __iter__(self):
            for x, y in forget_batches():
                yield from zip(x, y)

    loader = DataLoader(Stream(), batch_size=4)
    sm = sf.prepare(small_cnn(), loader)
    assert sm.adapters
    sm, _ = sf.unlearn(small_cnn(), loader, epochs=1, progress=False)
    assert sm.adapters


def test_checking_a_loader_draws_nothing_from_its_sampler():
    from torch.utils.data import DataLoader, TensorDataset

    from semu_fast.pipeline import check_loader

    generator = torch.Generator().manual_seed(0)
    x, y = forget_batches()[0]
    loader = DataLoader(TensorDataset(x, y), batch_size=4, shuffle=True, generator=generator)
    state = generator.get_state()
    check_loader("forget_loader", loader, passes=2)
    assert torch.equal(generator.get_state(), state)  # a seeded shuffle stays the one the user seeded
    with pytest.raises(ValueError, match="one-shot iterator"):
        check_loader("forget_loader", iter(loader), passes=2)


def test_split_passes_replay_a_loader_s_own_shuffle_and_dropout():
    """Each pass of a budgeted prepare sees the batches (and dropout masks) the one pass would: the loader's
    shuffling generator is put back with torch's random state."""
    from torch.utils.data import DataLoader, TensorDataset

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 20), nn.Dropout(0.3), nn.Tanh(), nn.Linear(20, 16), nn.Tanh(),
                          nn.Linear(16, 5)).train()
    data = TensorDataset(torch.randn(24, 12), torch.randint(0, 5, (24,)))

    def run(budget):
        torch.manual_seed(1)
        loader = DataLoader(data, batch_size=8, shuffle=True, generator=torch.Generator().manual_seed(2))
        return sf.prepare(copy.deepcopy(model), loader, config=sf.SEMUConfig(gamma=0.9, max_accumulator_bytes=budget))

    one, split = run(None), run(20 * 16 * 4)
    assert split.report.gradient_passes == 3
    for name, adapter in one.adapters.items():
        torch.testing.assert_close(adapter.U.abs(), split.adapters[name].U.abs(), rtol=0, atol=1e-5)


def test_prepare_leaves_other_modules_buffers_alone():
    """A spectral-normed layer (skipped by SEMU) in a train-mode model: its power iteration may not move its
    buffers during the pass; only norm_mode="train" moves buffers."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.utils.parametrizations.spectral_norm(nn.Linear(8, 8)),
                          nn.Tanh(), nn.Linear(8, 3)).train()
    before = snapshot(model)
    sm = sf.prepare(model, [(torch.randn(4, 6), torch.randint(0, 3, (4,)))])
    assert_same_state(sm.unload(), before)


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_prepare_takes_a_model_with_an_expanded_buffer(mode):
    """A buffer that is an expanded view cannot be written: prepare copies back only buffers that moved."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 3))
    model.register_buffer("table", torch.arange(4.0).expand(3, 4))
    model.train(mode == "train")
    sm = sf.prepare(model, [(torch.randn(5, 4), torch.randint(0, 3, (5,)))])
    assert sm.adapters and torch.equal(model.table, torch.arange(4.0).expand(3, 4))


def test_conv_max_reports_the_variance_its_adapters_span():
    """conv_rank="max": every channel's adapter spans k_max directions, so captured_variance counts all of them."""
    torch.manual_seed(0)
    conv = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4 * 4 * 4, 3))
    batches = [(torch.randn(6, 3, 6, 6), torch.randint(0, 3, (6,)))]
    twin = copy.deepcopy(conv)
    G = sf.gradients.accumulate_gradients(twin, batches, {"0": twin[0]})["0"].double()
    sm = sf.prepare(conv, batches, config=sf.SEMUConfig(gamma=0.8, conv_rank="max", target_modules=["^0$"]))
    adapter, layer = sm.adapters["0"], sm.report.layers[0]
    assert len(set(layer.ranks)) > 1, layer.ranks  # channels of different k: the case at hand
    W = conv[0].weight.detach().double()
    G = G - (G * W).sum() / W.square().sum() * W  # the projection prepare applied
    mats = G.permute(1, 0, 2, 3).flatten(2)  # (in, out, kh*kw)
    U, Vh = adapter.U.double(), adapter.Vh.double()
    inside = (U.transpose(-1, -2) @ mats @ Vh.transpose(-1, -2)).square().sum()
    assert layer.captured_variance == pytest.approx(float(inside / mats.square().sum()), rel=1e-4)


@pytest.mark.parametrize("svd", ["exact", "gram"])
def test_conv_max_gives_every_channel_k_max_orthonormal_directions(svd):
    """conv_rank="max" (the official rule): a channel of lower rank, even a dead one, trains in k_max directions, as
    the official SVD's null-space columns let it; the Gram route's zero columns are completed."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))
    x = torch.randn(6, 3, 8, 8)
    x[:, 2] = 0  # input channel 2 carries nothing: its gradient is zero
    sm = sf.prepare(model, [(x, torch.randint(0, 4, (6,)))], config=sf.SEMUConfig(
        gamma=0.9, svd=svd, conv_rank="max", target_modules=["^0$"], projection="none"))
    U, layer = sm.adapters["0"].U.double(), sm.report.layers[0]
    assert layer.ranks[2] == 0 and max(layer.ranks) == U.shape[-1] > min(layer.ranks)
    torch.testing.assert_close(U.transpose(-1, -2) @ U, torch.eye(U.shape[-1], dtype=torch.float64).expand(3, -1, -1),
                               rtol=0, atol=1e-5)
