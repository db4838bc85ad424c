"""Learn on preference pairs: DPO (with an SFT term on the chosen answer) instead of plain SFT.

SFT on a mix of refusals and everyday answers teaches a pretrained assistant the refusal as one more
likely answer: measured on SmolLM2-135M-Instruct, once it refused 90% of held-out harmful requests it
also refused about half of the held-out everyday ones ("What is the capital of Germany?" -> "I can't help
with making people ill"). Nothing in SFT's loss says where a refusal is wrong. A preference pair does:

* a row of ``preference.refuse_buckets`` (harmful requests, secrets): chosen = the data's refusal,
  rejected = the starting model's own answer (which, for a model that complies, is the compliance the
  cycle has to remove). Where the model already refused, the row has no pair and is counted.
* any other row: chosen = its answer (the data's, or the model's own where ``own_answers`` says so),
  rejected = a refusal drawn from the refuse buckets' answers: refusing an everyday request is exactly
  what the pair makes less likely.

trl's DPOTrainer trains it (``loss_type`` sigmoid + sft, the reference being the starting model: with
LoRA, the adapter switched off); the runtime around it (DeepSpeed, progress, resume, the time limit,
publishing) is the same as SFT's. Pairs cost ~2.5x an SFT row (chosen and rejected, plus the
reference's forward pass), so a profile budgets fewer rows.
"""

from __future__ import annotations

import random

from sleep_pipeline.train.own_answers import answers_file, shared_answers, trim_to_sentence
from sleep_pipeline.train.runtime import WorkerError


def rejected_answer(row: dict, answer: str, finished: bool, judge) -> tuple[str | None, str]:
    """The starting model's own answer to a refuse-bucket row as the pair's rejected answer, or
    ``(None, reason)`` when it is no use as one (it refused already, or said nothing)."""
    text = answer.strip() if finished else (trim_to_sentence(answer.strip()) or answer.strip())
    if not text:
        return None, "empty"
    if judge.refused(row["prompt"], text):
        return None, "already_refused"
    return text, "paired"


def fit(example: dict, tokenizer, max_length: int) -> tuple[dict | None, bool]:
    """``example`` made to fit ``max_length`` tokens with its longer answer, and whether it was cut: a
    longer user message loses its start (as a chat server truncates a long role-play prompt, keeping the
    request at its end). ``(None, False)`` when the answers alone (nearly) fill it."""
    prompt = example["prompt"]
    longest = max(len(_ids(tokenizer, tokenizer.apply_chat_template(prompt + example[k], tokenize=False)))
                  for k in ("chosen", "rejected"))
    if longest <= max_length:
        return example, False
    ids = _ids(tokenizer, prompt[-1]["content"])
    keep = len(ids) - (longest - max_length) - 8  # a few tokens' slack: tokens may merge anew at the cut
    if keep < 8:
        return None, False
    cut = {**prompt[-1], "content": tokenizer.decode(ids[-keep:])}
    return {**example, "prompt": [*prompt[:-1], cut]}, True


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def build_pairs(ctx, model, tokenizer, rows: list[dict], refusals: list[str], split: str) -> tuple[list[dict], dict]:
    """``rows`` (answers final: own answers applied) as preference examples that fit the recipe's
    ``max_seq_len``, and their counts. ``refusals`` are the answers a refusal-as-rejected is drawn from
    (the train split's refuse rows)."""
    from sleep_pipeline.gate.judge import RuleJudge

    spec = ctx.recipe.preference
    if not refusals:
        raise WorkerError(f"preference: the train split has no rows of {', '.join(spec.refuse_buckets)} "
                          "(preference.refuse_buckets) to take refusals from")
    refuse = {i for i, r in enumerate(rows) if r.get("bucket") in spec.refuse_buckets}
    saved = shared_answers(ctx, model, tokenizer, rows, refuse, spec.rejected_max_new_tokens,
                           answers_file(ctx.run_dir, "rejected", split), f"rejected answers ({split})")
    own = {item["index"]: item for item in saved}
    judge = RuleJudge()
    rng = random.Random(f"{ctx.recipe.training.seed}:{split}")
    counts = {"paired_refusal": 0, "paired_answer": 0, "already_refused": 0, "empty": 0, "prompt_truncated": 0,
              "too_long": 0}
    examples = []
    for i, row in enumerate(rows):
        if i in refuse:
            rejected, why = rejected_answer(row, own[i]["answer"], own[i]["finished"], judge)
            if rejected is None:
                counts[why] += 1
                continue
        else:
            rejected = rng.choice(refusals)
        example, cut = fit(pair(row, rejected), tokenizer, ctx.recipe.training.max_seq_len)
        if example is None:
            counts["too_long"] += 1
            continue
        counts["prompt_truncated"] += cut
        counts["paired_refusal" if i in refuse else "paired_answer"] += 1
        examples.append(example)
    ctx.reporter.info(f"preference pairs ({split}): {counts['paired_refusal']:,} refusals preferred to the model's "
                      f"own answer, {counts['paired_answer']:,} answers preferred to a refusal; "
                      f"{counts['already_refused']:,} refuse-bucket rows already refused by the model, {counts['empty']:,} empty "
                      f"answers and {counts['too_long']:,} answers longer than max_seq_len have no pair; "
                      f"{counts['prompt_truncated']:,} prompts lost their start to fit max_seq_len")
    return examples, counts


def pair(row: dict, rejected: str) -> dict:
    """A mix row and a rejected answer as trl's conversational preference example."""
    from sleep_pipeline.train.modeling import row_messages

    *prompt, chosen = row_messages(row)
    return {"prompt": prompt, "chosen": [chosen], "rejected": [{"role": "assistant", "content": rejected}]}


def build_trainer(model, tokenizer, train_pairs: list[dict], val_pairs: list[dict], training_arguments: dict,
                  max_length: int, spec, peft_config=None):
    """trl's DPOTrainer on the pairs (made to fit ``max_length`` by :func:`fit`)."""
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    losses = ["sigmoid", "sft"] if spec.sft_weight > 0 else ["sigmoid"]
    args = DPOConfig(**{**training_arguments, "eval_on_start": False},  # at the start policy = reference: loss ln 2
                     max_length=max_length, beta=spec.beta, loss_type=losses,
                     loss_weights=[1.0, spec.sft_weight][:len(losses)], dataset_num_proc=None)
    return DPOTrainer(model=model, args=args, train_dataset=Dataset.from_list(train_pairs),
                      eval_dataset=Dataset.from_list(val_pairs) if val_pairs else None,
                      processing_class=tokenizer, peft_config=peft_config)
