"""TOFU-style unlearning on fictitious people, offline (issue 17): does SEMU forget some people's facts while the
others' stay, as well as full-model unlearning does, with a small share of the weights and less memory?

    python benchmarks/quality/llm_fictitious.py [--split 1 5 10] [--methods ...] [--seeds 0] [--json F] [--quick]

The world: fictitious people (a first and a last name from fixed lists), each with four facts (birthplace, job,
birth year, favourite food) drawn with the seed. Every fact is a question/answer pair; its answer uses one of two
sentence templates (drawn per fact), its paraphrased answer the other template, and its perturbed (wrong) answers
the paraphrase's template with other values of the same kind (TOFU's truth ratio compares those). No LLM weights
exist offline, so the model is a small LlamaForCausalLM (random init, word-level tokenizer built from the world's
words, as tests/llm_helpers.py does) trained here to memorise the answers (prompt masked, as make_qa_batches
frames them); it and the retain-only model (trained on every person but those of the largest forget split, 10%
or more if requested: the gold model of forget quality, which has never seen any forget person) are cached under
semu_fast._utils.default_cache(), keyed by their settings. A model of the default size trains in about 10 minutes
on a shared CPU core.

People: `--people` trained (the forget split is the first 1%, 5% or 10% of them; the rest are retain people) and
`--holdout-people` never trained (the MIA's non-members). The retain term of the unlearning sees the facts of the
first `--retain-seen` share of the retain people (retain-seen); the other retain people's facts are held-out
retain facts, which no unlearning step sees (the way TOFU's real-authors / world-facts sets are).

Methods (each a forget objective and its retain term, trained on the same interleaved batches):
    semu-<loss>   SEMU: unlearn_llm (only the k x k cores R train); loss one of npo, graddiff, simnpo, idkdpo,
                  idknll, rmu, ascent, random; npo, simnpo, idkdpo and idknll with the retain NLL term.
    full-ga, full-graddiff, full-npo: every weight trains (Adam), same loss classes; NPO's reference is a frozen
                  copy of the original model, the memory SEMU saves.
Metrics per method: forget quality (KS p-value of the forget set's truth ratios against the retain-only model's),
model utility relative to the original (TOFU's harmonic mean of answer probability, ROUGE-L recall and truth ratio
on retain-seen plus held-out retain facts), greedy-answer ROUGE-L recall on forget / retain-seen / held-out retain,
fact accuracy (the true value in the greedy answer), well-formedness of the forget answers (the answer names a
value of the asked kind: a year for a year question), Min-K% MIA AUC (forget vs holdout; 0.5: indistinguishable),
trainable share, seconds, and training-state memory: the bytes of the tensors a method holds besides the model's
weights while it trains (frozen reference copy, gradients, Adam's two moments, adapters' U / R / Vh), counted from
the tensors themselves (CPU RSS deltas within one process are hidden by the allocator's reuse; activations are the
same order for every method, one forward of the same model, and are not counted)."""
from __future__ import annotations

import copy
import dataclasses
import inspect
import itertools
import os
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Optional

import torch

sys.path.insert(0, str(Path(__file__).parents[1]))
from common import Table, device_name, parser as make_parser  # noqa: E402
from semu_fast._utils import default_cache  # noqa: E402
from semu_fast.workflows import llm, llm_eval as ev, llm_losses as L  # noqa: E402
from semu_fast.workflows.llm_data import IDK_ANSWERS, PLAIN_PROMPT  # noqa: E402

FIRST_NAMES = ("Alba Boris Carla Dario Edda Fabio Greta Hugo Ines Jonas Kira Lukas Mira Nils Olga Pavel Quinn Rosa "
               "Sven Tilda Ugo Vera Wim Xenia Yuri Zora Anton Bea Cyril Dora Emil Fiona Gustav Hanna Ivo Jana "
               "Karl Lena Milo Nora").split()
