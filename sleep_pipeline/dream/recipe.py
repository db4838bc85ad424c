"""The Dream recipe (``recipes/dream.yaml``) as validated dataclasses."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

from sleep_pipeline.dream.quality import QualitySpec
from sleep_pipeline.dream.redteam import TRANSFORMS
from sleep_pipeline.recipe_checks import check_keys, fail, get, in_file, number, one_of, read_yaml, section, stable_hash

GENERATOR_KINDS = ("candidate", "model", "endpoint")


@dataclass(frozen=True)
class GeneratorSpec:
    kind: str = "candidate"  # candidate: the candidate being dreamed on; model: a local model dir; endpoint
    path: str | None = None  # kind model: a model directory or a candidate id
    url: str | None = None  # kind endpoint: the base URL of an OpenAI-compatible API
    model: str | None = None  # kind endpoint: the model name
    api_key_env: str | None = None  # kind endpoint: the environment variable holding the key
    batch_size: int = 16


@dataclass(frozen=True)
class SelfConsistencySpec:
    enabled: bool = True
    prompts: int = 16
    samples: int = 4
    agreement: float = 0.5
    temperature: float = 0.8
    top_p: float = 0.95
    max_new_tokens: int = 96


@dataclass(frozen=True)
class CounterfactualSpec:
    enabled: bool = True
    items: int = 24


@dataclass(frozen=True)
class RedTeamSpec:
    enabled: bool = True
    seeds: int = 32
    benign: int = 16
    plain: int = 0  # everyday rows asked as they are: answer-over-refusal pairs without a transform
    transforms: tuple[str, ...] = tuple(TRANSFORMS)
    max_new_tokens: int = 48
    library_per_cell: int = 2  # red_team_library refresh: attacks per harm category x transform


@dataclass(frozen=True)
class ReplaySpec:
    enabled: bool = True
    max_share: float = 0.2
    max_times_replayed: int = 3


BLEND_PARTS = ("dpo_pairs", "synthetic", "sft_replay")


@dataclass(frozen=True)
class FinetuneSpec:
    """The dreamed candidate: fine-tuning the candidate on blend(sft replay, dpo pairs, synthetic)."""
    enabled: bool = True
    recipe: str = "dream_train.yaml"  # the worker's training recipe (steps, learning rate, LoRA, DeepSpeed)
    beta: float = 0.1  # DPO's beta
    sft_weight: float = 1.0  # weight of the SFT term (chosen answers and SFT rows)
    # shares of the blend: the dream set's preference pairs, its SFT rows (verified chains, replayed hard
    # examples) and rows of the candidate's own training mix (against forgetting)
    blend: tuple[tuple[str, float], ...] = (("dpo_pairs", 0.5), ("synthetic", 0.25), ("sft_replay", 0.25))
    max_rows: int = 0  # at most this many training rows (0: as many as the dream set allows at these shares)

    @property
    def shares(self) -> dict[str, float]:
        return dict(self.blend)


@dataclass(frozen=True)
class DreamRecipe:
    generator: GeneratorSpec = field(default_factory=GeneratorSpec)
    self_consistency: SelfConsistencySpec = field(default_factory=SelfConsistencySpec)
    counterfactual: CounterfactualSpec = field(default_factory=CounterfactualSpec)
    red_team: RedTeamSpec = field(default_factory=RedTeamSpec)
    replay: ReplaySpec = field(default_factory=ReplaySpec)
    quality: QualitySpec = field(default_factory=QualitySpec)
    finetune: FinetuneSpec = field(default_factory=FinetuneSpec)
    auto_approve: bool = False  # release without a person's spot-check (nightly LoRA-only dreams)
    seed: int = 0
    source: str = ""

    def recipe_hash(self) -> str:
        """What the dream set depends on (the fine-tune's settings and the review policy do not change its items)."""
        d = asdict(self)
        d.pop("source")
        d.pop("finetune")
        d.pop("auto_approve")
        return stable_hash(d)


def _spec(raw: dict, key: str, cls, convert: dict):
    s = section(raw, key, "", cls)
    default = cls()
    return cls(**{name: fn(s, name, key, getattr(default, name)) for name, fn in convert.items()})


def _int(lo=None, hi=None):
    return lambda s, k, where, d: number(s, k, where, d, lo=lo, hi=hi, kind=int)


def _float(lo=None, hi=None):
    return lambda s, k, where, d: number(s, k, where, d, lo=lo, hi=hi)


def _bool(s, k, where, d):
    return get(s, k, where, bool, d)


def _opt_str(s, k, where, d):
    return get(s, k, where, (str, type(None)), d)


def load_dream_recipe(path: str | Path) -> DreamRecipe:
    path = Path(path).resolve()
    raw = read_yaml(path)
    with in_file(path):
        check_keys(raw, {"generator", "self_consistency", "counterfactual", "red_team", "replay", "quality",
                         "finetune", "auto_approve", "seed"}, "")
        generator = _spec(raw, "generator", GeneratorSpec, {
            "kind": lambda s, k, w, d: one_of(get(s, k, w, str, d), GENERATOR_KINDS, "generator.kind", "generator kind"),
            "path": _opt_str, "url": _opt_str, "model": _opt_str, "api_key_env": _opt_str,
            "batch_size": _int(1, 512)})
        if generator.kind == "model" and not generator.path:
            raise fail("generator.path", "a generator of kind model needs a model directory or candidate id")
        if generator.kind == "endpoint" and not (generator.url and generator.model):
            raise fail("generator", "a generator of kind endpoint needs url and model (and api_key_env for a key)")
        sc = _spec(raw, "self_consistency", SelfConsistencySpec, {
            "enabled": _bool, "prompts": _int(0), "samples": _int(2, 64), "agreement": _float(0.0, 1.0),
            "temperature": _float(0.05, 5.0), "top_p": _float(0.01, 1.0), "max_new_tokens": _int(4, 4096)})
        cf = _spec(raw, "counterfactual", CounterfactualSpec, {"enabled": _bool, "items": _int(0)})
        rt_raw = section(raw, "red_team", "", RedTeamSpec)
        transforms = tuple(get(rt_raw, "transforms", "red_team", list, list(RedTeamSpec().transforms)))
        for t in transforms:
            one_of(t, TRANSFORMS, "red_team.transforms", "transform")
        if not transforms:
            raise fail("red_team.transforms", "needs at least one transform")
        rt = RedTeamSpec(enabled=get(rt_raw, "enabled", "red_team", bool, True),
                         seeds=number(rt_raw, "seeds", "red_team", RedTeamSpec().seeds, lo=0, kind=int),
                         benign=number(rt_raw, "benign", "red_team", RedTeamSpec().benign, lo=0, kind=int),
                         plain=number(rt_raw, "plain", "red_team", RedTeamSpec().plain, lo=0, kind=int),
                         transforms=transforms,
                         max_new_tokens=number(rt_raw, "max_new_tokens", "red_team", RedTeamSpec().max_new_tokens,
                                               lo=4, hi=4096, kind=int),
                         library_per_cell=number(rt_raw, "library_per_cell", "red_team", RedTeamSpec().library_per_cell,
                                                 lo=0, hi=100, kind=int))
        rp = _spec(raw, "replay", ReplaySpec, {"enabled": _bool, "max_share": _float(0.0, 0.9),
                                               "max_times_replayed": _int(1)})
        q = section(raw, "quality", "", QualitySpec)
        dq = QualitySpec()
        refuse = tuple(get(q, "refuse_buckets", "quality", list, list(dq.refuse_buckets)))
        quality = QualitySpec(max_chars=number(q, "max_chars", "quality", dq.max_chars, lo=16, kind=int),
                              near_duplicate_jaccard=number(q, "near_duplicate_jaccard", "quality",
                                                            dq.near_duplicate_jaccard, lo=0.05, hi=1.0),
                              max_repetition=number(q, "max_repetition", "quality", dq.max_repetition, lo=0.0, hi=1.0),
                              refuse_buckets=refuse,
                              rater_sample=number(q, "rater_sample", "quality", dq.rater_sample, lo=0, kind=int))
        finetune = _finetune(raw, path)
        auto = get(raw, "auto_approve", "", bool, False)
        if quality.rater_sample == 0 and not auto:
            raise fail("quality.rater_sample", "0 queues nothing for people to review, so no release could pass: "
                                               "sample at least 1, or set auto_approve: true")
    return DreamRecipe(generator=generator, self_consistency=sc, counterfactual=cf, red_team=rt, replay=rp,
                       quality=quality, finetune=finetune, auto_approve=auto, seed=number(raw, "seed", "", 0, lo=0, kind=int),
                       source=str(path))


def _finetune(raw: dict, path: Path) -> FinetuneSpec:
    f = section(raw, "finetune", "", {"enabled", "recipe", "beta", "sft_weight", "blend", "max_rows"})
    d = FinetuneSpec()
    enabled = get(f, "enabled", "finetune", bool, d.enabled)
    recipe = get(f, "recipe", "finetune", str, d.recipe)
    resolved = Path(recipe) if Path(recipe).is_absolute() else path.parent / recipe
    if enabled and not resolved.is_file():
        raise fail("finetune.recipe", f"{resolved} does not exist (the Dream worker's training recipe)")
    b = section(f, "blend", "finetune", set(BLEND_PARTS))
    shares = tuple((k, number(b, k, "finetune.blend", dict(d.blend)[k] if not b else 0.0, lo=0.0, hi=1.0))
                   for k in BLEND_PARTS)
    if enabled and not any(v > 0 for k, v in shares if k != "sft_replay"):
        raise fail("finetune.blend", "give dpo_pairs or synthetic a share above 0: the dream set is what Dream trains on")
    return FinetuneSpec(enabled=enabled, recipe=str(resolved.resolve()), blend=shares,
                        beta=number(f, "beta", "finetune", d.beta, lo=1e-4, hi=100.0),
                        sft_weight=number(f, "sft_weight", "finetune", d.sft_weight, lo=0.0, hi=100.0),
                        max_rows=number(f, "max_rows", "finetune", d.max_rows, lo=0, kind=int))
