"""The same cleaning and deduplication as :func:`sleep_pipeline.data.corpus.clean_and_dedup`, as Ray
tasks on a cluster: the driver streams record batches into the object store and holds only object
references and counts, never the corpus.

The answer is the local backend's, record for record, because every decision is made by the same
code on the same inputs and never by arrival order:

- every record carries ``ord``, its position in the priority order (source order, then line): the
  total tie-break of "keep the most trusted, then the earliest";
- **clean**: quality filters and PII scrubbing per batch (``clean_rows``), then each record goes to
  the partition of its exact-duplicate key, so every exact-duplicate group lives in one partition;
- **exact**: per partition, each group keeps its best record by (tier, ord);
- **template text**: per partition, how many survivors' requests hold each shingle; summed by a
  shuffle on the shingle, with the local rule (more than ``boilerplate_doc_share`` of all survivors);
- **signatures**: ``minhash_signatures`` with the one permutation set derived from the config's seed;
- **LSH**: band rows shuffled on their bucket key (band index inside the key); each bucket yields the
  same candidate pairs as locally (all pairs, or a star and chain in ord order for a huge bucket);
  pairs are deduplicated by a shuffle on the pair and against those compared in earlier rounds;
- **verify**: a pair goes to the partition of its second document for that document's signature and
  shingles, then to the first's, where the signature estimate and the exact Jaccard are computed by
  the same functions;
- **clusters**: ``star_clusters`` over the verified edges in one task (edges only, no text), rounds
  repeated on the kept documents while a bucket was too large, as locally;
- **compose**: per partition, each record's kept copy, kind and similarity.

Tasks are pure functions of their inputs, so Ray may rerun any of them (a killed worker, a lost
object) and the answer does not change; partitions are written to the store only by the caller, in
one transaction, after every task has succeeded.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections import Counter
from dataclasses import asdict, dataclass
from typing import Any, Callable, Iterable, Iterator

import numpy as np
import pyarrow as pa

from sleep_pipeline.config import DedupConfig, QualityConfig
from sleep_pipeline.data.corpus import DUP_COLUMNS, clean_rows, dedup_text
from sleep_pipeline.data.dedup import (
    _MAX_LSH_ROUNDS, _MAX_RUN_ALL_PAIRS, _best_in_group, _mix64, _pairs_in_runs, _request_sets, band_key, exact_keys,
    jaccard_unique, minhash_signatures, normalize_texts, plausible_floor, remove_shingles, request_doc_freq,
    shingle, signature_agreement, star_clusters, template_limit,
)
from sleep_pipeline.progress import LogFn

TASK_RETRIES = 3  # a task whose worker died is run again; its inputs are immutable objects


# ------------------------------------------------------------------------------------ helpers
def _part(keys: np.ndarray, parts: int) -> np.ndarray:
    """The partition of each 64-bit key (well mixed, so consecutive keys spread out)."""
    return (_mix64(keys.astype(np.uint64)) % np.uint64(parts)).astype(np.int64)


_PAIR = np.dtype([("a", "<i8"), ("b", "<i8")])


def _pair_code(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pairs of ords as one sortable value each (lexicographic: a, then b)."""
    code = np.empty(len(a), dtype=_PAIR)
    code["a"], code["b"] = a, b
    return code


def _pair_part(a: np.ndarray, b: np.ndarray, parts: int) -> np.ndarray:
    return _part(_mix64(a.astype(np.uint64)) ^ b.astype(np.uint64), parts)


def _groups(part: np.ndarray, parts: int) -> list[np.ndarray]:
    """The row positions of each partition, in their original order."""
    order = np.argsort(part, kind="stable")
    bounds = np.searchsorted(part[order], np.arange(parts + 1))
    return [order[bounds[p] : bounds[p + 1]] for p in range(parts)]


def _split(columns: dict[str, np.ndarray], part: np.ndarray, parts: int) -> list[dict[str, np.ndarray]]:
    """``columns`` (equal-length arrays) split into ``parts`` dicts by ``part``."""
    return [{k: v[rows] for k, v in columns.items()} for rows in _groups(part, parts)]


