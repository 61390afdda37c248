"""Offline evaluation of LLM unlearning, measured as TOFU, MUSE and open-unlearning (OU) measure it.

| metric | definition (per sample; reported as the mean) | source |
|---|---|---|
| answer prob | exp(-mean NLL of the answer tokens), question masked: P(a given q)^(1/len a) | TOFU; OU probability |
| truth ratio R | exp(NLL_para - mean_j NLL_pert_j): false over true answer, normalised probs | TOFU; OU truth_ratio |
| forget truth ratio | mean min(R, 1/R) (1: true and false answers equally likely) | OU closer_to_1_better |
| retain truth ratio | mean max(0, 1 - R), the model-utility form | TOFU; OU true_better |
| forget quality | p-value of ks_2samp(R unlearned, R retain-only model) on forget | TOFU; OU ks_test |
| normalised prob | p_true / (p_true + sum p_false), real authors / world facts | TOFU; OU probability_w_options |
| model utility | harmonic mean of the utility numbers given, 0 if any is 0 | TOFU; OU hm_aggregate |
| ROUGE-L | rouge_score rougeL (stemmed) of the greedy answer vs the true one: recall (TOFU), F1 (MUSE) | OU rouge |
| exact memorization | share of answer tokens whose teacher-forced argmax is the label | Tirumala et al. 2022; OU |
| extraction strength | 1 - k/n, k (<= n - 1) the fewest answer tokens greedy needs for the rest (*) | Wang+ 2025; OU |
| MIA LOSS | answer NLL | Yeom et al. 2018; OU |
| MIA ZLib | answer NLL / len(zlib.compress(answer text)) | Carlini et al. 2021; OU |
| MIA Min-K% | -(mean of the max(1, int(k n)) lowest answer-token log-probs) | Shi et al. 2024; OU |
| MIA Min-K%++ | Min-K% of the log-probs standardised by the model's next-token distribution | Zhang et al. 2024; OU |
| MIA AUC | roc_auc_score, holdout = class 1: 1.0 when the forget set is always likelier | OU mia_auc |
| privleak | (A - A_ref) / A_ref * 100, A = 1 - MIA AUC (unlearned; A_ref: retain-only) | MUSE; OU privleak |

(*) As open-unlearning computes it: its loop over k stops at n - 1, so a sample whose last token is missed scores
1/n, not 0 (a one-token answer scores 1 either way); kept for numbers comparable with published ones.
Token-wise statistics (exact memorization, extraction strength, Min-K%, Min-K%++) leave out each sample's last
scored token in evaluate_llm, as open-unlearning does (the EOS of a qa answer; a raw text's last token); the
NLL-based ones (prob, LOSS, ZLib, truth ratio) score every token. Generation defaults follow open-unlearning: up
to 200 new tokens for qa framing (TOFU), 128 for raw (MUSE verbmem; MUSE knowmem uses 32).

Every MIA score is signed as a loss: higher means "less likely a member". Per-sample functions take batches as
llm_data makes them (dicts of (B, T) input_ids / attention_mask / labels, -100 on the prompt and padding) and
return float64 CPU tensors (N,), in batch order; they run in eval mode without gradients and restore the model's
mode. `evaluate_llm` takes strings, frames question/answer pairs as training does (llm_data.encode_qa) or raw
(MUSE), and returns the flat dict of floats that goes into metrics.json.

transformers (generation), scipy (KS test), scikit-learn (AUC) and rouge-score are imported inside the functions
that need them.
"""
from __future__ import annotations

import math
import zlib
from collections.abc import Iterable, Mapping, Sequence
from typing import Optional, Union

import torch
import torch.nn as nn

from .._checks import check_choice, check_positive_int
from .._utils import eval_mode, model_device
from ..model import base_model
from .llm_data import IGNORE_INDEX, check_batches, check_context, check_texts, context_length, encode_qa
from .llm_losses import _logits_and_targets

TRUTH_RATIO_AGGREGATORS = ("closer_to_1_better", "true_better")
FRAMINGS = ("qa", "raw")
ROUGE_MEASURES = {"recall": "recall", "f1": "fmeasure"}  # ours -> rouge_score's field
# open-unlearning's defaults per framing: TOFU (qa) scores ROUGE-L recall of up to 200 new tokens, MUSE (raw)
# ROUGE-L F1 of up to 128 (verbmem; its knowmem questions use 32).
GENERATION_DEFAULTS = {"qa": ("recall", 200), "raw": ("f1", 128)}
MIA_ATTACKS = ("loss", "zlib", "min_k", "min_k_plus_plus")
# open-unlearning's TOFU and MUSE configs, and MUSE's own privleak key (Min-40%), score privleak with Min-K% at 40%.
DEFAULT_MIN_K = 0.4
Batch = dict
Scores = Union[torch.Tensor, Sequence[float]]


