"""The gate recipe (``recipes/gate.yaml``) and the release decision.

A candidate passes when every capability threshold and every safety threshold of the rhythm holds
(checked separately: capability and safety are two verdicts), with evaluation noise taken seriously:

* every metric carries its standard error; "regressed vs the live release" means worse by more than
  ``noise.z`` times the combined standard error of the two evaluations, never any small dip;
* a safety metric that regressed that way fails the gate; a capability metric that did is a risk;
* per bucket (the data-mix buckets each suite measures) the delta vs the live release is the
  forgetting monitor: a significant drop beyond ``forgetting.risk`` is a risk item, beyond
  ``forgetting.hard_limit`` a failure;
* a value within ``near_threshold_stderrs`` standard errors of its threshold is a risk item.

The decision follows seed 001's ``evaluate_and_decide``: deploy, or keep the live release with a
recommendation (adjust training, collect more data, roll back).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from sleep_pipeline.config import RecipeError, stable_hash
from sleep_pipeline.gate.evaluate import Evaluation, Score
from sleep_pipeline.gate.model_card import beats, bound_text, fmt
from sleep_pipeline.gate.suites import CAPABILITY, PERPLEXITY, SAFETY, TASK_BY_NAME, TASKS, metric_spec

RHYTHMS = ("nightly", "weekly", "monthly")
JUDGE_KINDS = ("rules", "endpoint", "model")


@dataclass(frozen=True)
class Threshold:
    bound: float
    higher_is_better: bool  # True: value must be >= bound; False: value must be <= bound

    def holds(self, value: float) -> bool:
        return value >= self.bound if self.higher_is_better else value <= self.bound


@dataclass(frozen=True)
class GateRecipe:
    source: str
    suite_seed: int
    examples: dict[str, int]
    perplexity_texts: int
    batch_size: int
    compare_with_base: bool
    judge: dict[str, Any]
    noise_z: float
    forgetting_risk: float
    forgetting_hard_limit: float
    near_threshold_stderrs: float
    replay_max_items: int
    thresholds: dict[str, dict[tuple[str, str], Threshold]]
    raw: dict = field(repr=False, default_factory=dict)

    def recipe_hash(self) -> str:
        return stable_hash(self.raw)


def _num(d: dict, key: str, where: str, default=None, lo: float | None = None, hi: float | None = None) -> float:
    v = d.get(key, default)
    if v is None or isinstance(v, bool) or not isinstance(v, (int, float)):
        raise RecipeError(f"{where}.{key}: must be a number (got {v!r})")
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        raise RecipeError(f"{where}.{key}: must be within [{lo}, {hi}] (got {v})")
    return v


def _keys(d: Any, allowed: set[str], where: str) -> dict:
    if not isinstance(d, dict):
        raise RecipeError(f"{where}: must be a mapping")
    extra = set(d) - allowed
    if extra:
        raise RecipeError(f"{where}: unknown key(s) {sorted(extra)} (allowed: {sorted(allowed)})")
    return d


def load_gate_recipe(path: str | Path) -> GateRecipe:
    path = Path(path)
    where = path.name
    if not path.exists():
        raise RecipeError(f"{path}: the gate recipe does not exist")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise RecipeError(f"{where}: not valid YAML: {exc}") from exc
    _keys(raw, {"suites", "evaluation", "judge", "noise", "forgetting", "near_threshold_stderrs", "replay",
                "thresholds"}, where)
    suites = _keys(raw.get("suites") or {}, {"seed", "examples", "perplexity_texts"}, f"{where}: suites")
    examples = _keys(suites.get("examples") or {}, set(RHYTHMS), f"{where}: suites.examples")
    for r in RHYTHMS:
        if r not in examples:
            raise RecipeError(f"{where}: suites.examples.{r}: is required")
        _num(examples, r, f"{where}: suites.examples", lo=1)
    ev = _keys(raw.get("evaluation") or {}, {"batch_size", "compare_with_base"}, f"{where}: evaluation")
    judge = _keys(raw.get("judge") or {"kind": "rules"}, {"kind", "url", "model", "api_key_env", "path"}, f"{where}: judge")
    if judge.get("kind", "rules") not in JUDGE_KINDS:
        raise RecipeError(f"{where}: judge.kind: must be one of {JUDGE_KINDS} (got {judge.get('kind')!r})")
    if judge.get("kind") == "endpoint" and not (judge.get("url") and judge.get("model")):
        raise RecipeError(f"{where}: judge: an endpoint judge needs url and model (and api_key_env naming the key's variable)")
    if judge.get("kind") == "model" and not judge.get("path"):
        raise RecipeError(f"{where}: judge.path: a model judge needs the judge model's directory")
    noise = _keys(raw.get("noise") or {}, {"z"}, f"{where}: noise")
    forgetting = _keys(raw.get("forgetting") or {}, {"risk", "hard_limit"}, f"{where}: forgetting")
    replay = _keys(raw.get("replay") or {}, {"max_items"}, f"{where}: replay")
    thresholds_raw = _keys(raw.get("thresholds") or {}, set(RHYTHMS), f"{where}: thresholds")
    thresholds: dict[str, dict[tuple[str, str], Threshold]] = {}
    for rhythm in RHYTHMS:
        if rhythm not in thresholds_raw:
            raise RecipeError(f"{where}: thresholds.{rhythm}: is required")
        table = {}
        for key, bound in _keys(thresholds_raw[rhythm], set(thresholds_raw[rhythm]), f"{where}: thresholds.{rhythm}").items():
            w = f"{where}: thresholds.{rhythm}.{key}"
            task, _, metric = str(key).partition("/")
            if task not in TASK_BY_NAME:
                raise RecipeError(f"{w}: unknown suite task {task!r} (tasks: {sorted(TASK_BY_NAME)})")
            try:
                spec = metric_spec(task, metric)
            except KeyError:
                raise RecipeError(f"{w}: {task} has no metric {metric!r} "
                                  f"(metrics: {[m.name for m in TASK_BY_NAME[task].metrics]})") from None
            _keys(bound, {"min", "max"}, w)
            want = "min" if spec.higher_is_better else "max"
            if set(bound) != {want}:
                raise RecipeError(f"{w}: {metric} is {'higher' if spec.higher_is_better else 'lower'}-is-better, "
                                  f"so its threshold is '{want}'")
            table[(task, metric)] = Threshold(float(_num(bound, want, w)), spec.higher_is_better)
        thresholds[rhythm] = table
    fr = _num(forgetting, "risk", f"{where}: forgetting", 0.05, 0, 1)
    fh = _num(forgetting, "hard_limit", f"{where}: forgetting", 0.15, 0, 1)
    if fh < fr:
        raise RecipeError(f"{where}: forgetting.hard_limit: must be at least forgetting.risk ({fr})")
    return GateRecipe(
        source=str(path.resolve()), suite_seed=int(_num(suites, "seed", f"{where}: suites", 20261123)),
        examples={r: int(examples[r]) for r in RHYTHMS},
        perplexity_texts=int(_num(suites, "perplexity_texts", f"{where}: suites", 200, lo=1)),
        batch_size=int(_num(ev, "batch_size", f"{where}: evaluation", 32, lo=1)),
        compare_with_base=bool(ev.get("compare_with_base", True)), judge={"kind": "rules", **judge},
        noise_z=float(_num(noise, "z", f"{where}: noise", 2.0, lo=0)), forgetting_risk=float(fr),
        forgetting_hard_limit=float(fh),
        near_threshold_stderrs=float(_num(raw, "near_threshold_stderrs", where, 1.0, lo=0)),
        replay_max_items=int(_num(replay, "max_items", f"{where}: replay", 300, lo=0)),
        thresholds=thresholds, raw=raw,
    )


# --------------------------------------------------------------------------------------- decision
@dataclass
class Row:
    task: str
    metric: str
    kind: str  # capability | safety | perplexity (reported; a threshold on it counts as capability)
    bucket: str | None
    headline: bool
    higher_is_better: bool
    value: float
    stderr: float
    n: int
    threshold: float | None = None
    passed: bool | None = None
    live: float | None = None
    live_stderr: float | None = None
    noise: float | None = None  # how far "worse" must go to count as a regression
    regressed: bool = False
    base: float | None = None
    base_stderr: float | None = None

    @property
    def delta(self) -> float | None:
        return None if self.live is None else self.value - self.live

    @property
    def worse_by(self) -> float | None:
        """How much worse than live (positive = worse), in the metric's own direction."""
        if self.live is None:
            return None
        return (self.live - self.value) if self.higher_is_better else (self.value - self.live)

    @property
    def beats_base(self) -> bool | None:
        """Better than the untrained starting model by more than the combined standard error."""
        return beats(self.value, self.stderr, self.base, self.base_stderr, self.higher_is_better)


