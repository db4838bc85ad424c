"""Training throughput: the Dagster -> DeepSpeed path against a bare PyTorch loop, same model/data/batch.

Side A materialises ``trained_checkpoint`` through Dagster (``dg.materialize``), which launches the
``deepspeed`` launcher with two CPU ranks (ZeRO-2, one thread each) through Pipes. Side B trains the
same freshly built model on the same chat-formatted examples with the same global batch, optimizer,
schedule and sequence length in one process with a plain ``torch`` loop (two threads, the whole
machine). Sides are interleaved and repeated (this machine's CPU capacity drifts).

Warm tokens/s are measured over training steps only (after the first logged step, no evaluation);
the launch overhead of side A (process start, tokenizer, DeepSpeed init, publishing) is reported
separately as wall time minus training time.

    python bench/train_throughput.py [--steps 40] [--repeats 2]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TARGET_RATIO = 0.85


def prepare(work: Path, steps: int) -> tuple[Path, Path]:
    """Recipes for the bench (no mid-run evaluation) and the materialised data mix."""
    import dagster as dg

    import definitions

    recipes = work / "recipes"
    shutil.copytree(ROOT / "recipes", recipes)
    learn = yaml.safe_load((recipes / "learn.yaml").read_text())
    learn["training"].update({"max_steps": steps, "eval_steps": 10**6, "save_steps": 10**6, "logging_steps": 5})
    (recipes / "learn.yaml").write_text(yaml.safe_dump(learn))
    storage = work / "storage"
    defs = definitions.build_defs(recipes, storage)
    data_assets = [a for a in defs.assets if "trained_checkpoint" not in {k.to_user_string() for k in a.keys}]
    dg.materialize(data_assets, resources=defs.resources, instance=dg.DagsterInstance.ephemeral())
    return recipes, storage


def side_dagster(recipes: Path, storage: Path, run: int) -> dict:
    import dagster as dg

    import definitions

    shutil.rmtree(storage / "runs", ignore_errors=True)
    defs = definitions.build_defs(recipes, storage)
    start = time.perf_counter()
    result = dg.materialize([a for a in defs.assets if "trained_checkpoint" in {k.to_user_string() for k in a.keys}],
                            resources=defs.resources, instance=dg.DagsterInstance.ephemeral(),
                            selection=["trained_checkpoint"])
    wall = time.perf_counter() - start
    assert result.success
    [metrics_file] = list((storage / "runs").glob("learn-*/metrics.jsonl"))
    rows = [json.loads(line) for line in metrics_file.read_text().splitlines() if "loss" in json.loads(line)]
    first, last = rows[0], rows[-1]
    train_s = last["elapsed_s"] - first["elapsed_s"]
    tokens = last["tokens"] - first["tokens"]
    return {"tokens_per_s": tokens / train_s, "train_s": train_s, "wall_s": wall,
            "launch_overhead_s": wall - train_s, "tokens": tokens, "steps": last["step"] - first["step"]}


def side_bare(recipes: Path, storage: Path, steps: int) -> dict:
    """The same model, examples, global batch and schedule in one process with a plain loop."""
    import torch
    from transformers import get_cosine_schedule_with_warmup

    from sleep_pipeline.data.mix import latest_manifest
    from sleep_pipeline.train.modeling import build_model, load_tokenizer, read_jsonl, row_messages
    from sleep_pipeline.train.recipe import load_train_recipe

    torch.set_num_threads(2)
    recipe = load_train_recipe(recipes / "learn.yaml")
    t = recipe.training
    [tok_dir] = list((storage / "runs").glob("learn-*/tokenizer"))
    tokenizer = load_tokenizer(tok_dir)
    rows = read_jsonl(Path(latest_manifest(storage / "sleep.duckdb")["files"]["train"]))
    model = build_model(recipe.model, tokenizer, t.seed)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=t.learning_rate, weight_decay=t.weight_decay)
    sched = get_cosine_schedule_with_warmup(opt, math.ceil(t.warmup_ratio * steps), steps)
    world = 2  # side A's ranks: the same global batch
    batch = t.micro_batch_size * world * t.gradient_accumulation_steps
    g = torch.Generator().manual_seed(t.seed)
    order = torch.randperm(len(rows), generator=g).tolist()

    def encode(row):
        enc = tokenizer.apply_chat_template(row_messages(row), tokenize=True, return_dict=True,
                                            return_assistant_tokens_mask=True)
        ids = enc["input_ids"][: t.max_seq_len]
        mask = enc["assistant_masks"][: t.max_seq_len]
        return ids, [i if m else -100 for i, m in zip(ids, mask)]

    tokens = 0
    t_first = None
    tokens_first = 0
    for step in range(steps):
        idx = order[(step * batch) % len(order): (step * batch) % len(order) + batch]
        enc = [encode(rows[i]) for i in idx]
        width = max(len(ids) for ids, _ in enc)
        ids = torch.full((len(enc), width), tokenizer.pad_token_id)
        labels = torch.full((len(enc), width), -100)
        attn = torch.zeros((len(enc), width), dtype=torch.long)
        for r, (x, y) in enumerate(enc):
            ids[r, : len(x)] = torch.tensor(x)
            labels[r, : len(y)] = torch.tensor(y)
            attn[r, : len(x)] = 1
        loss = model(input_ids=ids, attention_mask=attn, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), t.max_grad_norm)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        tokens += int(attn.sum())
        if step == 4:  # warm: from the same point side A's first logged step marks
            t_first, tokens_first = time.perf_counter(), tokens
    train_s = time.perf_counter() - t_first
    return {"tokens_per_s": (tokens - tokens_first) / train_s, "train_s": train_s, "tokens": tokens - tokens_first,
            "steps": steps - 5}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    import statistics

    # The launched ranks inherit stdout; send everything but the final JSON to stderr.
    json_out = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    with tempfile.TemporaryDirectory() as tmp:
        recipes, storage = prepare(Path(tmp), args.steps)
        a_runs, b_runs = [], []
        for rep in range(args.repeats):  # A, B, A, B ...
            a_runs.append(side_dagster(recipes, storage, rep))
            print(f"dagster->deepspeed run {rep + 1}: {a_runs[-1]['tokens_per_s']:.0f} tokens/s", file=sys.stderr)
            b_runs.append(side_bare(recipes, storage, args.steps))
            print(f"bare torch loop run {rep + 1}: {b_runs[-1]['tokens_per_s']:.0f} tokens/s", file=sys.stderr)
    a = statistics.median(r["tokens_per_s"] for r in a_runs)
    b = statistics.median(r["tokens_per_s"] for r in b_runs)
    report = {
        "benchmark": "train_throughput",
        "steps": args.steps,
        "dagster_deepspeed": {"tokens_per_s": round(a, 1), "runs": a_runs,
                              "launch_overhead_s": round(statistics.median(r["launch_overhead_s"] for r in a_runs), 1),
                              "setup": "deepspeed launcher, 2 CPU ranks x 1 thread, ZeRO-2, via dg.materialize + Pipes"},
        "bare_torch": {"tokens_per_s": round(b, 1), "runs": b_runs, "setup": "1 process x 2 threads, plain loop"},
        "ratio": round(a / b, 3),
        "target_ratio": TARGET_RATIO,
        "pass": a / b >= TARGET_RATIO,
    }
    sys.stdout.flush()
    json_out.write(json.dumps(report, indent=2) + "\n")
    json_out.flush()


if __name__ == "__main__":
    main()
