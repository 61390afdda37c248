"""The LLM workflow: batches from texts, token NLL and perplexity, unlearn_llm and `semu-fast unlearn-llm`, on a tiny
random Llama saved to a temporary folder with an offline tokenizer."""
import dataclasses
import json
import math
import re

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

import semu_fast as sf  # noqa: E402
from semu_fast.workflows import llm, llm_losses  # noqa: E402
from semu_fast.adapters import SEMUAdapter  # noqa: E402
from semu_fast.layers import select_layers  # noqa: E402
from conftest import requires_cuda  # noqa: E402
from helpers import assert_same_state, snapshot  # noqa: E402
from llm_helpers import id_batches, random_texts, save_tiny_llm, tiny_llama, tiny_tokenizer  # noqa: E402
from llm_helpers import one_thread, two_process_group  # noqa: E402,F401 (autouse; a fixture)


@pytest.fixture(scope="module")
def llm_folder(tmp_path_factory):
    return save_tiny_llm(tmp_path_factory.mktemp("tiny_llm"))


@pytest.fixture
def loaded(llm_folder):
    return llm.load_causal_lm(llm_folder)


def _data(tokenizer):
    forget = llm.make_batches(tokenizer, random_texts(16, seed=0), max_length=16, batch_size=4)
    retain = llm.make_batches(tokenizer, random_texts(16, seed=1), max_length=16, batch_size=4)
    return forget, retain


def test_make_batches_pads_on_the_right_and_masks_padding_labels():
    tokenizer = tiny_tokenizer()
    texts = ["w1 w2 w3", "w5", "w7 w8 w9 w10 w11 w12 w13"]
    batches = llm.make_batches(tokenizer, texts, max_length=5, batch_size=2)
    assert [b["input_ids"].shape for b in batches] == [(2, 4), (1, 5)]
    ids = [tokenizer(t, truncation=True, max_length=5)["input_ids"] for t in texts]
    rows = [row for b in batches for row in zip(b["input_ids"], b["attention_mask"], b["labels"])]
    for expected, (input_ids, mask, labels) in zip(ids, rows):
        n = len(expected)
        assert input_ids[:n].tolist() == expected and mask[:n].all() and not mask[n:].any()
        assert labels[:n].tolist() == expected and (labels[n:] == -100).all()
        assert (input_ids[n:] == tokenizer.pad_token_id).all()
    assert all(b[k].dtype == torch.long for b in batches for k in b)


def test_make_batches_skips_texts_with_nothing_to_predict_and_leaves_the_tokenizer_alone():
    class OneTokenPerWord:  # no BOS, no pad token: a one-word text predicts nothing
        pad_token_id, eos_token_id = None, 7

        def __call__(self, texts, truncation, max_length):
            return {"input_ids": [[len(w) for w in t.split()][:max_length] for t in texts]}

    tokenizer = OneTokenPerWord()
    with pytest.warns(UserWarning, match="1 of 2 texts give fewer than 2 tokens"):
        batches = llm.make_batches(tokenizer, ["alone", "two words"], max_length=8)
    assert batches[0]["input_ids"].tolist() == [[3, 5]] and tokenizer.pad_token_id is None
    with pytest.raises(ValueError, match="texts: every text gives fewer than 2 tokens"):
        llm.make_batches(tokenizer, ["alone"], max_length=8)


def test_nll_loss_equals_the_models_own_shifted_loss_and_perplexity_weights_tokens():
    model, tokenizer = tiny_llama(), tiny_tokenizer()
    batches = llm.make_batches(tokenizer, random_texts(7, seed=3), max_length=12, batch_size=3)
    for batch in batches:
        hf = model(**batch).loss
        assert torch.allclose(llm.nll_loss(model, batch), hf, rtol=1e-6, atol=1e-6)
    # token-weighted: the batches hold different token counts, so this differs from the mean of batch losses
    sums = [(llm.nll_loss(model, b).item() * int((b["labels"][:, 1:] != -100).sum()),
             int((b["labels"][:, 1:] != -100).sum())) for b in batches]
    expected = math.exp(sum(s for s, _ in sums) / sum(c for _, c in sums))
    model.train()
    assert llm.perplexity(model, batches) == pytest.approx(expected, rel=1e-6)
    assert model.training  # the mode is restored
    # a batch of input_ids alone labels every position
    ids = id_batches(1)[0]
    assert torch.allclose(llm.nll_loss(model, ids), model(input_ids=ids["input_ids"], labels=ids["input_ids"]).loss,
                          atol=1e-6)


def test_random_token_loss_never_targets_the_true_token_and_ignores_padding(monkeypatch):
    seen = {}
    real = torch.nn.functional.cross_entropy

    def spy(logits, targets, **kwargs):
        seen["targets"] = targets
        return real(logits, targets, **kwargs)

    monkeypatch.setattr(llm_losses.F, "cross_entropy", spy)
    batch = llm.make_batches(tiny_tokenizer(), random_texts(8, seed=4, min_len=2, max_len=30), 32, 8)[0]
    loss = llm.random_token_loss(tiny_llama(), batch, torch.Generator().manual_seed(0))
    assert torch.isfinite(loss)
    true = batch["labels"][:, 1:].flatten()
    drawn = seen["targets"]
    labelled = true != -100
    assert (drawn[~labelled] == -100).all() and (~labelled).any()
    assert (drawn[labelled] != true[labelled]).all() and drawn[labelled].unique().numel() > 20


def test_unlearn_llm_raises_forget_perplexity_and_changes_only_R(loaded):
    model, tokenizer = loaded
    forget, retain = _data(tokenizer)
    before = snapshot(model)
    sm, report, metrics = llm.unlearn_llm(model, forget, retain, forget_loss="ascent", train_on_retain=False,
                                          target_modules="mlp.down_proj", select_best=False, lr=3e-2, epochs=3,
                                          progress=False)
    # data-free: retain texts come from the same distribution, yet the forget gradients' subspace leaves them almost
    # alone
    assert metrics["forget_ppl_after"] > 1.15 * metrics["forget_ppl_before"]
    assert metrics["retain_ppl_after"] == pytest.approx(metrics["retain_ppl_before"], rel=0.02)
    for part in ("forget", "retain"):
        for when in ("before", "after"):
            assert metrics[f"{part}_ppl_{when}"] == pytest.approx(math.exp(metrics[f"{part}_nll_{when}"]))
    assert set(sm.adapters) == {"model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"}
    assert all((a.R != 0).any() for a in sm.adapters.values())
    assert [p for p in sm.parameters() if p.requires_grad] == sm.trainable_parameters()
    assert metrics["trainable_params"] == report.trainable_params > 0 and 0 < metrics["trainable_share"] < 5
    assert len(report.training["history"]) == 3 and report.training["best_epoch"] is None
    base = sm.unload()
    assert_same_state(base, before)
    assert llm.mean_nll(base, forget) == metrics["forget_nll_before"]


