"""The Dream fine-tune's training set: blend(dpo pairs, synthetic, sft replay) at the recipe's shares.

* **dpo_pairs** -- the dream set's accepted preference pairs (red-team refusals over compliances,
  verified chains over wrong ones, counterfactual answers over stale ones, look-alike answers over
  refusals);
* **synthetic** -- its accepted SFT rows (verified majority chains, replayed hard examples);
* **sft_replay** -- rows of the candidate's own training mix, so the short Dream phase does not pull the
  model away from what Learn taught it.

No part is up-sampled: the blend is as large as the scarcest dream part allows at its share (capped by
``max_rows``). A part with nothing available gives its share to the others, and the blend says so. The
validation split is the dream set's own plus mix validation rows at the replay share. Files go to
``<dream dir>/blend-<id>/`` through a temporary directory, ``manifest.json`` last, so a crash leaves no
valid-looking blend.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from sleep_pipeline.config import stable_hash
from sleep_pipeline.dream.recipe import FinetuneSpec
from sleep_pipeline.train.modeling import read_jsonl

MANIFEST = "manifest.json"
DREAM_PARTS = ("dpo_pairs", "synthetic")
BALANCE_VERSION = 3  # how answer-over-refusal pairs are balanced against attack pairs (part of the blend id)


class BlendError(RuntimeError):
    pass


@dataclass
class Blend:
    blend_id: str
    dream_id: str
    path: Path
    counts: dict[str, int]  # train rows per part
    validation: dict[str, int]
    available: dict[str, int]
    shares: dict[str, float]  # the shares used (after parts with nothing available gave theirs away)
    notes: list[str] = field(default_factory=list)

    @property
    def rows(self) -> int:
        return sum(self.counts.values())

    def table_markdown(self) -> str:
        lines = ["| part | share | available | train rows | validation rows |", "|---|---|---|---|---|"]
        for part in ("dpo_pairs", "synthetic", "sft_replay"):
            lines.append(f"| {part} | {self.shares.get(part, 0.0):.2f} | {self.available.get(part, 0)} | "
                         f"{self.counts.get(part, 0)} | {self.validation.get(part, 0)} |")
        return "\n".join(lines)


def _answer_over_refusal(row: dict) -> str | None:
    """The kind of a red-team answer-over-refusal pair (``look_alike``: a benign request dressed as an
    attack; ``plain``: an everyday request as it is), else None."""
    if row.get("strategy") == "red_team" and row.get("bucket") == "benign":
        return row.get("kind") or "look_alike"
    return None


def _refusal_over_answer(row: dict) -> bool:
    """A red-team attack pair: a refusal preferred to the candidate's compliance."""
    return row.get("strategy") == "red_team" and row.get("bucket") != "benign"


