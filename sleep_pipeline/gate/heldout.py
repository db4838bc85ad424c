"""The frozen held-out suites: what the gate judges generalisation on.

The mix-derived suites (:mod:`sleep_pipeline.gate.suites`) are held out from training *by item*: the
same generators, other seeds. They measure the buckets and feed the forgetting monitor, but a model
that memorised its training templates passes them. The suites here are held out *by distribution*
and are the same in every cycle, so cycles compare:

* ``ho_harmful`` — harmful requests written as users write them, never from a training template; half
  of them from harm categories no training data covers (``category_held_out``);
* ``ho_jailbreak`` — harmful requests wrapped in jailbreak templates no training or replay data uses,
  including long role-play templates longer than a model's context (the evaluator truncates from the
  left, keeping the request at the end, as a chat server would; the count truncated is reported);
* ``ho_everyday`` and ``ho_alarming_benign`` — ordinary requests of many kinds, and requests that
  sound alarming but deserve an answer: the over-refusal a user meets;
* ``ho_reasoning`` — reasoning-gym tasks at a difficulty above training's;
* ``ho_tool_use`` — function calling against a tool catalogue no training item shows.

The texts ship with the package (``heldout/*.jsonl``); nothing here reads the data mix. Items are
ordered round-robin over their categories, so the first N of a suite (a quick rhythm's limit) stay
balanced. :func:`contamination` finds frozen items whose request occurs in a training prompt: such a
suite no longer measures generalisation, and the gate fails closed on it. Frozen items are never fed
to the hard-example replay.
"""

from __future__ import annotations

import json
import random
import re
from functools import cache
from itertools import zip_longest
from pathlib import Path
from typing import Iterable

from sleep_pipeline.data import generate, tasks

POOL_DIR = Path(__file__).with_name("heldout")
SEED = 20261128  # the frozen suites' own seed: changing it makes a new frozen version
REASONING_PER_TASK = 30  # ho_reasoning items per reasoning-gym task (fixed: the suite must not depend on a rhythm)
TOOL_ITEMS = 160  # ho_tool_use items

# reasoning-gym tasks above the training difficulty (see generate.REASONING_GYM_TASKS)
HARDER_REASONING_GYM: dict[str, tuple[str, dict]] = {
    "spell_backward": ("basic_recognition", {"min_word_len": 7, "max_word_len": 10}),
    "letter_counting": ("basic_recognition", {"min_words": 8, "max_words": 12}),
    "word_sorting": ("basic_recognition", {"min_words": 6, "max_words": 8}),
    "chain_sum": ("reasoning", {"min_terms": 4, "max_terms": 5, "min_digits": 2, "max_digits": 3}),
    "basic_arithmetic": ("reasoning", {"min_terms": 4, "max_terms": 5, "min_digits": 2, "max_digits": 3}),
    "maze": ("planning", {"min_grid_size": 7, "max_grid_size": 8, "min_dist": 6, "max_dist": 9}),
    "shortest_path": ("planning", {"min_rows": 6, "max_rows": 7, "min_cols": 6, "max_cols": 7}),
}

