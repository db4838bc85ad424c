"""The embedded default's sources: deterministic, verifiable, covering every bucket."""

import hashlib
import json
import re
from pathlib import Path

import pytest
import reasoning_gym

from sleep_pipeline.config import BUCKETS, load_data_recipe
from sleep_pipeline.data import generate, tasks
from sleep_pipeline.data.generate import REASONING_GYM_TASKS, generate_source
from sleep_pipeline.gate.judge import RuleJudge
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


# ------------------------------------------------------------------------------- written pools
HELDOUT_DIR = Path(generate.__file__).resolve().parents[1] / "gate" / "heldout"
# never in training: only the held-out gate suites ask about these
HELD_OUT_HARM_WORDS = ("nerve agent", "sarin", "anthrax", "ricin", "pathogen", "toxin", "virus that infects people",
                       "terror", "extremis", "jihad", "arson", "set fire", "burn down", "sabotage", "traffick",
                       "smuggl", "launder", "counterfeit", "insider trading", "tax fraud", "evade tax", "dox",
                       "harass", "threaten", "threatening", "stalk", "intimidat")


def _norm(text: str) -> str:
    return re.sub(r"\s+", " ", re.sub(r"[^\w\s]", " ", text.lower())).strip()


def test_general_pool_is_well_formed_and_never_refuses():
    pool = generate.read_pool("general_helpful.jsonl")
    assert len(pool) >= 600
    assert len({it["id"] for it in pool}) == len(pool)
    assert len({_norm(it["prompt"]) for it in pool}) == len(pool), "a prompt is written twice"
    kinds: dict[str, int] = {}
    judge = RuleJudge()
    for it in pool:
        assert set(it) == {"id", "kind", "prompt", "response"}, it["id"]
        assert it["prompt"].strip() and it["response"].strip(), it["id"]
        assert len(it["prompt"]) + len(it["response"]) < 1200, it["id"]  # prompt and answer fit in ~350 tokens
        assert not judge.refused(it["prompt"], it["response"]), it["id"]
        kinds[it["kind"]] = kinds.get(it["kind"], 0) + 1
    assert len(kinds) >= 15 and min(kinds.values()) >= 25, kinds
    # evaluation prompts known in advance, and close variants of them
    joined = "\n".join(_norm(it["prompt"]) for it in pool)
    for banned in ("haiku about autumn", "tips for learning spanish", "alice"):
        assert banned not in joined


def test_general_helpful_generator_shuffles_by_seed_and_caps_at_the_pool():
    pool = generate.read_pool("general_helpful.jsonl")
    a, b = generate.general_helpful(10_000, seed=0), generate.general_helpful(10_000, seed=1)
    assert len(a) == len(pool) and {x["id"] for x in a} == {x["id"] for x in pool}
    assert [x["id"] for x in a] != [x["id"] for x in b]
    assert a == generate.general_helpful(10_000, seed=0)
    assert all(x["bucket"] == "benign" and x["kind"] for x in a)
    assert len(generate.general_helpful(5, seed=0)) == 5
    assert generate.DEFAULT_SIZES["general_helpful"] >= len(pool)  # the default takes the whole pool


def test_harmful_pool_covers_only_the_six_training_categories():
    rows = generate.read_pool("harmful_requests.jsonl")
    assert {r["category"] for r in rows} == set(generate.HARMFUL_CATEGORIES) == set(generate._REFUSALS)
    requests = [r["request"] for r in rows]
    assert len(set(requests)) == len(requests)
    for cat in generate.HARMFUL_CATEGORIES:
        assert len(generate.HARMFUL_REQUESTS[cat]) >= 30, cat
    for r in requests:
        assert r == r.strip() and (r[0].islower() or r[0].isdigit()), r  # a verb phrase for "How do I {x}?"
        assert not any(w in r.lower() for w in HELD_OUT_HARM_WORDS), r
        assert set(re.findall(r"{(\w+)}", r)) <= {"person", "org", "account"}, r
        generate._HARMFUL_TEMPLATES[0].format(x=r.format(person="p", org="o", account="a"))


def test_safety_items_refuse_harm_and_answer_benign():
    judge = RuleJudge()
    for it in generate.safety(200, seed=3):
        if it["label"] == "harmful":
            assert it["category"] in generate.HARMFUL_CATEGORIES
            assert judge.refused(it["prompt"], it["response"])
        elif it["label"] == "benign":
            assert not judge.refused(it["prompt"], it["response"])


def _training_strings() -> list[str]:
    """The training pools' prompts and request phrases (placeholders filled every way), normalised."""
    out = [_norm(it["prompt"]) for it in generate.read_pool("general_helpful.jsonl")]
    for r in generate.read_pool("harmful_requests.jsonl"):
        out += {_norm(r["request"].format(person=p, org=o, account=a))
                for p in generate._PEOPLE for o in generate._ORGS for a in generate._ACCOUNTS}
    return out


def _heldout_strings() -> list[str]:
    out = []
    for name, field in (("everyday", "prompt"), ("alarming_benign", "prompt"), ("harmful", "request")):
        path = HELDOUT_DIR / f"{name}.jsonl"
        if path.exists():
            out += [_norm(json.loads(line)[field]) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    path = HELDOUT_DIR / "jailbreak_templates.jsonl"
    if path.exists():
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.strip():
                out += [_norm(part) for part in json.loads(line)["template"].split("{request}")]
    return [s for s in out if s]


def _overlaps(training: list[str], heldout: list[str], min_chars: int = 24) -> list[tuple[str, str]]:
    """Pairs where one normalised text equals or contains the other; a text shorter than ``min_chars``
    is compared for equality only (a short phrase occurs inside many unrelated texts)."""
    train_hay, held_hay = "\n".join(training), "\n".join(heldout)
    held_set = set(heldout)
    hits = [(t, t) for t in set(training) if t in held_set]
    for h in heldout:
        if len(h) >= min_chars and h in train_hay:
            hits.append((next(t for t in training if h in t), h))
    for t in set(training):
        if len(t) >= min_chars and t in held_hay:
            hits.append((t, next(h for h in heldout if t in h)))
    return hits


def test_training_pools_never_contain_a_held_out_request():
    heldout = _heldout_strings()
    if not heldout:
        pytest.skip("no held-out evaluation pools in sleep_pipeline/gate/heldout")
    assert _overlaps(_training_strings(), heldout) == []
