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

import contextlib
import functools
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from sleep_pipeline.gate import scoring
from sleep_pipeline.gate.judge import Judge
from sleep_pipeline.gate.suites import PERPLEXITY, TASK_BY_NAME, TASKS, SuiteTask

# log-likelihood scoring runs whole sequences with full-vocabulary logits; past ~8 rows a batch only
# adds memory traffic on a CPU (measured: 32 rows 1.4-1.8 s, 8 rows 0.9-1.0 s for the perplexity suite)
LOGLIKELIHOOD_BATCH = 8
# rows x prompt tokens of one prefill: long prompts (role-play jailbreaks thousands of tokens long) are
# generated a few rows at a time, so attention over them never holds a whole batch at once
PREFILL_TOKEN_BUDGET = 16384

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
    # task -> prompts longer than the context (minus the answer budget), truncated from the left
    truncated: dict[str, int] = field(default_factory=dict)
    cost: dict | None = None  # what the model costs to serve (sleep_pipeline.compress.cost), where measured

    def to_json(self) -> dict:
        return {"scores": {t: {m: [s.value, s.stderr, s.n] for m, s in ms.items()} for t, ms in self.scores.items()},
                "seconds": self.seconds, "examples": self.examples, "truncated": self.truncated, "cost": self.cost}

    @classmethod
    def from_json(cls, data: dict) -> "Evaluation":
        return cls({t: {m: Score(*v) for m, v in ms.items()} for t, ms in data["scores"].items()},
                   seconds=data.get("seconds", 0.0), examples=data.get("examples", 0),
                   truncated=data.get("truncated", {}), cost=data.get("cost"))


def load_for_eval(path: Path):
    """(model, tokenizer) from a checkpoint directory as it will be served: a LoRA adapter merged into its
    base, an int8 checkpoint on int8 kernels, a pruned one with its smaller config."""
    import torch
    from transformers import AutoModelForCausalLM

    from sleep_pipeline.train.modeling import load_tokenizer

    from sleep_pipeline.compress.quantize import is_int8, load_int8

    path = Path(path)
    tok = load_tokenizer(path)
    if is_int8(path):
        model = load_int8(path)
    elif (path / "adapter_config.json").exists():
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
            mask = generation_kwargs["attention_mask"]
            rows = max(1, PREFILL_TOKEN_BUDGET // max(1, context.shape[1]))
            with torch.autocast(device_type=self.device.type, dtype=self.mixed_precision_dtype,
                                enabled=self.mixed_precision_dtype is not None):
                parts = [greedy_generate(self.model, self.tokenizer, context[i:i + rows], mask[i:i + rows],
                                         max_length, stop) for i in range(0, len(context), rows)]
            pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
            return stack_right_padded(parts, pad)

    return GateLM


def stack_right_padded(parts, pad_id: int):
    """Row blocks of generated ids as one batch: each block ends where its own longest answer ended, so
    the shorter ones are padded on the right (pad ids decode to nothing)."""
    import torch

    width = max(p.shape[1] for p in parts)
    return torch.cat([torch.nn.functional.pad(p, (0, width - p.shape[1]), value=pad_id) for p in parts])


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
             keep_samples: bool = True, user_tasks: tuple[SuiteTask, ...] = ()) -> Evaluation:
    """Evaluate ``model`` on the suites in ``suites_dir`` and the ``user_tasks`` (all of them unless
    ``tasks``), ``limit`` docs each, refusals judged by ``judge`` (the rules when None)."""
    os.environ.update(OFFLINE_ENV)
    with scoring.judged_by(judge):
        return _evaluate(model, tokenizer, suites_dir, tasks, limit, batch_size, max_length, log, keep_samples,
                         user_tasks)


def _score(results: dict, metric: str, n: int) -> Score:
    """A metric from lm-eval's results of one task; ``metric`` may name its filter (``exact_match,flexible``)."""
    name, _, filt = metric.partition(",")
    filt = filt or "none"
    if f"{name},{filt}" not in results:
        known = sorted(k for k in results if "," in k and "_stderr" not in k)
        raise KeyError(f"lm-eval reported no {name!r} with filter {filt!r} (it reported: {', '.join(known)})")
    stderr = results.get(f"{name}_stderr,{filt}")
    return Score(float(results[f"{name},{filt}"]), float(stderr) if isinstance(stderr, (int, float)) else float("nan"), n)


