"""Compress on a LoRA candidate, through Dagster: the adapter is merged behind its A/B check, the merge's
measurement is reused, the merged model is the adapter's function, and the selected candidate goes on."""

from pathlib import Path

import dagster as dg
import torch
import yaml

import definitions
from sleep_pipeline import candidates
from sleep_pipeline.gate.evaluate import load_for_eval
from sleep_pipeline.store import connect, query_dicts
from tests.test_learn_asset import _shrink_learn


def _materialize(recipes: Path, storage: Path, instance, asset: str):
    defs = definitions.build_defs(recipes, storage)
    result = dg.materialize([*defs.assets, *defs.asset_checks], resources=defs.resources, instance=instance,
                            selection=dg.AssetSelection.assets(asset).upstream())
    assert result.success
    return result


def test_compress_merges_a_lora_candidate_behind_its_ab_check(recipes_dir, storage):
    instance = dg.DagsterInstance.ephemeral()
    _shrink_learn(recipes_dir, max_steps=4, eval_steps=4, save_steps=4)
    base = Path(_materialize(recipes_dir, storage, instance, "trained_checkpoint")
                .asset_materializations_for_node("trained_checkpoint")[0].metadata["checkpoint"].value)
    learn = yaml.safe_load((recipes_dir / "learn.yaml").read_text())
    learn["model"] = {"path": str(base)}
    learn["lora"] = {"enabled": True, "r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]}
    (recipes_dir / "learn.yaml").write_text(yaml.safe_dump(learn))
    raw = yaml.safe_load((recipes_dir / "compress.yaml").read_text())
    raw["prune"]["enabled"] = raw["distil"]["enabled"] = False
    raw["quantize"]["sources"] = ["parent"]
    raw["merge"]["max_drop"] = 1.0  # the subject is the flow; a regressing merge is skipped in test_compress
    (recipes_dir / "compress.yaml").write_text(yaml.safe_dump(raw))

    result = _materialize(recipes_dir, storage, instance, "compressed_checkpoint")
    db = storage / "sleep.duckdb"
    adapter = candidates.get(db, result.asset_materializations_for_node("trained_checkpoint")[0]
                             .metadata["candidate_id"].value)
    assert (Path(adapter.path) / "adapter_config.json").is_file()
    with connect(db) as con:
        rows = query_dicts(con, "SELECT kind, candidate_id, measurement FROM compress_measurements WHERE parent_id = ?",
                           [adapter.candidate_id])
    kinds = {r["kind"]: r for r in rows}
    assert set(kinds) == {"parent", "merged", "int8"}
    merged = candidates.get(db, kinds["merged"]["candidate_id"])
    int8 = candidates.get(db, kinds["int8"]["candidate_id"])
    assert merged.parents == (adapter.candidate_id,) and int8.parents == (merged.candidate_id,)
    assert not (Path(merged.path) / "adapter_config.json").exists()
    logs = "\n".join(e.user_message for e in instance.all_logs(result.run_id))
    assert "merge 1/1" in logs and "merged" in logs
    assert "the quick suite as measured in the merge's A/B check" in logs  # B is not evaluated twice
    # the merged model computes what the adapter computes
    (m_a, tok), (m_b, _) = load_for_eval(Path(adapter.path)), load_for_eval(Path(merged.path))
    ids = tok("What is 2 plus 3?", return_tensors="pt")
    with torch.no_grad():
        assert torch.allclose(m_a(**ids).logits, m_b(**ids).logits, atol=1e-4)
    meta = result.asset_materializations_for_node("compressed_checkpoint")[0].metadata
    assert meta["candidate_id"].value in {adapter.candidate_id, merged.candidate_id, int8.candidate_id}
