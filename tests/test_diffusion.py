"""SEMU on diffusers models: DDPM class forgetting and SD-style concept removal, on tiny random-initialised models."""
from __future__ import annotations

import json
import re
import warnings

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

diffusers = pytest.importorskip("diffusers")

import semu_fast as sf  # noqa: E402
from semu_fast.workflows import diffusion as D  # noqa: E402
from semu_fast.workflows import stable_diffusion as SD  # noqa: E402

NUM_CLASSES = 3


def tiny_unet(seed: int = 0):
    """Class-conditional UNet2DModel, 8x8, two levels (the 4x4 one with self-attention), ~30k parameters."""
    torch.manual_seed(seed)
    return diffusers.UNet2DModel(sample_size=8, in_channels=1, out_channels=1, layers_per_block=1,
                                 block_out_channels=(8, 16), down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                                 up_block_types=("AttnUpBlock2D", "UpBlock2D"), num_class_embeds=NUM_CLASSES + 1,
                                 norm_num_groups=4, attention_head_dim=8).eval()


def scheduler():
    return diffusers.DDPMScheduler(num_train_timesteps=100)


def batches(label: int, n_batches: int = 2, batch: int = 4, seed: int = 0):
    g = torch.Generator().manual_seed(seed + label)
    return [(torch.rand(batch, 1, 8, 8, generator=g) * 2 - 1, torch.full((batch,), label)) for _ in range(n_batches)]


def reference_noisy(sched, x0, generator, antithetic):
    """add_noise by hand: sqrt(abar_t) x0 + sqrt(1 - abar_t) noise, drawing as the library documents."""
    noise = torch.randn(x0.shape, generator=generator)
    T = sched.config.num_train_timesteps
    if antithetic:
        t = torch.randint(0, T, (len(x0) // 2 + 1,), generator=generator)
        t = torch.cat([t, T - 1 - t])[:len(x0)]
    else:
        t = torch.randint(0, T, (len(x0),), generator=generator)
    abar = sched.alphas_cumprod[t].view(-1, 1, 1, 1)
    return abar.sqrt() * x0 + (1 - abar).sqrt() * noise, noise, t


# --- DDPM losses ---------------------------------------------------------------------------------------------------

def test_diffusion_loss_matches_hand_computed():
    unet, sched = tiny_unet(), scheduler()
    loss_fn = D.diffusion_loss(sched, seed=5)
    g = torch.Generator().manual_seed(5)
    for batch in batches(1, n_batches=2, batch=5):  # two calls: the second draws fresh noise and timesteps
        x_t, noise, t = reference_noisy(sched, batch[0], g, antithetic=True)
        expected = (unet(x_t, t, class_labels=batch[1]).sample - noise).square().mean()
        torch.testing.assert_close(loss_fn(unet, batch), expected, rtol=1e-5, atol=1e-6)
    # uniform timesteps
    loss_fn = D.diffusion_loss(sched, seed=2, antithetic=False)
    g = torch.Generator().manual_seed(2)
    batch = batches(0, 1, 6)[0]
    x_t, noise, t = reference_noisy(sched, batch[0], g, antithetic=False)
    expected = F.mse_loss(unet(x_t, t, class_labels=batch[1]).sample, noise)
    torch.testing.assert_close(loss_fn(unet, batch), expected, rtol=1e-5, atol=1e-6)


def test_antithetic_timesteps_pair_up():
    t = D.draw_timesteps(7, 100, torch.Generator().manual_seed(0))
    assert t.shape == (7,) and t.min() >= 0 and t.max() < 100
    torch.testing.assert_close(t[4:7], 99 - t[:3])


def test_forget_loss_matches_hand_computed_and_detaches_the_target():
    unet, sched = tiny_unet(), scheduler()
    forget, remain = batches(1, 1, 6)[0], batches(2, 1, 6)[0]
    loss_fn = D.ddpm_forget_loss(sched, 1, NUM_CLASSES, alpha=0.3)
    params = [p for p in unet.parameters()]

    loss = loss_fn(unet, forget, torch.Generator().manual_seed(9))
    g = torch.Generator().manual_seed(9)
    x_t, _, t = reference_noisy(sched, forget[0], g, antithetic=True)
    allowed = torch.tensor([0, 2])
    other = allowed[torch.randint(0, 2, (6,), generator=g)]
    assert not (other == 1).any()
    eps_forget = unet(x_t, t, class_labels=forget[1]).sample
    eps_other = unet(x_t, t, class_labels=other).sample
    torch.testing.assert_close(loss, F.mse_loss(eps_forget, eps_other), rtol=1e-5, atol=1e-6)
    # the gradient flows only through the forget-class prediction
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    expected = torch.autograd.grad(F.mse_loss(eps_forget, eps_other.detach()), params, allow_unused=True)
    for a, b in zip(grads, expected):
        if b is None:
            assert a is None or not a.any()
        else:
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)

    # with a remain batch: + alpha * the standard loss, drawn after the forget part
    loss = loss_fn(unet, (*forget, *remain), torch.Generator().manual_seed(9))
    g = torch.Generator().manual_seed(9)
    x_t, _, t = reference_noisy(sched, forget[0], g, antithetic=True)
    other = allowed[torch.randint(0, 2, (6,), generator=g)]
    forget_part = F.mse_loss(unet(x_t, t, class_labels=forget[1]).sample,
                             unet(x_t, t, class_labels=other).sample)
    xr_t, noise_r, t_r = reference_noisy(sched, remain[0], g, antithetic=True)
    remain_part = F.mse_loss(unet(xr_t, t_r, class_labels=remain[1]).sample, noise_r)
    torch.testing.assert_close(loss, forget_part + 0.3 * remain_part, rtol=1e-5, atol=1e-6)


def test_forget_loss_rejects_forgetting_every_class():
    loss_fn = D.ddpm_forget_loss(scheduler(), [0, 1, 2], NUM_CLASSES)
    with pytest.raises(ValueError, match="no class left"):
        loss_fn(tiny_unet(), batches(0, 1)[0], torch.Generator())


# --- unlearn_ddpm ------------------------------------------------------------------------------------------------

def test_unlearn_ddpm_trains_only_R_and_attention_is_per_column():
    unet, sched = tiny_unet(), scheduler()
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    x = torch.rand(2, 1, 8, 8) * 2 - 1
    t, c = torch.tensor([10, 50]), torch.tensor([1, 1])
    with torch.no_grad():
        out_before = unet(x, t, class_labels=c).sample
    semu_model, report, metrics = D.unlearn_ddpm(unet, sched, batches(1, 2, 8), 1, batches(0, 3, 8),
                                                 num_classes=NUM_CLASSES, steps=4, lr=1e-2, progress=False)
    assert metrics["trainable_params"] == report.trainable_params and metrics["final_loss"] is not None
    assert semu_model.config.conv_rank == "per_channel"
    assert set(map(id, (p for p in semu_model.parameters() if p.requires_grad))) == \
        set(map(id, semu_model.trainable_parameters()))
    assert any(a.R.abs().sum() > 0 for a in semu_model.adapters.values())
    with torch.no_grad():
        out_after = semu_model(x, t, class_labels=c).sample
    assert torch.isfinite(out_after).all() and not torch.allclose(out_after, out_before)
    assert report.training["optimizer"] == "adam" and report.training["lr"] == 1e-2
    assert report.training["epochs"] == 2  # 4 steps over 2 forget batches

    attention = [layer for layer in report.layers if D.matches_attention(layer.name)]
    assert {layer.name.rsplit(".", 1)[-1] for layer in attention} >= {"to_q", "to_k", "to_v", "0"}
    for layer in attention:  # the official 1x1-conv attention: one rank-1 adapter per input column
        assert layer.gamma == 1.0 and layer.kind == "column_linear" and layer.k == 1, layer
        assert layer.ranks == [1] * layer.shape[1] and layer.trainable_params == layer.shape[1]
    split = metrics["trainable_split"]
    assert split["attention"]["trainable_params"] == sum(layer.trainable_params for layer in attention)
    assert split["conv"]["trainable_params"] == sum(layer.trainable_params for layer in report.layers
                                                    if layer.kind == "conv2d")
    assert sum(part["trainable_params"] for part in split.values()) == report.trainable_params
    convs = [layer for layer in report.layers if layer.kind == "conv2d"]
    assert convs and all(layer.ranks is not None and len(layer.ranks) == layer.shape[1] for layer in convs)
    assert all(layer.gamma == 0.95 for layer in report.layers if not D.matches_attention(layer.name))

    base = semu_model.unload()
    assert base is unet
    after = base.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], before[k]) for k in before)
    assert all(p.requires_grad for p in base.parameters())


