"""The TOFU / MUSE / open-unlearning metrics of workflows.llm_eval, each on hand-made cases with known answers: fake
"models" whose logits are fixed tensors (log-probs recomputed here in float64), then a smoke run of evaluate_llm on a
tiny random Llama."""
import math
import types
import zlib

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from semu_fast.workflows import llm_eval as ev

IGNORE = -100


class FixedLogits(nn.Module):
    """Returns the same (B, T, V) logits whatever the input (cut to the input's length); notes its training flag."""

    def __init__(self, logits):
        super().__init__()
        self.register_buffer("table", logits)
        self.seen_training = None

    def forward(self, input_ids, attention_mask=None, use_cache=None):
        self.seen_training = self.training
        return types.SimpleNamespace(logits=self.table[:input_ids.shape[0], :input_ids.shape[1]])


class PeekModel(nn.Module):
    """Predicts the true next token (it reads ahead) with logit 10, except at the positions in `misses`, where it
    predicts the next token + 1 (mod V)."""

    def __init__(self, vocab, misses=()):
        super().__init__()
        self.vocab, self.misses = vocab, set(misses)

    def forward(self, input_ids, attention_mask=None, use_cache=None):
        nxt = torch.cat([input_ids[:, 1:], input_ids[:, -1:]], dim=1)
        for t in self.misses:
            nxt[:, t] = (nxt[:, t] + 1) % self.vocab
        return types.SimpleNamespace(logits=10.0 * F.one_hot(nxt, self.vocab).float())


def _masked_batch(lengths, prompt_lengths, vocab, seed):
    """A right-padded batch of random ids, labels -100 on each row's prompt and padding."""
    gen = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.randint(0, vocab, (len(lengths), width), generator=gen)
    mask = torch.zeros_like(ids)
    labels = torch.full_like(ids, IGNORE)
    for row, (n, p) in enumerate(zip(lengths, prompt_lengths)):
        mask[row, :n] = 1
        labels[row, p:n] = ids[row, p:n]
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _oracle(logits, batch, k):
    """Per-sample statistics in float64, written from the definitions."""
    lp_all = torch.log_softmax(logits.double(), dim=-1)
    out = {"nll": [], "em": [], "min_k": [], "min_k_pp": []}
    for b in range(batch["input_ids"].shape[0]):
        positions = [t for t in range(batch["input_ids"].shape[1] - 1) if batch["labels"][b, t + 1] != IGNORE]
        lps, zs, hits = [], [], []
        for t in positions:
            label = int(batch["labels"][b, t + 1])
            dist = lp_all[b, t]
            mu = -torch.distributions.Categorical(logits=logits[b, t].double()).entropy()
            var = sum(float(dist[v].exp()) * (float(dist[v]) - float(mu)) ** 2 for v in range(dist.numel()))
            lps.append(float(dist[label]))
            zs.append((float(dist[label]) - float(mu)) / math.sqrt(max(var, 1e-6)))
            hits.append(int(dist.argmax()) == label)
        count = max(1, int(len(lps) * k))
        out["nll"].append(-sum(lps) / len(lps))
        out["em"].append(sum(hits) / len(hits))
        out["min_k"].append(-sum(sorted(lps)[:count]) / count)
        out["min_k_pp"].append(-sum(sorted(zs)[:count]) / count)
    return {key: torch.tensor(value, dtype=torch.float64) for key, value in out.items()}


