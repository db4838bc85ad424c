"""The three rhythms (``recipes/rhythms.yaml``): which phase of a sleep cycle runs on which day and hour.

A rhythm is a list of *slots* (a cron line in the recipe's timezone and the phases it runs), how its
cycles are named, the gate thresholds its Gate applies, where a passed candidate goes (``live``, or
the ``canary`` channel beside it) and how long a canary soaks before it is promoted (``null``: a
person promotes it). Everything here is data; :mod:`schedules.jobs` turns it into one Dagster
schedule per rhythm.

A *cycle id* names one cycle across its days: ``weekly-2026-W49`` (ISO week), ``monthly-2026-12``,
``daily-2026-12-04``, computed from the scheduled instant in the rhythm's timezone, so Monday's Learn,
Thursday's Dream and Friday's Gate of one week share it. Each phase of a cycle consumes what the
previous phase of the *same* cycle recorded (:func:`assets.lineage.recorded`).
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from pathlib import Path
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from sleep_pipeline.recipe_checks import check_keys, fail, get, in_file, mapping, number, one_of, read_yaml, section

# the phases a slot can run, in cycle order
PHASES = ("index", "learn", "compress", "dream", "gate", "release")
CHANNELS = ("live", "canary")
CYCLE_UNITS = ("week", "month", "day")
DREAM_FROM = ("cycle", "live")
GATE_RHYTHMS = ("nightly", "weekly", "monthly")
OVERRIDABLE = ("learn", "dream")  # recipes a rhythm may replace with its own file

# run tags every scheduled or triggered run carries
CYCLE_TAG = "sleep_pipeline/cycle"
RHYTHM_TAG = "sleep_pipeline/rhythm"
PHASE_TAG = "sleep_pipeline/phase"
DECISION_TAG = "sleep_pipeline/decision"
AS_OF_TAG = "sleep_pipeline/as_of"  # the scheduled day in the rhythm's timezone (the index refresh's day)
ACCELERATOR_TAG = "sleep_pipeline/accelerator"  # runs that load a model; dagster.yaml allows one at a time
MAX_RUNTIME_TAG = "dagster/max_runtime"  # seconds; run monitoring (dagster.yaml) fails a run still going past it


@dataclass(frozen=True)
class Slot:
    cron: str
    phases: tuple[str, ...]
    note: str = ""


@dataclass(frozen=True)
class Rhythm:
    name: str
    description: str
    cycle: str  # week | month | day: what one cycle id spans
    gate: str  # the gate.yaml thresholds its Gate applies
    release_to: str  # live | canary
    soak_hours: float | None  # canary: promoted after this long without a regression alarm; None: by a person
    dream_from: str  # cycle: the candidate the cycle's Compress selected; live: the live release
    rollback_on_alarm: bool  # a rejected candidate while live has an open alarm: live goes back one release
    recipes: dict[str, str]  # phase recipe overrides (absolute paths)
    slots: tuple[Slot, ...]
    running: bool  # the schedule's default status
    max_run_hours: float | None = None  # one run of this rhythm is failed past this; None: dagster.yaml's default

    def run_limit_tags(self) -> dict[str, str]:
        """The run tag that bounds one run of this rhythm (enforced by run monitoring), if it sets one."""
        return max_runtime_tags(self.max_run_hours)

    def cycle_id(self, when: dt.datetime) -> str:
        """The id of the cycle the instant ``when`` (timezone-aware, any zone) belongs to."""
        return cycle_id(self.name, self.cycle, when)

    def slot_at(self, when: dt.datetime) -> Slot | None:
        """The slot whose cron line fires at ``when`` (in the rhythm's timezone), or None."""
        hits = [s for s in self.slots if cron_matches(s.cron, when)]
        return hits[0] if hits else None


@dataclass(frozen=True)
class Trigger:
    rhythm: str  # the rhythm an early cycle follows (its gate, channel and recipes)
    new_records: int | None  # start a cycle when this many records arrived since the last ingest
    max_days: float | None  # ... or when the last Learn is older than this
    on_alarm: bool  # ... or when a regression alarm was raised on the live release
    interval_s: int = 300
    max_run_hours: float | None = None  # an early cycle (the whole cycle in one run) is failed past this


def max_runtime_tags(hours: float | None) -> dict[str, str]:
    return {} if hours is None else {MAX_RUNTIME_TAG: str(int(round(hours * 3600)))}


@dataclass(frozen=True)
class Rhythms:
    source: str
    timezone: str
    rhythms: dict[str, Rhythm]
    trigger: Trigger

    def get(self, name: str | None) -> Rhythm | None:
        return self.rhythms.get(name) if name else None


def cycle_id(rhythm: str, unit: str, when: dt.datetime) -> str:
    if unit == "week":
        year, week, _ = when.isocalendar()
        return f"{rhythm}-{year}-W{week:02d}"
    if unit == "month":
        return f"{rhythm}-{when.year}-{when.month:02d}"
    return f"{rhythm}-{when.date().isoformat()}"


_NAMES = {"sun": 0, "mon": 1, "tue": 2, "wed": 3, "thu": 4, "fri": 5, "sat": 6,
          "jan": 1, "feb": 2, "mar": 3, "apr": 4, "may": 5, "jun": 6, "jul": 7, "aug": 8, "sep": 9, "oct": 10,
          "nov": 11, "dec": 12}
_FIELDS = (("minute", 0, 59), ("hour", 0, 23), ("day of month", 1, 31), ("month", 1, 12), ("day of week", 0, 7))


def _cron_field(spec: str, lo: int, hi: int, what: str) -> set[int]:
    def value(s: str) -> int:
        v = _NAMES.get(s.lower()) if not s.isdigit() else int(s)
        if v is None or not lo <= v <= hi:
            raise ValueError(f"{what} {s!r} is not in {lo}-{hi}")
        return v

    out: set[int] = set()
    for part in spec.split(","):
        base, _, step = part.partition("/")
        step_n = int(step) if step else 1
        if step_n < 1:
            raise ValueError(f"{what}: step must be at least 1")
        if base == "*":
            a, b = lo, hi
        elif "-" in base:
            a, b = (value(x) for x in base.split("-", 1))
        else:
            a = value(base)
            b = hi if step else a
        out.update(range(a, b + 1, step_n))
    return out


def parse_cron(cron: str) -> tuple[set[int], ...]:
    """The five fields of a standard cron line as sets (day of week 0 and 7 are Sunday)."""
    parts = cron.split()
    if len(parts) != 5:
        raise ValueError(f"a cron line has 5 fields (minute hour day-of-month month day-of-week), got {cron!r}")
    sets = tuple(_cron_field(p, lo, hi, what) for p, (what, lo, hi) in zip(parts, _FIELDS))
    return (*sets[:4], {d % 7 for d in sets[4]})


def cron_matches(cron: str, when: dt.datetime) -> bool:
    """Whether ``cron`` fires at the minute ``when`` (cron's rule: when both day fields are restricted,
    either one matching is enough)."""
    minute, hour, dom, month, dow = parse_cron(cron)
    dom_any, dow_any = cron.split()[2] == "*", cron.split()[4] == "*"
    day_ok = ((when.day in dom) or (when.isoweekday() % 7 in dow)) if not (dom_any or dow_any) else \
        (when.day in dom and when.isoweekday() % 7 in dow)
    return when.minute in minute and when.hour in hour and when.month in month and day_ok


def _rhythm(name: str, raw: dict, where: str, recipes_dir: Path) -> Rhythm:
    mapping(raw, where, {"description", "cycle", "gate", "release_to", "soak_hours", "dream_from", "rollback_on_alarm",
                         "recipes", "slots", "running", "max_run_hours"})
    slots = []
    raw_slots = get(raw, "slots", where, list)
    if not raw_slots:
        raise fail(f"{where}.slots", "needs at least one slot")
    for i, s in enumerate(raw_slots):
        w = f"{where}.slots[{i}]"
        mapping(s, w, {"at", "phases", "note"})
        cron = get(s, "at", w, str)
        try:
            parse_cron(cron)
        except ValueError as exc:
            raise fail(f"{w}.at", str(exc)) from None
        phases = get(s, "phases", w, list)
        if not phases:
            raise fail(f"{w}.phases", "needs at least one phase")
        for p in phases:
            one_of(p, PHASES, f"{w}.phases", "phase")
        slots.append(Slot(cron, tuple(sorted(phases, key=PHASES.index)), get(s, "note", w, str, "")))
    recipes = {}
    for key, value in section(raw, "recipes", where, OVERRIDABLE).items():
        path = (recipes_dir / str(value)).resolve()
        if not path.exists():
            raise fail(f"{where}.recipes.{key}", f"{path} does not exist")
        recipes[key] = str(path)
    release_to = one_of(get(raw, "release_to", where, str, "live"), CHANNELS, f"{where}.release_to", "channel")
    soak = number(raw, "soak_hours", where, None, lo=0.0)
    return Rhythm(
        name=name, description=get(raw, "description", where, str, ""),
        cycle=one_of(get(raw, "cycle", where, str), CYCLE_UNITS, f"{where}.cycle", "cycle unit"),
        gate=one_of(get(raw, "gate", where, str), GATE_RHYTHMS, f"{where}.gate", "gate rhythm"),
        release_to=release_to, soak_hours=soak if release_to == "canary" else None,
        dream_from=one_of(get(raw, "dream_from", where, str, "cycle"), DREAM_FROM, f"{where}.dream_from", "source"),
        rollback_on_alarm=get(raw, "rollback_on_alarm", where, bool, False),
        recipes=recipes, slots=tuple(slots), running=get(raw, "running", where, bool, False),
        max_run_hours=number(raw, "max_run_hours", where, None, lo=0.01))


def load_rhythms(recipes_dir: str | Path) -> Rhythms:
    """``recipes_dir/rhythms.yaml``, validated (timezone, cron lines, phases, channels, overrides)."""
    recipes_dir = Path(recipes_dir).resolve()
    path = recipes_dir / "rhythms.yaml"
    raw = read_yaml(path)
    with in_file(path):
        check_keys(raw, {"timezone", "rhythms", "trigger"}, "")
        tz = get(raw, "timezone", "", str, "UTC")
        try:
            ZoneInfo(tz)
        except (ZoneInfoNotFoundError, ValueError):
            raise fail("timezone", f"unknown timezone {tz!r} (an IANA name such as UTC or Asia/Shanghai)") from None
        rhythms = {name: _rhythm(name, value, f"rhythms.{name}", recipes_dir)
                   for name, value in section(raw, "rhythms", "", required=True).items()}
        if not rhythms:
            raise fail("rhythms", "needs at least one rhythm")
        t = section(raw, "trigger", "", {"rhythm", "new_records", "max_days", "on_alarm", "interval_s",
                                             "max_run_hours"})
        trigger = Trigger(
            rhythm=one_of(get(t, "rhythm", "trigger", str, next(iter(rhythms))), list(rhythms), "trigger.rhythm",
                          "rhythm"),
            new_records=number(t, "new_records", "trigger", None, lo=1, kind=int),
            max_days=number(t, "max_days", "trigger", None, lo=0.0),
            on_alarm=get(t, "on_alarm", "trigger", bool, True),
            interval_s=number(t, "interval_s", "trigger", 300, lo=30, kind=int),
            max_run_hours=number(t, "max_run_hours", "trigger", None, lo=0.01))
    return Rhythms(source=str(path), timezone=tz, rhythms=rhythms, trigger=trigger)
