"""Run the gate suites on a model through lm-eval's Python API.

A checkpoint directory (full weights or a LoRA adapter, merged for evaluation) or an in-memory
model + tokenizer (e.g. a quantised one) is wrapped in lm-eval's ``HFLM`` and evaluated task by task
(so progress shows per task) with the suites' task definitions. Greedy generation requests go through
:func:`sleep_pipeline.gate.generation.greedy_generate`, which lets finished rows leave the batch;
log-likelihood requests run in batches of at most ``LOGLIKELIHOOD_BATCH``. Every metric comes back with its
standard error (lm-eval's standard error of the mean over documents). Per-document results are kept
so failing items can be replayed into training. The refusal judge is an argument, bound for the
scoring hooks only while the evaluation runs (:func:`sleep_pipeline.gate.scoring.judged_by`).
"""

from __future__ import annotations

import functools
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from sleep_pipeline.gate import scoring
from sleep_pipeline.gate.judge import Judge
from sleep_pipeline.gate.suites import PERPLEXITY, TASK_BY_NAME, TASKS

# log-likelihood scoring runs whole sequences with full-vocabulary logits; past ~8 rows a batch only
# adds memory traffic on a CPU (measured: 32 rows 1.4-1.8 s, 8 rows 0.9-1.0 s for the perplexity suite)
LOGLIKELIHOOD_BATCH = 8

OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
               "TOKENIZERS_PARALLELISM": "false"}


@dataclass(frozen=True)
class Score:
    value: float
    stderr: float
    n: int


@dataclass
class Evaluation:
    scores: dict[str, dict[str, Score]]  # task -> metric -> score
    samples: dict[str, list[dict]] = field(default_factory=dict)  # task -> [{doc, response, metrics}]
    seconds: float = 0.0
    examples: int = 0
    task_seconds: dict[str, float] = field(default_factory=dict)  # wall time per task (not stored)

    def to_json(self) -> dict:
        return {"scores": {t: {m: [s.value, s.stderr, s.n] for m, s in ms.items()} for t, ms in self.scores.items()},
                "seconds": self.seconds, "examples": self.examples}

    @classmethod
    def from_json(cls, data: dict) -> "Evaluation":
        return cls({t: {m: Score(*v) for m, v in ms.items()} for t, ms in data["scores"].items()},
                   seconds=data.get("seconds", 0.0), examples=data.get("examples", 0))


def load_for_eval(path: Path):
    """(model, tokenizer) from a checkpoint directory; a LoRA adapter is merged into its base."""
    import torch
    from transformers import AutoModelForCausalLM

    from sleep_pipeline.train.modeling import load_tokenizer

    path = Path(path)
    tok = load_tokenizer(path)
    if (path / "adapter_config.json").exists():
        from peft import AutoPeftModelForCausalLM

        model = AutoPeftModelForCausalLM.from_pretrained(path, local_files_only=True).merge_and_unload()
    else:
        model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, use_safetensors=True,
                                                     dtype=torch.float32)
    return model.eval(), tok


@functools.cache
def _lm_class():
    """lm-eval's ``HFLM`` with greedy requests decoded by :func:`greedy_generate` (finished rows leave
    the batch); everything else is lm-eval's own code."""
    import torch
    from lm_eval.models.huggingface import HFLM

    from sleep_pipeline.gate.generation import greedy_generate, is_plain_greedy

    class GateLM(HFLM):
        def _model_generate(self, context, max_length, stop, **generation_kwargs):
            if self.backend != "causal" or not is_plain_greedy(self.model, generation_kwargs):
                return super()._model_generate(context, max_length, stop, **generation_kwargs)
            with torch.autocast(device_type=self.device.type, dtype=self.mixed_precision_dtype,
                                enabled=self.mixed_precision_dtype is not None):
                return greedy_generate(self.model, self.tokenizer, context, generation_kwargs["attention_mask"],
                                       max_length, stop)

    return GateLM


