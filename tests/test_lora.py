"""LoRA export: SEMU's Linear adapters written as a peft adapter folder that peft loads into the same model."""
import copy
import json
import warnings

import pytest
import torch
import torch.nn as nn

pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

import semu_fast as sf  # noqa: E402
from semu_fast.workflows import llm  # noqa: E402
from semu_fast.lora import export_lora, lora_factors  # noqa: E402
from helpers import forget_batches, small_cnn  # noqa: E402
from llm_helpers import id_batches, tiny_llama  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

TARGETS = ("mlp.down_proj", "self_attn.q_proj")


def _randomise_R(semu_model, seed=1, scale=0.1):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for adapter in semu_model.adapters.values():
            adapter.R.copy_(scale * torch.randn(adapter.R.shape, generator=gen))


@pytest.fixture(scope="module")
def prepared():
    """(original model copy, SEMUModel with random R) on a tiny Llama: down_proj and q_proj in both layers."""
    model = tiny_llama()
    base = copy.deepcopy(model)
    sm = sf.prepare(model, id_batches(), loss_fn=llm.nll_loss,
                    config=sf.SEMUConfig(gamma=0.9, target_modules=TARGETS))
    _randomise_R(sm)
    return base, sm


def test_peft_loads_the_export_and_reproduces_semu_logits_and_merged_weights(prepared, tmp_path):
    base, sm = prepared
    ranks = {name: a.rank for name, a in sm.adapters.items()}
    assert len(ranks) == 4 and len(set(ranks.values())) > 1  # per-layer ranks: rank_pattern is exercised
    config = export_lora(sm, tmp_path / "lora", "tiny-llama", task_type="CAUSAL_LM")
    assert json.loads((tmp_path / "lora" / "adapter_config.json").read_text()) == config
    assert config["lora_alpha"] == config["r"] and config["alpha_pattern"] == config["rank_pattern"]
    assert all(ranks[n] == config["rank_pattern"].get(n, config["r"]) for n in ranks)
    assert config["base_model_name_or_path"] == "tiny-llama" and sorted(config["target_modules"]) == sorted(ranks)
    tensors = load_file(tmp_path / "lora" / "adapter_model.safetensors")
    assert set(tensors) == {f"base_model.model.{n}.lora_{p}.weight" for n in ranks for p in "AB"}

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        peft_model = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "lora").eval()
    assert not [w for w in caught if "keys" in str(w.message)]  # no missing or unexpected adapter keys
    for name, adapter in sm.adapters.items():
        layer = peft_model.base_model.model.get_submodule(name)
        assert layer.r["default"] == adapter.rank and layer.scaling["default"] == 1.0
        assert torch.equal(layer.lora_A["default"].weight, adapter.Vh)
        assert torch.equal(layer.lora_B["default"].weight, adapter.U @ adapter.R.detach())
    ids = id_batches(2, seed=7)
    with torch.no_grad():
        for batch in ids:
            expected = sm(input_ids=batch["input_ids"]).logits
            got = peft_model(input_ids=batch["input_ids"]).logits
            assert (expected - base(input_ids=batch["input_ids"]).logits).abs().max() > 1e-2  # R does something
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)

    merged = peft_model.merge_and_unload()
    for name, adapter in sm.adapters.items():
        with torch.no_grad():
            expected = adapter.base_layer.weight + adapter.U @ adapter.R @ adapter.Vh
        torch.testing.assert_close(merged.get_submodule(name).weight, expected, rtol=0, atol=1e-7)


def test_export_of_merged_adapters_equals_the_unmerged_export(prepared):
    _, sm = prepared
    before = lora_factors(sm)
    sm.merge_adapters()
    try:
        after = lora_factors(sm)
    finally:
        sm.unmerge_adapters()
    assert before.keys() == after.keys()
    assert all(torch.equal(a, b) for k in before for a, b in zip(before[k], after[k]))