LAST_NAMES = ("Abel Brandt Costa Dahl Ek Falk Gray Holm Iver Jansen Kovac Lind Moreau Novak Orlov Petit Quast Roth "
              "Stone Thal Ursu Vogel Wolff Xiao Yildiz Zeller Amato Berg Carver Dorn Engel Frost Gallo Hart Ibsen "
              "Juhl Kern Lowe Marsh Nash").split()
CITIES = ("Aberdeen Bologna Cordoba Dresden Eindhoven Florence Geneva Hamburg Innsbruck Krakow Lisbon Lyon Malmo "
          "Naples Oslo Porto Riga Seville Tallinn Utrecht Valencia Warsaw Zagreb Bergen Bruges Cork Delft Gdansk "
          "Leeds Nantes").split()
JOBS = ("baker carpenter chemist dentist editor farmer gardener historian jeweller lawyer mechanic nurse optician "
        "painter pilot plumber potter sailor surgeon tailor teacher translator veterinarian weaver architect "
        "astronomer brewer cartographer glassblower librarian").split()
FOODS = ("apples bread cheese dumplings figs goulash honey lentils mussels noodles olives pancakes paella risotto "
         "salmon tacos waffles yoghurt curry chestnuts").split()
YEARS = [str(y) for y in range(1940, 2000)]

# attribute: (values, question, two answer templates: one is trained, the other is the paraphrase)
ATTRIBUTES = {
    "birthplace": (CITIES, "Where was {name} born ?",
                   ("{name} was born in the city of {value} .", "The birthplace of {name} is {value} .")),
    "job": (JOBS, "What does {name} do for a living ?",
            ("{name} works as a {value} .", "The profession of {name} is {value} .")),
    "year": (YEARS, "In which year was {name} born ?",
             ("{name} was born in the year {value} .", "The birth year of {name} is {value} .")),
    "food": (FOODS, "What is the favourite food of {name} ?",
             ("{name} likes to eat {value} most .", "The favourite food of {name} is {value} .")),
}
SPLITS = (1.0, 5.0, 10.0)
METHODS = ("semu-npo", "semu-graddiff", "semu-simnpo", "semu-idkdpo", "semu-rmu", "full-ga", "full-graddiff",
           "full-npo")
SEMU_LOSSES = ("npo", "graddiff", "simnpo", "idkdpo", "idknll", "rmu", "ascent", "random")
FULL_LOSSES = {"full-ga": "ascent", "full-graddiff": "graddiff", "full-npo": "npo"}
# The goals of issue 17 on the 5% split (forget-quality threshold, utility share of the original's, ...).
GOALS = {"forget_quality": 0.05, "utility": 0.95, "trainable_share": 1.0, "forget_rouge_drop": 50.0,
         "seen_rouge_drop": 5.0, "held_rouge_drop": 15.0}


# ---- the world -----------------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Fact:
    person: int
    attribute: str
    value: str
    question: str
    answer: str
    paraphrased_answer: str
    perturbed_answers: list

    def record(self) -> dict:
        return {"question": self.question, "answer": self.answer}


def make_world(people: int, seed: int, perturbed: int = 3) -> list[list[Fact]]:
    """Facts of `people` fictitious people (four each: see ATTRIBUTES), drawn with the seed: a list per person.
    Names are distinct first + last name pairs; values are drawn uniformly; perturbed answers take distinct wrong
    values of the same kind in the paraphrase's template."""
    if people > len(FIRST_NAMES) * len(LAST_NAMES):
        raise ValueError(f"people: at most {len(FIRST_NAMES) * len(LAST_NAMES)}, got {people}")
    gen = torch.Generator().manual_seed(seed)
    pairs = torch.randperm(len(FIRST_NAMES) * len(LAST_NAMES), generator=gen)[:people].tolist()
    world = []
    for person, pair in enumerate(pairs):
        name = f"{FIRST_NAMES[pair // len(LAST_NAMES)]} {LAST_NAMES[pair % len(LAST_NAMES)]}"
        facts = []
        for attribute, (values, question, templates) in ATTRIBUTES.items():
            order = torch.randperm(len(values), generator=gen).tolist()
            value, wrong = values[order[0]], [values[i] for i in order[1:perturbed + 1]]
            first = int(torch.randint(2, (1,), generator=gen))
            trained, para = templates[first], templates[1 - first]
            facts.append(Fact(person, attribute, value, question.format(name=name),
                              trained.format(name=name, value=value), para.format(name=name, value=value),
                              [para.format(name=name, value=w) for w in wrong]))
        world.append(facts)
    return world


