"""The LLM forget and retain objectives, each against a straight float64 re-computation on a tiny random Llama whose
reference is a fresh copy of the original model (not the SEMUModel's own disable_adapters): NPO, SimNPO, IdkDPO,
IdkNLL, gradient difference, KL to the reference, RMU; gradients reach R only; the reference cache; the registry."""
import math

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

import semu_fast as sf  # noqa: E402
from semu_fast.workflows import llm_data, llm_losses as L  # noqa: E402
from llm_helpers import random_texts, tiny_llama, tiny_tokenizer  # noqa: E402
from llm_helpers import one_thread  # noqa: E402,F401 (autouse: one torch thread per module)


def _records(n, seed):
    questions, answers = random_texts(n, seed=seed, max_len=6), random_texts(n, seed=seed + 100, max_len=8)
    return [{"question": q, "answer": a} for q, a in zip(questions, answers)]


@pytest.fixture(scope="module")
def batches():
    """Question/answer batches with alternate answers (forget) and plain text batches (retain)."""
    tokenizer = tiny_tokenizer()
    forget = llm_data.make_qa_batches(tokenizer, _records(6, 0), batch_size=3, alternate=True,
                                      idk_answers=("w70 w71", "w72 w73 w74"))
    retain = llm_data.make_batches(tokenizer, random_texts(6, seed=9), max_length=16, batch_size=3)
    return forget, retain


def _semu(batches, scale=0.0, seed=0):
    """A SEMUModel on tiny_llama (seed 0) adapting every down and v projection, its R drawn at `scale`."""
    sm = sf.prepare(tiny_llama(), batches, loss_fn=L.nll_loss,
                    config=sf.SEMUConfig(gamma=0.95, target_modules=["mlp.down_proj", "self_attn.v_proj"]))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for adapter in sm.adapters.values():
            adapter.R.copy_(scale * torch.randn(adapter.R.shape, generator=gen))
    return sm


def _forward64(model, batch, **kwargs):
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], **kwargs)


def _seq_logp64(model, batch):
    """(sum over each sequence's labelled tokens of log p, their number), float64, from the model's logits."""
    logits = _forward64(model, batch).logits.double()[:, :-1]
    targets = batch["labels"][:, 1:]
    labelled = targets != -100
    token_logp = logits.log_softmax(-1).gather(-1, targets.clamp(min=0)[..., None])[..., 0]
    return (token_logp * labelled).sum(-1), labelled.sum(-1).double()


def _close(got, expected, rtol=2e-5, atol=2e-5):
    torch.testing.assert_close(got.double(), torch.as_tensor(expected, dtype=torch.float64), rtol=rtol, atol=atol)


GEN = torch.Generator()


def _log_ratio(sm, reference, batch):
    """log p(answer) under the model minus under the original, per sequence, float64."""
    return _seq_logp64(sm, batch)[0] - _seq_logp64(reference, batch)[0]


MARGINS = {"npo": lambda sm, ref, batch: -_log_ratio(sm, ref, batch),  # the forget answers pushed down
           # DPO: the "I don't know" answers preferred over the true ones
           "idkdpo": lambda sm, ref, batch: _log_ratio(sm, ref, batch["alternate"]) - _log_ratio(sm, ref, batch)}


@pytest.mark.parametrize("name, settings", [("npo", ((0.1, 1.0), (0.7, 2.5))), ("idkdpo", ((0.1, 1.0), (0.6, 0.5)))])
def test_npo_and_idkdpo_equal_their_float64_definitions_against_the_original_model(batches, name, settings):
    forget, _ = batches
    sm, reference = _semu(forget, scale=0.3), tiny_llama()
    for beta, weight in settings:
        loss = L.make_loss(name, beta=beta, weight=weight)
        for batch in forget:
            expected = weight * (-2 / beta * F.logsigmoid(beta * MARGINS[name](sm, reference, batch))).mean()
            _close(loss(sm, batch, GEN), expected)
    assert not torch.allclose(*(_seq_logp64(m, forget[0])[0] for m in (sm, reference)))


