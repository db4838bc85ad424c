"""A user's own lm-eval tasks in the gate: declared in the recipe, evaluated offline, thresholded, and
failing closed when the metric they name is not what the task reports."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml

from sleep_pipeline.config import RecipeError
from sleep_pipeline.gate.decide import Reference, decide, load_gate_recipe
from sleep_pipeline.gate.evaluate import Evaluation, evaluate
from sleep_pipeline.gate.suites import build_suites
from tests.conftest import RECIPES, gate_raw

EXAMPLE = RECIPES / "lm_eval_tasks"


def _recipe(tmp_path: Path, user_tasks, thresholds: dict | None = None, report_only: dict | None = None) -> Path:
    raw = gate_raw()
    raw["user_tasks"] = user_tasks
    raw["report_only"] = {k: v for k, v in raw["report_only"].items() if not k.startswith("capitals/")}
    raw["report_only"].update(report_only or {})
    for rhythm in raw["thresholds"]:
        raw["thresholds"][rhythm] = {**raw["thresholds"][rhythm], **(thresholds or {})}
    path = tmp_path / "gate.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _capitals(**over) -> dict:
    return {"task": "capitals", "include_path": str(EXAMPLE), "check": "capability",
            "metrics": {"contains_answer": "higher"}, **over}


def test_the_shipped_recipe_runs_the_example_task():
    recipe = load_gate_recipe(RECIPES / "gate.yaml")
    (task,) = recipe.user_tasks
    assert task.name == "capitals" and Path(task.include_path) == EXAMPLE.resolve()
    assert "capitals" in recipe.tasks and ("capitals", "contains_answer") in recipe.report_only


@pytest.mark.parametrize("over, message", [
    ({"include_path": "/nonexistent/tasks"}, "is not a directory"),
    ({"task": "not_in_there"}, "mentions the task"),
    ({"task": "sp_reasoning"}, "already a suite task"),
    ({"metrics": {"contains_answer": "up"}}, "unknown direction"),
    ({"metrics": {}}, "at least one metric"),
    ({"check": "speed"}, "unknown check"),
])
def test_a_wrong_user_task_is_refused_with_a_clear_message(tmp_path, over, message):
    with pytest.raises(RecipeError, match=message):
        load_gate_recipe(_recipe(tmp_path, [_capitals(**over)], report_only={
            f"{over.get('task', 'capitals')}/contains_answer": "reported only, for this test"}))


def test_a_user_task_needs_a_threshold_or_a_reason(tmp_path):
    with pytest.raises(RecipeError, match="capitals/contains_answer"):
        load_gate_recipe(_recipe(tmp_path, [_capitals()]))


@pytest.fixture(scope="module")
def tiny_model():
    from sleep_pipeline.train.modeling import build_model, train_tokenizer
    from sleep_pipeline.train.recipe import ModelSpec, TokenizerSpec

    tok = train_tokenizer(["What is the capital of France? Paris."] * 20, TokenizerSpec(vocab_size=300, min_frequency=1))
    cfg = {"architecture": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
           "num_attention_heads": 2, "num_key_value_heads": 2, "max_position_embeddings": 256}
    return build_model(ModelSpec(config=cfg, path=None), tok, 0).eval(), tok


def test_a_user_task_is_evaluated_offline_and_judged_by_its_threshold(tmp_path, tiny_model):
    # a copy elsewhere: the task reads its data relative to its own directory, wherever the gate runs
    tasks_dir = shutil.copytree(EXAMPLE, tmp_path / "my_tasks")
    recipe = load_gate_recipe(_recipe(tmp_path, [_capitals(include_path=str(tasks_dir))],
                                      thresholds={"capitals/contains_answer": {"min": 0.6}}))
    suites = build_suites(tmp_path / "suites", seed=1, per_task=2, validation_rows=[
        {"record_id": "r", "prompt": "p", "response": "r", "bucket": "benign"}])
    model, tok = tiny_model
    ev = evaluate(model, tok, suites, tasks=["capitals"], limit=6, batch_size=8, user_tasks=recipe.user_tasks)
    score = ev.scores["capitals"]["contains_answer"]
    assert score.n == 6 and 0.0 <= score.value <= 1.0
    verdict = decide(ev, Reference(), recipe.policy("weekly"))
    assert not verdict.capability_passed
    assert any(f.startswith("capitals/contains_answer = ") and "misses its threshold" in f
               for f in verdict.capability_failures)


def test_a_metric_the_task_does_not_report_fails_closed(tmp_path, tiny_model):
    recipe = load_gate_recipe(_recipe(tmp_path, [_capitals(metrics={"accuracy": "higher"})],
                                      thresholds={"capitals/accuracy": {"min": 0.1}}))
    suites = build_suites(tmp_path / "suites", seed=1, per_task=2, validation_rows=[
        {"record_id": "r", "prompt": "p", "response": "r", "bucket": "benign"}])
    model, tok = tiny_model
    ev = evaluate(model, tok, suites, tasks=["capitals"], limit=3, batch_size=8, user_tasks=recipe.user_tasks)
    assert "accuracy" not in ev.scores["capitals"]
    verdict = decide(ev, Reference(), recipe.policy("weekly"))
    assert any("capitals/accuracy was not evaluated" in f for f in verdict.capability_failures)
    assert isinstance(Evaluation.from_json(ev.to_json()), Evaluation)
