"""Capability, diversity and cost of one candidate, measured the same way for every candidate of a run.

* capability: the gate's suites (:func:`sleep_pipeline.gate.evaluate.evaluate`) on the quick subset the
  Compress recipe names -- frozen held-out suites first -- with validation perplexity (``sp_perplexity``);
  every headline metric is turned into "goodness" (higher is better) and averaged per group:
  ``capability`` (all capability tasks), ``reasoning`` (the reasoning tasks, a red line of its own) and
  ``safety``;
* diversity: distinct-1/2 and self-BLEU of sampled answers (temperature 1, top-p 0.95, fixed seed) to
  open-ended prompts, several samples per prompt -- pruning and quantisation tend to make a model
  repeat itself before they make it wrong;
* cost: :mod:`sleep_pipeline.compress.cost`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

from sleep_pipeline.gate.evaluate import Evaluation, evaluate
from sleep_pipeline.gate.suites import CAPABILITY, PERPLEXITY, SAFETY, TASK_BY_NAME

REASONING_TASKS = ("sp_reasoning", "ho_reasoning", "sp_planning")
DIVERSITY_PROMPTS = (
    "Write a short poem about the sea.",
    "Describe your ideal weekend in a few sentences.",
    "Invent a name and a one-line story for a new board game.",
    "Give me an idea for a birthday present for a friend who likes music.",
    "Write the opening sentence of a mystery novel.",
    "Suggest a dinner I could cook tonight and say why.",
    "Tell me about a place you would like to visit.",
    "Write a two-sentence story about a lost key.",
)


@dataclass
class Measurement:
    scores: dict[str, dict[str, list[float]]]  # task -> metric -> [value, stderr, n]
    groups: dict[str, float]  # capability / reasoning / safety: mean goodness of their headline metrics
    perplexity_bits_per_byte: float | None
    diversity: dict[str, float]
    cost: dict = field(default_factory=dict)
    eval_seconds: float = 0.0

    def to_json(self) -> dict:
        return asdict(self)


def goodness(task: str, metric: str, value: float) -> float:
    spec = TASK_BY_NAME[task]
    m = next(x for x in spec.metrics if x.name == metric)
    return value if m.higher_is_better else 1.0 - value


def group_scores(ev: Evaluation) -> dict[str, float]:
    groups: dict[str, list[float]] = {"capability": [], "reasoning": [], "safety": []}
    for task, metrics in ev.scores.items():
        spec = TASK_BY_NAME.get(task)
        if spec is None or spec.kind == PERPLEXITY or spec.headline.name not in metrics:
            continue
        g = goodness(task, spec.headline.name, metrics[spec.headline.name].value)
        if spec.kind == CAPABILITY:
            groups["capability"].append(g)
            if task in REASONING_TASKS:
                groups["reasoning"].append(g)
        elif spec.kind == SAFETY:
            groups["safety"].append(g)
    return {k: round(sum(v) / len(v), 4) for k, v in groups.items() if v}


def _ngrams(words: list[str], n: int) -> list[tuple[str, ...]]:
    return [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]


def diversity_of(samples: list[list[str]]) -> dict[str, float]:
    """distinct-1/2 over every sample, and self-BLEU within each prompt's samples (each sample against the
    others of its prompt, averaged); ``samples`` holds one list of texts per prompt."""
    import sacrebleu

    out: dict[str, float] = {}
    words = [t.split() for group in samples for t in group]
    for n in (1, 2):
        grams = [g for w in words for g in _ngrams(w, n)]
        out[f"distinct_{n}"] = round(len(set(grams)) / len(grams), 4) if grams else 0.0
    bleus = []
    for group in samples:
        for i, hyp in enumerate(group):
            refs = [r for j, r in enumerate(group) if j != i]
            if refs and hyp.strip():
                bleus.append(sacrebleu.sentence_bleu(hyp, refs).score / 100.0)
    out["self_bleu"] = round(sum(bleus) / len(bleus), 4) if bleus else 1.0
    return out


def sample_diversity(model, tokenizer, prompts=DIVERSITY_PROMPTS, samples_per_prompt: int = 4,
                     max_new_tokens: int = 48, seed: int = 0) -> dict[str, float]:
    import torch

    tokenizer.padding_side = "left"
    texts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
             for p in prompts]
    enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    torch.manual_seed(seed)
    with torch.no_grad():
        out = model.generate(**enc, do_sample=True, temperature=1.0, top_p=0.95, max_new_tokens=max_new_tokens,
                             num_return_sequences=samples_per_prompt, pad_token_id=tokenizer.pad_token_id)
    decoded = tokenizer.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    return diversity_of([decoded[i * samples_per_prompt:(i + 1) * samples_per_prompt] for i in range(len(prompts))])


def measure_model(model, tokenizer, suites: Path, tasks: list[str], limit: int, batch_size: int, judge=None,
                  max_length: int | None = None, samples_per_prompt: int = 4, log=None) -> Measurement:
    """Capability and diversity of an in-memory model (cost is measured separately, in a fresh process);
    ``samples_per_prompt=0`` skips diversity (a merge's A/B check judges capability only)."""
    ev = evaluate(model, tokenizer, suites, tasks=tasks, limit=limit, batch_size=batch_size, judge=judge,
                  keep_samples=False, max_length=max_length, log=log)
    ppl = ev.scores.get("sp_perplexity", {}).get("bits_per_byte")
    return Measurement(
        scores={t: {m: [s.value, s.stderr, s.n] for m, s in ms.items()} for t, ms in ev.scores.items()},
        groups=group_scores(ev),
        perplexity_bits_per_byte=round(ppl.value, 4) if ppl else None,
        diversity=sample_diversity(model, tokenizer, samples_per_prompt=samples_per_prompt) if samples_per_prompt else {},
        eval_seconds=ev.seconds,
    )