def vocabulary() -> list[str]:
    """Every word the world, the prompt and the refusals use (whitespace-separated), in a fixed order."""
    words = FIRST_NAMES + LAST_NAMES + CITIES + JOBS + FOODS + YEARS
    texts = [q for _, q, _ in ATTRIBUTES.values()] + [t for _, _, ts in ATTRIBUTES.values() for t in ts]
    texts += list(IDK_ANSWERS) + [PLAIN_PROMPT]
    for text in texts:
        words += text.replace("{name}", "").replace("{value}", "").replace("{question}", "").split()
    return list(dict.fromkeys(words))


@dataclasses.dataclass
class Splits:
    forget: list
    retain_seen: list
    retain_held: list
    holdout: list


def make_splits(world: list, trained: int, forget_share: float, seen_share: float) -> Splits:
    """The facts of the first forget_share % of the `trained` people (forget), of the first seen_share of the
    remaining ones (retain-seen: the retain term's), of the other trained people (retain-held) and of the people
    past `trained` (holdout: never trained)."""
    n_forget = max(1, round(trained * forget_share / 100))
    n_seen = max(1, round((trained - n_forget) * seen_share))

    def facts(people):
        return [f for person in people for f in world[person]]

    return Splits(facts(range(n_forget)), facts(range(n_forget, n_forget + n_seen)),
                  facts(range(n_forget + n_seen, trained)), facts(range(trained, len(world))))


# ---- the models ----------------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class ModelSettings:
    hidden: int = 128
    layers: int = 4
    steps: int = 3000
    batch: int = 32
    lr: float = 3e-3

    def key(self) -> str:
        return f"h{self.hidden}-l{self.layers}-steps{self.steps}-b{self.batch}-lr{self.lr:g}"


