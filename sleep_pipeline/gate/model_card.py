"""The model card every cycle writes: a Hugging Face README.md with YAML front matter.

Front matter: ``base_model``, ``datasets``, ``tags``, ``license`` and a ``model-index`` holding every
gate metric (the format the Hub reads). Body: the decision, lineage (source checkpoint, data version,
recipe hashes), a metrics table with thresholds, standard errors and deltas against the previous
release, and the risk list. The same text is shown as Markdown metadata in the UI and saved beside the
weights, so cards of successive cycles compare line by line.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import yaml

from sleep_pipeline.gate.decide import beats, bound_text, fmt

CARD_DIGITS = 4


COST_ROWS = (("size_mb", "size on disk (MB)", ",.1f"), ("parameters", "parameters", ",d"),
             ("latency_ms_per_token_b1", "ms per token, batch 1", ".2f"),
             ("latency_ms_per_token_batch", "ms per decoding step, gate batch", ".2f"),
             ("tokens_per_s_batch", "tokens/s, gate batch", ",.1f"), ("peak_memory_mb", "peak memory (MB)", ",.0f"),
             ("cpu_s_per_1k_tokens", "CPU-seconds per 1,000 tokens", ".2f"),
             ("energy_j_per_1k_tokens", "joules per 1,000 tokens (GPU)", ".1f"))


@dataclass(frozen=True)
class MetricRow:
    suite: str  # e.g. "reasoning_planning", "safety"
    metric: str  # e.g. "multi_step_success", "jailbreak_trigger_rate"
    value: float
    stderr: float | None = None
    threshold: float | None = None
    higher_is_better: bool = True
    previous: float | None = None  # the live release's value
    passed: bool | None = None
    base: float | None = None  # the untrained starting model's value
    base_stderr: float | None = None
    kind: str = "capability"  # capability | safety

    @property
    def beats_base(self) -> bool | None:
        return beats(self.value, self.stderr, self.base, self.base_stderr, self.higher_is_better)

    @property
    def delta(self) -> float | None:
        return None if self.previous is None else self.value - self.previous


@dataclass(frozen=True)
class CardFacts:
    name: str
    version: str
    decision: str  # "released" / "rejected: ..." / "rolled back"
    base_model: str
    data_version: str
    datasets: list[str]
    lineage: dict[str, str]
    metrics: list[MetricRow]
    risks: list[str] = field(default_factory=list)
    recommendation: str = ""
    tags: list[str] = field(default_factory=lambda: ["sleep-pipeline", "text-generation"])
    license: str = "apache-2.0"
    base_label: str = "the untrained starting model"  # what "before" is in the before/after table
    cost: dict[str, dict] = field(default_factory=dict)  # model label -> its cost to serve (compress.cost.Cost)
    dream: dict | None = None  # the dream set, its spot-check and the deltas against the candidate before Dream


def _fmt(x: float | None, signed: bool = False) -> str:
    return fmt(x, CARD_DIGITS, signed)


def front_matter(facts: CardFacts) -> dict:
    results = []
    for suite in dict.fromkeys(m.suite for m in facts.metrics):
        rows = [m for m in facts.metrics if m.suite == suite]
        results.append({
            "task": {"type": "text-generation", "name": suite.replace("_", " ")},
            "dataset": {"type": "sleep-pipeline/gate-suites", "name": suite, "split": "test"},
            "metrics": [{"type": m.metric, "name": m.metric.replace("_", " "), "value": round(float(m.value), 6),
                         "verified": False} for m in rows],
        })
    return {
        "base_model": facts.base_model,
        "datasets": list(facts.datasets),
        "tags": list(facts.tags),
        "license": facts.license,
        "model-index": [{"name": facts.name, "results": results}],
    }


def render(facts: CardFacts) -> str:
    fm = yaml.safe_dump(front_matter(facts), sort_keys=False, allow_unicode=True)
    lines = [
        "---", fm.rstrip(), "---", "",
        f"# {facts.name} {facts.version}", "",
        f"**Decision:** {facts.decision}", "",
        *([f"**Recommendation:** {facts.recommendation}", ""] if facts.recommendation else []),
        "## Lineage", "",
        "| | |", "|---|---|",
        f"| base model | {facts.base_model} |",
        f"| data version | {facts.data_version} |",
        *[f"| {k} | {v} |" for k, v in facts.lineage.items()],
        "",
        "## Metrics", "",
        "| check | suite | metric | value | ± stderr | threshold | previous | delta | pass |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for m in facts.metrics:
        bound = bound_text(m.threshold, m.higher_is_better, CARD_DIGITS)
        verdict = "—" if m.passed is None else ("yes" if m.passed else "**no**")
        lines.append(f"| {m.kind} | {m.suite} | {m.metric} | {_fmt(m.value)} | {_fmt(m.stderr)} | {bound} | "
                     f"{_fmt(m.previous)} | {_fmt(m.delta, signed=True)} | {verdict} |")
    based = [m for m in facts.metrics if m.base is not None]
    if based:
        lines += ["", "## Before and after: against the starting model", "",
                  f"Before = {facts.base_label}. Better by more than the combined standard error counts as a gain.", "",
                  "| suite | metric | before | ± stderr | this model | ± stderr | gain beyond noise |",
                  "|---|---|---|---|---|---|---|"]
        for m in based:
            lines.append(f"| {m.suite} | {m.metric} | {_fmt(m.base)} | {_fmt(m.base_stderr)} | {_fmt(m.value)} | "
                         f"{_fmt(m.stderr)} | {'yes' if m.beats_base else 'no'} |")
    if facts.dream:
        d = facts.dream
        spot = d.get("spot_check") or {}
        lines += ["", "## Dream", "",
                  f"Dream set `{d.get('dream_id')}`; people's spot-check: {spot.get('status', '?')}"
                  + (f" (**the release waits:** {spot['blocks_release']})" if spot.get("blocks_release") else "") + ".", ""]
        if d.get("deltas"):
            lines += [f"Against the candidate Dream started from ({str(d.get('before'))[:12]}), on the same suites. A change "
                      "larger than the combined standard error is marked better or worse.", "",
                      "| check | suite | metric | before Dream | after Dream | delta | change |",
                      "|---|---|---|---|---|---|---|"]
            for r in d["deltas"]:
                lines.append(f"| {r['kind']} | {r['task']} | {r['metric']} | {_fmt(r['before'])} ± {_fmt(r['before_stderr'])} | "
                             f"{_fmt(r['after'])} ± {_fmt(r['after_stderr'])} | {_fmt(r['delta'], signed=True)} | "
                             f"{'**worse**' if r['change'] == 'worse' else r['change']} |")
    if facts.cost:
        labels = list(facts.cost)
        lines += ["", "## Cost to serve", "",
                  "Measured in a fresh process, the model loaded as it is served (greedy decoding, fixed length).", "",
                  "| | " + " | ".join(labels) + " |", "|---|" + "---|" * len(labels)]
        for key, name, spec in COST_ROWS:
            vals = [facts.cost[label].get(key) for label in labels]
            lines.append(f"| {name} | " + " | ".join("—" if v is None else format(v, spec) for v in vals) + " |")
    lines += ["", "## Risks", ""]
    lines += [f"- {r}" for r in facts.risks] or ["- none recorded"]
    return "\n".join(lines) + "\n"


def _split(card: str) -> tuple[str, str] | None:
    """(YAML front matter, body) of a card, or None when it has no front matter."""
    if not card.startswith("---\n"):
        return None
    end = card.index("\n---\n", 4)
    return card[4:end], card[end + len("\n---\n"):]


def parse_front_matter(card: str) -> dict:
    """The YAML front matter of a model card (raises ValueError when there is none)."""
    parts = _split(card)
    if parts is None:
        raise ValueError("a model card starts with '---' and YAML front matter")
    return yaml.safe_load(parts[0])


def for_display(card: str) -> str:
    """The card as a Markdown viewer without front-matter support (the Dagster UI) should show it: the body
    first, the Hub's YAML front matter after it as a fenced block, not as a rule and a run-on paragraph."""
    parts = _split(card)
    if parts is None:
        return card
    front, body = parts
    return (body.lstrip("\n").rstrip("\n") + "\n\n## Hub metadata (the card's YAML front matter)\n\n"
            "```yaml\n" + front.rstrip("\n") + "\n```\n")
