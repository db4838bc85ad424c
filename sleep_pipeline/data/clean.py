"""Quality filters and PII scrubbing, applied to records before deduplication.

Filters reject a record into quarantine with a reason: ``too_short`` / ``too_long`` (character
bounds), ``repetitive`` (share of repeated word 3-grams), ``garbage`` (share of control, replacement
and private-use characters). PII is not a reason to drop a record: e-mail addresses, phone numbers,
IP addresses, credit-card numbers (Luhn-checked) and API keys are replaced by a placeholder such as
``<EMAIL_ADDRESS>``, using Presidio's regex recognizers (no NLP model, nothing downloaded). A cheap
trigger regex skips the recognizers for the large majority of texts that cannot contain PII.
"""

from __future__ import annotations

import re
from collections import Counter
from functools import lru_cache

from sleep_pipeline.config import QualityConfig

QUALITY_REASONS = ("too_short", "too_long", "repetitive", "garbage")
_GARBAGE = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\ufffd\ue000-\uf8ff\ufff0-\ufffc]")
# Anything a recognizer could match needs an '@', a run of digits, or a key-like token.
_PII_TRIGGER = re.compile(r"@|\d[\d\s().\-]{6,}\d|\d{1,3}\.\d{1,3}\.\d{1,3}\.\d{1,3}|\b(?:sk|gh[pousr])[-_]|AKIA|(?i:api[_-]?key|secret|token)")


def repetition_share(text: str) -> float:
    """Share of word 3-gram occurrences that repeat an earlier one (0 = none, ~1 = one phrase looped)."""
    words = text.lower().split()
    if len(words) < 12:
        return 0.0
    grams = Counter(zip(words, words[1:], words[2:]))
    total = len(words) - 2
    return (total - len(grams)) / total


def garbage_share(text: str) -> float:
    return len(_GARBAGE.findall(text)) / max(len(text), 1)


def quality_issue(text: str, q: QualityConfig) -> tuple[str, str] | None:
    """(reason, detail) when the text fails a quality filter, else None."""
    n = len(text.strip())
    if n < q.min_chars:
        return "too_short", f"{n} characters < min_chars {q.min_chars}"
    if n > q.max_chars:
        return "too_long", f"{n:,} characters > max_chars {q.max_chars:,}"
    g = garbage_share(text)
    if g > q.max_garbage:
        return "garbage", f"{g:.0%} control/replacement/private-use characters > {q.max_garbage:.0%}"
    r = repetition_share(text)
    if r > q.max_repetition:
        return "repetitive", f"{r:.0%} of word 3-grams are repeats > {q.max_repetition:.0%}"
    return None


@lru_cache(maxsize=4)
def _recognizers(entities: tuple[str, ...]):
    import tldextract
    from presidio_analyzer import Pattern, PatternRecognizer
    from presidio_analyzer.predefined_recognizers import (
        CreditCardRecognizer, EmailRecognizer, IpRecognizer, PhoneRecognizer,
    )

    # tldextract would download the public-suffix list on first use; the snapshot it ships is enough.
    offline_tld = tldextract.TLDExtract(suffix_list_urls=(), cache_dir=None)

    class OfflineEmailRecognizer(EmailRecognizer):
        def validate_result(self, pattern_text: str):
            return offline_tld(pattern_text).fqdn != ""

    api_keys = PatternRecognizer(
        supported_entity="API_KEY",
        patterns=[
            Pattern("openai-style key", r"\bsk-[A-Za-z0-9_\-]{16,}", 0.9),
            Pattern("aws access key id", r"\bAKIA[0-9A-Z]{16}\b", 0.9),
            Pattern("github token", r"\bgh[pousr]_[A-Za-z0-9]{30,}\b", 0.9),
            Pattern("assigned secret", r"(?i)\b(?:api[_-]?key|secret|token)\s*[:=]\s*['\"]?[A-Za-z0-9_\-]{16,}", 0.7),
        ],
    )
    available = {
        "EMAIL_ADDRESS": OfflineEmailRecognizer(),
        "PHONE_NUMBER": PhoneRecognizer(supported_regions=("US", "GB")),
        "IP_ADDRESS": IpRecognizer(),
        "CREDIT_CARD": CreditCardRecognizer(),
        "API_KEY": api_keys,
    }
    return [(e, available[e]) for e in entities]


def find_pii(text: str, entities: tuple[str, ...]) -> list[tuple[int, int, str]]:
    """Non-overlapping (start, end, entity) spans, longest first where two overlap."""
    if not entities or not _PII_TRIGGER.search(text):
        return []
    spans = []
    for entity, recognizer in _recognizers(tuple(entities)):
        for res in recognizer.analyze(text, entities=[entity], nlp_artifacts=None):
            if res.score >= 0.4:
                spans.append((res.start, res.end, entity))
    spans.sort(key=lambda s: (s[0], -(s[1] - s[0])))
    out: list[tuple[int, int, str]] = []
    for s in spans:
        if out and s[0] < out[-1][1]:
            continue
        out.append(s)
    return out


def scrub_pii(text: str, entities: tuple[str, ...]) -> tuple[str, list[str]]:
    """The text with each PII span replaced by ``<ENTITY>``, and the entities found."""
    spans = find_pii(text, entities)
    if not spans:
        return text, []
    parts, last = [], 0
    for start, end, entity in spans:
        parts.append(text[last:start])
        parts.append(f"<{entity}>")
        last = end
    parts.append(text[last:])
    return "".join(parts), [s[2] for s in spans]