@pytest.mark.parametrize("name, beta", [("npo", 0.1), ("npo", 0.25), ("idkdpo", 0.1), ("idk", 0.5)])
def test_npo_and_idkdpo_equal_2_over_beta_log_2_while_the_model_is_the_reference(batches, name, beta):
    """At R = 0 every log-likelihood ratio is 0, so -2/beta * logsigmoid(0) = 2/beta * log 2."""
    forget, _ = batches
    sm, loss = _semu(forget), L.make_loss(name, beta=beta)
    for batch in forget:
        _close(loss(sm, batch, GEN), 2 / beta * math.log(2), rtol=1e-6, atol=0)


def test_simnpo_equals_its_float64_definition_without_a_reference(batches):
    forget, _ = batches
    sm = _semu(forget, scale=0.3)
    # small betas: at the defaults (4.5) the tiny model's NLL of ~4.5 a token saturates the loss near 0, where a
    # missing weight or 2/beta factor would pass
    for beta, delta, weight in ((0.1, 0.0, 0.125), (0.5, 1.0, 2.0)):
        loss = L.make_loss("simnpo", beta=beta, delta=delta, weight=weight)
        for batch in forget:
            logp, count = _seq_logp64(sm, batch)
            expected = weight * (-2 / beta * F.logsigmoid(beta * (-logp / count - delta))).mean()
            assert float(expected) > 0.1
            _close(loss(sm, batch, GEN), expected)
    assert (L.SimNPO().beta, L.SimNPO().delta, L.SimNPO().weight) == (4.5, 0.0, 0.125)


def test_idknll_graddiff_and_retain_nll_are_weighted_token_nlls(batches):
    forget, retain = batches
    sm = _semu(forget, scale=0.3)
    for batch in forget:
        logp, count = _seq_logp64(sm, batch)
        alt_logp, alt_count = _seq_logp64(sm, batch["alternate"])
        _close(L.make_loss("idknll", weight=2.0)(sm, batch, GEN), 2 * -alt_logp.sum() / alt_count.sum())
        _close(L.make_loss("graddiff")(sm, batch, GEN), logp.sum() / count.sum())
        _close(L.make_loss("graddiff", weight=3.0)(sm, batch, GEN), 3 * logp.sum() / count.sum())
        _close(L.ascent_loss(sm, batch, GEN), logp.sum() / count.sum())  # minus the mean token NLL
    for batch in retain:
        logp, count = _seq_logp64(sm, batch)
        _close(L.make_retain_loss("nll", weight=0.5)(sm, batch, GEN), 0.5 * -logp.sum() / count.sum())


def test_kl_retain_term_is_kl_from_the_reference_over_labelled_positions(batches):
    forget, retain = batches
    sm, reference = _semu(forget, scale=0.3), tiny_llama()
    kl = L.make_retain_loss("kl")
    for batch in retain + forget:  # text batches (padding masked) and QA batches (answers only)
        log_q = _forward64(sm, batch).logits.double()[:, :-1].log_softmax(-1)
        log_p = _forward64(reference, batch).logits.double()[:, :-1].log_softmax(-1)
        labelled = batch["labels"][:, 1:] != -100
        per_position = (log_p.exp() * (log_p - log_q)).sum(-1)
        _close(kl(sm, batch, GEN), per_position[labelled].mean())
    assert kl(_semu(forget), retain[0], GEN).item() == pytest.approx(0.0, abs=1e-6)