def test_unlearn_ddpm_matrix_attention_layout_is_the_one_matrix_adapter():
    semu_model, report, metrics = D.unlearn_ddpm(tiny_unet(), scheduler(), batches(1, 2, 8), 1,
                                                 num_classes=NUM_CLASSES, steps=1, attention_layout="matrix",
                                                 progress=False)
    attention = [layer for layer in report.layers if D.matches_attention(layer.name)]
    assert attention and semu_model.config.per_column_modules is None
    for layer in attention:  # gamma 1.0 on one matrix: full rank, k^2 entries
        assert layer.kind == "linear" and layer.k == min(layer.shape) and layer.trainable_params == layer.k ** 2
    assert metrics["trainable_split"]["attention"]["trainable_params"] == sum(layer.k ** 2 for layer in attention)
    assert D.ddpm_config().per_column_modules == (D.ATTENTION_PATTERN,)
    assert SD.sd_config().per_column_modules is None  # SD's official projections are nn.Linear matrices
    with pytest.raises(ValueError, match="attention_layout must be one of"):
        D.ddpm_config(attention_layout="columns")


def test_unlearn_ddpm_lowers_the_forget_loss():
    unet, sched = tiny_unet(1), scheduler()
    forget = batches(1, 2, 8)
    probe = D.ddpm_forget_loss(sched, 1, NUM_CLASSES)

    def measure(model):
        with torch.no_grad():
            return sum(probe(model, b, torch.Generator().manual_seed(3)).item() for b in forget)

    start = measure(unet)
    semu_model, _, _ = D.unlearn_ddpm(unet, sched, forget, 1, num_classes=NUM_CLASSES, steps=30, lr=1e-2,
                                      gamma=0.9, progress=False)
    assert measure(semu_model) < 0.5 * start