# ---- per-sample statistics -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("k", [0.2, 0.5, 1.0])
def test_answer_statistics_match_float64_oracle_with_prompt_and_padding_masked(k):
    vocab, lengths, prompts = 13, [9, 6, 8], [3, 1, 5]
    batch = _masked_batch(lengths, prompts, vocab, seed=1)
    logits = torch.randn(3, 9, vocab, generator=torch.Generator().manual_seed(2)) * 3
    texts = ["the first answer", "a second, longer answer text with more words", "third"]
    stats = ev.answer_statistics(FixedLogits(logits), [batch], texts=texts, k=k)
    want = _oracle(logits, batch, k)
    tol = dict(rtol=1e-5, atol=1e-5)  # float32 log_softmax against float64
    torch.testing.assert_close(stats["nll"], want["nll"], **tol)
    torch.testing.assert_close(stats["prob"], torch.exp(-want["nll"]), **tol)
    torch.testing.assert_close(stats["mia_loss"], want["nll"], **tol)
    torch.testing.assert_close(stats["exact_memorization"], want["em"], **tol)
    torch.testing.assert_close(stats["mia_min_k"], want["min_k"], **tol)
    torch.testing.assert_close(stats["mia_min_k_plus_plus"], want["min_k_pp"], **tol)
    zlib_len = torch.tensor([len(zlib.compress(t.encode("utf-8"))) for t in texts], dtype=torch.float64)
    torch.testing.assert_close(stats["mia_zlib"], want["nll"] / zlib_len, **tol)


def test_min_k_at_100_percent_is_the_mean_negative_log_prob():
    batch = _masked_batch([7, 7], [2, 4], 10, seed=3)
    logits = torch.randn(2, 7, 10, generator=torch.Generator().manual_seed(4))
    stats = ev.answer_statistics(FixedLogits(logits), [batch], k=1.0)
    torch.testing.assert_close(stats["mia_min_k"], stats["nll"], rtol=1e-12, atol=1e-12)
    assert "mia_zlib" not in stats  # no texts given


def test_statistics_are_in_batch_order_across_batches_and_wrappers_agree():
    vocab = 9
    batches = [_masked_batch([6, 5], [2, 2], vocab, seed=5), _masked_batch([7], [3], vocab, seed=6)]
    model = PeekModel(vocab, misses=[3])
    stats = ev.answer_statistics(model, batches)
    assert stats["nll"].shape == (3,)
    torch.testing.assert_close(ev.answer_nll(model, batches), stats["nll"])
    torch.testing.assert_close(ev.exact_memorization(model, batches), stats["exact_memorization"])
    torch.testing.assert_close(ev.extraction_strength(model, batches), stats["extraction_strength"])
    scores = ev.mia_scores(model, batches, texts=["a b", "c d", "e f"], k=0.4)
    assert set(scores) == {"loss", "zlib", "min_k", "min_k_plus_plus"}
    # sample 0 scores t = 1..4 and misses t = 3 (EM 3/4); sample 1 scores t = 1..3 and misses t = 3 (EM 2/3)
    torch.testing.assert_close(stats["exact_memorization"][:2], torch.tensor([0.75, 2 / 3], dtype=torch.float64))


def test_eval_mode_inside_and_training_flag_restored():
    model = FixedLogits(torch.randn(1, 5, 6)).train()
    ev.answer_statistics(model, [_masked_batch([5], [2], 6, seed=7)])
    assert model.seen_training is False and model.training is True


def test_exact_memorization_and_extraction_strength_of_a_model_that_predicts_the_labels_are_one():
    batch = _masked_batch([8, 6], [3, 2], 11, seed=8)
    stats = ev.answer_statistics(PeekModel(11), [batch])
    assert stats["exact_memorization"].tolist() == [1.0, 1.0]
    assert stats["extraction_strength"].tolist() == [1.0, 1.0]


