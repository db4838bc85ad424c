"""Seeded, offline task generators with verifiers: tool use and structured output.

Each generator returns items ``{prompt, response, system, meta}`` whose ``meta`` holds what the
verifier needs. Verifiers compare *parsed* objects, not strings: a tool call is right when its
function name and arguments equal the expected ones; a structured answer is right when it parses,
satisfies the schema and its fields equal the expected object. The gate suites reuse the same
generators with other seeds and the same verifiers.
"""

from __future__ import annotations

import json
import random
import re
from typing import Any

CITIES = ["Lisbon", "Nairobi", "Osaka", "Toronto", "Lima", "Oslo", "Cairo", "Hanoi", "Perth", "Quito",
          "Dublin", "Seoul", "Madrid", "Accra", "Denver", "Bergen", "Tunis", "Porto", "Kyoto", "Austin"]
NAMES = ["Maria", "Kofi", "Aiko", "Liam", "Sofia", "Ravi", "Elena", "Tomas", "Amara", "Jonas",
         "Priya", "Mateo", "Ingrid", "Yusuf", "Chloe", "Bruno", "Nadia", "Oscar", "Lena", "Hugo"]
CURRENCIES = ["USD", "EUR", "JPY", "GBP", "KES", "CAD", "NOK", "PEN"]
LANGUAGES = ["French", "German", "Spanish", "Japanese", "Swahili", "Portuguese", "Korean", "Italian"]
DISHES = ["lentil soup", "banana bread", "fried rice", "tomato pasta", "green curry", "pancakes"]
INGREDIENTS = ["chickpeas", "spinach", "mushrooms", "salmon", "tofu", "eggplant", "lentils", "rice"]
GENRES = ["jazz", "rock", "classical", "reggae", "hip hop", "folk", "blues", "techno"]
JOBS = ["teacher", "nurse", "engineer", "baker", "pilot", "chemist", "carpenter", "designer"]
COLORS = ["red", "blue", "green", "yellow", "purple", "orange", "black", "white"]

