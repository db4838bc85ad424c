"""The embedded default's sources: deterministic, verifiable, covering every bucket."""

import hashlib
import json

import reasoning_gym

from sleep_pipeline.config import BUCKETS, load_data_recipe
from sleep_pipeline.data import tasks
from sleep_pipeline.data.generate import REASONING_GYM_TASKS, generate_source
from tests.conftest import RECIPES


def _digest(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def test_generation_is_deterministic(generated_sources, tmp_path):
    recipe = load_data_recipe(RECIPES, tmp_path)
    for src in recipe.sources:
        generate_source(src, max_record_bytes=recipe.quality.max_record_bytes)
    assert _digest(tmp_path / "sources") == _digest(generated_sources / "sources")


def test_items_carry_answers_their_verifiers_accept(generated_sources):
    rows = [json.loads(line) for line in (generated_sources / "sources" / "curated_tasks.jsonl").read_text().splitlines()]
    assert {r["task"] for r in rows} == set(REASONING_GYM_TASKS)
    scorers = {t: reasoning_gym.create_dataset(t, size=1, seed=0, **kw) for t, (_, kw) in REASONING_GYM_TASKS.items()}
    for r in rows[:200]:
        entry = {"question": r["prompt"], "answer": r["answer"], "metadata": r["rg_metadata"]}
        assert scorers[r["task"]].score_answer(r["response"], entry) == 1.0
        assert scorers[r["task"]].score_answer("certainly not the answer", entry) < 1.0

    tools = [json.loads(line) for line in (generated_sources / "sources" / "tool_calls.jsonl").read_text().splitlines()]
    t = tools[0]
    assert tasks.score_tool_call(t["response"], t["meta"]["expected_call"])["args_correct"] == 1.0
    wrong = json.loads(t["response"])
    wrong["arguments"] = {k: "x" for k in wrong["arguments"]}
    assert tasks.score_tool_call(json.dumps(wrong), t["meta"]["expected_call"]) == {"parsed": 1.0, "name_correct": 1.0, "args_correct": 0.0}
    assert tasks.score_tool_call("no json here", t["meta"]["expected_call"])["parsed"] == 0.0


def test_structured_output_verifier_checks_schema_and_fields():
    import random

    item = tasks.structured_output_item(random.Random(0))
    schema, expected = item["meta"]["schema"], item["meta"]["expected"]
    assert tasks.score_structured(item["response"], schema, expected) == {"parsed": 1.0, "schema_valid": 1.0, "field_accuracy": 1.0}
    assert tasks.score_structured("Sure! ```json\n" + item["response"] + "\n```", schema, expected)["field_accuracy"] == 1.0
    bad = dict(expected, name=123)
    scored = tasks.score_structured(json.dumps(bad), schema, expected)
    assert scored["schema_valid"] == 0.0 and scored["field_accuracy"] < 1.0
    assert tasks.score_structured("{not json", schema, expected)["parsed"] == 0.0


def test_every_bucket_is_fed(generated_sources):
    recipe = load_data_recipe(RECIPES, generated_sources)
    from sleep_pipeline.data.ingest import read_source

    buckets = set()
    for src in recipe.sources:
        buckets |= {r["bucket"] for r in read_source(src, recipe.quality).records}
    assert buckets == set(BUCKETS)
