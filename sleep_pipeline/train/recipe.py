"""The training recipe (``recipes/learn.yaml``) as validated dataclasses, and the DeepSpeed config it implies."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from sleep_pipeline.recipe_checks import (RecipeError, check_keys, fail, get, in_file, number, one_of, read_yaml,
                                          section, stable_hash)

PRECISIONS = ("fp32", "bf16", "fp16")
STORAGE = "{storage}"  # in model.path: the storage directory
SCHEDULERS = ("cosine", "linear", "constant_with_warmup")
MODEL_CONFIG_KEYS = {
    "architecture", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "max_position_embeddings", "rope_theta", "tie_word_embeddings",
}


@dataclass(frozen=True)
class ModelSpec:
    path: Path | None = None  # a local Hugging Face causal-LM directory (an alias resolved to its target) ...
    config: dict[str, Any] | None = None  # ... or a Llama config to build from


@dataclass(frozen=True)
class TokenizerSpec:
    vocab_size: int = 2048
    min_frequency: int = 2


@dataclass(frozen=True)
class TrainingSpec:
    max_steps: int = 240
    max_time_s: float = 900.0
    micro_batch_size: int = 8
    gradient_accumulation_steps: int = 1
    learning_rate: float = 2e-3
    lr_scheduler: str = "cosine"
    warmup_ratio: float = 0.05
    weight_decay: float = 0.01
    max_grad_norm: float = 1.0
    max_seq_len: int = 512
    precision: str = "fp32"
    seed: int = 1234
    logging_steps: int = 10
    eval_steps: int = 60
    save_steps: int = 60


@dataclass(frozen=True)
class LoraSpec:
    enabled: bool = False
    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    target_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class OwnAnswersSpec:
    buckets: tuple[str, ...] = ()  # rows of these buckets train on the starting model's own answers
    max_new_tokens: int = 96


@dataclass(frozen=True)
class PreferenceSpec:
    """Learn on preference pairs (DPO, with an SFT term on the chosen answer) instead of plain SFT."""
    enabled: bool = False
    refuse_buckets: tuple[str, ...] = ("safety",)  # rows whose answer is a refusal: rejected = the model's own answer
    beta: float = 0.1  # DPO's beta: how far from the starting model the preference may pull
    sft_weight: float = 1.0  # weight of the SFT loss on the chosen answer (0: DPO alone)
    rejected_max_new_tokens: int = 48  # length of the starting model's own answers used as rejected


@dataclass(frozen=True)
class TrainRecipe:
    model: ModelSpec
    tokenizer: TokenizerSpec
    training: TrainingSpec
    zero_stage: int = 2
    lora: LoraSpec = field(default_factory=LoraSpec)
    keep_last: int = 3
    own_answers: OwnAnswersSpec = field(default_factory=OwnAnswersSpec)
    preference: PreferenceSpec = field(default_factory=PreferenceSpec)
    source: str = ""  # the file it was read from

    def recipe_hash(self) -> str:
        d = asdict(self)
        d.pop("source")
        d["model"]["path"] = str(d["model"]["path"]) if d["model"]["path"] else None
        if not self.own_answers.buckets:
            d.pop("own_answers")  # recipes without the section keep the hash they had before it existed
        if not self.preference.enabled:
            d.pop("preference")
        return stable_hash(d)

    def deepspeed_config(self) -> dict[str, Any]:
        """DeepSpeed config for the HF Trainer integration ("auto" = taken from the trainer args)."""
        t = self.training
        cfg: dict[str, Any] = {
            "train_batch_size": "auto",
            "train_micro_batch_size_per_gpu": "auto",
            "gradient_accumulation_steps": "auto",
            "gradient_clipping": "auto",
            "zero_optimization": {"stage": self.zero_stage},
            "steps_per_print": 10**9,  # progress is reported by the worker, not DeepSpeed
            "wall_clock_breakdown": False,
        }
        if self.zero_stage == 3:
            # each rank holds a shard of every weight: save_model gathers them into one consolidated
            # safetensors file (without this it writes a DeepSpeed checkpoint the contract cannot publish)
            cfg["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] = True
        if t.precision == "bf16":
            cfg["bf16"] = {"enabled": True}
        elif t.precision == "fp16":
            cfg["fp16"] = {"enabled": True, "loss_scale": 0, "initial_scale_power": 12}
        return cfg


def default_storage_dir() -> Path:
    """The storage directory when none is given: ``$SLEEP_PIPELINE_HOME``, else ``./.sleep_pipeline``."""
    return Path(os.environ.get("SLEEP_PIPELINE_HOME") or Path.cwd() / ".sleep_pipeline")


def load_train_recipe(path: str | Path, storage_dir: str | Path | None = None) -> TrainRecipe:
    """The recipe at ``path``. ``{storage}`` in ``model.path`` is ``storage_dir`` (default
    :func:`default_storage_dir`), e.g. ``{storage}/models/NAME`` for a model imported under NAME."""
    path = Path(path).resolve()
    raw = read_yaml(path)
    with in_file(path):
        check_keys(raw, {"model", "tokenizer", "training", "deepspeed", "lora", "keep_last", "own_answers",
                          "preference"}, "")
        m = section(raw, "model", "", {"path", "config"})
        if ("path" in m) == ("config" in m):
            raise fail("model", "give exactly one of `path` (a local model directory) or `config` (a model config file)")
        if "path" in m:
            given = get(m, "path", "model", str)
            model_dir = Path(given.replace(STORAGE, str(storage_dir or default_storage_dir()))).expanduser()
            model_dir = model_dir if model_dir.is_absolute() else (path.parent / model_dir)
            if not (model_dir / "config.json").exists():
                hint = " (put a model there with `sleep-pipeline import`)" if STORAGE in given else ""
                raise fail("model.path", f"{model_dir} is not a Hugging Face model directory (no config.json){hint}")
            model = ModelSpec(path=model_dir.resolve())
        else:
            cfg_path = path.parent / get(m, "config", "model", str)
            try:
                cfg = read_yaml(cfg_path)
                check_keys(cfg, MODEL_CONFIG_KEYS, cfg_path.name)
            except RecipeError as exc:
                raise fail("model.config", str(exc)) from None
            if cfg.get("architecture", "llama") != "llama":
                raise fail("model.config", f"{cfg_path.name}: only architecture 'llama' can be built from a config")
            for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"):
                if not isinstance(cfg.get(key), int) or cfg[key] <= 0:
                    raise fail("model.config", f"{cfg_path.name}: {key} must be a positive integer")
            if cfg["hidden_size"] % cfg["num_attention_heads"]:
                raise fail("model.config", f"{cfg_path.name}: hidden_size must be divisible by num_attention_heads")
            model = ModelSpec(config=cfg)

        tk = section(raw, "tokenizer", "", TokenizerSpec)
        tokenizer = TokenizerSpec(
            vocab_size=number(tk, "vocab_size", "tokenizer", 2048, lo=300, hi=1_000_000, kind=int),
            min_frequency=get(tk, "min_frequency", "tokenizer", int, 2),
        )

        tr = section(raw, "training", "", TrainingSpec)
        d = TrainingSpec()
        w = "training"
        training = TrainingSpec(
            max_steps=get(tr, "max_steps", w, int, d.max_steps),
            max_time_s=get(tr, "max_time_s", w, float, d.max_time_s),
            micro_batch_size=get(tr, "micro_batch_size", w, int, d.micro_batch_size),
            gradient_accumulation_steps=get(tr, "gradient_accumulation_steps", w, int, d.gradient_accumulation_steps),
            learning_rate=number(tr, "learning_rate", w, d.learning_rate, lo=1e-8, hi=1.0),
            lr_scheduler=get(tr, "lr_scheduler", w, str, d.lr_scheduler),
            warmup_ratio=number(tr, "warmup_ratio", w, d.warmup_ratio, lo=0.0, hi=0.5),
            weight_decay=number(tr, "weight_decay", w, d.weight_decay, lo=0.0, hi=1.0),
            max_grad_norm=number(tr, "max_grad_norm", w, d.max_grad_norm, lo=0.0, hi=1e6),
            max_seq_len=get(tr, "max_seq_len", w, int, d.max_seq_len),
            precision=get(tr, "precision", w, str, d.precision),
            seed=get(tr, "seed", w, int, d.seed),
            logging_steps=get(tr, "logging_steps", w, int, d.logging_steps),
            eval_steps=get(tr, "eval_steps", w, int, d.eval_steps),
            save_steps=get(tr, "save_steps", w, int, d.save_steps),
        )
        for key in ("max_steps", "micro_batch_size", "gradient_accumulation_steps", "max_seq_len", "logging_steps", "eval_steps", "save_steps"):
            if getattr(training, key) <= 0:
                raise fail(f"training.{key}", f"must be positive, got {getattr(training, key)}")
        if training.max_time_s <= 0:
            raise fail("training.max_time_s", "must be positive")
        one_of(training.precision, PRECISIONS, "training.precision", "precision")
        one_of(training.lr_scheduler, SCHEDULERS, "training.lr_scheduler", "scheduler")

        ds = section(raw, "deepspeed", "", {"zero_stage"})
        zero_stage = get(ds, "zero_stage", "deepspeed", int, 2)
        if zero_stage not in (0, 1, 2, 3):
            raise fail("deepspeed.zero_stage", f"must be 0, 1, 2 or 3, got {zero_stage}")

        lr = section(raw, "lora", "", LoraSpec)
        dl = LoraSpec()
        lora = LoraSpec(
            enabled=get(lr, "enabled", "lora", bool, dl.enabled),
            r=number(lr, "r", "lora", dl.r, lo=1, kind=int),
            alpha=get(lr, "alpha", "lora", int, dl.alpha),
            dropout=number(lr, "dropout", "lora", dl.dropout, lo=0.0, hi=0.9),
            target_modules=tuple(get(lr, "target_modules", "lora", list, list(dl.target_modules))),
        )
        keep_last = number(raw, "keep_last", "", 3, lo=1, kind=int)
        oa = section(raw, "own_answers", "", OwnAnswersSpec)
        buckets = get(oa, "buckets", "own_answers", list, [])
        if not all(isinstance(b, str) and b for b in buckets):
            raise fail("own_answers.buckets", f"must be a list of bucket names, got {buckets!r}")
        if buckets and "config" in m:
            raise fail("own_answers", "a model built from a config has no answers of its own to train on; "
                                      "give model.path (a pretrained model) or remove the section")
        own_answers = OwnAnswersSpec(buckets=tuple(buckets),
                                     max_new_tokens=number(oa, "max_new_tokens", "own_answers", 96, lo=8, hi=4096, kind=int))
        pr = section(raw, "preference", "", PreferenceSpec)
        dp = PreferenceSpec()
        refuse = get(pr, "refuse_buckets", "preference", list, list(dp.refuse_buckets))
        if not refuse or not all(isinstance(b, str) and b for b in refuse):
            raise fail("preference.refuse_buckets", f"must be a non-empty list of bucket names, got {refuse!r}")
        preference = PreferenceSpec(
            enabled=get(pr, "enabled", "preference", bool, bool(pr)),
            refuse_buckets=tuple(refuse),
            beta=number(pr, "beta", "preference", dp.beta, lo=1e-4, hi=100.0),
            sft_weight=number(pr, "sft_weight", "preference", dp.sft_weight, lo=0.0, hi=100.0),
            rejected_max_new_tokens=number(pr, "rejected_max_new_tokens", "preference", dp.rejected_max_new_tokens,
                                           lo=8, hi=4096, kind=int),
        )
        if preference.enabled and "config" in m:
            raise fail("preference", "the rejected answers are the starting model's own, and a model built from a "
                                     "config has none; give model.path (a pretrained model) or remove the section")
        if preference.enabled and set(refuse) & set(own_answers.buckets):
            raise fail("preference.refuse_buckets", f"{sorted(set(refuse) & set(own_answers.buckets))} are also in "
                                                    "own_answers.buckets: a bucket is either refused or answered")
    return TrainRecipe(model=model, tokenizer=tokenizer, training=training, zero_stage=zero_stage, lora=lora,
                       keep_last=keep_last, own_answers=own_answers, preference=preference, source=str(path))
