"""The training recipe (``recipes/learn.yaml``) as validated dataclasses, and the DeepSpeed config it implies."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from sleep_pipeline.config import RecipeError, _check_keys, _fail, _get, _in_range, _read_yaml, stable_hash

PRECISIONS = ("fp32", "bf16", "fp16")
SCHEDULERS = ("cosine", "linear", "constant_with_warmup")
MODEL_CONFIG_KEYS = {
    "architecture", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "max_position_embeddings", "rope_theta", "tie_word_embeddings",
}


@dataclass(frozen=True)
class ModelSpec:
    path: Path | None = None  # a local Hugging Face causal-LM directory ...
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
class TrainRecipe:
    model: ModelSpec
    tokenizer: TokenizerSpec
    training: TrainingSpec
    zero_stage: int = 2
    lora: LoraSpec = field(default_factory=LoraSpec)
    keep_last: int = 3
    source: str = ""  # the file it was read from

    def recipe_hash(self) -> str:
        d = asdict(self)
        d.pop("source")
        d["model"]["path"] = str(d["model"]["path"]) if d["model"]["path"] else None
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


def _section(raw: dict, key: str, where: str, allowed: set[str]) -> dict:
    value = raw.get(key) or {}
    if not isinstance(value, dict):
        raise _fail(f"{where}{key}", "must be a mapping")
    _check_keys(value, allowed, f"{where}{key}")
    return value


def load_train_recipe(path: str | Path) -> TrainRecipe:
    path = Path(path).resolve()
    raw = _read_yaml(path)
    try:
        _check_keys(raw, {"model", "tokenizer", "training", "deepspeed", "lora", "keep_last"}, "")
        m = _section(raw, "model", "", {"path", "config"})
        if ("path" in m) == ("config" in m):
            raise _fail("model", "give exactly one of `path` (a local model directory) or `config` (a model config file)")
        if "path" in m:
            model_dir = Path(_get(m, "path", "model", str)).expanduser()
            model_dir = model_dir if model_dir.is_absolute() else (path.parent / model_dir)
            if not (model_dir / "config.json").exists():
                raise _fail("model.path", f"{model_dir} is not a Hugging Face model directory (no config.json)")
            model = ModelSpec(path=model_dir.resolve())
        else:
            cfg_path = path.parent / _get(m, "config", "model", str)
            if not cfg_path.exists():
                raise _fail("model.config", f"{cfg_path} does not exist")
            cfg = yaml.safe_load(cfg_path.read_text()) or {}
            if not isinstance(cfg, dict):
                raise _fail("model.config", f"{cfg_path} must be a YAML mapping")
            try:
                _check_keys(cfg, MODEL_CONFIG_KEYS, cfg_path.name)
            except RecipeError as exc:
                raise _fail("model.config", str(exc)) from None
            if cfg.get("architecture", "llama") != "llama":
                raise _fail("model.config", f"{cfg_path.name}: only architecture 'llama' can be built from a config")
            for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"):
                if not isinstance(cfg.get(key), int) or cfg[key] <= 0:
                    raise _fail("model.config", f"{cfg_path.name}: {key} must be a positive integer")
            if cfg["hidden_size"] % cfg["num_attention_heads"]:
                raise _fail("model.config", f"{cfg_path.name}: hidden_size must be divisible by num_attention_heads")
            model = ModelSpec(config=cfg)

        tk = _section(raw, "tokenizer", "", set(TokenizerSpec.__dataclass_fields__))
        tokenizer = TokenizerSpec(vocab_size=_get(tk, "vocab_size", "tokenizer", int, 2048),
                                  min_frequency=_get(tk, "min_frequency", "tokenizer", int, 2))
        if not 300 <= tokenizer.vocab_size <= 1_000_000:
            raise _fail("tokenizer.vocab_size", f"must be between 300 and 1,000,000, got {tokenizer.vocab_size}")

        tr = _section(raw, "training", "", set(TrainingSpec.__dataclass_fields__))
        d = TrainingSpec()
        w = "training"
        training = TrainingSpec(
            max_steps=_get(tr, "max_steps", w, int, d.max_steps),
            max_time_s=_get(tr, "max_time_s", w, float, d.max_time_s),
            micro_batch_size=_get(tr, "micro_batch_size", w, int, d.micro_batch_size),
            gradient_accumulation_steps=_get(tr, "gradient_accumulation_steps", w, int, d.gradient_accumulation_steps),
            learning_rate=_in_range(_get(tr, "learning_rate", w, float, d.learning_rate), 1e-8, 1.0, f"{w}.learning_rate"),
            lr_scheduler=_get(tr, "lr_scheduler", w, str, d.lr_scheduler),
            warmup_ratio=_in_range(_get(tr, "warmup_ratio", w, float, d.warmup_ratio), 0.0, 0.5, f"{w}.warmup_ratio"),
            weight_decay=_in_range(_get(tr, "weight_decay", w, float, d.weight_decay), 0.0, 1.0, f"{w}.weight_decay"),
            max_grad_norm=_in_range(_get(tr, "max_grad_norm", w, float, d.max_grad_norm), 0.0, 1e6, f"{w}.max_grad_norm"),
            max_seq_len=_get(tr, "max_seq_len", w, int, d.max_seq_len),
            precision=_get(tr, "precision", w, str, d.precision),
            seed=_get(tr, "seed", w, int, d.seed),
            logging_steps=_get(tr, "logging_steps", w, int, d.logging_steps),
            eval_steps=_get(tr, "eval_steps", w, int, d.eval_steps),
            save_steps=_get(tr, "save_steps", w, int, d.save_steps),
        )
        for key in ("max_steps", "micro_batch_size", "gradient_accumulation_steps", "max_seq_len", "logging_steps", "eval_steps", "save_steps"):
            if getattr(training, key) <= 0:
                raise _fail(f"training.{key}", f"must be positive, got {getattr(training, key)}")
        if training.max_time_s <= 0:
            raise _fail("training.max_time_s", "must be positive")
        if training.precision not in PRECISIONS:
            raise _fail("training.precision", f"unknown precision {training.precision!r} (known: {', '.join(PRECISIONS)})")
        if training.lr_scheduler not in SCHEDULERS:
            raise _fail("training.lr_scheduler", f"unknown scheduler {training.lr_scheduler!r} (known: {', '.join(SCHEDULERS)})")

        ds = _section(raw, "deepspeed", "", {"zero_stage"})
        zero_stage = _get(ds, "zero_stage", "deepspeed", int, 2)
        if zero_stage not in (0, 1, 2, 3):
            raise _fail("deepspeed.zero_stage", f"must be 0, 1, 2 or 3, got {zero_stage}")

        lo = _section(raw, "lora", "", set(LoraSpec.__dataclass_fields__))
        dl = LoraSpec()
        lora = LoraSpec(
            enabled=_get(lo, "enabled", "lora", bool, dl.enabled),
            r=_get(lo, "r", "lora", int, dl.r),
            alpha=_get(lo, "alpha", "lora", int, dl.alpha),
            dropout=_in_range(_get(lo, "dropout", "lora", float, dl.dropout), 0.0, 0.9, "lora.dropout"),
            target_modules=tuple(_get(lo, "target_modules", "lora", list, list(dl.target_modules))),
        )
        if lora.r <= 0:
            raise _fail("lora.r", "must be positive")
        keep_last = _get(raw, "keep_last", "", int, 3)
        if keep_last < 1:
            raise _fail("keep_last", "must be at least 1")
    except RecipeError as exc:
        raise RecipeError(f"{path}: {exc}") from None
    return TrainRecipe(model=model, tokenizer=tokenizer, training=training, zero_stage=zero_stage, lora=lora,
                       keep_last=keep_last, source=str(path))