def _concat(pieces: Iterable[dict[str, np.ndarray]], names: tuple[str, ...], dtypes: tuple) -> dict[str, np.ndarray]:
    pieces = [p for p in pieces if p]
    return {n: (np.concatenate([p[n] for p in pieces]) if pieces else np.empty(0, dtype=t)) for n, t in zip(names, dtypes)}


# --------------------------------------------------------------------------------------- tasks
def read_batch(batch: pa.Table | tuple[str, int]) -> pa.Table:
    """A batch given as a table, or as (Parquet file, row group) that the worker reads itself."""
    if isinstance(batch, pa.Table):
        return batch
    import pyarrow.parquet as pq

    path, group = batch
    return pq.ParquetFile(path).read_row_group(group)


def write_table(table: pa.Table, path: str) -> str:
    """``table`` as a Parquet file at ``path``, written whole or not at all (a rerun writes it again)."""
    import pyarrow.parquet as pq

    tmp = f"{path}.{os.getpid()}.tmp"
    pq.write_table(table, tmp)
    os.replace(tmp, path)
    return path


def clean_batch(batch: pa.Table | tuple[str, int], quality: QualityConfig, parts: int) -> tuple:
    """Quality filters and PII scrubbing of one batch; the passing records split by exact key.
    Returns (stats, quarantine rows, *parts tables)."""
    batch = read_batch(batch)
    candidates, rejected, pii = clean_rows(batch.to_pylist(), quality, log=None)
    schema = batch.schema.append(pa.field("pii_scrubbed", pa.string()))
    table = pa.Table.from_pylist(candidates, schema=schema)
    texts = [dedup_text(r) for r in candidates]
    key, empty = exact_keys(texts, normalize_texts(texts)) if texts else (np.empty(0, np.uint64), np.empty(0, bool))
    table = table.append_column("exact_key", pa.array(key, pa.uint64())).append_column("empty_norm", pa.array(empty))
    stats = {"pii": pii, "candidates": len(candidates), "rejected": len(rejected)}
    return (stats, [asdict(q) for q in rejected], *[table.take(rows) for rows in _groups(_part(key, parts), parts)])


@dataclass
class PartitionState:
    """One partition's records (sorted by ord) and, for its exact-dedup survivors, shingles and signatures."""

    table: pa.Table
    exact_best: np.ndarray  # ord of each record's exact-group best
    surv: np.ndarray  # row positions of the survivors that are compared for near duplicates
    sets: Any = None  # ShingleSets of the survivors
    sig: np.ndarray | None = None

    @property
    def ords(self) -> np.ndarray:
        return self.table["ord"].to_numpy()

    def surv_ords(self) -> np.ndarray:
        return self.ords[self.surv]

    def locate(self, ords: np.ndarray) -> np.ndarray:
        """Survivor positions of these ords (all must be survivors of this partition)."""
        so = self.surv_ords()
        pos = np.searchsorted(so, ords)
        if ords.size and (pos.max() >= so.size or not np.array_equal(so[pos], ords)):
            raise RuntimeError("ray dedup: a pair names a document that is not a survivor of its partition")
        return pos


def exact_stage(config: DedupConfig, parts: int, *pieces: pa.Table) -> tuple:
    """Exact dedup of one partition and its survivors' shingles. Returns (state, survivors, *document
    frequency pieces of the request shingles, split by shingle)."""
    tables = [t for t in pieces if t is not None and t.num_rows]
    if not tables:
        return (None, 0, *[{} for _ in range(parts)])
    t = pa.concat_tables(tables).sort_by("ord")
    ords = t["ord"].to_numpy()
    tiers = t["tier"].to_numpy().astype(np.int64)
    empty = t["empty_norm"].to_numpy(zero_copy_only=False)
    exact_best = ords[_best_in_group(t["exact_key"].to_numpy(), tiers)]  # rows are in ord order: the same tie-break
    surv = np.flatnonzero((exact_best == ords) & ~empty)
    rows = t.select(["prompt", "response"]).to_pylist()
    prompts = [r["prompt"] for r in rows]
    texts = [dedup_text(rows[i]) for i in surv]
    sets = shingle(normalize_texts(texts), config.shingle_size)
    state = PartitionState(table=t, exact_best=exact_best, surv=surv, sets=sets)
    df_parts: list[dict] = [{} for _ in range(parts)]
    if config.boilerplate_doc_share < 1.0 and surv.size:
        where = _request_sets([prompts[i] for i in surv], np.arange(surv.size), config.shingle_size)
        uniques, freq = request_doc_freq(where)
        df_parts = _split({"shingle": uniques, "docs": freq.astype(np.int64)}, _part(uniques, parts), parts)
    return (state, int(surv.size), *df_parts)


