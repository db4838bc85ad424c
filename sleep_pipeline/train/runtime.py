"""The runtime every training-type entry point (SFT, distillation, DPO) runs on, one process per rank.

    deepspeed --num_gpus 2 --module sleep_pipeline.train.sft --recipe recipes/learn.yaml \\
        --data-dir MIX_DIR --run-dir RUN_DIR --out-root CHECKPOINTS --data-version dv-... \\
        [--init-from MODEL_DIR_OR_CANDIDATE_ID --db sleep_pipeline.duckdb] [--resume auto|required|never]

An entry point is a function ``entry(ctx)`` run by :func:`main`, which parses these common arguments,
bootstraps the rank (run directory, resume decision, starting model, DeepSpeed's shared-memory and op
housekeeping, the parent watchdog) and hands the entry point a :class:`RunContext`: the recipe, the
data, the starting model and tokenizer, the common trainer arguments, ``train(trainer)`` (progress
lines, metrics, time limit and completion-marked resume points attached) and ``publish(trainer,
tokenizer, info)`` (consolidated weights through :mod:`sleep_pipeline.checkpoint`, with the lineage:
phase, parent candidate ids, starting directory, data version, recipe). The entry point only builds
its datasets and its trainer. The runtime talks to Dagster only through ``dagster_pipes`` and only from
rank 0; without a Pipes context it runs the same way and prints its progress.

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
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

from sleep_pipeline.train.modeling import read_jsonl
from sleep_pipeline.train.recipe import TrainRecipe

METRICS_FILE = "metrics.jsonl"  # rank 0's step metrics in the run directory, one JSON object a line


def read_metrics(run_dir: Path) -> list[dict]:
    """The step metrics a worker wrote to its run directory, oldest first ([] before the first step)."""
    path = Path(run_dir) / METRICS_FILE
    return read_jsonl(path) if path.exists() else []

COMPLETE = "COMPLETE.json"
STATE = "run_state.json"
EXIT_BAD_INPUT = 2
EXIT_NO_RESUME = 3
EXIT_ORPHANED = 4
WATCH_PID_ENV = "SLEEP_PIPELINE_WATCH_PID"


class WorkerError(RuntimeError):
    def __init__(self, msg: str, code: int = EXIT_BAD_INPUT):
        super().__init__(msg)
        self.code = code


# ----------------------------------------------------------------------------------- reporting
def pipes_metadata(metadata: dict) -> dict:
    """``metadata`` as Dagster Pipes takes it: a mapping or list value (which Pipes would take for a
    malformed typed value and refuse, after the checkpoint is written) travels as JSON metadata."""
    return {k: {"raw_value": v, "type": "json"} if isinstance(v, (dict, list, tuple)) else v
            for k, v in metadata.items()}


class Reporter:
    """Rank 0 reports to Dagster Pipes when launched through it (Dagster's log prints the line in the
    terminal, once) and prints to the terminal otherwise."""

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
        if self.pipes:
            self.pipes.log.info(msg)
        else:
            print(msg, flush=True)

    def error(self, msg: str) -> None:
        print(f"error: {msg}", file=sys.stderr, flush=True)
        if self.pipes:
            self.pipes.log.error(msg)

    def metric(self, values: dict) -> None:
        if self.pipes:
            self.pipes.report_custom_message({"kind": "train_metrics", **values})

    def materialized(self, metadata: dict) -> None:
        if self.pipes:
            self.pipes.report_asset_materialization(metadata=pipes_metadata(metadata))

    def close(self) -> None:
        self._stack.close()


# ------------------------------------------------------------------------------ process helpers
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


def _broadcast(value):
    """Rank 0's ``value`` on every rank."""
    box = [value]
    dist = _dist()
    if dist:
        dist.broadcast_object_list(box, src=0)
    return box[0]


# ------------------------------------------------------------------------------ resume markers
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


# ------------------------------------------------------------------------------ starting model
@dataclass(frozen=True)
class StartingModel:
    """Where training starts: the recipe's model (a directory, or None = built from its config) or an
    ``--init-from`` directory/candidate, with the candidate ids it descends from."""

    directory: Path | None
    parents: tuple[str, ...] = ()
    init_from: Path | None = None  # set when the start came from --init-from

    @property
    def key(self) -> str:
        """What a resumed run must have started from too (the same on every rank)."""
        return str(self.directory) if self.directory else "built from config"