# prompt of 2 tokens, answer of 4 at positions 2..5, predicted at t = 1..4 (answer token j at t = 1 + j)
@pytest.mark.parametrize("missed_tokens, em, es", [
    ((), 1.0, 1.0),           # nothing needed: the question alone extracts the answer
    ((0,), 0.75, 0.75),       # given the first answer token, greedy gives the other 3
    ((1,), 0.75, 0.5),        # 2 tokens needed
    ((0, 2), 0.5, 0.25),
    ((3,), 0.75, 0.25),       # the last token is missed: open-unlearning's k stops at n - 1 = 3, so 1 - 3/4
    ((0, 1, 2, 3), 0.0, 0.25),  # an unknown answer: the same 1/n
])
def test_extraction_strength_is_one_minus_the_shortest_prefix_share(missed_tokens, em, es):
    batch = _masked_batch([6], [2], 10, seed=9)
    stats = ev.answer_statistics(PeekModel(10, misses=[1 + j for j in missed_tokens]), [batch])
    assert stats["exact_memorization"].item() == pytest.approx(em)
    assert stats["extraction_strength"].item() == pytest.approx(es)


def test_extraction_strength_of_a_missed_one_token_answer_is_one_as_open_unlearning_counts_it():
    # open-unlearning's loop over k in range(n) ends at k = 0 when n = 1, whatever the prediction: 1 - 0/1
    batch = _masked_batch([3], [2], 10, seed=9)
    stats = ev.answer_statistics(PeekModel(10, misses=[1]), [batch])
    assert stats["exact_memorization"].item() == 0.0 and stats["extraction_strength"].item() == 1.0


# ---- truth ratio, forget quality, utility --------------------------------------------------------------------------

def test_truth_ratio_of_equal_paraphrased_and_perturbed_probabilities_is_one():
    ratios = ev.truth_ratios([0.3, 1.7, 4.0], [[0.3, 0.3], [1.7, 1.7, 1.7], [4.0]])  # ragged rows allowed
    torch.testing.assert_close(ratios, torch.ones(3, dtype=torch.float64))
    assert ev.truth_ratio_score(ratios, "closer_to_1_better") == pytest.approx(1.0)
    assert ev.truth_ratio_score(ratios, "true_better") == pytest.approx(0.0)


def test_truth_ratio_known_values_and_aggregators():
    # para NLL 0.5; perturbed NLLs 1 and 2 average (in log space) to 1.5: R = exp(0.5 - 1.5)
    ratios = ev.truth_ratios(torch.tensor([0.5, 2.0]), torch.tensor([[1.0, 2.0], [1.0, 1.0]]))
    want = torch.tensor([math.exp(-1.0), math.exp(1.0)], dtype=torch.float64)
    torch.testing.assert_close(ratios, want)
    assert ev.truth_ratio_score(ratios, "closer_to_1_better") == pytest.approx(math.exp(-1.0))
    assert ev.truth_ratio_score(ratios, "true_better") == pytest.approx((1 - math.exp(-1.0) + 0.0) / 2)


def test_forget_quality_is_the_ks_p_value():
    pytest.importorskip("scipy")
    gen = torch.Generator().manual_seed(10)
    ratios = torch.rand(30, generator=gen, dtype=torch.float64) + 0.1
    assert ev.forget_quality(ratios, ratios) == pytest.approx(1.0)
    # two disjoint samples of 20: the exact two-sided p-value is 2 / C(40, 20)
    low, high = torch.linspace(0.1, 0.5, 20), torch.linspace(2.0, 3.0, 20)
    assert ev.forget_quality(low, high) == pytest.approx(2 / math.comb(40, 20), rel=1e-6)
    # KS is invariant to a monotone map of both samples: R and open-unlearning's 1/R agree
    other = torch.rand(25, generator=gen, dtype=torch.float64) + 0.2
    assert ev.forget_quality(1 / ratios, 1 / other) == pytest.approx(ev.forget_quality(ratios, other))


def test_model_utility_is_the_harmonic_mean_and_zero_with_a_zero():
    assert ev.model_utility([0.5, 1.0]) == pytest.approx(2 / 3)
    assert ev.model_utility({"a": 0.2, "b": 0.4, "c": 0.8}) == pytest.approx(3 / (5 + 2.5 + 1.25))
    assert ev.model_utility([0.7, 0.0, 0.9]) == 0.0
    assert ev.model_utility([0.3]) == pytest.approx(0.3)