def template_stage(limit: float, *pieces: dict) -> np.ndarray:
    """The template shingles of one shingle partition: held by more than ``limit`` survivors' requests."""
    d = _concat(pieces, ("shingle", "docs"), (np.uint64, np.int64))
    uniques, inverse = np.unique(d["shingle"], return_inverse=True)
    docs = np.bincount(inverse, weights=d["docs"], minlength=uniques.size)
    return uniques[docs > limit]


def signature_stage(state: PartitionState | None, config: DedupConfig, *template_parts: np.ndarray) -> tuple:
    if state is None:
        return None, 0
    template = np.concatenate(template_parts) if template_parts else np.empty(0, np.uint64)
    state.sets = remove_shingles(state.sets, template)
    state.sig = minhash_signatures(state.sets, config.num_perm, config.seed)
    return state, int(state.sets.values.size)


def band_stage(state: PartitionState | None, home: int, bands: int, rows: int, parts: int, removed: dict) -> list:
    """LSH band rows of this partition's survivors that are still kept, split by bucket key."""
    if state is None or state.surv.size == 0:
        return [{} for _ in range(parts)]
    so = state.surv_ords()
    members = np.flatnonzero(~np.isin(so, removed.get("ord", np.empty(0, np.int64))))
    sig = state.sig[members]
    cols: dict[str, list] = {"band": [], "key": [], "ord": []}
    for band in range(bands):
        cols["band"].append(np.full(members.size, band, dtype=np.int32))
        cols["key"].append(band_key(sig, band, rows))
        cols["ord"].append(so[members])
    out = {k: np.concatenate(v) for k, v in cols.items()}
    out["home"] = np.full(out["ord"].size, home, dtype=np.int32)
    return _split(out, _part(out["key"], parts), parts)


def bucket_stage(parts: int, *pieces: dict) -> tuple:
    """Candidate pairs of the buckets in this key partition. Returns ((largest bucket, band rows), *pairs
    split by pair)."""
    d = _concat(pieces, ("band", "key", "ord", "home"), (np.int32, np.uint64, np.int64, np.int32))
    n = d["ord"].size
    empty = {"a": np.empty(0, np.int64), "b": np.empty(0, np.int64), "home_a": np.empty(0, np.int32),
             "home_b": np.empty(0, np.int32)}
    if n == 0:
        return ((0, 0), *[empty for _ in range(parts)])
    order = np.lexsort((d["ord"], d["key"], d["band"]))
    band, key = d["band"][order], d["key"][order]
    boundary = np.flatnonzero((np.diff(key) != 0) | (np.diff(band) != 0)) + 1
    run_starts = np.concatenate([[0], boundary])
    run_sizes = np.diff(np.concatenate([run_starts, [n]]))
    multi = run_sizes >= 2
    if not multi.any():
        return ((1, n), *[empty for _ in range(parts)])
    pos = _pairs_in_runs(np.arange(n), run_starts[multi], run_sizes[multi])  # positions, in ord order
    ords, homes = d["ord"][order], d["home"][order]
    pairs = {"a": ords[pos[:, 0]], "b": ords[pos[:, 1]], "home_a": homes[pos[:, 0]], "home_b": homes[pos[:, 1]]}
    return ((int(run_sizes.max()), n), *_split(pairs, _pair_part(pairs["a"], pairs["b"], parts), parts))