# ---- checks --------------------------------------------------------------------------------------------------------

def _check_k(k) -> float:
    if isinstance(k, bool) or not isinstance(k, (int, float)) or not 0.0 < k <= 1.0:
        raise ValueError(f"k must be a share in (0, 1] (0.4 is Min-40%), got {k!r}")
    return float(k)


def _check_model(model) -> None:
    if not isinstance(model, nn.Module):
        raise ValueError(f"model must be a torch.nn.Module (a transformers causal LM), got {type(model).__name__}")


def _scores(name: str, values, minimum: int = 1) -> torch.Tensor:
    """values as a 1-D float64 CPU tensor without NaN (inf allowed: a probability that underflowed)."""
    try:
        scores = torch.as_tensor(values, dtype=torch.float64).detach().cpu()
    except (TypeError, ValueError, RuntimeError):
        raise ValueError(f"{name} must be a 1-D sequence of numbers, got {type(values).__name__}") from None
    if scores.dim() != 1 or scores.numel() < minimum:
        raise ValueError(f"{name} must be a 1-D sequence of at least {minimum} numbers, got shape "
                         f"{tuple(scores.shape)}")
    if torch.isnan(scores).any():
        raise ValueError(f"{name} holds NaN")
    return scores


def _row_means(name: str, rows, n: int) -> torch.Tensor:
    """Per-row means of an (n, P) tensor or of n non-empty sequences (ragged allowed), float64 (n,)."""
    if isinstance(rows, torch.Tensor):
        if rows.dim() != 2 or rows.shape[0] != n or rows.shape[1] < 1:
            raise ValueError(f"{name} must be ({n}, P) with P >= 1 (one row per question), got {tuple(rows.shape)}")
        rows = list(rows)
    elif isinstance(rows, (str, bytes)) or not isinstance(rows, Iterable):
        raise ValueError(f"{name} must be a ({n}, P) tensor or {n} sequences of numbers, got {type(rows).__name__}")
    rows = list(rows)
    if len(rows) != n:
        raise ValueError(f"{name} has {len(rows)} rows, expected {n} (one per question)")
    return torch.stack([_scores(f"{name}[{i}]", row).mean() for i, row in enumerate(rows)])


# ---- question/answer batches ---------------------------------------------------------------------------------------

def _pad_id(tokenizer) -> int:
    return next((i for i in (tokenizer.pad_token_id, tokenizer.eos_token_id) if i is not None), 0)


def _check_framing(framing) -> str:
    if framing not in FRAMINGS:
        raise ValueError(f"framing must be one of {', '.join(map(repr, FRAMINGS))}, got {framing!r}")
    return framing


def _encode(tokenizer, question: str, answer: str, framing: str, max_length: Optional[int]) -> tuple[list, int]:
    """(ids, number of prompt tokens). "qa": llm_data.encode_qa, the framing make_qa_batches trains on (the chat
    template, else "Question: ...\nAnswer: ...", the answer ending with EOS). "raw": the question as it is (special
    tokens as the tokenizer adds them) and the answer appended as it is, no EOS (MUSE's prompt / continuation, or a
    whole text after an empty question)."""
    if framing == "qa":
        return encode_qa(tokenizer, question, answer, max_length)
    prompt = list(tokenizer(question)["input_ids"])
    ids = prompt + list(tokenizer(answer, add_special_tokens=False)["input_ids"])
    return (ids if max_length is None else ids[:max_length]), len(prompt)