def save_untrained(folder: Path, settings: ModelSettings, seed: int) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, "[PAD]": 1, "<s>": 2, "</s>": 3}
    vocab.update({w: i + len(vocab) for i, w in enumerate(vocabulary())})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 2)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]",
                                        bos_token="<s>", eos_token="</s>")
    config = LlamaConfig(hidden_size=settings.hidden, intermediate_size=settings.hidden * 8 // 3 // 8 * 8,
                         num_hidden_layers=settings.layers, num_attention_heads=4, num_key_value_heads=4,
                         vocab_size=len(vocab), max_position_embeddings=64, bos_token_id=2, eos_token_id=3,
                         pad_token_id=1, tie_word_embeddings=False)
    torch.manual_seed(seed)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def train_lm(model, batches: list, steps: int, lr: float, seed: int) -> None:
    """Answer-token NLL (the prompt masked) until the facts are memorised: AdamW, cosine decay, random batches."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    model.train()
    for _ in range(steps):
        loss = llm.nll_loss(model, batches[int(torch.randint(len(batches), (1,), generator=gen))])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    model.eval()


def trained_model(cache: Path, name: str, facts: list, settings: ModelSettings, seed: int, device):
    """(model, tokenizer) trained on `facts` (cached in cache / name, written whole then renamed)."""
    folder = cache / name
    if not (folder / "config.json").is_file():
        tmp = folder.with_name(folder.name + f".partial{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        save_untrained(tmp, settings, seed)
        model, tokenizer = llm.load_causal_lm(tmp)
        start = time.perf_counter()
        batches = llm.make_qa_batches(tokenizer, [f.record() for f in facts], 64, settings.batch)
        train_lm(model, batches, settings.steps, settings.lr, seed)
        print(f"trained {name}: {settings.steps} steps on {len(facts)} facts in {time.perf_counter() - start:.0f} s",
              flush=True)
        model.save_pretrained(tmp)
        shutil.rmtree(folder, ignore_errors=True)
        os.replace(tmp, folder)
    return llm.load_causal_lm(folder, device=device)


def original_and_gold(world: list, trained: int, excluded: int, settings: ModelSettings, seed: int, cache: Path,
                      device):
    """((original, tokenizer), gold): the model trained on the facts of the first `trained` people and the
    retain-only one trained on those of people excluded..trained-1 (it never saw the forget people of any split
    up to `excluded` people)."""
    key = f"seed{seed}-people{trained}-{settings.key()}"
    facts = [f for person in world[:trained] for f in person]
    original = trained_model(cache, f"llm-fictitious-original-{key}", facts, settings, seed, device)
    gold, _ = trained_model(cache, f"llm-fictitious-retainonly{excluded}-{key}",
                            [f for f in facts if f.person >= excluded], settings, seed, device)
    return original, gold


# ---- evaluation ----------------------------------------------------------------------------------------------------

KINDS = {attribute: set(values) for attribute, (values, _, _) in ATTRIBUTES.items()}


def qa_batches(tokenizer, questions, answers, batch: int = 64) -> list:
    return llm.make_qa_batches(tokenizer, [{"question": q, "answer": a} for q, a in zip(questions, answers)], 64,
                               batch)


def truth_ratios(model, tokenizer, facts: list) -> torch.Tensor:
    """TOFU's per-fact truth ratio (llm_eval.truth_ratios) of paraphrased vs perturbed answers, float64 (N,)."""
    para = ev.answer_nll(model, qa_batches(tokenizer, [f.question for f in facts],
                                           [f.paraphrased_answer for f in facts]))
    flat = ev.answer_nll(model, qa_batches(tokenizer, [f.question for f in facts for _ in f.perturbed_answers],
                                           [a for f in facts for a in f.perturbed_answers]))
    per = len(facts[0].perturbed_answers)
    return ev.truth_ratios(para, flat.view(len(facts), per))


def as_split(facts: list) -> dict:
    return {"questions": [f.question for f in facts], "answers": [f.answer for f in facts],
            "paraphrased_answers": [f.paraphrased_answer for f in facts],
            "perturbed_answers": [f.perturbed_answers for f in facts]}


@dataclasses.dataclass
class EvalSet:
    """The facts evaluated (retain ones subsampled) and the gold model's numbers on them."""
    forget: list
    retain_seen: list
    retain_held: list
    holdout: list
    gold_truth_ratios: torch.Tensor = None
    gold_auc: float = None


def make_eval_set(splits: Splits, gold, tokenizer, retain_eval: int, seed: int) -> EvalSet:
    gen = torch.Generator().manual_seed(seed)

    def sample(facts):
        if len(facts) <= retain_eval:
            return facts
        return [facts[i] for i in sorted(torch.randperm(len(facts), generator=gen)[:retain_eval].tolist())]

    out = EvalSet(splits.forget, sample(splits.retain_seen), sample(splits.retain_held), splits.holdout)
    out.gold_truth_ratios = truth_ratios(gold, tokenizer, out.forget)
    stats = [ev.answer_statistics(gold, qa_batches(tokenizer, [f.question for f in facts], [f.answer for f in facts]),
                                  exclude_last=True)["mia_min_k"]
             for facts in (out.forget, out.holdout)]
    out.gold_auc = ev.mia_auc(*stats)
    return out


def answers_report(model, tokenizer, facts: list) -> dict:
    """Greedy answers to the facts' questions: ROUGE-L recall (%), fact accuracy (the true value is a word of the
    answer, %) and well-formedness (some value of the asked kind is, %)."""
    answers = ev.generate_answers(model, tokenizer, [f.question for f in facts], max_new_tokens=16, batch_size=64)
    rouge = ev.rouge_l(answers, [f.answer for f in facts])
    words = [set(a.split()) for a in answers]
    return {"rouge": 100 * float(rouge.mean()),
            "accuracy": 100 * statistics.mean(f.value in w for f, w in zip(facts, words)),
            "well_formed": 100 * statistics.mean(bool(KINDS[f.attribute] & w) for f, w in zip(facts, words)),
            "examples": answers[:2]}