def pair_stage(checked: np.ndarray, parts: int, *pieces: dict) -> tuple:
    """Unique candidate pairs of one pair partition not compared in an earlier round. Returns
    (pairs compared so far, new pairs, *new pairs split by the second document's partition)."""
    d = _concat(pieces, ("a", "b", "home_a", "home_b"), (np.int64, np.int64, np.int32, np.int32))
    code = _pair_code(d["a"], d["b"])
    code, first = np.unique(code, return_index=True)
    fresh = ~np.isin(code, checked)
    sel = first[fresh]
    d = {k: v[sel] for k, v in d.items()}
    return (np.union1d(checked, code), int(sel.size), *_split(d, d["home_b"].astype(np.int64), parts))


def attach_stage(state: PartitionState | None, parts: int, *pieces: dict) -> list:
    """Each pair with the signature, shingles, record id and tier of its second document (held here),
    split by the first document's partition."""
    d = _concat(pieces, ("a", "b", "home_a", "home_b"), (np.int64, np.int64, np.int32, np.int32))
    if d["a"].size == 0:
        return [{} for _ in range(parts)]
    pos = state.locate(d["b"])
    rids = state.table["record_id"].to_numpy(zero_copy_only=False)
    tiers = state.table["tier"].to_numpy().astype(np.int64)
    rows = state.surv[pos]
    uniq = [state.sets.unique(int(i)) for i in pos]
    lengths = np.array([u.size for u in uniq], dtype=np.int64)
    d.update(sig_b=state.sig[pos], rid_b=rids[rows], tier_b=tiers[rows], set_len=lengths,
             set_start=np.concatenate([[0], np.cumsum(lengths)[:-1]]))
    flat = np.concatenate(uniq) if uniq else np.empty(0, np.uint64)
    out = []
    split = _split(d, d["home_a"].astype(np.int64), parts)
    for piece in split:  # each piece carries only the shingles of its own pairs
        if piece["a"].size == 0:
            out.append({})
            continue
        idx = np.concatenate([np.arange(s, s + n) for s, n in zip(piece["set_start"], piece["set_len"])])
        piece["set_values"] = flat[idx]
        piece["set_start"] = np.concatenate([[0], np.cumsum(piece["set_len"])[:-1]])
        out.append(piece)
    return out


def verify_stage(state: PartitionState | None, config: DedupConfig, *pieces: dict) -> tuple:
    """The verified near-duplicate edges among the pairs whose first document is held here: signature
    estimate, then the exact Jaccard of the shingle sets. Returns (edges, count)."""
    edges: dict[str, list] = {k: [] for k in ("a", "b", "jac", "tier_a", "tier_b", "home_a", "home_b", "rid_a", "rid_b")}
    floor = plausible_floor(config.threshold)
    pieces = [d for d in pieces if d and d["a"].size]
    if pieces:
        rids = state.table["record_id"].to_numpy(zero_copy_only=False)
        tiers = state.table["tier"].to_numpy().astype(np.int64)
    for d in pieces:
        pos = state.locate(d["a"])
        est = signature_agreement(state.sig[pos], d["sig_b"])
        for k in np.flatnonzero(est >= floor):
            s, n = d["set_start"][k], d["set_len"][k]
            jac = jaccard_unique(state.sets.unique(int(pos[k])), d["set_values"][s : s + n])
            if jac < config.threshold:
                continue
            row = state.surv[pos[k]]
            for name, value in (("a", d["a"][k]), ("b", d["b"][k]), ("jac", jac), ("tier_a", tiers[row]),
                                ("tier_b", d["tier_b"][k]), ("home_a", d["home_a"][k]), ("home_b", d["home_b"][k]),
                                ("rid_a", rids[row]), ("rid_b", d["rid_b"][k])):
                edges[name].append(value)
    out = {k: np.asarray(v) for k, v in edges.items()}
    return out, len(edges["a"])


