"""Dedup throughput and accuracy: the engine's vectorised MinHash LSH against a naive datasketch loop,
and its accuracy on three corpora, each against the previous default settings in the same run.

Throughput: a generated corpus (default 100,000 documents, a quarter of them planted exact/near
copies); three sides, each in a fresh process so peak memory is its own, interleaved and repeated
(this machine's CPU capacity drifts):

- ``ours``: ``sleep_pipeline.data.dedup.dedup`` (exact + near dedup, verified, clustered);
- ``naive_datasketch``: one ``datasketch.MinHash`` per document updated shingle by shingle, LSH
  insert and query one document at a time;
- ``rensa``: the Rust ``RMinHash`` + ``RMinHashLSH`` on the same shingles, for reference.

Accuracy, always against exact truth: a pair is a near duplicate when the Jaccard similarity of the
two texts' sets of word 5-grams is >= 0.8 (words: NFKC, case-folded, every run of characters that
are not letters or digits is one space; 5-grams compared as strings). See ``bench/real_corpus.py``
for ``recall`` (true pairs not both kept) and ``precision`` (removed documents whose kept copy truly
is a near duplicate).

- ``generated``: a sample of originals of the throughput corpus plus all their copies;
- ``real_text``: licence and copyright texts installed on this machine (``bench/real_corpus.py``);
- ``templated``: the embedded default's generated items (procedural tasks that repeat long
  instructions around different instances) with planted reposts: distinct items merged (should
  stay few) and planted copies removed, with the prompts passed as the template-able request part.

``previous_defaults``: threshold 0.7 on word 3-grams with the template-shingle filter over the whole
text (the settings before real-text dedup was measured), run on the current engine.

    python bench/dedup.py [--docs 100000] [--repeats 2] [--sample 3000] [--smoke]
    python bench/dedup.py --backend ray [--sizes 100000,1000000] [--workers 2] [--address ADDR] [--smoke]

``--backend ray`` measures the whole data hygiene step (ingest, clean, dedup into DuckDB) on the local
backend and on Ray at growing sizes instead: see ``bench/hygiene_scale.py``.

Prints one JSON object. ``pass`` is true when ours is at least 5x the naive throughput (median of
the repeats), recall and precision are >= 0.95 on the generated and the real-text corpus, and no
more distinct templated items are merged than with the previous defaults. ``--smoke`` (what the
test suite runs): 2,000 generated documents, one repeat, small real-text and templated corpora.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench import hygiene_scale, real_corpus  # noqa: E402
from bench.common import json_stdout, parse_args  # noqa: E402
from sleep_pipeline.config import DedupConfig  # noqa: E402
from sleep_pipeline.data.corpus import RayOptions  # noqa: E402
from sleep_pipeline.data.dedup import dedup, normalize_texts  # noqa: E402
from sleep_pipeline.data.perturb import PERTURBATIONS, perturb  # noqa: E402

SPEEDUP_TARGET = 5.0
RECALL_TARGET = 0.95
PRECISION_TARGET = 0.95
SMOKE = {"docs": 2000, "repeats": 1, "sample": 200, "real_docs": 150, "templated_scale": 0.05, "sizes": "1500,3000"}
PREVIOUS_DEFAULTS = {"threshold": 0.7, "shingle_size": 3}  # and the template filter over the whole text


# ------------------------------------------------------------------------------------- corpus
def make_corpus(n_docs: int, seed: int = 0, copy_share: float = 0.25) -> tuple[list[str], list[int]]:
    """Documents of 30-150 words from a Zipf-weighted synthetic vocabulary; ``origin[i]`` is the
    index of the original a planted copy was made from (its own index for an original)."""
    rng = random.Random(seed)
    nrng = np.random.default_rng(seed)
    syll = ["ka", "lo", "mi", "ra", "te", "su", "no", "vi", "de", "po", "an", "el", "or", "ix", "um"]
    vocab = sorted({"".join(rng.choice(syll) for _ in range(rng.randint(1, 4))) for _ in range(40_000)})
    weights = 1.0 / np.arange(1, len(vocab) + 1) ** 1.05
    weights /= weights.sum()
    n_orig = int(n_docs * (1 - copy_share))
    lengths = nrng.integers(30, 151, size=n_orig)
    word_ids = nrng.choice(len(vocab), size=int(lengths.sum()), p=weights)
    texts, pos = [], 0
    for length in lengths:
        words = [vocab[w] for w in word_ids[pos : pos + length]]
        pos += length
        for k in range(8, len(words), rng.randint(8, 16)):
            words[k - 1] += rng.choice((".", ",", "?", ";"))
        words[0] = words[0].capitalize()
        texts.append(" ".join(words) + ".")
    origin = list(range(n_orig))
    for _ in range(n_docs - n_orig):
        src = rng.randrange(n_orig)
        texts.append(perturb(texts[src], rng.choice(PERTURBATIONS), rng))
        origin.append(src)
    # Shuffle so copies are not all at the end (the keep-first rule must not be what finds them).
    order = list(range(n_docs))
    rng.shuffle(order)
    new_index = {old: new for new, old in enumerate(order)}
    return [texts[old] for old in order], [new_index[origin[old]] for old in order]


def _shingle_strings(text_norm: str, k: int) -> list[str]:
    words = text_norm.split()
    if len(words) < k:
        return [" ".join(words)]
    return [" ".join(words[i : i + k]) for i in range(len(words) - k + 1)]


# -------------------------------------------------------------------------------------- sides
def run_ours(texts: list[str], cfg: DedupConfig) -> list[tuple[int, int]]:
    result = dedup(texts, None, cfg, log=None)
    # pairs = every duplicate with its kept copy; co-membership pairs are derived in the parent
    return [(int(i), int(result.cluster[i])) for i in range(len(texts))]


def run_naive(texts: list[str], cfg: DedupConfig) -> list[tuple[int, int]]:
    from datasketch import MinHash, MinHashLSH

    lsh = MinHashLSH(threshold=cfg.threshold, num_perm=cfg.num_perm)
    norm = normalize_texts(texts).to_pylist()
    pairs = []
    for i, t in enumerate(norm):
        m = MinHash(num_perm=cfg.num_perm, seed=cfg.seed)
        for s in _shingle_strings(t, cfg.shingle_size):
            m.update(s.encode("utf-8"))
        for j in lsh.query(m):
            pairs.append((int(j), i))
        lsh.insert(i, m)
    return pairs


def run_rensa(texts: list[str], cfg: DedupConfig) -> list[tuple[int, int]]:
    from rensa import RMinHash, RMinHashLSH

    bands, _ = cfg.lsh_bands()
    lsh = RMinHashLSH(threshold=cfg.threshold, num_perm=cfg.num_perm, num_bands=bands)
    norm = normalize_texts(texts).to_pylist()
    pairs = []
    for i, t in enumerate(norm):
        m = RMinHash(num_perm=cfg.num_perm, seed=cfg.seed)
        m.update(_shingle_strings(t, cfg.shingle_size))
        for j in lsh.query(m):
            pairs.append((int(j), i))
        lsh.insert(i, m)
    return pairs


SIDES = {"ours": run_ours, "naive_datasketch": run_naive, "rensa": run_rensa}


def child(side: str, corpus_path: str, out_path: str, cfg_json: str) -> None:
    texts = json.loads(Path(corpus_path).read_text())
    cfg = DedupConfig(**json.loads(cfg_json))
    start = time.perf_counter()
    pairs = SIDES[side](texts, cfg)
    seconds = time.perf_counter() - start
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    Path(out_path).write_text(json.dumps({"seconds": seconds, "peak_rss_mb": peak_mb, "pairs": pairs}))


# ------------------------------------------------------------------------------------ accuracy
def _previous(texts: list[str], tiers: list[int] | None = None):
    """The previous defaults on the current engine: 3-grams at 0.7, template filter over the whole text."""
    return dedup(texts, tiers, DedupConfig(**PREVIOUS_DEFAULTS), requests=texts)


def _result_scores(texts, result, truth, docs=None) -> dict:
    return real_corpus.scores(texts, result.kept, result.duplicate_of, result.cluster, truth, docs)


def candidate_pair_scores(predicted: set[tuple[int, int]], truth: set[tuple[int, int]]) -> dict:
    """For the LSH-only sides (their output is candidate pairs, not a dedup decision)."""
    tp = len(predicted & truth)
    return {
        "candidate_pair_recall": round(tp / len(truth), 4) if truth else None,
        "candidate_pair_precision": round(tp / len(predicted), 4) if predicted else None,
        "candidate_pairs": len(predicted),
    }


def real_text_accuracy(max_docs: int | None) -> dict:
    start = time.perf_counter()
    corpus = real_corpus.build(max_docs=max_docs)
    truth = real_corpus.true_pairs(corpus.texts)
    report = {
        "documents": len(corpus.texts),
        "from": corpus.origin,
        "skipped": corpus.skipped,
        "identical_texts_dropped": corpus.identical_dropped,
        "mb": round(sum(len(t.encode("utf-8")) for t in corpus.texts) / 1e6, 2),
        "sha256": corpus.sha256[:16],
        "true_pairs": len(truth),
    }
    t0 = time.perf_counter()
    ours = dedup(corpus.texts, None, DedupConfig())
    report["ours"] = {**_result_scores(corpus.texts, ours, truth), "seconds": round(time.perf_counter() - t0, 2)}
    report["previous_defaults"] = _result_scores(corpus.texts, _previous(corpus.texts), truth)
    report["seconds"] = round(time.perf_counter() - start, 2)
    return report


def templated_items(scale: float, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """The embedded default's generated items (as ``generate_source`` makes them, sizes times
    ``scale``) and planted reposts of them (``copy_of`` names the original)."""
    from sleep_pipeline.data import generate as g

    size = {k: max(int(v * scale), 10) for k, v in g.DEFAULT_SIZES.items()}
    curated = (g.curated_tasks(size["curated_tasks"], seed)
               + [{**it, "bucket": "tool_use"} for it in g.tool_calls(size["tool_calls"], seed)]
               + [{**it, "bucket": "benign" if it["label"] == "benign" else "safety"} for it in g.safety(size["safety"], seed)])
    originals = (curated + g.structured_output(size["structured_output"], seed) + g.long_context(size["long_context"], seed))
    copies = []
    for line in g.reposts(curated, size["reposts"], seed, 10**6):
        try:
            obj = json.loads(line)
        except ValueError:  # the planted broken lines
            continue
        if isinstance(obj, dict) and "copy_of" in obj:
            copies.append(obj)
    return originals, copies


def templated_accuracy(scale: float) -> dict:
    """Distinct generated items merged (an original removed as a near copy of another original with a
    different normalised text) and planted copies removed, for the pipeline's record text
    (prompt + response) with and without the prompts given as the template-able request part."""
    originals, copies = templated_items(scale)
    records = originals + copies
    texts = [f"{r['prompt']}\n{r['response']}" for r in records]
    prompts = [r["prompt"] for r in records]
    tiers = [1] * len(originals) + [3] * len(copies)
    norm = normalize_texts(texts).to_pylist()
    n_orig = len(originals)

    def measure(result) -> dict:
        merged: dict[str, int] = {}
        for i in range(n_orig):
            j = int(result.duplicate_of[i])
            if j >= 0 and j < n_orig and norm[i] != norm[j]:
                task = originals[i].get("task") or originals[i].get("bucket") or "other"
                merged[task] = merged.get(task, 0) + 1
        removed = int((~result.kept[n_orig:]).sum())
        return {
            "distinct_merged": sum(merged.values()),
            "distinct_merged_share": round(sum(merged.values()) / n_orig, 4),
            "distinct_merged_by_task": dict(sorted(merged.items(), key=lambda kv: -kv[1])),
            "copies_removed": removed,
            "copies_removed_share": round(removed / max(len(copies), 1), 4),
        }

    return {
        "originals": n_orig,
        "planted_copies": len(copies),
        "ours": measure(dedup(texts, tiers, DedupConfig(), requests=prompts)),
        "ours_without_requests": measure(dedup(texts, tiers, DedupConfig())),
        "previous_defaults": measure(_previous(texts, tiers)),
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--docs", type=int, default=100_000)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--sample", type=int, default=3000, help="originals in the accuracy sample")
    ap.add_argument("--threshold", type=float, default=DedupConfig.threshold)
    ap.add_argument("--num-perm", type=int, default=DedupConfig.num_perm)
    ap.add_argument("--sides", default="ours,naive_datasketch,rensa")
    ap.add_argument("--real-docs", type=int, default=None, help="about this many real-text files (default: all)")
    ap.add_argument("--templated-scale", type=float, default=1.0, help="share of the embedded default's sizes")
    ap.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    ap.add_argument("--backend", choices=("engine", "ray"), default="engine",
                    help="engine: the dedup engine against naive datasketch (default); ray: the whole data hygiene "
                         "step on the local and the Ray backend at --sizes (bench/hygiene_scale.py)")
    ap.add_argument("--sizes", default="100000,1000000", help="--backend ray: corpus sizes, smallest first")
    ap.add_argument("--workers", type=int, default=2, help="--backend ray: CPUs of the local Ray cluster")
    ap.add_argument("--address", default=None, help="--backend ray: an existing cluster's address instead")
    ap.add_argument("--driver-memory-mb", type=int, default=RayOptions.driver_memory_mb, help="--backend ray: DuckDB's memory limit in the driver")
    ap.add_argument("--backends", default="local,ray", help="--backend ray: the sides to run")
    ap.add_argument("--scale-child", nargs=6, help=argparse.SUPPRESS)
    args = parse_args(ap, argv, SMOKE)
    if args.child:
        child(*args.child)
        return
    if args.scale_child:
        backend, folder, out, workers, address, memory = args.scale_child
        hygiene_scale.child(backend, folder, out, int(workers), address or None, int(memory))
        return
    emit = json_stdout()
    if args.backend == "ray":
        hygiene_scale.run([int(x) for x in args.sizes.split(",")], args.workers, args.address, args.repeats,
                          args.smoke, emit, args.driver_memory_mb, tuple(args.backends.split(",")))
        return

    cfg = DedupConfig(threshold=args.threshold, num_perm=args.num_perm)
    cfg_json = json.dumps({"threshold": cfg.threshold, "num_perm": cfg.num_perm, "shingle_size": cfg.shingle_size, "seed": cfg.seed})
    texts, origin = make_corpus(args.docs)
    mb = sum(len(t.encode("utf-8")) for t in texts) / 1e6
    sides = args.sides.split(",")
    runs: dict[str, list[dict]] = {s: [] for s in sides}
    with tempfile.TemporaryDirectory() as tmp:
        corpus_path = Path(tmp) / "corpus.json"
        corpus_path.write_text(json.dumps(texts))
        env = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
        for rep in range(args.repeats):
            for side in sides:  # interleaved: A, B, C, A, B, C ...
                out = Path(tmp) / f"{side}-{rep}.json"
                subprocess.run(
                    [sys.executable, __file__, "--child", side, str(corpus_path), str(out), cfg_json],
                    check=True, env=env,
                )
                runs[side].append(json.loads(out.read_text()))
                print(f"{side} run {rep + 1}: {runs[side][-1]['seconds']:.2f}s", file=sys.stderr, flush=True)

    # Accuracy sample: some originals and every document derived from them.
    rng = random.Random(1)
    originals = sorted({o for o in origin})
    chosen = set(rng.sample(originals, min(args.sample, len(originals))))
    sample = [i for i in range(len(texts)) if origin[i] in chosen or i in chosen]
    sample_set = set(sample)
    local_truth = real_corpus.true_pairs([texts[i] for i in sample])
    truth = {(sample[a], sample[b]) for a, b in local_truth}

    report: dict = {
        "benchmark": "dedup",
        "smoke": args.smoke,
        "truth": (f"exact Jaccard >= {real_corpus.TRUTH_THRESHOLD} of word {real_corpus.TRUTH_SHINGLE}-gram sets "
                  "(NFKC, case-folded, runs of non-letters/digits = one space; grams compared as strings)"),
        "definitions": {
            "recall": "true pairs of which at least one document was removed",
            "precision": "removed documents whose kept copy is truly a near duplicate (or the same normalised text)",
            "cluster_recall/cluster_precision": "the same, counting every two documents of one cluster as a claimed pair",
            "candidate_pair_recall/precision": "LSH-only sides: their unverified candidate pairs against the truth",
        },
        "corpus": {"docs": len(texts), "mb": round(mb, 2), "planted_copies": sum(o != i for i, o in enumerate(origin))},
        "config": json.loads(cfg_json) | {"lsh_bands_rows": list(cfg.lsh_bands())},
        "previous_defaults": {**PREVIOUS_DEFAULTS, "template_filter_over": "whole text"},
        "accuracy_sample_docs": len(sample),
    }
    for side in sides:
        secs = [r["seconds"] for r in runs[side]]
        med = float(np.median(secs))
        pairs = runs[side][-1]["pairs"]
        if side == "ours":  # pairs are (document, its kept copy), so the decision is known
            cluster = np.array([c for _, c in sorted(pairs)], dtype=np.int64)
            kept = cluster == np.arange(len(texts))
            accuracy = real_corpus.scores(texts, kept, np.where(kept, -1, cluster), cluster, truth, sample)
        else:
            predicted = {(min(a, b), max(a, b)) for a, b in pairs if a in sample_set and b in sample_set}
            accuracy = candidate_pair_scores(predicted, truth)
        report[side] = {
            "seconds": [round(s, 2) for s in secs],
            "docs_per_s": round(len(texts) / med, 1),
            "mb_per_s": round(mb / med, 3),
            "peak_rss_mb": round(max(r["peak_rss_mb"] for r in runs[side]), 1),
            **accuracy,
        }
    report["generated_previous_defaults"] = _result_scores(texts, _previous(texts), truth, sample)
    report["real_text"] = real_text_accuracy(args.real_docs)
    report["templated"] = templated_accuracy(args.templated_scale)

    real, tmpl = report["real_text"], report["templated"]
    checks = {
        "real_text_recall": (real["ours"]["recall"] or 0) >= RECALL_TARGET,
        "real_text_precision": (real["ours"]["precision"] or 0) >= PRECISION_TARGET,
        "templated_not_merged_more": tmpl["ours"]["distinct_merged"] <= tmpl["previous_defaults"]["distinct_merged"],
    }
    if "ours" in report:
        checks["generated_recall"] = (report["ours"]["recall"] or 0) >= RECALL_TARGET
        checks["generated_precision"] = (report["ours"]["precision"] or 0) >= PRECISION_TARGET
    if "ours" in report and "naive_datasketch" in report:
        speedup = report["ours"]["docs_per_s"] / report["naive_datasketch"]["docs_per_s"]
        report["speedup_vs_naive"] = round(speedup, 2)
        checks["speedup_vs_naive"] = speedup >= SPEEDUP_TARGET
    if "ours" in report and "rensa" in report:
        report["ours_vs_rensa"] = round(report["ours"]["docs_per_s"] / report["rensa"]["docs_per_s"], 2)
    report["target"] = {"speedup_vs_naive": SPEEDUP_TARGET, "recall": RECALL_TARGET, "precision": PRECISION_TARGET}
    report["checks"] = checks
    report["pass"] = all(checks.values())
    emit(report)


if __name__ == "__main__":
    main()
