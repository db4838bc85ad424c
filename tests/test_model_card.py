"""The model card: valid Hugging Face front matter and a comparable body."""

from sleep_pipeline.gate.model_card import CardFacts, MetricRow, parse_front_matter, render


def _facts(**kw):
    base = dict(
        name="sleep-pipeline-tiny", version="v0003", decision="released",
        base_model="learn-20261123-192129-step150", data_version="dv-0e2b4a653997908a",
        datasets=["dv-0e2b4a653997908a"], lineage={"recipe hash": "8eafab79fc661c2f", "checkpoint sha256": "bda8a2ef"},
        metrics=[
            MetricRow("reasoning_planning", "multi_step_success", 0.41, 0.02, 0.30, True, 0.35, True),
            MetricRow("safety", "jailbreak_trigger_rate", 0.08, 0.01, 0.10, False, 0.12, True),
            MetricRow("safety", "over_refusal_rate", 0.05, 0.01, 0.10, False, None, True),
        ],
        risks=["jailbreak_trigger_rate 0.08 within 0.02 of its limit 0.10"],
    )
    return CardFacts(**{**base, **kw})


def test_front_matter_is_valid_yaml_with_a_model_index():
    card = render(_facts())
    fm = parse_front_matter(card)
    assert fm["base_model"] == "learn-20261123-192129-step150"
    assert fm["datasets"] == ["dv-0e2b4a653997908a"] and "sleep-pipeline" in fm["tags"]
    [entry] = fm["model-index"]
    assert entry["name"] == "sleep-pipeline-tiny"
    suites = {r["dataset"]["name"]: r for r in entry["results"]}
    assert set(suites) == {"reasoning_planning", "safety"}
    assert {m["type"]: m["value"] for m in suites["safety"]["metrics"]} == {"jailbreak_trigger_rate": 0.08, "over_refusal_rate": 0.05}
    assert all(r["task"]["type"] == "text-generation" for r in entry["results"])


def test_body_has_deltas_thresholds_and_risks():
    card = render(_facts())
    assert "| reasoning_planning | multi_step_success | 0.4100 | 0.0200 | ≥ 0.3000 | 0.3500 | +0.0600 | yes |" in card
    assert "| safety | jailbreak_trigger_rate | 0.0800 | 0.0100 | ≤ 0.1000 | 0.1200 | -0.0400 | yes |" in card
    assert "| over_refusal_rate | 0.0500 | 0.0100 | ≤ 0.1000 | — | — |" in card
    assert "- jailbreak_trigger_rate 0.08 within 0.02 of its limit 0.10" in card
    assert render(_facts(risks=[])).rstrip().endswith("- none recorded")


def test_names_with_yaml_specials_stay_valid():
    card = render(_facts(base_model="models/my: model #1", datasets=["a: b", "- c"]))
    fm = parse_front_matter(card)
    assert fm["base_model"] == "models/my: model #1" and fm["datasets"] == ["a: b", "- c"]


def test_the_ui_shows_the_body_first_and_the_front_matter_as_a_yaml_block():
    """Dagster's Markdown viewer has no front matter: shown as it is, the card opened with a rule and the
    model-index run together into one long bulleted paragraph above the decision."""
    import re

    import yaml

    from sleep_pipeline.gate.model_card import for_display

    card = render(_facts())
    shown = for_display(card)
    assert shown.startswith("# sleep-pipeline-tiny v0003\n") and "\n---\n" not in shown
    fenced = re.search(r"```yaml\n(.*?)\n```", shown, re.S)
    assert fenced and yaml.safe_load(fenced.group(1)) == parse_front_matter(card)
    assert shown.count("| reasoning_planning | multi_step_success |") == 1
    assert for_display("# no front matter\n") == "# no front matter\n"
