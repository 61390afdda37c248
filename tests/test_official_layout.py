"""The official DDPM layout: per-input-column rank-1 adapters on Linear layers (what the official UNet's 1x1-conv
attention gets from its per-input-channel split) and ranks without a floor (min_rank=0), checked against a straight
re-implementation of the official split (DDPM/svd_utils/transform_model.py, utils.py) written here."""
import pytest
import torch
import torch.nn as nn

import semu_fast as sf
from semu_fast.adapters import SEMUColumnLinear, SEMUConv2d
from helpers import assert_same_state, snapshot

C_IN, C_OUT = 12, 10


class Block(nn.Module):
    """A 1x1-conv "attention" block and its Linear twin on the same weights: conv(x) == lin(x^T)^T per pixel."""

    def __init__(self, seed=0, conv=False):
        super().__init__()
        torch.manual_seed(seed)
        self.pre = nn.Conv2d(3, C_IN, 3, padding=1)
        self.conv = conv
        self.proj = nn.Conv2d(C_IN, C_OUT, 1)
        self.head = nn.Linear(C_OUT, 4)
        if not conv:  # the Linear twin holds exactly the conv's numbers
            linear = nn.Linear(C_IN, C_OUT)
            with torch.no_grad():
                linear.weight.copy_(self.proj.weight[:, :, 0, 0])
                linear.bias.copy_(self.proj.bias)
            self.proj = linear

    def forward(self, x):
        h = torch.tanh(self.pre(x))
        h = self.proj(h) if self.conv else self.proj(h.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        return self.head(h.mean((2, 3)))


def forget(seed=0, n=2, batch=8):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(batch, 3, 5, 5, generator=g), torch.randint(0, 4, (batch,), generator=g)) for _ in range(n)]


def summed_gradient(model, batches, name):
    """The forget loss's gradient of model.<name>.weight summed over the batches (the official gradient pass)."""
    weight = model.get_submodule(name).weight
    total = torch.zeros_like(weight, dtype=torch.float64)
    for x, y in batches:
        (g,) = torch.autograd.grad(nn.functional.cross_entropy(model(x), y), weight)
        total += g.double()
    return total


def official_split(G4, gamma):
    """The official per-input-channel split of a conv gradient (out, in, kh, kw), no floor on k: full thin U, Vh per
    channel and k = searchsorted(cumsum(S^2)/sum(S^2), gamma, right) per channel."""
    M = torch.flatten(torch.permute(G4, (1, 0, 2, 3)), start_dim=2)
    u, s, vh = torch.linalg.svd(M, full_matrices=False)
    cumulative = torch.cumsum(torch.square(s) / torch.square(s).sum(dim=1, keepdim=True), dim=1)
    k = torch.searchsorted(cumulative, torch.full((s.shape[0], 1), gamma, dtype=s.dtype), side="right")
    return u, vh, k.flatten()


def official_delta(u, R, vh, k, kernel_size):
    """The official conv delta with R masked as its clip_grad mask leaves it (entries past a channel's k never
    move from zero): (out, in, kh, kw)."""
    q = R.shape[-1]
    keep = torch.arange(q).view(1, q, 1) < k.view(-1, 1, 1)
    R = R * (keep & keep.transpose(1, 2))
    delta = torch.einsum("nij,njk,nkl->nil", u, R, vh)
    return torch.permute(torch.unflatten(delta, 2, kernel_size), (1, 0, 2, 3))


def per_column_config(**kw):
    return sf.SEMUConfig(**{"per_column_modules": (r"^proj$",), "projection": "none", **kw})