def split_dream_rows(rows: list[dict]) -> tuple[dict[str, list[dict]], list[str]]:
    """The dream set's rows by blend part, and notes. Answer-over-refusal pairs (look-alikes and plain
    everyday requests together) are kept to at most as many as attack pairs (a refusal preferred to a
    compliance), shared between the two kinds as evenly as they allow. They are there to keep the attack
    pairs from teaching refusal in general, and on their own they teach the opposite: the rejected refusal
    of one is the chosen refusal of the other, so whichever side has more pairs moves every refusal its
    way. Measured: 16 look-alike against 8 attack pairs took the embedded default's held-out harmful
    refusal from 0.59 to 0.08 (learning rate 2e-4); 12 look-alike and 12 plain against 12 attack pairs
    raised SmolLM2's held-out jailbreak trigger rate from 0.72 to 0.81. As SFT rows instead of pairs they
    made SmolLM2 refuse more everyday requests (0.03 -> 0.19): the pair is what says a refusal is wrong
    there."""
    pairs = [r for r in rows if r.get("rejected") is not None]
    attacks = sum(_refusal_over_answer(r) for r in pairs)
    labels = {"look_alike": "look-alike", "plain": "plain everyday"}
    by_kind = {k: [r for r in pairs if _answer_over_refusal(r) == k] for k in labels}
    room, notes, drop = attacks, [], set()
    for i, (kind, of_kind) in enumerate(sorted(by_kind.items(), key=lambda kv: len(kv[1]))):
        keep = min(len(of_kind), room // (len(by_kind) - i))  # the scarcer kind first; what it leaves goes on
        room -= keep
        if keep < len(of_kind):
            drop |= {id(r) for r in of_kind[keep:]}
            notes.append(f"dpo_pairs: {len(of_kind) - keep} of {len(of_kind)} {labels[kind]} pairs left out, so "
                         f"look-alike and plain pairs together do not outnumber the {attacks} attack pairs")
    pairs = [r for r in pairs if id(r) not in drop]
    return {"dpo_pairs": pairs, "synthetic": [r for r in rows if r.get("rejected") is None]}, notes


def plan_counts(available: dict[str, int], shares: dict[str, float], max_rows: int) -> tuple[dict[str, int], dict[str, float], list[str]]:
    """Rows per part: the largest blend in which no part is up-sampled, at the shares of the parts that
    have something available (renormalised), at most ``max_rows`` (0: no cap)."""
    notes = []
    used = {k: v for k, v in shares.items() if v > 0 and available.get(k, 0) > 0}
    for k, v in shares.items():
        if v > 0 and not available.get(k, 0):
            notes.append(f"{k}: nothing available, its share {v:.2f} goes to the other parts")
    if not any(k in used for k in DREAM_PARTS):
        raise BlendError("the dream set has no accepted pair or SFT row with a share in the blend: nothing to dream on")
    total = sum(used.values())
    norm = {k: v / total for k, v in used.items()}
    n = min(available[k] / norm[k] for k in norm)
    if max_rows:
        n = min(n, max_rows)
    counts = {k: min(available[k], int(round(n * norm[k]))) for k in norm}
    return counts, norm, notes


def blend_id_for(dream_id: str, data_version: str, spec: FinetuneSpec, seed: int) -> str:
    return "blend-" + stable_hash({"dream": dream_id, "data_version": data_version, "shares": spec.blend,
                                   "max_rows": spec.max_rows, "seed": seed, "balance": BALANCE_VERSION})[:12]


def build_blend(dream_dir: Path, dream_id: str, mix_files: dict, data_version: str, spec: FinetuneSpec,
                seed: int) -> Blend:
    """The blend for dream set ``dream_dir`` (see the module docstring); an existing complete one is reused."""
    dream_dir = Path(dream_dir)
    if not (dream_dir / MANIFEST).is_file():
        raise BlendError(f"{dream_dir} is not a complete dream set (no {MANIFEST}): materialise dream_set first")
    blend_id = blend_id_for(dream_id, data_version, spec, seed)
    out = dream_dir / blend_id
    if (out / MANIFEST).is_file():
        info = json.loads((out / MANIFEST).read_text())
        return Blend(**{k: info[k] for k in ("blend_id", "dream_id", "counts", "validation", "available", "shares",
                                              "notes")}, path=out)
    dream_train, balance_notes = split_dream_rows(read_jsonl(dream_dir / "train.jsonl"))
    dream_val = read_jsonl(dream_dir / "validation.jsonl") if (dream_dir / "validation.jsonl").exists() else []
    mix_train = read_jsonl(Path(mix_files["train"]))
    mix_val = read_jsonl(Path(mix_files["validation"])) if mix_files.get("validation") else []
    available = {**{k: len(v) for k, v in dream_train.items()}, "sft_replay": len(mix_train)}
    counts, norm, notes = plan_counts(available, spec.shares, spec.max_rows)
    notes = balance_notes + notes
    rng = random.Random(f"{seed}-{blend_id}")
    pools = {**dream_train, "sft_replay": mix_train}
    train: list[dict] = []
    for part, n in counts.items():
        train += [{**r, "blend_part": part} for r in rng.sample(pools[part], n)]
    rng.shuffle(train)
    val = [{**r, "blend_part": "dpo_pairs" if r.get("rejected") is not None else "synthetic"} for r in dream_val]
    replay_share = norm.get("sft_replay", 0.0)
    n_val_replay = min(len(mix_val), int(round(len(val) * replay_share / max(1e-9, 1 - replay_share))))
    val += [{**r, "blend_part": "sft_replay"} for r in rng.sample(mix_val, n_val_replay)]
    validation = {p: sum(1 for r in val if r["blend_part"] == p) for p in norm}
    blend = Blend(blend_id, dream_id, out, counts, validation, available, {k: round(v, 4) for k, v in norm.items()},
                  notes)
    stage = out.with_name(out.name + f".tmp-{os.getpid()}")
    shutil.rmtree(stage, ignore_errors=True)
    stage.mkdir(parents=True)
    for split, rows in (("train", train), ("validation", val)):
        with open(stage / f"{split}.jsonl", "w", encoding="utf-8") as fh:
            fh.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    info = {k: v for k, v in blend.__dict__.items() if k != "path"}
    (stage / MANIFEST).write_text(json.dumps({**info, "data_version": data_version}, indent=2, sort_keys=True))
    if out.exists():
        shutil.rmtree(out)
    os.replace(stage, out)
    return blend
