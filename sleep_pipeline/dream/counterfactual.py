"""Counterfactual items: a verified item with one detail changed (a number, a city, a name) so that its
answer changes, the new answer computed, never guessed.

* tool calls: an argument whose value the request states (``Lisbon``, ``45``, ``celsius``) is swapped
  for another value of the same kind; the expected call is the old one with that argument changed;
* structured output: one stated fact of the person (name, age, city, job, colour) is changed in the
  text and in the expected object;
* arithmetic (reasoning-gym ``chain_sum`` / ``basic_arithmetic``): one number of the expression is
  changed and the expression evaluated again (integer results only).

Each new answer is checked with the task's verifier, and the old answer must fail it: otherwise the
change did not change the answer and the item is not made.
"""

from __future__ import annotations

import ast
import copy
import json
import operator
import random
import re

from sleep_pipeline.data import tasks
from sleep_pipeline.dream.verify import Task, verify

VOCABULARIES = (tasks.CITIES, tasks.NAMES, tasks.CURRENCIES, tasks.LANGUAGES, tasks.DISHES, tasks.INGREDIENTS,
                tasks.GENRES, tasks.JOBS, tasks.COLORS, ["celsius", "fahrenheit"])
ARITHMETIC_TASKS = ("chain_sum", "basic_arithmetic")


def _other_value(value, prompt: str, rng: random.Random):
    """Another value of ``value``'s kind that the prompt does not already mention, or None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        for _ in range(20):
            new = max(1, value + rng.choice([-1, 1]) * rng.randint(1, max(2, abs(value) // 2 + 1)))
            if new != value and not re.search(rf"\b{new}\b", prompt):
                return new
        return None
    if isinstance(value, str):
        for vocab in VOCABULARIES:
            if value in vocab:
                options = [v for v in vocab if v != value and v.lower() not in prompt.lower()]
                return rng.choice(options) if options else None
    return None


def _swap(text: str, old, new) -> tuple[str, int]:
    return re.subn(rf"(?<![\w.]){re.escape(str(old))}(?![\w])", str(new), text)


def tool_call(row: dict, task: Task, rng: random.Random) -> tuple[str, str, Task] | None:
    call = task.spec["expected_call"]
    stated = [k for k, v in call["arguments"].items()
              if not isinstance(v, bool) and _swap(row["prompt"], v, v)[1] == 1]
    rng.shuffle(stated)
    for key in stated:
        new = _other_value(call["arguments"][key], row["prompt"], rng)
        if new is None:
            continue
        prompt, _ = _swap(row["prompt"], call["arguments"][key], new)
        new_call = copy.deepcopy(call)
        new_call["arguments"][key] = new
        return prompt, json.dumps(new_call), Task("tool_call", {"expected_call": new_call})
    return None


def structured(row: dict, task: Task, rng: random.Random) -> tuple[str, str, Task] | None:
    head, sep, text = row["prompt"].partition("Text: ")
    if not sep:
        return None
    expected = task.spec["expected"]
    keys = [k for k, v in expected.items() if not isinstance(v, bool) and _swap(text, v, v)[1] >= 1]
    rng.shuffle(keys)
    for key in keys:
        new = _other_value(expected[key], text, rng)
        if new is None:
            continue
        new_text, _ = _swap(text, expected[key], new)
        new_expected = {**expected, key: new}
        return head + sep + new_text, json.dumps(new_expected), Task("structured", {**task.spec, "expected": new_expected})
    return None


_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul}


def _evaluate(node):
    if isinstance(node, ast.Expression):
        return _evaluate(node.body)
    if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)) and not isinstance(node.value, bool):
        return node.value
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        v = _evaluate(node.operand)
        return -v if isinstance(node.op, ast.USub) else v
    if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
        return _OPS[type(node.op)](_evaluate(node.left), _evaluate(node.right))
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Div):
        left, right = _evaluate(node.left), _evaluate(node.right)
        if right == 0:
            raise ZeroDivisionError
        return left / right
    raise ValueError("not plain arithmetic")


def arithmetic_value(expression: str) -> int | None:
    """The value of a plain arithmetic expression (+ - * / and parentheses), when it is an integer."""
    try:
        value = _evaluate(ast.parse(expression.replace("×", "*").replace("÷", "/"), mode="eval"))
    except (SyntaxError, ValueError, ZeroDivisionError, RecursionError):
        return None
    return int(value) if float(value).is_integer() else None


def arithmetic(row: dict, task: Task, rng: random.Random) -> tuple[str, str, Task] | None:
    meta = task.spec["metadata"]
    expression = meta.get("expression")
    if task.spec["task"] not in ARITHMETIC_TASKS or not expression or expression not in row["prompt"]:
        return None
    numbers = list(re.finditer(r"\d+", expression))
    rng.shuffle(numbers)
    for m in numbers:
        old = int(m.group())
        new = old + rng.choice([-1, 1]) * rng.randint(1, max(2, old // 3 + 1))
        if new < 0 or new == old or len(str(new)) != len(str(old)):
            continue
        new_expr = expression[:m.start()] + str(new) + expression[m.end():]
        value = arithmetic_value(new_expr)
        if value is None or str(value) == task.spec["answer"]:
            continue
        prompt = row["prompt"].replace(expression, new_expr, 1)
        spec = {**task.spec, "answer": str(value), "question": prompt, "metadata": {**meta, "expression": new_expr}}
        return prompt, str(value), Task("reasoning_gym", spec)
    return None


def counterfactual(row: dict, task: Task, rng: random.Random) -> tuple[str, str, Task] | None:
    """(new prompt, its computed answer, its task) for ``row``, or None when no change of the answer
    can be made and verified. The row's own answer fails the new task's verifier (the answer changed)."""
    make = {"tool_call": tool_call, "structured": structured, "reasoning_gym": arithmetic}[task.kind]
    out = make(row, task, rng)
    if out is None:
        return None
    prompt, answer, new_task = out
    if not verify(new_task, answer) or verify(new_task, row["response"]):
        return None
    return out