def resolve_start(recipe: TrainRecipe, init_from: str | None, db_path: str | Path | None,
                  verify: bool = True, say: Callable[[str], None] = print) -> StartingModel:
    """The starting model: ``init_from`` (a model directory, or a candidate id or unique prefix looked up
    in the registry at ``db_path``) or else the recipe's model. Parents: the candidate's id; for a
    directory holding a verified manifest, its ``checkpoint_sha256``; otherwise none. ``verify=False``
    skips hashing the files, and so finds no parent for a plain directory: ranks other than 0 only need
    the directory (rank 0 publishes the lineage)."""
    from sleep_pipeline.checkpoint import MANIFEST, CheckpointError, verify_checkpoint
    from sleep_pipeline.train.modeling import ADAPTER_CONFIG, is_model_directory

    if init_from is None:
        directory, candidate = recipe.model.path, None
    else:
        from sleep_pipeline.candidates import CandidateError, resolve

        as_path = Path(init_from).expanduser()
        if not as_path.is_dir() and (os.sep in init_from or as_path.exists()):
            raise WorkerError(f"--init-from {init_from}: no such model directory")
        if db_path is not None and not as_path.is_dir() and not Path(db_path).is_file():
            raise WorkerError(f"--init-from {init_from}: the candidate registry {db_path} does not exist")
        try:
            directory, candidate = resolve(Path(db_path) if db_path else None, init_from)
        except CandidateError as exc:
            raise WorkerError(f"--init-from {init_from}: {exc}") from None
        if not is_model_directory(directory):
            raise WorkerError(f"--init-from {init_from}: {directory} is not a model directory "
                              "(no config.json or adapter_config.json)")
        if recipe.lora.enabled and (directory / ADAPTER_CONFIG).is_file():
            raise WorkerError(f"--init-from {init_from} is a LoRA adapter and the recipe trains a new adapter: "
                              "the new one would sit on a merge that exists only in memory and could not be "
                              "reloaded; start from a merged checkpoint or set lora.enabled: false")
    if directory is None:
        return StartingModel(None)
    parents: tuple[str, ...] = ()
    if candidate is not None:
        parents = (candidate.candidate_id,)
        if verify:
            try:  # the lineage names this candidate: its files must still be that candidate
                manifest = verify_checkpoint(directory)
            except CheckpointError as exc:
                raise WorkerError(f"--init-from {init_from}: candidate {candidate.short} does not verify: {exc}") from None
            if manifest["checkpoint_sha256"] != candidate.candidate_id:
                raise WorkerError(f"--init-from {init_from}: {directory} holds {manifest['checkpoint_sha256'][:12]}, "
                                  f"not candidate {candidate.short}")
    elif verify and (directory / MANIFEST).exists():
        try:
            parents = (verify_checkpoint(directory)["checkpoint_sha256"],)
        except CheckpointError as exc:
            say(f"warning: {exc}; the checkpoint will record no parent for {directory}")
    return StartingModel(Path(directory), parents, Path(directory) if init_from is not None else None)


