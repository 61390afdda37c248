"""The fictitious-people benchmark (benchmarks/quality/llm_fictitious.py): its world is well formed and seeded, its
splits are disjoint, and its --quick path runs end to end (a tiny Llama trained here, SEMU and a full-model NPO)."""
import json
import math

import pytest

from helpers import load_benchmark

pytest.importorskip("transformers")
pytest.importorskip("rouge_score")
pytest.importorskip("sklearn")
pytest.importorskip("scipy")


@pytest.fixture(scope="module")
def bench():
    return load_benchmark("quality/llm_fictitious.py")


def test_world_is_seeded_and_each_fact_has_a_paraphrase_and_wrong_answers_of_its_kind(bench):
    world = bench.make_world(30, seed=3)
    assert world == bench.make_world(30, seed=3)
    assert world != bench.make_world(30, seed=4)
    names = {world[p][0].question for p in range(30)}
    assert len(names) == 30  # distinct people
    vocab = set(bench.vocabulary())
    for person in world:
        assert [f.attribute for f in person] == list(bench.ATTRIBUTES)
        for fact in person:
            values = bench.ATTRIBUTES[fact.attribute][0]
            assert fact.value in fact.answer.split() and fact.value in fact.paraphrased_answer.split()
            assert fact.answer != fact.paraphrased_answer
            wrong = [w for a in fact.perturbed_answers for w in a.split() if w in values]
            assert len(set(wrong)) == 3 and fact.value not in wrong and set(wrong) <= set(values)
            for text in [fact.question, fact.answer, fact.paraphrased_answer, *fact.perturbed_answers]:
                assert set(text.split()) <= vocab  # the word-level tokenizer knows every word


def test_splits_are_disjoint_people_and_cover_the_trained_ones(bench):
    world = bench.make_world(60, seed=0)
    splits = bench.make_splits(world, 50, 10.0, 0.5)
    people = {name: {f.person for f in getattr(splits, name)}
              for name in ("forget", "retain_seen", "retain_held", "holdout")}
    assert people["forget"] == set(range(5))
    assert len(people["retain_seen"]) == round(45 * 0.5)
    assert set().union(*people.values()) == set(range(60))
    assert sum(len(p) for p in people.values()) == 60
    assert people["holdout"] == set(range(50, 60))


def test_quick_run_prints_every_metric_and_writes_json(bench, tmp_path, capsys):
    out = tmp_path / "r.json"
    assert bench.main(["--quick", "--cache-dir", str(tmp_path), "--json", str(out)]) == 0
    tables = json.loads(out.read_text())["tables"]
    rows = {row["method"]: row for row in tables[0]["rows"]}
    assert set(rows) == {"original", "retain-only", "semu-npo", "full-npo"}
    for key in ("forget_quality", "utility_rel", "forget_rouge", "held_rouge", "mia_min_k_auc", "state_MB"):
        assert all(isinstance(row[key], float) and math.isfinite(row[key]) for row in rows.values()), key
    for key, top in (("forget_quality", 1), ("mia_min_k_auc", 1), ("forget_rouge", 100), ("held_rouge", 100)):
        assert all(0.0 <= row[key] <= top for row in rows.values()), key  # p-values and AUCs; ROUGE recall in %
    assert rows["semu-npo"]["trainable_share"] < rows["full-npo"]["trainable_share"] == 100.0
    # the full-model NPO holds a frozen copy plus gradients and Adam moments: more than SEMU's adapters
    assert rows["full-npo"]["state_MB"] > rows["semu-npo"]["state_MB"] > 0
    assert "goals" in tables[1]["rows"][-1]