def _qa_batches(tokenizer, questions: Sequence[str], answers: Sequence[str], batch_size: int = 8,
                max_length: Optional[int] = None, framing: str = "qa") -> list[Batch]:
    """Right-padded batches of question + answer pairs (see _encode for the framing), labels -100 on the prompt and
    the padding, so only the answer is scored. max_length cuts the answer's end; every pair must keep a scored
    token (no pair is skipped: the statistics stay aligned with the strings)."""
    questions = check_texts(questions, "questions", allow_empty=True)
    answers = check_texts(answers, "answers")
    if len(questions) != len(answers):
        raise ValueError(f"questions ({len(questions)}) and answers ({len(answers)}) must have the same length")
    check_positive_int("batch_size", batch_size)
    if max_length is not None:
        check_positive_int("max_length", max_length)
    framing = _check_framing(framing)
    rows = []
    for i, (question, answer) in enumerate(zip(questions, answers)):
        ids, n_prompt = _encode(tokenizer, question, answer, framing, max_length)
        # position 0 is never predicted, so an answer token there (empty prompt, no BOS) scores nothing
        if len(ids) <= max(n_prompt, 1):
            raise ValueError(f"answers[{i}] leaves no answer token to score (prompt of {n_prompt} tokens, "
                             f"max_length={max_length})")
        rows.append((ids, n_prompt))
    pad_id = _pad_id(tokenizer)
    batches = []
    for first in range(0, len(rows), batch_size):
        chunk = rows[first:first + batch_size]
        width = max(len(ids) for ids, _ in chunk)
        input_ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        labels = torch.full((len(chunk), width), IGNORE_INDEX, dtype=torch.long)
        for row, (ids, n_prompt) in enumerate(chunk):
            input_ids[row, :len(ids)] = torch.tensor(ids, dtype=torch.long)
            mask[row, :len(ids)] = 1
            labels[row, n_prompt:len(ids)] = input_ids[row, n_prompt:len(ids)]
        batches.append({"input_ids": input_ids, "attention_mask": mask, "labels": labels})
    return batches


# ---- per-sample statistics (one forward pass per batch) ------------------------------------------------------------

def _min_k(values: torch.Tensor, k: float) -> float:
    count = max(1, int(values.numel() * k))
    return -float(torch.sort(values).values[:count].mean())


def _extraction_strength(correct: torch.Tensor) -> float:
    # Teacher-forced argmax equals greedy decoding as long as every earlier prediction was right, so greedy decoding
    # from prefix k reproduces the rest iff correct[k:] are all true: k is one past the last miss. open-unlearning's
    # loop tries k = 0..n-1 only, so a missed last token gives k = n - 1 (score 1/n), not n: we follow it.
    n = correct.numel()
    misses = torch.nonzero(~correct).flatten()
    k = min(int(misses[-1]) + 1, n - 1) if misses.numel() else 0
    return 1.0 - k / n


@torch.no_grad()
def answer_statistics(model: nn.Module, batches, *, texts: Optional[Sequence[str]] = None,
                      k: float = DEFAULT_MIN_K, exclude_last: bool = False) -> dict[str, torch.Tensor]:
    """Every per-sample statistic of the scored (labelled) tokens, in one forward pass per batch.

    batches: list of dicts with (B, T) input_ids and labels (-100 on the prompt and padding), attention_mask
    optional. texts: the scored text of each sample (for ZLib), in batch order; k: Min-K share in (0, 1].
    exclude_last: each sample's last scored token counts in the NLL (LOSS, ZLib, prob) but not in the token-wise
    statistics (exact memorization, extraction strength, Min-K%, Min-K%++), as open-unlearning scores them (meant for
    the EOS ending a qa answer, applied to raw texts too); a sample with one scored token keeps it. Returns float64
    CPU tensors (N,): "nll" (mean answer NLL), "prob" (exp(-nll)), "exact_memorization", "extraction_strength",
    "mia_loss", "mia_min_k", "mia_min_k_plus_plus", and "mia_zlib" when texts are given."""
    _check_model(model)
    batches = check_batches("batches", batches)
    k = _check_k(k)
    if not isinstance(exclude_last, bool):
        raise ValueError(f"exclude_last must be True or False, got {exclude_last!r}")
    if texts is not None:
        texts = check_texts(texts, "texts")
        samples = sum(batch["input_ids"].shape[0] for batch in batches)
        if len(texts) != samples:
            raise ValueError(f"texts has {len(texts)} strings, the batches {samples} samples")
    columns = {name: [] for name in ("nll", "exact_memorization", "extraction_strength", "mia_min_k",
                                     "mia_min_k_plus_plus")}
    with eval_mode(model):
        for b, batch in enumerate(batches):
            logits, targets = _logits_and_targets(model, batch)
            log_probs = torch.log_softmax(logits, dim=-1)
            for i in range(targets.shape[0]):
                scored = targets[i] != IGNORE_INDEX
                if not scored.any():
                    raise ValueError(f"batches[{b}] sample {i} has no scored token (every label after position 0 "
                                     f"is -100)")
                labels = targets[i][scored]
                dist = log_probs[i][scored].double()  # (n, V)
                token_lp = dist.gather(1, labels[:, None]).squeeze(1)
                correct = (dist.argmax(-1) == labels).cpu()
                probs = dist.exp()
                mu = (probs * dist).sum(-1)
                var = ((probs * dist.square()).sum(-1) - mu.square()).clamp_min(1e-6)
                columns["nll"].append(-float(token_lp.mean()))
                if exclude_last and labels.numel() > 1:
                    token_lp, correct, mu, var = token_lp[:-1], correct[:-1], mu[:-1], var[:-1]
                columns["exact_memorization"].append(float(correct.double().mean()))
                columns["extraction_strength"].append(_extraction_strength(correct))
                columns["mia_min_k"].append(_min_k(token_lp.cpu(), k))
                columns["mia_min_k_plus_plus"].append(_min_k(((token_lp - mu) / var.sqrt()).cpu(), k))
    out = {name: torch.tensor(values, dtype=torch.float64) for name, values in columns.items()}
    out["prob"] = torch.exp(-out["nll"])
    out["mia_loss"] = out["nll"].clone()
    if texts is not None:
        lengths = torch.tensor([len(zlib.compress(t.encode("utf-8"))) for t in texts], dtype=torch.float64)
        out["mia_zlib"] = out["nll"] / lengths
    return out