def test_data_free_retain_data_is_only_reported_unless_select_best_is_asked(loaded):
    """train_on_retain=False was documented as only reporting the retain data, yet select_best stayed on with it,
    so the retain set picked the epoch kept."""
    model, tokenizer = loaded
    forget, retain = _data(tokenizer)
    kwargs = dict(forget_loss="ascent", train_on_retain=False, target_modules="mlp.down_proj", lr=3e-2, epochs=2,
                  progress=False)
    sm, report, metrics = llm.unlearn_llm(model, forget, retain, **kwargs)
    assert report.training["select_best"] is False and "best_epoch" not in metrics
    assert "retain_ppl_after" in metrics and all("guard_nll" not in h for h in report.training["history"])
    sm.unload()
    sm, report, metrics = llm.unlearn_llm(model, forget, retain, select_best=True, **kwargs)  # asked: it guards
    assert report.training["select_best"] is True and report.training["selection"]["guard"] == "retain_batches"
    assert all("guard_nll" in h for h in report.training["history"])
    sm.unload()
    sm, report, _ = llm.unlearn_llm(model, forget, retain, eval_batches=retain[:1], **kwargs)  # held-out data guards
    assert report.training["select_best"] is True and report.training["selection"]["guard"] == "eval_batches"
    sm.unload()


def test_paired_retain_mode_takes_one_step_per_forget_batch_on_forget_plus_retain(loaded, monkeypatch):
    """unlearn_llm made every retain batch an optimizer step of its own (each epoch a pass over the whole retain set)
    while its docs called that open-unlearning's recipe; retain_mode="paired" takes open-unlearning's step."""
    model, tokenizer = loaded
    forget, _ = _data(tokenizer)  # 4 batches
    retain = llm.make_batches(tokenizer, random_texts(24, seed=1), max_length=16, batch_size=4)  # 6 batches
    steps, calls = [], []
    real_step = torch.optim.Adam.step

    def counted(self, *args, **kwargs):
        steps.append(1)
        return real_step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.Adam, "step", counted)

    def forget_loss(m, batch, generator):
        calls.append(("forget", len(steps)))
        return llm.ascent_loss(m, batch, generator)

    def retain_loss(m, batch, generator):
        calls.append(("retain", len(steps), next(i for i, b in enumerate(retain) if b is batch)))
        return llm.retain_nll_loss(m, batch, generator)

    kwargs = dict(forget_loss=forget_loss, retain_loss=retain_loss, target_modules="mlp.down_proj", lr=1e-2,
                  epochs=2, select_best=False, progress=False)
    sm, report, _ = llm.unlearn_llm(model, forget, retain, retain_mode="paired", **kwargs)
    assert len(steps) == 2 * 4 and report.training["retain_mode"] == "paired"
    # each step: the forget loss, then the retain loss of a drawn retain batch, before the step is taken
    assert [c[:2] for c in calls] == [(kind, step) for step in range(8) for kind in ("forget", "retain")]
    assert len({c[2] for c in calls if c[0] == "retain"}) > 1
    sm.unload()
    steps.clear(), calls.clear()
    sm, report, _ = llm.unlearn_llm(model, forget, retain, **kwargs)  # the default, interleave
    assert len(steps) == 2 * (4 + 6) and report.training["retain_mode"] == "interleave"
    assert sum(c[0] == "retain" for c in calls) == 2 * 6
    sm.unload()
    with pytest.raises(ValueError, match="retain_mode='paired' pairs each forget batch with a retain batch it trains"):
        llm.unlearn_llm(model, forget, retain, retain_mode="paired", train_on_retain=False, progress=False)
    with pytest.raises(ValueError, match="retain_mode must be one of 'interleave', 'paired'"):
        llm.unlearn_llm(model, forget, retain, retain_mode="mixed", progress=False)


def test_unlearn_llm_under_several_processes_is_refused_before_any_work(loaded, two_process_group):
    # sf.unlearn would go data-parallel, while the epoch count, keep-best and metrics stay per rank: ranks would end
    # with different R or hang
    model, tokenizer = loaded
    forget, retain = _data(tokenizer)
    before = snapshot(model)
    with pytest.raises(RuntimeError, match="unlearn_llm runs in one process, and torch.distributed is initialised "
                                           "with 2 processes.*sf.unlearn on a DataLoader with a DistributedSampler"):
        llm.unlearn_llm(model, forget, retain, epochs=2, progress=False)
    assert_same_state(model, before)
    assert not any(isinstance(m, SEMUAdapter) for m in model.modules())


def test_random_forget_loss_with_retain_training_is_reproducible(loaded, llm_folder):
    runs = []
    for model, tokenizer in (loaded, llm.load_causal_lm(llm_folder)):
        forget, retain = _data(tokenizer)
        sm, report, metrics = llm.unlearn_llm(model, forget, retain, forget_loss="random", train_on_retain=True,
                                              target_modules=["q_proj", "mlp.up_proj"], lr=1e-2, epochs=2,
                                              seed=3, progress=False)
        assert all(math.isfinite(v) for v in metrics.values())
        assert len(sm.adapters) == 4 and report.training["epochs"] == 2
        runs.append({n: a.R.detach().clone() for n, a in sm.adapters.items()})
    assert runs[0].keys() == runs[1].keys() and all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])


def test_a_callable_forget_loss_is_used_on_every_forget_batch():
    calls = []

    def loss(model, batch, generator):
        calls.append(batch)
        return llm.ascent_loss(model, batch, generator)

    forget = id_batches(3)
    llm.unlearn_llm(tiny_llama(), forget, forget_loss=loss, epochs=2, progress=False)
    assert len(calls) == 6 and all(c is f for c, f in zip(calls, forget * 2))


def _qa_data(tokenizer):
    questions, answers = random_texts(8, seed=5, max_len=6), random_texts(8, seed=6, max_len=8)
    records = [{"question": q, "answer": a} for q, a in zip(questions, answers)]
    forget = llm.make_qa_batches(tokenizer, records, max_length=24, batch_size=4, alternate=True)
    retain = llm.make_batches(tokenizer, random_texts(8, seed=1), max_length=16, batch_size=4)
    return forget, retain


@pytest.mark.parametrize("forget_loss, retain_loss, train_on_retain, trains_retain", [
    ("npo", "kl", None, True), ("simnpo", None, False, False), ("idkdpo", None, None, True),
    ("graddiff", None, None, True)])
def test_unlearn_llm_trains_each_objective_on_question_answer_batches(forget_loss, retain_loss, train_on_retain,
                                                                     trains_retain, monkeypatch):
    model, tokenizer = tiny_llama(), tiny_tokenizer()
    forget, retain = _qa_data(tokenizer)
    seen = []
    real = llm.unlearn

    def spy(model, forget_loader, retain_loader, config, **kwargs):
        seen.append((retain_loader, kwargs["train_loss_fn"], kwargs["retain_loss_fn"]))
        return real(model, forget_loader, retain_loader, config, **kwargs)

    monkeypatch.setattr(llm, "unlearn", spy)
    sm, report, metrics = llm.unlearn_llm(model, forget, retain, forget_loss=forget_loss, retain_loss=retain_loss,
                                          train_on_retain=train_on_retain, select_best=False, lr=3e-2, epochs=2,
                                          progress=False)
    retain_loader, train_fn, retain_fn = seen[0]
    assert (retain_loader is not None) == trains_retain and train_fn.name in (forget_loss, "idkdpo")
    assert retain_fn.name == (retain_loss or "nll")
    assert all(math.isfinite(v) for v in metrics.values())
    assert all((a.R != 0).any() for a in sm.adapters.values())
    if forget_loss != "idkdpo":  # the others push the forget answers' likelihood down
        assert metrics["forget_nll_after"] > metrics["forget_nll_before"]
    with torch.no_grad(), sm.disable_adapters():  # the reference stayed the original model
        assert llm.mean_nll(sm, forget) == metrics["forget_nll_before"]