def test_normalised_answer_probability():
    out = ev.normalised_answer_probability([math.log(2)], [[math.log(4), math.log(4)]])
    torch.testing.assert_close(out, torch.tensor([0.5], dtype=torch.float64))
    # probabilities that underflow float64 still compare: 1 / (1 + e^-1)
    out = ev.normalised_answer_probability(torch.tensor([1000.0]), torch.tensor([[1001.0]]))
    assert out.item() == pytest.approx(1 / (1 + math.exp(-1.0)))


# ---- membership inference ------------------------------------------------------------------------------------------

def test_mia_auc_of_separated_scores_is_one_or_zero():
    pytest.importorskip("sklearn")
    assert ev.mia_auc([0.1, 0.2, 0.3], [0.5, 0.9]) == 1.0  # forget likelier (lower loss): recognised
    assert ev.mia_auc([0.5, 0.9], [0.1, 0.2, 0.3]) == 0.0
    assert ev.mia_auc([0.4, 0.4], [0.4, 0.4]) == 0.5


def test_privleak_follows_muse_sign_convention():
    assert ev.privleak(0.5, 0.5) == 0.0
    assert ev.privleak(1.0, 0.5) == pytest.approx(-100.0)  # forget set fully recognised: under-unlearned
    assert ev.privleak(0.25, 0.5) == pytest.approx(50.0)   # over-unlearned
    assert ev.privleak(0.9, 0.6) == pytest.approx((0.1 - 0.4) / 0.4 * 100)


# ---- ROUGE ---------------------------------------------------------------------------------------------------------

def test_rouge_l_recall_and_f1_on_known_strings():
    pytest.importorskip("rouge_score")
    predictions = ["the cat sat", "the cat sat on the mat", "", "cats running", "mat the on"]
    references = ["the cat sat on the mat"] * 2 + ["anything", "cat run", "the mat on"]
    # LCS 3 of 6 (all 3 of the prediction's); identical; empty; equal after stemming; "mat the on" vs "the mat on":
    # LCS 2 ("the on" or "mat on") of 3 on both sides
    torch.testing.assert_close(ev.rouge_l(predictions, references),
                               torch.tensor([0.5, 1.0, 0.0, 1.0, 2 / 3], dtype=torch.float64))
    torch.testing.assert_close(ev.rouge_l(predictions, references, "f1"),  # MUSE's: 2 P R / (P + R)
                               torch.tensor([2 / 3, 1.0, 0.0, 1.0, 2 / 3], dtype=torch.float64))


# ---- bad inputs ----------------------------------------------------------------------------------------------------

def test_bad_inputs_raise_errors_naming_the_parameter():
    batch = _masked_batch([5], [2], 6, seed=11)
    model = FixedLogits(torch.randn(1, 5, 6))
    with pytest.raises(ValueError, match="k must"):
        ev.answer_statistics(model, [batch], k=0.0)
    with pytest.raises(ValueError, match="batches is empty"):
        ev.answer_statistics(model, [])
    with pytest.raises(ValueError, match="model must"):
        ev.answer_nll("not a model", [batch])
    unscored = dict(batch, labels=torch.full_like(batch["labels"], IGNORE))
    with pytest.raises(ValueError, match="no scored token"):
        ev.answer_nll(model, [unscored])
    with pytest.raises(ValueError, match="texts has 2"):
        ev.answer_statistics(model, [batch], texts=["a", "b"])
    with pytest.raises(ValueError, match="perturbed_nll has 1 rows"):
        ev.truth_ratios([0.1, 0.2], [[0.3]])
    with pytest.raises(ValueError, match="aggregator"):
        ev.truth_ratio_score([1.0], "mean")
    with pytest.raises(ValueError, match="holdout_scores"):
        ev.mia_auc([0.1], [])
    with pytest.raises(ValueError, match="reference_auc is 1"):
        ev.privleak(0.5, 1.0)
    with pytest.raises(ValueError, match=r"values\[1\]"):
        ev.model_utility([0.5, -0.1])
    with pytest.raises(ValueError, match="predictions .1. and references .2."):
        ev.rouge_l(["a"], ["a", "b"])
    with pytest.raises(ValueError, match="measure must be one of 'recall', 'f1'"):
        ev.rouge_l(["a"], ["a"], "precision")
    with pytest.raises(ValueError, match="exclude_last must be True or False"):
        ev.answer_statistics(model, [batch], exclude_last=3)