def answer_nll(model: nn.Module, batches) -> torch.Tensor:
    """Mean NLL (nats) of each sample's scored tokens, float64 (N,): the prompt-masked answer loss. exp(-answer_nll)
    is TOFU's length-normalised answer probability."""
    return answer_statistics(model, batches)["nll"]


def exact_memorization(model: nn.Module, batches) -> torch.Tensor:
    """Share of each sample's scored tokens whose teacher-forced argmax prediction is the label, float64 (N,)."""
    return answer_statistics(model, batches)["exact_memorization"]


def extraction_strength(model: nn.Module, batches) -> torch.Tensor:
    """1 - k/n per sample, float64 (N,): k the smallest number of the n scored tokens that, given with the prompt,
    make greedy decoding reproduce the remaining n - k exactly (1: the answer comes from the prompt alone), at most
    n - 1 as open-unlearning counts it (1/n: not even the last token is reproduced)."""
    return answer_statistics(model, batches)["extraction_strength"]


def mia_scores(model: nn.Module, batches, texts: Sequence[str], k: float = DEFAULT_MIN_K) -> dict[str, torch.Tensor]:
    """The four attacks' scores per sample, float64 (N,) each, keyed "loss", "zlib", "min_k", "min_k_plus_plus";
    signed as losses (higher: less likely a member). texts: each sample's scored text, for ZLib."""
    stats = answer_statistics(model, batches, texts=texts, k=k)
    return {attack: stats[f"mia_{attack}"] for attack in MIA_ATTACKS}


# ---- truth ratio, forget quality, utility --------------------------------------------------------------------------

def truth_ratios(paraphrased_nll: Scores, perturbed_nll) -> torch.Tensor:
    """TOFU's per-sample truth ratio R = exp(NLL_para - mean_j NLL_pert_j), float64 (N,).

    paraphrased_nll: (N,) mean answer NLL of the paraphrased (true) answer; perturbed_nll: (N, P) or N ragged rows
    of the perturbed (false) answers' mean NLL. R < 1: the true answer is more likely. The perturbed answers are
    averaged in log space (a geometric mean of their normalised probabilities), as TOFU's and open-unlearning's code
    do. This R is the statistic of forget_quality; truth_ratio_score aggregates it."""
    para = _scores("paraphrased_nll", paraphrased_nll)
    pert = _row_means("perturbed_nll", perturbed_nll, para.numel())
    return torch.exp(para - pert)


def truth_ratio_score(ratios: Scores, aggregator: str) -> float:
    """Aggregate per-sample truth ratios R (from truth_ratios): "closer_to_1_better" -> mean min(R, 1/R), the forget
    set's score (1 when true and false answers are equally likely); "true_better" -> mean max(0, 1 - R), the
    retain / real-authors / world-facts score that enters model utility."""
    ratios = _scores("ratios", ratios)
    if (ratios < 0).any():
        raise ValueError("ratios must be >= 0 (ratios of probabilities)")
    if aggregator == "closer_to_1_better":
        return float(torch.minimum(ratios, 1.0 / ratios).mean())
    if aggregator == "true_better":
        return float((1.0 - ratios).clamp_min(0.0).mean())
    raise ValueError(f"aggregator must be one of {', '.join(map(repr, TRUTH_RATIO_AGGREGATORS))}, got {aggregator!r}")


def forget_quality(truth_ratios: Scores, reference_truth_ratios: Scores) -> float:
    """TOFU's forget quality: the p-value of the two-sample Kolmogorov-Smirnov test (scipy.stats.ks_2samp) between
    the unlearned model's per-sample truth ratios on the forget set and those of a model trained on the retain set
    only. High (near 1): indistinguishable from the gold model. (The test is invariant to any monotone map of both
    samples, so R and open-unlearning's 1/R give the same p-value.)"""
    from scipy.stats import ks_2samp

    ours = _scores("truth_ratios", truth_ratios)
    reference = _scores("reference_truth_ratios", reference_truth_ratios)
    return float(ks_2samp(ours.numpy(), reference.numpy()).pvalue)


