"""Batched greedy generation with row retirement gives, row for row, what one-at-a-time generation gives."""

from __future__ import annotations

import pytest
import torch

from sleep_pipeline.gate.generation import greedy_generate, is_plain_greedy
from sleep_pipeline.train.modeling import build_model, train_tokenizer
from sleep_pipeline.train.recipe import ModelSpec, TokenizerSpec
from tests.gate_helpers import TINY

PROMPTS = ["the fox", "item 3: the river runs over 8 stones and then", "cat", "over 12 stones the cat sleeps",
           "item 99", "runs runs runs"]
NEW_TOKENS = 12


@pytest.fixture(scope="module")
def lm():
    texts = [f"item {i}: the {w} {v} over {i * 7 % 13} stones" for i in range(200)
             for w, v in [("fox", "jumps"), ("cat", "sleeps"), ("river", "runs")]]
    tok = train_tokenizer(texts, TokenizerSpec(vocab_size=400, min_frequency=1))
    tok.padding_side = "left"
    # a large initialisation makes attention sharp, so outputs depend on positions and on every cached key
    model = build_model(ModelSpec(config={"architecture": "llama", **TINY, "initializer_range": 0.25}, path=None),
                        tok, 7).eval()
    return model, tok


def _cut(text: str, stops: list[str]) -> str:
    for s in stops:
        text = text.split(s)[0]
    return text


def _word_at(tok, tokens: list[int], start: int) -> str:
    """The first generated token from ``start`` on that decodes to a whole printable word."""
    return next(t for t in (tok.decode([x]) for x in tokens[start:]) if "\ufffd" not in t and len(t.strip()) >= 2)


def _one_at_a_time(model, tok, prompt: str, stops: list[str]) -> str:
    """What lm-eval's HF backend does at batch size 1: transformers' generate with its stop criteria."""
    from lm_eval.models.utils_hf import stop_sequences_criteria

    ids = tok(prompt, return_tensors="pt").input_ids
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_length=ids.shape[1] + NEW_TOKENS,
                         do_sample=False, pad_token_id=tok.pad_token_id,
                         stopping_criteria=stop_sequences_criteria(tok, stops, ids.shape[1], 1) if stops else None)
    return _cut(tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True), stops)


def test_batched_greedy_matches_one_at_a_time_while_finished_rows_leave(lm):
    model, tok = lm
    plain = [model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=NEW_TOKENS, do_sample=False,
                            pad_token_id=tok.pad_token_id)[0, x.shape[1]:].tolist()
             for x in (tok(p, return_tensors="pt").input_ids for p in PROMPTS)]
    longest = max(range(len(PROMPTS)), key=lambda i: len(tok(PROMPTS[i]).input_ids))
    # the longest prompt (the one no other row's padding lines up with) ends first, on an end-of-sequence
    # token; two other rows end on stop strings at different steps; the rest run to the length limit
    model.generation_config.eos_token_id = plain[longest][0]
    stops = [_word_at(tok, plain[0], 3), _word_at(tok, plain[4], 3)]
    try:
        expected = [_one_at_a_time(model, tok, p, stops) for p in PROMPTS]
        batch = tok(PROMPTS, return_tensors="pt", padding=True)
        seen = []  # (rows, columns) of every decoding step
        hook = model.register_forward_pre_hook(
            lambda mod, args, kwargs: seen.append(tuple(kwargs["attention_mask"].shape))
            if kwargs["input_ids"].shape[1] == 1 else None, with_kwargs=True)
        try:
            out = greedy_generate(model, tok, batch.input_ids, batch.attention_mask,
                                  batch.input_ids.shape[1] + NEW_TOKENS, stops)
        finally:
            hook.remove()
    finally:
        model.generation_config.eos_token_id = tok.eos_token_id
    width = batch.input_ids.shape[1]
    got = [_cut(tok.decode(row[width:], skip_special_tokens=True), stops) for row in out]
    assert got == expected
    assert all(out[i, :width].tolist() == batch.input_ids[i].tolist() for i in range(len(PROMPTS)))
    generated = [int((row[width:] != tok.pad_token_id).sum()) for row in out]
    assert len(set(generated)) >= 3, generated  # rows really finished at different steps
    rows = [r for r, _ in seen]
    assert rows == sorted(rows, reverse=True) and rows[-1] < len(PROMPTS)  # finished rows left the batch
    # once the longest prompt's row is gone, padding no remaining row needs is dropped from the cache
    # (without that, decoding step k attends over the padded prompt plus k + 1 generated tokens)
    assert any(cols < width + k + 1 for k, (_, cols) in enumerate(seen))


def test_rows_stop_at_once_and_the_output_keeps_the_prompt(lm):
    model, tok = lm
    batch = tok(PROMPTS[:3], return_tensors="pt", padding=True)
    out = greedy_generate(model, tok, batch.input_ids, batch.attention_mask, batch.input_ids.shape[1], ["x"])
    assert torch.equal(out, batch.input_ids)  # no room to generate: the prompt comes back unchanged


def test_anything_but_plain_greedy_goes_to_transformers(lm):
    model, _ = lm
    assert is_plain_greedy(model, {"do_sample": False, "attention_mask": None})
    assert not is_plain_greedy(model, {"do_sample": True})
    assert not is_plain_greedy(model, {"do_sample": False, "temperature": 0.7})
    assert not is_plain_greedy(model, {"num_beams": 4})
    assert not is_plain_greedy(model, {"output_scores": True})
    model.generation_config.repetition_penalty = 1.3
    try:
        assert not is_plain_greedy(model, {"do_sample": False})
    finally:
        model.generation_config.repetition_penalty = None


def test_generated_blocks_of_different_lengths_stack_into_one_batch():
    # long prompts are generated a few rows at a time; a block whose answers all stopped early is
    # narrower than one whose answers ran on (this crashed the gate once: "Sizes of tensors must match")
    import torch

    from sleep_pipeline.gate.evaluate import stack_right_padded

    short, long = torch.ones(2, 5, dtype=torch.long), torch.full((3, 9), 7, dtype=torch.long)
    out = stack_right_padded([short, long], pad_id=0)
    assert out.shape == (5, 9) and out[:2, 5:].eq(0).all() and out[:2, :5].eq(1).all() and out[2:].eq(7).all()


def test_sampling_is_seeded_per_row_and_a_tiny_nucleus_is_greedy(lm):
    from sleep_pipeline.gate.generation import sample_generate

    model, tok = lm
    enc = tok(PROMPTS, return_tensors="pt", padding=True)
    width = enc.input_ids.shape[1] + NEW_TOKENS
    greedy = greedy_generate(model, tok, enc.input_ids, enc.attention_mask, width)
    # a nucleus holding only the most likely token is greedy decoding, whatever the temperature
    nucleus = sample_generate(model, tok, enc.input_ids, enc.attention_mask, width, temperature=1.5, top_p=1e-9)
    assert torch.equal(nucleus, greedy)
    a = sample_generate(model, tok, enc.input_ids, enc.attention_mask, width, temperature=1.5, seed=3)
    b = sample_generate(model, tok, enc.input_ids, enc.attention_mask, width, temperature=1.5, seed=3)
    c = sample_generate(model, tok, enc.input_ids, enc.attention_mask, width, temperature=1.5, seed=4)
    assert torch.equal(a, b)
    assert not torch.equal(a, c) and not torch.equal(a, greedy)
    with pytest.raises(ValueError, match="temperature"):
        sample_generate(model, tok, enc.input_ids, enc.attention_mask, width, temperature=0.0)