def test_unlearn_ddpm_takes_exactly_steps_optimizer_steps(monkeypatch):
    """The official loop cycles its loader for n_iters steps: 4 steps over 3 batches are 4, not 6."""
    seen = {}
    real = D.unlearn

    def spy(*args, **kwargs):
        seen.update(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(D, "unlearn", spy)
    calls = []
    loss = D.ddpm_forget_loss
    monkeypatch.setattr(D, "ddpm_forget_loss", lambda *a, **k: (lambda f: lambda *b: (calls.append(1), f(*b))[1])(
        loss(*a, **k)))
    _, report, _ = D.unlearn_ddpm(tiny_unet(1), scheduler(), batches(1, 3, 2), 1, num_classes=NUM_CLASSES, steps=4,
                                  progress=False)
    assert seen["max_steps"] == 4 and seen["epochs"] == 2 and len(calls) == 4 and report.training["epochs"] == 2
    with pytest.raises(ValueError, match="give steps .* not max_steps"):
        D.unlearn_ddpm(tiny_unet(1), scheduler(), batches(1, 3, 2), 1, num_classes=NUM_CLASSES, max_steps=4)


def test_unlearn_ddpm_argument_errors():
    with pytest.raises(ValueError, match="steps or epochs"):
        D.unlearn_ddpm(tiny_unet(), scheduler(), batches(1), 1, steps=1, epochs=1, progress=False)
    unet = tiny_unet()
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    for kwargs, match in (({"forget_class": NUM_CLASSES}, r"forget_class must be a class in \[0, 3\)"),
                          ({"forget_class": -1}, "forget_class must be a class"),
                          ({"forget_class": 1, "steps": 0}, "steps must be an int >= 1")):
        with pytest.raises(ValueError, match=match):
            D.unlearn_ddpm(unet, scheduler(), batches(1), num_classes=NUM_CLASSES, progress=False, **kwargs)
    v_prediction = diffusers.DDPMScheduler(num_train_timesteps=100, prediction_type="v_prediction")
    with pytest.raises(ValueError, match="prediction_type is 'v_prediction': SEMU's diffusion losses train noise"):
        D.unlearn_ddpm(unet, v_prediction, batches(1), 1, num_classes=NUM_CLASSES, progress=False)
    assert all(torch.equal(v, before[k]) for k, v in unet.state_dict().items())
    with pytest.raises(ValueError, match=r"class_labels must be in \[0, 4\)"):
        D.sample(unet, scheduler(), [0, NUM_CLASSES + 1])
    with pytest.raises(ValueError, match="num_inference_steps must be an int >= 1"):
        D.sample(unet, scheduler(), [0], num_inference_steps=0)


def test_sample_is_seeded_and_adapters_with_zero_R_change_nothing():
    unet, sched = tiny_unet(), scheduler()
    labels = [0, 1, 2, 1]
    a = D.sample(unet, sched, labels, 4, torch.Generator().manual_seed(0))
    b = D.sample(unet, sched, labels, 4, torch.Generator().manual_seed(0))
    assert a.shape == (4, 1, 8, 8) and torch.equal(a, b)
    guided = D.sample(unet, sched, labels, 4, torch.Generator().manual_seed(0), guidance_scale=2.0)
    assert guided.shape == a.shape and not torch.equal(guided, a)
    ancestral = D.sample(unet, sched, labels, 4, torch.Generator().manual_seed(0), eta=1.0, batch_size=3)
    assert ancestral.shape == a.shape and torch.isfinite(ancestral).all()
    state = {k: v.clone() for k, v in unet.state_dict().items()}
    semu_model = sf.prepare(unet, batches(1), D.diffusion_loss(sched), D.ddpm_config())
    torch.testing.assert_close(D.sample(semu_model, sched, labels, 4, torch.Generator().manual_seed(0)), a)
    assert not any(adapter.merged for adapter in semu_model.adapters.values())
    semu_model.unload()
    assert all(torch.equal(unet.state_dict()[k], v) for k, v in state.items())


class _ConstantClassifier(nn.Module):
    """Labels image i (of the samples in class order) with predictions[i]: a classifier whose answers are known."""

    def __init__(self, predictions):
        super().__init__()
        self.predictions, self.dummy = torch.tensor(predictions), nn.Parameter(torch.zeros(()))

    def forward(self, images):
        assert images.shape[0] == len(self.predictions) and 0 <= images.min() and images.max() <= 1
        return F.one_hot(self.predictions, NUM_CLASSES).float() + self.dummy


def test_classifier_metrics_counts_exactly():
    # 10 samples per class; class 0: 1 of 10 labelled 0 (10% exactly, the goal's edge), class 1: 7 of 10, class 2: all
    predictions = [0] + [1] * 9 + [1] * 7 + [0] * 3 + [2] * 10
    metrics = D.classifier_metrics(tiny_unet(), scheduler(), _ConstantClassifier(predictions), 0,
                                   num_classes=NUM_CLASSES, samples_per_class=10, num_inference_steps=2)
    assert metrics["forget_class_rate"] == 10.0 and metrics["other_accuracy"] == 85.0
    assert metrics["per_class_accuracy"] == {0: 10.0, 1: 70.0, 2: 100.0}
    assert metrics["per_class_correct"] == {0: 1, 1: 7, 2: 10}


def test_forgetting_rates_for_other_forgotten_classes():
    correct = {0: 1, 1: 7, 2: 10}  # of 10 each
    assert D.forgetting_rates(correct, 10, 1) == {"forget_class_rate": 70.0, "other_accuracy": 55.0}
    assert D.forgetting_rates(correct, 10, [0, 2]) == {"forget_class_rate": 55.0, "other_accuracy": 70.0}
    assert D.forgetting_rates(correct, 10, np.int64(1)) == D.forgetting_rates(correct, 10, [1])
    with pytest.raises(ValueError, match=r"forget_classes must be a class in \[0, 3\)"):
        D.forgetting_rates(correct, 10, 3)


# --- Stable Diffusion --------------------------------------------------------------------------------------------

WORDS = "a an the photo picture of cat dog car tree house painting by van gogh monet".split()


def tiny_vae(seed: int = 0):
    """AutoencoderKL with two levels of 8 channels: 16x16 RGB images <-> 8x8 latents of 4 channels."""
    torch.manual_seed(seed)
    return diffusers.AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                                   up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 8),
                                   layers_per_block=1, latent_channels=4, norm_num_groups=4, sample_size=16).eval()


def tiny_sd_folder(path, seed: int = 0, vae: bool = True):
    """unet/, text_encoder/, tokenizer/ (and vae/) of a tiny random SD: UNet2DConditionModel (32, 64),
    cross-attention dim 32, 8x8 latents; a 2-layer CLIPTextModel; a word-level tokenizer built with `tokenizers`;
    tiny_vae."""
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors

    torch.manual_seed(seed)
    unet = diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8)
    unet.save_pretrained(path / "unet")
    vocab = {"<pad>": 0, "<unk>": 1, "<bos>": 2, "<eos>": 3, **{w: i + 4 for i, w in enumerate(WORDS)}}
    config = transformers.CLIPTextConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=37,
                                         num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=16,
                                         pad_token_id=0, bos_token_id=2, eos_token_id=3)
    transformers.CLIPTextModel(config).save_pretrained(path / "text_encoder")
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.post_processor = processors.TemplateProcessing(single="<bos> $A <eos>",
                                                           special_tokens=[("<bos>", 2), ("<eos>", 3)])
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<bos>", eos_token="<eos>",
                                                     pad_token="<pad>", unk_token="<unk>", model_max_length=16)
    tokenizer.save_pretrained(path / "tokenizer")
    if vae:
        tiny_vae(seed).save_pretrained(path / "vae")
    return path


@pytest.fixture(scope="module")
def sd_folder(tmp_path_factory):
    return tiny_sd_folder(tmp_path_factory.mktemp("tiny_sd"))


def tiny_cond_unet():
    torch.manual_seed(0)
    return diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8).eval()


