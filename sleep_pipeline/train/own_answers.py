"""Training a pretrained model on its own answers where the data only has to keep what it already does.

A mix's everyday rows carry answers written by the project's generators and pools. A model built from a
config has nothing better to learn from; a pretrained assistant does: its own answer to "Give me three
tips for learning Spanish." is what users already get from it. Fine-tuning it on the pool's answer
instead teaches it a new style on every everyday request and, at a few hundred rows, mostly teaches it
that the refusal template (the one new thing the data adds) is a likely answer to anything: measured on
SmolLM2-135M-Instruct, half of the held-out everyday requests were refused after one LoRA cycle, and
its knowledge (capitals named) fell from 0.88 to 0.34.

With ``own_answers.buckets`` set, rows of those buckets are trained on the starting model's own greedy
answer instead (self-distillation): the loss on them holds the model where it was, so what Learn changes
is what the other buckets teach. An own answer is not used (the row keeps its data answer) when the
model refused the request, when the answer is mostly repetition, or when it has no text; an answer cut
by ``max_new_tokens`` is trimmed to its last full sentence. The answers are written to the run
directory, so a resumed run trains on the same rows.
"""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path

BATCH = 16
_SENTENCE_END = re.compile(r"(?<![\s\d])[.!?][\"')\]]*(?=\s|$)|\n")  # not the "2." of a numbered list


def trim_to_sentence(text: str) -> str:
    """``text`` up to the end of its last complete sentence or line, outside any code block ("" when it
    has none)."""
    ends = [m.end() for m in _SENTENCE_END.finditer(text)]
    text = text[:ends[-1]].rstrip() if ends else ""
    if text.count("```") % 2:  # cut inside a code block: end before it rather than leave it open
        return trim_to_sentence(text[:text.rindex("```")])
    return text


def choose(row: dict, answer: str, finished: bool, judge) -> tuple[str | None, str]:
    """The answer ``row`` is trained on and why: ``(answer, "own")`` or ``(None, reason)`` to keep the
    data's answer."""
    from sleep_pipeline.data.clean import repetition_share

    text = answer.strip() if finished else trim_to_sentence(answer.strip())
    if not re.search(r"[^\W_]", text):
        return None, "empty"
    if judge.refused(row["prompt"], text):
        return None, "refused"
    if repetition_share(text) > 0.5:
        return None, "degenerate"
    return text, "own"


def _generate(model, tokenizer, rows: list[dict], max_new_tokens: int, report,
              label: str = "own answers") -> list[tuple[str, bool]]:
    """Greedy answers to ``rows`` (chat-templated like the gate's prompts), with whether each finished."""
    import torch

    from sleep_pipeline.gate.generation import _eos_ids, greedy_generate
    from sleep_pipeline.train.modeling import row_messages

    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    eos = _eos_ids(model, tokenizer)  # what greedy_generate stops on; finished rows are padded after it
    was_training = model.training
    model.eval()
    started = time.monotonic()
    try:
        order = sorted(range(len(rows)), key=lambda i: len(rows[i]["prompt"]))  # similar lengths share a batch
        answers: dict[int, tuple[str, bool]] = {}
        for b in range(0, len(order), BATCH):
            idx = order[b:b + BATCH]
            texts = [tokenizer.apply_chat_template(row_messages(rows[i])[:-1], tokenize=False, add_generation_prompt=True)
                     for i in idx]
            enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
            with torch.no_grad():
                ids = greedy_generate(model, tokenizer, enc["input_ids"], enc["attention_mask"],
                                      enc["input_ids"].shape[1] + max_new_tokens)
            for i, row_ids in zip(idx, ids[:, enc["input_ids"].shape[1]:].tolist()):
                cut = next((k for k, t in enumerate(row_ids) if t in eos or t == tokenizer.pad_token_id), None)
                answers[i] = (tokenizer.decode(row_ids[:cut], skip_special_tokens=True), cut is not None)
            done = min(b + BATCH, len(order))
            rate = done / max(1e-9, time.monotonic() - started)
            report(f"{label}: {done}/{len(order)} rows, eta {round((len(order) - done) / rate):,}s")
        return [answers[i] for i in range(len(rows))]
    finally:
        tokenizer.padding_side = side
        model.train(was_training)