def evaluate(model, tokenizer, data: EvalSet) -> dict:
    """Every metric of a model (a transformers causal LM or a SEMUModel) on the evaluation set (see the module
    docstring)."""
    retain = data.retain_seen + data.retain_held
    scores = ev.evaluate_llm(model, tokenizer, as_split(data.forget), retain=as_split(retain),
                             holdout=as_split(data.holdout), reference_truth_ratios=data.gold_truth_ratios,
                             reference_auc=data.gold_auc, generate=False, batch_size=64)
    parts = {name: answers_report(model, tokenizer, facts) for name, facts in
             (("forget", data.forget), ("seen", data.retain_seen), ("held", data.retain_held))}
    n_seen, n_held = len(data.retain_seen), len(data.retain_held)
    retain_rouge = (parts["seen"]["rouge"] * n_seen + parts["held"]["rouge"] * n_held) / (n_seen + n_held) / 100
    utility = ev.model_utility({"prob": scores["retain_answer_prob"], "rouge": retain_rouge,
                                "truth_ratio": scores["retain_truth_ratio"]})
    out = {"forget_quality": scores["forget_quality"], "utility": utility,
           "mia_min_k_auc": scores["mia_min_k_auc"], "privleak": scores["privleak"],
           "forget_truth_ratio": scores["forget_truth_ratio"], "forget_prob": scores["forget_answer_prob"],
           "retain_prob": scores["retain_answer_prob"]}
    for name, part in parts.items():
        out.update({f"{name}_rouge": part["rouge"], f"{name}_acc": part["accuracy"]})
    out["forget_well_formed"] = parts["forget"]["well_formed"]
    out["examples"] = parts["forget"]["examples"]
    return out


# ---- unlearning ----------------------------------------------------------------------------------------------------

@dataclasses.dataclass
class RunSettings:
    """The unlearning settings shared by the methods (SEMU's and the full-model ones' lr apart); SEMU's default to
    unlearn_llm's (llm.DEFAULTS)."""
    target_modules: tuple = llm.DEFAULTS.target_modules
    gamma: float = llm.DEFAULTS.gamma
    semu_lr: float = llm.DEFAULTS.lr
    full_lr: float = 3e-4
    epochs: Optional[int] = None  # None: llm.DEFAULTS.epochs_for(forget batches), for the full-model runs too
    forget_batch: int = 8
    retain_batch: int = 32
    rmu_layer: int = 1
    rmu_steering: float = 20.0
    rmu_alpha: float = 100.0
    npo_beta: float = 0.1
    retain_loss: str = "nll"  # the retain term of every SEMU loss but graddiff and rmu (their own)
    retain_weight: float = 1.0
    select_best: bool = False  # unlearn_llm's epoch selection (off: the last epoch, as the full-model runs)
    retain_tolerance: float = llm.DEFAULTS.retain_tolerance  # the selection's guard: retain perplexity may rise this