def cluster_stage(parts: int, *edge_pieces: dict) -> tuple:
    """``star_clusters`` over every verified edge so far. Returns (removed count, *removed documents
    with their kept copy, split by the removed document's partition)."""
    pieces = [p for p in edge_pieces if p and p["a"].size]
    if not pieces:
        return (0, *[{} for _ in range(parts)])
    e = {k: np.concatenate([p[k] for p in pieces]) for k in pieces[0]}
    ends = np.concatenate([e["a"], e["b"]])
    linked, first = np.unique(ends, return_index=True)
    tiers = np.concatenate([e["tier_a"], e["tier_b"]])[first].astype(np.int64)
    homes = np.concatenate([e["home_a"], e["home_b"]])[first]
    rids = np.concatenate([e["rid_a"], e["rid_b"]])[first]
    compact = np.stack([np.searchsorted(linked, e["a"]), np.searchsorted(linked, e["b"])], axis=1)
    rep = star_clusters(linked.size, compact, tiers)  # compact order is ord order: the same tie-break
    removed = np.flatnonzero(rep != np.arange(linked.size))
    r = rep[removed]
    code = _pair_code(e["a"], e["b"])
    order = np.argsort(code)
    lo, hi = np.minimum(linked[removed], linked[r]), np.maximum(linked[removed], linked[r])
    jac = e["jac"][order[np.searchsorted(code[order], _pair_code(lo, hi))]]
    out = {"ord": linked[removed], "rep": linked[r], "rep_rid": rids[r], "jac": jac}
    return (int(removed.size), *_split(out, homes[removed].astype(np.int64), parts))


def compose_stage(state: PartitionState | None, removed: dict, out: str | None = None) -> tuple:
    """Each record's kept copy: its exact group's best, or the copy that best was claimed by.
    Returns (kept, duplicates, counts): tables, or with ``out`` the Parquet files written there
    (``out`` + ``-kept.parquet`` / ``-duplicates.parquet``; None when empty)."""
    if state is None:
        return None, None, {}
    t = state.table
    ords = t["ord"].to_numpy()
    rids = t["record_id"].to_numpy(zero_copy_only=False)
    near = {int(o): k for k, o in enumerate(removed.get("ord", []))}
    kept_rows: list[int] = []
    dup: dict[str, list] = {c: [] for c in DUP_COLUMNS}
    sources, tiers, lines = t["source"].to_pylist(), t["tier"].to_pylist(), t["line_no"].to_pylist()
    counts: Counter = Counter()
    for i, o in enumerate(ords):
        e = int(state.exact_best[i])
        k = near.get(e)
        if k is None and e == o:
            kept_rows.append(i)
            continue
        if k is None:  # an exact copy of a kept record
            kind, rep_rid, sim = "exact", rids[np.searchsorted(ords, e)], 1.0
        else:  # (an exact copy of) a record claimed as a near duplicate
            kind, rep_rid, sim = "near", removed["rep_rid"][k], round(float(np.float32(removed["jac"][k])), 4)
        counts[kind] += 1
        for c, v in zip(DUP_COLUMNS, (rids[i], sources[i], tiers[i], lines[i], rep_rid, kind, sim, rep_rid)):
            dup[c].append(v)
    kept = t.take(pa.array(kept_rows, pa.int64()))
    kept = kept.append_column("cluster_id", kept["record_id"])
    dups = pa.table({c: dup[c] for c in DUP_COLUMNS}) if dup["record_id"] else None
    if out is not None:
        kept = write_table(kept, f"{out}-kept.parquet") if kept.num_rows else None
        dups = write_table(dups, f"{out}-duplicates.parquet") if dups is not None else None
    return kept, dups, dict(counts)


# -------------------------------------------------------------------------------------- driver
@dataclass
class RayOutcome:
    pii_counts: dict[str, int]
    stats: dict
    candidates: int


def _remote(fn: Callable, **options):
    import ray

    return ray.remote(max_retries=TASK_RETRIES, retry_exceptions=False, **options)(fn)