# ---------------------------------------------------------------------------------- tool use
TOOLS: list[dict[str, Any]] = [
    {"name": "get_weather", "description": "Current weather for a city",
     "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}}, "required": ["city", "unit"]}},
    {"name": "convert_currency", "description": "Convert an amount between currencies",
     "parameters": {"type": "object", "properties": {"amount": {"type": "number"}, "from_currency": {"type": "string"}, "to_currency": {"type": "string"}}, "required": ["amount", "from_currency", "to_currency"]}},
    {"name": "set_timer", "description": "Start a countdown timer",
     "parameters": {"type": "object", "properties": {"minutes": {"type": "integer"}, "label": {"type": "string"}}, "required": ["minutes", "label"]}},
    {"name": "translate_text", "description": "Translate text into a language",
     "parameters": {"type": "object", "properties": {"text": {"type": "string"}, "target_language": {"type": "string"}}, "required": ["text", "target_language"]}},
    {"name": "find_recipe", "description": "Find a recipe by main ingredient",
     "parameters": {"type": "object", "properties": {"ingredient": {"type": "string"}, "max_minutes": {"type": "integer"}}, "required": ["ingredient", "max_minutes"]}},
    {"name": "play_music", "description": "Play music of a genre",
     "parameters": {"type": "object", "properties": {"genre": {"type": "string"}, "shuffle": {"type": "boolean"}}, "required": ["genre", "shuffle"]}},
    {"name": "book_table", "description": "Reserve a restaurant table",
     "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "people": {"type": "integer"}, "hour": {"type": "integer"}}, "required": ["city", "people", "hour"]}},
    {"name": "search_flights", "description": "Search flights between two cities",
     "parameters": {"type": "object", "properties": {"origin": {"type": "string"}, "destination": {"type": "string"}, "passengers": {"type": "integer"}}, "required": ["origin", "destination", "passengers"]}},
]
_TOOL_BY_NAME = {t["name"]: t for t in TOOLS}


def _tool_request(name: str, rng: random.Random) -> tuple[str, dict]:
    if name == "get_weather":
        args = {"city": rng.choice(CITIES), "unit": rng.choice(["celsius", "fahrenheit"])}
        text = rng.choice(["What's the weather like in {city} right now, in {unit}?",
                           "Tell me the current weather in {city} (in {unit}).",
                           "Is it cold in {city}? Give me the temperature in {unit}."]).format(**args)
    elif name == "convert_currency":
        a, b = rng.sample(CURRENCIES, 2)
        args = {"amount": rng.choice([5, 12, 20, 45, 80, 150, 300, 999]), "from_currency": a, "to_currency": b}
        text = rng.choice(["How much is {amount} {from_currency} in {to_currency}?",
                           "Convert {amount} {from_currency} to {to_currency} for me.",
                           "I have {amount} {from_currency}. What is that in {to_currency}?"]).format(**args)
    elif name == "set_timer":
        args = {"minutes": rng.randint(1, 90), "label": rng.choice(DISHES + ["laundry", "stretching", "tea"])}
        text = rng.choice(["Set a {minutes} minute timer for the {label}.",
                           "Remind me in {minutes} minutes about the {label} with a timer.",
                           "Start a timer: {label}, {minutes} minutes."]).format(**args)
    elif name == "translate_text":
        phrase = rng.choice(["good morning", "where is the station", "thank you very much", "see you tomorrow",
                             "the soup is hot", "I like this song", "how much does it cost", "happy birthday"])
        args = {"text": phrase, "target_language": rng.choice(LANGUAGES)}
        text = rng.choice(["Translate '{text}' into {target_language}.",
                           "How do you say '{text}' in {target_language}?",
                           "Please render '{text}' in {target_language}."]).format(**args)
    elif name == "find_recipe":
        args = {"ingredient": rng.choice(INGREDIENTS), "max_minutes": rng.choice([15, 20, 30, 45, 60])}
        text = rng.choice(["Find me a recipe with {ingredient} that takes at most {max_minutes} minutes.",
                           "I need something to cook with {ingredient}, under {max_minutes} minutes.",
                           "Any {ingredient} recipe I can make in {max_minutes} minutes?"]).format(**args)
    elif name == "play_music":
        args = {"genre": rng.choice(GENRES), "shuffle": rng.random() < 0.5}
        text = ("Play some {genre} on shuffle." if args["shuffle"] else "Play {genre} in order, no shuffle.").format(**args)
    elif name == "book_table":
        args = {"city": rng.choice(CITIES), "people": rng.randint(1, 10), "hour": rng.randint(11, 22)}
        text = rng.choice(["Book a table for {people} in {city} at {hour}:00.",
                           "Reserve dinner in {city} for {people} people at hour {hour}.",
                           "Can you get us a table in {city}? We are {people}, at {hour}:00."]).format(**args)
    else:  # search_flights
        a, b = rng.sample(CITIES, 2)
        args = {"origin": a, "destination": b, "passengers": rng.randint(1, 6)}
        text = rng.choice(["Find flights from {origin} to {destination} for {passengers} passengers.",
                           "Search {origin} to {destination}, {passengers} people.",
                           "I need to fly {passengers} of us from {origin} to {destination}."]).format(**args)
    return text, args


def tool_system_prompt(catalogue: list[dict]) -> str:
    """The system turn that offers ``catalogue`` and asks for one JSON call."""
    return ("You can call these functions. Answer with one JSON object "
            '{"name": ..., "arguments": {...}}.\n' + json.dumps(catalogue, separators=(",", ":")))


def tool_use_item(rng: random.Random) -> dict:
    catalogue = rng.sample(TOOLS, 3)
    target = rng.choice(catalogue)
    request, args = _tool_request(target["name"], rng)
    call = {"name": target["name"], "arguments": args}
    system = tool_system_prompt(catalogue)
    return {"system": system, "prompt": request, "response": json.dumps(call),
            "meta": {"task": "tool_call", "expected_call": call, "catalogue": [t["name"] for t in catalogue]}}


def _extract_json(text: str) -> Any:
    """The first JSON object in a response (models often wrap it in prose or code fences)."""
    text = text.strip()
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        pass
    match = re.search(r"\{.*\}", text, flags=re.S)
    if match:
        try:
            return json.loads(match.group(0))
        except json.JSONDecodeError:
            return None
    return None


def _equal(a: Any, b: Any) -> bool:
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return abs(a - b) < 1e-9
    if isinstance(a, str) and isinstance(b, str):
        return a.strip().lower() == b.strip().lower()
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b))
    return a == b