def test_sd_presets_select_exactly_the_expected_layers():
    unet = tiny_cond_unet()
    linear_or_conv = [n for n, m in unet.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    xattn = [n for n in linear_or_conv if ".attn2." in n and n.split(".attn2.")[1] in ("to_q", "to_k", "to_v",
                                                                                          "to_out.0")]
    xattn_kv = [n for n in xattn if n.endswith(("attn2.to_k", "attn2.to_v"))]
    assert len(xattn) == 4 * 4 and len(xattn_kv) == 2 * 4  # transformer blocks: 1 down, 1 mid, 2 up
    assert D.adapted_layer_names(unet, SD.sd_config("xattn")) == xattn
    assert D.adapted_layer_names(unet, SD.sd_config("xattn-kv")) == xattn_kv
    assert D.adapted_layer_names(unet, SD.sd_config("all")) == linear_or_conv
    for name in xattn_kv:  # the text side: cross_attention_dim inputs
        assert unet.get_submodule(name).in_features == 32
    with pytest.raises(ValueError, match="preset must be one of"):
        SD.sd_config("attn")


def test_sd_attention_gamma_override():
    cfg = SD.sd_config("all", gamma=0.5, attention_gamma=1.0)
    assert cfg.gamma_for("down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q") == 1.0
    assert cfg.gamma_for("down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_out.0") == 1.0
    assert cfg.gamma_for("down_blocks.0.attentions.0.transformer_blocks.0.ff.net.2") == 0.5
    assert cfg.gamma_for("down_blocks.0.resnets.0.conv1") == 0.5
    assert SD.sd_config("xattn", gamma=0.7).gamma_for("mid_block.attentions.0.transformer_blocks.0.attn2.to_k") == 0.7


def test_sd_losses_match_hand_computed():
    unet, sched = tiny_cond_unet(), diffusers.DDPMScheduler(num_train_timesteps=100)
    g0 = torch.Generator().manual_seed(0)
    forget_e, anchor_e, uncond_e = (torch.randn(n, 5, 32, generator=g0) for n in (2, 2, 1))
    x0, index = torch.randn(3, 4, 8, 8, generator=g0), torch.tensor([0, 1, 1])

    loss = SD.sd_gradient_loss(sched, forget_e, uncond_e, guidance_scale=2.0, seed=4)(unet, (x0, index))
    g = torch.Generator().manual_seed(4)
    x_t, noise, t = reference_noisy(sched, x0, g, antithetic=False)
    eps_c = unet(x_t, t, encoder_hidden_states=forget_e[index]).sample
    eps_u = unet(x_t, t, encoder_hidden_states=uncond_e.expand(3, 5, 32)).sample
    torch.testing.assert_close(loss, -F.mse_loss(3.0 * eps_c - 2.0 * eps_u, noise), rtol=1e-5, atol=1e-6)
    loss = SD.sd_gradient_loss(sched, forget_e, uncond_e, guidance_scale=0.0, seed=4)(unet, (x0, index))
    torch.testing.assert_close(loss, -F.mse_loss(eps_c, noise), rtol=1e-5, atol=1e-6)

    loss = SD.sd_forget_loss(sched, forget_e, anchor_e)(unet, (x0, index), torch.Generator().manual_seed(4))
    eps_a = unet(x_t, t, encoder_hidden_states=anchor_e[index]).sample  # paired anchors
    torch.testing.assert_close(loss, F.mse_loss(eps_c, eps_a), rtol=1e-5, atol=1e-6)
    grads = torch.autograd.grad(loss, list(unet.parameters()), allow_unused=True)
    expected = torch.autograd.grad(F.mse_loss(eps_c, eps_a.detach()), list(unet.parameters()), allow_unused=True)
    for a, b in zip(grads, expected):
        if b is not None:
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    # one anchor for two forget prompts: broadcast
    loss = SD.sd_forget_loss(sched, forget_e, anchor_e[:1])(unet, (x0, index), torch.Generator().manual_seed(4))
    eps_a = unet(x_t, t, encoder_hidden_states=anchor_e[:1].expand(3, 5, 32)).sample
    torch.testing.assert_close(loss, F.mse_loss(eps_c, eps_a), rtol=1e-5, atol=1e-6)


def test_sd_concept_removal_moves_forget_prediction_to_anchor(sd_folder):
    unet, text_encoder, tokenizer, sched = SD.load_sd(sd_folder, "cpu")
    assert isinstance(unet, diffusers.UNet2DConditionModel)
    assert sched.config.beta_schedule == "scaled_linear"
    state = {k: v.clone() for k, v in unet.state_dict().items()}
    # A random text encoder maps prompts that share a prefix to nearly equal embeddings, so the anchor here is
    # far from the forget prompts (the empty prompt), and the cross-attention keys/values are kept at full rank.
    semu_model, report, metrics = SD.unlearn_sd(
        unet, sched, text_encoder, tokenizer, ["cat", "painting of a cat"], [""], num_latents=8, sample_steps=3,
        preset="xattn-kv", attention_gamma=1.0, lr=1e-2, epochs=10, batch_size=4, progress=False)
    assert metrics["forget_anchor_gap_before"] > 0
    assert metrics["forget_anchor_gap_after"] < 0.6 * metrics["forget_anchor_gap_before"], metrics
    assert metrics["forget_shift"] > 0
    assert sorted(metrics["adapted_layers"]) == sorted(semu_model.adapters)
    assert all(re.search(r"attn2\.to_(k|v)$", name) for name in semu_model.adapters)
    semu_model.unload()
    assert all(torch.equal(unet.state_dict()[k], v) for k, v in state.items())


def test_sd_given_latents_and_errors(sd_folder):
    unet, text_encoder, tokenizer, sched = SD.load_sd(sd_folder, "cpu")
    latents = torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="latent_prompt_index"):
        SD.unlearn_sd(unet, sched, text_encoder, tokenizer, ["cat"], latents=latents,
                     latent_prompt_index=[0, 1, 0, 0], progress=False)
    with pytest.raises(ValueError, match="forget_prompts is empty"):
        SD.unlearn_sd(unet, sched, text_encoder, tokenizer, [], progress=False)
    semu_model, report, metrics = SD.unlearn_sd(unet, sched, text_encoder, tokenizer, ["cat"], ["", "dog"],
                                               latents=latents, preset="xattn", epochs=1, batch_size=2, lr=1e-3,
                                               gradient_guidance=0.0, progress=False)
    assert metrics["num_latents"] == 4 and len(semu_model.adapters) == 16
    with pytest.raises(FileNotFoundError, match="text_encoder"):
        SD.load_sd(sd_folder / "unet")


def test_sd_without_a_scheduler_folder_samples_with_sd_s_schedule_unclipped(sd_folder):
    _, _, _, sched = SD.load_sd(sd_folder, "cpu")  # the tiny folder has no scheduler/
    assert not sched.config.clip_sample and sched.config.steps_offset == 1
    assert sched.config.beta_schedule == "scaled_linear" and sched.config.prediction_type == "epsilon"


def test_a_scheduler_config_without_clip_sample_samples_unclipped(sd_folder, tmp_path):
    """A PNDM config saved by hand names no clip_sample: DDPMScheduler's default (True) would clip SD's latents."""
    import json
    import shutil

    folder = tmp_path / "sd"
    shutil.copytree(sd_folder, folder)
    diffusers.PNDMScheduler(beta_schedule="scaled_linear").save_pretrained(folder / "scheduler")
    assert "clip_sample" not in json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    assert not SD.load_sd(folder, "cpu")[3].config.clip_sample
    diffusers.DDPMScheduler(clip_sample=True).save_pretrained(folder / "scheduler")  # one that asks for it
    assert SD.load_sd(folder, "cpu")[3].config.clip_sample