def set_R(adapter, seed=1):
    R = torch.randn(adapter.R.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    with torch.no_grad():
        adapter.R.copy_(R)
    return R


@pytest.mark.parametrize("rule, gamma, min_rank, expected_k", [
    ("official", 1.0, 0, 1),     # the official DDPM attention (gamma 1.0): one direction per column
    ("official", 0.9, 0, 0),     # a single singular value explains all: no floor leaves k = 0
    ("official", 0.9, 1, 1),     # the floor of 1 (the official classification code's max(1, k))
    ("at_least", 0.9, 1, 1),
])
def test_per_column_linear_matches_the_official_1x1_conv_split(rule, gamma, min_rank, expected_k):
    batches = forget()
    conv_model, lin_model = Block(conv=True), Block()
    G4 = summed_gradient(conv_model, batches, "proj")
    torch.testing.assert_close(summed_gradient(lin_model, batches, "proj"), G4[:, :, 0, 0], rtol=1e-5, atol=1e-7)
    u, vh, k_official = official_split(G4, gamma)
    if min_rank:
        k_official = k_official.clamp(min=min_rank)
    assert (k_official == expected_k).all()

    sm = sf.prepare(lin_model, batches, config=per_column_config(gamma=gamma, rank_rule=rule, min_rank=min_rank))
    layer = next(r for r in sm.report.layers if r.name == "proj")
    assert layer.kind == "column_linear" and layer.ranks == k_official.tolist()
    assert layer.trainable_params == int((k_official ** 2).sum())
    if expected_k == 0:  # every column at k = 0: no adapter, and the report says why
        assert "proj" not in sm.adapters and layer.k == 0 and "min_rank" in layer.note
        return
    adapter = sm.adapters["proj"]
    assert isinstance(adapter, SEMUColumnLinear) and adapter.R.shape == (C_IN, 1, 1)
    assert adapter.trainable_params() == layer.trainable_params == C_IN  # ~C entries, not C^2
    R = set_R(adapter)
    expected = official_delta(u, R, vh, k_official, (1, 1))[:, :, 0, 0]
    torch.testing.assert_close(adapter.delta_weight().double(), expected, rtol=1e-5, atol=1e-6)


def test_per_column_ranks_and_delta_equal_the_conv_adapter_of_the_twin():
    batches = forget(seed=3)
    config = dict(gamma=1.0, rank_rule="official", min_rank=0, projection="orthogonal")
    conv_sm = sf.prepare(Block(conv=True), batches, config=sf.SEMUConfig(conv_rank="per_channel", **config))
    lin_sm = sf.prepare(Block(), batches, config=per_column_config(**config))
    conv, lin = conv_sm.adapters["proj"], lin_sm.adapters["proj"]
    assert isinstance(conv, SEMUConv2d) and lin.ranks == conv.ranks
    assert lin.trainable_params() == conv.trainable_params()
    R = set_R(lin)
    set_R(conv)
    torch.testing.assert_close(lin.delta_weight(), conv.delta_weight()[:, :, 0, 0], rtol=1e-4, atol=1e-6)
    assert R.shape == (C_IN, 1, 1)


def _linear_with_zero_columns(gamma=1.0, **kw):
    """The Linear twin with input features 2 and 7 always zero on the forget data: their gradient columns are 0."""
    model = Block(seed=4)
    dead = torch.zeros(C_IN, dtype=torch.bool)
    dead[[2, 7]] = True
    with torch.no_grad():
        model.pre.weight[dead] = 0
        model.pre.bias[dead] = 0
    sm = sf.prepare(model, forget(seed=4), config=per_column_config(gamma=gamma, **kw))
    return sm, dead


def test_zero_columns_get_k_0_and_contribute_nothing():
    """(The official code gives such a column k = 1: its 0/0 explained variance is NaN and searchsorted places NaN
    last; semu_fast keeps k = 0 for a zero gradient, as for whole layers.)"""
    sm, dead = _linear_with_zero_columns(rank_rule="official", min_rank=0)
    adapter = sm.adapters["proj"]
    assert adapter.ranks == [0 if d else 1 for d in dead.tolist()]
    assert adapter.trainable_params() == C_IN - 2
    set_R(adapter)
    delta = adapter.delta_weight()
    assert (delta[:, dead] == 0).all() and (delta[:, ~dead].abs().sum(0) > 0).all()
    x = torch.randn(6, C_IN, dtype=torch.float32)
    adapter(x).square().sum().backward()
    assert (adapter.R.grad[dead] == 0).all() and (adapter.R.grad[~dead] != 0).all()


def test_adapted_forward_is_x_Wt_plus_the_float64_delta_and_only_R_gets_gradients():
    sm, _ = _linear_with_zero_columns()
    adapter = sm.adapters["proj"]
    set_R(adapter, seed=5)
    base = adapter.base_layer
    delta64 = torch.einsum("noa,nab,nbs->on", adapter.U.double(), adapter.R.double(), adapter.Vh.double())
    x = torch.randn(3, 5, C_IN, generator=torch.Generator().manual_seed(6))  # any leading dims
    expected = x.double() @ (base.weight.double() + delta64).T + base.bias.double()
    y = adapter(x)
    assert y.dtype == torch.float32 and y.shape == (3, 5, C_OUT)
    torch.testing.assert_close(y.double(), expected, rtol=1e-5, atol=1e-5)
    x64 = x.double().requires_grad_()
    with torch.no_grad():
        base.double()
    y64 = adapter(x64)
    torch.testing.assert_close(y64, expected, rtol=1e-12, atol=1e-12)
    base.float()
    # gradients: R's equals the float64 chain rule, dR[n] = Vh[n] * U[n]^T (dy^T x)[:, n]; nothing else gets one
    dy = torch.randn(3, 5, C_OUT, generator=torch.Generator().manual_seed(7))
    (adapter(x) * dy).sum().backward()
    dW = dy.double().reshape(-1, C_OUT).T @ x.double().reshape(-1, C_IN)
    expected_dR = torch.einsum("no,on->n", adapter.U[:, :, 0].double(), dW) * adapter.Vh[:, 0, 0].double()
    torch.testing.assert_close(adapter.R.grad[:, 0, 0].double(), expected_dR, rtol=1e-5, atol=1e-5)
    trainable = [n for n, p in sm.named_parameters() if p.requires_grad]
    assert trainable == [n for n, _ in sm.named_parameters() if n.endswith(".R")]
    assert base.weight.grad is None and base.bias.grad is None


def test_save_load_merge_unmerge_round_trip(tmp_path):
    sm, _ = _linear_with_zero_columns(rank_rule="official", min_rank=0)
    model = sm.model
    for i, adapter in enumerate(sm.adapters.values()):
        set_R(adapter, seed=10 + i)
    x = forget(seed=8)[0][0]
    adapted = sm(x)
    sm.save_adapters(tmp_path / "adapters")

    fresh = Block(seed=4)
    fresh.load_state_dict(_base_state(model))
    original = snapshot(fresh)
    loaded = sf.load_adapters(fresh, tmp_path / "adapters")
    assert loaded.config == sm.config and loaded.config.per_column_modules == (r"^proj$",)
    assert loaded.config.min_rank == 0
    other = loaded.adapters["proj"]
    assert isinstance(other, SEMUColumnLinear) and other.ranks == sm.adapters["proj"].ranks
    for part in ("R", "U", "Vh"):
        assert torch.equal(getattr(other, part), getattr(sm.adapters["proj"], part))
    assert torch.equal(loaded(x), adapted)
    assert loaded.report.layers[1].kind == "column_linear"

    loaded.merge_adapters()
    torch.testing.assert_close(loaded(x), adapted, rtol=1e-5, atol=1e-6)
    expected = original["proj.weight"] + other.delta_weight()
    assert torch.equal(other.base_layer.weight, expected)
    loaded.unmerge_adapters()
    assert torch.equal(loaded(x), adapted)
    loaded.merge_adapters()
    assert_same_state(loaded.unload(), original)  # bit for bit, even from merged


def _base_state(model):
    """The base model's state dict in module order (adapters hold their layer as .base_layer)."""
    return {k.replace(".base_layer", ""): v for k, v in model.state_dict().items()
            if not k.endswith((".R", ".U", ".Vh"))}


def test_min_rank_0_per_channel_conv_matches_the_official_ranks_and_delta():
    batches = forget(seed=2)
    model = Block(conv=True, seed=2)
    G4 = summed_gradient(model, batches, "pre")
    cumulative = torch.cumsum(torch.linalg.svdvals(G4.permute(1, 0, 2, 3).flatten(2)) ** 2, 1)
    ratios = cumulative / cumulative[:, -1:]
    leading = ratios[:, 0].sort().values
    gamma = float(leading[:2].mean())  # between two channels' leading ratios: one keeps directions, one none
    u, vh, k_official = official_split(G4, gamma)
    assert (ratios - gamma).abs().min() > 1e-4  # no ratio so close to gamma that float32 could round it across
    assert (k_official == 0).any() and (k_official > 0).any()  # a mix: some channels train nothing
    config = sf.SEMUConfig(gamma=gamma, rank_rule="official", min_rank=0, conv_rank="per_channel",
                           projection="none", target_modules=(r"^pre$",))
    sm = sf.prepare(model, batches, config=config)
    adapter = sm.adapters["pre"]
    assert adapter.ranks == k_official.tolist()
    assert adapter.trainable_params() == sm.report.trainable_params == int((k_official ** 2).sum())
    R = set_R(adapter)
    q = R.shape[-1]
    R_full = torch.zeros(R.shape[0], u.shape[-1], u.shape[-1], dtype=torch.float64)
    R_full[:, :q, :q] = R
    expected = official_delta(u, R_full, vh, k_official, (3, 3))
    torch.testing.assert_close(adapter.delta_weight().double(), expected, rtol=1e-4, atol=1e-6)
    assert (adapter.delta_weight()[:, k_official == 0] == 0).all()


def test_min_rank_0_leaves_a_dominated_linear_without_an_adapter():
    batches = forget(seed=5)
    sm = sf.prepare(Block(seed=5), batches, config=sf.SEMUConfig(gamma=0.05, rank_rule="official", min_rank=0))
    layer = next(r for r in sm.report.layers if r.name == "head")
    assert layer.k == 0 and layer.trainable_params == 0 and "min_rank" in layer.note and "head" not in sm.adapters
    sm1 = sf.prepare(Block(seed=5), batches, config=sf.SEMUConfig(gamma=0.05, rank_rule="official"))
    assert next(r for r in sm1.report.layers if r.name == "head").k == 1


def test_trainable_split_adds_up():
    batches = forget()
    sm = sf.prepare(Block(), batches, config=per_column_config(gamma=0.9))
    split = sm.report.trainable_split(r"^proj$")
    by_name = {r.name: r.trainable_params for r in sm.report.layers}
    assert split["conv"]["trainable_params"] == by_name["pre"]
    assert split["attention"]["trainable_params"] == by_name["proj"] == C_IN
    assert split["other"]["trainable_params"] == by_name["head"]
    total = sum(part["trainable_share"] for part in split.values())
    assert abs(total - sm.report.trainable_share) < 1e-9
    assert split["attention"]["trainable_share"] == pytest.approx(100 * C_IN / sm.report.total_params)
    with pytest.raises(ValueError, match="attention"):
        sm.report.trainable_split("(")


@pytest.mark.parametrize("kwargs, match", [
    ({"per_column_modules": ["("]}, "per_column_modules: '\\(' is not a valid regular expression"),
    ({"per_column_modules": [3]}, "per_column_modules must hold"),
    ({"min_rank": 2}, "min_rank must be 0 or 1"),
    ({"min_rank": True}, "min_rank must be 0 or 1"),
    ({"min_rank": 0}, "min_rank=0 .*rank_rule='official'"),
])
def test_config_rejects_bad_layout_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        sf.SEMUConfig(**kwargs)


def test_config_round_trip_and_prepare_errors_name_per_column_modules():
    config = sf.SEMUConfig(per_column_modules="proj", min_rank=0, rank_rule="official")
    assert config.per_column_modules == ("proj",) and config.to_dict()["per_column_modules"] == ["proj"]
    assert sf.SEMUConfig.from_dict(config.to_dict()) == config
    assert sf.SEMUConfig().min_rank == 1 and sf.SEMUConfig().per_column_modules is None
    with pytest.raises(ValueError, match="per_column_modules pattern 'nothing' matches no"):
        sf.prepare(Block(), forget(), config=sf.SEMUConfig(per_column_modules=("nothing",)))
    with pytest.raises(ValueError, match="per_column_modules selects 'pre', a Conv2d"):
        sf.prepare(Block(), forget(), config=sf.SEMUConfig(per_column_modules=("pre",)))


def test_lora_export_refuses_per_column_adapters_unless_skipped():
    from semu_fast.lora import lora_factors

    sm, _ = _linear_with_zero_columns(rank_rule="official", min_rank=0)
    assert any(isinstance(a, SEMUColumnLinear) for a in sm.adapters.values())
    with pytest.raises(ValueError, match="per-column adapters have no LoRA form"):
        lora_factors(sm)
    with pytest.warns(UserWarning, match="skipping"):
        factors = lora_factors(sm, skip_conv=True)
    assert not any(isinstance(sm.adapters[name], SEMUColumnLinear) for name in factors)