# ------------------------------------------------------------------------------------- context
@dataclass
class RunContext:
    """What an entry point gets: inputs, the starting model, and the runtime's train/publish steps."""

    args: argparse.Namespace
    phase: str
    recipe: TrainRecipe
    reporter: Reporter
    start: StartingModel
    resume_from: Path | None
    rank: int = 0
    world: int = 1
    accelerator: str = "cpu"
    started: float = field(default_factory=time.monotonic)
    history: list[dict] = field(default_factory=list)
    final_eval: dict = field(default_factory=dict)  # the trainer's metrics on the validation split after training

    @property
    def data_dir(self) -> Path:
        return Path(self.args.data_dir)

    @property
    def run_dir(self) -> Path:
        return Path(self.args.run_dir)

    @property
    def out_root(self) -> Path:
        return Path(self.args.out_root)

    @property
    def trainer_dir(self) -> Path:
        return self.run_dir / "trainer"

    @property
    def metrics_path(self) -> Path:
        return self.run_dir / METRICS_FILE

    def rows(self, split: str) -> list[dict]:
        """The rows of ``DATA_DIR/<split>.jsonl`` (its presence was checked at start-up)."""
        from sleep_pipeline.train.modeling import read_jsonl

        return read_jsonl(self.data_dir / f"{split}.jsonl")

    # ----------------------------------------------------------------------- model and tokenizer
    def tokenizer(self, texts: Callable[[], Iterable[str]]):
        """The starting model's own tokenizer, or a byte-level BPE trained on ``texts()`` (rank 0
        trains it into the run directory; the other ranks wait for it)."""
        from sleep_pipeline.train.modeling import load_tokenizer, train_tokenizer

        src = self.start.directory
        if src is not None and (src / "tokenizer_config.json").exists():
            return load_tokenizer(src)
        tok_dir = self.run_dir / "tokenizer"
        if self.rank == 0 and not tok_dir.exists():
            self.reporter.info(f"training a {self.recipe.tokenizer.vocab_size}-token byte-level BPE tokenizer")
            tok = train_tokenizer(texts(), self.recipe.tokenizer)
            tmp = self.run_dir / "tokenizer.tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            tok.save_pretrained(tmp)
            os.replace(tmp, tok_dir)
        deadline = time.monotonic() + 600
        while not tok_dir.exists():
            if time.monotonic() > deadline:
                raise WorkerError("timed out waiting for rank 0 to train the tokenizer")
            time.sleep(0.2)
        return load_tokenizer(tok_dir)

    def model(self, tokenizer, dequantize: bool = False):
        """The starting model (an adapter directory is merged into its base; an int8 checkpoint is refused,
        or with ``dequantize`` turned back into the float weights it computes with), or a fresh one built
        from the recipe's config."""
        from sleep_pipeline.train.modeling import build_model, load_pretrained

        if self.start.directory is None:
            return build_model(self.recipe.model, tokenizer, self.recipe.training.seed)
        try:
            return load_pretrained(self.start.directory, tokenizer, dequantize=dequantize)
        except (OSError, ValueError) as exc:
            raise WorkerError(f"cannot load the starting model {self.start.directory}: {exc}") from None

    def peft_config(self):
        """The recipe's LoRA adapter as a peft config, or None to train every weight."""
        lo = self.recipe.lora
        if not lo.enabled:
            return None
        from peft import LoraConfig

        return LoraConfig(r=lo.r, lora_alpha=lo.alpha, lora_dropout=lo.dropout,
                          target_modules=list(lo.target_modules), task_type="CAUSAL_LM")

    def training_arguments(self, evaluate: bool) -> dict[str, Any]:
        """Keyword arguments every ``TrainingArguments`` subclass (SFTConfig, DPOConfig, ...) takes, from
        the recipe; resume points are pruned by the runtime's completion markers instead of the trainer."""
        t = self.recipe.training
        return dict(
            output_dir=str(self.trainer_dir),
            max_steps=t.max_steps,
            per_device_train_batch_size=t.micro_batch_size,
            per_device_eval_batch_size=t.micro_batch_size,
            gradient_accumulation_steps=t.gradient_accumulation_steps,
            learning_rate=t.learning_rate,
            lr_scheduler_type=t.lr_scheduler,
            warmup_steps=math.ceil(t.warmup_ratio * t.max_steps),
            weight_decay=t.weight_decay,
            max_grad_norm=t.max_grad_norm,
            bf16=t.precision == "bf16",
            fp16=t.precision == "fp16",
            use_cpu=self.accelerator == "cpu",
            deepspeed=self.recipe.deepspeed_config(),
            logging_steps=t.logging_steps,
            eval_strategy="steps" if evaluate else "no",
            eval_steps=t.eval_steps,
            eval_on_start=evaluate and self.resume_from is None,
            save_strategy="steps",
            save_steps=t.save_steps,
            save_total_limit=None,
            save_only_model=False,
            seed=t.seed,
            data_seed=t.seed,
            report_to=[],
            disable_tqdm=True,
            dataloader_num_workers=0,
            include_num_input_tokens_seen="non_padding",
        )

    # --------------------------------------------------------------------------- train, publish
    def train(self, trainer) -> dict[str, Any]:
        """Attach the runtime's callbacks, train (resuming when a complete checkpoint exists), check that
        DeepSpeed ran it, evaluate once more; returns the training facts for the manifest."""
        import deepspeed
        from transformers.trainer_callback import PrinterCallback

        from sleep_pipeline.train.modeling import count_parameters

        trainer.add_callback(_progress_callback(self, trainer))
        trainer.remove_callback(PrinterCallback)  # our progress lines replace its raw dicts
        parameters = count_parameters(trainer.model)
        if self.rank == 0:
            _write_state(self.run_dir, status="running", data_version=self.args.data_version, world_size=self.world,
                         recipe_hash=self.recipe.recipe_hash(), start=self.start.key, started_at=time.time())
        t = self.recipe.training
        self.reporter.info(
            f"{self.phase}: training {parameters:,} parameters on {len(trainer.train_dataset):,} examples, "
            f"world size {self.world} ({self.accelerator}), ZeRO stage {self.recipe.zero_stage}, {t.max_steps} steps, "
            f"starting from {self.start.directory or 'a fresh model'}"
            + (f", resuming from {self.resume_from.name}" if self.resume_from else ""))
        result = trainer.train(resume_from_checkpoint=str(self.resume_from) if self.resume_from else None)
        engine = type(trainer.model_wrapped).__name__
        if not isinstance(trainer.model_wrapped, deepspeed.DeepSpeedEngine):
            raise WorkerError(f"training did not run under DeepSpeed (engine: {engine})")
        final_eval = self.final_eval = trainer.evaluate() if trainer.eval_dataset is not None else {}
        # only rank 0 writes metrics.jsonl (and may still be appending to it): the others must not read
        # it, or they can meet a half-written line
        all_metrics = read_metrics(self.run_dir) if self.rank == 0 and self.metrics_path.exists() else self.history
        losses = [h["loss"] for h in self.history if "loss" in h]
        initial_eval = next((m["eval_loss"] for m in all_metrics if "eval_loss" in m and m["step"] == 0), None)
        return {
            "steps": trainer.state.global_step,
            "tokens": int(trainer.state.num_input_tokens_seen or 0),
            "world_size": self.world,
            "accelerator": self.accelerator,
            "zero_stage": self.recipe.zero_stage,
            "precision": t.precision,
            "engine": engine,
            "parameters": parameters,
            "lora": self.recipe.lora.enabled,
            "train_loss": round(float(losses[-1] if losses else result.training_loss), 4),
            "validation_loss": round(float(final_eval.get("eval_loss", float("nan"))), 4),
            "initial_validation_loss": round(float(initial_eval), 4) if initial_eval is not None else None,
            "resumed_from": self.resume_from.name if self.resume_from else None,
        }

    def lineage(self) -> dict[str, Any]:
        """The manifest fields that say where a checkpoint came from (part of its manifest_sha256)."""
        return {
            "phase": self.phase,
            "kind": self.phase,  # the field's older name, read by earlier consumers
            "parents": list(self.start.parents),
            "init_from": str(self.start.init_from) if self.start.init_from else None,
            "data_version": self.args.data_version,
            "recipe_hash": self.recipe.recipe_hash(),
            "recipe": self.recipe.source,
            "base_model": str(self.start.directory) if self.start.directory else "built from config",
        }

    def publish(self, trainer, tokenizer, info: dict[str, Any], merge_adapter: bool = False) -> dict[str, Any]:
        """Every rank saves (consolidating ZeRO-3 shards); rank 0 writes the tokenizer and publishes a
        verified checkpoint whose manifest holds ``info`` and the lineage. ``merge_adapter``: a LoRA run
        publishes the adapter merged into its base, a plain model (rank 0 merges; not under ZeRO-3,
        whose ranks hold shards). Returns the summary on rank 0 (also reported to Dagster), ``{}`` on the
        others."""
        from sleep_pipeline.checkpoint import publish, staging_dir

        # unique even for two runs publishing in the same second
        name = f"{self.phase}-{time.strftime('%Y%m%d-%H%M%S')}-step{trainer.state.global_step}-{uuid.uuid4().hex[:6]}"
        stage = Path(_broadcast(str(staging_dir(self.out_root, name)) if self.rank == 0 else None))
        merge = merge_adapter and self.recipe.lora.enabled
        if merge and self.recipe.zero_stage == 3:
            raise WorkerError("merging the LoRA adapter at publish needs whole weights on rank 0: use ZeRO stage 0-2")
        if not merge:
            trainer.save_model(str(stage))
        elif self.rank == 0:
            merged = trainer.model.merge_and_unload()
            merged.save_pretrained(str(stage), safe_serialization=True)
        _barrier()
        summary: dict[str, Any] = {}
        if self.rank == 0:
            tokenizer.save_pretrained(stage)
            drop_tied_copy(stage)
            for leftover in stage.glob("training_args.bin"):
                leftover.unlink()  # a pickle the trainer drops beside the weights; the manifest refuses pickles
            info = {**info, "wall_time_s": round(time.monotonic() - self.started, 1), **self.lineage()}
            final, manifest = publish(stage, self.out_root, name, info, reload=_reloader(trainer))
            _write_state(self.run_dir, status="finished", checkpoint=str(final))
            (self.run_dir / "last_checkpoint").write_text(str(final))
            summary = {**info, "checkpoint": str(final), "checkpoint_sha256": manifest["checkpoint_sha256"]}
            self.reporter.info(f"published {final} (validation loss {info.get('initial_validation_loss')} -> "
                               f"{info.get('validation_loss')})")
            reported = {**summary, "parents": ", ".join(summary["parents"]) or "none",
                        "metrics_file": str(self.metrics_path)}
            self.reporter.materialized({k: v for k, v in reported.items() if v is not None})
        _barrier()
        return summary