def test_unlearn_sd_takes_a_prompt_string_and_refuses_degenerate_input(sd_folder, monkeypatch):
    unet, text_encoder, tokenizer, sched = SD.load_sd(sd_folder, "cpu")
    encoded, encode = [], SD.encode_prompts
    monkeypatch.setattr(SD, "encode_prompts", lambda te, tok, prompts: encoded.append(list(prompts)) or
                        encode(te, tok, prompts))
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    for kwargs, match in (({"sample_steps": 0}, "sample_steps must be an int >= 1"),
                          ({"num_latents": 0, "latents": None}, "num_latents must be an int >= 1")):
        with pytest.raises(ValueError, match=match):
            SD.unlearn_sd(unet, sched, text_encoder, tokenizer, "cat", **{"latents": latents, **kwargs},
                          progress=False)
    v_prediction = diffusers.DDPMScheduler.from_config(sched.config, prediction_type="v_prediction")
    with pytest.raises(ValueError, match="prediction_type is 'v_prediction'"):
        SD.unlearn_sd(unet, v_prediction, text_encoder, tokenizer, "cat", latents=latents, progress=False)
    _, _, metrics = SD.unlearn_sd(unet, sched, text_encoder, tokenizer, "cat", "dog", latents=latents, epochs=1,
                                  batch_size=2, progress=False)
    assert metrics["num_latents"] == 2
    assert encoded[:2] == [["cat"], ["dog"]]  # one forget and one anchor prompt, not one per character


def test_sd_retain_loss_adds_weighted_denoising_loss_on_a_fresh_retain_batch():
    unet, sched = tiny_cond_unet(), diffusers.DDPMScheduler(num_train_timesteps=100)
    g0 = torch.Generator().manual_seed(1)
    forget_e, anchor_e, retain_e = (torch.randn(n, 5, 32, generator=g0) for n in (1, 1, 2))
    x0, index = torch.randn(2, 4, 8, 8, generator=g0), torch.tensor([0, 0])
    retain_x, retain_index = torch.randn(5, 4, 8, 8, generator=g0), torch.tensor([0, 1, 1, 0, 1])
    loss_fn = SD.sd_forget_loss(sched, forget_e, anchor_e, retain_latents=retain_x, retain_embeds=retain_e,
                                retain_index=retain_index, retain_weight=0.3, retain_batch_size=3)
    loss = loss_fn(unet, (x0, index), torch.Generator().manual_seed(7))
    g = torch.Generator().manual_seed(7)
    x_t, _, t = reference_noisy(sched, x0, g, antithetic=False)
    forget_part = F.mse_loss(unet(x_t, t, encoder_hidden_states=forget_e.expand(2, 5, 32)).sample,
                             unet(x_t, t, encoder_hidden_states=anchor_e.expand(2, 5, 32)).sample)
    pick = torch.randperm(5, generator=g)[:3]
    xr_t, noise_r, t_r = reference_noisy(sched, retain_x[pick], g, antithetic=False)
    retain_part = F.mse_loss(unet(xr_t, t_r, encoder_hidden_states=retain_e[retain_index[pick]]).sample, noise_r)
    torch.testing.assert_close(loss, forget_part + 0.3 * retain_part, rtol=1e-5, atol=1e-6)
    # weight 0: the forget part alone, and no retain draws
    plain = SD.sd_forget_loss(sched, forget_e, anchor_e, retain_latents=retain_x, retain_embeds=retain_e,
                              retain_index=retain_index, retain_weight=0.0)(unet, (x0, index),
                                                                            torch.Generator().manual_seed(7))
    torch.testing.assert_close(plain, forget_part, rtol=1e-5, atol=1e-6)


def test_unlearn_sd_rejects_bad_retain_input_before_changing_anything(sd_folder):
    unet, text_encoder, tokenizer, sched = SD.load_sd(sd_folder, "cpu")
    state = {k: v.clone() for k, v in unet.state_dict().items()}
    latents = torch.randn(4, 4, 8, 8)
    cases = [({"retain_weight": -0.1, "retain_prompts": ["dog"]}, "retain_weight must be a finite non-negative"),
             ({"retain_weight": float("nan"), "retain_prompts": ["dog"]}, "retain_weight"),
             ({"retain_weight": 0.1}, "retain_weight=0.1 needs retain_prompts"),
             ({"retain_prompts": ["dog"]}, "retain_prompts are given but retain_weight is 0"),
             ({"retain_latents": latents}, "retain_latents are given without retain_prompts"),
             ({"retain_prompts": ["dog"], "retain_weight": 0.1, "retain_latents": torch.randn(4, 3, 8, 8)},
              "retain_latents must be"),
             ({"retain_prompts": ["dog"], "retain_weight": 0.1, "retain_latents": latents,
               "retain_prompt_index": [0, 0, 1, 0]}, "retain_prompt_index must index"),
             ({"retain_prompts": ["dog"], "retain_weight": 0.1, "retain_latents": latents,
               "retain_prompt_index": [0, 0]}, "retain_prompt_index has 2 entries for 4"),
             ({"gradient_guidance": -1.0}, "gradient_guidance"),
             ({"batch_size": 0}, "batch_size must be an int >= 1"),
             ({"latents": torch.randn(4, 3, 8, 8)}, "latents must be")]
    for kwargs, message in cases:
        with pytest.raises(ValueError, match=re.escape(message)):
            SD.unlearn_sd(unet, sched, text_encoder, tokenizer, ["cat"], **{"latents": latents, **kwargs},
                          progress=False)
    assert type(unet.down_blocks[0].attentions[0].transformer_blocks[0].attn2.to_k) is nn.Linear
    assert all(torch.equal(unet.state_dict()[k], v) for k, v in state.items())


def test_unlearn_sd_refuses_bad_training_arguments_before_sampling(sd_folder, monkeypatch):
    unet, text_encoder, tokenizer, sched = SD.load_sd(sd_folder, "cpu")

    def costly(*args, **kwargs):
        raise AssertionError("sampled or predicted before refusing a bad argument")

    for name in ("sample_sd_latents", "sd_predictions", "_sd_gaps"):
        monkeypatch.setattr(SD, name, costly)
    nan_latents = torch.randn(2, 4, 8, 8)
    nan_latents[1, 0, 0, 0] = float("nan")
    cases = [({"lr": -1.0}, ValueError, "lr must be a finite positive number"),
             ({"epochs": 0}, ValueError, "epochs must be an int >= 1"),
             ({"max_grad_norm": -1.0}, ValueError, "max_grad_norm must be a finite positive number"),
             ({"max_grad_nrom": 1.0}, TypeError, "unexpected keyword argument 'max_grad_nrom'"),
             ({"loss_fn": lambda model, batch: 0}, ValueError, "unlearn_sd sets loss_fn itself"),
             ({"retain_loader": [1]}, TypeError, "multiple values for argument 'retain_loader'"),
             ({"checkpoint_every": 0}, ValueError, "checkpoint_every must be an int >= 1 or None"),
             ({"sample_guidance": float("nan")}, ValueError, "sample_guidance must be a finite"),
             ({"latents": nan_latents}, ValueError, "latents holds NaN or Inf")]
    for kwargs, error, message in cases:
        with pytest.raises(error, match=re.escape(message)):
            SD.unlearn_sd(unet, sched, text_encoder, tokenizer, ["cat"], progress=False, **kwargs)