def answers_file(run_dir: Path, kind: str, split: str) -> Path:
    """Where a run keeps the starting model's answers of one kind (``own``, ``rejected``) to one split."""
    return Path(run_dir) / (f"{kind}_answers.jsonl" if split == "train" else f"{kind}_answers.{split}.jsonl")


def shared_answers(ctx, model, tokenizer, rows: list[dict], indices: set[int], max_new_tokens: int,
                   path: Path, what: str) -> list[dict]:
    """The starting model's greedy answers to ``rows[i]`` for ``i`` in ``indices``, as saved in ``path``
    (``index``, ``record_id``, ``answer``, ``finished``): each rank answers its share, rank 0 writes them
    all; a resumed run reads the file instead of answering again."""
    from sleep_pipeline.train.runtime import WorkerError, _barrier, _dist

    if ctx.world > 1 and _dist() is None:
        import deepspeed

        deepspeed.init_distributed()  # as the trainer would (the accelerator's backend); it keeps this group
    if not path.exists():
        mine = sorted(indices)[ctx.rank::ctx.world]
        ctx.reporter.info(f"{what}: the starting model answers {len(indices):,} rows ({len(mine):,} on this rank)")
        got = dict(zip(mine, _generate(model, tokenizer, [rows[i] for i in mine], max_new_tokens,
                                       ctx.reporter.info, what)))
        dist = _dist()
        parts = [None] * ctx.world
        if dist:
            dist.all_gather_object(parts, got)
        else:
            parts = [got]
        if ctx.rank == 0:
            merged = {i: a for part in parts for i, a in part.items()}
            tmp = path.with_suffix(f".tmp{os.getpid()}")
            with open(tmp, "w", encoding="utf-8") as fh:
                for i in sorted(merged):
                    fh.write(json.dumps({"index": i, "record_id": rows[i].get("record_id"), "answer": merged[i][0],
                                         "finished": merged[i][1]}, ensure_ascii=False) + "\n")
            os.replace(tmp, path)
        _barrier()
    saved = [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
    for item in saved:
        i = item["index"]
        if i not in indices or rows[i].get("record_id") != item["record_id"]:
            raise WorkerError(f"{path} does not belong to this run's rows (row {i}); remove it to answer again")
    return saved


def apply(ctx, model, tokenizer, rows: list[dict], split: str = "train") -> tuple[list[dict], dict]:
    """``rows`` with the answers of ``ctx.recipe.own_answers.buckets`` rows replaced by the starting
    model's own, and the counts for the manifest. Each rank answers its share; every rank gets all."""
    from sleep_pipeline.gate.judge import RuleJudge

    spec = ctx.recipe.own_answers
    if not spec.buckets:
        return rows, {}
    if ctx.start.directory is None:
        ctx.reporter.info("own answers: skipped, the model is built from a config and has no answers of its own")
        return rows, {"own_answers": "skipped (a fresh model)"}
    chosen = {i for i, r in enumerate(rows) if r.get("bucket") in spec.buckets}
    saved = shared_answers(ctx, model, tokenizer, rows, chosen, spec.max_new_tokens,
                           answers_file(ctx.run_dir, "own", split), f"own answers ({split})")
    judge = RuleJudge()
    counts: dict[str, int] = {}
    out = list(rows)
    for item in saved:
        i = item["index"]
        answer, why = choose(rows[i], item["answer"], item["finished"], judge)
        counts[why] = counts.get(why, 0) + 1
        if answer is not None:
            out[i] = {**rows[i], "response": answer}
    ctx.reporter.info(f"own answers ({split}): " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items()))
                      + " (rows not 'own' keep the data's answer)")
    return out, {"own_answers" if split == "train" else f"own_answers_{split}": counts}
