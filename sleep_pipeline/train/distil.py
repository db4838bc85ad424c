"""Distillation (a Compress step) on the DeepSpeed resource, one process per rank.

    deepspeed --num_gpus 2 --module sleep_pipeline.train.distil --recipe recipes/distil.yaml \\
        --data-dir MIX_DIR --run-dir RUN_DIR --out-root CHECKPOINTS --data-version dv-... \\
        --init-from STUDENT --teacher TEACHER --db sleep_pipeline.duckdb [--temperature 2 --kl-weight 0.8]

The student (``--init-from``: a pruned candidate) learns the teacher's softened distribution plus the
task loss on the answers of ``MIX_DIR/train.jsonl`` (:mod:`sleep_pipeline.compress.distil`); the
teacher (a candidate id or a directory: the live release, or the parent when nothing is live) is
loaded as it is served and never trained. Ranks, progress, resume points and publishing (a
``compress`` candidate whose parent is the student) are :mod:`sleep_pipeline.train.runtime`'s.
"""

from __future__ import annotations

from pathlib import Path

from sleep_pipeline.train.runtime import RunContext, WorkerError, exit_worker, main

PHASE = "compress"


def add_arguments(ap) -> None:
    ap.add_argument("--teacher", required=True, help="the teacher: a model directory or a candidate id (unique prefix)")
    ap.add_argument("--temperature", type=float, default=2.0, help="softening of both distributions")
    ap.add_argument("--kl-weight", type=float, default=0.8, help="weight of the KL term (the task loss gets the rest)")


def load_teacher(ctx: RunContext):
    from sleep_pipeline.candidates import CandidateError, resolve
    from sleep_pipeline.gate.evaluate import load_for_eval

    try:
        path, cand = resolve(Path(ctx.args.db) if ctx.args.db else None, ctx.args.teacher)
    except CandidateError as exc:
        raise WorkerError(f"--teacher {ctx.args.teacher}: {exc}") from None
    model, tok = load_for_eval(path)
    return model, tok, path, cand


def train_distil(ctx: RunContext) -> dict:
    from sleep_pipeline.compress import distil

    a = ctx.args
    if not (a.temperature > 0 and 0.0 <= a.kl_weight <= 1.0):
        raise WorkerError(f"--temperature must be > 0 and --kl-weight in [0, 1] (got {a.temperature}, {a.kl_weight})")
    if ctx.start.directory is None:
        raise WorkerError("distillation needs a student: --init-from a pruned candidate or a model directory")
    train_rows, val_rows = ctx.rows("train"), ctx.rows("validation")
    if not train_rows:
        raise WorkerError(f"{ctx.data_dir / 'train.jsonl'} is empty")
    tokenizer = ctx.tokenizer(lambda: iter(()))
    model = ctx.model(tokenizer)
    teacher, teacher_tok, teacher_path, teacher_cand = load_teacher(ctx)
    if not distil.same_vocabulary(tokenizer, teacher_tok):
        raise WorkerError(f"the teacher {teacher_path} has another tokenizer than the student: distillation needs one")
    trainer = distil.build_trainer(model, teacher, tokenizer, train_rows, val_rows,
                                   ctx.training_arguments(evaluate=bool(val_rows)), ctx.recipe.training.max_seq_len,
                                   a.temperature, a.kl_weight)
    facts = ctx.train(trainer)
    return ctx.publish(trainer, tokenizer, {
        **facts, "objective": "distillation", "compression": "distilled",
        "teacher": teacher_cand.candidate_id if teacher_cand else str(teacher_path),
        "temperature": a.temperature, "kl_weight": a.kl_weight,
    })


if __name__ == "__main__":
    exit_worker(main(train_distil, PHASE, description="Compress phase: distil a pruned student from a teacher",
                  extra_args=add_arguments))
