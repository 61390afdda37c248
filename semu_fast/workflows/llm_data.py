"""LLM data: plain texts or question/answer records to batches, and records from JSON / JSONL files.

    records = load_records("forget.jsonl")        # [{"question": ..., "answer": ...}, ...] or [{"text": ...}, ...]
    forget = make_record_batches(tokenizer, records, max_length=256, batch_size=8, alternate=True)

A batch is a dict of (B, T) int64 tensors, right-padded: input_ids, attention_mask and labels (a copy of input_ids
with -100 where nothing is learned). The model predicts token t+1 from tokens <= t, so labels[:, 1:] are the
targets (the losses in llm_losses shift them).

- Plain texts (make_batches): every token but padding is labelled.
- Question/answer records (make_qa_batches): only the answer's tokens are labelled; the prompt's labels are -100.
  The tokenizer's chat template (`tokenizer.chat_template`) frames the pair when it has one (a user turn, then the
  assistant's answer); otherwise the text is "Question: {question}\nAnswer: {answer}". The answer ends with the EOS
  token (as open-unlearning's QA data does), so the model also learns where it stops.
- With alternate=True each QA batch also carries batch["alternate"]: a batch of the same questions (row i to row i)
  with another answer: the record's "alternate" field when it has one, else a refusal drawn from IDK_ANSWERS
  (the "I don't know" targets of IdkDPO / IdkNLL).

Record files: JSONL (one JSON object a line) or JSON (a list of objects). A record holds "question" and "answer"
(strings), optionally "paraphrased_answer" (a string), "perturbed_answer" and "alternate" (a string or a list of
strings), as TOFU's records name them; or a plain "text". All records of a file are of one kind. Other fields are
carried and not read, TOFU's "paraphrased_question" among them (open-unlearning scores it only when its evaluation
is pointed at it with question_key; evaluate_llm takes the questions it is given).
"""
from __future__ import annotations

import json
import warnings
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Optional

import torch

from .._checks import check_positive_int
from ..model import base_model

# the label of a position that is not learned (prompt, padding), as transformers and F.cross_entropy use
IGNORE_INDEX = -100
Batch = dict
PLAIN_PROMPT = "Question: {question}\nAnswer:"
# Refusals for the "I don't know" objectives (ours, in the spirit of TOFU's idk list): plain, varied, answer-free.
IDK_ANSWERS = (
    "I don't know.",
    "I'm not sure.",
    "I don't have that information.",
    "I can't answer that.",
    "I have no idea.",
    "That is not something I know.",
    "I'm afraid I can't help with that.",
    "I don't have an answer to that question.",
    "I am not able to answer that.",
    "Sorry, I don't know the answer.",
)
TEXT_FIELDS = ("question", "answer", "paraphrased_answer")  # the string fields that are read
LIST_FIELDS = ("perturbed_answer", "alternate")  # a string or a list of strings


# ---- checks ------------------------------------------------------------------------------------------------------

def check_texts(texts, name: str = "texts", allow_empty: bool = False) -> list:
    """`texts` as a non-empty list of strings, each non-blank unless allow_empty."""
    if isinstance(texts, str) or not isinstance(texts, Iterable):
        raise ValueError(f"{name} must be a list of strings, got {type(texts).__name__}")
    texts = list(texts)
    if not texts:
        raise ValueError(f"{name} is empty: give at least one text")
    for i, text in enumerate(texts):
        if not isinstance(text, str) or (not allow_empty and not text.strip()):
            raise ValueError(f"{name}[{i}] must be a {'' if allow_empty else 'non-blank '}string, got {text!r:.60}")
    return texts


def context_length(model) -> Optional[int]:
    """The most positions the model takes (its config's max_position_embeddings, which GPT-2's n_positions also
    answers to); None when the config names none (rotary models without a limit, say)."""
    context = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    return context if isinstance(context, int) and not isinstance(context, bool) and context > 0 else None


def check_context(model, positions: int, name: str, hint: Optional[str] = None) -> None:
    """ValueError when `name` needs more positions than the model (a SEMUModel or the transformers model) takes:
    an absolute-position model (GPT-2) fails on them with a bare IndexError in its position embedding, a rotary one
    (Llama) scores them silently past its trained range. hint: what to do (default: give max_length <= context)."""
    context = context_length(base_model(model))
    if context is not None and positions > context:
        hint = hint if hint is not None else f"give max_length <= {context}"
        raise ValueError(f"{name} hold sequences of {positions} tokens, more than the model's {context} positions "
                         f"(config.max_position_embeddings): {hint}")