def drop_tied_copy(directory: Path) -> bool:
    """Remove ``lm_head.weight`` from a saved single-file model whose config ties it to the input embedding
    (the trainer's save under DeepSpeed writes the tied matrix twice; loading ties it again). Returns
    whether the file was rewritten."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    weights, config = Path(directory) / "model.safetensors", Path(directory) / "config.json"
    if not (weights.is_file() and config.is_file()) or not json.loads(config.read_text()).get("tie_word_embeddings"):
        return False
    with safe_open(str(weights), "pt") as fh:
        keys, metadata = list(fh.keys()), fh.metadata()
        if "lm_head.weight" not in keys or "model.embed_tokens.weight" not in keys:
            return False
        if not fh.get_tensor("lm_head.weight").equal(fh.get_tensor("model.embed_tokens.weight")):
            return False  # not actually tied: both are real weights
        tensors = {k: fh.get_tensor(k) for k in keys if k != "lm_head.weight"}
    save_file(tensors, str(weights), metadata=metadata)
    return True


def _reloader(trainer) -> Callable[[Path], Any]:
    """How publish proves a checkpoint loads: the adapter on its base, or the full model. Under ZeRO-3
    transformers would build the reloaded model partitioned across ranks (only rank 0 reloads), so
    DeepSpeed's model-loading hook is switched off for the reload."""

    def reload(path: Path):
        from transformers.integrations.deepspeed import set_hf_deepspeed_config, unset_hf_deepspeed_config

        from sleep_pipeline.train.modeling import load_pretrained

        hf_config = getattr(trainer.args, "hf_deepspeed_config", None)
        unset_hf_deepspeed_config()
        try:
            return load_pretrained(path)
        finally:
            if hf_config is not None:
                set_hf_deepspeed_config(hf_config)

    return reload


