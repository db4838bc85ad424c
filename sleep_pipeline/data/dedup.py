"""Exact and near-duplicate removal with MinHash LSH, vectorised over the whole corpus.

Texts are normalised (NFKC, case-folded, punctuation removed, whitespace collapsed); exact duplicates
share a normalised text. Near duplicates are found with MinHash signatures of word shingles (5 words
by default) and an LSH band index; every candidate pair is then checked with the *exact* Jaccard
similarity of the shingle sets, so the LSH only decides which pairs are worth checking. Documents are
then taken most trusted first (lowest tier, then earliest): each one that no earlier kept document
claimed is kept and claims its unclaimed verified near duplicates, which record it as
``duplicate_of``. Every removed document is thus a verified near duplicate of its kept copy.

Template text is looked for only where a caller says it may be: the request part of a record (its
prompt). Shingles that many records repeat there (the instructions of a procedural task) are left out
of the comparison, so items that differ only in their instance stay distinct. Everything else, and
every plain document, is compared in full: in real documents the text many of them share (a licence)
is what makes them near duplicates.

The signatures are ``datasketch`` MinHashes (its "affine32" permutation scheme, with the
permutations taken from ``datasketch.MinHash`` itself), but computed on columns: pyarrow string
kernels tokenise, numpy hashes shingles and applies all permutations to all documents at once. The
LSH banding is done the same way, on the whole signature matrix; ``datasketch.MinHashLSH`` inserts
and queries one document at a time, which on this machine cost 13 s + 7.6 s for 100,000 documents,
more than the whole vectorised pipeline.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from sleep_pipeline.config import DedupConfig
from sleep_pipeline.progress import LogFn, Progress

_MASK32 = np.uint64(0xFFFFFFFF)
_SHINGLES_PER_CHUNK = 1 << 16
DATASKETCH_SCHEME = "affine32"
_MAX_RUN_ALL_PAIRS = 64  # larger LSH buckets are linked as a star + chain instead of all pairs
_MAX_LSH_ROUNDS = 8  # LSH passes over the still-kept documents when a bucket was too large


# ------------------------------------------------------------------------------- normalisation
def normalize_texts(texts: Sequence[str]) -> pa.Array:
    """NFKC, case-fold, every run of non-alphanumerics becomes one space, trimmed."""
    arr = pa.array(list(texts), type=pa.large_string())
    arr = pc.utf8_normalize(arr, form="NFKC")
    arr = pc.utf8_lower(arr)
    arr = pc.replace_substring_regex(arr, pattern=r"[^\p{L}\p{N}]+", replacement=" ")
    return pc.utf8_trim_whitespace(arr)


def normalize_text(text: str) -> str:
    return normalize_texts([text])[0].as_py()


def _hash_strings(values: np.ndarray) -> np.ndarray:
    """Stable 64-bit hashes of strings (pandas' SipHash with its fixed key)."""
    return pd.util.hash_array(values, categorize=False).astype(np.uint64)


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser: spreads the bits of a combined shingle hash."""
    with np.errstate(over="ignore"):
        x = x ^ (x >> np.uint64(30))
        x = x * np.uint64(0xBF58476D1CE4E5B9)
        x = x ^ (x >> np.uint64(27))
        x = x * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


@dataclass
class ShingleSets:
    """Shingle hashes of every document: ``values[offsets[i]:offsets[i+1]]`` belong to document i
    (each document has at least one; a document shorter than the shingle size is one shingle)."""

    values: np.ndarray  # uint64
    offsets: np.ndarray  # int64, len = n_docs + 1
    _unique: dict[int, np.ndarray] = field(default_factory=dict, repr=False)

    def unique(self, i: int) -> np.ndarray:
        u = self._unique.get(i)
        if u is None:
            u = np.unique(self.values[self.offsets[i] : self.offsets[i + 1]])
            self._unique[i] = u
        return u

    def jaccard(self, i: int, j: int) -> float:
        return jaccard_unique(self.unique(i), self.unique(j))


def jaccard_unique(a: np.ndarray, b: np.ndarray) -> float:
    """Exact Jaccard similarity of two sets given as arrays of distinct values."""
    inter = np.intersect1d(a, b, assume_unique=True).size
    return inter / (a.size + b.size - inter)


def shingle(normalized: pa.Array, k: int) -> ShingleSets:
    """Word k-shingles of normalised texts, as 64-bit hashes."""
    words = pc.utf8_split_whitespace(normalized)
    lengths = pc.list_value_length(words).to_numpy(zero_copy_only=False).astype(np.int64)
    lengths = np.nan_to_num(lengths, nan=0).astype(np.int64)
    flat = pc.list_flatten(words)
    encoded = pc.dictionary_encode(flat).combine_chunks() if isinstance(flat, pa.ChunkedArray) else pc.dictionary_encode(flat)
    vocab_hash = _hash_strings(encoded.dictionary.to_numpy(zero_copy_only=False))
    tok = vocab_hash[encoded.indices.to_numpy(zero_copy_only=False)]
    n = lengths.size
    starts = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(lengths, out=starts[1:])

    # Documents with >= k words: all windows that stay inside the document.
    n_windows = np.maximum(lengths - k + 1, 0)
    total = int(n_windows.sum())
    doc_of_window = np.repeat(np.arange(n), n_windows)
    win_starts = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(n_windows, out=win_starts[1:])
    pos = np.arange(total, dtype=np.int64) - win_starts[doc_of_window] + starts[doc_of_window]
    h = np.zeros(total, dtype=np.uint64)
    with np.errstate(over="ignore"):
        for j in range(k):
            h = (h * np.uint64(0x100000001B3)) ^ tok[pos + j]
    h = _mix64(h)

    # Short documents (fewer than k words, including empty ones): one shingle of all their words.
    short = np.flatnonzero(lengths < k)
    short_h = np.empty(short.size, dtype=np.uint64)
    with np.errstate(over="ignore"):
        for idx, d in enumerate(short):
            acc = np.uint64(0x9E3779B97F4A7C15) + np.uint64(lengths[d])
            for t in tok[starts[d] : starts[d + 1]]:
                acc = (acc * np.uint64(0x100000001B3)) ^ t
            short_h[idx] = acc
    short_h = _mix64(short_h)

    per_doc = np.where(lengths >= k, n_windows, 1)
    offsets = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(per_doc, out=offsets[1:])
    values = np.empty(int(offsets[-1]), dtype=np.uint64)
    long_docs = lengths >= k
    if total:
        dest = np.repeat(offsets[:-1][long_docs], n_windows[long_docs]) + (
            np.arange(total) - np.repeat(win_starts[:-1][long_docs], n_windows[long_docs])
        )
        values[dest] = h
    values[offsets[short]] = short_h
    return ShingleSets(values=values, offsets=offsets)


def request_doc_freq(where: ShingleSets) -> tuple[np.ndarray, np.ndarray]:
    """(distinct shingles, in how many documents each occurs): each (document, shingle) counted once,
    with a hash table rather than a sort."""
    n = where.offsets.size - 1
    doc_of_where = np.repeat(np.arange(n), np.diff(where.offsets))
    codes, uniques = pd.factorize(where.values)
    pairs = pd.unique(doc_of_where.astype(np.int64) * max(len(uniques), 1) + codes)
    return np.asarray(uniques, dtype=np.uint64), np.bincount(pairs % max(len(uniques), 1), minlength=len(uniques))


def template_limit(n_docs: int, max_doc_share: float, min_docs: int = 50) -> float:
    """A shingle held by more than this many documents' requests is template text."""
    return max(max_doc_share * n_docs, min_docs)


def remove_shingles(sets: ShingleSets, template: np.ndarray) -> ShingleSets:
    """The shingle sets without the ``template`` shingles; a document made only of them keeps all its
    shingles (nothing distinctive left to compare)."""
    n = sets.offsets.size - 1
    if template.size == 0 or n == 0:
        return sets
    keep = ~np.isin(sets.values, template)
    lengths = np.diff(sets.offsets)
    doc_of = np.repeat(np.arange(n), lengths)
    kept_per_doc = np.bincount(doc_of[keep], minlength=n)
    keep |= (kept_per_doc == 0)[doc_of]  # nothing distinctive left: fall back to the full set
    per_doc = np.bincount(doc_of[keep], minlength=n)
    offsets = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(per_doc, out=offsets[1:])
    return ShingleSets(values=sets.values[keep], offsets=offsets)


def drop_boilerplate(
    sets: ShingleSets, max_doc_share: float, min_docs: int = 50, where: ShingleSets | None = None
) -> tuple[ShingleSets, int]:
    """The shingle sets without template text. A shingle is template text when more than
    ``max_doc_share`` of the documents (and at least ``min_docs`` of them) hold it in ``where``: the
    part of each document that may be a template, e.g. the request of a procedural task, which every
    item of the task repeats around its own instance (default: the whole document). Comparing on such
    text would make distinct items look alike. A document made only of template text keeps all its
    shingles. Returns the new sets and the number of distinct template shingles."""
    n = sets.offsets.size - 1
    where = sets if where is None else where
    if max_doc_share >= 1.0 or n == 0:
        return sets, 0
    uniques, doc_freq = request_doc_freq(where)
    template = uniques[doc_freq > template_limit(n, max_doc_share, min_docs)]
    if template.size == 0:
        return sets, 0
    return remove_shingles(sets, template), int(template.size)


# --------------------------------------------------------------------------------------- minhash
def permutations(num_perm: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The affine permutations h -> a*h + b (mod 2^32) of a ``datasketch.MinHash`` with this seed."""
    from datasketch import MinHash

    a, b = MinHash(num_perm=num_perm, seed=seed, scheme=DATASKETCH_SCHEME).permutations
    return a.astype(np.uint32), b.astype(np.uint32)


def shingle_hash32(values: np.ndarray) -> np.ndarray:
    """The 32-bit input hash of each shingle: the two halves of its 64-bit hash folded together."""
    return ((values >> np.uint64(32)) ^ (values & _MASK32)).astype(np.uint32)


def _fmix32(h: np.ndarray) -> np.ndarray:
    """MurmurHash3's 32-bit finaliser, which datasketch applies to every input hash."""
    h = h ^ (h >> np.uint32(16))
    h = h * np.uint32(0x85EBCA6B)
    h = h ^ (h >> np.uint32(13))
    h = h * np.uint32(0xC2B2AE35)
    return h ^ (h >> np.uint32(16))


def minhash_signatures(
    sets: ShingleSets, num_perm: int, seed: int, progress: Progress | None = None
) -> np.ndarray:
    """(n_docs, num_perm) uint32 MinHash signatures, computed in chunks of whole documents.

    Bit-identical to ``datasketch.MinHash(num_perm, seed, scheme="affine32", hashfunc=identity)``
    updated with each document's :func:`shingle_hash32` values (a test holds this), but computed for
    all documents at once instead of one ``update`` per shingle."""
    a, b = permutations(num_perm, seed)
    with np.errstate(over="ignore"):
        x = _fmix32(shingle_hash32(sets.values))
    n = sets.offsets.size - 1
    sig = np.empty((n, num_perm), dtype=np.uint32)
    doc = 0
    while doc < n:
        # Take whole documents until the chunk holds about _SHINGLES_PER_CHUNK shingles.
        end = int(np.searchsorted(sets.offsets, sets.offsets[doc] + _SHINGLES_PER_CHUNK, side="right")) - 1
        end = min(max(end, doc + 1), n)
        lo, hi = sets.offsets[doc], sets.offsets[end]
        # (num_perm, shingles) layout: each document is a contiguous run along the last axis.
        with np.errstate(over="ignore"):
            hv = np.multiply.outer(a, x[lo:hi])
            hv += b[:, None]
        sig[doc:end] = np.minimum.reduceat(hv, sets.offsets[doc:end] - lo, axis=1).T
        doc = end
        if progress is not None:
            progress.update(doc)
    return sig


def to_datasketch(signature: np.ndarray, seed: int):
    """A row of :func:`minhash_signatures` as a ``datasketch.LeanMinHash`` (for its LSH indexes,
    serialisation, or comparing with sketches made elsewhere)."""
    from datasketch import LeanMinHash

    return LeanMinHash(seed=seed, hashvalues=signature, scheme=DATASKETCH_SCHEME)


# ------------------------------------------------------------------------------------------- LSH
def _pairs_in_runs(order: np.ndarray, run_starts: np.ndarray, run_sizes: np.ndarray) -> np.ndarray:
    """Candidate pairs (i < j) among the members of each LSH bucket with >= 2 members."""
    out = []
    for m in np.unique(run_sizes):
        sel = run_starts[run_sizes == m]
        if m <= _MAX_RUN_ALL_PAIRS:
            ii, jj = np.triu_indices(int(m), 1)
            out.append(np.stack([order[sel[:, None] + ii], order[sel[:, None] + jj]], axis=-1).reshape(-1, 2))
        else:  # a huge bucket: a star on its first member plus a chain keeps it connected cheaply
            for s in sel:
                members = np.sort(order[s : s + m])
                out.append(np.stack([np.full(m - 1, members[0]), members[1:]], axis=1))
                out.append(np.stack([members[:-1], members[1:]], axis=1))
    if not out:
        return np.empty((0, 2), dtype=np.int64)
    pairs = np.concatenate(out).astype(np.int64)
    return np.sort(pairs, axis=1)


def band_key(sig: np.ndarray, band: int, rows: int) -> np.ndarray:
    """The LSH bucket key of every signature in ``band`` (the band index is part of the key)."""
    cols = sig[:, band * rows : (band + 1) * rows].astype(np.uint64)
    key = np.full(sig.shape[0], (band * 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF, dtype=np.uint64)
    with np.errstate(over="ignore"):
        for c in range(rows):
            key = (key ^ cols[:, c]) * np.uint64(0x100000001B3)
    return key


def signature_agreement(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Share of equal MinHash values per row pair: the cheap estimate of the Jaccard similarity."""
    return (a == b).mean(axis=1) if len(a) else np.empty(0)


def plausible_floor(threshold: float) -> float:
    """Pairs whose signatures agree less than this are not worth an exact comparison."""
    return max(threshold - 0.2, 0.0)


def lsh_candidate_pairs(sig: np.ndarray, bands: int, rows: int) -> tuple[np.ndarray, bool]:
    """Unique pairs of documents that share at least one LSH band, and whether that is all of them
    (False when a bucket was too large to pair up fully; see ``_MAX_RUN_ALL_PAIRS``)."""
    n = sig.shape[0]
    all_pairs = []
    complete = True
    for band in range(bands):
        key = band_key(sig, band, rows)
        order = np.argsort(key, kind="stable")
        ks = key[order]
        boundary = np.flatnonzero(np.diff(ks)) + 1
        run_starts = np.concatenate([[0], boundary])
        run_sizes = np.diff(np.concatenate([run_starts, [n]]))
        multi = run_sizes >= 2
        if multi.any():
            all_pairs.append(_pairs_in_runs(order, run_starts[multi], run_sizes[multi]))
            complete &= bool(run_sizes.max() <= _MAX_RUN_ALL_PAIRS)
    if not all_pairs:
        return np.empty((0, 2), dtype=np.int64), complete
    pairs = np.concatenate(all_pairs)
    code = np.unique(pairs[:, 0] * n + pairs[:, 1])
    return np.stack([code // n, code % n], axis=1), complete


# ------------------------------------------------------------------------------------- results
@dataclass
class DedupResult:
    """Per input document: whether it is kept, and if not, which kept document it duplicates."""

    kept: np.ndarray  # bool
    duplicate_of: np.ndarray  # int64 index of the kept copy, -1 when kept
    kind: list[str | None]  # "exact" / "near" / None
    similarity: np.ndarray  # float32 Jaccard with the kept copy (1.0 for exact), nan when kept
    cluster: np.ndarray  # int64 index of the cluster's kept document (itself when kept)
    edges: np.ndarray = field(default_factory=lambda: np.empty((0, 2), dtype=np.int64))  # verified near pairs
    edge_jaccard: np.ndarray = field(default_factory=lambda: np.empty(0, dtype=np.float32))
    stats: dict = field(default_factory=dict)

    @property
    def n_duplicates(self) -> int:
        return int((~self.kept).sum())


def _best_in_group(labels: np.ndarray, tiers: np.ndarray) -> np.ndarray:
    """For each element, the index of its group's best member (lowest tier, then lowest index)."""
    n = labels.size
    order = np.lexsort((np.arange(n), tiers, labels))
    sorted_labels = labels[order]
    first = np.concatenate([[True], sorted_labels[1:] != sorted_labels[:-1]])
    head_of_run = order[np.maximum.accumulate(np.where(first, np.arange(n), 0))]
    best = np.empty(n, dtype=np.int64)
    best[order] = head_of_run
    return best


def star_clusters(n: int, edges: np.ndarray, tiers: np.ndarray) -> np.ndarray:
    """The kept document of each document, from verified near-duplicate ``edges``: documents are taken
    best first (lowest tier, then lowest index); one that no earlier kept document claimed is kept and
    claims its unclaimed neighbours. So every removed document is a verified near duplicate of the
    copy it points at (connected components would chain A~B~C and remove C as a copy of A however
    unlike they are), and no two kept documents form a verified pair."""
    rep = np.arange(n, dtype=np.int64)
    if len(edges) == 0:
        return rep
    both = np.concatenate([edges, edges[:, ::-1]])
    both = both[np.lexsort((both[:, 1], both[:, 0]))]
    indptr = np.searchsorted(both[:, 0], np.arange(n + 1))
    neighbours = both[:, 1]
    claimed = np.zeros(n, dtype=bool)
    linked = np.unique(both[:, 0])
    for d in linked[np.lexsort((linked, tiers[linked]))]:
        if claimed[d]:
            continue
        claimed[d] = True
        nb = neighbours[indptr[d] : indptr[d + 1]]
        nb = nb[~claimed[nb]]
        claimed[nb] = True
        rep[nb] = d
    return rep


def _request_sets(requests: Sequence[str], docs: np.ndarray, k: int) -> ShingleSets:
    """Shingle sets of the request parts of ``docs``; an empty request has no shingles."""
    norm = normalize_texts([requests[i] for i in docs])
    sets = shingle(norm, k)
    has_words = (norm.to_numpy(zero_copy_only=False) != "").astype(np.int64)
    per_doc = np.diff(sets.offsets) * has_words
    offsets = np.zeros(docs.size + 1, dtype=np.int64)
    np.cumsum(per_doc, out=offsets[1:])
    keep = np.repeat(has_words.astype(bool), np.diff(sets.offsets))
    return ShingleSets(values=sets.values[keep], offsets=offsets)


def _near_duplicates(sets: ShingleSets, sig: np.ndarray, tiers: np.ndarray, config: DedupConfig,
                     log: LogFn | None) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict]:
    """(kept document of each, verified edges, their Jaccard, counts). LSH candidates are checked
    with the exact Jaccard of the sets, then :func:`star_clusters` picks the kept documents. Where an
    LSH bucket was too large to pair up fully, two kept documents may never have been compared: the
    LSH runs again on the kept documents alone (smaller buckets), until no new pair is verified."""
    m = sets.offsets.size - 1
    bands, rows = config.lsh_bands()
    members = np.arange(m)
    checked = np.empty(0, dtype=np.int64)  # pair codes i * m + j already compared
    edges, jacs = [np.empty((0, 2), dtype=np.int64)], [np.empty(0)]
    counts = {"candidate_pairs": 0, "lsh_rounds": 0}
    rep = np.arange(m, dtype=np.int64)
    for _ in range(_MAX_LSH_ROUNDS):
        counts["lsh_rounds"] += 1
        local, complete = lsh_candidate_pairs(sig[members], bands, rows)
        cand = members[local]
        codes = cand[:, 0] * m + cand[:, 1]
        fresh = ~np.isin(codes, checked)
        cand, checked = cand[fresh], np.union1d(checked, codes)
        counts["candidate_pairs"] += len(cand)
        # Cheap signature estimate first; only plausible pairs get the exact set comparison.
        est = signature_agreement(sig[cand[:, 0]], sig[cand[:, 1]])
        plausible = cand[est >= plausible_floor(config.threshold)]
        verify = Progress("dedup: verify candidate pairs", len(plausible), log)
        jac = np.empty(len(plausible), dtype=np.float64)
        for idx, (i, j) in enumerate(plausible):
            jac[idx] = sets.jaccard(int(i), int(j))
            if idx % 4096 == 0:
                verify.update(idx)
        verify.finish()
        near = jac >= config.threshold
        edges.append(plausible[near])
        jacs.append(jac[near])
        if not near.any():
            break
        rep = star_clusters(m, np.concatenate(edges), tiers)
        if complete:
            break
        members = np.flatnonzero(rep == np.arange(m))
    return rep, np.concatenate(edges), np.concatenate(jacs), counts


def exact_keys(texts: Sequence[str], normalized: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """(64-bit key of each text, whether nothing alphanumeric is left). Exact duplicates share a key:
    the same normalised text or, when nothing alphanumeric is left, the same stripped text."""
    keys_src = normalized.to_numpy(zero_copy_only=False)
    empty_norm = keys_src == ""
    if empty_norm.any():
        keys_src = keys_src.copy()
        keys_src[empty_norm] = ["\x00" + str(texts[i]).strip() for i in np.flatnonzero(empty_norm)]
    return _hash_strings(keys_src), empty_norm


def dedup(
    texts: Sequence[str],
    tiers: Sequence[int] | None,
    config: DedupConfig,
    log: LogFn | None = None,
    requests: Sequence[str] | None = None,
) -> DedupResult:
    """Find exact and near duplicates among ``texts`` (index order breaks ties between equal tiers).

    ``requests``: per text, the part of it that may be template text (for a request / answer record,
    its prompt; ``""`` for a plain document). Shingles that more than ``config.boilerplate_doc_share``
    of the documents hold in their request are template text and left out of the comparison, so
    procedural items that repeat long instructions around different instances stay distinct. Text
    outside the requests is always compared in full: in real documents, the text that many documents
    share is exactly what makes them near duplicates (the same licence with other copyright lines).
    ``None``: no text has a request part, every text is compared in full."""
    n = len(texts)
    tiers_arr = np.asarray(tiers if tiers is not None else np.ones(n), dtype=np.int64)
    if requests is not None and len(requests) != n:
        raise ValueError(f"dedup: {len(requests)} requests for {n} texts")
    if n == 0:
        empty = np.empty(0, dtype=np.int64)
        return DedupResult(np.empty(0, bool), empty, [], np.empty(0, np.float32), empty, stats={"docs": 0})

    normalized = normalize_texts(texts)
    exact_key, empty_norm = exact_keys(texts, normalized)
    _, exact_label = np.unique(exact_key, return_inverse=True)
    exact_best = _best_in_group(exact_label, tiers_arr)
    survivors = np.flatnonzero(exact_best == np.arange(n))
    # Texts with nothing alphanumeric ("{}", "...") have no words to compare: exact dedup only.
    survivors = survivors[~empty_norm[survivors]]
    if log:
        log(f"dedup: {n:,} documents, {n - survivors.size:,} exact duplicates")

    # Near duplicates among the exact-dedup survivors.
    sets = shingle(normalized.take(pa.array(survivors)), config.shingle_size)
    n_boilerplate = 0
    if requests is not None:
        where = _request_sets(requests, survivors, config.shingle_size)
        sets, n_boilerplate = drop_boilerplate(sets, config.boilerplate_doc_share, where=where)
    progress = Progress("dedup: minhash", survivors.size, log)
    sig = minhash_signatures(sets, config.num_perm, config.seed, progress)
    progress.finish()
    bands, rows = config.lsh_bands()
    m = survivors.size
    near_best_local, local_edges, edge_jac, counts = _near_duplicates(sets, sig, tiers_arr[survivors], config, log)

    # Compose: every document -> its exact representative -> that one's near representative.
    rep_of_survivor = np.arange(n, dtype=np.int64)
    rep_of_survivor[survivors] = survivors[near_best_local]
    cluster = rep_of_survivor[exact_best]
    kept = cluster == np.arange(n)
    duplicate_of = np.where(kept, -1, cluster)
    kind: list[str | None] = [None] * n
    similarity = np.full(n, np.nan, dtype=np.float32)
    local_index = np.full(n, -1, dtype=np.int64)
    local_index[survivors] = np.arange(m)
    for d in np.flatnonzero(~kept):
        if exact_key[d] == exact_key[cluster[d]]:
            kind[d] = "exact"
            similarity[d] = 1.0
        else:
            kind[d] = "near"
            similarity[d] = sets.jaccard(int(local_index[exact_best[d]]), int(local_index[cluster[d]]))
    edges = survivors[local_edges] if len(local_edges) else np.empty((0, 2), dtype=np.int64)
    stats = {
        "docs": n,
        "kept": int(kept.sum()),
        "exact_duplicates": int(sum(k == "exact" for k in kind)),
        "near_duplicates": int(sum(k == "near" for k in kind)),
        "lsh_bands": bands,
        "lsh_rows": rows,
        **counts,
        "verified_pairs": int(len(local_edges)),
        "shingles": int(sets.values.size),
        "boilerplate_shingles": n_boilerplate,
    }
    return DedupResult(
        kept=kept, duplicate_of=duplicate_of, kind=kind, similarity=similarity, cluster=cluster,
        edges=edges, edge_jaccard=edge_jac.astype(np.float32), stats=stats,
    )
