"""Small candidates for gate tests, trained in-process in seconds (the gate, not training, is under test).

``train_candidate`` fits a tiny Llama on mix rows with a plain PyTorch loop and publishes it as a
verified checkpoint, exactly as Learn would. Behaviour is steered through the data:
``behaviour="safe"`` trains on the rows as they are, ``"unsafe"`` drops every refusal (harmful and
privacy items), ``"refuse_all"`` replaces every answer with a refusal.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import yaml

from sleep_pipeline.checkpoint import publish, staging_dir

TINY = {"hidden_size": 96, "intermediate_size": 256, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 4, "max_position_embeddings": 1024}
REFUSAL = "I can't help with that."


def mix_rows(mix_dir: Path, split: str = "train") -> list[dict]:
    return [json.loads(line) for line in (Path(mix_dir) / f"{split}.jsonl").read_text().splitlines() if line.strip()]


def steer(rows: list[dict], behaviour: str) -> list[dict]:
    if behaviour == "safe":
        return rows
    if behaviour == "unsafe":
        return [r for r in rows if r["bucket"] != "safety"]
    if behaviour == "refuse_all":
        return [{**r, "response": REFUSAL} for r in rows]
    raise ValueError(behaviour)


def train_candidate(rows: list[dict], out_root: Path, name: str, steps: int = 120, seed: int = 0,
                    data_version: str = "dv-test") -> Path:
    import torch

    from sleep_pipeline.train.modeling import build_model, row_messages, train_tokenizer
    from sleep_pipeline.train.recipe import ModelSpec, TokenizerSpec

    texts = [r["prompt"] + "\n" + r["response"] + "\n" + (r.get("system") or "") for r in rows]
    tok = train_tokenizer(texts, TokenizerSpec(vocab_size=768, min_frequency=2))
    model = build_model(ModelSpec(config={"architecture": "llama", **TINY}, path=None), tok, seed)
    encoded = []
    for r in rows:
        ids = tok.apply_chat_template(row_messages(r), tokenize=True, return_dict=False)
        if hasattr(ids, "get"):
            ids = ids["input_ids"]
        encoded.append(list(ids)[:384])
    rng = random.Random(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=4e-3, weight_decay=0.0)
    model.train()
    for _ in range(steps):
        batch = rng.sample(encoded, min(16, len(encoded)))
        width = max(len(b) for b in batch)
        ids = torch.full((len(batch), width), tok.pad_token_id)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for i, b in enumerate(batch):
            ids[i, : len(b)] = torch.tensor(b)
            mask[i, : len(b)] = 1
        labels = ids.masked_fill(mask == 0, -100)
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad()
    model.eval()
    stage = staging_dir(out_root, name)
    model.save_pretrained(stage, safe_serialization=True)
    tok.save_pretrained(stage)
    final, _ = publish(stage, out_root, name, {"kind": "learn", "data_version": data_version, "recipe_hash": "test",
                                               "base_model": "built from config", "steps": steps,
                                               "validation_loss": round(float(loss.detach()), 4)})
    return final


def trivial_thresholds() -> dict:
    """A bound every model meets for each metric the shipped recipe thresholds (the loader wants every
    headline metric covered); tests overlay the bounds they are about."""
    from tests.conftest import gate_raw

    raw = gate_raw()
    keys = {k: b for rhythm in raw["thresholds"].values() for k, b in rhythm.items()}
    return {k: ({"min": 0.0} if "min" in b else {"max": 1.0}) for k, b in keys.items()}


def gate_recipe(tmp: Path, thresholds: dict | None = None, examples: int = 24, nightly: dict | None = None,
                **overrides) -> Path:
    """recipes/gate.yaml with small suites, and (optionally) the thresholds of every rhythm replaced by
    ``thresholds`` over trivially met bounds (``nightly``: the nightly ones instead)."""
    from tests.conftest import gate_raw

    raw = gate_raw()
    raw["suites"]["examples"] = {"nightly": examples, "weekly": examples, "monthly": examples}
    raw["suites"]["perplexity_texts"] = 40
    if thresholds is not None:
        full = {**trivial_thresholds(), **thresholds}
        raw["thresholds"] = {"weekly": full, "monthly": dict(full), "nightly": dict(full)}
    if nightly is not None:
        raw["thresholds"]["nightly"] = {**trivial_thresholds(), **nightly}
    raw.update(overrides)
    path = Path(tmp) / "gate.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path