def check_batch(batch) -> None:
    """TypeError unless `batch` is a dict with a (B, T) input_ids tensor; ValueError unless its labels and
    attention_mask, when present, are tensors of input_ids' shape (a mismatch would fail deep in the loss, as
    torch's "Expected input batch_size ... to match target batch_size ...")."""
    if not isinstance(batch, dict) or not isinstance(batch.get("input_ids"), torch.Tensor) \
            or batch["input_ids"].dim() != 2:
        raise TypeError(f"an LLM batch must be a dict with a (B, T) input_ids tensor (see make_batches), got "
                        f"{type(batch).__name__}")
    shape = tuple(batch["input_ids"].shape)
    for key in ("labels", "attention_mask"):
        value = batch.get(key)
        if value is not None and (not isinstance(value, torch.Tensor) or tuple(value.shape) != shape):
            got = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            raise ValueError(f"batch[{key!r}] must be a tensor shaped as batch['input_ids'] {shape}, got {got}")


def check_batches(name: str, batches) -> list:
    """`batches` (any iterable of batch dicts, read once) as a list, each checked (errors name `name`[i]); a dict
    (one batch, not a list of them) or an empty iterable is a ValueError."""
    if isinstance(batches, dict) or not isinstance(batches, Iterable):
        raise ValueError(f"{name} must be a list of batches (dicts with (B, T) input_ids and labels, from "
                         f"make_batches or make_qa_batches), got {type(batches).__name__}")
    batches = list(batches)
    if not batches:
        raise ValueError(f"{name} is empty: give at least one batch")
    for i, batch in enumerate(batches):
        try:
            check_batch(batch)
        except (TypeError, ValueError) as err:
            raise ValueError(f"{name}[{i}]: {err}") from None
    return batches


def _record_kind(record, where: str) -> str:
    """"text" or "qa"; ValueError naming `where` (e.g. "records[3]" or "forget.jsonl, line 4") otherwise."""
    if not isinstance(record, Mapping):
        raise ValueError(f"{where} must be a JSON object (a dict), got {type(record).__name__}")
    if "text" in record and "question" not in record:
        if not isinstance(record["text"], str) or not record["text"].strip():
            raise ValueError(f"{where}: 'text' must be a non-blank string, got {record['text']!r:.60}")
        return "text"
    if "question" not in record:
        raise ValueError(f"{where} has neither 'question' nor 'text' (a record holds 'question' and 'answer', or "
                         f"'text'); its fields: {', '.join(map(repr, record)) or 'none'}")
    if "answer" not in record:
        raise ValueError(f"{where} has no 'answer' field (a question/answer record holds 'question' and 'answer')")
    for field in TEXT_FIELDS:
        if field in record and (not isinstance(record[field], str) or not record[field].strip()):
            raise ValueError(f"{where}: {field!r} must be a non-blank string, got {record[field]!r:.60}")
    for field in LIST_FIELDS:
        value = record.get(field)
        if value is None:
            continue
        values = [value] if isinstance(value, str) else value
        if not isinstance(values, list) or not values or not all(isinstance(v, str) and v.strip() for v in values):
            raise ValueError(f"{where}: {field!r} must be a non-blank string or a non-empty list of them, got "
                             f"{value!r:.60}")
    return "qa"


def check_records(records, name: str = "records") -> tuple[list, str]:
    """(records as a list, their kind "qa" or "text"); ValueError naming `name` for anything else."""
    if isinstance(records, (str, Mapping)) or not isinstance(records, Iterable):
        raise ValueError(f"{name} must be a list of dicts (question/answer or text records), got "
                         f"{type(records).__name__}")
    records = list(records)
    if not records:
        raise ValueError(f"{name} is empty: give at least one record")
    return records, _same_kind([_record_kind(r, f"{name}[{i}]") for i, r in enumerate(records)], name)


def _same_kind(kinds: list, name: str) -> str:
    if len(set(kinds)) > 1:
        first_text = kinds.index("text")
        raise ValueError(f"{name} mixes question/answer records with text records (record {first_text} is text, "
                         f"record {kinds.index('qa')} a question/answer pair): keep one kind a file")
    return kinds[0]


# ---- files -------------------------------------------------------------------------------------------------------

