"""``sleep-pipeline`` command line.

    sleep-pipeline dedup IN.jsonl --out DIR [--threshold 0.8] [--num-perm 128] [--shingle-size 5]

reads one JSON object per line (a ``text`` field, optional ``id`` and ``tier``), applies the quality
filters and exact + near deduplication, and writes ``kept.jsonl``, ``duplicates.jsonl`` (each
duplicate with ``duplicate_of``, kind, similarity and cluster), ``quarantine.jsonl`` (line, reason,
detail) and ``summary.json``, then prints the summary.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import asdict
from pathlib import Path

from sleep_pipeline.config import DedupConfig, QualityConfig, RecipeError, SourceConfig
from sleep_pipeline.data.corpus import clean_and_dedup
from sleep_pipeline.data.ingest import QuarantineRow, SourceError, read_source
from sleep_pipeline.progress import stderr_log


def _write_jsonl(path: Path, rows) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        for r in rows:
            fh.write(json.dumps(r, ensure_ascii=False) + "\n")


def cmd_dedup(args: argparse.Namespace) -> int:
    src = SourceConfig(name="input", path=Path(args.input).resolve(), format="jsonl", tier=args.default_tier,
                       bucket="benign", fields={"id": "id", "text": "text"})
    quality = QualityConfig(min_chars=args.min_chars, max_chars=args.max_chars, max_record_bytes=args.max_record_bytes)
    dedup_cfg = DedupConfig(threshold=args.threshold, num_perm=args.num_perm, shingle_size=args.shingle_size,
                            seed=args.seed, boilerplate_doc_share=args.boilerplate_doc_share)
    log = None if args.quiet else stderr_log
    ingest = read_source(src, quality)
    quarantine: list[QuarantineRow] = list(ingest.quarantine)
    rows = []
    for r in ingest.records:
        meta = json.loads(r["meta"])
        tier = meta.pop("tier", args.default_tier)
        if tier not in (1, 2, 3):
            quarantine.append(QuarantineRow("ingest", "input", r["line_no"], r["record_id"], "bad_field_type",
                                            f"tier must be 1, 2 or 3, got {tier!r}", r["response"][:200]))
            continue
        rows.append({**r, "tier": tier, "meta": json.dumps(meta)})
    cleaned = clean_and_dedup(rows, quality, dedup_cfg, log=log, scrub=args.scrub_pii)
    quarantine.extend(cleaned.rejected)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    strip = lambda rid: rid.split(":", 1)[1] if rid and rid.startswith("input:") else rid  # noqa: E731
    _write_jsonl(out / "kept.jsonl", ({"id": strip(r["record_id"]), "line": r["line_no"], "tier": r["tier"], "text": r["response"]}
                                      for r in cleaned.kept))
    _write_jsonl(out / "duplicates.jsonl", ({"id": strip(d["record_id"]), "line": d["line_no"], "tier": d["tier"],
                                             "duplicate_of": strip(d["duplicate_of"]), "kind": d["kind"],
                                             "similarity": d["similarity"], "cluster": strip(d["cluster_id"])}
                                            for d in cleaned.duplicates))
    _write_jsonl(out / "quarantine.jsonl", ({"line": q.line_no, "id": strip(q.record_id), "reason": q.reason,
                                             "detail": q.detail, "excerpt": q.excerpt} for q in quarantine))
    reasons: dict[str, int] = {}
    for q in quarantine:
        reasons[q.reason] = reasons.get(q.reason, 0) + 1
    summary = {
        "input": str(src.path),
        "records_in": ingest.lines_in,
        "kept": len(cleaned.kept),
        "duplicates": len(cleaned.duplicates),
        "exact_duplicates": sum(d["kind"] == "exact" for d in cleaned.duplicates),
        "near_duplicates": sum(d["kind"] == "near" for d in cleaned.duplicates),
        "quarantined": len(quarantine),
        "quarantine_reasons": reasons,
        "balanced": ingest.lines_in == len(cleaned.kept) + len(cleaned.duplicates) + len(quarantine),
        "dedup": {**asdict(dedup_cfg), **cleaned.result.stats},
        "out": str(out.resolve()),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary, indent=2))
    return 0


def _home(args: argparse.Namespace) -> Path:
    import os

    return Path(args.home or os.environ.get("SLEEP_PIPELINE_HOME") or Path.cwd() / ".sleep_pipeline")


def cmd_release_list(args: argparse.Namespace) -> int:
    from sleep_pipeline.release import registry

    db = _home(args) / "sleep.duckdb"
    current = registry.live(db)
    canary = registry.canary(db)
    rows = registry.list_releases(db)
    if not rows:
        print("no releases yet")
        return 0
    print(f"{'':2}{'version':8} {'created':19} {'candidate':12} {'cycle':18} {'data version':22} {'gate report':32} "
          "checkpoint")
    for r in rows:
        mark = "* " if current and r.version == current.version else ("c " if canary and r.version == canary[0].version
                                                                        else "  ")
        state = f"  REVOKED: {r.revoke_reason}" if r.revoked else ""
        print(f"{mark}{r.version:8} {str(r.created_at)[:19]:19} {r.checkpoint_sha256[:12]:12} {r.cycle_id or '':18} "
              f"{r.data_version or '':22} {r.gate_report_id or '':32} {r.checkpoint_path}{state}")
    print("(* = live, c = canary)")
    for a in registry.open_alarms(db):
        print(f"open alarm {a['alarm_id']} on {a['version']} ({a['source']}, {str(a['raised_at'])[:19]}): {a['reason']}")
    return 0


def cmd_release_promote(args: argparse.Namespace) -> int:
    from sleep_pipeline.release import registry

    db = _home(args) / "sleep.duckdb"
    before = registry.live(db)
    rel = registry.promote(db, args.version, reason=args.reason)
    print(f"promoted canary {rel.version} to live (was {before.version if before else None})")
    return 0


def cmd_alarm(args: argparse.Namespace) -> int:
    from sleep_pipeline.release import registry

    db = _home(args) / "sleep.duckdb"
    if args.alarm_command == "raise":
        live = registry.live(db)
        version = args.version or (live.version if live else None)
        if version is None:
            raise ValueError("nothing is live: name the release (--version)")
        print(f"alarm {registry.raise_alarm(db, version, args.reason, args.source)} raised on {version}")
    elif args.alarm_command == "clear":
        registry.clear_alarm(db, args.alarm, args.reason)
        print(f"alarm {args.alarm} cleared")
    else:
        alarms = registry.open_alarms(db)
        for a in alarms:
            print(f"{a['alarm_id']}  {a['version']:8} {str(a['raised_at'])[:19]}  {a['source']:16} {a['reason']}")
        if not alarms:
            print("no open alarms")
    return 0


def cmd_release_rollback(args: argparse.Namespace) -> int:
    from sleep_pipeline.release import registry

    db = _home(args) / "sleep.duckdb"
    before = registry.live(db)
    rel = registry.rollback(db, args.version, reason=args.reason)
    print(f"live: {before.version if before else None} -> {rel.version} ({rel.checkpoint_path})")
    return 0


def cmd_release_revoke(args: argparse.Namespace) -> int:
    from sleep_pipeline.release import registry

    db = _home(args) / "sleep.duckdb"
    before = registry.live(db)
    rel, now_live = registry.revoke(db, args.version, args.reason)
    print(f"revoked {rel.version} ({args.reason})")
    if before and now_live and before.version != now_live.version:
        print(f"live: {before.version} -> {now_live.version} ({now_live.checkpoint_path})")
    return 0


def cmd_candidates_list(args: argparse.Namespace) -> int:
    from sleep_pipeline import candidates

    rows = candidates.list_candidates(_home(args) / "sleep.duckdb")
    if not rows:
        print("no candidates yet")
        return 0
    print(f"{'candidate':12} {'phase':8} {'status':9} {'created':19} {'data version':22} {'parents':14} path")
    for c in rows:
        print(f"{c.short:12} {c.phase:8} {c.status:9} {str(c.created_at)[:19]:19} {c.data_version or '':22} "
              f"{','.join(p[:12] for p in c.parents) or '-':14} {c.path}")
    return 0


def cmd_candidates_purge(args: argparse.Namespace) -> int:
    from sleep_pipeline import candidates

    cand = candidates.purge(_home(args) / "sleep.duckdb", args.candidate, args.reason)
    print(f"purged candidate {cand.short}: its files are deleted, its record stays ({cand.path})")
    return 0


def cmd_gate_override(args: argparse.Namespace) -> int:
    from sleep_pipeline.gate.run import override

    cand = override(_home(args) / "sleep.duckdb", args.candidate, args.reason)
    print(f"override recorded for candidate {cand.short}: a later passing gate may release it ({args.reason})")
    return 0


def cmd_import(args: argparse.Namespace) -> int:
    from sleep_pipeline.importer import import_model

    home = _home(args)
    res = import_model(Path(args.path), home / "sleep.duckdb", home / "models", name=args.name,
                       gguf_file=args.gguf_file, log=None if args.quiet else stderr_log)
    cand = res.candidate
    what = "imported" if res.created else "already imported, nothing written:"
    print(f"{what} {args.path} -> candidate {cand.short} (phase {cand.phase}, {res.seconds:.1f} s)")
    print(f"candidate: {cand.candidate_id}\npath: {cand.path}\nalias: {res.alias}\nbase model: {cand.base_model}")
    return 0


def cmd_rater_next(args: argparse.Namespace) -> int:
    from sleep_pipeline.dream import rater

    item = rater.next_pending(_home(args) / "sleep.duckdb", args.batch)
    if item is None:
        print("nothing to review: every queued dream item has a decision")
        return 0
    print(f"batch {item['batch_id']}  item {item['item_id']}  strategy {item['strategy']}  bucket {item['bucket']}")
    if item["system"]:
        print(f"--- system\n{item['system']}")
    print(f"--- prompt\n{item['prompt']}\n--- {'chosen answer' if item['rejected'] is not None else 'answer'}\n{item['chosen']}")
    if item["rejected"] is not None:
        print(f"--- rejected answer (the model should prefer the one above)\n{item['rejected']}")
    print(f"--- decide: sleep-pipeline rater approve {item['item_id'][:12]}   |   "
          f"sleep-pipeline rater reject {item['item_id'][:12]} --note WHY")
    return 0


def cmd_rater_decide(args: argparse.Namespace) -> int:
    from sleep_pipeline.dream import rater

    db = _home(args) / "sleep.duckdb"
    row = rater.decide(db, args.item, args.rater_command, args.reviewer, args.note or "", args.batch)
    status = rater.batch_status(db, row["batch_id"])
    print(f"{row['status']} {row['item_id'][:12]} in batch {row['batch_id']}: batch {status['state']} "
          f"({status['approved']} approved, {status['rejected']} rejected, {status['pending']} pending)")
    return 0


def cmd_redteam_add(args: argparse.Namespace) -> int:
    from sleep_pipeline.dream import redteam

    n = redteam.add_curated(_home(args) / "sleep.duckdb", Path(args.file), args.curator)
    print(f"added {n} curated entries to the red-team library")
    return 0


def _home_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--home", help="storage dir (default: $SLEEP_PIPELINE_HOME or ./.sleep_pipeline)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sleep-pipeline", description="Sleep-cycle pipeline tools.")
    sub = parser.add_subparsers(dest="command", required=True)
    d = sub.add_parser("dedup", help="Clean and deduplicate a JSONL corpus (a `text` field per line).")
    d.add_argument("input", help="JSONL file: one object per line with `text`, optional `id` and `tier` (1-3)")
    d.add_argument("--out", required=True, help="output directory")
    d.add_argument("--threshold", type=float, default=DedupConfig.threshold, help="Jaccard similarity for near duplicates")
    d.add_argument("--num-perm", type=int, default=DedupConfig.num_perm)
    d.add_argument("--shingle-size", type=int, default=DedupConfig.shingle_size)
    d.add_argument("--seed", type=int, default=DedupConfig.seed)
    d.add_argument("--boilerplate-doc-share", type=float, default=DedupConfig.boilerplate_doc_share,
                   help="template text: ignore shingles found in the `prompt` of more than this share of records "
                        "(a `text` is always compared in full)")
    d.add_argument("--default-tier", type=int, default=1, choices=(1, 2, 3))
    d.add_argument("--min-chars", type=int, default=QualityConfig.min_chars)
    d.add_argument("--max-chars", type=int, default=QualityConfig.max_chars)
    d.add_argument("--max-record-bytes", type=int, default=QualityConfig.max_record_bytes)
    d.add_argument("--scrub-pii", action="store_true", help="replace e-mails, phone numbers, IPs, cards and keys")
    d.add_argument("--quiet", action="store_true", help="no progress lines")
    d.set_defaults(func=cmd_dedup)

    rel = sub.add_parser("release", help="The release registry: list releases, roll back / hot switch.")
    rel_sub = rel.add_subparsers(dest="release_command", required=True)
    ls = rel_sub.add_parser("list", help="all releases; * marks the live one")
    _home_arg(ls)
    ls.set_defaults(func=cmd_release_list)
    rb = rel_sub.add_parser("rollback", help="make VERSION live (default: the release that was live before the current one)")
    rb.add_argument("version", nargs="?", default=None)
    rb.add_argument("--reason", default="manual rollback")
    _home_arg(rb)
    rb.set_defaults(func=cmd_release_rollback)
    pr = rel_sub.add_parser("promote", help="make the canary release live (stable); refused while it has an open alarm")
    pr.add_argument("version", nargs="?", default=None, help="the canary meant (refused if the canary is another one)")
    pr.add_argument("--reason", default="promoted by a person")
    _home_arg(pr)
    pr.set_defaults(func=cmd_release_promote)
    rv = rel_sub.add_parser("revoke", help="mark VERSION unusable (rollbacks skip it); if live, switch back first")
    rv.add_argument("version")
    rv.add_argument("--reason", required=True)
    _home_arg(rv)
    rv.set_defaults(func=cmd_release_revoke)

    al = sub.add_parser("alarm", help="Regression alarms on a release: block its canary's promotion, let the daily "
                                      "rhythm roll back, start a cycle early (training trigger).")
    al_sub = al.add_subparsers(dest="alarm_command", required=True)
    ar = al_sub.add_parser("raise", help="raise an alarm on a release (default: the live one)")
    ar.add_argument("--reason", required=True)
    ar.add_argument("--version")
    ar.add_argument("--source", default="person", help="who raises it (monitoring, person, ...)")
    _home_arg(ar)
    ac = al_sub.add_parser("clear", help="clear an open alarm")
    ac.add_argument("alarm")
    ac.add_argument("--reason", required=True)
    _home_arg(ac)
    alist = al_sub.add_parser("list", help="open alarms")
    _home_arg(alist)
    for p_ in (ar, ac, alist):
        p_.set_defaults(func=cmd_alarm)

    cands = sub.add_parser("candidates", help="Model candidates: every model a cycle produced, with its lineage.")
    cands_sub = cands.add_subparsers(dest="candidates_command", required=True)
    cl = cands_sub.add_parser("list", help="all candidates: id, phase, status, data version, parents, path")
    _home_arg(cl)
    cl.set_defaults(func=cmd_candidates_list)
    cp = cands_sub.add_parser("purge", help="delete a candidate's files even if it was released (never the live one)")
    cp.add_argument("candidate", help="candidate id or unique prefix")
    cp.add_argument("--reason", required=True)
    _home_arg(cp)
    cp.set_defaults(func=cmd_candidates_purge)

    g = sub.add_parser("gate", help="Gate decisions.")
    g_sub = g.add_subparsers(dest="gate_command", required=True)
    go = g_sub.add_parser("override", help="let a later passing gate release a candidate an earlier gate rejected")
    go.add_argument("candidate", help="candidate id or unique prefix")
    go.add_argument("--reason", required=True)
    _home_arg(go)
    go.set_defaults(func=cmd_gate_override)

    im = sub.add_parser("import", help="Import a local GGUF file or Hugging Face model directory as a candidate.")
    im.add_argument("path", help="a .gguf file, a directory holding one, or a Hugging Face model directory")
    im.add_argument("--gguf-file", help="the GGUF file inside PATH (a directory) to import")
    im.add_argument("--name", help="alias name: the model is reachable as STORAGE/models/NAME "
                                   "(default: the file name without its quantisation suffix)")
    im.add_argument("--quiet", action="store_true", help="no progress lines")
    _home_arg(im)
    im.set_defaults(func=cmd_import)
    ra = sub.add_parser("rater", help="Spot-check dream items: a release waits for its dream batch's review.")
    ra_sub = ra.add_subparsers(dest="rater_command", required=True)
    rn = ra_sub.add_parser("next", help="show the oldest queued item without a decision")
    rn.add_argument("--batch", help="only this dream batch (dream id)")
    _home_arg(rn)
    rn.set_defaults(func=cmd_rater_next)
    for verb in ("approve", "reject"):
        rd = ra_sub.add_parser(verb, help=f"{verb} a queued item (id or unique prefix)")
        rd.add_argument("item")
        rd.add_argument("--reviewer", default=os.environ.get("USER") or "", help="who decides (default: $USER)")
        rd.add_argument("--note", help="why (shown in the queue)")
        rd.add_argument("--batch", help="the dream batch, where an item id prefix is ambiguous")
        _home_arg(rd)
        rd.set_defaults(func=cmd_rater_decide)

    rt = sub.add_parser("redteam", help="The red-team library.")
    rt_sub = rt.add_subparsers(dest="redteam_command", required=True)
    radd = rt_sub.add_parser("add", help="add people's curated attacks from a JSONL file "
                                         "(category, attack_prompt; optional transform, seed_prompt, response, succeeded)")
    radd.add_argument("file")
    radd.add_argument("--curator", default=os.environ.get("USER") or "curator")
    _home_arg(radd)
    radd.set_defaults(func=cmd_redteam_add)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (RecipeError, SourceError, ValueError, RuntimeError) as exc:
        print(f"sleep-pipeline: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
