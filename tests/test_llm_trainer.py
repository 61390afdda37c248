"""SEMUTrainer (transformers.Trainer with SEMU) on a tiny random Llama: the gradient pass runs once inside train(),
only R trains (through the Trainer's optimizer, scheduler and gradient accumulation), save_model writes adapters
that sf.load_adapters reads back (or merged weights that from_pretrained loads), and the base weights come back
bit for bit."""
import math
import subprocess
import sys

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("accelerate")
pytest.importorskip("tokenizers")

import semu_fast as sf  # noqa: E402
from semu_fast.workflows import llm  # noqa: E402
from semu_fast.workflows.llm_trainer import SEMUTrainer, collate, semu_trainer_class, unbatch  # noqa: E402
from helpers import assert_same_state, snapshot  # noqa: E402
from llm_helpers import random_texts, tiny_llama, tiny_tokenizer  # noqa: E402
from llm_helpers import one_thread, two_process_group  # noqa: E402,F401 (autouse; a fixture)


def _args(tmp_path, **overrides):
    from transformers import TrainingArguments

    settings = dict(per_device_train_batch_size=4, num_train_epochs=2, learning_rate=3e-2, report_to="none",
                    save_strategy="no", logging_strategy="no", disable_tqdm=True, use_cpu=True, seed=0)
    return TrainingArguments(str(tmp_path / "run"), **{**settings, **overrides})


def _records(n=8):
    questions, answers = random_texts(n, seed=5, max_len=6), random_texts(n, seed=6, max_len=8)
    return [{"question": q, "answer": a} for q, a in zip(questions, answers)]


def _data(alternate=False):
    tokenizer = tiny_tokenizer()
    forget = unbatch(llm.make_qa_batches(tokenizer, _records(), 24, 4, alternate=alternate))
    retain = unbatch(llm.make_batches(tokenizer, random_texts(8, seed=1), 16, 4))
    return tokenizer, forget, retain


def _probe():
    return llm.make_batches(tiny_tokenizer(), random_texts(3, seed=9), 16, 3)[0]


def test_unbatch_then_collate_gives_the_batches_back():
    tokenizer = tiny_tokenizer()
    batches = llm.make_qa_batches(tokenizer, _records(6), 24, 3, alternate=True)
    examples = unbatch(batches)
    assert len(examples) == 6 and all(e["input_ids"].dim() == 1 for e in examples)
    for i, batch in enumerate(batches):
        again = collate(examples[3 * i:3 * i + 3], pad_id=tokenizer.pad_token_id)
        for key in ("input_ids", "attention_mask", "labels"):
            assert torch.equal(again[key], batch[key])
            assert torch.equal(again["alternate"][key], batch["alternate"][key])
    plain = collate([{"input_ids": [5, 6, 7]}, {"input_ids": [8, 9]}])  # no labels: every token is one
    assert plain["labels"].tolist() == [[5, 6, 7], [8, 9, -100]] and plain["attention_mask"].tolist()[1] == [1, 1, 0]


def test_train_runs_the_gradient_pass_once_and_changes_only_R(tmp_path, monkeypatch):
    tokenizer, forget, retain = _data()
    model = tiny_llama()
    before = snapshot(model)
    calls = []
    real_prepare = sys.modules["semu_fast.workflows.llm_trainer"].prepare

    def spy(*args, **kwargs):
        calls.append(1)
        return real_prepare(*args, **kwargs)

    monkeypatch.setattr(sys.modules["semu_fast.workflows.llm_trainer"], "prepare", spy)
    trainer = SEMUTrainer(model, _args(tmp_path), train_dataset=forget, retain_dataset=retain, forget_loss="npo",
                          retain_loss="kl", processing_class=tokenizer)
    assert trainer.semu_model is None
    trainer.train()
    trainer.train()  # a second call trains on, with the same adapters
    assert len(calls) == 1
    sm = trainer.semu_model
    trained = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    # the default layers: every Linear of the 2 decoder layers (7 each), not the output head
    assert trained == {id(p) for p in sm.trainable_parameters()} and len(trained) == 14
    assert "lm_head" not in sm.adapters
    assert all((a.R != 0).any() for a in sm.adapters.values())
    for name, param in sm.model.named_parameters():  # everything but R is untouched
        if not name.endswith(".R"):
            key = name.replace(".base_layer", "")
            assert torch.equal(param, before[key]), name
    forget_batches = llm.make_qa_batches(tokenizer, _records(), 24, 4)
    with torch.no_grad(), sm.disable_adapters():
        original = llm.mean_nll(sm, forget_batches)
    assert llm.mean_nll(sm, forget_batches) > original  # NPO pushed the forget answers down
    base = sm.unload()
    assert base is model
    assert_same_state(base, before)


