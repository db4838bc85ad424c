"""LoRA merge, one adapter (batch) at a time, each behind an A/B regression check.

"One big merge", where adapters cancel each other out, is what this prevents: adapters are merged in
order into the weights, and before each merge the model without it (A) and with it (B) are scored on
the quick suite; a merge whose B loses more than the allowed drop on any judged metric is skipped and
recorded, and merging goes on from A. peft's ``merge_and_unload`` of one adapter is exact (W + scale
* B @ A) but mutates the model it is given, so B is built on a copy of A. The unmerged candidate is
never touched: it stays registered, and its files stay where they are.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from sleep_pipeline.train.modeling import ADAPTER_CONFIG

Scores = dict[str, float]  # judged metric -> value, higher is better


@dataclass
class MergeStep:
    adapter: str
    merged: bool
    reason: str
    before: Scores
    after: Scores


@dataclass
class MergeResult:
    model: object
    steps: list[MergeStep] = field(default_factory=list)

    @property
    def merged(self) -> list[str]:
        return [s.adapter for s in self.steps if s.merged]

    @property
    def skipped(self) -> list[str]:
        return [s.adapter for s in self.steps if not s.merged]


def adapter_base(adapter_dir: Path) -> Path:
    """The base model directory an adapter was trained on (``base_model_name_or_path``)."""
    cfg = json.loads((Path(adapter_dir) / ADAPTER_CONFIG).read_text())
    base = cfg.get("base_model_name_or_path")
    if not base or not Path(base).is_dir():
        raise ValueError(f"{adapter_dir}: its base model {base!r} is not a local directory")
    return Path(base)


def regression(before: Scores, after: Scores, max_drop: float) -> list[str]:
    """Metrics that fell by more than ``max_drop`` (absolute) from ``before`` to ``after``; a metric
    ``after`` lacks counts as fallen."""
    out = []
    for name, value in before.items():
        new = after.get(name)
        if new is None or new < value - max_drop:
            out.append(f"{name} {value:.3f} -> {'missing' if new is None else f'{new:.3f}'}")
    return out


def merge_adapters(base_model, adapter_dirs: list[Path], score: Callable[[object], Scores], max_drop: float,
                   log=None) -> MergeResult:
    """Merge ``adapter_dirs`` into ``base_model`` in order, each only if it does not regress (see the module
    docstring). ``score(model)`` returns the quick suite's judged metrics. ``base_model`` is not modified."""
    from peft import PeftModel

    current = copy.deepcopy(base_model).eval()
    current_scores = score(current)
    result = MergeResult(current)
    for i, adapter in enumerate(adapter_dirs, 1):
        candidate = PeftModel.from_pretrained(copy.deepcopy(current), str(adapter), is_trainable=False).merge_and_unload()
        candidate.eval()
        after = score(candidate)
        fallen = regression(current_scores, after, max_drop)
        step = MergeStep(str(adapter), not fallen, "; ".join(fallen) if fallen else "no metric fell beyond the allowed drop",
                         dict(current_scores), dict(after))
        result.steps.append(step)
        if log:
            log(f"merge {i}/{len(adapter_dirs)} {Path(adapter).name}: "
                + ("merged" if step.merged else f"SKIPPED, it regresses: {step.reason}"))
        if step.merged:
            current, current_scores = candidate, after
    result.model = current
    return result