def _progress_callback(ctx: RunContext, trainer):
    from transformers import TrainerCallback

    class Progress(TrainerCallback):
        """Step / loss / tokens/s / ETA lines, metrics to Pipes and metrics.jsonl, the time limit (decided
        on rank 0), and completion markers on saved resume points."""

        def __init__(self):
            self.t0 = time.monotonic()
            self.step0 = None
            self.tokens0 = None

        def on_train_begin(self, args_, state, control, **kw):
            from sleep_pipeline.train.shm import release_run_segments

            # DeepSpeed's communication set-up is done and every rank has mapped every peer's
            # shared-memory all-reduce buffer: drop the names so the memory goes with the processes.
            _barrier()
            if ctx.rank == 0:
                released = release_run_segments()
                if released:
                    ctx.reporter.info(f"released {released} shared-memory all-reduce buffer names (freed when the ranks exit)")
            self.step0 = state.global_step
            self.t0 = time.monotonic()
            if ctx.resume_from is not None or state.global_step > 0:
                ds_step = getattr(trainer.model_wrapped, "global_steps", None)
                # DeepSpeed's load_checkpoint returns (None, None) when it loads nothing: compare steps.
                if ds_step != state.global_step or state.global_step == 0:
                    raise WorkerError(f"resume from {ctx.resume_from} did not restore the optimizer state "
                                      f"(DeepSpeed step {ds_step}, trainer step {state.global_step})", EXIT_NO_RESUME)
                ctx.reporter.info(f"resumed from {ctx.resume_from.name if ctx.resume_from else '?'} at step {state.global_step}")

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
            row = {"step": step, "max_steps": state.max_steps, "elapsed_s": round(now - ctx.started, 2),
                   "tokens_per_s": round(tok_s, 1), "eta_s": round(eta, 1), "tokens": int(tokens)}
            for key in ("loss", "eval_loss", "learning_rate", "grad_norm", "rewards/accuracies", "rewards/margins",
                        "eval_rewards/accuracies", "eval_rewards/margins"):  # the last four: preference training
                if key in logs:
                    row[key] = float(logs[key])
            ctx.history.append(row)
            with open(ctx.metrics_path, "a") as fh:
                fh.write(json.dumps(row) + "\n")
            ctx.reporter.metric(row)
            if "eval_loss" in row:
                pref = (f", chosen preferred on {row['eval_rewards/accuracies']:.0%} of the pairs"
                        if "eval_rewards/accuracies" in row else "")
                ctx.reporter.info(f"step {step}/{state.max_steps} validation loss {row['eval_loss']:.4f}{pref}")
            elif "loss" in row:
                pref = (f" pairs won {row['rewards/accuracies']:.0%} margin {row.get('rewards/margins', 0):.2f}"
                        if "rewards/accuracies" in row else "")
                ctx.reporter.info(f"step {step}/{state.max_steps} loss {row['loss']:.4f}{pref} lr "
                                  f"{row.get('learning_rate', 0):.2e} {tok_s:,.0f} tokens/s eta {eta:,.0f}s")

        def on_step_end(self, args_, state, control, **kw):
            import torch

            limit_s = ctx.recipe.training.max_time_s
            # on the trainer's device: NCCL (CUDA ranks) has no CPU tensors; gloo takes CPU ones
            stop = torch.tensor([1.0 if time.monotonic() - ctx.started > limit_s else 0.0], device=args_.device)
            dist = _dist()
            if dist:
                dist.broadcast(stop, src=0)
            if stop.item() > 0:
                ctx.reporter.info(f"time limit {limit_s:.0f}s reached at step {state.global_step}: saving and stopping")
                control.should_training_stop = True
                control.should_save = True

        def on_save(self, args_, state, control, **kw):
            _barrier()  # every rank has written its shard of this checkpoint
            if state.is_world_process_zero:
                ckpt = ctx.trainer_dir / f"checkpoint-{state.global_step}"
                (ckpt / COMPLETE).write_text(json.dumps({"step": state.global_step, "world_size": ctx.world,
                                                         "saved_at": time.time()}))
                _write_state(ctx.run_dir, status="running", last_complete_step=state.global_step)
                for _, old in complete_checkpoints(ctx.trainer_dir)[:-2]:
                    shutil.rmtree(old, ignore_errors=True)
            _barrier()

    return Progress()


