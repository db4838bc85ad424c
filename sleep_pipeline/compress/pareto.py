"""The capability–cost record: every compressed candidate beside its uncompressed parent, the Pareto
front, the red lines and the choice.

Rows accumulate in the DuckDB table ``compress_measurements`` across cycles (one row per candidate
per Compress run, the parent included). A candidate is on the front when no other candidate of the
same run is at least as capable and at least as cheap, and strictly better in one of the two.
Selection: the red lines -- the largest drop the recipe allows, per group (reasoning, diversity,
overall capability, safety), against the uncompressed parent -- rule candidates out first; the choice
is the cheapest point on the front of those that remain (the parent among them). When none qualifies, the parent passes through and the reasons are recorded.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from sleep_pipeline.plots import figure_markdown
from sleep_pipeline.store import connect, query_dicts, utcnow

SCHEMA = """
CREATE TABLE IF NOT EXISTS compress_measurements (
    run_id VARCHAR, created_at TIMESTAMP, parent_id VARCHAR, recipe_hash VARCHAR, candidate_id VARCHAR, kind VARCHAR,
    capability DOUBLE, reasoning DOUBLE, safety DOUBLE, distinct_2 DOUBLE, self_bleu DOUBLE,
    perplexity_bits_per_byte DOUBLE, size_mb DOUBLE, parameters BIGINT, latency_ms_per_token_b1 DOUBLE,
    latency_ms_per_token_batch DOUBLE, tokens_per_s_batch DOUBLE, peak_memory_mb DOUBLE,
    cpu_s_per_1k_tokens DOUBLE, energy_j_per_1k_tokens DOUBLE, on_front BOOLEAN, within_red_lines BOOLEAN,
    selected BOOLEAN, verdict VARCHAR, measurement VARCHAR
);
"""
COST_METRICS = ("latency_ms_per_token_b1", "latency_ms_per_token_batch", "size_mb", "peak_memory_mb",
                "cpu_s_per_1k_tokens", "parameters")
RED_LINE_GROUPS = ("reasoning", "diversity", "capability", "safety")


@dataclass
class Point:
    candidate_id: str
    kind: str  # parent | merged | pruned | distilled | int8 | ...
    capability: float
    cost: float
    groups: dict[str, float]  # reasoning, capability, safety, diversity (distinct-2)
    row: dict  # everything else recorded
    on_front: bool = False
    within_red_lines: bool = False
    selected: bool = False
    verdict: str = ""


def front(points: list[Point]) -> list[Point]:
    """The points no other point dominates (capability higher or equal, cost lower or equal, one strictly)."""
    out = []
    for p in points:
        dominated = any(q is not p and q.capability >= p.capability and q.cost <= p.cost
                        and (q.capability > p.capability or q.cost < p.cost) for q in points)
        if not dominated:
            out.append(p)
    return out


def red_line_failures(point: Point, parent: Point, red_lines: dict[str, float]) -> list[str]:
    """The red lines ``point`` crosses: groups that dropped more than allowed below the parent."""
    out = []
    for group, max_drop in red_lines.items():
        before, after = parent.groups.get(group), point.groups.get(group)
        if before is None:
            continue
        if after is None:
            out.append(f"{group} not measured")
        elif after < before - max_drop:
            out.append(f"{group} {before:.3f} -> {after:.3f} (drop {before - after:.3f} > {max_drop:g})")
    return out


def select(points: list[Point], red_lines: dict[str, float]) -> Point:
    """Mark the front, the red-line verdicts and the chosen point (see the module docstring); returns it."""
    parent = next(p for p in points if p.kind == "parent")
    on_front = front(points)
    for p in points:
        p.on_front = p in on_front
        crossed = [] if p is parent else red_line_failures(p, parent, red_lines)
        p.within_red_lines = not crossed
        p.verdict = ("the uncompressed parent" if p is parent else
                     "crosses a red line: " + "; ".join(crossed) if crossed else "within the red lines")
    # the front among the candidates the red lines leave (a candidate that only a red-line crosser dominates
    # is still a valid choice); its cheapest point is the choice
    allowed = [p for p in points if p.within_red_lines]
    eligible = sorted((p for p in front(allowed) if p is not parent), key=lambda p: (p.cost, -p.capability))
    if eligible and eligible[0].cost < parent.cost:
        chosen = eligible[0]
        chosen.verdict = "selected: the cheapest candidate on the front within the red lines"
    else:
        chosen = parent
        why = ("every compressed candidate crosses a red line" if not any(p.within_red_lines for p in points if p is not parent)
               else "no compressed candidate within the red lines is cheaper than the parent")
        parent.verdict = f"selected (passed through uncompressed): {why}"
    chosen.selected = True
    return chosen


def record(db_path, run_id: str, parent_id: str, recipe_hash: str, points: list[Point]) -> None:
    cols = ("run_id, created_at, parent_id, recipe_hash, candidate_id, kind, capability, reasoning, safety, distinct_2, self_bleu, "
            "perplexity_bits_per_byte, size_mb, parameters, latency_ms_per_token_b1, latency_ms_per_token_batch, "
            "tokens_per_s_batch, peak_memory_mb, cpu_s_per_1k_tokens, energy_j_per_1k_tokens, on_front, "
            "within_red_lines, selected, verdict, measurement")
    with connect(db_path) as con:
        con.execute(SCHEMA)
        for p in points:
            r = p.row
            cost = r.get("cost", {})
            con.execute(f"INSERT INTO compress_measurements ({cols}) VALUES ({', '.join('?' * 25)})", [
                run_id, utcnow(), parent_id, recipe_hash, p.candidate_id, p.kind, p.groups.get("capability"),
                p.groups.get("reasoning"), p.groups.get("safety"), r.get("diversity", {}).get("distinct_2"),
                r.get("diversity", {}).get("self_bleu"), r.get("perplexity_bits_per_byte"), cost.get("size_mb"),
                cost.get("parameters"), cost.get("latency_ms_per_token_b1"), cost.get("latency_ms_per_token_batch"),
                cost.get("tokens_per_s_batch"), cost.get("peak_memory_mb"), cost.get("cpu_s_per_1k_tokens"),
                cost.get("energy_j_per_1k_tokens"), p.on_front, p.within_red_lines, p.selected, p.verdict,
                json.dumps(r, default=str)])


def history(db_path, parent_id: str | None = None) -> list[dict]:
    """Recorded rows (of one parent's runs, or all), oldest first."""
    with connect(db_path) as con:
        con.execute(SCHEMA)
        where, params = ("WHERE parent_id = ?", [parent_id]) if parent_id else ("", [])
        return query_dicts(con, f"SELECT * EXCLUDE (measurement) FROM compress_measurements {where} ORDER BY created_at", params)


def table_markdown(points: list[Point], cost_metric: str) -> str:
    parent = next(p for p in points if p.kind == "parent")
    head = ("| candidate | kind | capability | reasoning | safety | distinct-2 | self-BLEU | size MB | ms/token b1 | "
            "ms/token batch | peak MB | CPU-s/1k tok | front | verdict |\n|" + "---|" * 14)
    lines = [head]
    for p in sorted(points, key=lambda p: p.cost, reverse=True):
        c, d = p.row.get("cost", {}), p.row.get("diversity", {})
        ratio = f" ({parent.cost / p.cost:.2f}x)" if p is not parent and p.cost else ""
        fmt = lambda v, spec=".3f": "" if v is None else format(v, spec)  # noqa: E731
        lines.append(f"| {p.candidate_id[:12]} | {p.kind} | {fmt(p.capability)} | {fmt(p.groups.get('reasoning'))} | "
                     f"{fmt(p.groups.get('safety'))} | {fmt(d.get('distinct_2'))} | {fmt(d.get('self_bleu'))} | "
                     f"{fmt(c.get('size_mb'), '.1f')} | {fmt(c.get('latency_ms_per_token_b1'), '.2f')} | "
                     f"{fmt(c.get('latency_ms_per_token_batch'), '.2f')} | {fmt(c.get('peak_memory_mb'), '.0f')} | "
                     f"{fmt(c.get('cpu_s_per_1k_tokens'), '.2f')} | {'yes' if p.on_front else 'no'} | "
                     f"{'**' if p.selected else ''}{p.verdict}{ratio}{'**' if p.selected else ''} |")
    return "\n".join(lines) + f"\n\nCost axis: `{cost_metric}` (lower is cheaper); capability: mean goodness of the quick suite's capability tasks."


def plot_markdown(points: list[Point], cost_metric: str, red_lines: dict[str, float], title: str = "Compress: capability vs cost") -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 3.8), dpi=100)
    for p in points:
        color = "#2ca02c" if p.selected else ("#4c72b0" if p.within_red_lines else "#c44e52")
        ax.scatter(p.cost, p.capability, s=60, color=color, marker="*" if p.kind == "parent" else "o", zorder=3)
        ax.annotate(p.kind, (p.cost, p.capability), textcoords="offset points", xytext=(5, 4), fontsize=8)
    fr = sorted(front(points), key=lambda p: p.cost)
    if len(fr) > 1:
        ax.plot([p.cost for p in fr], [p.capability for p in fr], "--", color="#888888", label="Pareto front")
    parent = next(p for p in points if p.kind == "parent")
    if "capability" in red_lines:
        ax.axhline(parent.capability - red_lines["capability"], color="#c44e52", lw=0.8, ls=":", label="capability red line")
    ax.set_xlabel(cost_metric)
    ax.set_ylabel("capability (quick suite)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    return figure_markdown(fig, title)
