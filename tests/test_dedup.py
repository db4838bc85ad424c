"""Near-duplicate removal: distinct items survive, planted copies go, the trusted copy stays; real
documents that share most of their text are found, templated items with different content are not."""

import random
import zlib

import numpy as np
import pytest

from bench import real_corpus
from sleep_pipeline.config import DedupConfig
from sleep_pipeline.data.dedup import dedup, normalize_text, normalize_texts, shingle
from sleep_pipeline.data.perturb import perturb

WORDS = ("river mountain lantern quiet harbour silver orchard meadow falcon winter copper garden "
         "violet thunder marble cedar ember comet saffron tundra willow juniper pepper cobalt delta "
         "orchid sable quartz harbor amber").split()


def _doc(rng: random.Random, n: int = 60) -> str:
    return " ".join(rng.choice(WORDS) + rng.choice(["", "", "", ",", "."]) for _ in range(n)).capitalize()


def _jaccard(a: str, b: str, k: int = DedupConfig.shingle_size) -> float:
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


LONG_INSTRUCTIONS = (
    "Your task is to sort words in ascending or descending order using ASCII ordering. Compare the words "
    "character by character: the word whose first differing character has the smaller code comes first, and a "
    "word that is a prefix of another comes before it. Upper-case letters come before lower-case ones. Your "
    "output should be a comma-separated list of words, for example word one, word two, word three. Do not add "
    "any explanation, numbering or quotes, and keep every word exactly as it is written. ")


def _templated_items(n: int = 300) -> tuple[list[str], list[str]]:
    """(prompts, prompt + answer texts): instructions so long that two items with different words
    are near duplicates by the Jaccard similarity of their whole texts."""
    rng = random.Random(5)
    prompts, texts, seen = [], [], set()
    while len(texts) < n:
        words = rng.sample(WORDS, 3)
        if frozenset(words) in seen:
            continue
        seen.add(frozenset(words))
        order = rng.choice(["ascending", "descending"])
        prompt = LONG_INSTRUCTIONS + f"Now sort these words in {order} order: " + ", ".join(words)
        prompts.append(prompt)
        texts.append(prompt + "\n" + ", ".join(sorted(words, reverse=order == "descending")))
    return prompts, texts


def test_template_text_in_requests_does_not_make_items_duplicates_but_reposts_still_go():
    prompts, texts = _templated_items()
    assert _jaccard(texts[0], texts[1]) >= DedupConfig.threshold  # by whole text they would be duplicates
    # Compared as plain documents, the shared instructions make them near duplicates ...
    assert dedup(texts, None, DedupConfig()).kept.sum() < len(texts) / 2
    # ... but given as the request part, text that many items repeat there is template, not content.
    result = dedup(texts, None, DedupConfig(), requests=prompts)
    assert result.kept.all() and result.stats["boilerplate_shingles"] > 0

    # Reposts of templated items (tier 3, listed first) are still removed in favour of their original.
    rng = random.Random(8)
    kinds = ["exact", "recase", "noise"] * 20
    copies = [perturb(prompts[i], kind, rng) for i, kind in enumerate(kinds)]
    answers = [t.split("\n", 1)[1] for t in texts[: len(kinds)]]
    all_texts = [c + "\n" + a for c, a in zip(copies, answers)] + texts
    result = dedup(all_texts, [3] * len(copies) + [1] * len(texts), DedupConfig(), requests=copies + prompts)
    assert not result.kept[: len(copies)].any()
    assert result.duplicate_of[: len(copies)].tolist() == [len(copies) + i for i in range(len(copies))]
    assert result.kept[len(copies):].all()


def test_real_documents_sharing_a_licence_text_are_near_duplicates():
    """Licence and copyright files installed on this machine (not written by this project): the same
    licence with other copyright lines is a near duplicate, by exact Jaccard of word 5-grams >= 0.8."""
    corpus = real_corpus.build(max_docs=250)
    truth = real_corpus.true_pairs(corpus.texts)
    assert len(truth) >= 100, f"too few true near-duplicate pairs to measure: {len(truth)} ({corpus.origin})"
    result = dedup(corpus.texts, None, DedupConfig())
    s = real_corpus.scores(corpus.texts, result.kept, result.duplicate_of, result.cluster, truth)
    assert s["recall"] >= 0.95 and s["precision"] >= 0.95, s


def test_a_removed_document_is_a_near_duplicate_of_its_kept_copy_not_of_a_chain():
    # a ~ b and b ~ c, but a and c are not alike: c must not be removed as a copy of a.
    rng = random.Random(11)
    base = [rng.choice(WORDS) for _ in range(60)]
    a = base
    b = base[:50] + [rng.choice(WORDS) for _ in range(5)] + base[55:]
    c = base[:40] + [rng.choice(WORDS) for _ in range(5)] + base[45:50] + b[50:55] + base[55:]
    texts = [" ".join(x) for x in (a, b, c)]
    sims = [_jaccard(texts[0], texts[1]), _jaccard(texts[1], texts[2]), _jaccard(texts[0], texts[2])]
    cfg = DedupConfig(threshold=min(sims[:2]))
    assert sims[2] < cfg.threshold
    result = dedup(texts, None, cfg)
    assert result.kept.tolist() == [True, False, True]
    assert result.duplicate_of[1] == 0 and result.similarity[1] >= cfg.threshold


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