# A tool catalogue disjoint from tasks.TOOLS: names, parameters and request wordings training never shows.
_UNSEEN_TOOLS: list[tuple[dict, list[str], dict]] = [
    ({"name": "send_email", "description": "Send an email",
      "parameters": {"type": "object", "properties": {"to": {"type": "string"}, "subject": {"type": "string"}},
                     "required": ["to", "subject"]}},
     ["Email {to} with the subject '{subject}'.", "Send a message to {to}, subject line: {subject}.",
      "Could you drop {to} an email titled '{subject}'?"],
     {"to": ["ana@example.com", "team@example.org", "li.wei@example.net", "ops@example.com"],
      "subject": ["Quarterly report", "Lunch on Friday", "Server maintenance", "Welcome aboard"]}),
    ({"name": "create_event", "description": "Add an event to the calendar",
      "parameters": {"type": "object", "properties": {"title": {"type": "string"}, "day": {"type": "string"},
                                                      "hour": {"type": "integer"}}, "required": ["title", "day", "hour"]}},
     ["Put '{title}' in my calendar on {day} at {hour}:00.", "Schedule {title} for {day}, {hour} o'clock.",
      "Add an event called {title} on {day} at hour {hour}."],
     {"title": ["Dentist", "Team sync", "Yoga class", "Parent meeting"],
      "day": ["Monday", "Tuesday", "Thursday", "Saturday"], "hour": [8, 9, 14, 17, 19]}),
    ({"name": "get_stock_price", "description": "Latest price of a stock",
      "parameters": {"type": "object", "properties": {"ticker": {"type": "string"}}, "required": ["ticker"]}},
     ["What is {ticker} trading at?", "Look up the share price of {ticker}.", "Quote for {ticker}, please."],
     {"ticker": ["AAPL", "MSFT", "NVDA", "SAP", "TSLA", "ASML"]}),
    ({"name": "order_taxi", "description": "Order a taxi",
      "parameters": {"type": "object", "properties": {"pickup": {"type": "string"}, "destination": {"type": "string"},
                                                      "seats": {"type": "integer"}},
                     "required": ["pickup", "destination", "seats"]}},
     ["Get me a cab from {pickup} to {destination} for {seats}.", "I need a taxi: {pickup} to {destination}, {seats} seats.",
      "Order a ride for {seats} people from {pickup} to {destination}."],
     {"pickup": ["the airport", "Central Station", "the hotel", "Main Street"],
      "destination": ["the museum", "the harbour", "the stadium", "City Hall"], "seats": [1, 2, 3, 4]}),
    ({"name": "track_parcel", "description": "Where a parcel is",
      "parameters": {"type": "object", "properties": {"tracking_number": {"type": "string"}},
                     "required": ["tracking_number"]}},
     ["Where is my parcel {tracking_number}?", "Track shipment {tracking_number}.",
      "Has package {tracking_number} arrived yet?"],
     {"tracking_number": ["ZX4411", "QP9020", "LM3307", "TR7719", "BK5052"]}),
    ({"name": "add_todo", "description": "Add an item to the to-do list",
      "parameters": {"type": "object", "properties": {"item": {"type": "string"},
                                                      "priority": {"type": "string", "enum": ["low", "medium", "high"]}},
                     "required": ["item", "priority"]}},
     ["Add '{item}' to my to-do list, {priority} priority.", "New task: {item} ({priority}).",
      "Remember to {item}; mark it {priority} priority."],
     {"item": ["renew passport", "water the plants", "call the bank", "buy printer ink"],
      "priority": ["low", "medium", "high"]}),
    ({"name": "set_thermostat", "description": "Set a room's temperature",
      "parameters": {"type": "object", "properties": {"room": {"type": "string"}, "degrees": {"type": "integer"}},
                     "required": ["room", "degrees"]}},
     ["Set the {room} to {degrees} degrees.", "Make the {room} {degrees} degrees warm.",
      "Thermostat in the {room}: {degrees}, please."],
     {"room": ["kitchen", "bedroom", "office", "living room"], "degrees": [18, 19, 20, 21, 22, 23]}),
    ({"name": "define_word", "description": "Dictionary definition of a word",
      "parameters": {"type": "object", "properties": {"word": {"type": "string"}}, "required": ["word"]}},
     ["What does '{word}' mean?", "Define {word}.", "Look up the word {word} in the dictionary."],
     {"word": ["perspicacious", "sesquipedalian", "defenestrate", "apricity", "lugubrious"]}),
]


@cache
def pool(name: str) -> tuple[dict, ...]:
    """One shipped pool file (``harmful``, ``jailbreak_templates``, ``everyday``, ``alarming_benign``)."""
    path = POOL_DIR / f"{name}.jsonl"
    with open(path, encoding="utf-8") as fh:
        return tuple(json.loads(line) for line in fh if line.strip())


def _round_robin(items: Iterable[dict], key: str, seed: int) -> list[dict]:
    """Items shuffled within their ``key`` group, then interleaved group by group."""
    groups: dict[str, list[dict]] = {}
    for it in items:
        groups.setdefault(str(it[key]), []).append(it)
    rng = random.Random(seed)
    for g in groups.values():
        rng.shuffle(g)
    order = [groups[k] for k in sorted(groups)]
    return [it for row in zip_longest(*order) for it in row if it is not None]


def _doc(i: str, prompt: str, bucket: str, task: str, target: str = "", system: str = "", **meta) -> dict:
    return {"id": i, "system": system, "prompt": prompt, "target": target, "bucket": bucket, "task": task,
            "meta": json.dumps(meta, sort_keys=True, default=str)}


def harmful_docs() -> list[dict]:
    return [_doc(f"ho-{it['id']}", it["request"], "safety", "harmful", request=it["request"], category=it["category"],
                 category_held_out=bool(it["category_held_out"]))
            for it in _round_robin(pool("harmful"), "category", SEED)]


def jailbreak_docs() -> list[dict]:
    """Every template once per round, each with a different request (requests in another order than
    ``ho_harmful``'s, so a template is not always paired with the same category)."""
    templates = sorted(pool("jailbreak_templates"), key=lambda t: t["id"])
    requests = _round_robin(pool("harmful"), "category", SEED + 1)
    out = []
    for k, req in enumerate(requests):
        tpl = templates[k % len(templates)]
        prompt = tpl["template"].replace("{request}", req["request"])
        out.append(_doc(f"ho-jb-{k:04d}", prompt, "safety", "jailbreak", request=req["request"], category=req["category"],
                        template=tpl["id"], style=tpl.get("style", ""), long=bool(tpl.get("long"))))
    return out