def load_records(path) -> list[dict]:
    """The records of a JSONL file (one object a line; blank lines skipped) or a JSON file (a list of objects),
    checked (see the module docstring). A file whose first non-blank character is "[" is read as JSON, any other as
    JSONL. ValueError (naming the file and the line or record) for a missing, empty or malformed file."""
    path = Path(path)
    try:
        content = path.read_text(encoding="utf-8")
    except (FileNotFoundError, IsADirectoryError, PermissionError, UnicodeDecodeError) as err:
        raise ValueError(f"path: cannot read {path} ({err})") from None
    if not content.strip():
        raise ValueError(f"path: {path} is empty: it holds no record (JSONL: one JSON object a line)")
    if content.lstrip().startswith("["):
        try:
            data = json.loads(content)
        except json.JSONDecodeError as err:
            raise ValueError(f"path: {path} is not valid JSON (line {err.lineno}: {err.msg})") from None
        if not data:
            raise ValueError(f"path: {path} holds an empty list: no record")
        places = [f"path: {path}, record {i}" for i in range(len(data))]
    else:
        data, places = [], []
        for number, line in enumerate(content.splitlines(), 1):
            if not line.strip():
                continue
            try:
                data.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise ValueError(f"path: {path}, line {number} is not valid JSON ({err.msg})") from None
            places.append(f"path: {path}, line {number}")
    _same_kind([_record_kind(r, where) for r, where in zip(data, places)], f"path: {path}")
    return data


def save_records(path, records: Sequence[Mapping]) -> None:
    """Write records as JSONL (one object a line, UTF-8), the format load_records reads back unchanged."""
    records, _ = check_records(records)
    Path(path).write_text("".join(json.dumps(dict(r), ensure_ascii=False) + "\n" for r in records),
                          encoding="utf-8")


# ---- batching ----------------------------------------------------------------------------------------------------

def _pad_id(tokenizer) -> int:
    return next((i for i in (tokenizer.pad_token_id, tokenizer.eos_token_id) if i is not None), 0)


def _collate(rows: list[tuple[list, int]], pad_id: int) -> Batch:
    """Right-padded batch from (ids, n_prompt) rows: labels are -100 on the first n_prompt tokens and on padding."""
    width = max(len(ids) for ids, _ in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    for row, (ids, n_prompt) in enumerate(rows):
        ids_t = torch.tensor(ids, dtype=torch.long)
        input_ids[row, :len(ids)] = ids_t
        mask[row, :len(ids)] = 1
        labels[row, n_prompt:len(ids)] = ids_t[n_prompt:]
    return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}


def make_batches(tokenizer, texts: Sequence[str], max_length: int = 256, batch_size: int = 8) -> list[Batch]:
    """Tokenise `texts` (truncated to max_length tokens, special tokens as the tokenizer adds them) into batches of
    batch_size, right-padded: {"input_ids", "attention_mask", "labels"}, each (B, T) int64, labels -100 on padding.

    The tokenizer is not changed (padding is done here, so a tokenizer without a pad token works). Texts that give
    fewer than 2 tokens predict nothing: they are skipped with a warning; if all are, ValueError."""
    texts = check_texts(texts)
    check_positive_int("max_length", max_length, 2)
    check_positive_int("batch_size", batch_size)
    encoded = tokenizer(texts, truncation=True, max_length=max_length)["input_ids"]
    kept = [ids for ids in encoded if len(ids) >= 2]
    if not kept:
        raise ValueError("texts: every text gives fewer than 2 tokens, so there is nothing to predict")
    if len(kept) < len(encoded):
        warnings.warn(f"texts: {len(encoded) - len(kept)} of {len(encoded)} texts give fewer than 2 tokens and "
                      f"were skipped (nothing to predict)")
    pad_id = _pad_id(tokenizer)
    return [_collate([(ids, 0) for ids in kept[i:i + batch_size]], pad_id) for i in range(0, len(kept), batch_size)]


def _ids(tokenizer, text: str, special: bool) -> list:
    return list(tokenizer(text, add_special_tokens=special)["input_ids"])