# ---- on a tiny random Llama ----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny():
    pytest.importorskip("transformers")
    pytest.importorskip("tokenizers")
    from llm_helpers import tiny_llama, tiny_tokenizer

    return tiny_llama(0), tiny_tokenizer()


def test_qa_batches_mask_the_question_and_pad_right(tiny):
    from semu_fast.workflows.llm_data import encode_qa

    _, tok = tiny
    vocab = tok.get_vocab()
    raw = ev._qa_batches(tok, ["w1 w2 w3", "w4"], ["w5 w6", "w7 w8 w9"], batch_size=2, framing="raw")[0]
    assert raw["input_ids"][0].tolist() == [2] + [vocab[w] for w in "w1 w2 w3 w5 w6".split()]
    assert raw["labels"][0].tolist() == [IGNORE] * 4 + [vocab["w5"], vocab["w6"]]
    assert raw["labels"][1].tolist() == [IGNORE] * 2 + [vocab[w] for w in "w7 w8 w9".split()] + [IGNORE]
    assert raw["attention_mask"][1].tolist() == [1] * 5 + [0]
    # "qa": the training framing of llm_data, answer ending with EOS
    qa = ev._qa_batches(tok, ["w1 w2 w3"], ["w5 w6"])[0]
    ids, n_prompt = encode_qa(tok, "w1 w2 w3", "w5 w6")
    assert qa["input_ids"][0].tolist() == ids and ids[-1] == tok.eos_token_id
    assert qa["labels"][0].tolist() == [IGNORE] * n_prompt + ids[n_prompt:]


@pytest.mark.parametrize("framing", ["qa", "raw"])
def test_answer_nll_with_padding_equals_the_unpadded_answer_loss(tiny, framing):
    model, tok = tiny
    questions, answers = ["w1 w2 w3 w4", "w5", "w6 w7"], ["w8 w9", "w10 w11 w12 w13", "w14"]
    got = ev.answer_nll(model, ev._qa_batches(tok, questions, answers, batch_size=3, framing=framing))
    for i, (q, a) in enumerate(zip(questions, answers)):
        ids, n_prompt = ev._encode(tok, q, a, framing, None)
        ids = torch.tensor([ids])
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0, :-1].double()
        want = F.cross_entropy(logits[n_prompt - 1:], ids[0, n_prompt:])
        assert got[i].item() == pytest.approx(want.item(), rel=1e-4)


def test_exclude_last_keeps_the_last_token_in_the_loss_but_not_in_the_token_wise_statistics():
    vocab = 10
    batch = _masked_batch([6], [2], vocab, seed=12)
    model = PeekModel(vocab, misses=[4])  # misses only the last scored token (predicted at t = 4)
    plain = ev.answer_statistics(model, [batch], k=1.0)
    skip = ev.answer_statistics(model, [batch], k=1.0, exclude_last=True)
    assert plain["exact_memorization"].item() == pytest.approx(0.75) and plain["extraction_strength"].item() == 0.25
    assert skip["exact_memorization"].item() == 1.0 and skip["extraction_strength"].item() == 1.0
    torch.testing.assert_close(skip["nll"], plain["nll"])  # the EOS stays in the answer loss
    assert skip["mia_min_k"].item() < plain["mia_min_k"].item()  # its (low) log-prob left Min-K


