"""The training worker: SFT with transformers/trl under DeepSpeed, one process per rank.

    deepspeed --num_gpus 2 --module sleep_pipeline.train.worker --recipe recipes/learn.yaml \\
        --data-dir MIX_DIR --run-dir RUN_DIR --out-root CHECKPOINTS --data-version dv-...

Engine code: it reads the recipe, trains on ``MIX_DIR/train.jsonl`` with validation loss on
``MIX_DIR/validation.jsonl``, saves resumable intermediate checkpoints under ``RUN_DIR/trainer`` and
publishes the final model through :mod:`sleep_pipeline.checkpoint`. It talks to Dagster only through
``dagster_pipes`` and only from rank 0: log lines, one custom message per logged step, and the final
materialisation metadata. Without a Pipes context it runs the same way and prints its progress.

Resume: an intermediate checkpoint counts only once ``COMPLETE.json`` is in it, written by rank 0
after a barrier that every rank reaches after saving (DeepSpeed's own ``latest`` file is written
before that barrier, so it proves nothing). A run that had completed a checkpoint and finds none
valid fails instead of silently starting again from step 0.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path

COMPLETE = "COMPLETE.json"
STATE = "run_state.json"
EXIT_BAD_INPUT = 2
EXIT_NO_RESUME = 3
EXIT_ORPHANED = 4


class WorkerError(RuntimeError):
    def __init__(self, msg: str, code: int = EXIT_BAD_INPUT):
        super().__init__(msg)
        self.code = code


# ----------------------------------------------------------------------------------- reporting
class Reporter:
    """Rank 0 reports to Dagster Pipes (when launched through it) and prints to the terminal."""

    def __init__(self, rank: int):
        self.rank = rank
        self.pipes = None
        self._stack = contextlib.ExitStack()
        if rank == 0 and os.environ.get("DAGSTER_PIPES_CONTEXT"):
            from dagster_pipes import open_dagster_pipes

            self.pipes = self._stack.enter_context(open_dagster_pipes())

    def info(self, msg: str) -> None:
        if self.rank != 0:
            return
        print(msg, flush=True)
        if self.pipes:
            self.pipes.log.info(msg)

    def error(self, msg: str) -> None:
        print(f"error: {msg}", file=sys.stderr, flush=True)
        if self.pipes:
            self.pipes.log.error(msg)

    def metric(self, values: dict) -> None:
        if self.pipes:
            self.pipes.report_custom_message({"kind": "train_metrics", **values})

    def materialized(self, metadata: dict) -> None:
        if self.pipes:
            self.pipes.report_asset_materialization(metadata=metadata)

    def close(self) -> None:
        self._stack.close()


# ------------------------------------------------------------------------------------ helpers
WATCH_PID_ENV = "SLEEP_PIPELINE_WATCH_PID"


def watch_parent(poll_s: float = 2.0) -> None:
    """Exit when the process that launched the run (``$SLEEP_PIPELINE_WATCH_PID``) is gone.

    Interrupts are handled by the launching side, which terminates the whole process group; this
    covers the case where that side is killed outright and cannot. One rank exiting makes the
    DeepSpeed launcher stop the others."""
    pid = int(os.environ.get(WATCH_PID_ENV, "0") or 0)
    if pid <= 0:
        return
    import threading

    def loop():
        while True:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                print(f"launching process {pid} is gone: stopping this rank", file=sys.stderr, flush=True)
                os._exit(EXIT_ORPHANED)
            except PermissionError:
                pass  # alive, owned by someone else
            time.sleep(poll_s)

    threading.Thread(target=loop, name="watch-parent", daemon=True).start()


def _dist():
    import torch.distributed as dist

    return dist if dist.is_available() and dist.is_initialized() else None


def _barrier() -> None:
    dist = _dist()
    if dist:
        dist.barrier()


def _read_state(run_dir: Path) -> dict:
    path = run_dir / STATE
    return json.loads(path.read_text()) if path.exists() else {}


def _write_state(run_dir: Path, **update) -> None:
    from sleep_pipeline.fsio import write_atomic

    write_atomic(run_dir / STATE, json.dumps({**_read_state(run_dir), **update}, indent=2))


def complete_checkpoints(trainer_dir: Path) -> list[tuple[int, Path]]:
    """Intermediate checkpoints whose completion marker exists, oldest first."""
    out = []
    for p in trainer_dir.glob("checkpoint-*") if trainer_dir.exists() else []:
        marker = p / COMPLETE
        if marker.exists():
            out.append((json.loads(marker.read_text())["step"], p))
    return sorted(out)


def choose_resume(run_dir: Path, mode: str, rank: int = 0) -> Path | None:
    """The checkpoint to resume from, or None to start fresh; raises when a resume is expected but
    no complete checkpoint exists."""
    trainer_dir = run_dir / "trainer"
    if mode == "never":
        if rank == 0 and trainer_dir.exists():  # moved aside first, so other ranks never see half of it
            aside = run_dir / f".discarded-{time.time_ns()}"
            os.replace(trainer_dir, aside)
            shutil.rmtree(aside, ignore_errors=True)
            _write_state(run_dir, status="restarted", last_complete_step=0)
        return None
    complete = complete_checkpoints(trainer_dir)
    state = _read_state(run_dir)
    if complete:
        return complete[-1][1]
    expected = state.get("last_complete_step", 0) > 0
    if mode == "required" or expected:
        partial = sorted(p.name for p in trainer_dir.glob("checkpoint-*")) if trainer_dir.exists() else []
        raise WorkerError(
            f"a resume was expected (run state: {state or 'none'}) but {trainer_dir} holds no complete checkpoint "
            f"(incomplete: {partial or 'none'}); refusing to restart from step 0 silently. "
            "Re-run with resume 'never' to start over.", EXIT_NO_RESUME)
    return None


# ------------------------------------------------------------------------------------- training
def run(args: argparse.Namespace, reporter: Reporter) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, TrainerCallback
    from transformers.trainer_callback import PrinterCallback
    from trl import SFTConfig, SFTTrainer

    from sleep_pipeline.checkpoint import publish, staging_dir
    from sleep_pipeline.config import RecipeError
    from sleep_pipeline.train.modeling import (
        build_model, count_parameters, load_tokenizer, read_jsonl, row_messages, train_tokenizer,
    )
    from sleep_pipeline.train.recipe import load_train_recipe
    from sleep_pipeline.train.shm import release_run_segments

    rank = int(os.environ.get("RANK", "0"))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    start = time.monotonic()
    try:
        recipe = load_train_recipe(args.recipe)
    except RecipeError as exc:
        raise WorkerError(str(exc)) from None
    data_dir = Path(args.data_dir)
    for split in ("train", "validation"):
        if not (data_dir / f"{split}.jsonl").exists():
            raise WorkerError(f"{data_dir / f'{split}.jsonl'} does not exist (materialise tiered_data_mix first)")
    run_dir = Path(args.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "pids").mkdir(exist_ok=True)
    (run_dir / "pids" / f"rank{rank}.pid").write_text(str(os.getpid()))
    accelerator = os.environ.get("DS_ACCELERATOR", "cuda" if torch.cuda.is_available() else "cpu")
    t = recipe.training

    # Every rank reads the same run directory and so reaches the same decision.
    resume_from = choose_resume(run_dir, args.resume, rank)
    train_rows = read_jsonl(data_dir / "train.jsonl")
    val_rows = read_jsonl(data_dir / "validation.jsonl")
    if not train_rows:
        raise WorkerError(f"{data_dir / 'train.jsonl'} is empty")

    # Tokenizer: the model's own, or one trained on the training texts (rank 0 trains, the rest wait).
    tok_dir = run_dir / "tokenizer"
    if recipe.model.path is not None and (recipe.model.path / "tokenizer_config.json").exists():
        tokenizer = load_tokenizer(recipe.model.path)
    else:
        if rank == 0 and not tok_dir.exists():
            reporter.info(f"training a {recipe.tokenizer.vocab_size}-token byte-level BPE tokenizer on {len(train_rows):,} examples")
            tok = train_tokenizer((f"{r.get('system', '')} {r['prompt']} {r['response']}" for r in train_rows), recipe.tokenizer)
            tmp = run_dir / "tokenizer.tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            tok.save_pretrained(tmp)
            os.replace(tmp, tok_dir)
        deadline = time.monotonic() + 600
        while not tok_dir.exists():
            if time.monotonic() > deadline:
                raise WorkerError("timed out waiting for rank 0 to train the tokenizer")
            time.sleep(0.2)
        tokenizer = load_tokenizer(tok_dir)

    model = build_model(recipe.model, tokenizer, t.seed)
    peft_config = None
    if recipe.lora.enabled:
        from peft import LoraConfig

        peft_config = LoraConfig(r=recipe.lora.r, lora_alpha=recipe.lora.alpha, lora_dropout=recipe.lora.dropout,
                                 target_modules=list(recipe.lora.target_modules), task_type="CAUSAL_LM")

    train_ds = Dataset.from_list([{"messages": row_messages(r)} for r in train_rows])
    val_ds = Dataset.from_list([{"messages": row_messages(r)} for r in val_rows]) if val_rows else None

    trainer_dir = run_dir / "trainer"
    history: list[dict] = []
    metrics_path = run_dir / "metrics.jsonl"

    class Progress(TrainerCallback):
        """Step / loss / tokens/s / ETA lines, metrics to Pipes, and the time limit (decided on rank 0)."""

        def __init__(self):
            self.t0 = time.monotonic()
            self.step0 = None
            self.tokens0 = None

        def on_train_begin(self, args_, state, control, **kw):
            # DeepSpeed's communication set-up is done and every rank has mapped every peer's
            # shared-memory all-reduce buffer: drop the names so the memory goes with the processes.
            _barrier()
            if rank == 0:
                released = release_run_segments()
                if released:
                    reporter.info(f"released {released} shared-memory all-reduce buffer names (freed when the ranks exit)")
            self.step0 = state.global_step
            self.t0 = time.monotonic()
            if resume_from is not None or state.global_step > 0:
                ds_step = getattr(trainer.model_wrapped, "global_steps", None)
                # DeepSpeed's load_checkpoint returns (None, None) when it loads nothing: compare steps.
                if ds_step != state.global_step or state.global_step == 0:
                    raise WorkerError(f"resume from {resume_from} did not restore the optimizer state "
                                      f"(DeepSpeed step {ds_step}, trainer step {state.global_step})", EXIT_NO_RESUME)
                reporter.info(f"resumed from {Path(resume_from).name if resume_from else '?'} at step {state.global_step}")

        def on_log(self, args_, state, control, logs=None, **kw):
            if not state.is_world_process_zero or not logs:
                return
            now = time.monotonic()
            step = state.global_step
            tokens = float(state.num_input_tokens_seen or 0)  # all ranks, padding excluded
            if self.tokens0 is None:
                self.tokens0, self.tokens_t0 = tokens, now
            done = max(step - (self.step0 or 0), 1)
            eta = (state.max_steps - step) * (now - self.t0) / done
            tok_s = (tokens - self.tokens0) / max(now - self.tokens_t0, 1e-9) if tokens > self.tokens0 else 0.0
            row = {"step": step, "max_steps": state.max_steps, "elapsed_s": round(now - start, 2),
                   "tokens_per_s": round(tok_s, 1), "eta_s": round(eta, 1)}
            row["tokens"] = int(tokens)
            for key in ("loss", "eval_loss", "learning_rate", "grad_norm"):
                if key in logs:
                    row[key] = float(logs[key])
            history.append(row)
            with open(metrics_path, "a") as fh:
                fh.write(json.dumps(row) + "\n")
            reporter.metric(row)
            if "eval_loss" in row:
                reporter.info(f"step {step}/{state.max_steps} validation loss {row['eval_loss']:.4f}")
            elif "loss" in row:
                reporter.info(f"step {step}/{state.max_steps} loss {row['loss']:.4f} lr {row.get('learning_rate', 0):.2e} "
                              f"{tok_s:,.0f} tokens/s eta {eta:,.0f}s")

        def on_step_end(self, args_, state, control, **kw):
            stop = torch.tensor([1.0 if time.monotonic() - start > t.max_time_s else 0.0])
            dist = _dist()
            if dist:
                dist.broadcast(stop, src=0)
            if stop.item() > 0:
                reporter.info(f"time limit {t.max_time_s:.0f}s reached at step {state.global_step}: saving and stopping")
                control.should_training_stop = True
                control.should_save = True

        def on_save(self, args_, state, control, **kw):
            _barrier()  # every rank has written its shard of this checkpoint
            if state.is_world_process_zero:
                ckpt = trainer_dir / f"checkpoint-{state.global_step}"
                (ckpt / COMPLETE).write_text(json.dumps({"step": state.global_step, "world_size": world,
                                                         "saved_at": time.time()}))
                _write_state(run_dir, status="running", last_complete_step=state.global_step)
                for _, old in complete_checkpoints(trainer_dir)[:-2]:
                    shutil.rmtree(old, ignore_errors=True)
            _barrier()

    sft_args = SFTConfig(
        output_dir=str(trainer_dir),
        max_steps=t.max_steps,
        per_device_train_batch_size=t.micro_batch_size,
        per_device_eval_batch_size=t.micro_batch_size,
        gradient_accumulation_steps=t.gradient_accumulation_steps,
        learning_rate=t.learning_rate,
        lr_scheduler_type=t.lr_scheduler,
        warmup_steps=math.ceil(t.warmup_ratio * t.max_steps),
        weight_decay=t.weight_decay,
        max_grad_norm=t.max_grad_norm,
        max_length=t.max_seq_len,
        bf16=t.precision == "bf16",
        fp16=t.precision == "fp16",
        use_cpu=accelerator == "cpu",
        deepspeed=recipe.deepspeed_config(),
        gradient_checkpointing=False,
        assistant_only_loss=True,
        logging_steps=t.logging_steps,
        eval_strategy="steps" if val_ds is not None else "no",
        eval_steps=t.eval_steps,
        eval_on_start=val_ds is not None and resume_from is None,
        save_strategy="steps",
        save_steps=t.save_steps,
        save_total_limit=None,  # pruned by the completion-marker callback instead
        save_only_model=False,
        seed=t.seed,
        data_seed=t.seed,
        report_to=[],
        disable_tqdm=True,
        dataloader_num_workers=0,
        dataset_num_proc=None,
        include_num_input_tokens_seen="non_padding",
    )
    trainer = SFTTrainer(model=model, args=sft_args, train_dataset=train_ds, eval_dataset=val_ds,
                         processing_class=tokenizer, peft_config=peft_config, callbacks=[Progress()])
    trainer.remove_callback(PrinterCallback)  # our progress lines replace its raw dicts
    dist = _dist()
    if rank == 0:
        _write_state(run_dir, status="running", data_version=args.data_version, recipe_hash=recipe.recipe_hash(),
                     world_size=world, started_at=time.time())
    reporter.info(f"training {count_parameters(model):,} parameters on {len(train_rows):,} examples, "
                  f"world size {world} ({accelerator}), ZeRO stage {recipe.zero_stage}, {t.max_steps} steps"
                  + (f", resuming from {resume_from.name}" if resume_from else ""))
    result = trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    import deepspeed

    engine_name = type(trainer.model_wrapped).__name__
    if not isinstance(trainer.model_wrapped, deepspeed.DeepSpeedEngine):
        raise WorkerError(f"training did not run under DeepSpeed (engine: {engine_name})")
    final_eval = trainer.evaluate() if val_ds is not None else {}

    # Consolidated weights: every rank takes part in save_model; rank 0 publishes.
    out_root = Path(args.out_root)
    name = f"learn-{time.strftime('%Y%m%d-%H%M%S')}-step{trainer.state.global_step}"
    box = [str(staging_dir(out_root, name)) if rank == 0 else None]
    if dist:
        dist.broadcast_object_list(box, src=0)
    stage = Path(box[0])
    trainer.save_model(str(stage))
    _barrier()
    summary: dict = {}
    if rank == 0:
        tokenizer.save_pretrained(stage)
        for leftover in stage.glob("training_args.bin"):
            leftover.unlink()  # a pickle the trainer drops beside the weights; the manifest refuses pickles
        evals = [h["eval_loss"] for h in history if "eval_loss" in h]
        losses = [h["loss"] for h in history if "loss" in h]
        all_metrics = [json.loads(line) for line in metrics_path.read_text().splitlines()] if metrics_path.exists() else history
        initial_eval = next((m["eval_loss"] for m in all_metrics if "eval_loss" in m), None)
        info = {
            "kind": "learn",
            "data_version": args.data_version,
            "recipe_hash": recipe.recipe_hash(),
            "recipe": recipe.source,
            "base_model": str(recipe.model.path) if recipe.model.path else "built from config",
            "lora": recipe.lora.enabled,
            "steps": trainer.state.global_step,
            "tokens": int(trainer.state.num_input_tokens_seen or 0),
            "wall_time_s": round(time.monotonic() - start, 1),
            "world_size": world,
            "accelerator": accelerator,
            "zero_stage": recipe.zero_stage,
            "precision": t.precision,
            "engine": engine_name,
            "parameters": count_parameters(model),
            "train_loss": round(float(losses[-1] if losses else result.training_loss), 4),
            "validation_loss": round(float(final_eval.get("eval_loss", float("nan"))), 4),
            "initial_validation_loss": round(float(initial_eval), 4) if initial_eval is not None else None,
            "resumed_from": resume_from.name if resume_from else None,
        }

        def reload(path: Path):
            if recipe.lora.enabled:
                from peft import AutoPeftModelForCausalLM

                return AutoPeftModelForCausalLM.from_pretrained(path, local_files_only=True)
            return AutoModelForCausalLM.from_pretrained(path, local_files_only=True, use_safetensors=True)

        final, manifest = publish(stage, out_root, name, info, reload=reload, keep_last=recipe.keep_last)
        _write_state(run_dir, status="finished", checkpoint=str(final))
        (run_dir / "last_checkpoint").write_text(str(final))
        summary = {**info, "checkpoint": str(final), "checkpoint_sha256": manifest["checkpoint_sha256"]}
        reporter.info(f"published {final} (validation loss {info['initial_validation_loss']} -> {info['validation_loss']})")
        reporter.materialized({**{k: v for k, v in summary.items() if v is not None}, "metrics_file": str(metrics_path)})
    _barrier()
    return summary


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m sleep_pipeline.train.worker", description="Learn-phase SFT worker")
    ap.add_argument("--recipe", required=True)
    ap.add_argument("--data-dir", required=True, help="tiered_data_mix version directory (train/validation JSONL)")
    ap.add_argument("--run-dir", required=True, help="resumable state of this training run")
    ap.add_argument("--out-root", required=True, help="where published checkpoints go")
    ap.add_argument("--data-version", default="")
    ap.add_argument("--resume", choices=("auto", "required", "never"), default="auto")
    ap.add_argument("--local_rank", type=int, default=0, help=argparse.SUPPRESS)  # set by the launcher
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    from sleep_pipeline.train.ops import clear_stale_extension_locks, preload_cpu_ops, use_environment_build_root
    from sleep_pipeline.train.shm import SharedMemoryFull, check_room, sweep_stale_segments

    args = parse_args(argv)
    rank = int(os.environ.get("RANK", "0"))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    watch_parent()
    use_environment_build_root()
    if rank == 0:
        clear_stale_extension_locks()
        sweep_stale_segments()
    reporter = Reporter(rank)
    try:
        cpu = os.environ.get("DS_ACCELERATOR") == "cpu"
        local = int(os.environ.get("LOCAL_SIZE", "0"))
        if rank == 0 and cpu and local == int(os.environ.get("WORLD_SIZE", "1")):
            try:  # every rank on this machine: DeepSpeed will put its all-reduce buffers in /dev/shm
                check_room(local)
            except SharedMemoryFull as exc:
                raise WorkerError(str(exc)) from None
        if cpu:
            preload_cpu_ops(say=reporter.info)
        run(args, reporter)
        return 0
    except WorkerError as exc:
        reporter.error(str(exc))
        return exc.code
    finally:
        reporter.close()


if __name__ == "__main__":
    sys.exit(main())