@requires_cuda
@pytest.mark.parametrize("forget_loss", ["npo", "idkdpo", "rmu"])
def test_unlearn_llm_runs_each_kind_of_objective_on_cuda(forget_loss):
    """The LLM path on the GPU: the batches stay on the CPU until each loss moves them, and the reference model
    (npo, idkdpo) and the hidden-state hook (rmu) follow the model's device."""
    model, tokenizer = tiny_llama().cuda(), tiny_tokenizer()
    forget, retain = _qa_data(tokenizer)
    loss = llm.make_loss("rmu", layer=1) if forget_loss == "rmu" else forget_loss
    sm, report, metrics = llm.unlearn_llm(model, forget, retain, forget_loss=loss,
                                          retain_loss="rmu" if forget_loss == "rmu" else None, select_best=False,
                                          lr=3e-2, epochs=2, progress=False)
    assert all(math.isfinite(v) for v in metrics.values())
    assert all(a.R.is_cuda and (a.R != 0).any() for a in sm.adapters.values())


def test_unlearn_llm_rmu_trains_its_own_retain_term_on_the_chosen_layer():
    model, tokenizer = tiny_llama(), tiny_tokenizer()
    forget, retain = _qa_data(tokenizer)
    rmu = llm.make_loss("rmu", layer=1, steering_coeff=4.0, alpha=5.0)
    before = rmu(sf.prepare(tiny_llama(), forget, loss_fn=llm.nll_loss,
                            config=sf.SEMUConfig(gamma=0.9, target_modules=("mlp.down_proj",))), forget[0], None)
    sm, report, metrics = llm.unlearn_llm(model, forget, retain, forget_loss=rmu, retain_loss="rmu", lr=3e-2,
                                          epochs=3, progress=False)
    assert rmu(sm, forget[0], None).item() < before.item()
    history = report.training["history"]
    assert len(history) == 3 and all(math.isfinite(h["loss"]) for h in history)


def test_select_best_restores_the_R_of_the_best_scored_epoch():
    """A criterion that scores epoch 2 best: its R is the one kept, whatever the later epochs did."""
    model, tokenizer = tiny_llama(), tiny_tokenizer()
    forget, retain = _data(tokenizer)
    scores = iter([0.0, 1.0, 3.0, 2.0])  # the original model (epoch 0), then epochs 1, 2, 3
    seen = {}

    def record(epoch, semu_model):
        seen[epoch] = [p.detach().clone() for p in semu_model.trainable_parameters()]
        return {"mine": float(epoch)}

    sm, report, metrics = llm.unlearn_llm(model, forget, retain, forget_loss="ascent", lr=3e-2, epochs=3,
                                          criterion=lambda m: next(scores), retain_tolerance=math.inf,
                                          on_epoch=record, progress=False)
    assert metrics["best_epoch"] == report.training["best_epoch"] == 2
    assert all(torch.equal(p, q) for p, q in zip(sm.trainable_parameters(), seen[2]))
    assert not all(torch.equal(p, q) for p, q in zip(seen[2], seen[3]))  # epoch 3 did move R
    history = report.training["history"]
    assert [h["score"] for h in history] == [1.0, 3.0, 2.0] and [h["mine"] for h in history] == [1.0, 2.0, 3.0]
    assert all(h["within_tolerance"] for h in history)
    assert report.training["selection"] == {"criterion": "callable", "retain_tolerance": math.inf,
                                            "guard": "retain_batches"}
    assert metrics["forget_nll_after"] == pytest.approx(llm.mean_nll(sm, forget))


def test_select_best_never_keeps_an_epoch_past_the_retain_tolerance():
    """Guarding with the forget batches themselves at tolerance 0: every epoch that raised the forget NLL broke the
    guard, so R falls back to zero (the original model), with a warning."""
    model, tokenizer = tiny_llama(), tiny_tokenizer()
    forget, _ = _data(tokenizer)
    with pytest.warns(UserWarning, match="no epoch kept the retain perplexity within retain_tolerance"):
        sm, report, metrics = llm.unlearn_llm(model, forget, eval_batches=forget, forget_loss="ascent", lr=3e-2,
                                              epochs=2, retain_tolerance=0.0, progress=False)
    history = report.training["history"]
    assert all(h["guard_nll"] > metrics["eval_nll_before"] and not h["within_tolerance"] for h in history)
    assert metrics["best_epoch"] == 0 and all((p == 0).all() for p in sm.trainable_parameters())
    assert metrics["forget_nll_after"] == pytest.approx(metrics["forget_nll_before"], rel=1e-6)
    assert metrics["eval_ppl_after"] == pytest.approx(math.exp(metrics["eval_nll_after"]))


def test_defaults_train_npo_on_retain_data_and_keep_an_epoch_within_the_tolerance(monkeypatch):
    model, tokenizer = tiny_llama(), tiny_tokenizer()
    forget, retain = _qa_data(tokenizer)
    seen = []
    real = llm.unlearn

    def spy(model, forget_loader, retain_loader, config, **kwargs):
        seen.append((retain_loader, kwargs["train_loss_fn"], kwargs["epochs"], kwargs["lr"]))
        return real(model, forget_loader, retain_loader, config, **kwargs)

    monkeypatch.setattr(llm, "unlearn", spy)
    # the default epochs give about forget_steps steps on the forget set; a shorter run keeps this test quick
    monkeypatch.setattr(llm, "DEFAULTS", dataclasses.replace(llm.DEFAULTS, forget_steps=3 * len(forget) + 1,
                                                            min_epochs=2))
    sm, report, metrics = llm.unlearn_llm(model, forget, retain, lr=3e-2, progress=False)
    retain_loader, train_fn, epochs, lr = seen[0]
    assert [id(b) for b in retain_loader] == [id(b) for b in retain]  # trained on
    # "auto": these question/answer batches carry "I don't know" alternates, so IdkDPO; plain batches get NPO
    assert llm.DEFAULTS.forget_loss == "auto" and train_fn.name == "idkdpo"
    assert llm.resolve_objectives("auto", None, has_alternate=False)[0].name == "npo"
    # the forget objective's alpha weighs whichever retain loss is named, as open-unlearning's alpha does
    from semu_fast.workflows import llm_losses as L
    for retain_loss, expected in ((None, L.RetainNLL(weight=3.0)), ("nll", L.RetainNLL(weight=3.0)),
                                  ("kl", L.RetainKL(weight=3.0))):
        assert llm.resolve_objectives(L.make_loss("graddiff", alpha=3.0), retain_loss)[1] == expected
    assert llm.resolve_objectives("rmu", "kl")[1] == L.RetainKL()  # RMU's alpha weighs its own activation loss
    assert epochs == metrics["epochs"] == 4 and lr == 3e-2
    history = report.training["history"]
    assert len(history) == epochs and all({"score", "guard_nll", "within_tolerance"} <= set(h) for h in history)
    best = metrics["best_epoch"]
    limit = metrics["retain_nll_before"] + math.log1p(llm.DEFAULTS.retain_tolerance)
    feasible = [h for h in history if h["guard_nll"] <= limit]
    assert best is not None
    if best == 0:  # no epoch within the tolerance: R went back to zero
        assert not feasible
    else:
        assert history[best - 1]["within_tolerance"] and history[best - 1]["score"] == max(h["score"] for h in feasible)
        assert metrics["retain_nll_after"] <= limit
    assert metrics["forget_nll_after"] >= metrics["forget_nll_before"]
    # without retain data nothing guards the choice: every epoch is kept as trained (the last one)
    sm2, report2, metrics2 = llm.unlearn_llm(tiny_llama(), forget, epochs=1, progress=False)
    assert "best_epoch" not in metrics2 and "score" not in report2.training["history"][0]


