"""Supervised fine-tuning (the Learn phase) with trl's SFTTrainer under DeepSpeed, one process per rank.

    deepspeed --num_gpus 2 --module sleep_pipeline.train.sft --recipe recipes/learn.yaml \\
        --data-dir MIX_DIR --run-dir RUN_DIR --out-root CHECKPOINTS --data-version dv-... \\
        [--init-from MODEL_DIR_OR_CANDIDATE_ID --db sleep_pipeline.duckdb] [--resume auto|required|never]

Trains on ``MIX_DIR/train.jsonl`` with the loss on the answers only (each row is a conversational
prompt/completion pair rendered by the model's own chat template; the completion is what the template
renders after the prompt) and validation loss on ``MIX_DIR/validation.jsonl``. Everything around the
trainer -- ranks, progress, resume points, the time limit, the starting model and publishing the
checkpoint with its lineage -- is :mod:`sleep_pipeline.train.runtime`'s. With the recipe's
``preference`` section it trains on preference pairs with trl's DPOTrainer instead
(:mod:`sleep_pipeline.train.preference`).
"""

from __future__ import annotations


from sleep_pipeline.train import own_answers, preference
from sleep_pipeline.train.runtime import RunContext, WorkerError, exit_worker, main

PHASE = "learn"


def build_trainer(model, tokenizer, train_rows: list[dict], val_rows: list[dict], training_arguments: dict,
                  max_length: int, peft_config=None):
    """trl's SFTTrainer on mix rows as conversational prompt/completion pairs, loss on the completion."""
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    from sleep_pipeline.train.modeling import row_prompt_completion

    train_ds = Dataset.from_list([row_prompt_completion(r) for r in train_rows])
    val_ds = Dataset.from_list([row_prompt_completion(r) for r in val_rows]) if val_rows else None
    args = SFTConfig(**training_arguments, max_length=max_length, completion_only_loss=True, dataset_num_proc=None)
    return SFTTrainer(model=model, args=args, train_dataset=train_ds, eval_dataset=val_ds,
                      processing_class=tokenizer, peft_config=peft_config)


def train_sft(ctx: RunContext) -> dict:
    train_rows, val_rows = ctx.rows("train"), ctx.rows("validation")
    if not train_rows:
        raise WorkerError(f"{ctx.data_dir / 'train.jsonl'} is empty")
    tokenizer = ctx.tokenizer(lambda: (f"{r.get('system', '')} {r['prompt']} {r['response']}" for r in train_rows))
    model = ctx.model(tokenizer)
    train_rows, own = own_answers.apply(ctx, model, tokenizer, train_rows)
    if ctx.recipe.preference.enabled:
        return train_preference(ctx, model, tokenizer, train_rows, val_rows, own)
    trainer = build_trainer(model, tokenizer, train_rows, val_rows, ctx.training_arguments(evaluate=bool(val_rows)),
                            ctx.recipe.training.max_seq_len, ctx.peft_config())
    facts = ctx.train(trainer)
    return ctx.publish(trainer, tokenizer, {**facts, **own, "objective": "sft", "assistant_only_loss": True})


def train_preference(ctx: RunContext, model, tokenizer, train_rows: list[dict], val_rows: list[dict], own: dict) -> dict:
    """Learn on preference pairs (:mod:`sleep_pipeline.train.preference`)."""
    spec = ctx.recipe.preference
    if val_rows:
        val_rows, own_val = own_answers.apply(ctx, model, tokenizer, val_rows, split="validation")
        own = {**own, **own_val}
    refusals = sorted({r["response"] for r in train_rows if r.get("bucket") in spec.refuse_buckets})
    train_pairs, counts = preference.build_pairs(ctx, model, tokenizer, train_rows, refusals, "train")
    val_pairs, val_counts = (preference.build_pairs(ctx, model, tokenizer, val_rows, refusals, "validation")
                             if val_rows else ([], {}))
    if not train_pairs:
        raise WorkerError("preference: no train row has a pair (the model already refuses every refuse-bucket row "
                          "and no other bucket is in the mix)")
    trainer = preference.build_trainer(model, tokenizer, train_pairs, val_pairs,
                                       ctx.training_arguments(evaluate=bool(val_pairs)),
                                       ctx.recipe.training.max_seq_len, spec, ctx.peft_config())
    facts = ctx.train(trainer)
    final = ctx.final_eval
    return ctx.publish(trainer, tokenizer, {
        **facts, **own, "objective": "dpo+sft" if spec.sft_weight > 0 else "dpo", "assistant_only_loss": True,
        "preference_beta": spec.beta, "preference_sft_weight": spec.sft_weight,
        "preference_pairs": counts, "preference_pairs_validation": val_counts,
        "validation_reward_accuracy": (round(float(final["eval_rewards/accuracies"]), 4)
                                       if "eval_rewards/accuracies" in final else None),
        "validation_reward_margin": (round(float(final["eval_rewards/margins"]), 4)
                                     if "eval_rewards/margins" in final else None),
    })


if __name__ == "__main__":
    exit_worker(main(train_sft, PHASE, description="Learn phase: supervised fine-tuning on the data mix"))
