"""LLM data: question/answer batches (labels only on the answer), the chat-template framing, alternate ("I don't
know") answers, and JSON / JSONL record files, on the offline word-level tokenizer."""
import json

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

from semu_fast.workflows import llm_data  # noqa: E402
from llm_helpers import random_texts, tiny_tokenizer  # noqa: E402

TEMPLATE = ("{% for m in messages %}{{ m['role'] }} {{ m['content'] }} </s> {% endfor %}"
            "{% if add_generation_prompt %}assistant {% endif %}")


def _records(n=5, seed=0):
    questions, answers = random_texts(n, seed=seed, max_len=6), random_texts(n, seed=seed + 100, max_len=6)
    return [{"question": q, "answer": a} for q, a in zip(questions, answers)]


def _rows(batches, key=None):
    for batch in batches:
        batch = batch[key] if key else batch
        for ids, mask, labels in zip(batch["input_ids"], batch["attention_mask"], batch["labels"]):
            n = int(mask.sum())
            assert mask[:n].all() and not mask[n:].any() and (labels[n:] == -100).all()
            yield ids[:n].tolist(), labels[:n].tolist()


def test_qa_labels_are_minus_100_exactly_on_the_prompt_tokens():
    tokenizer = tiny_tokenizer()
    records = _records(5)
    batches = llm_data.make_qa_batches(tokenizer, records, max_length=64, batch_size=2)
    assert [b["input_ids"].shape[0] for b in batches] == [2, 2, 1]
    assert all(b[k].dtype == torch.long for b in batches for k in b)
    for record, (ids, labels) in zip(records, _rows(batches)):
        prompt = tokenizer(f"Question: {record['question']}\nAnswer:")["input_ids"]
        answer = tokenizer(" " + record["answer"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        assert ids == prompt + answer
        assert labels == [-100] * len(prompt) + answer


def test_the_chat_template_frames_the_pair_when_the_tokenizer_has_one():
    tokenizer = tiny_tokenizer()
    tokenizer.chat_template = TEMPLATE
    record = {"question": "w1 w2", "answer": "w3 w4"}
    (ids, labels), = _rows(llm_data.make_qa_batches(tokenizer, [record]))
    prompt = tokenizer("user w1 w2 </s> assistant", add_special_tokens=False)["input_ids"]
    answer = tokenizer("w3 w4 </s>", add_special_tokens=False)["input_ids"]
    assert ids == prompt + answer and labels == [-100] * len(prompt) + answer
    assert tokenizer.bos_token_id not in ids  # the template writes its own special tokens (this one none)

    # a generation prompt that is not a prefix of the conversation: the bare answer follows it, then EOS
    tokenizer.chat_template = TEMPLATE.replace("assistant {% endif %}", "w0 {% endif %}")
    (ids, labels), = _rows(llm_data.make_qa_batches(tokenizer, [record]))
    prompt = tokenizer("user w1 w2 </s> w0", add_special_tokens=False)["input_ids"]
    assert ids == prompt + [7, 8, 3] and labels == [-100] * len(prompt) + [7, 8, 3]


def test_alternate_answers_pair_row_for_row_from_the_record_or_the_idk_list():
    tokenizer = tiny_tokenizer()
    records = _records(6)
    records[1]["alternate"] = "w80 w81"
    records[2]["alternate"] = ["w82", "w83"]
    idk = ("w70 w71", "w72")
    batches = llm_data.make_qa_batches(tokenizer, records, batch_size=4, alternate=True, idk_answers=idk, seed=5)
    again = llm_data.make_qa_batches(tokenizer, records, batch_size=4, alternate=True, idk_answers=idk, seed=5)
    assert all(torch.equal(a["alternate"][k], b["alternate"][k]) for a, b in zip(batches, again)
               for k in a["alternate"])
    eos = tokenizer.eos_token_id
    choices = [[idk_answer + " </s>" for idk_answer in idk]] * 6
    choices[1], choices[2] = ["w80 w81 </s>"], ["w82 </s>", "w83 </s>"]
    drawn = set()
    for record, options, (ids, labels), (alt_ids, alt_labels) in zip(records, choices, _rows(batches),
                                                                      _rows(batches, "alternate")):
        prompt = [t for t in labels if t == -100]
        assert alt_ids[:len(prompt)] == ids[:len(prompt)]  # the same question
        answer = [t for t in alt_labels if t != -100]
        assert answer == alt_ids[len(prompt):] and answer[-1] == eos
        text = tokenizer.decode(answer)
        assert text in options
        drawn.add(text)
    assert len(drawn & {o + " </s>" for o in ("w70 w71", "w72")}) == 2  # both refusals drawn over 4 records


def test_make_record_batches_reads_text_records_as_make_batches_does():
    tokenizer = tiny_tokenizer()
    texts = random_texts(5, seed=2)
    by_records = llm_data.make_record_batches(tokenizer, [{"text": t} for t in texts], 16, 2)
    direct = llm_data.make_batches(tokenizer, texts, 16, 2)
    assert len(by_records) == len(direct) == 3
    assert all(torch.equal(a[k], b[k]) for a, b in zip(by_records, direct) for k in a)
    with pytest.raises(ValueError, match="need question/answer records"):
        llm_data.make_record_batches(tokenizer, [{"text": t} for t in texts], alternate=True)


@pytest.mark.parametrize("suffix", [".jsonl", ".json"])
def test_records_round_trip_through_jsonl_and_json_files(tmp_path, suffix):
    records = _records(3)
    records[0].update(paraphrased_answer="w1 w2", perturbed_answer=["w3", "w4 w5"], alternate="w6")
    path = tmp_path / f"r{suffix}"
    if suffix == ".jsonl":
        llm_data.save_records(path, records)
        path.write_text(path.read_text() + "\n\n")  # trailing blank lines are skipped
    else:
        path.write_text(json.dumps(records, indent=2))
    assert llm_data.load_records(path) == records
    texts = [{"text": "w1 w2 ünïcode"}, {"text": "w3"}]
    llm_data.save_records(tmp_path / "t.jsonl", texts)
    assert llm_data.load_records(tmp_path / "t.jsonl") == texts


@pytest.mark.parametrize("content, match", [
    ("", r"path: .*r.jsonl is empty: it holds no record"),
    ("\n  \n", "is empty"),
    ("[]", "holds an empty list"),
    ('{"question": "w1", "answer": "w2"}\n{"question": "w3"}\n', r"r.jsonl, line 2 has no 'answer' field"),
    ('{"question": "w1", "answer": "w2"}\n{"oops": 1\n', r"line 2 is not valid JSON"),
    ('{"answer": "w2"}\n', "has neither 'question' nor 'text'"),
    ('["w1", "w2"]', r"record 0 must be a JSON object"),
    ('{"text": "w1"}\n{"question": "w1", "answer": "w2"}\n', "mixes question/answer records with text records"),
    ('{"question": "w1", "answer": ""}\n', "'answer' must be a non-blank string"),
    ('{"question": "w1", "answer": "w2", "perturbed_answer": [1]}\n', "'perturbed_answer' must be a non-blank"),
])
def test_bad_record_files_name_the_file_and_the_line(tmp_path, content, match):
    path = tmp_path / "r.jsonl"
    path.write_text(content)
    with pytest.raises(ValueError, match=match):
        llm_data.load_records(path)


def test_bad_qa_arguments_name_the_parameter(tmp_path):
    tokenizer = tiny_tokenizer()
    with pytest.raises(ValueError, match="path: cannot read"):
        llm_data.load_records(tmp_path / "missing.jsonl")
    with pytest.raises(ValueError, match=r"records\[1\] has no 'answer' field"):
        llm_data.make_qa_batches(tokenizer, [{"question": "w1", "answer": "w2"}, {"question": "w3"}])
    with pytest.raises(ValueError, match="records is empty"):
        llm_data.make_qa_batches(tokenizer, [])
    with pytest.raises(ValueError, match="records hold 'text' records"):
        llm_data.make_qa_batches(tokenizer, [{"text": "w1 w2"}])
    with pytest.raises(ValueError, match="idk_answers is empty"):
        llm_data.make_qa_batches(tokenizer, _records(1), alternate=True, idk_answers=[])
    with pytest.raises(ValueError, match="batch_size must be an int >= 1"):
        llm_data.make_qa_batches(tokenizer, _records(1), batch_size=0)
    long_question = {"question": " ".join(["w1"] * 20), "answer": "w2"}
    with pytest.raises(ValueError, match="max_length=8 cuts away every answer"):
        llm_data.make_qa_batches(tokenizer, [long_question], max_length=8)
    with pytest.warns(UserWarning, match="1 of 2 answers are cut away"):
        batches = llm_data.make_qa_batches(tokenizer, [long_question, {"question": "w1", "answer": "w2 w3"}],
                                           max_length=8)
    assert len(batches) == 1 and batches[0]["input_ids"].shape == (1, 8)  # the answer's end cut, not the prompt


@pytest.mark.parametrize("key", ["labels", "attention_mask"])
def test_check_batch_refuses_labels_or_mask_not_shaped_as_input_ids_naming_key_and_shapes(key):
    ids = torch.randint(4, 90, (4, 16))
    llm_data.check_batch({"input_ids": ids, key: torch.ones_like(ids)})  # the same shape passes
    with pytest.raises(ValueError, match=rf"batch\['{key}'\] must be a tensor shaped as batch\['input_ids'\] "
                                         rf"\(4, 16\), got \(4, 17\)"):
        llm_data.check_batch({"input_ids": ids, key: torch.ones(4, 17, dtype=torch.long)})
    with pytest.raises(ValueError, match=rf"batch\['{key}'\] must be a tensor .* got list"):
        llm_data.check_batch({"input_ids": ids, key: ids.tolist()})


def test_fields_that_are_not_read_do_not_block_a_record(tmp_path):
    """TOFU's paraphrased_question was validated (a non-string failed the whole file) though nothing reads it."""
    records = [{"question": "w1 w2", "answer": "w3", "paraphrased_question": None, "source": 3},
               {"question": "w4", "answer": "w5 w6", "paraphrased_question": ""}]
    path = tmp_path / "r.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    assert llm_data.load_records(path) == records
    tokenizer = tiny_tokenizer()
    plain = [{"question": r["question"], "answer": r["answer"]} for r in records]
    for got, want in zip(llm_data.make_qa_batches(tokenizer, records), llm_data.make_qa_batches(tokenizer, plain)):
        assert all(torch.equal(got[k], want[k]) for k in want)