# ----------------------------------------------------------------------------------- bootstrap
def parse_args(argv: list[str] | None, prog: str, description: str,
               extra_args: Callable[[argparse.ArgumentParser], None] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog=prog, description=description)
    if extra_args is not None:
        extra_args(ap)  # an entry point's own arguments (e.g. distillation's teacher)
    ap.add_argument("--recipe", required=True)
    ap.add_argument("--data-dir", required=True, help="tiered_data_mix version directory (train/validation JSONL)")
    ap.add_argument("--run-dir", required=True, help="resumable state of this training run")
    ap.add_argument("--out-root", required=True, help="where published checkpoints go")
    ap.add_argument("--data-version", default="")
    ap.add_argument("--resume", choices=("auto", "required", "never"), default="auto")
    ap.add_argument("--init-from", metavar="REF", default=None,
                    help="start from this model directory or candidate id (unique prefix) instead of the recipe's model")
    ap.add_argument("--db", metavar="PATH", default=None,
                    help="the candidate registry (DuckDB file) for --init-from a candidate id")
    ap.add_argument("--storage-dir", metavar="DIR", default=None,
                    help="what {storage} in the recipe's model.path stands for (default: $SLEEP_PIPELINE_HOME)")
    ap.add_argument("--local_rank", type=int, default=0, help=argparse.SUPPRESS)  # set by the launcher
    return ap.parse_args(argv)