def test_save_model_writes_adapters_that_load_adapters_reads_back(tmp_path):
    tokenizer, forget, retain = _data()
    trainer = SEMUTrainer(tiny_llama(), _args(tmp_path), train_dataset=forget, retain_dataset=retain,
                          processing_class=tokenizer, semu_config=sf.SEMUConfig(
                              gamma=0.9, target_modules=("mlp.down_proj", "self_attn.v_proj")))
    trainer.train()
    trainer.save_model(str(tmp_path / "adapters"))
    assert (tmp_path / "adapters" / "tokenizer.json").exists()
    loaded = sf.load_adapters(tiny_llama(), tmp_path / "adapters")
    assert set(loaded.adapters) == set(trainer.semu_model.adapters) and len(loaded.adapters) == 4
    probe = _probe()
    with torch.no_grad():
        assert torch.equal(loaded(**probe).logits, trainer.semu_model.eval()(**probe).logits)


def test_save_merged_writes_a_plain_model_with_the_adapters_merged_in(tmp_path):
    from transformers import AutoModelForCausalLM

    tokenizer, forget, retain = _data()
    trainer = SEMUTrainer(tiny_llama(), _args(tmp_path), train_dataset=forget, retain_dataset=retain,
                          processing_class=tokenizer, save_merged=True)
    trainer.train()
    weights = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.save_model(str(tmp_path / "merged"))
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", local_files_only=True).eval()
    assert not any(name.endswith((".R", ".U", ".Vh")) for name in merged.state_dict())
    probe = _probe()
    with torch.no_grad():
        torch.testing.assert_close(merged(**probe).logits, trainer.semu_model.eval()(**probe).logits,
                                   rtol=1e-4, atol=1e-4)
    assert all(torch.equal(p, weights[n]) for n, p in trainer.model.named_parameters())  # unmerged after saving
    assert not any(a.merged for a in trainer.semu_model.adapters.values())


