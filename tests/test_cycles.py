"""Whole sleep cycles on one storage directory, as the rhythms run them (Learn -> Compress -> Dream -> Gate):
a first cycle whose gate fails (and feeds replay), two cycles whose runs overlap and must each gate and
release exactly their own dreamed candidate against their own data version, and an unchanged rerun that
neither trains nor releases."""

import threading
from pathlib import Path

import dagster as dg
import yaml

import definitions
from sleep_pipeline import candidates
from sleep_pipeline.gate import run as gate
from sleep_pipeline.release import registry
from sleep_pipeline.store import connect
from tests.conftest import copy_recipes
from tests.gate_helpers import gate_recipe, trivial_thresholds
from tests.test_learn_asset import _shrink_learn


def _recipes(tmp: Path, name: str, strict: bool, mix_seed: int = 7, max_steps: int = 8) -> Path:
    d = copy_recipes(tmp / name)
    _shrink_learn(d, max_steps=max_steps, eval_steps=max_steps, save_steps=max_steps)
    data = yaml.safe_load((d / "data.yaml").read_text())
    data["mix"]["seed"] = mix_seed
    (d / "data.yaml").write_text(yaml.safe_dump(data))
    if strict:  # the shipped thresholds: an 8-step model fails them
        gate_recipe(d, examples=8)
    else:  # thresholds every model meets, and no regression or forgetting judgement: the plumbing is the subject
        gate_recipe(d, trivial_thresholds(), examples=8, noise={"z": 1000.0}, forgetting={"risk": 1.0, "hard_limit": 1.0})
        dream = yaml.safe_load((d / "dream.yaml").read_text())
        dream["auto_approve"] = True  # as a nightly rhythm may: no person reviews these dream batches
        (d / "dream.yaml").write_text(yaml.safe_dump(dream))
    return d


def _meta(result, asset: str) -> dict:
    mats = result.asset_materializations_for_node(asset)
    assert mats, f"{asset} was not materialised"
    return {k: getattr(v, "value", v) for k, v in mats[-1].metadata.items()}


def _cycle(recipes: Path, storage: Path, instance):
    defs = definitions.build_defs(recipes, storage)
    job = defs.resolve_job_def("sleep_cycle")
    return job.execute_in_process(instance=instance, raise_on_error=False)


