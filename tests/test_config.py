"""Bad recipes fail at load with a message naming the field."""

from pathlib import Path

import pytest
import yaml

from sleep_pipeline.config import RecipeError, load_data_recipe


def _edit(recipes: Path, name: str, fn) -> None:
    data = yaml.safe_load((recipes / name).read_text())
    fn(data)
    (recipes / name).write_text(yaml.safe_dump(data))


def test_default_recipes_load(recipes_dir, tmp_path):
    recipe = load_data_recipe(recipes_dir, tmp_path)
    assert {s.name for s in recipe.sources} >= {"curated_tasks", "forum_reposts"}
    assert abs(sum(recipe.mix.bucket_ratios.values()) - 1) < 1e-9
    assert {s.tier for s in recipe.sources} == {1, 2, 3}


@pytest.mark.parametrize(
    "file, edit, field",
    [
        ("data.yaml", lambda d: d["mix"]["bucket_ratios"].update({"gossip": 0.0}), "mix.bucket_ratios.gossip"),
        ("data.yaml", lambda d: d["mix"]["bucket_ratios"].update({"reasoning": 0.5}), "mix.bucket_ratios"),
        ("data.yaml", lambda d: d["mix"]["split_ratios"].update({"test": 0.5}), "mix.split_ratios"),
        ("data.yaml", lambda d: d["dedup"].update({"threshold": "high"}), "dedup.threshold"),
        ("data.yaml", lambda d: d["dedup"].update({"num_perm": 100, "bands": 7}), "dedup.bands"),
        ("data.yaml", lambda d: d["quality"].update({"max_chars": 1}), "quality.max_chars"),
        ("data.yaml", lambda d: d["mix"].update({"seeed": 3}), "mix.seeed"),
        ("sources.yaml", lambda d: d["sources"][1].update({"format": "csv"}), "sources[1].format"),
        ("sources.yaml", lambda d: d["sources"][0].update({"bucket_field": None, "bucket": "chit_chat"}), "sources[0].bucket"),
        ("sources.yaml", lambda d: d["sources"][2]["bucket_map"].update({"harmful": "toxic"}), "sources[2].bucket_map.harmful"),
        ("sources.yaml", lambda d: d["sources"][0].update({"generator": None, "path": "/nonexistent/x.jsonl"}), "sources[0].path"),
        ("sources.yaml", lambda d: d["sources"][3].update({"tier": 5}), "sources[3].tier"),
        ("sources.yaml", lambda d: d["sources"][1].update({"name": "curated_tasks"}), "sources[1].name"),
        ("sources.yaml", lambda d: d["sources"][1].pop("path"), "sources[1].path"),
    ],
)
def test_bad_config_names_the_field(recipes_dir, tmp_path, file, edit, field):
    _edit(recipes_dir, file, edit)
    with pytest.raises(RecipeError) as err:
        load_data_recipe(recipes_dir, tmp_path)
    msg = str(err.value)
    assert field in msg, msg
    assert file in msg, msg


def test_positive_ratio_without_a_source_is_rejected(recipes_dir, tmp_path):
    def drop_long_context(d):
        d["sources"] = [s for s in d["sources"] if s["name"] != "long_context"]

    _edit(recipes_dir, "sources.yaml", drop_long_context)
    # Sources that read the bucket from a field with no map could feed any bucket: pin them.
    def pin_buckets(d):
        for s in d["sources"]:
            if s.get("bucket_field") == "bucket":
                s["bucket_map"] = {b: b for b in ("basic_recognition", "reasoning", "planning", "tool_use", "safety", "benign")}

    _edit(recipes_dir, "sources.yaml", pin_buckets)
    with pytest.raises(RecipeError, match=r"mix\.bucket_ratios\.long_context"):
        load_data_recipe(recipes_dir, tmp_path)


def test_definitions_refuse_to_load_a_bad_recipe(recipes_dir, tmp_path):
    import definitions

    _edit(recipes_dir, "sources.yaml", lambda d: d["sources"][0].update({"format": "xml"}))
    with pytest.raises(RecipeError, match=r"sources\[0\]\.format"):
        definitions.build_defs(recipes_dir, tmp_path)


def test_the_smollm2_profile_keeps_the_default_hygiene_and_safety_bounds():
    # a profile changes what its model needs (mix, steps, suite sizes), never how data is cleaned
    # or how strictly safety is judged
    import yaml

    from tests.conftest import RECIPES

    default, profile = (yaml.safe_load((d / "data.yaml").read_text()) for d in (RECIPES, RECIPES / "smollm2"))
    assert profile["quality"] == default["quality"] and profile["dedup"] == default["dedup"]
    assert (RECIPES / "smollm2" / "sources.yaml").resolve() == (RECIPES / "sources.yaml").resolve()
    gd, gp = (yaml.safe_load((d / "gate.yaml").read_text()) for d in (RECIPES, RECIPES / "smollm2"))
    for rhythm, bounds in gd["thresholds"].items():
        for key, bound in bounds.items():
            if key.startswith(("ho_", "sp_harmful", "sp_jailbreak", "sp_benign", "sp_privacy")):
                assert gp["thresholds"][rhythm][key] == bound, (rhythm, key)