def test_mean_answer_prob_is_the_mean_of_per_sequence_answer_probabilities():
    model, tokenizer = tiny_llama(), tiny_tokenizer()
    forget, _ = _qa_data(tokenizer)
    expected = []
    for batch in forget:
        for row in range(batch["input_ids"].shape[0]):
            one = {k: v[row:row + 1] for k, v in batch.items() if k != "alternate"}
            expected.append(math.exp(-llm.nll_loss(model, one).item()))
    assert llm.mean_answer_prob(model, forget) == pytest.approx(sum(expected) / len(expected), rel=1e-5)


@pytest.mark.parametrize("change, match", [
    ({"forget_batches": []}, "forget_batches is empty"),
    ({"forget_batches": None}, "forget_batches is required"),
    ({"forget_batches": [(torch.zeros(2, 3, dtype=torch.long),)]}, r"forget_batches\[0\]: an LLM batch must be"),
    ({"forget_batches": [{"input_ids": torch.zeros(2, 4, dtype=torch.long),
                          "labels": torch.zeros(2, 5, dtype=torch.long)}]},
     r"forget_batches\[0\]: batch\['labels'\] must be a tensor shaped as batch\['input_ids'\] \(2, 4\), got \(2, 5\)"),
    ({"retain_batches": []}, "retain_batches is empty"),
    ({"target_modules": "no_such_layer"}, "pattern 'no_such_layer' matches no layer"),
    ({"target_modules": "embed_tokens"}, "selects 'model.embed_tokens', which SEMU cannot adapt"),
    ({"target_modules": ["mlp.down_proj", "("]}, "target_modules: '\\(' is not a valid regular expression"),
    ({"target_modules": []}, "target_modules must be 'all-linear' or one or more"),
    ({"target_modules": ".*"}, "target_modules selects 'model.embed_tokens', which SEMU cannot adapt"),
    ({"forget_loss": "nope"}, "forget_loss must be one of 'ascent', 'random', 'graddiff', 'npo'"),
    ({"retain_loss": "mse", "retain_batches": id_batches(1)}, "retain_loss must be one of 'nll', 'kl', 'rmu'"),
    ({"train_on_retain": True}, "train_on_retain=True needs retain_batches"),
    ({"forget_loss": "graddiff"}, "forget_loss='graddiff' needs retain_batches: it is defined with a retain term"),
    ({"forget_loss": "rmu"}, "forget_loss='rmu' needs retain_batches"),
    ({"retain_loss": "kl"}, "retain_loss='kl' needs retain_batches"),
    ({"forget_loss": "graddiff", "retain_batches": id_batches(1), "train_on_retain": False},
     "forget_loss='graddiff' is defined with a retain term, so it trains on retain data: train_on_retain=False"),
    ({"retain_loss": "kl", "retain_batches": id_batches(1), "train_on_retain": False},
     "retain_loss='kl' is given, but train_on_retain=False"),
    ({"forget_loss": "idkdpo"}, r"forget_loss='idkdpo' needs alternate answers: forget_batches\[0\] has no"),
    ({"train_on_retain": "yes"}, "train_on_retain must be True, False or None"),
    ({"gamma": 0.0}, "gamma must be a number in"),
    ({"lr": 0}, "lr must be a finite positive"),
    ({"epochs": 0}, "epochs must be an int >= 1"),
    ({"optimizer": "lbfgs"}, "optimizer must be one of"),
    ({"eval_batches": []}, "eval_batches is empty"),
    ({"select_best": True}, "select_best=True needs retain_batches or eval_batches"),
    ({"select_best": "yes", "retain_batches": id_batches(1)}, "select_best must be True, False or None"),
    ({"criterion": "accuracy"}, "criterion must be one of 'forget_nll', 'forget_prob' or a callable"),
    ({"retain_tolerance": -0.1}, "retain_tolerance must be a number >= 0"),
    ({"retain_tolerance": float("nan")}, "retain_tolerance must be a number >= 0"),
    ({"on_epoch": 3}, "on_epoch must be a callable"),
])
def test_bad_unlearn_llm_arguments_raise_before_the_model_changes(change, match):
    model = tiny_llama()
    before = snapshot(model)
    kwargs = {"forget_batches": id_batches(1), "retain_batches": None, **change}
    with pytest.raises(ValueError, match=match):
        llm.unlearn_llm(model, progress=False, **kwargs)
    assert_same_state(model, before)
    assert not any(isinstance(m, SEMUAdapter) for m in model.modules())


@pytest.mark.parametrize("texts, kwargs, match", [
    ([], {}, "texts is empty"),
    ("w1 w2", {}, "texts must be a list of strings"),
    (["w1", "  "], {}, r"texts\[1\] must be a non-blank string"),
    (["w1 w2"], {"max_length": 1}, "max_length must be an int >= 2"),
    (["w1 w2"], {"batch_size": 0}, "batch_size must be an int >= 1"),
])
def test_bad_make_batches_arguments_name_the_parameter(texts, kwargs, match):
    with pytest.raises(ValueError, match=match):
        llm.make_batches(tiny_tokenizer(), texts, **kwargs)


def test_load_causal_lm_needs_a_local_model_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="is not a folder"):
        llm.load_causal_lm(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="no config.json"):
        llm.load_causal_lm(tmp_path)


def test_targeting_a_tied_weight_warns_that_merging_changes_the_embeddings():
    from transformers import LlamaForCausalLM

    config = tiny_llama().config
    config.tie_word_embeddings = True
    model = LlamaForCausalLM(config)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    from semu_fast.layers import select_layers

    with pytest.warns(UserWarning, match="lm_head.weight is shared with model.embed_tokens"):
        select_layers(model, sf.SEMUConfig(target_modules=["lm_head"]))


def _cli(argv):
    from semu_fast.cli import main

    return main(argv)


def test_cli_eval_names_a_missing_metrics_package_before_any_work(llm_folder, tmp_path, capsys, monkeypatch):
    """Without rouge-score, --eval trained first and then died in evaluation with a ModuleNotFoundError."""
    import sys

    monkeypatch.setitem(sys.modules, "rouge_score", None)  # an import of it raises ImportError
    llm.save_records(tmp_path / "forget.jsonl", _tofu_records(4, 1))
    with pytest.raises(SystemExit):  # question/answer records: ROUGE of the generated answers
        _cli(["unlearn-llm", "--model", str(llm_folder), "--forget-file", str(tmp_path / "forget.jsonl"), "--eval",
              "--device", "cpu", "--quiet", "--out", str(tmp_path / "out")])
    assert "--eval needs the rouge_score package: pip install rouge-score" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    (tmp_path / "forget.txt").write_text("\n".join(random_texts(4, seed=0)))  # texts generate nothing: no ROUGE
    assert _cli(["unlearn-llm", "--model", str(llm_folder), "--forget-texts", str(tmp_path / "forget.txt"), "--eval",
                 "--epochs", "1", "--device", "cpu", "--quiet", "--out", str(tmp_path / "out")]) == 0