def _tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def semu_run(model, tokenizer, splits: Splits, loss: str, settings: RunSettings, seed: int) -> tuple:
    """(semu_model, row): unlearn_llm with `loss` and the retain NLL term (RMU: its own retain term)."""
    alternate = loss in ("idkdpo", "idknll")
    forget = llm.make_qa_batches(tokenizer, [f.record() for f in splits.forget], 64, settings.forget_batch,
                                 alternate=alternate, seed=seed)
    retain = llm.make_qa_batches(tokenizer, [f.record() for f in splits.retain_seen], 64, settings.retain_batch)
    overrides = {}
    if loss == "rmu":
        overrides = dict(layer=settings.rmu_layer, steering_coeff=settings.rmu_steering, alpha=settings.rmu_alpha,
                         seed=seed)
    elif loss in ("npo", "idkdpo"):
        overrides = dict(beta=settings.npo_beta)
    forget_loss = L.make_loss(loss, **overrides) if overrides else loss
    retain_loss = None if loss in ("graddiff", "rmu") else L.make_retain_loss(settings.retain_loss,
                                                                              weight=settings.retain_weight)
    extra = {}
    if "select_best" in inspect.signature(llm.unlearn_llm).parameters:
        extra.update(select_best=settings.select_best, retain_tolerance=settings.retain_tolerance)
    start = time.perf_counter()
    semu_model, report, metrics = llm.unlearn_llm(
        model, forget, retain, target_modules=settings.target_modules, gamma=settings.gamma, forget_loss=forget_loss,
        retain_loss=retain_loss, train_on_retain=True, lr=settings.semu_lr, epochs=settings.epochs, seed=seed,
        progress=False, **extra)
    seconds = time.perf_counter() - start
    adapters = semu_model.adapters.values()
    # held while training: U, Vh and R, and R's gradient and Adam moments (3 x R)
    state = _tensor_bytes(t for a in adapters for t in (a.U, a.Vh, a.R)) + 3 * _tensor_bytes(a.R for a in adapters)
    return semu_model, {"trainable_share": metrics["trainable_share"], "seconds": seconds, "state_MB": state / 2**20,
                        "ranks": [layer.k for layer in report.layers]}


class _Switch(torch.nn.Module):
    """The trained model, or its frozen copy while `use_frozen` is set: the full-model baselines' reference."""

    def __init__(self, model, frozen):
        super().__init__()
        self.model, self.use_frozen = model, False
        self.__dict__["frozen"] = frozen  # not a submodule: parameters() are the trained model's

    def forward(self, **kwargs):
        return (self.frozen if self.use_frozen else self.model)(**kwargs)


def _frozen_reference(loss_cls):
    """loss_cls (an llm_losses objective) whose reference is the _Switch's frozen copy instead of the SEMUModel with
    its adapters disabled; cached per batch like the library's (a full model has no adapters to disable)."""

    class Full(loss_cls):
        def _reference(self, model, batch, compute):
            cache = self.__dict__.setdefault("_values", {})
            hit = cache.get(id(batch))
            if hit is not None and hit[0] is batch:
                return hit[1]
            model.use_frozen = True
            try:
                with torch.no_grad():
                    value = compute()
            finally:
                model.use_frozen = False
            cache[id(batch)] = (batch, value)
            return value

    return Full


def full_run(model, tokenizer, splits: Splits, method: str, settings: RunSettings, seed: int) -> tuple:
    """(model, row): every weight trains with Adam on the same interleaved forget / retain batches and loss
    classes as SEMU; GA has no retain term."""
    loss = FULL_LOSSES[method]
    forget = llm.make_qa_batches(tokenizer, [f.record() for f in splits.forget], 64, settings.forget_batch)
    retain = llm.make_qa_batches(tokenizer, [f.record() for f in splits.retain_seen], 64, settings.retain_batch)
    start = time.perf_counter()
    frozen = None
    if loss == "npo":
        frozen = copy.deepcopy(model).eval().requires_grad_(False)
        forget_fn = _frozen_reference(L.NPO)(beta=settings.npo_beta)
    else:
        forget_fn = L.make_loss(loss)
    retain_fn = None if loss == "ascent" else L.RetainNLL()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=settings.full_lr)
    switch, gen = _Switch(model, frozen), torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(settings.epochs if settings.epochs is not None else llm.DEFAULTS.epochs_for(len(forget))):
        for group in itertools.zip_longest(forget, retain if retain_fn is not None else []):
            for fn, batch in zip((forget_fn, retain_fn), group):
                if batch is None:
                    continue
                value = fn(switch, batch, gen)
                opt.zero_grad(set_to_none=True)
                value.backward()
                opt.step()
    model.eval()
    seconds = time.perf_counter() - start
    # held while training: the gradients and Adam's two moments of every weight, and NPO's frozen copy
    state = 3 * _tensor_bytes(params) + (_tensor_bytes(frozen.parameters()) if frozen is not None else 0)
    return model, {"trainable_share": 100.0, "seconds": seconds, "state_MB": state / 2**20}


