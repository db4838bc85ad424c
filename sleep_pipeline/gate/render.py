"""Markdown views of gate results for the Dagster UI: the suites, the metrics table, the forgetting
monitor and bullet lists. They read stored reports and verdicts; nothing here decides anything."""

from __future__ import annotations

from sleep_pipeline.gate.decide import bound_text, fmt
from sleep_pipeline.gate.suites import TASK_BY_NAME


def bullets(items) -> str:
    return "\n".join(f"- {x}" for x in items) or "none"


def suites_table(info: dict) -> str:
    """The suite manifest as a table: task, check, items, items dropped as seen in training, what it measures."""
    lines = ["| task | check | items | dropped | measures |", "|---|---|---|---|---|"]
    for t, n in info["counts"].items():
        spec = TASK_BY_NAME[t]
        lines.append(f"| {t} | {spec.kind} | {n} | {info['dropped'][t]} | {spec.description} |")
    return "\n".join(lines)


def metrics_table(verdict: dict) -> str:
    lines = ["| check | task | metric | value | ± stderr | threshold | live | delta | untrained/start | pass |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in verdict["rows"]:
        bound = bound_text(r["threshold"], r["higher_is_better"])
        ok = "—" if r["passed"] is None else ("yes" if r["passed"] else "**no**")
        lines.append(f"| {r['kind']} | {r['task']} | {r['metric']} | {fmt(r['value'])} | {fmt(r['stderr'])} | {bound} | "
                     f"{fmt(r['live'])} | {fmt(r['delta'], signed=True)} | {fmt(r['base'])} | {ok} |")
    return "\n".join(lines)


def forgetting_table(verdict: dict) -> str:
    """The verdict's forgetting monitor: per bucket, the headline metric vs the reference model."""
    rows = verdict.get("forgetting") or []
    if not rows:
        return "nothing to compare with"
    lines = ["| bucket | metric | reference | reference value | candidate | delta | noise interval | status |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        status = "**fail**" if r["status"] == "fail" else r["status"]
        lines.append(f"| {r['bucket']} | {r['task']}/{r['metric']} | {r.get('reference', 'the live release')} | "
                     f"{r['live']:.3f} | {r['value']:.3f} | {r['delta']:+.3f} | ±{r['noise']:.3f} | {status} |")
    return "\n".join(lines)
