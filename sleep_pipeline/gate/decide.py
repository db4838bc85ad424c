"""The gate recipe (``recipes/gate.yaml``) and the release decision.

``decide(candidate, reference, policy)`` fails closed. A candidate passes when every capability
threshold and every safety threshold of the policy's rhythm holds (checked separately: capability and
safety are two verdicts), with evaluation noise taken seriously:

* a thresholded metric that was not evaluated (or is not a number) fails the check it belongs to;
  the recipe loader insists that every suite's headline metric has a threshold in every rhythm or is
  listed under ``report_only`` with a reason, so nothing is silently unjudged;
* every metric carries its standard error; "regressed" means worse than the reference by more than
  ``noise.z`` times the combined standard error of the two evaluations, never any small dip;
* the reference is the live release, or — when nothing is live yet — the model the candidate
  started from (the imported base model, or the untrained one);
* a safety metric that regressed that way fails the gate, and so does any metric of a frozen held-out
  capability suite (``ho_*``: what users see); another capability metric that did is a risk;
* per bucket (the data-mix buckets each suite measures) the delta vs the reference is the
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

from sleep_pipeline.gate.evaluate import Evaluation, Score
from sleep_pipeline.gate.suites import (CAPABILITY, PERPLEXITY, SAFETY, TASK_BY_NAME, Metric, SuiteTask,
                                        metric_spec, user_task)
from sleep_pipeline.recipe_checks import (check_keys, fail, get, in_file, mapping, number, one_of, read_yaml, section,
                                          stable_hash)

def beats(value: float, stderr: float | None, other: float | None, other_stderr: float | None,
          higher_is_better: bool) -> bool | None:
    """Better than ``other`` by more than the combined standard error (None when there is no other)."""
    if other is None:
        return None
    gain = (value - other) if higher_is_better else (other - value)
    return gain > ((stderr or 0.0) ** 2 + (other_stderr or 0.0) ** 2) ** 0.5


def fmt(x: float | None, digits: int = 3, signed: bool = False) -> str:
    """A metric as the reports print it: fixed digits, an explicit sign for deltas, "—" for none."""
    if x is None:
        return "—"
    return f"{x:+.{digits}f}" if signed else f"{x:.{digits}f}"


def bound_text(bound: float | None, higher_is_better: bool, digits: int = 3) -> str:
    """A threshold as the reports print it: "≥ 0.900" / "≤ 0.050", "—" for none."""
    return "—" if bound is None else ("≥ " if higher_is_better else "≤ ") + fmt(bound, digits)


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
    report_only: dict[tuple[str, str], str] = field(default_factory=dict)  # metric -> why it is not thresholded
    replay_per_bucket: int = 60
    raw: dict = field(repr=False, default_factory=dict)
    user_tasks: tuple[SuiteTask, ...] = ()  # a user's lm-eval tasks, judged like the suites
    max_context_tokens: int | None = None  # the serving context: longer prompts are truncated from the left

    def recipe_hash(self) -> str:
        return stable_hash(self.raw)

    @property
    def tasks(self) -> dict[str, SuiteTask]:
        """Every task the gate evaluates and judges: the suites, then the user's tasks."""
        return {**TASK_BY_NAME, **{t.name: t for t in self.user_tasks}}

    def policy(self, rhythm: str) -> "Policy":
        if rhythm not in RHYTHMS:
            raise ValueError(f"rhythm must be one of {RHYTHMS}, got {rhythm!r}")
        return Policy(self, rhythm)


@dataclass(frozen=True)
class Policy:
    """What a candidate is judged by: the recipe's thresholds and noise rules for one rhythm."""
    recipe: GateRecipe
    rhythm: str

    @property
    def thresholds(self) -> dict[tuple[str, str], Threshold]:
        return self.recipe.thresholds[self.rhythm]

    @property
    def strictness(self) -> int:
        """nightly < weekly < monthly: a verdict of a stricter rhythm outranks a looser one."""
        return RHYTHMS.index(self.rhythm)


@dataclass(frozen=True)
class Reference:
    """What a candidate is compared with: the live release and the model it started from (either may
    be missing). Regressions and forgetting are judged against ``live``, else against ``base``."""
    live: Evaluation | None = None
    base: Evaluation | None = None
    base_label: str = "the starting model"

    @property
    def comparison(self) -> tuple[Evaluation | None, str]:
        if self.live is not None:
            return self.live, "the live release"
        return self.base, self.base_label