def benign_docs(name: str) -> list[dict]:
    return [_doc(f"ho-{it['id']}", it["prompt"], "benign", name, request=it["prompt"], kind=it["kind"])
            for it in _round_robin(pool(name), "kind", SEED)]


def reasoning_docs(n: int) -> list[dict]:
    import logging

    import reasoning_gym

    logging.getLogger("reasoning_gym").setLevel(logging.ERROR)
    per = []
    for task, (bucket, kwargs) in HARDER_REASONING_GYM.items():
        ds = reasoning_gym.create_dataset(task, size=n, seed=generate._seed("heldout-" + task, SEED), **kwargs)
        per.append([(task, bucket, ds[i]) for i in range(n)])
    out = []
    for row in zip(*per):
        for task, bucket, e in row:
            meta = json.loads(json.dumps(e.get("metadata", {}), default=str))
            out.append(_doc(f"ho-{task}-{len(out):04d}", e["question"], bucket, task, target=str(e["answer"]),
                            request=e["question"], entry={"question": e["question"], "answer": str(e["answer"]),
                                                          "metadata": meta}))
    return out


def tool_docs(n: int) -> list[dict]:
    rng = random.Random(SEED)
    tools = [t for t, _, _ in _UNSEEN_TOOLS]
    out = []
    for k in range(n):
        spec, wordings, values = _UNSEEN_TOOLS[k % len(_UNSEEN_TOOLS)]
        args = {p: rng.choice(v) for p, v in values.items()}
        request = rng.choice(wordings).format(**args)
        catalogue = [spec] + rng.sample([t for t in tools if t["name"] != spec["name"]], 2)
        rng.shuffle(catalogue)
        system = tasks.tool_system_prompt(catalogue)
        call = {"name": spec["name"], "arguments": args}
        out.append(_doc(f"ho-tool-{k:04d}", request, "tool_use", "tool_call", target=json.dumps(call), system=system,
                        request=request, expected_call=call))
    return out


def unseen_tool_names() -> set[str]:
    return {t["name"] for t, _, _ in _UNSEEN_TOOLS}


def docs_for(task: str) -> list[dict]:
    """Every frozen item of ``task``, in suite order."""
    if task == "ho_harmful":
        return harmful_docs()
    if task == "ho_jailbreak":
        return jailbreak_docs()
    if task == "ho_everyday":
        return benign_docs("everyday")
    if task == "ho_alarming_benign":
        return benign_docs("alarming_benign")
    if task == "ho_reasoning":
        return reasoning_docs(REASONING_PER_TASK)
    if task == "ho_tool_use":
        return tool_docs(TOOL_ITEMS)
    raise ValueError(f"unknown frozen suite task {task}")


# --------------------------------------------------------------------------------------- contamination
def normalise(text: str, symbols: bool = False) -> str:
    """Lower case, whitespace collapsed and (unless ``symbols``) punctuation dropped: what "the same
    request" ignores. A procedural task's instance is in its symbols (a maze drawn in ``#`` and ``o``,
    an expression): there they are kept."""
    text = text.lower() if symbols else re.sub(r"[^\w\s]", " ", text.lower())
    return re.sub(r"\s+", " ", text).strip()


SYMBOLIC_TASKS = ("ho_reasoning", "ho_tool_use")  # compared with their symbols kept


def request_of(doc: dict) -> str:
    """What a suite item asks: its ``meta.request`` (the request inside a jailbreak template, say), else
    its prompt."""
    meta = doc.get("meta")
    meta = json.loads(meta) if isinstance(meta, str) and meta.startswith("{") else (meta if isinstance(meta, dict) else {})
    return str(meta.get("request") or doc.get("prompt") or "")


def contamination(docs_by_task: dict[str, list[dict]], training_prompts: Iterable[str],
                  min_chars: int = 24) -> dict[str, list[str]]:
    """Per frozen task, the ids of items whose request (normalised, at least ``min_chars`` long) occurs
    inside a training prompt. A request shorter than that is compared for equality only."""
    training_prompts = list(training_prompts)
    views = {}
    for symbols in (False, True):
        prompts = {normalise(p, symbols) for p in training_prompts}
        views[symbols] = (prompts, "\n".join(prompts))
    out: dict[str, list[str]] = {}
    for task, docs in docs_by_task.items():
        symbols = task in SYMBOLIC_TASKS
        prompts, haystack = views[symbols]
        hits = []
        for d in docs:
            request = normalise(request_of(d), symbols)
            if not request:
                continue
            if (request in prompts) if len(request) < min_chars else (request in haystack):
                hits.append(d["id"])
        if hits:
            out[task] = hits
    return out
