"""Training throughput: the Dagster -> DeepSpeed path against a bare PyTorch loop, same model/data/batch.

Side A materialises ``trained_checkpoint`` through Dagster (``dg.materialize``), which launches the
``deepspeed`` launcher with two CPU ranks (ZeRO-2, one thread each) through Pipes. Side B trains the
same freshly built model on the same chat-formatted examples with the same global batch, optimizer,
schedule and sequence length in one process with a plain ``torch`` loop (two threads, the whole
machine). Sides are interleaved and repeated (this machine's CPU capacity drifts). Each repetition
trains with a seed of its own (both sides the same), so Learn never finds an identical earlier run
to reuse: every side-A repetition really trains.

Warm tokens/s are measured over training steps only (from the first logged step on, no evaluation);
the launch overhead of side A (process start, tokenizer, DeepSpeed init, the start and final
validation passes, publishing) is reported separately as wall time minus training time. Side A's
figures come from the materialisation's metadata and the run's metrics file, nothing else.

    python bench/train_throughput.py [--steps 40] [--repeats 2] [--smoke]

``--smoke``: a tiny model on a small data mix, 6 steps, one repeat (what the test suite runs).
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import json_stdout, parse_args  # noqa: E402

TARGET_RATIO = 0.85
SMOKE = {"steps": 6, "repeats": 1, "logging_steps": 2}
SMOKE_MODEL = {"architecture": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
               "num_attention_heads": 4, "num_key_value_heads": 4, "max_position_embeddings": 512}
SMOKE_MIX_EXAMPLES = 600


def edit_yaml(path: Path, edit) -> None:
    raw = yaml.safe_load(path.read_text())
    edit(raw)
    path.write_text(yaml.safe_dump(raw, sort_keys=False))


def prepare(work: Path, instance, steps: int, logging_steps: int, smoke: bool) -> tuple[Path, Path]:
    """Recipes for the bench (no mid-run evaluation or saves) and the data mix, materialised in
    ``instance`` (where Learn looks up the data version it trains on)."""
    import dagster as dg

    import definitions

    recipes = work / "recipes"
    shutil.copytree(ROOT / "recipes", recipes)

    def learn(raw: dict) -> None:
        raw["training"].update({"max_steps": steps, "eval_steps": 10**6, "save_steps": 10**6,
                                "logging_steps": logging_steps})
        if smoke:
            raw["model"] = {"config": "model/bench_smoke.yaml"}
            raw["tokenizer"]["vocab_size"] = 512
            raw["training"].update({"micro_batch_size": 4, "max_seq_len": 256})

    if smoke:
        (recipes / "model" / "bench_smoke.yaml").write_text(yaml.safe_dump(SMOKE_MODEL))
        edit_yaml(recipes / "data.yaml", lambda raw: raw["mix"].update({"total_examples": SMOKE_MIX_EXAMPLES}))
    edit_yaml(recipes / "learn.yaml", learn)
    storage = work / "storage"
    defs = definitions.build_defs(recipes, storage)
    result = dg.materialize([*defs.assets, *defs.asset_checks], resources=defs.resources, instance=instance,
                            selection=dg.AssetSelection.assets("tiered_data_mix").upstream())
    if not result.success:
        raise RuntimeError("materialising the data assets failed")
    return recipes, storage


def side_dagster(recipes: Path, storage: Path, instance, steps: int) -> tuple[dict, Path]:
    """One materialisation of ``trained_checkpoint``: its warm figures and the published checkpoint."""
    import dagster as dg

    import definitions

    defs = definitions.build_defs(recipes, storage)
    start = time.perf_counter()
    result = dg.materialize(defs.assets, resources=defs.resources, instance=instance, selection=["trained_checkpoint"])
    wall = time.perf_counter() - start
    if not result.success:
        raise RuntimeError("materialising trained_checkpoint failed")
    [event] = result.asset_materializations_for_node("trained_checkpoint")
    meta = {k: getattr(v, "value", v) for k, v in event.metadata.items()}
    if meta.get("unchanged") or "metrics_file" not in meta or meta.get("steps") != steps:
        raise RuntimeError(f"trained_checkpoint did not train {steps} steps (metadata: {sorted(meta)}, "
                           f"steps {meta.get('steps')}): every timed repetition must train")
    rows = [row for row in map(json.loads, Path(meta["metrics_file"]).read_text().splitlines()) if "loss" in row]
    first, last = rows[0], rows[-1]
    train_s = last["elapsed_s"] - first["elapsed_s"]
    tokens = last["tokens"] - first["tokens"]
    return {"tokens_per_s": tokens / train_s, "train_s": train_s, "wall_s": wall,
            "launch_overhead_s": wall - train_s, "tokens": tokens, "steps": last["step"] - first["step"],
            "world_size": meta["world_size"]}, Path(meta["checkpoint"])


def side_bare(recipes: Path, storage: Path, tokenizer_dir: Path, steps: int, warm_from: int, world: int) -> dict:
    """The same model, examples, global batch (side A's ``world`` ranks) and schedule in one process
    with a plain loop; tokens/s from step ``warm_from`` on (where side A's first logged step starts
    its clock)."""
    import torch
    from transformers import get_cosine_schedule_with_warmup

    from sleep_pipeline.data.mix import latest_manifest
    from sleep_pipeline.train.modeling import build_model, load_tokenizer, read_jsonl, row_messages
    from sleep_pipeline.train.recipe import load_train_recipe

    torch.set_num_threads(2)
    recipe = load_train_recipe(recipes / "learn.yaml")
    t = recipe.training
    tokenizer = load_tokenizer(tokenizer_dir)
    rows = read_jsonl(Path(latest_manifest(storage / "sleep.duckdb")["files"]["train"]))
    model = build_model(recipe.model, tokenizer, t.seed)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=t.learning_rate, weight_decay=t.weight_decay)
    sched = get_cosine_schedule_with_warmup(opt, math.ceil(t.warmup_ratio * steps), steps)
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
        if step + 1 == warm_from:
            t_first, tokens_first = time.perf_counter(), tokens
    train_s = time.perf_counter() - t_first
    return {"tokens_per_s": (tokens - tokens_first) / train_s, "train_s": train_s, "tokens": tokens - tokens_first,
            "steps": steps - warm_from}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--logging-steps", type=int, default=5, help="side A logs (and side B's clock starts) at this step")
    args = parse_args(ap, argv, SMOKE)
    if args.steps % args.logging_steps or args.steps < 2 * args.logging_steps:
        ap.error("--steps must be a multiple of --logging-steps, and at least two of them")

    import dagster as dg

    emit = json_stdout()  # the launched ranks inherit stdout
    with tempfile.TemporaryDirectory() as tmp, dg.DagsterInstance.ephemeral() as instance:
        recipes, storage = prepare(Path(tmp), instance, args.steps, args.logging_steps, args.smoke)
        base_seed = yaml.safe_load((recipes / "learn.yaml").read_text())["training"]["seed"]
        seeds = [base_seed + rep for rep in range(args.repeats)]
        a_runs, b_runs = [], []
        for rep, seed in enumerate(seeds):  # A, B, A, B ...
            edit_yaml(recipes / "learn.yaml", lambda raw, s=seed: raw["training"].update({"seed": s}))
            figures, checkpoint = side_dagster(recipes, storage, instance, args.steps)
            a_runs.append(figures)
            print(f"dagster->deepspeed run {rep + 1}: {figures['tokens_per_s']:.0f} tokens/s", file=sys.stderr)
            b_runs.append(side_bare(recipes, storage, checkpoint, args.steps, args.logging_steps,
                                    world=figures["world_size"]))
            print(f"bare torch loop run {rep + 1}: {b_runs[-1]['tokens_per_s']:.0f} tokens/s", file=sys.stderr)
    a = statistics.median(r["tokens_per_s"] for r in a_runs)
    b = statistics.median(r["tokens_per_s"] for r in b_runs)
    report = {
        "benchmark": "train_throughput",
        "smoke": args.smoke,
        "steps": args.steps,
        "seeds": seeds,
        "dagster_deepspeed": {"tokens_per_s": round(a, 1), "runs": a_runs,
                              "launch_overhead_s": round(statistics.median(r["launch_overhead_s"] for r in a_runs), 1),
                              "setup": f"deepspeed launcher, {a_runs[0]['world_size']} CPU ranks x 1 thread, ZeRO-2, "
                                       "via dg.materialize + Pipes"},
        "bare_torch": {"tokens_per_s": round(b, 1), "runs": b_runs, "setup": "1 process x 2 threads, plain loop"},
        "ratio": round(a / b, 3),
        "target_ratio": TARGET_RATIO,
        "pass": a / b >= TARGET_RATIO,
    }
    emit(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
