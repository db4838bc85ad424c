"""A real-text near-duplicate corpus built from documents already on this machine, with exact truth.

The documents are licence and copyright texts that the installed software ships (none is written by
this project): the licence files in the ``*.dist-info`` folders of the running interpreter's
site-packages, ``/usr/share/common-licenses/*`` and ``/usr/share/doc/*/copyright`` (Debian). They hold
many genuine near duplicates: the same licence with other copyright lines, other years, a clause
added or removed. The site-packages licences are required (every install of this project has them);
the two system folders are used when present and reported as skipped otherwise.

The corpus is deterministic for a given machine: files are read in sorted path order (symlinks and
hard links resolved, so a file is read once), decoded as UTF-8 with replacement, and kept when they
hold at least ``min_words`` words and at most ``max_bytes`` bytes. Texts that are identical after
normalisation are kept once: they are exact duplicates, and the corpus measures *near* dedup.

Truth is exact, with no hashing: a pair is a near duplicate when the Jaccard similarity of the two
documents' sets of word 5-grams is at least 0.8. Words are the engine's normalisation (NFKC,
case-folded, every run of characters that are not letters or digits becomes one space) split on
spaces; a document's 5-grams are the distinct runs of 5 consecutive words, compared as strings (a
document shorter than 5 words would be one gram of all its words; ``min_words`` keeps such out).
"""

from __future__ import annotations

import hashlib
import re
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

TRUTH_SHINGLE = 5
TRUTH_THRESHOLD = 0.8
_LICENCE_NAME = re.compile(r"(?i)^(licen[cs]e|copying|notice|copyright|authors)")


@dataclass
class RealCorpus:
    texts: list[str]
    paths: list[str]
    origin: dict[str, int]  # where the documents came from: folder kind -> documents kept
    skipped: dict[str, str] = field(default_factory=dict)  # folder kind -> why it gave nothing
    identical_dropped: int = 0  # documents identical (after normalisation) to an earlier one

    @property
    def sha256(self) -> str:
        h = hashlib.sha256()
        for t in self.texts:
            h.update(hashlib.sha256(t.encode("utf-8")).digest())
        return h.hexdigest()


def site_packages_licences() -> list[Path]:
    """Licence / copying / notice / authors files inside ``*.dist-info`` of this interpreter's site-packages."""
    site = Path(sysconfig.get_paths()["purelib"])
    out = []
    for info in sorted(site.glob("*.dist-info")):
        for p in sorted(info.rglob("*")):
            if p.is_file() and _LICENCE_NAME.match(p.name):
                out.append(p)
    return out


def system_licences() -> list[Path]:
    base = Path("/usr/share/common-licenses")
    return sorted(p for p in base.iterdir() if p.is_file()) if base.is_dir() else []


def debian_copyright_files() -> list[Path]:
    base = Path("/usr/share/doc")
    return sorted(base.glob("*/copyright")) if base.is_dir() else []


SOURCES = {
    "site_packages_licences": site_packages_licences,
    "common_licenses": system_licences,
    "debian_copyright": debian_copyright_files,
}


def normalized_words(texts: list[str]) -> list[list[str]]:
    from sleep_pipeline.data.dedup import normalize_texts

    return [t.split() for t in normalize_texts(texts).to_pylist()]


def gram_sets(texts: list[str], k: int = TRUTH_SHINGLE) -> list[set[str]]:
    """Each text's set of word k-grams (as strings; a text shorter than k words: one gram of all its words)."""
    out = []
    for words in normalized_words(texts):
        if len(words) < k:
            out.append({" ".join(words)})
        else:
            out.append({" ".join(words[i : i + k]) for i in range(len(words) - k + 1)})
    return out


def jaccard(a: set[str], b: set[str]) -> float:
    inter = len(a & b)
    return inter / (len(a) + len(b) - inter) if a or b else 1.0