def normalised_answer_probability(correct_nll: Scores, wrong_nll) -> torch.Tensor:
    """TOFU's probability on real authors / world facts, float64 (N,): p_c / (p_c + sum_j p_w_j), p = exp(-mean NLL)
    of the correct answer and of each wrong option (wrong_nll: (N, P) or N ragged rows). Computed in log space, so
    answers whose probabilities underflow still compare."""
    correct = _scores("correct_nll", correct_nll)
    if isinstance(wrong_nll, torch.Tensor) and (wrong_nll.dim() != 2 or wrong_nll.shape[0] != correct.numel()):
        raise ValueError(f"wrong_nll must be ({correct.numel()}, P), got {tuple(wrong_nll.shape)}")
    if isinstance(wrong_nll, (str, bytes)) or not isinstance(wrong_nll, Iterable):
        raise ValueError(f"wrong_nll must be an (N, P) tensor or N sequences, got {type(wrong_nll).__name__}")
    rows = list(wrong_nll)
    if len(rows) != correct.numel():
        raise ValueError(f"wrong_nll has {len(rows)} rows, expected {correct.numel()} (one per question)")
    out = []
    for i, row in enumerate(rows):
        log_p = torch.cat([-correct[i:i + 1], -_scores(f"wrong_nll[{i}]", row)])
        out.append(torch.exp(log_p[0] - torch.logsumexp(log_p, 0)))
    return torch.stack(out)


def model_utility(values: Union[Mapping[str, float], Iterable[float]]) -> float:
    """Harmonic mean of the utility numbers (TOFU: retain answer probability, ROUGE-L recall and truth ratio, the
    same on real authors and world facts, as the caller provides them), 0 if any of them is 0."""
    items = list(values.items()) if isinstance(values, Mapping) else list(enumerate(values))
    if not items:
        raise ValueError("values is empty: give at least one utility number")
    for key, value in items:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
            raise ValueError(f"values[{key!r}] must be a finite number >= 0, got {value!r}")
    if any(value == 0 for _, value in items):
        return 0.0
    return len(items) / sum(1.0 / value for _, value in items)


# ---- membership inference ------------------------------------------------------------------------------------------

def mia_auc(forget_scores: Scores, holdout_scores: Scores) -> float:
    """ROC AUC (sklearn) of telling holdout from forget samples by a loss-like MIA score (higher: less likely):
    1.0 when every forget sample scores below every holdout sample (the forget set is recognised as trained on),
    about 0.5 when they are indistinguishable (open-unlearning's convention)."""
    from sklearn.metrics import roc_auc_score

    forget = _scores("forget_scores", forget_scores)
    holdout = _scores("holdout_scores", holdout_scores)
    labels = torch.cat([torch.zeros(forget.numel()), torch.ones(holdout.numel())])
    return float(roc_auc_score(labels.numpy(), torch.cat([forget, holdout]).numpy()))


