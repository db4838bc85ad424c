"""Supervised fine-tuning (the Learn phase) with trl's SFTTrainer under DeepSpeed, one process per rank.

    deepspeed --num_gpus 2 --module sleep_pipeline.train.sft --recipe recipes/learn.yaml \\
        --data-dir MIX_DIR --run-dir RUN_DIR --out-root CHECKPOINTS --data-version dv-... \\
        [--init-from MODEL_DIR_OR_CANDIDATE_ID --db sleep_pipeline.duckdb] [--resume auto|required|never]

Trains on ``MIX_DIR/train.jsonl`` with assistant-only loss (answers only, through the chat template's
generation markers) and validation loss on ``MIX_DIR/validation.jsonl``. Everything around the
trainer -- ranks, progress, resume points, the time limit, the starting model and publishing the
checkpoint with its lineage -- is :mod:`sleep_pipeline.train.runtime`'s.
"""

from __future__ import annotations

import sys

from sleep_pipeline.train.runtime import RunContext, WorkerError, main

PHASE = "learn"


def train_sft(ctx: RunContext) -> dict:
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    from sleep_pipeline.train.modeling import row_messages

    train_rows, val_rows = ctx.rows("train"), ctx.rows("validation")
    if not train_rows:
        raise WorkerError(f"{ctx.data_dir / 'train.jsonl'} is empty")
    tokenizer = ctx.tokenizer(lambda: (f"{r.get('system', '')} {r['prompt']} {r['response']}" for r in train_rows))
    model = ctx.model(tokenizer)
    train_ds = Dataset.from_list([{"messages": row_messages(r)} for r in train_rows])
    val_ds = Dataset.from_list([{"messages": row_messages(r)} for r in val_rows]) if val_rows else None
    args = SFTConfig(
        **ctx.training_arguments(evaluate=val_ds is not None),
        max_length=ctx.recipe.training.max_seq_len,
        assistant_only_loss=True,
        dataset_num_proc=None,
    )
    trainer = SFTTrainer(model=model, args=args, train_dataset=train_ds, eval_dataset=val_ds,
                         processing_class=tokenizer, peft_config=ctx.peft_config())
    facts = ctx.train(trainer)
    return ctx.publish(trainer, tokenizer, {**facts, "assistant_only_loss": True})


if __name__ == "__main__":
    sys.exit(main(train_sft, PHASE, description="Learn phase: supervised fine-tuning on the data mix"))
