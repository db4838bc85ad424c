"""Near-duplicate removal: distinct items survive, planted copies go, the trusted copy stays."""

import random
import zlib

import numpy as np
import pytest

from sleep_pipeline.config import DedupConfig
from sleep_pipeline.data.dedup import dedup, normalize_text, normalize_texts, shingle
from sleep_pipeline.data.perturb import perturb

WORDS = ("river mountain lantern quiet harbour silver orchard meadow falcon winter copper garden "
         "violet thunder marble cedar ember comet saffron tundra willow juniper pepper cobalt delta "
         "orchid sable quartz harbor amber").split()


def _doc(rng: random.Random, n: int = 60) -> str:
    return " ".join(rng.choice(WORDS) + rng.choice(["", "", "", ",", "."]) for _ in range(n)).capitalize()


def _jaccard(a: str, b: str, k: int = 3) -> float:
    sets = shingle(normalize_texts([a, b]), k)
    return sets.jaccard(0, 1)


def test_distinct_items_are_all_kept():
    rng = random.Random(0)
    texts = [_doc(rng) for _ in range(300)]
    result = dedup(texts, None, DedupConfig())
    assert result.kept.all()
    assert result.n_duplicates == 0


@pytest.mark.parametrize("kind", ["exact", "recase", "noise", "reword", "truncate"])
def test_planted_near_duplicates_are_removed_and_the_tier1_copy_kept(kind):
    rng = random.Random(zlib.crc32(kind.encode()))
    originals = [_doc(rng, 80) for _ in range(200)]
    copies = [perturb(t, kind, rng) for t in originals[:100]]
    # Copies come FIRST in the input with tier 3, so keeping the earliest would keep the copy.
    texts = copies + originals
    tiers = [3] * len(copies) + [1] * len(originals)
    result = dedup(texts, tiers, DedupConfig(threshold=0.7))
    for i in range(len(copies)):
        j = len(copies) + i
        if _jaccard(texts[i], texts[j]) >= 0.7 or normalize_text(texts[i]) == normalize_text(texts[j]):
            assert not result.kept[i], f"planted {kind} copy {i} kept"
            assert result.duplicate_of[i] == j, "the duplicate must point at the tier-1 original"
            assert result.kept[j]
    # at least 95% of planted copies count as near duplicates by exact Jaccard, and all are removed
    assert (~result.kept[: len(copies)]).mean() >= 0.95
    assert result.kept[len(copies):].all(), "no original may be lost"


def test_exact_duplicates_ignore_case_whitespace_and_punctuation():
    texts = ["Hello, World! How are you?", "hello world how are you", "  HELLO   world... how ARE you  ", "Goodbye world"]
    result = dedup(texts, [2, 1, 3, 1], DedupConfig())
    assert result.kept.tolist() == [False, True, False, True]
    assert result.kind[0] == result.kind[2] == "exact"
    assert result.duplicate_of[0] == result.duplicate_of[2] == 1


def test_symbol_only_texts_are_not_merged():
    result = dedup(["{}", "[]", "{}", "..."], None, DedupConfig())
    assert result.kept.tolist() == [True, True, False, True]


def test_templated_items_with_different_content_are_not_duplicates():
    # Procedural tasks share long instructions; only the instance differs. They are distinct items.
    rng = random.Random(3)
    instructions = ("Your task is to sort words in ascending or descending order using ASCII ordering. "
                    "Your output should be a comma-separated list of words, for example word one, word two. ")
    texts = []
    for _ in range(400):
        words = rng.sample(WORDS, 4)
        texts.append(instructions + "Now sort these words: " + ", ".join(words) + "\n" + ", ".join(sorted(words)))
    result = dedup(texts, None, DedupConfig())
    distinct = len({normalize_text(t) for t in texts})
    assert result.kept.sum() == distinct


def test_lsh_bands_favour_recall():
    bands, rows = DedupConfig(threshold=0.7, num_perm=128).lsh_bands()
    assert bands * rows == 128
    assert 1 - (1 - 0.7**rows) ** bands >= 0.99


def test_signatures_are_datasketch_minhashes():
    from datasketch import MinHash

    from sleep_pipeline.data.dedup import minhash_signatures, shingle_hash32, to_datasketch

    texts = ["the cat sat on the mat while the dog slept", "a b", "lorem ipsum dolor sit amet consectetur"]
    sets = shingle(normalize_texts(texts), 3)
    sig = minhash_signatures(sets, 64, seed=11)
    for i in range(len(texts)):
        ref = MinHash(num_perm=64, seed=11, scheme="affine32", hashfunc=lambda v: int(v))
        ref.update_batch(shingle_hash32(sets.values[sets.offsets[i]:sets.offsets[i + 1]]).tolist())
        assert np.array_equal(ref.hashvalues, sig[i])
    assert to_datasketch(sig[0], seed=11).jaccard(to_datasketch(sig[0], seed=11)) == 1.0