def build(sources: tuple[str, ...] = tuple(SOURCES), max_docs: int | None = None, min_words: int = 20,
          max_bytes: int = 256_000, min_site_packages: int = 20) -> RealCorpus:
    """Read the corpus (see the module doc). ``max_docs`` keeps every k-th file of each folder kind in
    path order (k chosen so about ``max_docs`` files are read in all), which keeps families of
    near duplicates represented in a small corpus. Raises when the site-packages licences (always
    present where this project is installed) yield fewer than ``min_site_packages`` documents."""
    found = {name: SOURCES[name]() for name in sources}
    total = sum(len(v) for v in found.values())
    step = max(1, total // max_docs) if max_docs else 1
    seen_files: set[tuple[int, int]] = set()
    seen_norm: set[str] = set()
    corpus = RealCorpus(texts=[], paths=[], origin={})
    for name, paths in found.items():
        if not paths:
            corpus.skipped[name] = "folder absent or empty on this machine"
            continue
        kept = 0
        texts, kept_paths = [], []
        for p in paths[::step]:
            try:
                st = p.stat()
            except OSError:
                continue
            if (st.st_dev, st.st_ino) in seen_files or st.st_size > max_bytes:
                continue
            seen_files.add((st.st_dev, st.st_ino))
            texts.append(p.read_bytes().decode("utf-8", errors="replace"))
            kept_paths.append(str(p))
        for text, path, words in zip(texts, kept_paths, normalized_words(texts)):
            if len(words) < min_words:
                continue
            key = " ".join(words)
            if key in seen_norm:
                corpus.identical_dropped += 1
                continue
            seen_norm.add(key)
            corpus.texts.append(text)
            corpus.paths.append(path)
            kept += 1
        corpus.origin[name] = kept
    if "site_packages_licences" in sources and corpus.origin.get("site_packages_licences", 0) < min_site_packages:
        raise RuntimeError(
            f"only {corpus.origin.get('site_packages_licences', 0)} licence files found in the *.dist-info "
            f"folders of {sysconfig.get_paths()['purelib']}; the real-text corpus needs at least {min_site_packages}"
        )
    return corpus


def true_pairs(texts: list[str], k: int = TRUTH_SHINGLE, threshold: float = TRUTH_THRESHOLD) -> set[tuple[int, int]]:
    """Pairs (i < j) whose exact Jaccard similarity of word k-gram sets is >= ``threshold`` (all pairs
    at once: a sparse product of the document x k-gram incidence matrix; k-grams compared as strings)."""
    from scipy.sparse import csr_matrix

    vocab: dict[str, int] = {}
    rows, cols = [], []
    for r, grams in enumerate(gram_sets(texts, k)):
        for g in grams:
            rows.append(r)
            cols.append(vocab.setdefault(g, len(vocab)))
    mat = csr_matrix((np.ones(len(rows), dtype=np.float64), (rows, cols)), shape=(len(texts), len(vocab)))
    inter = (mat @ mat.T).tocoo()
    size = np.asarray(mat.sum(axis=1)).ravel()
    upper = inter.row < inter.col
    a, b, v = inter.row[upper], inter.col[upper], inter.data[upper]
    near = v / (size[a] + size[b] - v) >= threshold
    return {(int(i), int(j)) for i, j in zip(a[near], b[near])}


def scores(texts: list[str], kept: np.ndarray, duplicate_of: np.ndarray, cluster: np.ndarray,
           truth: set[tuple[int, int]], docs: list[int] | None = None, k: int = TRUTH_SHINGLE,
           threshold: float = TRUTH_THRESHOLD) -> dict:
    """How a dedup result does against exact truth, over ``docs`` (default: all; ``truth`` must be the
    true pairs among them).

    - ``recall``: share of true pairs that do not both survive (at least one of the two was removed);
    - ``precision``: share of removed documents whose kept copy (``duplicate_of``, what the dedup
      claims) truly is a near duplicate: exact Jaccard >= threshold, or the same normalised text;
    - ``cluster_recall`` / ``cluster_precision``: the same pairs counted by cluster co-membership
      (every two documents that end in one cluster count as a claimed pair; stricter).
    """
    docs = list(range(len(texts))) if docs is None else docs
    in_docs = set(docs)
    found = sum(1 for a, b in truth if not (kept[a] and kept[b]))
    removed = [d for d in docs if not kept[d]]
    need = sorted({d for d in removed} | {int(duplicate_of[d]) for d in removed})
    grams = dict(zip(need, gram_sets([texts[i] for i in need], k)))
    norm = dict(zip(need, (" ".join(w) for w in normalized_words([texts[i] for i in need]))))
    correct = sum(1 for d in removed if norm[d] == norm[int(duplicate_of[d])]
                  or jaccard(grams[d], grams[int(duplicate_of[d])]) >= threshold)
    members: dict[int, list[int]] = {}
    for d in docs:
        members.setdefault(int(cluster[d]), []).append(d)
    together = {(a, b) for m in members.values() for a in m for b in m if a < b and b in in_docs}
    return {
        "recall": round(found / len(truth), 4) if truth else None,
        "precision": round(correct / len(removed), 4) if removed else None,
        "cluster_recall": round(len(together & truth) / len(truth), 4) if truth else None,
        "cluster_precision": round(len(together & truth) / len(together), 4) if together else None,
        "true_pairs": len(truth),
        "removed": len(removed),
    }
