"""What a dreamed answer is checked against: the verifiers of the task a row came from.

A data-mix row carries in ``meta`` what its generator knew: a reasoning-gym item its task name, answer
and metadata; a tool-use item the expected call; a structured-output item its schema and expected
object. :func:`verify` scores an answer with the same verifiers the gate's suites use (reasoning-gym's
own scorer, :func:`sleep_pipeline.data.tasks.score_tool_call`, :func:`~sleep_pipeline.data.tasks.score_structured`),
and :func:`final_answer` extracts what a chain of thought concluded, so sampled chains can be voted on.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

from sleep_pipeline.data.tasks import _extract_json, score_structured, score_tool_call
from sleep_pipeline.gate.scoring import _rg_scorer

ANSWER_LINE = re.compile(r"^\s*(?:final\s+)?answer\s*[:：]\s*(.+?)\s*$", re.IGNORECASE | re.MULTILINE)
COT_INSTRUCTION = "\n\nThink it through step by step, then give the final answer on its own last line as 'Answer: ...'."


@dataclass(frozen=True)
class Task:
    """What a row asks for and how to check an answer: ``kind`` is ``reasoning_gym``, ``tool_call`` or
    ``structured``; ``spec`` what the verifier needs."""

    kind: str
    spec: dict


def row_meta(row: dict) -> dict:
    meta = row.get("meta") or {}
    return json.loads(meta) if isinstance(meta, str) else dict(meta)


def task_of(row: dict) -> Task | None:
    """The verifiable task of a mix row, or None when it has no verifier (free text, safety, ...)."""
    meta = row_meta(row)
    if meta.get("rg_metadata") is not None and meta.get("task") and "answer" in meta:
        return Task("reasoning_gym", {"task": meta["task"], "answer": str(meta["answer"]),
                                      "metadata": meta["rg_metadata"], "question": row["prompt"]})
    if meta.get("expected_call"):
        return Task("tool_call", {"expected_call": meta["expected_call"]})
    inner = meta.get("meta")
    inner = json.loads(inner) if isinstance(inner, str) else inner
    if isinstance(inner, dict) and inner.get("schema") and "expected" in inner:
        return Task("structured", {"schema": inner["schema"], "expected": inner["expected"]})
    return None


def final_answer(task: Task, text: str) -> str:
    """The answer a response gives, normalised so equal answers compare equal: the last ``Answer:`` line
    of a chain of thought (else its last non-empty line) for reasoning; the parsed JSON object, dumped
    with sorted keys, for tool calls and structured output ("" when there is none)."""
    if task.kind in ("tool_call", "structured"):
        obj = _extract_json(text)
        return json.dumps(obj, sort_keys=True) if isinstance(obj, dict) else ""
    lines = ANSWER_LINE.findall(text)
    if lines:
        return lines[-1].strip()
    rest = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    return rest[-1] if rest else ""


def verify(task: Task, answer: str) -> bool:
    """True when ``answer`` (a final answer or a whole response) gets full marks from the task's verifier."""
    try:
        if task.kind == "reasoning_gym":
            entry = {"question": task.spec["question"], "answer": task.spec["answer"], "metadata": task.spec["metadata"]}
            return float(_rg_scorer(task.spec["task"])(answer, entry) or 0.0) >= 1.0
        if task.kind == "tool_call":
            return score_tool_call(answer, task.spec["expected_call"])["args_correct"] == 1.0
        if task.kind == "structured":
            return score_structured(answer, task.spec["schema"], task.spec["expected"])["field_accuracy"] == 1.0
    except Exception:  # a verifier choking on garbage is a failed check, not a crash
        return False
    raise ValueError(f"unknown task kind {task.kind!r}")