def _rmu_target(dim, coeff, seed=0):
    u = torch.rand(dim, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return coeff * u / u.norm()


def _masked_mse64(h, target, mask):
    per_token = ((h - target) ** 2).mean(-1)
    return ((per_token * mask).sum(-1) / mask.sum(-1)).mean()


def test_rmu_steers_the_chosen_layer_as_its_float64_definition_says(batches):
    forget, retain = batches
    sm, reference = _semu(forget, scale=0.3), tiny_llama()
    for layer in (0, 1):
        rmu = L.make_loss("rmu", layer=layer, steering_coeff=3.0, alpha=10.0, seed=4)
        assert L.decoder_layer(sm, layer)[0] == f"model.layers.{layer}"
        for batch in forget:
            # the output of block i is hidden_states[i + 1], except the last block's (the final norm follows it)
            h = _forward64(sm, batch, output_hidden_states=True).hidden_states[layer + 1].double() if layer == 0 \
                else _hook64(sm, batch, layer)
            mask = (batch["labels"] != -100).double()
            _close(rmu(sm, batch, GEN), _masked_mse64(h, _rmu_target(64, 3.0, seed=4), mask))
        retain_term = rmu.retain_loss()
        assert (retain_term.layer, retain_term.alpha) == (layer, 10.0)
        for batch in retain:
            h, h_ref = _hook64(sm, batch, layer), _hook64(reference, batch, layer)
            mask = (batch["labels"] != -100).double()
            _close(retain_term(sm, batch, GEN), 10.0 * _masked_mse64(h, h_ref, mask), rtol=1e-4)
    at_reference = _semu(forget)
    assert L.make_retain_loss("rmu", layer=1)(at_reference, retain[0], GEN).item() == 0.0


def _hook64(model, batch, layer):
    out = []
    stack = (model.model if isinstance(model, sf.SEMUModel) else model).model.layers
    handle = stack[layer].register_forward_hook(lambda m, a, o: out.append(o[0] if isinstance(o, tuple) else o))
    try:
        _forward64(model, batch)
    finally:
        handle.remove()
    return out[0].double()


def test_rmu_activation_loss_is_zero_where_the_hidden_states_equal_the_target_on_counted_tokens():
    gen = torch.Generator().manual_seed(0)
    h = torch.randn(3, 5, 8, generator=gen)
    mask = torch.tensor([[1, 1, 0, 0, 0], [1, 1, 1, 1, 1], [0, 0, 0, 0, 0]], dtype=torch.bool)
    target = torch.where(mask[..., None], h, h + 1)  # equal on counted tokens only
    assert float(L.activation_loss(h, target, mask)) == 0.0
    target[0, 1, 3] += 2.0
    assert float(L.activation_loss(h, target, mask)) == pytest.approx(4.0 / 8 / 2 / 2)  # row 0, then mean of 2 rows
    with pytest.raises(ValueError, match="no labelled position"):
        L.activation_loss(h, target, torch.zeros_like(mask))


OBJECTIVES = [("forget", "ascent"), ("forget", "random"), ("forget", "graddiff"), ("forget", "npo"),
              ("forget", "simnpo"), ("forget", "idkdpo"), ("forget", "idknll"), ("forget", "rmu"),
              ("retain", "nll"), ("retain", "kl"), ("retain", "rmu")]


def test_every_objective_sends_gradients_to_R_only(batches):
    forget, _ = batches
    sm = _semu(forget, scale=0.3)
    sm.train()
    others = [p for p in sm.parameters() if all(p is not r for r in sm.trainable_parameters())]
    for kind, name in OBJECTIVES:
        make = L.make_loss if kind == "forget" else L.make_retain_loss
        loss = make(name, layer=1) if name == "rmu" else make(name)
        sm.zero_grad(set_to_none=True)
        loss(sm, forget[0], torch.Generator().manual_seed(0)).backward()
        grads = [p.grad for p in sm.trainable_parameters()]
        assert all(g is not None for g in grads) and sum(float(g.abs().sum()) for g in grads) > 0, name
        assert all(p.grad is None and not p.requires_grad for p in others), name


def test_training_leaves_the_reference_the_original_model_and_the_cache_serves_each_batch_once(batches):
    forget, retain = batches
    original = tiny_llama()
    npo = L.make_loss("npo")
    calls = []
    sm, _ = sf.unlearn(tiny_llama(), forget, retain, sf.SEMUConfig(gamma=0.95, target_modules=["mlp.down_proj"]),
                       loss_fn=L.nll_loss, train_loss_fn=lambda m, b, g: calls.append(b) or npo(m, b, g),
                       retain_loss_fn=L.make_retain_loss("kl"), lr=3e-2, epochs=2, select_best=False, progress=False)
    assert len(calls) == 2 * len(forget) and len(npo._cache) == len(forget)
    assert all((a.R != 0).any() for a in sm.adapters.values())
    with torch.no_grad():
        for batch in forget:
            expected = _forward64(original, batch).logits
            with sm.disable_adapters():
                assert torch.equal(_forward64(sm, batch).logits, expected)
            assert not torch.equal(_forward64(sm, batch).logits, expected)
            # the cached reference is the original model's
            _close(npo._cache._entries[id(batch)][1], -_seq_logp64(original, batch)[0], rtol=1e-6, atol=1e-5)
    assert sm.training is False


def test_the_cache_keeps_what_fits_and_recomputes_the_rest(batches):
    forget, _ = batches
    sm = _semu(forget, scale=0.3)
    first = 4 * 3 + sum(t.numel() * 8 for b in (forget[0], forget[0]["alternate"]) for t in b.values()
                        if isinstance(t, torch.Tensor))  # NPO: 4 bytes a sequence, and the int64 batch it keeps
    for cache_bytes, cached in ((0, 0), (first, 1), (1 << 20, 2)):
        loss = L.make_loss("npo", cache_bytes=cache_bytes)
        values = [loss(sm, b, GEN) for b in forget * 2]
        assert len(loss._cache) == cached
        assert all(torch.equal(a, b) for a, b in zip(values[:2], values[2:]))
    loss.clear_cache()
    assert len(loss._cache) == 0
    loss(_semu(forget), forget[0], GEN)  # another model: the cache starts again
    assert len(loss._cache) == 1


def test_registry_builds_named_losses_with_overrides_and_passes_callables_through():
    assert set(L.FORGET_LOSSES) == {"ascent", "random", "graddiff", "npo", "simnpo", "idk", "idkdpo", "idknll", "rmu"}
    assert set(L.RETAIN_LOSSES) == {"nll", "kl", "rmu"}
    npo = L.make_loss("npo", beta=0.2)
    assert isinstance(npo, L.NPO) and npo.beta == 0.2 and L.make_loss("npo").beta == 0.1
    assert L.make_loss("ascent") is L.ascent_loss and isinstance(L.make_loss("idk"), L.IdkDPO)
    assert (L.RMU().layer, L.RMU().steering_coeff, L.RMU().alpha) == (7, 6.5, 1200.0)
    assert L.make_loss("graddiff").needs_retain and L.make_loss("rmu").needs_retain
    assert not L.make_loss("npo").needs_retain and L.make_loss("idknll").needs_alternate
    assert L.make_loss("npo", alpha=3.0).retain_loss() == L.RetainNLL(weight=3.0)

    def mine(model, batch, generator):
        return torch.zeros(())

    assert L.make_loss(mine) is mine and L.make_retain_loss(mine) is mine


@pytest.mark.parametrize("call, error, match", [
    (lambda: L.make_loss("nope"), ValueError, "forget_loss must be one of 'ascent', 'random', 'graddiff'"),
    (lambda: L.make_retain_loss("mse"), ValueError, "retain_loss must be one of 'nll', 'kl', 'rmu'"),
    (lambda: L.make_loss("npo", bta=1), ValueError, "forget_loss='npo' has no hyper-parameter 'bta'; its hyper"),
    (lambda: L.make_loss("ascent", beta=1), ValueError, "has no hyper-parameter 'beta'; its hyper-parameters: none"),
    (lambda: L.make_loss(lambda m, b, g: 0, beta=1), ValueError, "forget_loss: hyper-parameters .* by name"),
    (lambda: L.make_loss("npo", beta=0), ValueError, "npo: beta must be a finite positive number"),
    (lambda: L.make_loss("simnpo", delta=-1), ValueError, "simnpo: delta must be a finite non-negative"),
    (lambda: L.make_retain_loss("kl", cache_bytes=-1), ValueError, "kl: cache_bytes must be an int >= 0"),
    (lambda: L.make_loss("rmu", seed=1.5), ValueError, "rmu: seed must be an int"),
])
def test_bad_loss_arguments_name_the_parameter(call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_bad_models_and_batches_give_clear_errors(batches):
    forget, retain = batches
    sm = _semu(forget)
    with pytest.raises(TypeError, match="npo compares with the reference model.*must be a SEMUModel"):
        L.make_loss("npo")(tiny_llama(), forget[0], GEN)
    with pytest.raises(ValueError, match=r"idkdpo needs batch\['alternate'\]"):
        L.make_loss("idkdpo")(sm, retain[0], GEN)
    with pytest.raises(ValueError, match=r"rmu: layer=7 is out of range: the model's decoder layers are "
                                         r"model.layers.0 to model.layers.1"):
        L.make_loss("rmu")(sm, forget[0], GEN)
    with pytest.raises(ValueError, match="rmu: layer='model.nothing' names no module"):
        L.make_loss("rmu", layer="model.nothing")(sm, forget[0], GEN)
    late = sf.prepare(tiny_llama(), forget, loss_fn=L.nll_loss,
                      config=sf.SEMUConfig(gamma=0.95, target_modules=["layers.1.mlp.down_proj"]))
    with pytest.raises(ValueError, match="layer 'model.layers.0' depend on no trained parameter"):
        L.make_loss("rmu", layer=0)(late, forget[0], GEN)
    unlabelled = {**forget[0], "labels": torch.full_like(forget[0]["labels"], -100)}
    with pytest.raises(ValueError, match="no labelled position"):
        L.make_loss("npo")(sm, unlabelled, GEN)


def _tiny_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    from llm_helpers import VOCAB

    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=len(VOCAB), n_positions=64)).eval()


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_left_padded_rows_score_the_same_tokens_as_right_padded_ones(arch):
    """In a left-padded batch the first real token of a padded row is the target of a pad position; it was scored
    (an extra, meaningless target per row). Targets predicted from a masked position are now ignored, so the token
    count matches the right-padded batch. An absolute-position model (GPT-2) also gave the row's tokens the positions
    of its pads: position ids are now counted over the mask, as transformers' generate counts them, so each row's
    NLL matches whatever the padding side."""
    model = tiny_llama() if arch == "llama" else _tiny_gpt2()
    tokenizer = tiny_tokenizer()
    texts = random_texts(4, seed=3)
    right = llm_data.make_batches(tokenizer, texts, 16, 4)[0]
    rows = [r[m.bool()] for r, m in zip(right["input_ids"], right["attention_mask"])]
    assert len({len(r) for r in rows}) > 1  # some rows are padded
    width = right["input_ids"].shape[1]
    left_ids = torch.full_like(right["input_ids"], tokenizer.pad_token_id)
    left_mask = torch.zeros_like(right["attention_mask"])
    for i, r in enumerate(rows):
        left_ids[i, width - len(r):] = r
        left_mask[i, width - len(r):] = 1
    left = {"input_ids": left_ids, "attention_mask": left_mask,
            "labels": left_ids.masked_fill(left_mask == 0, -100)}
    with torch.no_grad():
        nll_r, count_r = L.sequence_nll(model, right)
        nll_l, count_l = L.sequence_nll(model, left)
    assert torch.equal(count_l, count_r)
    torch.testing.assert_close(nll_l, nll_r, rtol=1e-4, atol=1e-4)


def test_paired_loss_is_the_forget_loss_plus_the_retain_loss_of_a_drawn_retain_batch(batches):
    forget, retain = batches
    model = tiny_llama()
    paired = L.PairedLoss(L.ascent_loss, L.make_retain_loss("nll", weight=2.0), retain)
    drawn = set()
    for seed in range(6):
        generator = torch.Generator().manual_seed(seed)
        index = int(torch.randint(len(retain), (1,), generator=torch.Generator().manual_seed(seed)))
        drawn.add(index)
        want = -L.nll_loss(model, forget[0]) + 2.0 * L.nll_loss(model, retain[index])
        torch.testing.assert_close(paired(model, forget[0], generator), want)
    assert len(drawn) > 1
    with pytest.raises(ValueError, match="retain_batches must be a non-empty list of batches"):
        L.PairedLoss(L.ascent_loss, L.retain_nll_loss, [])