def test_export_dtype_is_the_saved_dtype(prepared, tmp_path):
    _, sm = prepared
    export_lora(sm, tmp_path, dtype=torch.bfloat16)
    assert {t.dtype for t in load_file(tmp_path / "adapter_model.safetensors").values()} == {torch.bfloat16}
    with pytest.raises(ValueError, match="dtype must be a floating torch.dtype"):
        export_lora(sm, tmp_path, dtype=torch.int8)


def test_conv_adapters_are_refused_or_skipped_and_the_linear_part_still_matches(tmp_path):
    model = small_cnn().eval()
    base = copy.deepcopy(model)
    sm = sf.prepare(model, forget_batches(), config=sf.SEMUConfig(gamma=0.9))
    _randomise_R(sm)
    conv = [n for n, a in sm.adapters.items() if isinstance(a, sf.adapters.SEMUConv2d)]
    assert conv
    with pytest.raises(ValueError, match="conv and per-column adapters have no LoRA form"):
        export_lora(sm, tmp_path / "refused")
    assert not (tmp_path / "refused").exists()
    with pytest.warns(UserWarning, match="skipping 2 conv adapter"):
        config = export_lora(sm, tmp_path / "lora", skip_conv=True)
    assert config["target_modules"] == ["7", "9"]
    with torch.no_grad():  # with the conv deltas at zero the exported Linear deltas are the whole difference
        for name in conv:
            sm.adapters[name].R.zero_()
    peft_model = peft.PeftModel.from_pretrained(base, tmp_path / "lora").eval()
    x = forget_batches(seed=3)[0][0]
    with torch.no_grad():
        torch.testing.assert_close(peft_model(x), sm(x), rtol=1e-5, atol=1e-6)


def test_an_unadapted_layer_with_the_same_name_suffix_is_excluded(tmp_path):
    """peft targets every module whose name ends with ".<target>": `block.proj` must not get `proj`'s LoRA."""
    torch.manual_seed(0)
    model = nn.Sequential()
    model.add_module("proj", nn.Linear(6, 6))
    model.add_module("block", nn.Sequential())
    model.block.add_module("proj", nn.Linear(6, 6))
    base = copy.deepcopy(model)
    x = torch.randn(8, 6)
    sm = sf.prepare(model, [(x, torch.randint(0, 6, (8,)))], config=sf.SEMUConfig(target_modules="^proj$"))
    _randomise_R(sm)
    config = export_lora(sm, tmp_path)
    assert config["target_modules"] == ["proj"] and config["exclude_modules"] == ["block.proj"]
    peft_model = peft.PeftModel.from_pretrained(base, tmp_path).eval()
    assert not hasattr(peft_model.base_model.model.block.proj, "lora_A")
    with torch.no_grad():
        torch.testing.assert_close(peft_model(x), sm(x), rtol=1e-5, atol=1e-6)