def test_gradient_accumulation_averages_like_one_larger_batch(tmp_path):
    """One optimizer step (SGD) over 4 forget examples: batch 4, or 2 accumulated twice, gives the same R (NPO is
    a mean over sequences, so the Trainer must divide each accumulated loss by the accumulation steps)."""
    tokenizer, forget, _ = _data()
    forget = forget[:4]
    runs = []
    for batch, steps in ((4, 1), (2, 2)):
        args = _args(tmp_path, per_device_train_batch_size=batch, gradient_accumulation_steps=steps, max_steps=1,
                     optim="sgd", learning_rate=0.5, max_grad_norm=0.0, lr_scheduler_type="constant")
        trainer = SEMUTrainer(tiny_llama(), args, train_dataset=forget, prepare_batch_size=4, forget_loss="npo")
        trainer.train()
        runs.append({n: a.R.detach().clone() for n, a in trainer.semu_model.adapters.items()})
    assert runs[0].keys() == runs[1].keys()
    for name in runs[0]:
        assert runs[0][name].abs().max() > 0
        torch.testing.assert_close(runs[1][name], runs[0][name], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("forget_loss", ["idkdpo", "simnpo", "rmu"])
def test_other_objectives_train_through_the_trainer(tmp_path, forget_loss):
    tokenizer, forget, retain = _data(alternate=True)
    loss = llm.make_loss("rmu", layer=1, steering_coeff=4.0, alpha=5.0) if forget_loss == "rmu" else forget_loss
    trainer = SEMUTrainer(tiny_llama(), _args(tmp_path, logging_strategy="steps", logging_steps=1),
                          train_dataset=forget, retain_dataset=retain, forget_loss=loss)
    assert getattr(trainer.forget_objective, "cache_bytes", 0) == 0  # the Trainer's batches are new every step
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert losses and all(math.isfinite(v) for v in losses)
    assert all((a.R != 0).any() for a in trainer.semu_model.adapters.values())


def test_the_training_loss_is_the_forget_objective_plus_the_retain_objective(tmp_path):
    tokenizer, forget, retain = _data()
    trainer = SEMUTrainer(tiny_llama(), _args(tmp_path, num_train_epochs=1), train_dataset=forget,
                          retain_dataset=retain, forget_loss=llm.make_loss("npo", alpha=2.0), retain_loss="kl",
                          processing_class=tokenizer)
    trainer.train()  # runs the gradient pass; R moves away from 0, so both terms are nonzero
    assert trainer.retain_objective.weight == 2.0  # the forget objective's alpha weighs the named retain loss
    sm, generator = trainer.semu_model, torch.Generator()
    inputs = {"forget": llm.make_qa_batches(tokenizer, _records(), 24, 4)[0],
              "retain": llm.make_batches(tokenizer, random_texts(4, seed=1), 16, 4)[0]}
    with torch.no_grad():
        forget_term = trainer.forget_objective(sm, inputs["forget"], generator)
        retain_term = trainer.retain_objective(sm, inputs["retain"], generator)
        total = trainer.compute_loss(trainer.model, inputs)
    assert float(forget_term) != 0 and float(retain_term) != 0
    torch.testing.assert_close(total, forget_term + retain_term)


def test_evaluate_reports_the_nll_of_plain_batches(tmp_path):
    tokenizer, forget, retain = _data()
    trainer = SEMUTrainer(tiny_llama(), _args(tmp_path), train_dataset=forget, eval_dataset=retain)
    trainer.train()
    result = trainer.evaluate()
    batches = [collate(retain[i:i + 4], pad_id=tokenizer.pad_token_id) for i in range(0, len(retain), 4)]
    nll = [llm.nll_loss(trainer.semu_model.eval(), b).item() for b in batches]
    assert result["eval_loss"] == pytest.approx(sum(nll) / len(nll), rel=1e-4)


@pytest.mark.parametrize("change, match", [
    ({"train_dataset": None}, "train_dataset .* is required"),
    ({"train_dataset": []}, "train_dataset is empty"),
    ({"retain_dataset": "w1 w2"}, "retain_dataset must be an indexable dataset"),
    ({"forget_loss": "nope"}, "forget_loss must be one of"),
    ({"forget_loss": "graddiff"}, "forget_loss='graddiff' needs retain_dataset"),
    ({"forget_loss": "idkdpo"}, "needs alternate answers: train_dataset\\[0\\] has no 'alternate'"),
    ({"retain_loss": "kl"}, "retain_loss='kl' needs retain_dataset"),
    ({"semu_config": {"gamma": 0.9}}, "semu_config must be a SEMUConfig"),
    ({"semu_config": sf.SEMUConfig(target_modules=("no_such",))}, "pattern 'no_such' matches no layer"),
    ({"save_merged": "yes"}, "save_merged must be True or False"),
    ({"prepare_batch_size": 0}, "prepare_batch_size must be an int >= 1"),
    ({"model": None}, "model must be a torch.nn.Module"),
    ({"optimizers": (torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0), None)},
     "optimizers: an optimizer made before train"),
    ({"compute_loss_func": lambda *a, **k: 0.0}, "compute_loss_func"),
])
def test_bad_arguments_name_the_parameter(tmp_path, change, match):
    _, forget, _ = _data()
    model = tiny_llama()
    before = snapshot(model)
    kwargs = {"model": model, "args": _args(tmp_path), "train_dataset": forget, **change}
    with pytest.raises(ValueError, match=match):
        SEMUTrainer(**kwargs)
    assert_same_state(model, before)


def test_a_process_group_initialised_without_torchrun_is_refused_before_the_gradient_pass(tmp_path,
                                                                                          two_process_group):
    # args.world_size stays 1 without torchrun's environment: prepare would sum the gradients over the ranks, then R
    # would train on each rank unsynchronised
    _, forget, _ = _data()
    model = tiny_llama()
    before = snapshot(model)
    trainer = SEMUTrainer(model, _args(tmp_path), train_dataset=forget)
    assert trainer.args.world_size == 1
    with pytest.raises(RuntimeError, match="SEMUTrainer trains in one process, and torch.distributed is initialised "
                                           "with 2 processes.*use sf.unlearn"):
        trainer.train()
    assert trainer.semu_model is None
    assert_same_state(model, before)


