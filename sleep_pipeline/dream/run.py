"""Dream on a candidate: run the strategies, pass their items through the quality gate, record them.

:func:`dream` takes the candidate Compress selected (by id) and the train split of its data version as
seeds, runs the recipe's strategies (the red team always attacks the candidate itself; the other
strategies use the recipe's generator: the candidate, a teacher model or an endpoint), decides every
item with :mod:`sleep_pipeline.dream.quality` against the gate's suites (the frozen ones included) and
the corpus, and records:

* every item with its strategy, provenance, verification, agreement and decision in ``dream_set``;
* every red-team attempt in ``red_team_library``;
* a seeded sample of the accepted items in ``rater_queue`` (the batch is the dream id);
* the accepted items as training files (``train.jsonl`` / ``validation.jsonl`` with SFT rows and
  preference pairs) in ``<storage>/dreams/<dream id>/``, written to a temporary directory and renamed,
  so a crash leaves no valid-looking dream set.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from sleep_pipeline import candidates
from sleep_pipeline.config import stable_hash
from sleep_pipeline.data.mix import manifest_of
from sleep_pipeline.data.replay import REPLAY_TABLE, mark_replayed, replay_pool
from sleep_pipeline.dream import quality, rater, redteam
from sleep_pipeline.dream.generator import EndpointGenerator, LocalGenerator
from sleep_pipeline.dream.recipe import DreamRecipe
from sleep_pipeline.dream.verify import row_meta
from sleep_pipeline.dream.strategies import Counterfactual, DreamItem, RedTeam, Replay, SelfConsistency
from sleep_pipeline.store import connect, insert_rows, query_dicts, table_exists, utcnow
from sleep_pipeline.train.modeling import read_jsonl

DREAM_TABLE = "dream_set"
DREAM_COLUMNS = ("dream_id", "item_id", "strategy", "bucket", "system", "prompt", "chosen", "rejected", "source_id",
                 "generator", "candidate_id", "verified", "agreement", "accepted", "reason", "meta", "created_at")
_CREATE = f"""
CREATE TABLE IF NOT EXISTS {DREAM_TABLE} (
    dream_id VARCHAR, item_id VARCHAR, strategy VARCHAR, bucket VARCHAR, system VARCHAR, prompt VARCHAR,
    chosen VARCHAR, rejected VARCHAR, source_id VARCHAR, generator VARCHAR, candidate_id VARCHAR,
    verified BOOLEAN, agreement DOUBLE, accepted BOOLEAN, reason VARCHAR, meta VARCHAR, created_at TIMESTAMP
)"""
VALIDATION_SHARE = 0.1
MANIFEST = "manifest.json"


class DreamError(RuntimeError):
    pass


@dataclass
class DreamResult:
    dream_id: str
    candidate_id: str
    path: Path
    items: int
    accepted: int
    by_strategy: dict[str, dict[str, int]]
    reasons: dict[str, int]
    strategy_stats: dict[str, dict]
    rater_batch: list[str]
    seconds: float
    unchanged: bool = False


def ensure_schema(con) -> None:
    con.execute(_CREATE)


def dreams_root(home: Path) -> Path:
    return Path(home) / "dreams"


def make_generator(spec, db_path: Path, cand: candidates.Candidate, candidate_generator):
    """The recipe's generator: the candidate's own (already loaded), a local model or an endpoint."""
    if spec.kind == "candidate":
        return candidate_generator
    if spec.kind == "endpoint":
        return EndpointGenerator(spec.url, spec.model, spec.api_key_env)
    from sleep_pipeline.gate.evaluate import load_for_eval

    path, found = candidates.resolve(db_path, spec.path)
    model, tok = load_for_eval(path)
    return LocalGenerator(model, tok, f"candidate:{found.candidate_id}" if found else f"model:{path}", spec.batch_size)


def plain_harmful(rows: list[dict], recipe: DreamRecipe) -> list[dict]:
    """Harmful train rows with a harm category, not already wrapped in one of training's jailbreak
    wrappers (an attack transform is applied to the plain request)."""
    from sleep_pipeline.data.generate import TRAIN_JAILBREAK_WRAPPERS

    heads = [w.split("{x}")[0].strip() for w in TRAIN_JAILBREAK_WRAPPERS if w.split("{x}")[0].strip()]
    return [r for r in rows if r.get("bucket") in recipe.quality.refuse_buckets and "category" in row_meta(r)
            and not any(h in r["prompt"] for h in heads)]


def dream_id_for(cand: candidates.Candidate, recipe: DreamRecipe, replay_ids: list[str]) -> str:
    return "dream-" + stable_hash({"candidate": cand.candidate_id, "recipe": recipe.recipe_hash(),
                                   "data_version": cand.data_version, "replay": replay_ids})[:12]


def recorded(db_path: Path, dream_id: str) -> list[dict]:
    with connect(db_path) as con:
        if not table_exists(con, DREAM_TABLE):
            return []
        return query_dicts(con, f"SELECT * FROM {DREAM_TABLE} WHERE dream_id = ? ORDER BY item_id", [dream_id])


def dream(db_path: Path, home: Path, candidate_id: str, recipe: DreamRecipe, gate_recipe, log=print,
          judge=None, candidate_generator=None, force: bool = False) -> DreamResult:
    from sleep_pipeline.gate import run as gate_run
    from sleep_pipeline.gate.judge import make_judge

    t0 = time.time()
    cand = candidates.get(db_path, candidate_id)
    if cand.status in candidates.GONE:
        raise DreamError(f"candidate {cand.short} is {cand.status}: nothing to dream on")
    files = manifest_of(db_path, cand.data_version)["files"]
    train_rows = read_jsonl(Path(files["train"]))
    corpus = [(r["prompt"], r["response"]) for split in ("train", "validation") if split in files
              for r in read_jsonl(Path(files[split]))]
    with connect(db_path) as con:
        pool = replay_pool(con) if table_exists(con, REPLAY_TABLE) else []
    dream_id = dream_id_for(cand, recipe, sorted(r["record_id"] for r in pool))
    out_dir = dreams_root(home) / dream_id
    if not force and (out_dir / MANIFEST).is_file() and recorded(db_path, dream_id):
        info = json.loads((out_dir / MANIFEST).read_text())
        log(f"dream set {dream_id} already made for candidate {cand.short} with this recipe: reused")
        return DreamResult(**{**info, "path": out_dir, "unchanged": True})

    judge = judge or make_judge(gate_recipe.judge)
    if candidate_generator is None:
        from sleep_pipeline.gate.evaluate import load_for_eval

        model, tok = load_for_eval(Path(cand.path))
        candidate_generator = LocalGenerator(model, tok, f"candidate:{cand.candidate_id}", recipe.generator.batch_size)
    generator = make_generator(recipe.generator, db_path, cand, candidate_generator)
    rng = random.Random(f"{recipe.seed}-{cand.candidate_id}")
    items: list[DreamItem] = []
    stats: dict[str, dict] = {}
    library: list[dict] = []

    sc = recipe.self_consistency
    if sc.enabled and sc.prompts:
        log(f"self-consistency: {sc.prompts} prompts x {sc.samples} samples from {generator.identity}")
        made, stats["self_consistency"] = SelfConsistency(sc.prompts, sc.samples, sc.agreement, sc.temperature,
                                                          sc.top_p, sc.max_new_tokens).run(train_rows, generator, rng,
                                                                                           recipe.seed)
        items += made
    cf = recipe.counterfactual
    if cf.enabled and cf.items:
        made, stats["counterfactual"] = Counterfactual(cf.items).run(train_rows, rng)
        log(f"counterfactual: {len(made)} items from {stats['counterfactual']['tried']} verified seeds")
        items += made
    rt = recipe.red_team
    if rt.enabled and (rt.seeds or rt.benign or rt.plain):
        harmful = plain_harmful(train_rows, recipe)
        benign = [r for r in train_rows if r.get("bucket") == "benign"]
        log(f"red team: {min(rt.seeds, len(harmful))} attacks, {min(rt.benign, len(benign))} look-alikes and "
            f"{min(rt.plain, len(benign))} plain everyday requests against candidate {cand.short}")
        made, library, stats["red_team"] = RedTeam(rt.seeds, list(rt.transforms), rt.benign, rt.max_new_tokens,
                                                   plain=rt.plain).run(harmful, benign, candidate_generator, judge, rng)
        items += made
    rp = recipe.replay
    if rp.enabled:
        made, stats["replay"] = Replay(rp.max_share, rp.max_times_replayed).run(pool, len(items), rng)
        items += made

    log(f"quality gate: {len(items)} items against the gate's suites (frozen ones included) and the corpus")
    suites = gate_run.suites_for_candidate(db_path, home, cand, gate_recipe)
    guard = quality.ContaminationGuard(quality.suite_prompts(suites), recipe.quality.near_duplicate_jaccard)
    decisions = quality.decide(items, guard, corpus, judge, recipe.quality)
    accepted = [it for it, (ok, _) in zip(items, decisions) if ok]
    reasons = Counter(reason.split(":")[0] for _, reason in decisions)
    by_strategy: dict[str, dict[str, int]] = {}
    for it, (ok, _) in zip(items, decisions):
        s = by_strategy.setdefault(it.strategy, {"items": 0, "accepted": 0, "pairs": 0})
        s["items"] += 1
        s["accepted"] += int(ok)
        s["pairs"] += int(ok and it.rejected is not None)

    now = utcnow()
    rows = [{**it.to_row(), "dream_id": dream_id, "candidate_id": cand.candidate_id, "accepted": ok, "reason": reason,
             "created_at": now} for it, (ok, reason) in zip(items, decisions)]
    with connect(db_path) as con:
        ensure_schema(con)
        con.execute(f"DELETE FROM {DREAM_TABLE} WHERE dream_id = ?", [dream_id])
        insert_rows(con, DREAM_TABLE, DREAM_COLUMNS, rows)
    if library:
        with connect(db_path) as con:
            redteam.ensure_schema(con)
            con.execute(f"DELETE FROM {redteam.LIBRARY_TABLE} WHERE refresh_id = ?", [dream_id])
        redteam.record(db_path, dream_id, library)
    replayed = [it.source_id for it in accepted if it.strategy == Replay.name]
    if replayed:
        with connect(db_path) as con:
            mark_replayed(con, dream_id, replayed)  # counts toward max_times_replayed, as a mix's draw does
    batch = rater.enqueue(db_path, dream_id, accepted, recipe.quality.rater_sample, recipe.seed)
    result = DreamResult(dream_id=dream_id, candidate_id=cand.candidate_id, path=out_dir, items=len(items),
                         accepted=len(accepted), by_strategy=by_strategy, reasons=dict(reasons), strategy_stats=stats,
                         rater_batch=batch, seconds=round(time.time() - t0, 1))
    _write(out_dir, accepted, result, rng)
    log(f"dream set {dream_id}: {len(accepted)} of {len(items)} items accepted "
        f"({', '.join(f'{k} {v}' for k, v in sorted(reasons.items()))}); {len(batch)} queued for people to spot-check")
    return result


def training_row(it: DreamItem) -> dict:
    row = {"record_id": f"dream:{it.item_id}", "bucket": it.bucket, "strategy": it.strategy, "system": it.system,
           "prompt": it.prompt, "response": it.chosen}
    if it.rejected is not None:
        row["rejected"] = it.rejected
    if it.history:
        row["history"] = it.history  # the turns before the prompt (a multi-turn attack)
    if it.meta.get("kind"):
        row["kind"] = it.meta["kind"]  # red team: attack, look_alike or plain (the blend balances them)
    return row


def _write(out_dir: Path, accepted: list[DreamItem], result: DreamResult, rng: random.Random) -> None:
    rows = [training_row(it) for it in accepted]
    rng.shuffle(rows)
    n_val = int(len(rows) * VALIDATION_SHARE)
    stage = out_dir.with_name(out_dir.name + f".tmp-{os.getpid()}")
    shutil.rmtree(stage, ignore_errors=True)
    stage.mkdir(parents=True)
    for split, part in (("validation", rows[:n_val]), ("train", rows[n_val:])):
        with open(stage / f"{split}.jsonl", "w", encoding="utf-8") as fh:
            fh.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in part)
    info = {k: v for k, v in result.__dict__.items() if k not in ("path", "unchanged")}
    (stage / MANIFEST).write_text(json.dumps(info, indent=2, sort_keys=True))  # written last: marks it complete
    if out_dir.exists():
        shutil.rmtree(out_dir)
    os.replace(stage, out_dir)


@dataclass
class LibraryRefresh:
    refresh_id: str
    candidate_id: str
    attempts: int
    succeeded: int
    coverage: dict


def refresh_library(db_path: Path, home: Path, candidate_id: str, recipe: DreamRecipe, gate_recipe, log=print,
                    judge=None, defender=None) -> LibraryRefresh:
    """Attack the candidate with every transform on every harm category of its train split
    (``red_team.library_per_cell`` seeds each) and add the attempts to ``red_team_library``."""
    from sleep_pipeline.gate.judge import make_judge

    cand = candidates.get(db_path, candidate_id)
    rows = read_jsonl(Path(manifest_of(db_path, cand.data_version)["files"]["train"]))
    harmful = plain_harmful(rows, recipe)
    if not harmful:
        raise DreamError(f"the train split of {cand.data_version} has no harmful rows with a category to attack with")
    if defender is None:
        from sleep_pipeline.gate.evaluate import load_for_eval

        model, tok = load_for_eval(Path(cand.path))
        defender = LocalGenerator(model, tok, f"candidate:{cand.candidate_id}", recipe.generator.batch_size)
    refresh_id = f"library-{utcnow().strftime('%Y%m%dT%H%M%S')}-{cand.candidate_id[:8]}"
    rt = recipe.red_team
    log(f"red-team library refresh {refresh_id}: {len(rt.transforms)} transforms x the harm categories, "
        f"{rt.library_per_cell} attacks each, against candidate {cand.short}")
    entries = redteam.attack_grid(harmful, list(rt.transforms), rt.library_per_cell, defender,
                                  judge or make_judge(gate_recipe.judge), random.Random(f"{recipe.seed}-{refresh_id}"),
                                  rt.max_new_tokens)
    redteam.record(db_path, refresh_id, entries)
    won = sum(e["succeeded"] for e in entries)
    log(f"red-team library refresh {refresh_id}: {won} of {len(entries)} attacks succeeded")
    return LibraryRefresh(refresh_id, cand.candidate_id, len(entries), won, redteam.coverage(redteam.entries(db_path)))