def test_generate_answers_batched_with_left_padding_equals_one_at_a_time(tiny):
    model, tok = tiny
    questions = ["w1 w2 w3 w4 w5", "w6", "w7 w8 w9"]
    for framing in ("qa", "raw"):
        batched = ev.generate_answers(model, tok, questions, max_new_tokens=5, batch_size=3, framing=framing)
        single = [ev.generate_answers(model, tok, [q], max_new_tokens=5, framing=framing)[0] for q in questions]
        assert batched == single
    # greedy by hand for the first question, raw framing
    ids = torch.tensor([tok(questions[0])["input_ids"]])
    with torch.no_grad():
        for _ in range(5):
            nxt = model(input_ids=ids).logits[0, -1].argmax()
            if nxt.item() == tok.eos_token_id:
                break
            ids = torch.cat([ids, nxt.view(1, 1)], dim=1)
    assert batched[0] == tok.decode(ids[0, 6:].tolist(), skip_special_tokens=True).strip()


def test_generation_stops_at_the_model_s_context(tiny):
    model, tok = tiny  # 64 positions, against evaluate_llm's default of 200 new tokens
    prompt = len(tok("Question: w1 w2 w3\nAnswer:")["input_ids"])
    answer = ev.generate_answers(model, tok, ["w1 w2 w3"], max_new_tokens=200)[0]
    assert 0 < len(tok(answer, add_special_tokens=False)["input_ids"]) <= 64 - prompt + 1


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_evaluate_llm_refuses_sequences_past_the_model_s_context_naming_split_and_max_length(tiny, arch):
    """GPT-2 failed with a bare IndexError in its position embedding, Llama scored them silently."""
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    from llm_helpers import VOCAB

    _, tok = tiny
    torch.manual_seed(0)
    if arch == "gpt2":
        model = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=len(VOCAB), n_positions=16))
    else:
        model = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                             num_attention_heads=2, vocab_size=len(VOCAB), max_position_embeddings=16))
    long_answer = " ".join(f"w{i}" for i in range(30))
    forget = {"questions": ["w1 w2", "w3"], "answers": ["w4", long_answer]}
    with pytest.raises(ValueError, match=r"forget\['answers'\] hold sequences of \d+ tokens, more than the model's 16 "
                                         r"positions \(config.max_position_embeddings\): give max_length <= 16"):
        ev.evaluate_llm(model.eval(), tok, forget, generate=False)
    assert ev.evaluate_llm(model, tok, forget, generate=False, max_length=16)["forget_answer_prob"] > 0
    with pytest.raises(ValueError, match=r"questions \(framed, plus one new token\) hold sequences of \d+ tokens, "
                                         r"more than the model's 16 positions"):
        ev.generate_answers(model, tok, [long_answer], max_new_tokens=2)