def test_cli_eval_on_texts_reports_what_its_help_says(llm_folder, tmp_path):
    """Texts are scored whole and nothing is generated: no ROUGE, no truth ratio, and model utility is the retain
    probability alone (the help listed ROUGE-L of greedy answers for every kind of data)."""
    (tmp_path / "forget.txt").write_text("\n".join(random_texts(4, seed=0)))
    (tmp_path / "retain.txt").write_text("\n".join(random_texts(4, seed=1)))
    assert _cli(["unlearn-llm", "--model", str(llm_folder), "--forget-texts", str(tmp_path / "forget.txt"),
                 "--retain-texts", str(tmp_path / "retain.txt"), "--eval", "--epochs", "1", "--device", "cpu",
                 "--quiet", "--out", str(tmp_path / "out")]) == 0
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())["metrics"]
    evaluated = {key[:-len("_after")] for key in metrics if key.endswith("_after") and "_ppl_" not in key
                 and "_nll_" not in key}
    assert evaluated == {"forget_answer_prob", "forget_exact_memorization", "forget_extraction_strength",
                         "retain_answer_prob", "model_utility"}
    assert metrics["model_utility_after"] == pytest.approx(metrics["retain_answer_prob_after"])


def test_cli_retain_mode_paired_is_recorded_and_needs_retain_data_it_trains_on(llm_folder, tmp_path, capsys):
    (tmp_path / "forget.txt").write_text("\n".join(random_texts(4, seed=0)))
    (tmp_path / "retain.txt").write_text("\n".join(random_texts(8, seed=1)))
    base = ["unlearn-llm", "--model", str(llm_folder), "--forget-texts", str(tmp_path / "forget.txt"),
            "--retain-mode", "paired", "--target-modules", "mlp.down_proj", "--epochs", "1", "--device", "cpu",
            "--quiet", "--out", str(tmp_path / "out")]
    for extra in ([], ["--retain-texts", str(tmp_path / "retain.txt"), "--no-train-on-retain"]):
        with pytest.raises(SystemExit):
            _cli(base + extra)
        assert "argument --retain-mode: paired pairs each forget batch" in capsys.readouterr().err
    assert _cli(base + ["--retain-texts", str(tmp_path / "retain.txt")]) == 0
    assert json.loads((tmp_path / "out" / "metrics.json").read_text())["settings"]["retain_mode"] == "paired"


def test_cli_unlearn_llm_writes_metrics_adapters_and_lora(llm_folder, tmp_path, capsys):
    (tmp_path / "forget.txt").write_text("\n".join(random_texts(8, seed=0)) + "\n\n")
    (tmp_path / "retain.txt").write_text("\n".join(random_texts(8, seed=1)))
    out = tmp_path / "out"
    code = _cli(["unlearn-llm", "--model", str(llm_folder), "--forget-texts", str(tmp_path / "forget.txt"),
                 "--retain-texts", str(tmp_path / "retain.txt"), "--target-modules", "mlp.down_proj",
                 "--target-modules", "self_attn.v_proj", "--lr", "0.01", "--epochs", "2", "--max-length", "16",
                 "--batch-size", "4", "--device", "cpu", "--lora", "--quiet", "--out", str(out)])
    assert code == 0
    data = json.loads((out / "metrics.json").read_text())
    metrics = data["metrics"]
    assert metrics["forget_ppl_after"] > metrics["forget_ppl_before"] and "retain_ppl_after" in metrics
    assert data["settings"]["target_modules"] == ["mlp.down_proj", "self_attn.v_proj"]
    assert data["settings"]["forget_loss"] == "npo" and data["settings"]["epochs"] == 2  # "auto" on texts
    # what ran, not the flags' None ("automatic"): retain data turns selection and retain training on
    assert (data["settings"]["select_best"], data["settings"]["train_on_retain"]) == (True, True)
    assert data["settings"]["retain_loss"] == "nll"
    assert {layer["name"] for layer in data["layers"]} == {f"model.layers.{i}.{m}" for i in (0, 1)
                                                           for m in ("mlp.down_proj", "self_attn.v_proj")}
    assert "forget" in capsys.readouterr().out
    lora_config = json.loads((out / "lora" / "adapter_config.json").read_text())
    assert lora_config["base_model_name_or_path"] == str(llm_folder) and lora_config["task_type"] == "CAUSAL_LM"
    # the saved adapters reproduce the run's forget perplexity on a freshly loaded model
    model, tokenizer = llm.load_causal_lm(llm_folder)
    forget = llm.make_batches(tokenizer, random_texts(8, seed=0), max_length=16, batch_size=4)
    semu_model = sf.load_adapters(model, out / "adapters")
    assert llm.mean_nll(semu_model, forget) == pytest.approx(metrics["forget_nll_after"], rel=1e-6)