def test_unlearn_sd_with_retain_data_trains_and_reports_drift(sd_folder):
    unet, text_encoder, tokenizer, sched = SD.load_sd(sd_folder, "cpu")
    g = torch.Generator().manual_seed(0)
    semu_model, report, metrics = SD.unlearn_sd(
        unet, sched, text_encoder, tokenizer, ["cat"], [""], latents=torch.randn(4, 4, 8, 8, generator=g),
        retain_prompts=["dog", "car"], retain_latents=torch.randn(6, 4, 8, 8, generator=g), retain_weight=0.1,
        preset="xattn-kv", epochs=2, batch_size=2, lr=1e-2, shuffle=False, progress=False)
    assert metrics["retain_drift"] > 0 and metrics["num_retain_latents"] == 6
    assert report.training["epochs"] == 2 and metrics["forget_shift"] > 0
    # retain latents sampled from the frozen UNet when none are given
    unet, text_encoder, tokenizer, sched = SD.load_sd(sd_folder, "cpu")
    _, _, metrics = SD.unlearn_sd(unet, sched, text_encoder, tokenizer, ["cat"], [""],
                                  latents=torch.randn(2, 4, 8, 8, generator=g), retain_prompts=["dog"],
                                  retain_weight=0.5, num_latents=2, sample_steps=2, preset="xattn-kv", epochs=1,
                                  batch_size=2, progress=False)
    assert metrics["num_retain_latents"] == 2 and "retain_drift" in metrics


def test_class_prompts_follow_the_official_pseudo_prompt_rules():
    rl = SD.class_prompts(9, retain=True)
    assert rl["forget_prompts"] == ["an image of a parachute"] and rl["anchor_prompts"] == ["an image of a tench"]
    assert "retain_prompts" not in SD.class_prompts(9)  # unlearn_sd refuses retain prompts without a weight
    assert len(rl["retain_prompts"]) == 9 and "an image of a parachute" not in rl["retain_prompts"]
    plus = SD.class_prompts(2, rule="rl++")["anchor_prompts"]
    assert len(plus) == 10 and plus.count("an image of a chain saw") == 2  # c -> c + 1: drawn twice as often
    assert "an image of a cassette player" not in plus
    with pytest.raises(ValueError, match="rule must be one of"):
        SD.class_prompts(0, rule="rl+")
    with pytest.raises(ValueError, match="forget_class must be an int in"):
        SD.class_prompts(10)