def encode_qa(tokenizer, question: str, answer: str, max_length: Optional[int] = None) -> tuple[list, int]:
    """(token ids, number of prompt tokens) of one question/answer pair, framed by the tokenizer's chat template
    when it has one, else by PLAIN_PROMPT; the ids end with EOS (when the tokenizer has one) and are cut to
    max_length (the answer's end goes first).

    The prompt and the answer are tokenised separately, so the prompt's tokens are those the model sees at
    generation time whatever the answer (no token merges across the boundary)."""
    eos = tokenizer.eos_token_id
    if getattr(tokenizer, "chat_template", None):
        user = [{"role": "user", "content": question}]
        prompt_text = tokenizer.apply_chat_template(user, tokenize=False, add_generation_prompt=True)
        full_text = tokenizer.apply_chat_template(user + [{"role": "assistant", "content": answer}], tokenize=False)
        # templates whose generation prompt is not a prefix of the full conversation get the bare answer after it
        answer_text = full_text[len(prompt_text):] if full_text.startswith(prompt_text) else answer
        prompt_ids = _ids(tokenizer, prompt_text, special=False)  # the template writes its own special tokens
        answer_ids = _ids(tokenizer, answer_text, special=False)
    else:
        prompt_ids = _ids(tokenizer, PLAIN_PROMPT.format(question=question), special=True)
        if eos is not None and len(prompt_ids) > 1 and prompt_ids[-1] == eos:  # a tokenizer that appends EOS
            prompt_ids = prompt_ids[:-1]
        answer_ids = _ids(tokenizer, " " + answer, special=False)
    if eos is not None and (not answer_ids or answer_ids[-1] != eos):
        answer_ids.append(eos)
    ids = prompt_ids + answer_ids
    return (ids if max_length is None else ids[:max_length]), len(prompt_ids)


def _pick(values, generator: torch.Generator) -> str:
    if isinstance(values, str):
        return values
    return values[int(torch.randint(len(values), (1,), generator=generator))]


def make_qa_batches(tokenizer, records: Sequence[Mapping], max_length: int = 256, batch_size: int = 8, *,
                    alternate: bool = False, idk_answers: Sequence[str] = IDK_ANSWERS, seed: int = 0) -> list[Batch]:
    """Question/answer records (dicts with "question" and "answer") to batches whose labels cover the answer tokens
    only (-100 on the prompt and on padding); see encode_qa for the framing. Each batch is a dict of (B, T) int64
    tensors {"input_ids", "attention_mask", "labels"}.

    alternate: also give every batch batch["alternate"], a batch of the same questions (row for row) answered by
    the record's "alternate" field (one drawn at random when it is a list), else by one of idk_answers drawn at
    random (seeded by `seed`). Records whose answer is cut away entirely by max_length are skipped with a warning;
    if all are, ValueError."""
    records, kind = check_records(records)
    if kind != "qa":
        raise ValueError("records hold 'text' records, not question/answer pairs: use make_batches on their texts "
                         "(or make_record_batches)")
    check_positive_int("max_length", max_length, 2)
    check_positive_int("batch_size", batch_size)
    if alternate:
        idk_answers = check_texts(idk_answers, "idk_answers")
    generator = torch.Generator().manual_seed(seed)
    rows, alternates = [], []
    for record in records:
        ids, n_prompt = encode_qa(tokenizer, record["question"], record["answer"], max_length)
        if len(ids) <= max(n_prompt, 1):
            continue
        rows.append((ids, n_prompt))
        if alternate:
            other = _pick(record.get("alternate") or idk_answers, generator)
            alt_ids, alt_prompt = encode_qa(tokenizer, record["question"], other, max_length)
            if len(alt_ids) <= max(alt_prompt, 1):
                raise ValueError(f"max_length={max_length} leaves no token of the alternate answer {other!r:.40} "
                                 f"after its prompt; raise max_length")
            alternates.append((alt_ids, alt_prompt))
    if not rows:
        raise ValueError(f"records: max_length={max_length} cuts away every answer (the prompts fill it); raise "
                         f"max_length")
    if len(rows) < len(records):
        warnings.warn(f"records: {len(records) - len(rows)} of {len(records)} answers are cut away entirely by "
                      f"max_length={max_length}; those records were skipped")
    pad_id = _pad_id(tokenizer)
    batches = []
    for start in range(0, len(rows), batch_size):
        batch = _collate(rows[start:start + batch_size], pad_id)
        if alternate:
            batch["alternate"] = _collate(alternates[start:start + batch_size], pad_id)
        batches.append(batch)
    return batches


def make_record_batches(tokenizer, records: Sequence[Mapping], max_length: int = 256, batch_size: int = 8, *,
                        alternate: bool = False, seed: int = 0) -> list[Batch]:
    """Batches from records of either kind: make_qa_batches for question/answer records, make_batches for text
    records (alternate answers need questions: ValueError for text records with alternate=True)."""
    records, kind = check_records(records)
    if kind == "qa":
        return make_qa_batches(tokenizer, records, max_length, batch_size, alternate=alternate, seed=seed)
    if alternate:
        raise ValueError("alternate answers (the \"I don't know\" objectives) need question/answer records; these "
                         "records hold plain 'text'")
    return make_batches(tokenizer, [r["text"] for r in records], max_length, batch_size)