def _suite_metric(key: Any, where: str, tasks: dict[str, SuiteTask]) -> tuple[str, str, Metric]:
    """(task, metric, its spec) of a ``<suite task>/<metric>`` key of the gate recipe."""
    task, _, metric = str(key).partition("/")
    one_of(task, sorted(tasks), where, "suite task")
    try:
        return task, metric, metric_spec(task, metric, tasks)
    except KeyError:
        names = ", ".join(m.name for m in tasks[task].metrics)
        raise fail(where, f"{task} has no metric {metric!r} (metrics: {names})") from None


DIRECTIONS = {"higher": True, "lower": False}


def _user_tasks(raw: Any, recipe_dir: Path) -> tuple[SuiteTask, ...]:
    """The ``user_tasks`` list: any lm-eval task, from a directory of task YAMLs or lm-eval's registry."""
    if raw is None:
        return ()
    if not isinstance(raw, list):
        raise fail("user_tasks", "must be a list of {task, include_path?, check, metrics}")
    out, seen = [], set()
    for i, item in enumerate(raw):
        w = f"user_tasks[{i}]"
        check_keys(mapping(item, w), {"task", "include_path", "check", "metrics"}, w)
        name = get(item, "task", w, str)
        if name in TASK_BY_NAME or name in seen:
            raise fail(f"{w}.task", f"{name!r} is already a suite task; give the task another name")
        seen.add(name)
        include = get(item, "include_path", w, str, None)
        if include is not None:
            folder = (recipe_dir / include).resolve()
            if not folder.is_dir():
                raise fail(f"{w}.include_path", f"{folder} is not a directory of lm-eval task YAMLs")
            if not any(name in f.read_text(errors="replace") for f in folder.rglob("*.yaml")):
                raise fail(f"{w}.include_path", f"no task YAML under {folder} mentions the task {name!r}")
            include = str(folder)
        kind = one_of(get(item, "check", w, str), (CAPABILITY, SAFETY), f"{w}.check", "check")
        metrics = mapping(item.get("metrics"), f"{w}.metrics")
        if not metrics:
            raise fail(f"{w}.metrics", "name at least one metric and its direction (higher or lower is better)")
        directions = {str(m): DIRECTIONS[one_of(d, tuple(DIRECTIONS), f"{w}.metrics.{m}", "direction")]
                      for m, d in metrics.items()}
        out.append(user_task(name, kind, directions, include))
    return tuple(out)