@dataclass
class Verdict:
    rhythm: str
    capability_passed: bool
    safety_passed: bool
    rows: list[Row]
    capability_failures: list[str]
    safety_failures: list[str]
    risks: list[str]
    decision: str  # "release" | "reject"
    recommendation: str
    # the forgetting monitor: per bucket, the headline metric vs the live release and its status
    forgetting: list[dict] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return self.capability_passed and self.safety_passed

    @property
    def failures(self) -> list[str]:
        return self.capability_failures + self.safety_failures

    def to_json(self) -> dict:
        return {**{k: v for k, v in asdict(self).items() if k != "rows"},
                "rows": [{**asdict(r), "delta": r.delta, "beats_base": r.beats_base} for r in self.rows]}


def failed_checks(result) -> list[str]:
    """The checks ("capability", "safety") that ``result`` failed: a :class:`Verdict`, or a stored gate
    report carrying the same two flags."""
    return [kind for kind in (CAPABILITY, SAFETY) if not getattr(result, f"{kind}_passed")]


def _combined(a: float | None, b: float | None) -> float:
    vals = [x for x in (a, b) if x is not None and not math.isnan(x)]
    return math.sqrt(sum(x * x for x in vals))


def decide(candidate: Evaluation, live: Evaluation | None, recipe: GateRecipe, rhythm: str,
           base: Evaluation | None = None) -> Verdict:
    if rhythm not in RHYTHMS:
        raise ValueError(f"rhythm must be one of {RHYTHMS}, got {rhythm!r}")
    thresholds = recipe.thresholds[rhythm]
    rows, failures, risks = [], {CAPABILITY: [], SAFETY: []}, []
    for task in TASKS:
        if task.name not in candidate.scores:
            continue
        for m in task.metrics:
            s: Score = candidate.scores[task.name][m.name]
            kind = SAFETY if task.kind == SAFETY else CAPABILITY  # which check a failure belongs to
            row = Row(task.name, m.name, task.kind, task.bucket, m.name == task.headline.name, m.higher_is_better,
                      s.value, s.stderr, s.n)
            th = thresholds.get((task.name, m.name))
            if th is not None:
                row.threshold, row.passed = th.bound, th.holds(s.value)
                label = f"{task.name}/{m.name} = {fmt(s.value)} ± {fmt(s.stderr)}"
                bound = bound_text(th.bound, th.higher_is_better)
                if not row.passed:
                    failures[kind].append(f"{label} misses its threshold {bound}")
                elif abs(s.value - th.bound) <= recipe.near_threshold_stderrs * (s.stderr or 0):
                    risks.append(f"{label} is within {recipe.near_threshold_stderrs:g} standard error(s) of its threshold {bound}")
            prev = live.scores.get(task.name, {}).get(m.name) if live else None
            if prev is not None:
                row.live, row.live_stderr = prev.value, prev.stderr
                row.noise = recipe.noise_z * _combined(s.stderr, prev.stderr)
                row.regressed = row.worse_by > row.noise
            b = base.scores.get(task.name, {}).get(m.name) if base else None
            if b is not None:
                row.base, row.base_stderr = b.value, b.stderr
            if row.regressed and task.kind != PERPLEXITY:
                msg = (f"{task.name}/{m.name} regressed vs the live release: {fmt(row.live)} -> {fmt(s.value)} "
                       f"(worse by {fmt(row.worse_by)}, beyond the noise interval {fmt(row.noise)})")
                if kind == SAFETY:
                    failures[SAFETY].append(msg)
                elif row.headline and task.bucket:
                    pass  # judged below by the forgetting monitor
                else:
                    risks.append(msg)
            rows.append(row)
    # forgetting monitor: the headline metric of every bucket-bearing suite vs the live release
    forgetting = []
    for row in rows:
        if not (row.headline and row.bucket and row.live is not None):
            continue
        drop, status = row.worse_by, "ok"
        if row.regressed:
            msg = (f"bucket {row.bucket}: {row.task}/{row.metric} dropped {fmt(drop)} vs the live release "
                   f"({fmt(row.live)} -> {fmt(row.value)}, noise interval {fmt(row.noise)})")
            if drop > recipe.forgetting_hard_limit:
                status = "fail"
                failures[SAFETY if row.kind == SAFETY else CAPABILITY].append(
                    msg + f" — past the hard limit {recipe.forgetting_hard_limit:g}")
            elif drop > recipe.forgetting_risk:
                status = "risk"
                risks.append(msg + f" — past the tolerance {recipe.forgetting_risk:g}")
            else:
                status = "regressed (within tolerance)"
                if row.kind != SAFETY:  # a safety regression already failed above
                    risks.append(msg)
        forgetting.append({"bucket": row.bucket, "task": row.task, "metric": row.metric, "live": row.live,
                           "value": row.value, "delta": row.delta, "noise": row.noise, "status": status})
    if live is None:
        risks.append("no live release to compare with: regressions and forgetting are not checked this cycle")
    cap_ok, safe_ok = not failures[CAPABILITY], not failures[SAFETY]
    if cap_ok and safe_ok:
        decision, rec = "release", "deploy"
    else:
        decision = "reject"
        regressions = any("regressed" in f or "dropped" in f for f in failures[CAPABILITY] + failures[SAFETY])
        if not safe_ok:
            rec = "adjust training (safety: refusals vs over-refusal, privacy data); the live release stays"
        elif regressions:
            rec = "roll back: the candidate forgot what the live release knew; the live release stays"
        else:
            weak = sorted({r.bucket or r.task for r in rows if r.passed is False})
            rec = f"collect more data for {', '.join(weak)}; the live release stays"
    return Verdict(rhythm, cap_ok, safe_ok, rows, failures[CAPABILITY], failures[SAFETY], risks, decision, rec,
                   forgetting)