def score_tool_call(response: str, expected_call: dict) -> dict[str, float]:
    """name_correct, args_correct (all arguments equal), parsed."""
    call = _extract_json(response)
    if not isinstance(call, dict):
        return {"parsed": 0.0, "name_correct": 0.0, "args_correct": 0.0}
    name_ok = call.get("name") == expected_call["name"]
    args_ok = name_ok and isinstance(call.get("arguments"), dict) and _equal(call["arguments"], expected_call["arguments"])
    return {"parsed": 1.0, "name_correct": float(name_ok), "args_correct": float(args_ok)}


# ------------------------------------------------------------------------- structured output
_PROFILE_FIELDS = {
    "name": {"type": "string"}, "age": {"type": "integer"}, "city": {"type": "string"},
    "job": {"type": "string"}, "favorite_color": {"type": "string"}, "has_pet": {"type": "boolean"},
}


def structured_output_item(rng: random.Random) -> dict:
    person = {"name": rng.choice(NAMES), "age": rng.randint(18, 80), "city": rng.choice(CITIES),
              "job": rng.choice(JOBS), "favorite_color": rng.choice(COLORS), "has_pet": rng.random() < 0.5}
    keys = ["name"] + rng.sample(["age", "city", "job", "favorite_color", "has_pet"], rng.randint(2, 4))
    schema = {"type": "object", "properties": {k: _PROFILE_FIELDS[k] for k in keys}, "required": keys}
    facts = [f"{person['name']} is {person['age']} years old", f"lives in {person['city']}",
             f"works as a {person['job']}", f"loves the color {person['favorite_color']}",
             "has a pet" if person["has_pet"] else "has no pets"]
    rng.shuffle(facts[1:])
    description = facts[0] + ", " + ", ".join(facts[1:-1]) + " and " + facts[-1] + "."
    expected = {k: person[k] for k in keys}
    prompt = (f"Extract the person as JSON matching this schema: {json.dumps(schema, separators=(',', ':'))}\n"
              f"Text: {description}")
    return {"system": "", "prompt": prompt, "response": json.dumps(expected),
            "meta": {"task": "structured_output", "schema": schema, "expected": expected}}


def _type_ok(value: Any, spec: dict) -> bool:
    t = spec.get("type")
    if t == "string":
        return isinstance(value, str) and ("enum" not in spec or value in spec["enum"])
    if t == "integer":
        return isinstance(value, int) and not isinstance(value, bool)
    if t == "number":
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if t == "boolean":
        return isinstance(value, bool)
    if t == "array":
        return isinstance(value, list)
    if t == "object":
        return isinstance(value, dict)
    return True


def score_structured(response: str, schema: dict, expected: dict) -> dict[str, float]:
    """parsed (valid JSON object), schema_valid, field_accuracy (share of expected fields equal)."""
    obj = _extract_json(response)
    if not isinstance(obj, dict):
        return {"parsed": 0.0, "schema_valid": 0.0, "field_accuracy": 0.0}
    props = schema.get("properties", {})
    valid = all(k in obj for k in schema.get("required", [])) and all(
        _type_ok(obj[k], spec) for k, spec in props.items() if k in obj
    )
    acc = sum(_equal(obj.get(k), v) for k, v in expected.items()) / max(len(expected), 1)
    return {"parsed": 1.0, "schema_valid": float(valid), "field_accuracy": acc}