def bootstrap(args: argparse.Namespace, phase: str, reporter: Reporter, data_files: Iterable[str]) -> RunContext:
    """Validate the inputs, prepare the run directory and decide resume and start, on every rank."""
    from sleep_pipeline.config import RecipeError
    from sleep_pipeline.train.recipe import load_train_recipe

    rank = int(os.environ.get("RANK", "0"))
    try:
        recipe = load_train_recipe(args.recipe, args.storage_dir)
    except RecipeError as exc:
        raise WorkerError(str(exc)) from None
    for name in data_files:
        if not (Path(args.data_dir) / name).exists():
            raise WorkerError(f"{Path(args.data_dir) / name} does not exist (materialise tiered_data_mix first)")
    start = resolve_start(recipe, args.init_from, args.db, verify=rank == 0, say=reporter.info)
    run_dir = Path(args.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "pids").mkdir(exist_ok=True)
    (run_dir / "pids" / f"rank{rank}.pid").write_text(str(os.getpid()))
    # Every rank reads the same run directory and so reaches the same decision.
    resume_from = choose_resume(run_dir, args.resume, rank)
    earlier = _read_state(run_dir).get("start")
    if resume_from is not None and earlier not in (None, start.key):
        raise WorkerError(f"{run_dir} holds a run that started from {earlier}, and this one starts from {start.key}: "
                          "resuming would mix the two. Use another run directory, or resume 'never' to start over.")
    accelerator = os.environ.get("DS_ACCELERATOR") or ("cuda" if _cuda_available() else "cpu")
    return RunContext(args=args, phase=phase, recipe=recipe, reporter=reporter, start=start, resume_from=resume_from,
                      rank=rank, world=int(os.environ.get("WORLD_SIZE", "1")), accelerator=accelerator)


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def exit_worker(code: int) -> None:
    """End this rank with ``code`` without running C++ static destructors.

    At interpreter exit a rank can abort ("terminate called without an active exception", signal 6)
    when a communication thread is torn down out of order; the launcher then reports the whole run as
    failed after it had already published. The work and its messages are complete here, so: leave
    the process group, flush, and exit directly."""
    dist = _dist()
    if dist:
        try:
            dist.destroy_process_group()
        except Exception as exc:  # noqa: BLE001 - exiting anyway; say why the group did not close
            print(f"could not close the process group cleanly: {exc}", file=sys.stderr, flush=True)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def main(entry: Callable[[RunContext], Any], phase: str, argv: list[str] | None = None, description: str = "",
         data_files: Iterable[str] = ("train.jsonl", "validation.jsonl"),
         extra_args: Callable[[argparse.ArgumentParser], None] | None = None) -> int:
    """Run ``entry(ctx)`` on this rank: parse the common arguments (and the entry point's ``extra_args``),
    bootstrap, and turn a :class:`WorkerError` into its message and exit code. ``data_files`` must exist
    in ``--data-dir``."""
    from sleep_pipeline.train.ops import clear_stale_extension_locks, preload_cpu_ops, use_environment_build_root
    from sleep_pipeline.train.shm import SharedMemoryFull, check_room, sweep_stale_segments

    args = parse_args(argv, f"python -m {entry.__module__}", description, extra_args)
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
        ctx = bootstrap(args, phase, reporter, data_files)
        cpu = os.environ.get("DS_ACCELERATOR") == "cpu"
        local = int(os.environ.get("LOCAL_SIZE", "0"))
        if rank == 0 and cpu and local == ctx.world:
            try:  # every rank on this machine: DeepSpeed will put its all-reduce buffers in /dev/shm
                check_room(local)
            except SharedMemoryFull as exc:
                raise WorkerError(str(exc)) from None
        if cpu:
            preload_cpu_ops(say=reporter.info)
        ctx.started = time.monotonic()  # the time limit covers training, not a first build of the op
        entry(ctx)
        return 0
    except WorkerError as exc:
        reporter.error(str(exc))
        return exc.code
    finally:
        reporter.close()