def test_nested_names_that_end_like_another_layer_get_their_own_rank(tmp_path):
    """"0" is a dotted suffix of "1.0" (nested nn.Sequential): each must still get its own rank in peft."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Sequential(nn.Linear(8, 8))),
                          nn.Tanh(), nn.Linear(8, 3))
    base = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(0)
    data = [(torch.randn(4, 6, generator=gen), torch.randint(0, 3, (4,), generator=gen)) for _ in range(3)]
    sm = sf.prepare(model, data, config=sf.SEMUConfig(gamma=0.99, svd="exact"))
    _randomise_R(sm, scale=0.5)
    ranks = {name: a.rank for name, a in sm.adapters.items()}
    assert ranks["0"] != ranks["1.0"] and ranks["0"] == ranks["1.2.0"], ranks  # the case the test is about
    config = export_lora(sm, tmp_path)
    assert config["rank_pattern"] == ranks
    peft_model = peft.PeftModel.from_pretrained(base, tmp_path).eval()
    for name, k in ranks.items():
        assert peft_model.base_model.model.get_submodule(name).r["default"] == k
    x = torch.randn(5, 6, generator=gen)
    with torch.no_grad():
        torch.testing.assert_close(peft_model(x), sm.eval()(x), rtol=1e-5, atol=1e-6)


def test_a_name_with_regex_characters_exports(tmp_path):
    """peft reads rank_pattern keys as regular expressions and falls back to the plain name when none matches."""
    torch.manual_seed(0)
    model = nn.Sequential()
    model.add_module("in(0)", nn.Linear(6, 6))
    model.add_module("act", nn.Tanh())
    model.add_module("out", nn.Linear(6, 3))
    base = copy.deepcopy(model)
    x = torch.randn(8, 6)
    sm = sf.prepare(model, [(x, torch.randint(0, 3, (8,)))], config=sf.SEMUConfig(gamma=0.99, svd="exact"))
    _randomise_R(sm)
    export_lora(sm, tmp_path)
    peft_model = peft.PeftModel.from_pretrained(base, tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(peft_model(x), sm.eval()(x), rtol=1e-5, atol=1e-6)


def test_export_rejects_what_is_not_a_semu_model(tmp_path):
    with pytest.raises(TypeError, match="semu_model must be a SEMUModel"):
        export_lora(tiny_llama(), tmp_path)


@pytest.mark.parametrize("prefix", ["unet", None])
def test_diffusers_loads_the_export_into_a_unet_and_reproduces_semu(tmp_path, prefix):
    diffusers = pytest.importorskip("diffusers")
    from semu_fast.workflows import stable_diffusion as SD
    from semu_fast.lora import export_diffusers_lora

    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8).eval()
    base = copy.deepcopy(unet)
    gen = torch.Generator().manual_seed(0)
    latents, embeds = torch.randn(4, 4, 8, 8, generator=gen), torch.randn(2, 6, 32, generator=gen)
    scheduler = diffusers.DDPMScheduler(num_train_timesteps=100)
    sm = sf.prepare(unet, [(latents[:2], torch.tensor([0, 1])), (latents[2:], torch.tensor([1, 0]))],
                    SD.sd_gradient_loss(scheduler, embeds, embeds[:1], guidance_scale=0.0), SD.sd_config("xattn"))
    _randomise_R(sm)
    ranks = export_diffusers_lora(sm, tmp_path / "lora", prefix=prefix)
    assert ranks == {name: a.rank for name, a in sm.adapters.items()} and len(set(ranks.values())) > 1
    lead = f"{prefix}." if prefix else ""
    assert set(load_file(tmp_path / "lora" / "pytorch_lora_weights.safetensors")) == {
        f"{lead}{n}.lora_{p}.weight" for n in ranks for p in "AB"}
    x, t = torch.randn(2, 4, 8, 8, generator=gen), torch.tensor([10, 60])
    with torch.no_grad():
        expected = sm(x, t, encoder_hidden_states=embeds).sample
        assert (expected - base(x, t, encoder_hidden_states=embeds).sample).abs().max() > 1e-3  # R does something
        base.load_lora_adapter(str(tmp_path / "lora"), weight_name="pytorch_lora_weights.safetensors", prefix=prefix)
        torch.testing.assert_close(base(x, t, encoder_hidden_states=embeds).sample, expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="prefix must be a component name"):
        export_diffusers_lora(sm, tmp_path / "bad", prefix="unet.")
    assert not (tmp_path / "bad").exists()


def test_lora_factors_exported_in_float64_keep_float64_precision():
    """lora_B @ lora_A equals U R Vh to float64 rounding when the export is float64."""
    import semu_fast as sf
    from semu_fast.lora import lora_factors

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(12, 9), torch.nn.ReLU(), torch.nn.Linear(9, 4)).double()
    batches = [(torch.randn(8, 12, dtype=torch.float64), torch.randint(0, 4, (8,))) for _ in range(3)]
    sm = sf.prepare(model, batches)
    with torch.no_grad():
        for adapter in sm.adapters.values():
            adapter.R.copy_(torch.randn_like(adapter.R))
    for name, (A, B) in lora_factors(sm, dtype=torch.float64).items():
        adapter = sm.adapters[name]
        want = adapter.U.double() @ adapter.R.double() @ adapter.Vh.double()
        assert (B @ A - want.cpu()).abs().max() < 1e-12