def test_resume_and_load_best_model_at_end_are_refused(tmp_path):
    _, forget, _ = _data()
    with pytest.raises(ValueError, match="load_best_model_at_end"):
        SEMUTrainer(tiny_llama(), _args(tmp_path, load_best_model_at_end=True, eval_strategy="epoch",
                                        save_strategy="epoch", metric_for_best_model="loss"),
                    train_dataset=forget)
    trainer = SEMUTrainer(tiny_llama(), _args(tmp_path), train_dataset=forget)
    with pytest.raises(ValueError, match="resume_from_checkpoint"):
        trainer.train(resume_from_checkpoint=True)
    assert trainer.semu_model is None


def test_a_train_that_fails_takes_its_adapters_out_again(tmp_path):
    """As sf.unlearn: an error (or Ctrl-C) inside the Trainer's loop left the adapters installed in the user's
    model, and a new trainer on it then refused the model."""
    _, forget, _ = _data()
    model = tiny_llama()
    before = snapshot(model)

    calls = []

    def fails_once(model, batch, generator):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("the loop failed")
        return llm.make_loss("ascent")(model, batch, generator)

    trainer = SEMUTrainer(model, _args(tmp_path), train_dataset=forget, forget_loss=fails_once)
    with pytest.raises(RuntimeError, match="the loop failed"):
        trainer.train()
    assert trainer.semu_model is None and not any(type(m).__name__.startswith("SEMU") for m in model.modules())
    assert_same_state(model, before)
    trainer.train()  # a retry on the same trainer trains the new R (its optimizer held the old one)
    assert any(a.R.abs().sum() > 0 for a in trainer.semu_model.adapters.values())


def test_the_module_imports_without_transformers():
    code = ("import sys; sys.modules['transformers'] = None\n"
            "import semu_fast, semu_fast.workflows.llm_trainer as t\n"
            "try:\n    t.SEMUTrainer\nexcept ImportError as err:\n    print('ImportError:', err)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "SEMUTrainer needs the transformers package" in out.stdout
    assert semu_trainer_class() is SEMUTrainer


def test_readme_llm_and_trainer_examples_run(tmp_path, monkeypatch):
    """The README's LLM example and its SEMUTrainer continuation, run as written in one namespace."""
    pytest.importorskip("peft")
    from test_readme import python_block

    monkeypatch.chdir(tmp_path)
    names = {}
    exec(compile(python_block("llm.unlearn_llm("), "README.md", "exec"), names)
    metrics, after, before = names["metrics"], names["after"], names["before"]
    assert metrics["forget_ppl_after"] > metrics["forget_ppl_before"] and metrics["best_epoch"] > 0
    assert metrics["retain_ppl_after"] <= metrics["retain_ppl_before"] * 1.1
    assert after["forget_answer_prob"] < before["forget_answer_prob"] and "model_utility" in after
    exec(compile(python_block("SEMUTrainer("), "README.md", "exec"), names)
    trainer = names["trainer"]
    assert all((a.R != 0).any() for a in trainer.semu_model.adapters.values())
    loaded = sf.load_adapters(tiny_llama_like(names), tmp_path / "trainer_out")
    assert set(loaded.adapters) == set(trainer.semu_model.adapters)


def tiny_llama_like(names):
    """A fresh copy of the README's random model: same config, same seed."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(names["model"].config).eval()


def test_the_default_forget_loss_follows_the_data(tmp_path):
    """"auto": IdkDPO on forget examples with "I don't know" alternates, NPO on others."""
    for alternate, expected in ((True, "idkdpo"), (False, "npo")):
        tokenizer, forget, retain = _data(alternate=alternate)
        trainer = SEMUTrainer(tiny_llama(), _args(tmp_path), train_dataset=forget, retain_dataset=retain,
                              processing_class=tokenizer)
        assert trainer.forget_objective.name == expected


def test_unbatch_keeps_the_tokens_of_left_padded_rows():
    """A left-padded batch (a tokenizer whose padding_side is "left", transformers' default for Llama) gave its pad
    tokens as the example and dropped the end of the text."""
    batch = {"input_ids": torch.tensor([[5, 6, 7], [1, 1, 8]]), "attention_mask": torch.tensor([[1, 1, 1], [0, 0, 1]]),
             "labels": torch.tensor([[5, 6, 7], [-100, -100, 8]])}
    examples = unbatch([batch])
    assert examples[1]["input_ids"].tolist() == [8] and examples[1]["labels"].tolist() == [8]
    with pytest.raises(ValueError, match="zeros between ones"):
        unbatch([{"input_ids": torch.tensor([[5, 6, 7]]), "attention_mask": torch.tensor([[1, 0, 1]])}])