def test_cli_lora_records_the_resolved_base_model_folder_for_peft(llm_folder, tmp_path, monkeypatch):
    """A relative --model was written as given into adapter_config.json, so AutoPeftModel looked for the base
    model relative to wherever it ran."""
    peft = pytest.importorskip("peft")
    import shutil

    shutil.copytree(llm_folder, tmp_path / "trained")
    (tmp_path / "forget.txt").write_text("\n".join(random_texts(4, seed=0)))
    monkeypatch.chdir(tmp_path)
    assert _cli(["unlearn-llm", "--model", "trained", "--forget-texts", "forget.txt", "--target-modules",
                 "mlp.down_proj", "--epochs", "1", "--max-length", "16", "--device", "cpu", "--lora", "--quiet",
                 "--out", "out"]) == 0
    config = json.loads((tmp_path / "out" / "lora" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str((tmp_path / "trained").resolve())
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    loaded = peft.AutoPeftModelForCausalLM.from_pretrained(tmp_path / "out" / "lora")
    semu_model = sf.load_adapters(llm.load_causal_lm(tmp_path / "trained")[0], tmp_path / "out" / "adapters")
    ids = torch.randint(4, 90, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, semu_model(input_ids=ids).logits, rtol=1e-4,
                                   atol=1e-4)


@pytest.mark.parametrize("argv, match", [
    (["--forget-texts", "missing.txt"], "argument --forget-texts: cannot read"),
    (["--forget-texts", "blank.txt"], "argument --forget-texts: .* holds no text"),
    (["--target-modules", "nothing_here"], "pattern 'nothing_here' matches no layer"),
    (["--train-on-retain"], "argument --train-on-retain: needs --retain-texts"),
])
def test_cli_unlearn_llm_reports_bad_input_as_a_usage_error(llm_folder, tmp_path, monkeypatch, capsys, argv, match):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "forget.txt").write_text("w1 w2 w3\n")
    (tmp_path / "blank.txt").write_text("\n  \n")
    base = ["unlearn-llm", "--model", str(llm_folder), "--forget-texts", "forget.txt", "--quiet", "--out", "out"]
    with pytest.raises(SystemExit) as exit_info:
        _cli(base + argv)
    assert exit_info.value.code == 2
    assert re.search(match, capsys.readouterr().err)
    assert not (tmp_path / "out").exists()


def test_cli_unlearn_llm_takes_a_loss_and_record_files(llm_folder, tmp_path, capsys):
    questions, answers = random_texts(8, seed=5, max_len=6), random_texts(8, seed=6, max_len=8)
    llm.save_records(tmp_path / "forget.jsonl", [{"question": q, "answer": a} for q, a in zip(questions, answers)])
    (tmp_path / "retain.json").write_text(json.dumps([{"text": t} for t in random_texts(8, seed=1)]))
    out = tmp_path / "out"
    code = _cli(["unlearn-llm", "--model", str(llm_folder), "--forget-file", str(tmp_path / "forget.jsonl"),
                 "--retain-file", str(tmp_path / "retain.json"), "--loss", "npo", "--loss-arg", "beta=0.2",
                 "--retain-loss", "kl", "--lr", "0.03", "--epochs", "2", "--max-length", "24", "--batch-size", "4",
                 "--device", "cpu", "--quiet", "--out", str(out)])
    assert code == 0
    data = json.loads((out / "metrics.json").read_text())
    metrics, settings = data["metrics"], data["settings"]
    assert metrics["forget_ppl_after"] > metrics["forget_ppl_before"] and "retain_ppl_after" in metrics
    assert settings["forget_loss"] == "npo" and settings["retain_loss"] == "kl"
    assert settings["loss_arg"] == [["beta", 0.2]]
    assert "forget" in capsys.readouterr().out
    # the saved adapters reproduce the forget answers' NLL on a freshly loaded model
    model, tokenizer = llm.load_causal_lm(llm_folder)
    forget = llm.make_record_batches(tokenizer, llm.load_records(tmp_path / "forget.jsonl"), 24, 4)
    assert llm.mean_nll(sf.load_adapters(model, out / "adapters"), forget) == \
        pytest.approx(metrics["forget_nll_after"], rel=1e-6)


def _tofu_records(n, seed):
    """Question/answer records with TOFU's paraphrased and perturbed answers (random words)."""
    fields = [random_texts(n, seed=seed + i, max_len=6) for i in range(5)]
    return [{"question": q, "answer": a, "paraphrased_answer": pa, "perturbed_answer": [p1, p2]}
            for q, a, pa, p1, p2 in zip(*fields)]


def test_cli_unlearn_llm_eval_writes_tofu_metrics_before_and_after(llm_folder, tmp_path, capsys):
    from semu_fast.workflows import llm_eval

    for module in ("rouge_score", "scipy", "sklearn"):  # optional: the GPU check machine has none of them
        pytest.importorskip(module)

    for name, seed in (("forget", 10), ("retain", 20), ("holdout", 30), ("authors", 40)):
        llm.save_records(tmp_path / f"{name}.jsonl", _tofu_records(6, seed))
    llm.save_records(tmp_path / "facts.jsonl", [{"question": r["question"], "answer": r["answer"],
                                                 "perturbed_answer": r["perturbed_answer"]}
                                                for r in _tofu_records(4, 50)])  # no paraphrase: not needed
    out = tmp_path / "out"
    code = _cli(["unlearn-llm", "--model", str(llm_folder), "--forget-file", str(tmp_path / "forget.jsonl"),
                 "--retain-file", str(tmp_path / "retain.jsonl"), "--holdout-file", str(tmp_path / "holdout.jsonl"),
                 "--real-authors-file", str(tmp_path / "authors.jsonl"),
                 "--world-facts-file", str(tmp_path / "facts.jsonl"),
                 "--reference-model", str(llm_folder), "--eval", "--max-new-tokens", "4", "--lr", "0.03",
                 "--epochs", "2", "--max-length", "24", "--batch-size", "3", "--device", "cpu", "--quiet",
                 "--out", str(out)])
    assert code == 0
    data = json.loads((out / "metrics.json").read_text())
    metrics = data["metrics"]
    utility = [f"{split}_{metric}" for split, names in (
        ("retain", ("answer_prob", "rougeL_recall", "truth_ratio")),
        ("real_authors", ("prob_normalised", "rougeL_recall", "truth_ratio")),
        ("world_facts", ("prob_normalised", "rougeL_recall", "truth_ratio"))) for metric in names]
    for key in ("forget_answer_prob", "forget_rougeL_recall", "forget_truth_ratio", "forget_quality",
                *utility, "model_utility", "mia_min_k_auc", "privleak"):
        for when in ("before", "after"):
            assert f"{key}_{when}" in metrics, f"{key}_{when}"
    assert metrics["model_utility_after"] == pytest.approx(  # TOFU's: all nine numbers
        llm_eval.model_utility([metrics[f"{key}_after"] for key in utility]))
    assert metrics["forget_quality_before"] == pytest.approx(1.0)  # the reference is the original model itself
    assert metrics["best_epoch"] in (0, 1, 2) and data["settings"]["eval"] is True
    assert data["settings"]["forget_loss"] == "idkdpo"  # "auto" on question/answer records
    assert len(data["training"]["history"]) == 2
    # the "after" numbers are those of the saved adapters
    model, tokenizer = llm.load_causal_lm(llm_folder)
    semu_model = sf.load_adapters(model, out / "adapters")
    split = llm.qa_split(llm.load_records(tmp_path / "forget.jsonl"))
    again = llm_eval.evaluate_llm(semu_model.model, tokenizer, split, generate=False, batch_size=3, max_length=24)
    assert again["forget_answer_prob"] == pytest.approx(metrics["forget_answer_prob_after"], rel=1e-5)
    report = (out / "report.md").read_text()
    assert "| forget_answer_prob |" in report and "| model_utility |" in report and "## Epochs" in report
    assert f"Kept: epoch {metrics['best_epoch']}" in report and "## SEMU per layer" in report
    printed = capsys.readouterr().out
    assert "forget_answer_prob" in printed and "report.md" in printed


def test_cli_unlearn_llm_eval_scores_texts_whole(llm_folder, tmp_path):
    (tmp_path / "forget.txt").write_text("\n".join(random_texts(6, seed=0)))
    (tmp_path / "retain.txt").write_text("\n".join(random_texts(6, seed=1)))
    out = tmp_path / "out"
    assert _cli(["unlearn-llm", "--model", str(llm_folder), "--forget-texts", str(tmp_path / "forget.txt"),
                 "--retain-texts", str(tmp_path / "retain.txt"), "--eval", "--no-select-best", "--epochs", "1",
                 "--lr", "0.03", "--max-length", "16", "--batch-size", "3", "--device", "cpu", "--quiet",
                 "--out", str(out)]) == 0
    data = json.loads((out / "metrics.json").read_text())
    metrics = data["metrics"]
    assert "forget_answer_prob_after" in metrics and "forget_rougeL_recall_after" not in metrics  # no generation
    assert data["settings"]["max_new_tokens"] == 128  # the default recorded as used: MUSE's for texts
    assert "best_epoch" not in metrics


@pytest.mark.parametrize("argv, match", [
    (["--forget-texts", "forget.txt", "--forget-file", "qa.jsonl"], "not allowed with argument"),
    (["--forget-file", "bad.jsonl"], r"argument --forget-file: path: bad.jsonl, line 1 has no 'answer' field"),
    (["--forget-file", "empty.jsonl"], "argument --forget-file: path: empty.jsonl is empty"),
    (["--forget-texts", "forget.txt", "--loss", "idk"], "argument --loss: idk needs question/answer records"),
    (["--forget-file", "qa.jsonl", "--loss", "graddiff"], "argument --loss: graddiff trains on retain data"),
    (["--forget-file", "qa.jsonl", "--retain-loss", "kl"], "argument --retain-loss: needs --retain-texts or"),
    (["--forget-file", "qa.jsonl", "--loss", "npo", "--loss-arg", "bta=1"],
     "argument --loss-arg: forget_loss='npo' has no hyper-parameter 'bta'"),
    (["--forget-file", "qa.jsonl", "--loss-arg", "beta"], "argument --loss-arg: expected KEY=VALUE"),
    (["--forget-file", "qa.jsonl", "--loss", "nope"], "argument --loss/--forget-loss: invalid choice"),
    (["--forget-file", "qa.jsonl", "--retain-file", "qa.jsonl", "--loss", "rmu"],
     "rmu: layer=7 is out of range"),
    (["--forget-file", "qa.jsonl", "--holdout-file", "qa.jsonl"], "argument --holdout-file: only used with --eval"),
    (["--forget-file", "qa.jsonl", "--reference-model", "."], "argument --reference-model: only used with --eval"),
    (["--forget-file", "qa.jsonl", "--select-best"], "argument --select-best: needs --retain-texts or"),
    (["--forget-file", "qa.jsonl", "--retain-texts", "forget.txt", "--eval"],
     "argument --eval: the forget, retain, holdout and utility data must be of one kind"),
    (["--forget-texts", "qa.jsonl"], "argument --forget-texts: every line of qa.jsonl is a JSON object; records are "
                                     "read by --forget-file"),
    (["--forget-file", "qa.jsonl", "--world-facts-file", "qa.jsonl"],
     "argument --world-facts-file: only used with --eval"),
    (["--forget-file", "qa.jsonl", "--eval", "--real-authors-file", "qa.jsonl"],
     'argument --real-authors-file: needs question/answer records with "perturbed_answer"'),
    (["--forget-file", "qa.jsonl", "--eval", "--reference-model", "missing"],
     "argument --reference-model: .*missing is not a folder"),
    (["--forget-file", "qa.jsonl", "--retain-tolerance", "-1"], "argument --retain-tolerance: must be a finite"),
    (["--forget-file", "qa.jsonl", "--criterion", "acc"], "argument --criterion: invalid choice"),
])
def test_cli_unlearn_llm_reports_bad_losses_and_record_files(llm_folder, tmp_path, monkeypatch, capsys, argv, match):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "forget.txt").write_text("w1 w2 w3\n")
    (tmp_path / "qa.jsonl").write_text('{"question": "w1 w2", "answer": "w3 w4"}\n')
    (tmp_path / "bad.jsonl").write_text('{"question": "w1 w2"}\n')
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(SystemExit) as exit_info:
        _cli(["unlearn-llm", "--model", str(llm_folder), "--quiet", "--out", "out"] + argv)
    assert exit_info.value.code == 2
    assert re.search(match, capsys.readouterr().err)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("reentrant", [True, False])