def test_evaluate_llm_smoke_on_tiny_llama(tiny):
    pytest.importorskip("scipy")
    pytest.importorskip("sklearn")
    pytest.importorskip("rouge_score")
    from llm_helpers import random_texts, tiny_llama

    model, tok = tiny
    model.train()

    def split(seed, n=4):
        questions, answers = random_texts(n, seed, max_len=6), random_texts(n, seed + 1, max_len=6)
        return {"questions": questions, "answers": answers, "paraphrased_answers": random_texts(n, seed + 2),
                "perturbed_answers": [random_texts(2 + i % 2, seed + 3 + i, max_len=5) for i in range(n)]}

    forget, retain, holdout = split(0), split(20), split(40)
    authors, facts = split(60), split(80)
    metrics = ev.evaluate_llm(model, tok, forget, retain=retain, holdout=holdout, real_authors=authors,
                              world_facts=facts, reference_model=tiny_llama(1), max_new_tokens=3, batch_size=8)
    assert model.training  # restored
    utility_keys = [f"{name}_{metric}" for name, metrics in (
        ("retain", ("answer_prob", "rougeL_recall", "truth_ratio")),
        ("real_authors", ("prob_normalised", "rougeL_recall", "truth_ratio")),
        ("world_facts", ("prob_normalised", "rougeL_recall", "truth_ratio"))) for metric in metrics]
    assert set(metrics) == {
        "forget_answer_prob", "forget_exact_memorization", "forget_extraction_strength", "forget_rougeL_recall",
        "forget_truth_ratio", "forget_quality", *utility_keys,
        "model_utility", "mia_loss_auc", "mia_zlib_auc", "mia_min_k_auc", "mia_min_k_plus_plus_auc", "privleak"}
    for key, value in metrics.items():
        assert isinstance(value, float) and math.isfinite(value), key
        if key != "privleak":
            assert 0.0 <= value <= 1.0, key
    # TOFU's model utility: the harmonic mean of all nine
    assert metrics["model_utility"] == pytest.approx(ev.model_utility([metrics[k] for k in utility_keys]))
    # real authors: the answer against its wrong options (not the paraphrase, which these sets do not have)
    model.eval()
    nll = [ev.answer_nll(model, ev._qa_batches(tok, [q] * (1 + len(wrong)), [a, *wrong]))
           for q, a, wrong in zip(authors["questions"], authors["answers"], authors["perturbed_answers"])]
    want = ev.normalised_answer_probability(torch.stack([n[0] for n in nll]), [n[1:] for n in nll])
    assert metrics["real_authors_prob_normalised"] == pytest.approx(float(want.mean()), rel=1e-6)
    ratios = ev.truth_ratios(torch.stack([n[0] for n in nll]), [n[1:] for n in nll])
    assert metrics["real_authors_truth_ratio"] == pytest.approx(ev.truth_ratio_score(ratios, "true_better"), rel=1e-6)
    # the same model as its own reference: identical truth ratios (KS p = 1) and no privacy leak
    same = ev.evaluate_llm(model.eval(), tok, forget, holdout=holdout, reference_model=model, generate=False,
                           framing="raw")
    assert same["forget_quality"] == pytest.approx(1.0) and same["privleak"] == pytest.approx(0.0)
    assert "forget_rougeL_recall" not in same and "model_utility" not in same


@pytest.mark.parametrize("framing", ["qa", "raw"])
def test_evaluate_llm_token_wise_statistics_leave_out_the_last_token_as_open_unlearning(tiny, framing):
    model, tok = tiny
    questions, answers = ["w1 w2", "w3"], ["w4 w5 w6", "w7 w8"]
    got = ev.evaluate_llm(model, tok, {"questions": questions, "answers": answers}, framing=framing, generate=False)
    stats = ev.answer_statistics(model, ev._qa_batches(tok, questions, answers, framing=framing), exclude_last=True)
    assert got["forget_exact_memorization"] == pytest.approx(float(stats["exact_memorization"].mean()))
    assert got["forget_answer_prob"] == pytest.approx(float(stats["prob"].mean()))  # every token in the loss