@contextlib.contextmanager
def ray_session(address: str | None = None, num_cpus: int | None = None, log: LogFn | None = None) -> Iterator[None]:
    """Connect to the Ray cluster at ``address`` (``auto``, ``ray://host:10001``), or start a local one
    with ``num_cpus`` workers when no address is given; reuse a connection this process already has."""
    import ray

    if ray.is_initialized():
        yield
        return
    started = time.perf_counter()
    kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False, "configure_logging": False}
    if address:
        try:
            ray.init(address=address, **kwargs)
        except Exception as exc:  # noqa: BLE001 - ray raises ConnectionError, RuntimeError, AuthenticationError
            raise RuntimeError(
                f"cannot connect to the Ray cluster at {address!r}: {str(exc).splitlines()[0]}. A cluster with token "
                "authentication (Ray's default) needs RAY_AUTH_MODE=token and its token in RAY_AUTH_TOKEN "
                "(or a file named by RAY_AUTH_TOKEN_PATH) in this process's environment"
            ) from exc
    else:
        ray.init(num_cpus=num_cpus or os.cpu_count(), **kwargs)
    if log:
        res = ray.cluster_resources()
        log(f"ray: connected to {address or 'a local cluster'} ({int(res.get('CPU', 0))} CPUs) "
            f"in {time.perf_counter() - started:.1f}s")
    try:
        yield
    finally:
        ray.shutdown()


def _returns(refs, n: int) -> list:
    return list(refs) if n > 1 else [refs]