def test_gradient_checkpointing_gives_the_same_factors_and_trains_R(reentrant):
    """prepare on a bf16 Llama with transformers' gradient checkpointing equals prepare without it, and R then gets
    gradients (the trap: with frozen inputs, reentrant checkpointing passes no gradient to the blocks)."""
    batches = id_batches(2, batch=2, length=10)
    config = sf.SEMUConfig(gamma=0.9, target_modules=["mlp.down_proj", "self_attn.v_proj"])
    plain = tiny_llama().to(torch.bfloat16)
    checkpointed = tiny_llama().to(torch.bfloat16)
    kwargs = {"use_reentrant": reentrant}
    if hasattr(checkpointed, "activation_checkpointing_enable"):  # transformers >= 5.2x: the old name is deprecated
        checkpointed.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        checkpointed.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    a = sf.prepare(plain, batches, loss_fn=llm.nll_loss, config=config)
    b = sf.prepare(checkpointed, batches, loss_fn=llm.nll_loss, config=config)
    assert [layer.k for layer in a.report.layers] == [layer.k for layer in b.report.layers]
    for name, adapter in a.adapters.items():
        torch.testing.assert_close(adapter.U.abs(), b.adapters[name].U.abs(), rtol=0, atol=1e-3)
    b.train()
    llm.nll_loss(b, batches[0]).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in b.trainable_parameters())


def _tiny_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=50, n_positions=16,
                                      resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)).eval()


def test_gpt2_conv1d_layers_are_adapted_like_linear_ones(tmp_path):
    """transformers' Conv1D (weight stored (in, out)): SEMU adapts it as the Linear of the transposed weight; the
    model is unchanged at R = 0, merge/unmerge are exact, R trains, and save/load round-trips."""
    model = _tiny_gpt2()
    batches = [{"input_ids": torch.randint(0, 50, (2, 10), generator=torch.Generator().manual_seed(i))}
               for i in range(2)]
    with torch.no_grad():
        before = model(**batches[0]).logits
    state = {k: v.clone() for k, v in model.state_dict().items()}
    config = sf.SEMUConfig(gamma=0.9, target_modules=["attn.c_attn", "mlp.c_fc", "mlp.c_proj"])
    sm = sf.prepare(model, batches, loss_fn=llm.nll_loss, config=config)
    assert {layer.kind for layer in sm.report.layers} == {"conv1d"} and len(sm.adapters) == 6
    attn = sm.model.transformer.h[0].attn.c_attn
    assert attn.U.shape[0] == attn.base_layer.weight.shape[1] and attn.Vh.shape[1] == attn.base_layer.weight.shape[0]
    with torch.no_grad():
        torch.testing.assert_close(sm(**batches[0]).logits, before)
    sm.train()
    opt = torch.optim.Adam(sm.trainable_parameters(), lr=1e-2)
    for _ in range(3):
        opt.zero_grad()
        (-llm.nll_loss(sm, batches[0])).backward()
        opt.step()
    sm.eval()
    with torch.no_grad():
        adapted = sm(**batches[0]).logits
        assert not torch.allclose(adapted, before)
        with sm.merged():
            torch.testing.assert_close(sm(**batches[0]).logits, adapted, rtol=1e-4, atol=1e-4)
    sm.save_adapters(tmp_path / "a")
    base = sm.unload()
    assert all(torch.equal(base.state_dict()[k], v) for k, v in state.items())
    loaded = sf.load_adapters(base, tmp_path / "a")
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batches[0]).logits, adapted)


def test_gpt2_conv1d_adapters_export_as_a_peft_lora():
    peft = pytest.importorskip("peft")
    from semu_fast.lora import export_lora

    model = _tiny_gpt2()
    batch = {"input_ids": torch.randint(0, 50, (2, 10), generator=torch.Generator().manual_seed(0))}
    sm = sf.prepare(model, [batch], loss_fn=llm.nll_loss,
                    config=sf.SEMUConfig(gamma=0.9, target_modules=["attn.c_attn", "mlp.c_proj"]))
    with torch.no_grad():
        for adapter in sm.adapters.values():
            adapter.R.normal_()
        expected = sm(**batch).logits
    import tempfile
    with tempfile.TemporaryDirectory() as folder:
        config = export_lora(sm, folder)
        assert config["fan_in_fan_out"] is True
        peft_model = peft.PeftModel.from_pretrained(_tiny_gpt2(), folder).eval()
        with torch.no_grad():
            torch.testing.assert_close(peft_model(**batch).logits, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("build, expected", [
    (tiny_llama, {f"model.layers.{i}.{p}" for i in range(2) for p in (
        "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
        "mlp.up_proj", "mlp.down_proj")}),
    (_tiny_gpt2, {f"transformer.h.{i}.{p}" for i in range(2) for p in ("attn.c_attn", "attn.c_proj", "mlp.c_fc",
                                                                         "mlp.c_proj")}),
])
def test_all_linear_adapts_every_linear_layer_but_the_output_head(build, expected):
    """The LLM default, whatever the architecture names its layers: the head (tied to the embeddings in GPT-2,
    untied in the tiny Llama) is left out, every other Linear / Conv1D adapted."""
    model = build()
    config = llm.llm_config(model, "all-linear", 0.9, seed=0)
    assert set(select_layers(model, config)) == expected
    assert llm.llm_config(model, ("all-linear",), 0.9, seed=0) == config
    assert llm.DEFAULTS.target_modules == ("all-linear",)
    patterns = llm.llm_config(model, ["mlp"], 0.5, seed=3)
    assert patterns.target_modules == ("mlp",) and patterns.exclude_modules is None and patterns.seed == 3


def test_all_linear_is_refused_next_to_other_patterns():
    with pytest.raises(ValueError, match="target_modules: 'all-linear' selects every layer already; give it alone"):
        llm.llm_config(tiny_llama(), ["all-linear", "mlp"], 0.9, seed=0)


def test_default_epochs_give_about_forget_steps_steps_and_at_least_min_epochs():
    defaults = llm.DEFAULTS
    assert defaults.epochs is None and defaults.forget_steps == 180 and defaults.min_epochs == 5
    assert [defaults.epochs_for(n) for n in (1, 3, 7, 36, 37, 1000)] == [180, 60, 26, 5, 5, 5]
    assert dataclasses.replace(defaults, epochs=2).epochs_for(3) == 2


def _save_tiny_gpt2(folder, n_positions=64):
    from transformers import GPT2Config, GPT2LMHeadModel

    from llm_helpers import VOCAB, tiny_tokenizer

    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=len(VOCAB), n_positions=n_positions,
                               bos_token_id=2, eos_token_id=3)).eval().save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder


def test_cli_refuses_before_any_work_what_would_fail_after_it(llm_folder, tmp_path, capsys):
    """A LoRA folder mixing Conv1D and Linear layers, and a reference model of a smaller vocabulary, failed after
    the whole run (the first leaving the previous run's lora/ beside the new results)."""
    gpt2 = _save_tiny_gpt2(tmp_path / "gpt2")
    (tmp_path / "forget.txt").write_text("\n".join(random_texts(4, seed=0)))
    base = ["unlearn-llm", "--forget-texts", str(tmp_path / "forget.txt"), "--epochs", "1", "--device", "cpu",
            "--quiet", "--out", str(tmp_path / "out")]
    with pytest.raises(SystemExit):
        _cli([*base, "--model", str(gpt2), "--lora", "--target-modules", "c_attn", "--target-modules", "lm_head"])
    assert "argument --lora: a peft LoRA folder takes transformers Conv1D layers" in capsys.readouterr().err
    small = tmp_path / "small"
    from transformers import LlamaConfig, LlamaForCausalLM

    LlamaForCausalLM(LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                                 vocab_size=20)).save_pretrained(small)
    with pytest.raises(SystemExit):  # a folder without a tokenizer says so, before the weights load
        _cli([*base, "--model", str(small)])
    assert "argument --model: path: no tokenizer could be loaded from" in capsys.readouterr().err
    tiny_tokenizer().save_pretrained(small)
    for module in ("rouge_score", "scipy"):
        pytest.importorskip(module)
    (tmp_path / "forget.jsonl").write_text("\n".join(json.dumps(r) for r in _tofu_records(2, 1)))
    with pytest.raises(SystemExit):
        _cli([*base[:1], "--forget-file", str(tmp_path / "forget.jsonl"), *base[3:], "--model", str(llm_folder),
              "--eval", "--reference-model", str(small)])
    assert "argument --reference-model: its vocabulary holds 20 tokens" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_cli_cuts_texts_at_the_model_s_positions_and_unlearn_llm_names_them(tmp_path, caplog):
    """Sequences past the model's context died in the position embedding with an IndexError."""
    gpt2 = _save_tiny_gpt2(tmp_path / "gpt2", n_positions=16)
    (tmp_path / "forget.txt").write_text("\n".join(" ".join(random_texts(6, seed=i)) for i in range(4)))
    assert _cli(["unlearn-llm", "--model", str(gpt2), "--forget-texts", str(tmp_path / "forget.txt"), "--epochs",
                 "1", "--device", "cpu", "--quiet", "--out", str(tmp_path / "out")]) == 0
    assert json.loads((tmp_path / "out" / "metrics.json").read_text())["settings"]["max_length"] == 16
    assert "--max-length 256 is past the model's 16 positions" in caplog.text
    model, tokenizer = llm.load_causal_lm(gpt2)
    batches = llm.make_batches(tokenizer, [" ".join(random_texts(6, seed=0))], max_length=40)
    with pytest.raises(ValueError, match="forget_batches hold sequences of .* tokens, more than the model's 16"):
        llm.unlearn_llm(model, batches, progress=False)


def test_cli_a_nan_loss_is_a_usage_error_not_a_traceback(llm_folder, tmp_path, capsys):
    (tmp_path / "forget.txt").write_text("\n".join(random_texts(4, seed=0)))
    with pytest.raises(SystemExit) as exit_:
        _cli(["unlearn-llm", "--model", str(llm_folder), "--forget-texts", str(tmp_path / "forget.txt"),
              "--loss", "ascent", "--lr", "1e30", "--epochs", "3", "--device", "cpu", "--quiet",
              "--out", str(tmp_path / "out")])
    assert exit_.value.code == 2 and "lower lr" in capsys.readouterr().err


def test_an_rmu_layer_the_model_lacks_is_refused_before_the_gradient_pass(llm_folder, tmp_path, capsys):
    """It failed at the first training step, after the gradient pass and the SVDs; --retain-loss rmu's layer could
    not be set from the command line at all."""
    model = tiny_llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    forget, retain = id_batches(2), id_batches(2, seed=1)
    with pytest.raises(ValueError, match="rmu: layer=7 is out of range"):
        llm.unlearn_llm(model, forget, retain, forget_loss="rmu", progress=False)
    with pytest.raises(ValueError, match="rmu: layer=7 is out of range"):
        llm.unlearn_llm(model, forget, retain, forget_loss="npo", retain_loss="rmu", progress=False)
    assert not any(type(m).__name__.startswith("SEMU") for m in model.modules())
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    for name, seed in (("forget", 0), ("retain", 1)):
        (tmp_path / f"{name}.txt").write_text("\n".join(random_texts(4, seed=seed)))
    base = ["unlearn-llm", "--model", str(llm_folder), "--forget-texts", str(tmp_path / "forget.txt"),
            "--retain-texts", str(tmp_path / "retain.txt"), "--loss", "npo", "--retain-loss", "rmu", "--epochs", "1",
            "--device", "cpu", "--quiet", "--out", str(tmp_path / "out")]
    with pytest.raises(SystemExit):
        _cli(base)
    assert "rmu: layer=7 is out of range" in capsys.readouterr().err and not (tmp_path / "out").exists()
    assert _cli([*base, "--retain-loss-arg", "layer=1"]) == 0
    with pytest.raises(SystemExit):
        _cli([*base[:9], "--retain-loss-arg", "layer=1"])  # without --retain-loss
    assert "argument --retain-loss-arg: needs --retain-loss" in capsys.readouterr().err


def test_qa_split_warns_when_some_records_lack_the_truth_ratio_fields():
    """One record without paraphrased_answer silently dropped the truth ratio and forget quality of the whole split."""
    full = {"question": "q a", "answer": "b", "paraphrased_answer": "c", "perturbed_answer": ["d", "e"]}
    with pytest.warns(UserWarning, match="1 of 2 records lack"):
        split = llm.qa_split([full, {"question": "q f", "answer": "g"}])
    assert "paraphrased_answers" not in split
    assert "paraphrased_answers" in llm.qa_split([full, full])
