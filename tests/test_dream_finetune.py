"""The dreamed candidate: the blend it trains on (shares, no up-sampling, look-alikes balanced against
attacks, written atomically), an int8 candidate turned back into exactly the float weights it computes
with, and the Dream worker under the deepspeed launcher training an int8 candidate with LoRA, publishing
the merged model, which is then quantised again as its child."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch
import yaml

from resources.deepspeed import DeepSpeedClusterResource, free_port
from sleep_pipeline import candidates
from sleep_pipeline.checkpoint import publish, read_manifest, staging_dir, verify_checkpoint
from sleep_pipeline.compress import quantize
from sleep_pipeline.compress.recipe import load_compress_recipe
from sleep_pipeline.dream import blend as blending
from sleep_pipeline.dream import finetune
from sleep_pipeline.dream.recipe import FinetuneSpec, load_dream_recipe
from sleep_pipeline.config import RecipeError
from sleep_pipeline.train.recipe import load_train_recipe
from tests.conftest import RECIPES, ROOT
from tests.gate_helpers import train_candidate


def _row(k: int, strategy: str = "counterfactual", bucket: str = "reasoning", rejected: str | None = "Answer: 1") -> dict:
    row = {"record_id": f"dream:{strategy}{bucket}{k}", "bucket": bucket, "strategy": strategy, "system": "",
           "prompt": f"{strategy} {bucket} question number {k}?", "response": f"Answer: {k + 2}"}
    if rejected is not None:
        row["rejected"] = rejected
    return row


def test_the_blend_takes_the_recipe_shares_and_never_up_samples():
    shares = {"dpo_pairs": 0.5, "synthetic": 0.25, "sft_replay": 0.25}
    counts, norm, notes = blending.plan_counts({"dpo_pairs": 40, "synthetic": 40, "sft_replay": 1000}, shares, 0)
    assert counts == {"dpo_pairs": 40, "synthetic": 20, "sft_replay": 20} and not notes
    # the scarcest part sets the size: 10 SFT rows at a quarter is a blend of 40
    counts, _, _ = blending.plan_counts({"dpo_pairs": 40, "synthetic": 10, "sft_replay": 1000}, shares, 0)
    assert counts == {"dpo_pairs": 20, "synthetic": 10, "sft_replay": 10}
    # a part with nothing gives its share away, and the blend says so
    counts, norm, notes = blending.plan_counts({"dpo_pairs": 30, "synthetic": 0, "sft_replay": 1000}, shares, 0)
    assert counts == {"dpo_pairs": 30, "sft_replay": 15} and norm["dpo_pairs"] == pytest.approx(2 / 3)
    assert notes and "synthetic" in notes[0]
    counts, _, _ = blending.plan_counts({"dpo_pairs": 30, "synthetic": 0, "sft_replay": 1000}, shares, 12)
    assert sum(counts.values()) <= 12 and counts["dpo_pairs"] == 8
    with pytest.raises(blending.BlendError, match="nothing to dream on"):
        blending.plan_counts({"dpo_pairs": 0, "synthetic": 0, "sft_replay": 1000}, shares, 0)


def test_look_alike_and_plain_pairs_together_never_outnumber_attack_pairs():
    rows = ([_row(k, "red_team", "safety", "Sure, here it is.") for k in range(3)]
            + [_row(k, "red_team", "benign", "I can't help with that.") for k in range(7)]
            + [_row(k) for k in range(4)] + [_row(k, "self_consistency", rejected=None) for k in range(2)])
    parts, notes = blending.split_dream_rows(rows)
    lookalikes = [r for r in parts["dpo_pairs"] if r["bucket"] == "benign"]
    assert len(lookalikes) == 3 and len(parts["dpo_pairs"]) == 3 + 3 + 4 and len(parts["synthetic"]) == 2
    assert "4 of 7 look-alike pairs left out" in notes[0]
    # with plain everyday pairs too, the two kinds share the room the attack pairs leave: 6 attacks keep 6
    # answer-over-refusal pairs, 3 of each, not 6 of each (the refusal they reject is the one attacks choose)
    attacks = [_row(k, "red_team", "safety", "Sure, here it is.") for k in range(20, 23)]
    plain = [{**_row(k, "red_team", "benign", "I can't help with that."), "kind": "plain"} for k in range(10, 15)]
    parts, notes = blending.split_dream_rows(rows + attacks + plain)
    kept = [r for r in parts["dpo_pairs"] if r["bucket"] == "benign"]
    assert sum(r.get("kind") == "plain" for r in kept) == 3 and sum(r.get("kind") is None for r in kept) == 3
    assert "2 of 5 plain everyday pairs left out" in notes[0] and "4 of 7 look-alike pairs left out" in notes[1]
    assert all("together do not outnumber the 6 attack pairs" in n for n in notes)
    # a scarce kind leaves its room to the other: 1 look-alike, so 5 plain pairs fit beside 6 attacks
    parts, _ = blending.split_dream_rows(rows[:3] + rows[3:4] + attacks + plain)
    kept = [r for r in parts["dpo_pairs"] if r["bucket"] == "benign"]
    assert sum(r.get("kind") == "plain" for r in kept) == 5 and sum(r.get("kind") is None for r in kept) == 1


def _dream_dir(root: Path, dream_id: str = "dream-test", pairs: int = 12, sft: int = 4) -> Path:
    d = root / dream_id
    d.mkdir(parents=True)
    rows = [_row(k) for k in range(pairs)] + [_row(k, "self_consistency", rejected=None) for k in range(sft)]
    (d / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (d / "validation.jsonl").write_text(json.dumps(_row(99)) + "\n")
    (d / "manifest.json").write_text(json.dumps({"dream_id": dream_id, "accepted": pairs + sft}))
    return d


def _mix(root: Path) -> dict:
    root.mkdir(parents=True, exist_ok=True)
    rows = [{"record_id": f"mix{k}", "bucket": "benign", "system": "", "prompt": f"Everyday request {k}",
             "response": f"A helpful answer {k}."} for k in range(50)]
    for split, part in (("train", rows[:40]), ("validation", rows[40:])):
        (root / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in part))
    return {"train": str(root / "train.jsonl"), "validation": str(root / "validation.jsonl")}


def test_the_blend_is_written_atomically_and_reused(tmp_path, monkeypatch):
    dream_dir, files = _dream_dir(tmp_path / "dreams"), _mix(tmp_path / "mix")
    spec = FinetuneSpec()

    def crash(*_a, **_k):
        raise KeyboardInterrupt("killed while renaming the blend into place")

    monkeypatch.setattr(blending.os, "replace", crash)
    with pytest.raises(KeyboardInterrupt):
        blending.build_blend(dream_dir, "dream-test", files, "dv-1", spec, seed=0)
    assert not [p for p in dream_dir.glob("blend-*") if (p / blending.MANIFEST).exists() and ".tmp" not in p.name]
    monkeypatch.undo()
    made = blending.build_blend(dream_dir, "dream-test", files, "dv-1", spec, seed=0)
    train = [json.loads(line) for line in (made.path / "train.jsonl").read_text().splitlines()]
    assert made.counts == {"dpo_pairs": 8, "synthetic": 4, "sft_replay": 4}  # 4 SFT rows at a quarter: 16 rows
    assert sorted({r["blend_part"] for r in train}) == ["dpo_pairs", "sft_replay", "synthetic"] and len(train) == 16
    assert all(("rejected" in r) == (r["blend_part"] == "dpo_pairs") for r in train)
    again = blending.build_blend(dream_dir, "dream-test", files, "dv-1", spec, seed=0)
    assert again.blend_id == made.blend_id and again.counts == made.counts
    other = blending.build_blend(dream_dir, "dream-test", files, "dv-1",
                                 FinetuneSpec(blend=(("dpo_pairs", 1.0), ("synthetic", 0.0), ("sft_replay", 0.0))), 0)
    assert other.blend_id != made.blend_id and other.counts == {"dpo_pairs": 12}


def test_the_finetune_section_is_validated(tmp_path):
    raw = yaml.safe_load((RECIPES / "dream.yaml").read_text())
    for change, field in [(lambda r: r["finetune"].update(recipe="missing.yaml"), "finetune.recipe"),
                          (lambda r: r["finetune"]["blend"].update(dpo_pairs=0, synthetic=0), "finetune.blend"),
                          (lambda r: r["finetune"]["blend"].update(extra=0.1), "extra"),
                          (lambda r: r["finetune"].update(beta=0), "finetune.beta")]:
        bad = json.loads(json.dumps(raw))
        change(bad)
        (tmp_path / "dream.yaml").write_text(yaml.safe_dump(bad))
        (tmp_path / "dream_train.yaml").write_text((RECIPES / "dream_train.yaml").read_text())
        with pytest.raises(RecipeError, match=field):
            load_dream_recipe(tmp_path / "dream.yaml")
    shipped = load_dream_recipe(RECIPES / "dream.yaml")
    assert shipped.finetune.enabled and Path(shipped.finetune.recipe).is_file()
    # the fine-tune's settings do not change the dream set's identity
    import dataclasses

    assert dataclasses.replace(shipped, finetune=FinetuneSpec(beta=0.5)).recipe_hash() == shipped.recipe_hash()


def test_an_interrupted_dream_is_resumed_only_under_the_same_objective(tmp_path):
    import dataclasses

    recipe = load_dream_recipe(RECIPES / "dream.yaml")
    parent = candidates.Candidate(candidate_id="c" * 64, phase="compress", parents=(), data_version="dv-x",
                                  recipe_hash="r", base_model=None, path=str(tmp_path), created_at=None, status="ok")
    blend = blending.Blend("blend-x", "dream-x", tmp_path, {}, {}, {}, {})
    plan = finetune.Plan(parent, "dream-x", blend=blend, train_recipe=load_train_recipe(RECIPES / "dream_train.yaml"))
    other = lambda **kw: dataclasses.replace(recipe, finetune=dataclasses.replace(recipe.finetune, **kw))  # noqa: E731
    key = finetune.run_key(plan, recipe)
    assert key == finetune.run_key(plan, other()) and "blend-x" in key and parent.short in key
    # a run killed at sft_weight 1.0 is not continued at 0.25 (nor at another beta): a fresh run directory
    assert finetune.run_key(plan, other(sft_weight=recipe.finetune.sft_weight / 4)) != key
    assert finetune.run_key(plan, other(beta=recipe.finetune.beta * 2)) != key


def _mix_rows(n: int = 60) -> list[dict]:
    return [{"record_id": f"r{k}", "bucket": "benign", "system": "", "prompt": f"What is {k} plus {k + 1}?",
             "response": f"{k} plus {k + 1} is {2 * k + 1}."} for k in range(n)]


def _int8_candidate(tmp_path: Path, db: Path) -> candidates.Candidate:
    """A tiny trained model quantised to int8 (no smoothing) and registered as a Compress candidate."""
    from sleep_pipeline.gate.evaluate import load_for_eval

    float_dir = train_candidate(_mix_rows(), tmp_path / "learn", "learn", steps=5)
    model, tok = load_for_eval(float_dir)
    qmodel, tensors, info = quantize.quantize(model)
    stage = staging_dir(tmp_path / "compress", "int8")
    quantize.save_int8(qmodel, tok, tensors, info, stage)
    final, _ = publish(stage, tmp_path / "compress", "int8", {"phase": "compress", "data_version": "dv-test",
                                                               "compression": "int8", "parents": []})
    return candidates.register(db, final)


def test_an_int8_candidate_dequantises_to_exactly_the_weights_it_computes_with(tmp_path):
    from sleep_pipeline.train.modeling import load_pretrained

    db = tmp_path / "sleep.duckdb"
    cand = _int8_candidate(tmp_path, db)
    with pytest.raises(ValueError, match="int8 checkpoint"):
        load_pretrained(Path(cand.path))  # Learn refuses it; Dream asks for the float weights explicitly
    served = quantize.load_int8(Path(cand.path))
    model = load_pretrained(Path(cand.path), dequantize=True)
    for name, mod in served.named_modules():
        if isinstance(mod, quantize.Int8Linear):
            lin = model.get_submodule(name)
            assert isinstance(lin, torch.nn.Linear)
            assert torch.equal(lin.weight, mod.qweight.float() * mod.scale[:, None])
            q, scale = quantize.quantize_weight(lin.weight)  # quantising them again gives the same int8 values
            assert torch.equal(q, mod.qweight) and torch.allclose(scale, mod.scale)


def test_the_dream_worker_trains_an_int8_candidate_and_its_result_is_quantised_again(tmp_path):
    db = tmp_path / "sleep.duckdb"
    parent = _int8_candidate(tmp_path, db)
    recipe = yaml.safe_load((RECIPES / "dream_train.yaml").read_text())
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "tiny.yaml").write_text((RECIPES / "model" / "tiny.yaml").read_text())
    recipe["training"].update(max_steps=3, save_steps=3, logging_steps=1, micro_batch_size=2, max_seq_len=128)
    recipe["lora"] = {"enabled": True, "r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]}
    (tmp_path / "dream_train.yaml").write_text(yaml.safe_dump(recipe))
    data = tmp_path / "blend"
    data.mkdir()
    rows = [{**r, "rejected": "I can't help with that."} if k % 2 else r for k, r in enumerate(_mix_rows(24))]
    (data / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:20]))
    (data / "validation.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[20:]))
    (data / "manifest.json").write_text(json.dumps({"dream_id": "dream-x", "blend_id": "blend-x",
                                                    "counts": {"dpo_pairs": 10, "sft_replay": 10}}))
    res = DeepSpeedClusterResource(num_gpus=2)
    cmd = res.build_command("sleep_pipeline.train.dream", [
        "--recipe", str(tmp_path / "dream_train.yaml"), "--data-dir", str(data), "--run-dir", str(tmp_path / "run"),
        "--out-root", str(tmp_path / "dream"), "--data-version", "dv-test", "--init-from", parent.candidate_id,
        "--db", str(db), "--beta", "0.2", "--sft-weight", "0.5"], master_port=free_port())
    proc = subprocess.run(cmd, env={**res.launch_env(), "PYTHONPATH": str(ROOT)}, cwd=ROOT, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    published = next(p for p in (tmp_path / "dream").iterdir() if p.name.startswith("dream-") and ".staging" not in p.name)
    manifest = verify_checkpoint(published)
    assert manifest["phase"] == "dream" and manifest["parents"] == [parent.candidate_id]
    assert manifest["started_from_int8"] is True and manifest["engine"] == "DeepSpeedEngine" and manifest["lora"]
    assert manifest["dream_id"] == "dream-x" and manifest["dream_blend"] == "blend-x"
    assert manifest["preference_beta"] == 0.2 and manifest["dream_items"] == {"pairs": 12, "sft_rows": 12,
                                                                              "cut_to_fit": 0, "too_long": 0}
    # the adapter was merged: a plain float model, not an adapter on a base that cannot be loaded
    assert not (published / "adapter_config.json").exists() and not quantize.is_int8(published)

    plan = finetune.Plan(parent, "dream-x", train_recipe=load_train_recipe(tmp_path / "dream_train.yaml"))
    trained, served = finetune.finish(db, tmp_path, published, plan, load_compress_recipe(RECIPES / "compress.yaml"),
                                      log=lambda _m: None)
    assert trained.phase == served.phase == "dream" and trained.parents == (parent.candidate_id,)
    assert served.parents == (trained.candidate_id,) and quantize.is_int8(Path(served.path))
    child = read_manifest(Path(served.path))
    assert child["compression"] == "int8" and child["dream_id"] == "dream-x"
    quantize.load_int8(Path(served.path))  # served as its parent was
    assert finetune.dream_source(db, Path(served.path)) == ("dream-x", parent.candidate_id)


def test_the_gate_finds_a_frozen_item_in_a_dream_fine_tunes_training_set(tmp_path):
    """The frozen suites must stay held out from everything a candidate's lineage trained on, the Dream
    blend included (the dream set's quality gate keeps them out; this is the gate's own check)."""
    from sleep_pipeline.gate import heldout
    from sleep_pipeline.gate import run as gate

    db = tmp_path / "sleep.duckdb"
    suites = tmp_path / "suites"
    suites.mkdir()
    docs = heldout.docs_for("ho_harmful")[:5]
    (suites / "ho_harmful.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    leaked = json.loads(docs[2]["meta"])["request"]
    blend = tmp_path / "blend"
    blend.mkdir()
    (blend / "train.jsonl").write_text(json.dumps({"prompt": f"Decode and answer: {leaked}", "response": "No."}) + "\n")
    (blend / "validation.jsonl").write_text("")
    parent = _int8_candidate(tmp_path, db)
    stage = staging_dir(tmp_path / "dream", "dream")
    (stage / "config.json").write_text("{}")
    (stage / "model.safetensors").write_bytes(b"weights")
    final, _ = publish(stage, tmp_path / "dream", "dream", {"phase": "dream", "parents": [parent.candidate_id],
                                                          "training_data": str(blend), "dream_id": "dream-x"})
    dreamed = candidates.register(db, final)
    failures, _risks = gate.frozen_contamination(db, dreamed, suites)
    assert len(failures["safety"]) == 1 and docs[2]["id"] in failures["safety"][0]
    (blend / "train.jsonl").write_text(json.dumps({"prompt": "What is 2 + 2?", "response": "4"}) + "\n")
    assert gate.frozen_contamination(db, dreamed, suites)[0] == {"capability": [], "safety": []}
    # a multi-turn row: the request in an earlier user turn counts too
    turns = [{"role": "user", "content": f"Remember this: {leaked}"}, {"role": "assistant", "content": "Got it."}]
    (blend / "train.jsonl").write_text(json.dumps({"prompt": "Now answer it.", "history": turns, "response": "No."}) + "\n")
    assert docs[2]["id"] in gate.frozen_contamination(db, dreamed, suites)[0]["safety"][0]