def clean_and_dedup_on_ray(batches: Iterable[pa.Table | tuple[str, int]], quality: QualityConfig, config: DedupConfig,
                           parts: int, sink: Callable[[str, Any], None], log: LogFn | None = None,
                           out_dir: str | None = None) -> RayOutcome:
    """Clean and deduplicate the records in ``batches`` (each with an ``ord`` column: the position in
    the priority order) on the connected Ray cluster. ``sink(kind, payload)`` receives the results
    partition by partition: ``("quarantine", rows)``, ``("kept", table)``, ``("duplicates", table)``;
    it is called only after every task has succeeded."""
    import ray

    say = log or (lambda _m: None)
    parts = max(int(parts), 2)
    started = time.perf_counter()
    stages: dict[str, float] = {}
    mark = [started]

    def stage(name: str) -> None:
        now = time.perf_counter()
        stages[name] = round(now - mark[0], 2)
        mark[0] = now

    # 1. clean, split by exact key (the driver holds one batch at a time)
    clean = _remote(clean_batch, num_returns=parts + 2)
    cleaned, n_batches = [], 0
    for batch in batches:
        n_batches += 1
        cleaned.append(_returns(clean.remote(ray.put(batch) if isinstance(batch, pa.Table) else batch, quality, parts),
                                parts + 2))
        del batch
    say(f"ray dedup: {n_batches} batches sent to {parts} partitions")
    batch_stats = ray.get([c[0] for c in cleaned])
    n_docs = sum(s["candidates"] + s["rejected"] for s in batch_stats)
    pii: Counter = Counter()
    for s in batch_stats:
        pii.update(s["pii"])
    candidates = sum(s["candidates"] for s in batch_stats)
    stage("clean (quality filters, PII) and split by exact key")
    say(f"ray dedup: cleaned {n_docs:,} records ({n_docs - candidates:,} rejected) in {time.perf_counter() - started:.1f}s")

    # 2. exact dedup per partition, request shingles' document frequency
    exact = _remote(exact_stage, num_returns=parts + 2)
    ex = [_returns(exact.remote(config, parts, *[c[2 + p] for c in cleaned]), parts + 2) for p in range(parts)]
    survivors = sum(ray.get([x[1] for x in ex]))
    stage("exact dedup and request shingles")
    say(f"ray dedup: {candidates - survivors:,} exact duplicates or empty texts, {survivors:,} documents to compare")

    # 3. template shingles, 4. signatures
    templates = []
    if config.boilerplate_doc_share < 1.0 and survivors:
        limit = template_limit(survivors, config.boilerplate_doc_share)
        templates = [_remote(template_stage).remote(limit, *[x[2 + q] for x in ex]) for q in range(parts)]
    n_template = sum(t.size for t in ray.get(templates)) if templates else 0
    sigs = [_returns(_remote(signature_stage, num_returns=2).remote(x[0], config, *templates), 2) for x in ex]
    states = [s[0] for s in sigs]
    n_shingles = sum(ray.get([s[1] for s in sigs]))
    stage("template shingles and MinHash signatures")
    say(f"ray dedup: signatures of {survivors:,} documents ({n_template:,} template shingles left out)")

    # 5. LSH rounds, 6. verification, 7. clusters
    bands, rows = config.lsh_bands()
    removed = [ray.put({}) for _ in range(parts)]
    checked = [ray.put(np.empty(0, _PAIR)) for _ in range(parts)]
    edge_refs: list = []
    counts = {"candidate_pairs": 0, "lsh_rounds": 0}
    shuffled = {"records": n_docs, "band_rows": 0, "candidate_pairs": 0}
    verified = 0
    for _ in range(_MAX_LSH_ROUNDS):
        counts["lsh_rounds"] += 1
        band_rows = [_returns(_remote(band_stage, num_returns=parts).remote(states[p], p, bands, rows, parts, removed[p]), parts)
                     for p in range(parts)]
        buckets = [_returns(_remote(bucket_stage, num_returns=parts + 1).remote(parts, *[b[q] for b in band_rows]), parts + 1)
                   for q in range(parts)]
        bucket_stats = ray.get([b[0] for b in buckets])  # (largest bucket, band rows) of each key partition
        complete = max(m for m, _ in bucket_stats) <= _MAX_RUN_ALL_PAIRS
        pairs = [_returns(_remote(pair_stage, num_returns=parts + 2).remote(checked[q], parts, *[b[1 + q] for b in buckets]), parts + 2)
                 for q in range(parts)]
        checked = [pr[0] for pr in pairs]
        fresh = sum(ray.get([pr[1] for pr in pairs]))
        counts["candidate_pairs"] += fresh
        attached = [_returns(_remote(attach_stage, num_returns=parts).remote(states[p], parts, *[pr[2 + p] for pr in pairs]), parts)
                    for p in range(parts)]
        checks = [_returns(_remote(verify_stage, num_returns=2).remote(states[p], config, *[a[p] for a in attached]), 2)
                  for p in range(parts)]
        new = sum(ray.get([c[1] for c in checks]))
        verified += new
        edge_refs.extend(c[0] for c in checks)
        shuffled["band_rows"] += sum(n for _, n in bucket_stats)
        shuffled["candidate_pairs"] += fresh
        stage(f"LSH round {counts['lsh_rounds']}: band shuffle, pairs, verification, clusters")
        say(f"ray dedup: LSH round {counts['lsh_rounds']}: {fresh:,} new candidate pairs, {new:,} verified near duplicates")
        if new == 0:
            break
        cl = _returns(_remote(cluster_stage, num_returns=parts + 1).remote(parts, *edge_refs), parts + 1)
        removed = cl[1:]
        if complete:
            break

    # 8. compose, then hand the results over partition by partition
    composed = [_returns(_remote(compose_stage, num_returns=3).remote(
        states[p], removed[p], None if out_dir is None else os.path.join(out_dir, f"part-{p:05d}")), 3)
        for p in range(parts)]
    kinds: Counter = Counter()
    for c in ray.get([c[2] for c in composed]):
        kinds.update(c)
    for c in cleaned:
        sink("quarantine", ray.get(c[1]))
    kept = 0
    for c in composed:  # tables, or the files the tasks wrote
        table = ray.get(c[0])
        if table is not None:
            sink("kept", table)
        dups = ray.get(c[1])
        if dups is not None:
            sink("duplicates", dups)
        del table, dups
    kept = candidates - sum(kinds.values())
    stats = {
        "docs": candidates, "kept": kept, "exact_duplicates": kinds.get("exact", 0),
        "near_duplicates": kinds.get("near", 0), "lsh_bands": bands, "lsh_rows": rows, **counts,
        "verified_pairs": verified, "shingles": n_shingles, "boilerplate_shingles": n_template,
        "backend": "ray", "partitions": parts, "stage_seconds": stages, "shuffled_rows": shuffled,
    }
    stages["compose and hand over"] = round(time.perf_counter() - mark[0], 2)
    say(f"ray dedup: {kept:,} kept, {kinds.get('exact', 0):,} exact and {kinds.get('near', 0):,} near duplicates "
        f"in {time.perf_counter() - started:.1f}s")
    return RayOutcome(pii_counts=dict(pii), stats=stats, candidates=candidates)
