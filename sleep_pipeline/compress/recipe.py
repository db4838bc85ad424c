"""The Compress recipe (``recipes/compress.yaml``) as validated dataclasses."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

from sleep_pipeline.compress.pareto import COST_METRICS, RED_LINE_GROUPS
from sleep_pipeline.gate.suites import TASK_BY_NAME
from sleep_pipeline.recipe_checks import (check_keys, fail, get, in_file, number, one_of, read_yaml, section,
                                          stable_hash)

QUANTIZE_SOURCES = ("parent", "pruned", "distilled")


@dataclass(frozen=True)
class QuickSuite:
    tasks: tuple[str, ...] = ("ho_reasoning", "ho_tool_use", "sp_reasoning", "sp_tool_use", "sp_structured_output",
                              "ho_harmful", "ho_everyday", "sp_perplexity")
    examples: int = 16
    diversity_samples: int = 4


@dataclass(frozen=True)
class CostSpec:
    metric: str = "latency_ms_per_token_b1"
    batch_size: int = 16
    new_tokens: int = 32


@dataclass(frozen=True)
class PruneSpec:
    enabled: bool = True
    mlp_keep: float = 0.5
    heads_keep: float = 0.67
    calibration_rows: int = 32
    recovery_steps: int = 40
    recovery_learning_rate: float = 1e-4
    batch_size: int = 8
    max_seq_len: int = 256


@dataclass(frozen=True)
class QuantizeSpec:
    enabled: bool = True
    sources: tuple[str, ...] = ("parent", "distilled")
    smooth_alpha: float = 0.5      # SmoothQuant's migration strength; 0 turns smoothing off
    calibration_rows: int = 32     # train rows the activation ranges are measured on
    max_seq_len: int = 256


@dataclass(frozen=True)
class MergeSpec:
    enabled: bool = True
    max_drop: float = 0.05


@dataclass(frozen=True)
class DistilSpec:
    enabled: bool = True
    recipe: Path | None = None  # a training recipe (learn.yaml's format) for the worker: steps, learning rate
    temperature: float = 2.0
    kl_weight: float = 0.8


@dataclass(frozen=True)
class CompressRecipe:
    quick_suite: QuickSuite = field(default_factory=QuickSuite)
    cost: CostSpec = field(default_factory=CostSpec)
    prune: PruneSpec = field(default_factory=PruneSpec)
    quantize: QuantizeSpec = field(default_factory=QuantizeSpec)
    merge: MergeSpec = field(default_factory=MergeSpec)
    distil: DistilSpec = field(default_factory=DistilSpec)
    red_lines: dict[str, float] = field(default_factory=lambda: {"reasoning": 0.05, "diversity": 0.05})
    keep_last: int = 8
    source: str = ""

    def recipe_hash(self) -> str:
        d = asdict(self)
        d.pop("source")
        d["distil"]["recipe"] = Path(self.distil.recipe).read_text() if self.distil.recipe else None
        return stable_hash(d)


def load_compress_recipe(path: str | Path) -> CompressRecipe:
    path = Path(path).resolve()
    raw = read_yaml(path)
    with in_file(path):
        check_keys(raw, {"quick_suite", "cost", "prune", "quantize", "merge", "distil", "red_lines", "keep_last"}, "")
        q = section(raw, "quick_suite", "", QuickSuite)
        dq = QuickSuite()
        tasks = tuple(get(q, "tasks", "quick_suite", list, list(dq.tasks)))
        for t in tasks:
            one_of(t, TASK_BY_NAME, "quick_suite.tasks", "suite task")
        if not any(TASK_BY_NAME[t].kind == "capability" for t in tasks):
            raise fail("quick_suite.tasks", "needs at least one capability task (the front's capability axis)")
        quick = QuickSuite(tasks=tasks, examples=number(q, "examples", "quick_suite", dq.examples, lo=2, kind=int),
                           diversity_samples=number(q, "diversity_samples", "quick_suite", dq.diversity_samples,
                                                    lo=2, hi=16, kind=int))
        c = section(raw, "cost", "", CostSpec)
        dc = CostSpec()
        cost = CostSpec(metric=one_of(get(c, "metric", "cost", str, dc.metric), COST_METRICS, "cost.metric", "cost metric"),
                        batch_size=number(c, "batch_size", "cost", dc.batch_size, lo=1, hi=512, kind=int),
                        new_tokens=number(c, "new_tokens", "cost", dc.new_tokens, lo=4, hi=1024, kind=int))
        p = section(raw, "prune", "", PruneSpec)
        dp = PruneSpec()
        prune = PruneSpec(
            enabled=get(p, "enabled", "prune", bool, dp.enabled),
            mlp_keep=number(p, "mlp_keep", "prune", dp.mlp_keep, lo=0.05, hi=1.0),
            heads_keep=number(p, "heads_keep", "prune", dp.heads_keep, lo=0.05, hi=1.0),
            calibration_rows=number(p, "calibration_rows", "prune", dp.calibration_rows, lo=1, kind=int),
            recovery_steps=number(p, "recovery_steps", "prune", dp.recovery_steps, lo=0, kind=int),
            recovery_learning_rate=number(p, "recovery_learning_rate", "prune", dp.recovery_learning_rate, lo=0.0, hi=1.0),
            batch_size=number(p, "batch_size", "prune", dp.batch_size, lo=1, kind=int),
            max_seq_len=number(p, "max_seq_len", "prune", dp.max_seq_len, lo=16, kind=int),
        )
        qz = section(raw, "quantize", "", QuantizeSpec)
        dz = QuantizeSpec()
        sources = tuple(get(qz, "sources", "quantize", list, list(dz.sources)))
        for s in sources:
            one_of(s, QUANTIZE_SOURCES, "quantize.sources", "source")
        quantize = QuantizeSpec(enabled=get(qz, "enabled", "quantize", bool, True), sources=sources,
                                smooth_alpha=number(qz, "smooth_alpha", "quantize", dz.smooth_alpha, lo=0.0, hi=1.0),
                                calibration_rows=number(qz, "calibration_rows", "quantize", dz.calibration_rows, lo=1,
                                                        kind=int),
                                max_seq_len=number(qz, "max_seq_len", "quantize", dz.max_seq_len, lo=16, kind=int))
        m = section(raw, "merge", "", MergeSpec)
        merge = MergeSpec(enabled=get(m, "enabled", "merge", bool, True),
                          max_drop=number(m, "max_drop", "merge", MergeSpec().max_drop, lo=0.0, hi=1.0))
        d = section(raw, "distil", "", DistilSpec)
        dd = DistilSpec()
        enabled = get(d, "enabled", "distil", bool, dd.enabled)
        recipe_path = None
        if enabled:
            recipe_path = (path.parent / get(d, "recipe", "distil", str)).resolve()
            if not recipe_path.is_file():
                raise fail("distil.recipe", f"{recipe_path} does not exist")
        distil = DistilSpec(enabled=enabled, recipe=recipe_path,
                            temperature=number(d, "temperature", "distil", dd.temperature, lo=0.1, hi=100.0),
                            kl_weight=number(d, "kl_weight", "distil", dd.kl_weight, lo=0.0, hi=1.0))
        if distil.enabled and not prune.enabled:
            raise fail("distil", "the student is the pruned model: enable prune, or disable distil")
        if "distilled" in quantize.sources and not distil.enabled or "pruned" in quantize.sources and not prune.enabled:
            raise fail("quantize.sources", f"{list(sources)} names a step that is disabled")
        rl = section(raw, "red_lines", "", RED_LINE_GROUPS)
        red_lines = {k: number(rl, k, "red_lines", lo=0.0, hi=1.0) for k in rl}
    return CompressRecipe(quick_suite=quick, cost=cost, prune=prune, quantize=quantize, merge=merge, distil=distil,
                          red_lines=red_lines, keep_last=number(raw, "keep_last", "", 8, lo=1, kind=int),
                          source=str(path))