def test_vae_encoding_is_the_posterior_mode_times_the_scaling_factor(sd_folder, tmp_path):
    from PIL import Image

    from semu_fast.workflows import sd_images

    *_, vae = SD.load_sd(sd_folder, "cpu", with_vae=True)
    assert isinstance(vae, diffusers.AutoencoderKL) and sd_images.vae_scale_factor(vae) == 2
    images = torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    latents = sd_images.encode_images(vae, images, batch_size=2)
    with torch.no_grad():
        expected = vae.encode(images).latent_dist.mode() * vae.config.scaling_factor
    assert vae.config.scaling_factor == 0.18215 and latents.shape == (3, 4, 8, 8)
    torch.testing.assert_close(latents, expected, rtol=1e-5, atol=1e-6)
    decoded = sd_images.decode_latents(vae, latents)
    with torch.no_grad():
        expected = ((vae.decode(latents / 0.18215).sample + 1) / 2).clamp(0, 1)
    assert decoded.shape == (3, 3, 16, 16)
    torch.testing.assert_close(decoded, expected, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match=r"images must lie in \[-1, 1\]"):
        sd_images.encode_images(vae, images * 3)
    # a folder of images: RGB, shorter side resized, centre-cropped, in [-1, 1]
    folder = tmp_path / "imgs"
    folder.mkdir()
    pixels = torch.randint(0, 256, (20, 32, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    Image.fromarray(pixels.numpy()).save(folder / "b.png")
    Image.fromarray(pixels.numpy()[:, :20]).convert("L").save(folder / "a.jpg")
    (folder / "notes.txt").write_text("not an image")
    loaded = sd_images.load_images(folder, 16)
    assert loaded.shape == (2, 3, 16, 16) and loaded.min() >= -1 and loaded.max() <= 1
    assert torch.equal(loaded[0, 0], loaded[0, 1])  # the grey JPG first (sorted by name), as RGB
    with pytest.raises(ValueError, match="holds no"):
        sd_images.load_images(tmp_path, 16)


def test_latent_preview_maps_the_first_three_channels_by_the_reference_range():
    from semu_fast.workflows import sd_images

    before = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    preview = sd_images.latent_preview(before)
    assert preview.shape == (2, 3, 8, 8) and preview.min() == 0 and preview.max() == 1
    for c in range(3):
        lo, hi = before[:, c].min(), before[:, c].max()
        torch.testing.assert_close(preview[:, c], (before[:, c] - lo) / (hi - lo))
    shifted = sd_images.latent_preview(before + 0.5, reference=before)
    assert not torch.equal(shifted, preview)  # the same mapping for both: a shift shows
    assert sd_images.latent_preview(before[:, :1]).shape == (2, 3, 8, 8)


# --- command line ------------------------------------------------------------------------------------------------

def cli(argv):
    from semu_fast.cli import main

    return main(argv)


def test_cli_unlearn_ddpm(tmp_path, capsys):
    from semu_fast.workflows.digits import digits_cnn

    torch.manual_seed(0)
    torch.save(digits_cnn().state_dict(), tmp_path / "clf.pt")  # untrained: the numbers are not the point here
    out = tmp_path / "out"
    assert cli(["unlearn-ddpm", "--forget-class", "2", "--cache-dir", str(tmp_path / "cache"), "--train-steps", "2",
                "--classifier", str(tmp_path / "clf.pt"), "--steps", "2", "--samples-per-class", "2",
                "--inference-steps", "2", "--out", str(out), "--quiet"]) == 0
    result = json.loads((out / "metrics.json").read_text())
    metrics = result["metrics"]
    for key in ("forget_class_rate_before", "forget_class_rate_after", "other_accuracy_before",
                "other_accuracy_after"):
        assert 0.0 <= metrics[key] <= 100.0
    assert set(metrics["per_class_accuracy_after"]) == {str(c) for c in range(10)}
    assert result["settings"]["forget_class"] == 2 and result["layers"]
    assert (tmp_path / "cache" / "digits-ddpm-seed0-steps2.pt").exists()
    unet, _ = D.pretrained_digits_ddpm(tmp_path / "cache", 0, train_steps=2)  # from the cache
    with warnings.catch_warnings():  # the meta device stands in for a GPU: loading onto it is a no-op copy
        warnings.simplefilter("ignore")
        on_meta, _ = D.pretrained_digits_ddpm(tmp_path / "cache", 0, train_steps=2, device="meta")
    assert all(p.device.type == "meta" for p in on_meta.parameters())
    loaded = sf.load_adapters(unet, out / "adapters")
    assert len(loaded.adapters) == len([layer for layer in result["layers"] if layer["k"] > 0])
    assert "forgotten class 2" in capsys.readouterr().out
    # report.md and the sample grids, from the same seeds before and after; `semu-fast report` rebuilds them
    from safetensors.torch import load_file

    samples = load_file(str(out / "samples.safetensors"))
    assert samples["before"].shape == samples["after"].shape == (40, 1, 8, 8)  # 4 per class (--grid-samples)
    assert not torch.equal(samples["before"], samples["after"])
    for name in ("report.md", "samples_before.png", "samples_after.png"):
        assert (out / name).stat().st_size > 0
        (out / name).unlink()
    assert cli(["report", str(out)]) == 0
    assert "![samples_after.png](samples_after.png)" in (out / "report.md").read_text()
    assert (out / "samples_before.png").exists() and (out / "samples_after.png").exists()
    with pytest.raises(SystemExit):
        cli(["unlearn-ddpm", "--forget-class", "10", "--out", str(out), "--quiet"])


def test_cli_unlearn_sd(sd_folder, tmp_path, capsys):
    out = tmp_path / "sd_out"
    assert cli(["unlearn-sd", "--model", str(sd_folder), "--forget-prompt", "cat", "--forget-prompt", "dog",
                "--anchor-prompt", "", "--layers", "xattn", "--attention-gamma", "1", "--num-latents", "4",
                "--sample-steps", "2", "--epochs", "3", "--batch-size", "2", "--lr", "1e-2", "--device", "cpu",
                "--out", str(out), "--save-unet", "--lora", "--quiet"]) == 0
    assert (out / "lora" / "pytorch_lora_weights.safetensors").exists()
    result = json.loads((out / "metrics.json").read_text())
    assert result["metrics"]["forget_anchor_gap_after"] < result["metrics"]["forget_anchor_gap_before"]
    assert result["settings"]["layers"] == "xattn" and len(result["metrics"]["adapted_layers"]) == 16
    merged = diffusers.UNet2DConditionModel.from_pretrained(out / "unet")
    unet, *_ = SD.load_sd(sd_folder, "cpu")
    expected = sf.load_adapters(unet, out / "adapters").merge_and_unload().state_dict()
    assert merged.state_dict().keys() == expected.keys()
    for name, tensor in merged.state_dict().items():
        torch.testing.assert_close(tensor, expected[name], rtol=1e-5, atol=1e-6)
    assert "prediction gap" in capsys.readouterr().out
    # report.md and the grids: 2 samples per forget and anchor prompt, decoded by the folder's VAE
    from safetensors.torch import load_file

    samples = load_file(str(out / "samples.safetensors"))
    assert samples["before"].shape == samples["after"].shape == (6, 3, 16, 16)
    assert not torch.equal(samples["before"], samples["after"])
    for name in ("report.md", "samples_before.png", "samples_after.png"):
        assert (out / name).stat().st_size > 0
        (out / name).unlink()
    assert cli(["report", str(out)]) == 0
    report = (out / "report.md").read_text()
    assert "![samples_before.png](samples_before.png)" in report and "forget_anchor_gap_after" in report
    assert "SEMU settings as run: preset = xattn, gamma = 0.95, attention_gamma = 1.0" in report
    assert result["settings"]["retain_weight"] == 0.0  # as run: no retain prompt, no retain loss
    with pytest.raises(SystemExit):
        cli(["unlearn-sd", "--model", str(tmp_path), "--forget-prompt", "cat", "--out", str(out), "--quiet"])

    # a second run into the folder takes away what only the first wrote (its LoRA, UNet and grids would pass for
    # the second run's); what no run wrote stays
    (out / "notes.txt").write_text("mine")
    assert cli(["unlearn-sd", "--model", str(sd_folder), "--forget-prompt", "cat", "--layers", "xattn",
                "--num-latents", "2", "--sample-steps", "2", "--epochs", "1", "--batch-size", "2", "--device", "cpu",
                "--grid-samples", "0", "--out", str(out), "--quiet"]) == 0
    assert sorted(p.name for p in out.iterdir()) == [".semu_fast_files.json", "adapters", "metrics.json",
                                                      "notes.txt", "report.md"]
    assert json.loads((out / ".semu_fast_files.json").read_text()) == ["metrics.json", "adapters/", "report.md"]
    assert cli(["report", str(out)]) == 0  # a run without sample grids is a results folder too
    assert json.loads((out / "metrics.json").read_text())["settings"]["forget_prompt"] == ["cat"]
    with pytest.raises(SystemExit):  # the merged UNet would replace the model's own
        cli(["unlearn-sd", "--model", str(sd_folder), "--forget-prompt", "cat", "--out", str(sd_folder),
             "--save-unet", "--quiet"])
    assert "--save-unet would replace its unet/" in capsys.readouterr().err


def test_unlearn_sd_refuses_retain_flags_that_do_not_fit_before_loading(tmp_path, capsys):
    missing = tmp_path / "no-model"  # were the model loaded first, the error would be about --model
    for flags, message in ((["--retain-weight", "0.5"], "argument --retain-weight: needs --retain-prompt"),
                           (["--retain-prompt", "dog", "--retain-weight", "0"],
                            "argument --retain-weight: 0 would ignore --retain-prompt")):
        with pytest.raises(SystemExit):
            cli(["unlearn-sd", "--model", str(missing), "--forget-prompt", "cat", *flags])
        assert message in capsys.readouterr().err


def test_unlearn_sd_preset_refuses_a_layer_set_naming_its_new_flag(tmp_path, capsys):
    """--preset took the layer set before it took ours|official: an old call is told where the value went."""
    with pytest.raises(SystemExit):
        cli(["unlearn-sd", "--model", str(tmp_path), "--forget-prompt", "cat", "--preset", "xattn-kv"])
    assert "'xattn-kv' is a value of --layers now (--layers xattn-kv)" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli(["unlearn-sd", "--model", str(tmp_path), "--forget-prompt", "cat", "--preset", "bogus"])
    assert "invalid choice: 'bogus'" in capsys.readouterr().err


def _write_images(folder, n, seed):
    from PIL import Image

    folder.mkdir()
    g = torch.Generator().manual_seed(seed)
    for i in range(n):
        Image.fromarray(torch.randint(0, 256, (24, 20, 3), dtype=torch.uint8, generator=g).numpy()).save(
            folder / f"{i}.png")
    return folder


def test_cli_unlearn_sd_official_preset_with_images_and_retain_data(sd_folder, tmp_path):
    out = tmp_path / "sd_official"
    images, retain = _write_images(tmp_path / "cats", 3, 0), _write_images(tmp_path / "dogs", 4, 1)
    assert cli(["unlearn-sd", "--preset", "official", "--model", str(sd_folder), "--images", str(images),
                "--forget-prompt", "an image of a cat", "--anchor-prompt", "an image of a dog",
                "--retain-prompt", "an image of a dog", "--retain-images", str(retain), "--epochs", "1",
                "--grid-samples", "1", "--sample-steps", "2", "--device", "cpu", "--out", str(out), "--quiet"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())["metrics"]
    used = metrics["semu_settings"]
    assert used["preset"] == "all" and used["epochs"] == 1 and used["lr"] == 1e-5 and used["shuffle"] is False
    assert used["retain_weight"] == 0.1 and used["semu_options"]["projection"] == "official"
    assert metrics["num_latents"] == 3 and metrics["num_retain_latents"] == 4 and "retain_drift" in metrics
    from safetensors.torch import load_file

    assert load_file(str(out / "samples.safetensors"))["before"].shape == (2, 3, 16, 16)  # 2 distinct prompts
    # without vae/: --images is refused; the grids show the latents' first 3 channels
    bare = tiny_sd_folder(tmp_path / "bare", vae=False)
    with pytest.raises(SystemExit):
        cli(["unlearn-sd", "--model", str(bare), "--images", str(images), "--forget-prompt", "cat",
             "--out", str(out), "--quiet"])
    with pytest.raises(SystemExit):
        cli(["unlearn-sd", "--model", str(bare), "--forget-prompt", "cat", "--retain-images", str(retain),
             "--out", str(out), "--quiet"])
    out = tmp_path / "bare_out"
    assert cli(["unlearn-sd", "--model", str(bare), "--forget-prompt", "cat", "--num-latents", "2",
                "--sample-steps", "2", "--epochs", "1", "--device", "cpu", "--out", str(out), "--quiet"]) == 0
    samples = load_file(str(out / "samples.safetensors"))
    assert samples["before"].shape == (4, 3, 8, 8) and samples["before"].min() >= 0 and samples["before"].max() <= 1
    assert (out / "samples_after.png").exists() and (out / "report.md").exists()


def test_unlearn_ddpm_on_a_unet_without_attention():
    """The library's default attention override must not trip the "every gamma_overrides pattern matches" rule."""
    torch.manual_seed(0)
    unet = diffusers.UNet2DModel(sample_size=8, in_channels=1, out_channels=1, layers_per_block=1,
                                 block_out_channels=(8, 16), down_block_types=("DownBlock2D", "DownBlock2D"),
                                 up_block_types=("UpBlock2D", "UpBlock2D"), num_class_embeds=NUM_CLASSES + 1,
                                 norm_num_groups=4, add_attention=False).eval()
    semu_model, report, _ = D.unlearn_ddpm(unet, scheduler(), batches(1, 2, 8), 1, num_classes=NUM_CLASSES,
                                           steps=2, progress=False)
    assert report.layers and not any(D.matches_attention(layer.name) for layer in report.layers)


def test_cli_unlearn_ddpm_official_preset(tmp_path):
    from semu_fast.workflows.digits import digits_cnn

    torch.manual_seed(0)
    torch.save(digits_cnn().state_dict(), tmp_path / "clf.pt")
    out = tmp_path / "out"
    assert cli(["unlearn-ddpm", "--preset", "official", "--forget-class", "2", "--cache-dir", str(tmp_path / "cache"),
                "--train-steps", "2", "--classifier", str(tmp_path / "clf.pt"), "--steps", "2",
                "--samples-per-class", "1", "--inference-steps", "2", "--out", str(out), "--quiet"]) == 0
    used = json.loads((out / "metrics.json").read_text())["metrics"]["semu_settings"]
    assert used["steps"] == 2 and used["target"] == "next" and used["guidance"] == 2.0 and used["alpha"] == 0.0
    assert used["semu_options"]["min_rank"] == 0 and used["semu_options"]["grad_clip"] == 1.0


def test_unlearn_ddpm_refuses_inputs_that_would_fail_or_mislead_late():
    unet = tiny_unet()
    state = {k: v.clone() for k, v in unet.state_dict().items()}
    for kwargs, message in (({"num_classes": 10}, "num_classes=10 exceeds the UNet's class embedding"),
                            ({"alpha": -1.0}, "alpha must be a finite non-negative number"),
                            ({"alpha": float("nan")}, "alpha must be a finite non-negative number")):
        with pytest.raises(ValueError, match=message):
            D.unlearn_ddpm(unet, scheduler(), batches(1), 1, **{"num_classes": NUM_CLASSES, **kwargs}, steps=1,
                           progress=False)
    # batches of another class than the one forgotten: refused at the gradient pass's first batch
    with pytest.raises(ValueError, match=r"labels \[2\] outside the forgotten class\(es\) \[1\]"):
        D.unlearn_ddpm(unet, scheduler(), batches(2), 1, num_classes=NUM_CLASSES, steps=1, progress=False)
    assert all(torch.equal(unet.state_dict()[k], v) for k, v in state.items())
    assert not any(isinstance(m, sf.adapters.SEMUAdapter) for m in unet.modules())


@pytest.mark.parametrize("forget_class", [np.int64(1), torch.tensor(1), [np.int64(1)]])
def test_unlearn_ddpm_takes_numpy_and_tensor_class_numbers(forget_class):
    _, report, _ = D.unlearn_ddpm(tiny_unet(), scheduler(), batches(1), forget_class, num_classes=NUM_CLASSES,
                                  steps=1, progress=False)
    assert report.layers
    with pytest.raises(ValueError, match="forget_class must be a class in"):
        D.unlearn_ddpm(tiny_unet(), scheduler(), batches(1), 1.0, num_classes=NUM_CLASSES, steps=1, progress=False)


def test_target_modules_in_semu_options_leave_the_attention_out():
    _, report, _ = D.unlearn_ddpm(tiny_unet(), scheduler(), batches(1), 1, num_classes=NUM_CLASSES, steps=1,
                                  progress=False, semu_options={"target_modules": [r"conv"]})
    assert report.layers and not any(D.matches_attention(layer.name) for layer in report.layers)
    config = SD.sd_config("xattn", target_modules=[r"attn2\.to_v$"])  # replaces the preset's layers
    assert list(config.target_modules) == [r"attn2\.to_v$"]
