"""The Dream fine-tune: the candidate Compress selected, trained on a blend made from its dream set.

    deepspeed --num_gpus 2 --module sleep_pipeline.train.dream --recipe recipes/dream_train.yaml \\
        --data-dir STORAGE/dreams/DREAM_ID/blend-HASH --run-dir RUN_DIR --out-root CHECKPOINTS \\
        --data-version dv-... --init-from CANDIDATE_ID --db sleep_pipeline.duckdb [--beta 0.1 --sft-weight 1.0]

The blend (:mod:`sleep_pipeline.dream.blend`) holds preference pairs (a ``rejected`` answer beside the
chosen one: red-team refusals over compliances, verified chains over wrong ones, counterfactual answers
over stale ones) and SFT rows (verified majority chains, replayed hard examples, rows of the candidate's
own training mix against forgetting). One trl DPOTrainer with DPO's sigmoid loss plus an SFT term
(``--beta``, ``--sft-weight``) trains both: an SFT row becomes a pair whose rejected answer is its chosen
one, so DPO's term for it is log 2 whatever the weights (its gradient is exactly zero) and only the SFT
term learns from it.

An int8 candidate starts from the float weights it computes with (int8 value x scale); the launching
side quantises the result again. A LoRA recipe (the nightly rhythm's) publishes the adapter merged into
those weights, so the dreamed candidate is a plain model like the one it came from. Everything around
the trainer (ranks, progress, resume, the time limit, publishing with lineage) is the runtime's, as for
Learn; the published manifest names the dream set and the blend it was trained on.
"""

from __future__ import annotations

import json

from sleep_pipeline.compress.quantize import is_int8
from sleep_pipeline.train import preference
from sleep_pipeline.train.recipe import PreferenceSpec
from sleep_pipeline.train.runtime import RunContext, WorkerError, exit_worker, main

PHASE = "dream"


def as_pair(row: dict) -> dict:
    """A dream training row as a preference example; an SFT row's rejected answer is its chosen one."""
    return preference.pair(row, row.get("rejected") if row.get("rejected") is not None else row["response"])


def train_dream(ctx: RunContext) -> dict:
    if ctx.args.beta <= 0 or ctx.args.sft_weight < 0:
        raise WorkerError(f"--beta must be > 0 and --sft-weight >= 0 (got {ctx.args.beta}, {ctx.args.sft_weight})")
    spec = PreferenceSpec(enabled=True, beta=ctx.args.beta, sft_weight=ctx.args.sft_weight)
    train_rows, val_rows = ctx.rows("train"), ctx.rows("validation")
    if not train_rows:
        raise WorkerError(f"{ctx.data_dir / 'train.jsonl'} is empty: the dream set accepted no items")
    info_path = ctx.data_dir / "manifest.json"
    blend_info = json.loads(info_path.read_text()) if info_path.exists() else {}
    tokenizer = ctx.tokenizer(lambda: (f"{r.get('system', '')} {r['prompt']} {r['response']}" for r in train_rows))
    model = ctx.model(tokenizer, dequantize=True)
    max_len = ctx.recipe.training.max_seq_len
    counts = {"pairs": 0, "sft_rows": 0, "cut_to_fit": 0, "too_long": 0}

    def fitted(rows: list[dict]) -> list[dict]:
        out = []
        for r in rows:
            example, cut = preference.fit(as_pair(r), tokenizer, max_len)
            if example is None:
                counts["too_long"] += 1
                continue
            counts["cut_to_fit"] += int(cut)
            counts["pairs" if r.get("rejected") is not None else "sft_rows"] += 1
            out.append(example)
        return out

    train_pairs = fitted(train_rows)
    val_pairs = fitted(val_rows) if val_rows else []
    if not train_pairs:
        raise WorkerError(f"no dream item fits max_seq_len {max_len}")
    ctx.reporter.info(f"dream: {counts['pairs']} preference pairs and {counts['sft_rows']} SFT rows "
                      f"(dream set {blend_info.get('dream_id', '?')}, blend {blend_info.get('blend_id', '?')})")
    trainer = preference.build_trainer(model, tokenizer, train_pairs, val_pairs,
                                       ctx.training_arguments(evaluate=bool(val_pairs)), max_len, spec,
                                       ctx.peft_config())
    facts = ctx.train(trainer)
    return ctx.publish(trainer, tokenizer, {
        **facts, "objective": "dream: dpo+sft", "dream_id": blend_info.get("dream_id"),
        "dream_blend": blend_info.get("blend_id"), "training_data": str(ctx.data_dir), "dream_blend_counts": blend_info.get("counts"),
        "dream_items": counts, "preference_beta": spec.beta, "preference_sft_weight": spec.sft_weight,
        "started_from_int8": is_int8(ctx.start.directory) if ctx.start.directory else False,
    }, merge_adapter=True)


if __name__ == "__main__":
    def extra_args(ap):
        ap.add_argument("--beta", type=float, default=0.1, help="DPO's beta (how far from the starting model)")
        ap.add_argument("--sft-weight", type=float, default=1.0, help="weight of the SFT loss on the chosen answers")

    exit_worker(main(train_dream, PHASE, description="Dream phase: fine-tune on a dream set's pairs and SFT rows",
                  extra_args=extra_args))