# ---- the sweep -----------------------------------------------------------------------------------------------------

def run_method(method: str, original, tokenizer, splits: Splits, data: EvalSet, settings: RunSettings,
               seed: int) -> dict:
    model = copy.deepcopy(original)
    if method.startswith("semu-"):
        semu_model, row = semu_run(model, tokenizer, splits, method[len("semu-"):], settings, seed)
        row.update(evaluate(semu_model, tokenizer, data))
    else:
        model, row = full_run(model, tokenizer, splits, method, settings, seed)
        row.update(evaluate(model, tokenizer, data))
    return row


def relative(row: dict, base: dict) -> dict:
    """The row's utility as a share of the original's and its ROUGE drops (% of the original's ROUGE)."""
    def drop(key):
        return 100.0 * (1.0 - row[key] / base[key]) if base[key] > 0 else float("nan")

    return {"utility_rel": row["utility"] / base["utility"], "forget_rouge_drop": drop("forget_rouge"),
            "seen_rouge_drop": drop("seen_rouge"), "held_rouge_drop": drop("held_rouge")}


COLUMNS = ("forget_quality", "utility_rel", "forget_rouge", "seen_rouge", "held_rouge", "forget_acc", "seen_acc",
           "held_acc", "forget_rouge_drop", "seen_rouge_drop", "held_rouge_drop", "forget_well_formed",
           "mia_min_k_auc", "privleak", "trainable_share", "seconds", "state_MB")


def goals(row: dict) -> str:
    """Issue 17's goals checked on one (mean) row: each 'met' or by how much it is missed."""
    checks = [("FQ>=0.05", row["forget_quality"] - GOALS["forget_quality"]),
              ("MU>=0.95", row["utility_rel"] - GOALS["utility"]),
              ("share<1%", GOALS["trainable_share"] - row["trainable_share"]),
              ("forget drop>=50", row["forget_rouge_drop"] - GOALS["forget_rouge_drop"]),
              ("seen drop<=5", GOALS["seen_rouge_drop"] - row["seen_rouge_drop"]),
              ("held drop<=15", GOALS["held_rouge_drop"] - row["held_rouge_drop"])]
    return ", ".join(f"{name} {'met' if margin >= 0 else f'missed by {-margin:.3g}'}" for name, margin in checks)