def test_cycles_on_one_storage_each_gate_their_own_candidate(tmp_path, storage, monkeypatch):
    instance = dg.DagsterInstance.ephemeral()
    db = storage / "sleep.duckdb"

    # cycle 1: the shipped thresholds reject the tiny model; the run ends as a rejection, not a failure;
    # live stays empty; failures go to replay
    first = _cycle(_recipes(tmp_path, "r1", strict=True), storage, instance)
    assert first.success and not first.asset_materializations_for_node("gated_release")
    assert instance.get_run_by_id(first.run_id).tags["sleep_pipeline/decision"] == "rejected"
    report1 = gate.get_report(db, _meta(first, "gate_report")["report_id"])
    assert not report1.passed and registry.live(db) is None
    with connect(db) as con:
        replay_rows = con.execute("SELECT count(*) FROM hard_example_replay").fetchall()[0][0]
    assert replay_rows > 0

    # cycles 2 and 3 overlap: 2 pauses inside its gate while 3 runs from start to release
    real_run_gate = gate.run_gate
    paused, resume = threading.Event(), threading.Event()

    def run_gate(*args, **kwargs):
        if threading.current_thread().name == "cycle-2":
            paused.set()
            assert resume.wait(1800), "cycle 3 never finished"
        return real_run_gate(*args, **kwargs)

    monkeypatch.setattr(gate, "run_gate", run_gate)
    results = {}
    r2 = _recipes(tmp_path, "r2", strict=False, max_steps=10)  # a changed Learn recipe: it really trains
    worker = threading.Thread(target=lambda: results.update(second=_cycle(r2, storage, instance)), name="cycle-2")
    worker.start()
    assert paused.wait(1800), "cycle 2 never reached its gate"
    third = _cycle(_recipes(tmp_path, "r3", strict=False, mix_seed=99), storage, instance)
    resume.set()
    worker.join(1800)
    second = results["second"]
    assert second.success and third.success

    mix2, mix3 = _meta(second, "tiered_data_mix"), _meta(third, "tiered_data_mix")
    learn2, learn3 = _meta(second, "trained_checkpoint"), _meta(third, "trained_checkpoint")
    assert mix2["version_id"] != mix3["version_id"] and learn2["candidate_id"] != learn3["candidate_id"]
    assert mix2["manifest"]["counts"]["per_origin"].get("replay", 0) > 0  # the second cycle replays cycle 1's failures
    assert learn2["unchanged"] is False and learn3["unchanged"] is False
    gated = {}
    for run, mix, learn in ((second, mix2, learn2), (third, mix3, learn3)):
        assert _meta(run, "gate_suites")["data_version"] == mix["version_id"]
        # Compress took this run's Learn candidate and handed the Gate the one it selected
        compressed = _meta(run, "compressed_checkpoint")
        assert compressed["parent_candidate_id"] == learn["candidate_id"]
        chosen = candidates.get(db, compressed["candidate_id"])
        assert learn["candidate_id"] in [a.candidate_id for a in candidates.ancestors(db, chosen.candidate_id)]
        # Dream dreamed on that candidate: items accepted, the red-team library refreshed against it
        dream_set, library = _meta(run, "dream_set"), _meta(run, "red_team_library")
        assert dream_set["candidate_id"] == chosen.candidate_id and dream_set["accepted"] > 0
        assert library["candidate_id"] == chosen.candidate_id and library["attacks"] > 0
        # ... and fine-tuned it on the blend: the dreamed candidate, whose parent is the Compress candidate
        dreamed_meta = _meta(run, "dreamed_checkpoint")
        assert dreamed_meta["trained"] is True and dreamed_meta["dream_id"] == dream_set["dream_id"]
        assert dreamed_meta["dream_parent"] == chosen.candidate_id
        dreamed = candidates.get(db, dreamed_meta["candidate_id"])
        assert dreamed.phase == "dream" and chosen.candidate_id in [a.candidate_id for a in
                                                                    candidates.ancestors(db, dreamed.candidate_id)]
        # the Gate judged the dreamed candidate, compared it with the one before Dream, and says the
        # dream batch was auto-approved by the recipe (no person reviewed it)
        report = gate.get_report(db, _meta(run, "gate_report")["report_id"])
        assert report.candidate_id == dreamed.candidate_id and report.data_version == mix["version_id"]
        dream_facts = report.verdict["dream"]
        assert dream_facts["before"] == chosen.candidate_id and dream_facts["deltas"]
        assert "auto-approved" in dream_facts["spot_check"]["status"]
        assert candidates.get(db, learn["candidate_id"]).data_version == mix["version_id"]
        assert chosen.data_version == dreamed.data_version == mix["version_id"]
        assert _meta(run, "gated_release")["candidate_id"] == dreamed.candidate_id
        gated[run is second] = dreamed.candidate_id
    releases = registry.list_releases(db)
    assert [(r.version, r.checkpoint_sha256) for r in releases] == [("v0001", gated[False]), ("v0002", gated[True])]
    assert registry.live(db).version == "v0002"
    parents = candidates.get(db, learn2["candidate_id"]).parents
    assert parents == ()  # built from the recipe's config: no parent candidate

    # cycle 4 reruns cycle 3 unchanged: the same data version, no training, no new release
    monkeypatch.undo()
    fourth = _cycle(_recipes(tmp_path, "r3", strict=False, mix_seed=99), storage, instance)
    assert fourth.success
    assert _meta(fourth, "tiered_data_mix")["version_id"] == mix3["version_id"]
    learn4 = _meta(fourth, "trained_checkpoint")
    assert learn4["unchanged"] is True and learn4["candidate_id"] == learn3["candidate_id"]
    compressed4 = _meta(fourth, "compressed_checkpoint")
    assert compressed4["unchanged"] is True and compressed4["candidate_id"] == _meta(third, "compressed_checkpoint")["candidate_id"]
    assert _meta(fourth, "dream_set")["unchanged"] is True  # the same candidate and recipe: not dreamed again
    dreamed4 = _meta(fourth, "dreamed_checkpoint")  # nor fine-tuned again
    assert dreamed4["unchanged"] is True and dreamed4["candidate_id"] == gated[False]
    out = _meta(fourth, "gated_release")
    assert out["unchanged"] is True and "earlier release v0001" in out["outcome"]
    assert len(registry.list_releases(db)) == 2 and registry.live(db).version == "v0002"