def test_evaluate_llm_directions_on_a_model_trained_on_the_forget_and_true_answers():
    """A model fitted to the forget answers and to every true (paraphrased) answer, against the untrained model as
    reference: each metric must move the way its definition says (a swapped sign, ratio or aggregator fails)."""
    pytest.importorskip("scipy")
    pytest.importorskip("sklearn")
    pytest.importorskip("transformers")
    from llm_helpers import random_texts, tiny_llama, tiny_tokenizer
    from semu_fast.workflows import llm

    tok, untrained, model = tiny_tokenizer(), tiny_llama(0), tiny_llama(0)

    def split(seed, n=8):
        return {"questions": random_texts(n, seed, max_len=5), "answers": random_texts(n, seed + 1, max_len=5),
                "paraphrased_answers": random_texts(n, seed + 2, max_len=5),
                "perturbed_answers": [random_texts(2, seed + 3 + i, max_len=5) for i in range(n)]}

    forget, retain, holdout = split(0), split(100), split(200)
    records = [{"question": q, "answer": a} for s, key in ((forget, "answers"), (forget, "paraphrased_answers"),
                                                         (retain, "paraphrased_answers"))
               for q, a in zip(s["questions"], s[key])]
    batches = llm.make_qa_batches(tok, records, 32, len(records))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(60):
        optimizer.zero_grad()
        llm.nll_loss(model, batches[0]).backward()
        optimizer.step()
    model.eval()

    def evaluate(which, reference):
        return ev.evaluate_llm(which, tok, forget, retain=retain, holdout=holdout, reference_model=reference,
                               generate=False)

    trained, base = evaluate(model, untrained), evaluate(untrained, None)
    assert trained["forget_answer_prob"] > 0.5 > base["forget_answer_prob"]
    assert trained["mia_loss_auc"] > 0.9 and trained["mia_min_k_auc"] > 0.9  # the forget set is recognised
    assert trained["privleak"] < -50  # against a reference that does not recognise it (AUC about 0.5)
    # true answers now far likelier than false ones: R = false / true << 1
    assert trained["retain_truth_ratio"] > 0.8 > base["retain_truth_ratio"]  # mean max(0, 1 - R)
    assert trained["forget_truth_ratio"] < 0.2 < base["forget_truth_ratio"]  # mean min(R, 1 / R)
    assert trained["forget_quality"] < 0.01  # its truth ratios are told apart from the reference's


def test_evaluate_llm_rejects_bad_splits_and_double_references(tiny):
    model, tok = tiny
    with pytest.raises(ValueError, match="forget must be a mapping"):
        ev.evaluate_llm(model, tok, {"questions": ["w1"]})
    with pytest.raises(ValueError, match="forget: 2 questions but 1 answers"):
        ev.evaluate_llm(model, tok, {"questions": ["w1", "w2"], "answers": ["w3"]})
    with pytest.raises(ValueError, match="needs both"):
        ev.evaluate_llm(model, tok, {"questions": ["w1"], "answers": ["w3"], "paraphrased_answers": ["w4"]})
    with pytest.raises(ValueError, match="framing must be"):
        ev.evaluate_llm(model, tok, {"questions": ["w1"], "answers": ["w3"]}, framing="chat")
    with pytest.raises(ValueError, match="not both"):
        ev.evaluate_llm(model, tok, {"questions": ["w1"], "answers": ["w3"]}, reference_model=model,
                        reference_auc=0.5)
    with pytest.raises(ValueError, match="reference_auc needs holdout"):
        ev.evaluate_llm(model, tok, {"questions": ["w1"], "answers": ["w3"]}, reference_auc=0.5)
    with pytest.raises(ValueError, match=r"forget\['perturbed_answers'\]\[0\] must be a list"):
        ev.evaluate_llm(model, tok, {"questions": ["w1"], "answers": ["w3"], "paraphrased_answers": ["w4"],
                                     "perturbed_answers": ["w5"]})


def test_evaluate_llm_generates_through_a_semu_model(tiny):
    from llm_helpers import tiny_llama
    from semu_fast.workflows import llm

    model, tok = tiny_llama(0), tiny[1]
    records = [{"question": "w1 w2", "answer": "w3 w4"}, {"question": "w5 w6", "answer": "w7 w8"}]
    sm, _, _ = llm.unlearn_llm(model, llm.make_qa_batches(tok, records, 32, 2), epochs=1, progress=False)
    split = {"questions": [r["question"] for r in records], "answers": [r["answer"] for r in records]}
    out = ev.evaluate_llm(sm, tok, split, max_new_tokens=3)  # SEMUModel forwards calls; generate is the model's
    assert 0.0 <= out["forget_rougeL_recall"] <= 1.0