def main(argv=None):
    parser = make_parser(__doc__, repeats=None)
    parser.add_argument("--split", type=float, nargs="+", default=list(SPLITS), help="forget shares of people, %%")
    parser.add_argument("--methods", nargs="+", default=None,
                        help=f"semu-<{'|'.join(SEMU_LOSSES)}> or {', '.join(FULL_LOSSES)}")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--people", type=int, default=100)
    parser.add_argument("--holdout-people", type=int, default=20)
    parser.add_argument("--retain-seen", type=float, default=0.5, help="share of retain people the retain term sees")
    parser.add_argument("--retain-eval", type=int, default=120, help="retain facts evaluated per part (sampled)")
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--train-steps", type=int, default=800)
    defaults = RunSettings()
    parser.add_argument("--target-modules", nargs="+", default=list(defaults.target_modules))
    parser.add_argument("--gamma", type=float, default=defaults.gamma)
    parser.add_argument("--semu-lr", type=float, default=defaults.semu_lr)
    parser.add_argument("--full-lr", type=float, default=defaults.full_lr)
    parser.add_argument("--epochs", type=int, default=defaults.epochs,
                        help="passes over the forget set (default: unlearn_llm's, about 180 forget steps)")
    parser.add_argument("--npo-beta", type=float, default=defaults.npo_beta)
    parser.add_argument("--rmu-layer", type=int, default=defaults.rmu_layer)
    parser.add_argument("--rmu-steering", type=float, default=defaults.rmu_steering)
    parser.add_argument("--rmu-alpha", type=float, default=defaults.rmu_alpha)
    parser.add_argument("--retain-loss", choices=("nll", "kl"), default=defaults.retain_loss,
                        help="SEMU's retain term (graddiff and rmu keep their own)")
    parser.add_argument("--retain-weight", type=float, default=defaults.retain_weight)
    parser.add_argument("--select-best", action="store_true",
                        help="let unlearn_llm keep its best epoch (default: the last, as the full-model runs)")
    parser.add_argument("--retain-tolerance", type=float, default=defaults.retain_tolerance,
                        help="with --select-best: the share by which the retain perplexity may rise in a kept epoch")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a shared CPU)")
    parser.add_argument("--cache-dir", type=Path, default=default_cache())
    args = parser.parse_args(argv)
    model_settings = ModelSettings(hidden=args.hidden, layers=args.layers, steps=args.train_steps, batch=64)
    if args.quick:
        args.split, args.seeds, args.people, args.holdout_people, args.retain_eval = [10.0], args.seeds[:1], 10, 4, 8
        args.epochs, args.rmu_layer = 1, 0
        args.methods = args.methods or ["semu-npo", "full-npo"]
        model_settings = ModelSettings(hidden=32, layers=2, steps=20, batch=16)
        args.cache_dir = args.cache_dir / "quick"
    args.methods = args.methods or list(METHODS)
    for method in args.methods:
        if method not in FULL_LOSSES and not (method.startswith("semu-") and method[5:] in SEMU_LOSSES):
            parser.error(f"--methods: unknown method {method!r}")
    settings = RunSettings(target_modules=tuple(args.target_modules), gamma=args.gamma, semu_lr=args.semu_lr,
                           full_lr=args.full_lr, epochs=args.epochs, rmu_layer=args.rmu_layer,
                           rmu_steering=args.rmu_steering, rmu_alpha=args.rmu_alpha, npo_beta=args.npo_beta,
                           retain_loss=args.retain_loss, retain_weight=args.retain_weight,
                           select_best=args.select_best, retain_tolerance=args.retain_tolerance)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    args.cache_dir.mkdir(parents=True, exist_ok=True)
    # the gold model leaves out the people of the largest default split (or of a larger one requested), so one
    # cached retain-only model serves every split
    excluded = max(1, round(args.people * max(args.split + [max(SPLITS)]) / 100))
    runs = Table(f"Unlearning fictitious people on a {model_settings.layers}-layer Llama (hidden "
                 f"{model_settings.hidden}), {args.people} people, every run "
                 f"({device_name(device)})", args.json)
    results = {}
    for seed in args.seeds:
        world = make_world(args.people + args.holdout_people, seed)
        (original, tokenizer), gold = original_and_gold(world, args.people, excluded, model_settings, seed,
                                                        args.cache_dir, device)
        for share in args.split:
            splits = make_splits(world, args.people, share, args.retain_seen)
            data = make_eval_set(splits, gold, tokenizer, args.retain_eval, seed)
            base = evaluate(original, tokenizer, data)
            base.update(trainable_share=0.0, seconds=0.0, state_MB=0.0)
            for method, row in [("original", base), ("retain-only", None)] + [(m, None) for m in args.methods]:
                if method == "retain-only":
                    row = evaluate(gold, tokenizer, data)
                    row.update(trainable_share=100.0, seconds=0.0, state_MB=0.0)
                elif row is None:
                    row = run_method(method, original, tokenizer, splits, data, settings, seed)
                row.update(relative(row, base))
                results.setdefault((share, method), []).append(row)
                runs.add({"split %": share, "seed": seed, "method": method,
                          **{k: round(row[k], 4) for k in COLUMNS}, "forget answers": " / ".join(row["examples"])})
    runs.close()
    summary = Table(f"Unlearning fictitious people: mean over seeds {args.seeds} ({device_name(device)})", args.json)
    for (share, method), rows in results.items():
        mean = {k: statistics.mean(r[k] for r in rows) for k in COLUMNS}
        line = {"split %": share, "method": method, "seeds": len(rows), **{k: round(v, 4) for k, v in mean.items()}}
        line["goals"] = goals(mean) if method not in ("original", "retain-only") else ""
        summary.add(line)
    summary.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