def load_gate_recipe(path: str | Path) -> GateRecipe:
    path = Path(path)
    raw = read_yaml(path)
    with in_file(path):
        check_keys(raw, {"suites", "evaluation", "judge", "noise", "forgetting", "near_threshold_stderrs", "replay",
                         "thresholds", "report_only", "user_tasks"}, "")
        user_tasks = _user_tasks(raw.get("user_tasks"), path.resolve().parent)
        all_tasks = {**TASK_BY_NAME, **{t.name: t for t in user_tasks}}
        suites = section(raw, "suites", "", {"seed", "examples", "perplexity_texts"})
        examples = section(suites, "examples", "suites", RHYTHMS)
        examples = {r: number(examples, r, "suites.examples", lo=1, kind=int) for r in RHYTHMS}
        ev = section(raw, "evaluation", "", {"batch_size", "compare_with_base", "max_context_tokens"})
        judge = section(raw, "judge", "", {"kind", "url", "model", "api_key_env", "path"})
        judge_kind = one_of(get(judge, "kind", "judge", str, "rules"), JUDGE_KINDS, "judge.kind", "judge kind")
        if judge_kind == "endpoint" and not (judge.get("url") and judge.get("model")):
            raise fail("judge", "an endpoint judge needs url and model (and api_key_env naming the key's variable)")
        if judge_kind == "model" and not judge.get("path"):
            raise fail("judge.path", "a model judge needs the judge model's directory")
        noise = section(raw, "noise", "", {"z"})
        forgetting = section(raw, "forgetting", "", {"risk", "hard_limit"})
        replay = section(raw, "replay", "", {"max_items", "per_bucket"})
        thresholds_raw = section(raw, "thresholds", "", RHYTHMS)
        thresholds: dict[str, dict[tuple[str, str], Threshold]] = {}
        for rhythm in RHYTHMS:
            table = {}
            for key, bound in section(thresholds_raw, rhythm, "thresholds", required=True).items():
                w = f"thresholds.{rhythm}.{key}"
                task, metric, spec = _suite_metric(key, w, all_tasks)
                want = "min" if spec.higher_is_better else "max"
                if set(mapping(bound, w, {"min", "max"})) != {want}:
                    raise fail(w, f"{metric} is {'higher' if spec.higher_is_better else 'lower'}-is-better, "
                                  f"so its threshold is '{want}'")
                table[(task, metric)] = Threshold(number(bound, want, w), spec.higher_is_better)
            thresholds[rhythm] = table
        report_only = {}
        for key, why in section(raw, "report_only", "").items():
            w = f"report_only.{key}"
            task, metric, _ = _suite_metric(key, w, all_tasks)
            if not isinstance(why, str) or len(why.strip()) < 10:
                raise fail(w, "give the reason it is reported but not thresholded (a sentence)")
            report_only[(task, metric)] = why.strip()
        for rhythm in RHYTHMS:
            for task in all_tasks.values():
                key = (task.name, task.headline.name)
                w = f"thresholds.{rhythm}.{task.name}/{task.headline.name}"
                if key in thresholds[rhythm] and key in report_only:
                    raise fail(w, "is also listed under report_only; pick one")
                if key not in thresholds[rhythm] and key not in report_only:
                    raise fail(w, f"the headline metric of {task.name} needs a threshold in every rhythm, or an "
                                  "entry under report_only with the reason it is not judged")
        fr = number(forgetting, "risk", "forgetting", 0.05, lo=0, hi=1)
        fh = number(forgetting, "hard_limit", "forgetting", 0.15, lo=0, hi=1)
        if fh < fr:
            raise fail("forgetting.hard_limit", f"must be at least forgetting.risk ({fr})")
        return GateRecipe(
            source=str(path.resolve()), suite_seed=get(suites, "seed", "suites", int, 20261123),
            examples=examples,
            perplexity_texts=number(suites, "perplexity_texts", "suites", 200, lo=1, kind=int),
            batch_size=number(ev, "batch_size", "evaluation", 32, lo=1, kind=int),
            compare_with_base=get(ev, "compare_with_base", "evaluation", bool, True),
            judge={**judge, "kind": judge_kind},
            noise_z=number(noise, "z", "noise", 2.0, lo=0), forgetting_risk=fr, forgetting_hard_limit=fh,
            near_threshold_stderrs=number(raw, "near_threshold_stderrs", "", 1.0, lo=0),
            replay_max_items=number(replay, "max_items", "replay", 300, lo=0, kind=int),
            replay_per_bucket=number(replay, "per_bucket", "replay", 60, lo=0, kind=int),
            thresholds=thresholds, report_only=report_only, raw=raw, user_tasks=user_tasks,
            max_context_tokens=number(ev, "max_context_tokens", "evaluation", None, lo=256, kind=int),
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
    noise: float | None = None  # how far "worse" than the reference must go to count as a regression
    regressed: bool = False
    base: float | None = None
    base_stderr: float | None = None
    ref: float | None = None  # what regressions are judged against: live, else the starting model
    ref_stderr: float | None = None

    @property
    def delta(self) -> float | None:
        return None if self.live is None else self.value - self.live

    @property
    def worse_by(self) -> float | None:
        """How much worse than the reference (positive = worse), in the metric's own direction."""
        if self.ref is None:
            return None
        return (self.ref - self.value) if self.higher_is_better else (self.value - self.ref)

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


def _stderr_of(score: Score) -> float:
    """The score's standard error; for a share measured as exactly 0 or 1 (a standard error of 0), that
    of half an item either way, so "worse beyond noise" never means "worse by a single item" on a few."""
    stderr = 0.0 if score.stderr is None or math.isnan(score.stderr) else score.stderr
    if stderr == 0.0 and score.n and 0.0 <= score.value <= 1.0:
        p = min(max(score.value, 0.5 / score.n), 1.0 - 0.5 / score.n)
        return math.sqrt(p * (1.0 - p) / score.n)
    return stderr


def _combined(a: float | None, b: float | None) -> float:
    vals = [x for x in (a, b) if x is not None and not math.isnan(x)]
    return math.sqrt(sum(x * x for x in vals))


def _fails_closed(key: tuple[str, str], score: Score | None) -> str | None:
    """Why a thresholded metric cannot be judged (then its check fails), or None."""
    if score is None:
        return f"{key[0]}/{key[1]} was not evaluated: a thresholded metric that is missing fails"
    if score.value is None or math.isnan(score.value):
        return f"{key[0]}/{key[1]} is not a number ({score.value!r}): it cannot pass its threshold"
    return None


def decide(candidate: Evaluation, reference: Reference, policy: Policy) -> Verdict:
    """The verdict on ``candidate`` against ``reference`` under ``policy`` (see the module docstring)."""
    recipe, rhythm = policy.recipe, policy.rhythm
    thresholds = policy.thresholds
    tasks = recipe.tasks
    ref, ref_label = reference.comparison
    rows, failures, risks = [], {CAPABILITY: [], SAFETY: []}, []
    for (task_name, metric), th in thresholds.items():
        why = _fails_closed((task_name, metric), candidate.scores.get(task_name, {}).get(metric))
        if why:
            kind = SAFETY if tasks[task_name].kind == SAFETY else CAPABILITY
            failures[kind].append(why)
    for task in tasks.values():
        if task.name not in candidate.scores:
            continue
        for m in task.metrics:
            s: Score | None = candidate.scores[task.name].get(m.name)
            if s is None or s.value is None or math.isnan(s.value):
                continue  # a thresholded one already failed above; an unthresholded one has no row
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
            prev = reference.live.scores.get(task.name, {}).get(m.name) if reference.live else None
            if prev is not None:
                row.live, row.live_stderr = prev.value, prev.stderr
            b = reference.base.scores.get(task.name, {}).get(m.name) if reference.base else None
            if b is not None:
                row.base, row.base_stderr = b.value, b.stderr
            cmp = ref.scores.get(task.name, {}).get(m.name) if ref else None
            if cmp is not None and not math.isnan(cmp.value):
                row.ref, row.ref_stderr = cmp.value, cmp.stderr
                row.noise = recipe.noise_z * _combined(_stderr_of(s), _stderr_of(cmp))
                row.regressed = row.worse_by > row.noise
            if row.regressed and task.kind != PERPLEXITY:
                msg = (f"{task.name}/{m.name} regressed vs {ref_label}: {fmt(row.ref)} -> {fmt(s.value)} "
                       f"(worse by {fmt(row.worse_by)}, beyond the noise interval {fmt(row.noise)})")
                if kind == SAFETY:
                    failures[SAFETY].append(msg)
                elif task.frozen:  # held-out capability: no metric may be worse than the reference beyond noise
                    failures[CAPABILITY].append(msg)
                elif row.headline and task.bucket:
                    pass  # judged below by the forgetting monitor
                else:
                    risks.append(msg)
            rows.append(row)
    # forgetting monitor: the headline metric of every bucket-bearing suite vs the reference
    forgetting = []
    for row in rows:
        if not (row.headline and row.bucket and row.ref is not None):
            continue
        drop, status = row.worse_by, "ok"
        if row.regressed:
            msg = (f"bucket {row.bucket}: {row.task}/{row.metric} dropped {fmt(drop)} vs {ref_label} "
                   f"({fmt(row.ref)} -> {fmt(row.value)}, noise interval {fmt(row.noise)})")
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
        forgetting.append({"bucket": row.bucket, "task": row.task, "metric": row.metric, "reference": ref_label,
                           "live": row.ref, "value": row.value, "delta": row.value - row.ref, "noise": row.noise,
                           "status": status})
    if ref is None:
        risks.append("nothing to compare with (no live release, no starting-model evaluation): regressions and "
                     "forgetting are not checked this cycle")
    elif reference.live is None:
        risks.append(f"no live release yet: regressions and forgetting are judged against {ref_label}")
    cap_ok, safe_ok = not failures[CAPABILITY], not failures[SAFETY]
    if cap_ok and safe_ok:
        decision, rec = "release", "deploy"
    else:
        decision = "reject"
        regressions = any("regressed" in f or "dropped" in f for f in failures[CAPABILITY] + failures[SAFETY])
        if not safe_ok:
            rec = "adjust training (safety: refusals vs over-refusal, privacy data); the live release stays"
        elif regressions:
            rec = "roll back: the candidate forgot what the reference model knew; the live release stays"
        else:
            weak = sorted({r.bucket or r.task for r in rows if r.passed is False}
                          | {f.split("/")[0] for f in failures[CAPABILITY] if "was not evaluated" in f})
            rec = f"collect more data for {', '.join(weak)}; the live release stays"
    return Verdict(rhythm, cap_ok, safe_ok, rows, failures[CAPABILITY], failures[SAFETY], risks, decision, rec,
                   forgetting)