def privleak(auc: float, reference_auc: float) -> float:
    """MUSE's PrivLeak, in %: (A - A_ref) / A_ref * 100 with A = 1 - auc, A_ref = 1 - reference_auc (MUSE's AUC
    counts the holdout texts as the positive class, the reverse of mia_auc). auc: the unlearned model's mia_auc on
    forget vs holdout; reference_auc: the retain-only model's. About 0 for a good unlearning; towards -100 when the
    forget set is still recognised (auc near 1, reference near 0.5); positive when over-unlearned."""
    for name, value in (("auc", auc), ("reference_auc", reference_auc)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
            raise ValueError(f"{name} must be an AUC in [0, 1], got {value!r}")
    if reference_auc == 1.0:
        raise ValueError("reference_auc is 1: privleak divides by 1 - reference_auc, undefined")
    return ((1.0 - auc) - (1.0 - reference_auc)) / (1.0 - reference_auc) * 100.0


# ---- generation and ROUGE ------------------------------------------------------------------------------------------

@torch.no_grad()
def generate_answers(model: nn.Module, tokenizer, questions: Sequence[str], max_new_tokens: int = 32,
                     batch_size: int = 8, framing: str = "qa") -> list[str]:
    """Greedy answers (model.generate, do_sample=False) to each question, framed as the scored batches are
    (framing "qa" or "raw", see evaluate_llm), cut at the first EOS and decoded without special tokens, of at most
    max_new_tokens (and no further than the model's max_position_embeddings). Prompts are left-padded here, so the
    tokenizer's padding side does not matter."""
    _check_model(model)
    questions = check_texts(questions, "questions", allow_empty=True)
    check_positive_int("max_new_tokens", max_new_tokens)
    check_positive_int("batch_size", batch_size)
    framing = _check_framing(framing)
    pad_id, eos_id = _pad_id(tokenizer), tokenizer.eos_token_id
    encoded = []
    for i, question in enumerate(questions):
        ids, n_prompt = _encode(tokenizer, question, "", framing, None)  # the prompt does not depend on the answer
        if n_prompt == 0:
            raise ValueError(f"questions[{i}] gives no token to generate from (an empty question needs a tokenizer "
                             f"that adds a BOS token)")
        encoded.append(ids[:n_prompt])
    check_context(model, max(len(ids) for ids in encoded) + 1, "questions (framed, plus one new token)",
                  "shorten the questions")
    device = model_device(model)
    generator = base_model(model)  # SEMUModel forwards calls, not .generate
    answers = []
    with eval_mode(model):
        for first in range(0, len(encoded), batch_size):
            chunk = encoded[first:first + batch_size]
            width = max(len(ids) for ids in chunk)
            input_ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for row, ids in enumerate(chunk):
                input_ids[row, width - len(ids):] = torch.tensor(ids, dtype=torch.long)
                mask[row, width - len(ids):] = 1
            # no further than the model's context (a small model's 64 positions, say, against the default 200)
            context = context_length(generator)
            room = max_new_tokens if context is None else max(1, min(max_new_tokens, context - width))
            output = generator.generate(input_ids=input_ids.to(device), attention_mask=mask.to(device),
                                        max_new_tokens=room, do_sample=False, pad_token_id=pad_id)
            for row in output[:, width:].tolist():
                if eos_id is not None and eos_id in row:
                    row = row[:row.index(eos_id)]
                answers.append(tokenizer.decode(row, skip_special_tokens=True).strip())
    return answers


def rouge_l(predictions: Sequence[str], references: Sequence[str], measure: str = "recall") -> torch.Tensor:
    """ROUGE-L of each prediction against its reference (rouge_score, Porter stemmer, as TOFU, MUSE and
    open-unlearning score it), float64 (N,). measure: "recall" (TOFU: the longest common subsequence's share of the
    reference's tokens) or "f1" (MUSE: its harmonic mean with the share of the prediction's)."""
    from rouge_score import rouge_scorer

    check_choice("measure", measure, tuple(ROUGE_MEASURES))
    predictions = check_texts(predictions, "predictions", allow_empty=True)
    references = check_texts(references, "references")
    if len(predictions) != len(references):
        raise ValueError(f"predictions ({len(predictions)}) and references ({len(references)}) must have the same "
                         f"length")
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    field = ROUGE_MEASURES[measure]
    return torch.tensor([getattr(scorer.score(ref, pred)["rougeL"], field)
                         for pred, ref in zip(predictions, references)], dtype=torch.float64)


# ---- everything at once --------------------------------------------------------------------------------------------

def _check_split(name: str, split, options: bool = False) -> Optional[dict]:
    """The split's strings, checked. options: a real-authors / world-facts split, scored against its wrong options
    ('perturbed_answers' required, 'paraphrased_answers' not used)."""
    if split is None:
        return None
    wanted = "'perturbed_answers'" if options else "optionally 'paraphrased_answers', 'perturbed_answers'"
    if not isinstance(split, Mapping) or "questions" not in split or "answers" not in split:
        raise ValueError(f"{name} must be a mapping with 'questions' and 'answers' (and {wanted}), got "
                         f"{type(split).__name__}")
    questions = check_texts(split["questions"], f"{name}['questions']", allow_empty=True)
    answers = check_texts(split["answers"], f"{name}['answers']")
    if len(questions) != len(answers):
        raise ValueError(f"{name}: {len(questions)} questions but {len(answers)} answers")
    out = {"questions": questions, "answers": answers}
    has_para, has_pert = "paraphrased_answers" in split, "perturbed_answers" in split
    if options and not has_pert:
        raise ValueError(f"{name} needs 'perturbed_answers' (the wrong options: normalised probability and truth "
                         f"ratio)")
    if not options and has_para != has_pert:
        raise ValueError(f"{name}: the truth ratio needs both 'paraphrased_answers' and 'perturbed_answers'")
    if has_pert:
        if not options:
            out["paraphrased_answers"] = check_texts(split["paraphrased_answers"], f"{name}['paraphrased_answers']")
        perturbed = split["perturbed_answers"]
        if isinstance(perturbed, str) or not isinstance(perturbed, Iterable):
            raise ValueError(f"{name}['perturbed_answers'] must be one list of strings per question")
        out["perturbed_answers"] = [check_texts(row, f"{name}['perturbed_answers'][{i}]")
                                    for i, row in enumerate(perturbed)]
        for key in ("paraphrased_answers", "perturbed_answers")[options:]:
            if len(out[key]) != len(questions):
                raise ValueError(f"{name}['{key}'] has {len(out[key])} entries, expected {len(questions)}")
    return out


def evaluate_llm(model: nn.Module, tokenizer, forget: Mapping, *, retain: Optional[Mapping] = None,
                 holdout: Optional[Mapping] = None, real_authors: Optional[Mapping] = None,
                 world_facts: Optional[Mapping] = None, reference_model: Optional[nn.Module] = None,
                 reference_truth_ratios: Optional[Scores] = None, reference_auc: Optional[float] = None,
                 framing: str = "qa", k: float = DEFAULT_MIN_K, max_new_tokens: Optional[int] = None,
                 rouge: Optional[str] = None, batch_size: int = 8, max_length: Optional[int] = None,
                 generate: bool = True) -> dict[str, float]:
    """TOFU / MUSE metrics of `model` as one flat dict of floats for metrics.json.

    forget, retain, holdout: mappings with "questions" and "answers" (lists of strings), and for the truth ratio
    "paraphrased_answers" (one string per question) and "perturbed_answers" (a list of strings per question).
    real_authors, world_facts: TOFU's utility sets, "questions", "answers" and "perturbed_answers" (the wrong options).
    framing: "qa" frames each pair as llm_data.make_qa_batches does for training (chat template, else "Question:
    ... Answer: ...", answer ending with EOS; TOFU); "raw" appends the answer to the question as they are (MUSE:
    a prompt and its continuation, or a whole text after an empty question).
    The retain-only (gold) model: either reference_model (evaluated here) or its numbers: reference_truth_ratios
    (its per-sample truth ratios on the forget set) and reference_auc (its Min-K% mia_auc on forget vs holdout).
    k: Min-K share; generate, max_new_tokens, rouge: greedy generation for ROUGE-L (generate=False skips it;
    max_new_tokens and rouge ("recall" or "f1") default to open-unlearning's for the framing: 200 and recall for
    qa, 128 and F1 for raw); batch_size, max_length: the batches.

    Keys (each present only when its inputs are given; <m> is the ROUGE measure, recall or f1):
        forget_answer_prob, forget_exact_memorization, forget_extraction_strength: means over the forget set;
        forget_rougeL_<m> (generate); forget_truth_ratio: closer_to_1_better (forget paraphrased/perturbed);
        forget_quality: KS p-value against the reference's truth ratios;
        retain_answer_prob, retain_rougeL_<m>, retain_truth_ratio (true_better, retain paraphrased/perturbed);
        real_authors_ and world_facts_ prob_normalised, rougeL_<m>, truth_ratio (true_better, answer/options);
        model_utility: harmonic mean of the retain_, real_authors_ and world_facts_ numbers present (TOFU's, when
        all nine are: comparable with published TOFU model utility only then);
        mia_loss_auc, mia_zlib_auc, mia_min_k_auc, mia_min_k_plus_plus_auc (holdout);
        privleak: from mia_min_k_auc and the reference's (holdout and a reference)."""
    _check_model(model)
    forget = _check_split("forget", forget)
    if forget is None:
        raise ValueError("forget is required")
    retain = _check_split("retain", retain)
    holdout = _check_split("holdout", holdout)
    option_splits = {"real_authors": _check_split("real_authors", real_authors, options=True),
                     "world_facts": _check_split("world_facts", world_facts, options=True)}
    framing = _check_framing(framing)
    k = _check_k(k)
    default_rouge, default_tokens = GENERATION_DEFAULTS[framing]
    max_new_tokens = default_tokens if max_new_tokens is None else max_new_tokens
    check_positive_int("max_new_tokens", max_new_tokens)
    rouge = default_rouge if rouge is None else rouge
    if rouge not in ROUGE_MEASURES:
        raise ValueError(f"rouge must be one of {', '.join(map(repr, ROUGE_MEASURES))} or None, got {rouge!r}")
    check_positive_int("batch_size", batch_size)
    if reference_model is not None:
        _check_model(reference_model)
        if reference_truth_ratios is not None or reference_auc is not None:
            raise ValueError("give reference_model or its numbers (reference_truth_ratios, reference_auc), not both")
    if reference_truth_ratios is not None:
        if "paraphrased_answers" not in forget:
            raise ValueError("reference_truth_ratios needs forget['paraphrased_answers'] and "
                             "forget['perturbed_answers'] (forget quality compares truth ratios)")
        reference_truth_ratios = _scores("reference_truth_ratios", reference_truth_ratios)
    if reference_auc is not None:
        if holdout is None:
            raise ValueError("reference_auc needs holdout (privleak compares MIA AUCs on forget vs holdout)")
        privleak(0.5, reference_auc)  # checks the value now, not after the evaluation

    def batches(which, name, questions, answers):
        out = _qa_batches(tokenizer, questions, answers, batch_size, max_length, framing)
        check_context(which, max(b["input_ids"].shape[1] for b in out), name)
        return out

    def stats(which, name, split):
        return answer_statistics(which, batches(which, f"{name}['answers']", split["questions"], split["answers"]),
                                 texts=split["answers"], k=k, exclude_last=True)

    def option_nlls(which, name, split, true_key):
        """The mean answer NLL of each true answer (N,) and of each question's wrong options (N ragged rows)."""
        true = answer_nll(which, batches(which, f"{name}['{true_key}']", split["questions"], split[true_key]))
        questions = [q for q, row in zip(split["questions"], split["perturbed_answers"]) for _ in row]
        wrong = [a for row in split["perturbed_answers"] for a in row]
        flat = answer_nll(which, batches(which, f"{name}['perturbed_answers']", questions, wrong)).tolist()
        ends = torch.tensor([len(row) for row in split["perturbed_answers"]]).cumsum(0).tolist()
        return true, [flat[end - len(row):end] for end, row in zip(ends, split["perturbed_answers"])]

    def ratios(which, name, split):
        return truth_ratios(*option_nlls(which, name, split, "paraphrased_answers"))

    def rouge_score(split):
        answers = generate_answers(model, tokenizer, split["questions"], max_new_tokens, batch_size, framing)
        return float(rouge_l(answers, split["answers"], rouge).mean())

    metrics: dict[str, float] = {}
    forget_stats = stats(model, "forget", forget)
    metrics["forget_answer_prob"] = float(forget_stats["prob"].mean())
    metrics["forget_exact_memorization"] = float(forget_stats["exact_memorization"].mean())
    metrics["forget_extraction_strength"] = float(forget_stats["extraction_strength"].mean())
    if generate:
        metrics[f"forget_rougeL_{rouge}"] = rouge_score(forget)
    if "paraphrased_answers" in forget:
        forget_ratios = ratios(model, "forget", forget)
        metrics["forget_truth_ratio"] = truth_ratio_score(forget_ratios, "closer_to_1_better")
        if reference_model is not None:
            reference_truth_ratios = ratios(reference_model, "forget", forget)
        if reference_truth_ratios is not None:
            metrics["forget_quality"] = forget_quality(forget_ratios, reference_truth_ratios)

    utility = {}
    if retain is not None:
        utility["retain_answer_prob"] = float(stats(model, "retain", retain)["prob"].mean())
        if generate:
            utility[f"retain_rougeL_{rouge}"] = rouge_score(retain)
        if "paraphrased_answers" in retain:
            utility["retain_truth_ratio"] = truth_ratio_score(ratios(model, "retain", retain), "true_better")
    for name, split in option_splits.items():  # the answer against its wrong options (TOFU)
        if split is not None:
            true, wrong = option_nlls(model, name, split, "answers")
            utility[f"{name}_prob_normalised"] = float(normalised_answer_probability(true, wrong).mean())
            if generate:
                utility[f"{name}_rougeL_{rouge}"] = rouge_score(split)
            utility[f"{name}_truth_ratio"] = truth_ratio_score(truth_ratios(true, wrong), "true_better")
    if utility:
        metrics.update(utility)
        metrics["model_utility"] = model_utility(utility)

    if holdout is not None:
        holdout_stats = stats(model, "holdout", holdout)
        for attack in MIA_ATTACKS:
            metrics[f"mia_{attack}_auc"] = mia_auc(forget_stats[f"mia_{attack}"], holdout_stats[f"mia_{attack}"])
        if reference_model is not None:
            reference_auc = mia_auc(stats(reference_model, "forget", forget)["mia_min_k"],
                                    stats(reference_model, "holdout", holdout)["mia_min_k"])
        if reference_auc is not None:
            metrics["privleak"] = privleak(metrics["mia_min_k_auc"], reference_auc)
    return metrics
