"""Dedup throughput and accuracy: the engine's vectorised MinHash LSH against a naive datasketch loop.

Generates a corpus (default 100,000 documents, a quarter of them planted exact/near copies), then
times three sides, each in a fresh process so peak memory is its own, interleaved and repeated
(this machine's CPU capacity drifts):

- ``ours``: ``sleep_pipeline.data.dedup.dedup`` (exact + near dedup, verified, clustered);
- ``naive_datasketch``: one ``datasketch.MinHash`` per document updated shingle by shingle, LSH
  insert and query one document at a time;
- ``rensa``: the Rust ``RMinHash`` + ``RMinHashLSH`` on the same shingles, for reference.

Accuracy is measured on a sample of originals plus all their copies: the true near-duplicate pairs
are those whose exact Jaccard similarity of word shingles is at least the threshold.

    python bench/dedup.py [--docs 100000] [--repeats 2] [--sample 3000] [--smoke]

Prints one JSON object. ``pass`` is true when ours is at least 5x the naive throughput (median of
the repeats) at recall >= 0.95. ``--smoke`` (what the test suite runs): 2,000 documents, one repeat.
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

from bench.common import json_stdout, parse_args  # noqa: E402
from sleep_pipeline.config import DedupConfig  # noqa: E402
from sleep_pipeline.data.dedup import dedup, normalize_texts, shingle  # noqa: E402
from sleep_pipeline.data.perturb import PERTURBATIONS, perturb  # noqa: E402

SPEEDUP_TARGET = 5.0
RECALL_TARGET = 0.95
SMOKE = {"docs": 2000, "repeats": 1, "sample": 200}


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
def true_pairs(texts: list[str], idx: list[int], cfg: DedupConfig) -> set[tuple[int, int]]:
    """All pairs among ``idx`` whose exact shingle-set Jaccard is >= threshold (sparse product)."""
    from scipy.sparse import csr_matrix

    sets = shingle(normalize_texts([texts[i] for i in idx]), cfg.shingle_size)
    rows, cols = [], []
    vocab: dict[int, int] = {}
    for r in range(len(idx)):
        for v in sets.unique(r):
            rows.append(r)
            cols.append(vocab.setdefault(int(v), len(vocab)))
    mat = csr_matrix((np.ones(len(rows), dtype=np.float32), (rows, cols)), shape=(len(idx), len(vocab)))
    inter = (mat @ mat.T).tocoo()
    size = np.asarray(mat.sum(axis=1)).ravel()
    out = set()
    for a, b, v in zip(inter.row, inter.col, inter.data):
        if a < b and v / (size[a] + size[b] - v) >= cfg.threshold:
            out.add((idx[a], idx[b]))
    return out


def scores(predicted: set[tuple[int, int]], truth: set[tuple[int, int]]) -> dict:
    tp = len(predicted & truth)
    return {
        "recall": round(tp / len(truth), 4) if truth else None,
        "precision": round(tp / len(predicted), 4) if predicted else None,
        "true_pairs": len(truth),
        "predicted_pairs": len(predicted),
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--docs", type=int, default=100_000)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--sample", type=int, default=3000, help="originals in the accuracy sample")
    ap.add_argument("--threshold", type=float, default=0.7)
    ap.add_argument("--num-perm", type=int, default=128)
    ap.add_argument("--sides", default="ours,naive_datasketch,rensa")
    ap.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = parse_args(ap, argv, SMOKE)
    if args.child:
        child(*args.child)
        return
    emit = json_stdout()

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
    truth = true_pairs(texts, sample, cfg)

    report: dict = {
        "benchmark": "dedup",
        "smoke": args.smoke,
        "corpus": {"docs": len(texts), "mb": round(mb, 2), "planted_copies": sum(o != i for i, o in enumerate(origin))},
        "config": json.loads(cfg_json) | {"lsh_bands_rows": list(cfg.lsh_bands())},
        "accuracy_sample_docs": len(sample),
    }
    for side in sides:
        secs = [r["seconds"] for r in runs[side]]
        med = float(np.median(secs))
        pairs = runs[side][-1]["pairs"]
        if side == "ours":  # cluster co-membership: every pair of documents in the same cluster
            clusters: dict[int, list[int]] = {}
            for i, c in pairs:
                if i in sample_set:
                    clusters.setdefault(c, []).append(i)
            predicted = {
                (min(a, b), max(a, b)) for members in clusters.values() for a in members for b in members if a < b
            }
        else:
            predicted = {(min(a, b), max(a, b)) for a, b in pairs if a in sample_set and b in sample_set}
        report[side] = {
            "seconds": [round(s, 2) for s in secs],
            "docs_per_s": round(len(texts) / med, 1),
            "mb_per_s": round(mb / med, 3),
            "peak_rss_mb": round(max(r["peak_rss_mb"] for r in runs[side]), 1),
            **scores(predicted, truth),
        }
    if "ours" in report and "naive_datasketch" in report:
        speedup = report["ours"]["docs_per_s"] / report["naive_datasketch"]["docs_per_s"]
        report["speedup_vs_naive"] = round(speedup, 2)
        report["target"] = {"speedup_vs_naive": SPEEDUP_TARGET, "recall": RECALL_TARGET}
        report["pass"] = bool(speedup >= SPEEDUP_TARGET and (report["ours"]["recall"] or 0) >= RECALL_TARGET)
    if "ours" in report and "rensa" in report:
        report["ours_vs_rensa"] = round(report["ours"]["docs_per_s"] / report["rensa"]["docs_per_s"], 2)
    emit(report)


if __name__ == "__main__":
    main()