def _evaluate(model, tokenizer, suites_dir: Path, tasks: list[str] | None, limit: int | None, batch_size: int,
              max_length: int | None, log, keep_samples: bool, user_tasks: tuple[SuiteTask, ...]) -> Evaluation:
    from lm_eval.tasks import TaskManager

    specs = {**TASK_BY_NAME, **{t.name: t for t in user_tasks}}
    names = tasks or [t.name for t in TASKS] + [t.name for t in user_tasks]
    # the context a prompt gets: the model's own, or less where the deployment serves less
    own = getattr(model.config, "max_position_embeddings", 2048)
    max_length = min(max_length, own) if max_length else own
    lm = _lm_class()(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=str(model.device),
              max_length=max_length)
    extra_dirs = [t.include_path for t in user_tasks if t.include_path and t.name in names]
    manager = TaskManager(include_path=[str(suites_dir), *dict.fromkeys(extra_dirs)],
                          include_defaults=any(t.include_path is None and t.name in names for t in user_tasks))
    chat = bool(getattr(tokenizer, "chat_template", None))
    scores, samples, examples, task_seconds, truncated = {}, {}, 0, {}, {}
    start = time.monotonic()
    for k, name in enumerate(names, 1):
        t0 = time.monotonic()
        spec = specs[name]
        lm.batch_size_per_gpu = min(batch_size, LOGLIKELIHOOD_BATCH) if spec.kind == PERPLEXITY else batch_size
        # a user's task reads its relative data files from its own directory
        with contextlib.chdir(spec.include_path) if spec.include_path else contextlib.nullcontext():
            res = _evaluate_task(lm, manager, name, limit, chat)
        out, rows = res["results"][name], res["samples"][name]
        task_scores = {}
        for m in spec.metrics:
            try:
                task_scores[m.name] = _score(out, m.name, len(rows))
            except KeyError as exc:
                if not spec.user:
                    raise
                # a judged metric the task does not report: missing, so its threshold fails closed
                if log:
                    log(f"{name}: {exc.args[0]}")
        scores[name] = task_scores
        if spec.kind != PERPLEXITY and not spec.user:
            room = lm.max_length - spec.max_gen_toks
            truncated[name] = sum(len(lm.tok_encode(_context(s))) > room for s in rows)
        examples += len(rows)
        task_seconds[name] = round(time.monotonic() - t0, 3)
        if keep_samples and spec.kind != PERPLEXITY and not spec.user:
            samples[name] = [{"doc": s["doc"], "response": s["filtered_resps"][0],
                              "metrics": {m.name: s[m.name] for m in spec.metrics if m.name in s}} for s in rows]
        if log:
            elapsed = time.monotonic() - start
            eta = elapsed / k * (len(names) - k)
            shown = ", ".join(f"{m} {s.value:.3f}±{s.stderr:.3f}" for m, s in task_scores.items())
            cut = f", {truncated[name]} truncated to the context" if truncated.get(name) else ""
            log(f"eval {k}/{len(names)} {name}: {shown} ({len(rows)} docs{cut}, {task_seconds[name]:.1f}s, "
                f"ETA {eta:.0f}s)")
    return Evaluation(scores, samples, seconds=round(time.monotonic() - start, 2), examples=examples,
                      task_seconds=task_seconds, truncated={t: n for t, n in truncated.items() if n})


def _context(sample: dict) -> str:
    """The prompt lm-eval sent for a generation sample (its first request's first argument)."""
    args = sample["arguments"][0]
    return args[0] if isinstance(args, (list, tuple)) else next(iter(args.values()))


def evaluate_checkpoint(path: Path, suites_dir: Path, **kwargs) -> Evaluation:
    model, tok = load_for_eval(path)
    return evaluate(model, tok, suites_dir, **kwargs)