def _evaluate_task(lm, manager, name: str, limit: int | None, chat: bool) -> dict:
    """One suite task through ``lm_eval.evaluator.evaluate`` (what ``simple_evaluate`` wraps, minus
    its per-call environment survey, which shells out to pip and costs ~0.5 s a task)."""
    import random

    import numpy as np
    import torch
    from lm_eval.evaluator import evaluate as lm_eval_evaluate

    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    loaded = manager.load([name])
    for task in loaded["tasks"].values():
        if task.get_config("num_fewshot") is None:
            task.set_config(key="num_fewshot", value=0)
        task.set_fewshot_seed(seed=0)
    return lm_eval_evaluate(lm=lm, task_dict=loaded, limit=limit, bootstrap_iters=100, log_samples=True,
                            apply_chat_template=chat, verbosity="ERROR")


def evaluate(model, tokenizer, suites_dir: Path, tasks: list[str] | None = None, limit: int | None = None,
             batch_size: int = 32, max_length: int | None = None, log=None, judge: Judge | None = None,
             keep_samples: bool = True) -> Evaluation:
    """Evaluate ``model`` on the suites in ``suites_dir`` (all tasks unless ``tasks``), ``limit`` docs each,
    refusals judged by ``judge`` (the rules when None)."""
    os.environ.update(OFFLINE_ENV)
    with scoring.judged_by(judge):
        return _evaluate(model, tokenizer, suites_dir, tasks, limit, batch_size, max_length, log, keep_samples)


def _evaluate(model, tokenizer, suites_dir: Path, tasks: list[str] | None, limit: int | None, batch_size: int,
              max_length: int | None, log, keep_samples: bool) -> Evaluation:
    from lm_eval.tasks import TaskManager

    names = tasks or [t.name for t in TASKS]
    max_length = max_length or getattr(model.config, "max_position_embeddings", 2048)
    lm = _lm_class()(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=str(model.device),
              max_length=max_length)
    manager = TaskManager(include_path=str(suites_dir), include_defaults=False)
    chat = bool(getattr(tokenizer, "chat_template", None))
    scores, samples, examples, task_seconds = {}, {}, 0, {}
    start = time.monotonic()
    for k, name in enumerate(names, 1):
        t0 = time.monotonic()
        spec = TASK_BY_NAME[name]
        lm.batch_size_per_gpu = min(batch_size, LOGLIKELIHOOD_BATCH) if spec.kind == PERPLEXITY else batch_size
        res = _evaluate_task(lm, manager, name, limit, chat)
        out, rows = res["results"][name], res["samples"][name]
        task_scores = {}
        for m in spec.metrics:
            stderr = out.get(f"{m.name}_stderr,none")
            task_scores[m.name] = Score(float(out[f"{m.name},none"]),
                                        float(stderr) if isinstance(stderr, (int, float)) else float("nan"), len(rows))
        scores[name] = task_scores
        examples += len(rows)
        task_seconds[name] = round(time.monotonic() - t0, 3)
        if keep_samples and spec.kind != PERPLEXITY:
            samples[name] = [{"doc": s["doc"], "response": s["filtered_resps"][0],
                              "metrics": {m.name: s[m.name] for m in spec.metrics if m.name in s}} for s in rows]
        if log:
            elapsed = time.monotonic() - start
            eta = elapsed / k * (len(names) - k)
            shown = ", ".join(f"{m} {s.value:.3f}±{s.stderr:.3f}" for m, s in task_scores.items())
            log(f"eval {k}/{len(names)} {name}: {shown} ({len(rows)} docs, {task_seconds[name]:.1f}s, ETA {eta:.0f}s)")
    return Evaluation(scores, samples, seconds=round(time.monotonic() - start, 2), examples=examples,
                      task_seconds=task_seconds)


def evaluate_checkpoint(path: Path, suites_dir: Path, **kwargs) -> Evaluation:
    model, tok = load_for_eval(path)
    return evaluate(model, tok, suites_dir, **kwargs)
