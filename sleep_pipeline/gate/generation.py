"""Batched generation (greedy, or sampled for Dream) that retires finished rows.

``transformers``' ``generate`` keeps every row of a batch in every decoding step until the last row
stops, and lm-eval's stop-sequence criteria only end a batch when *all* rows have produced a stop
string. On a CPU most of a batch's late steps then go to rows that are already done. Here a row
leaves the batch (and the key/value cache) as soon as it emits an end-of-sequence token or a stop
string, and left-padding columns no remaining row needs are dropped, so each step costs only what
the unfinished rows need.

Outputs follow lm-eval's conventions for ``_model_generate``: the prompt (left-padded) followed by
the generated tokens, finished rows padded with the pad token. A row's text up to its first stop
string is what one-at-a-time generation produces (greedy decoding, same stop rules: the stop string
is looked for in the decoded last ``len(stop tokens) + 2`` generated tokens, as lm-eval does).
:func:`sample_generate` decodes the same way with temperature and nucleus sampling (Dream's
self-consistency draws several answers per prompt). Anything else (beams, logits processors) is left to
``generate``.
"""

from __future__ import annotations

import functools

import torch

# generation settings that add logits processors or change the search; any of them set means the
# request is not plain greedy decoding and goes to transformers' generate
_NOT_GREEDY = {
    "do_sample": (None, False), "num_beams": (None, 1), "repetition_penalty": (None, 1.0),
    "encoder_repetition_penalty": (None, 1.0), "no_repeat_ngram_size": (None, 0), "bad_words_ids": (None,),
    "min_length": (None, 0), "min_new_tokens": (None, 0), "forced_bos_token_id": (None,),
    "forced_eos_token_id": (None,), "suppress_tokens": (None,), "begin_suppress_tokens": (None,),
    "sequence_bias": (None,), "renormalize_logits": (None, False), "guidance_scale": (None, 1.0),
    "exponential_decay_length_penalty": (None,), "watermarking_config": (None,), "num_return_sequences": (None, 1),
    "temperature": (None, 0.0, 1.0), "top_k": (None, 50), "top_p": (None, 1.0),
}


@functools.cache
def _reserved_layer_class():
    from transformers.cache_utils import DynamicLayer

    class ReservedLayer(DynamicLayer):
        """A full-attention cache layer that writes new keys/values into room reserved up front instead of
        concatenating (``DynamicLayer`` copies the whole cache every step: at 32 rows x 400 tokens that
        copy is about half of a decoding step on a CPU). ``keys``/``values`` stay views of the filled
        part, so everything else (row selection, cropping) works as for ``DynamicLayer``; a layer whose
        tensors were replaced that way gets a fresh buffer on its next update."""

        def __init__(self, reserve: int):
            super().__init__()
            self.reserve = reserve
            self._key_buf = self._value_buf = None

        def update(self, key_states, value_states, *args, **kwargs):
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
            filled = self.keys.shape[-2] if self.keys.dim() == 4 else 0
            needed = filled + key_states.shape[-2]
            buf = self._key_buf
            if buf is None or buf.shape[0] != key_states.shape[0] or buf.shape[-2] < needed or \
                    (filled and self.keys.data_ptr() != buf.data_ptr()):
                b, h, _, d = key_states.shape
                self._key_buf = key_states.new_empty(b, h, needed + self.reserve, d)
                self._value_buf = value_states.new_empty(b, h, needed + self.reserve, value_states.shape[-1])
                if filled:
                    self._key_buf[:, :, :filled] = self.keys
                    self._value_buf[:, :, :filled] = self.values
            self._key_buf[:, :, filled:needed] = key_states
            self._value_buf[:, :, filled:needed] = value_states
            self.keys, self.values = self._key_buf[:, :, :needed], self._value_buf[:, :, :needed]
            return self.keys, self.values

    return ReservedLayer


def is_plain_greedy(model, generation_kwargs: dict) -> bool:
    """True when ``generation_kwargs`` (and the model's generation config) ask for plain greedy decoding."""
    if any(k not in _NOT_GREEDY and k != "attention_mask" for k in generation_kwargs):
        return False
    config = getattr(model, "generation_config", None)
    for key, allowed in _NOT_GREEDY.items():
        if key in generation_kwargs:
            if generation_kwargs[key] not in allowed:
                return False
        elif config is not None and key not in ("temperature", "top_k", "top_p") \
                and getattr(config, key, None) not in allowed:
            return False
    return True


def _eos_ids(model, tokenizer) -> set[int]:
    ids = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if ids is None:
        ids = tokenizer.eos_token_id
    if ids is None:
        return set()
    return {int(i) for i in (ids if isinstance(ids, (list, tuple)) else [ids])}


@torch.inference_mode()
def greedy_generate(model, tokenizer, input_ids: torch.Tensor, attention_mask: torch.Tensor, max_length: int,
                    stop: list[str] | None = None) -> torch.Tensor:
    """Greedy continuation of left-padded ``input_ids`` up to ``max_length`` tokens in all."""
    return _decode(model, tokenizer, input_ids, attention_mask, max_length, stop,
                   lambda logits, rows: logits.float().argmax(-1))


@torch.inference_mode()
def sample_generate(model, tokenizer, input_ids: torch.Tensor, attention_mask: torch.Tensor, max_length: int,
                    stop: list[str] | None = None, temperature: float = 0.8, top_p: float = 0.95,
                    seed: int = 0) -> torch.Tensor:
    """Sampled continuation (temperature, then nucleus ``top_p``) of left-padded ``input_ids``, with the
    same retiring of finished rows as :func:`greedy_generate`. Every row draws from its own generator
    seeded with ``seed`` and its row index, so a row's sample does not depend on which other rows are
    still in the batch: the same inputs and seed give the same texts, whatever the batch."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0 for sampling (got {temperature}); use greedy_generate")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1] (got {top_p})")
    gens = [torch.Generator(device=input_ids.device).manual_seed(seed * 1_000_003 + i) for i in range(input_ids.shape[0])]

    def choose(logits: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        probs = torch.softmax(logits.float() / temperature, dim=-1)
        if top_p < 1:
            sorted_p, order = probs.sort(dim=-1, descending=True)
            outside = sorted_p.cumsum(-1) - sorted_p > top_p  # tokens after the nucleus is full
            probs = probs.scatter(-1, order, sorted_p.masked_fill(outside, 0.0))
        return torch.stack([torch.multinomial(probs[k], 1, generator=gens[int(r)])[0] for k, r in enumerate(rows)])

    return _decode(model, tokenizer, input_ids, attention_mask, max_length, stop, choose)


def _decode(model, tokenizer, input_ids: torch.Tensor, attention_mask: torch.Tensor, max_length: int,
            stop: list[str] | None, choose) -> torch.Tensor:
    """The decoding loop: ``choose(logits, rows)`` picks each remaining row's next token (``rows``: the
    rows' indices in ``input_ids``)."""
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    batch, prompt_len = input_ids.shape
    steps = max_length - prompt_len
    if steps <= 0:
        return input_ids
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    out = torch.full((batch, max_length), pad_id, dtype=input_ids.dtype, device=input_ids.device)
    out[:, :prompt_len] = input_ids
    eos = torch.tensor(sorted(_eos_ids(model, tokenizer)), dtype=input_ids.dtype, device=input_ids.device)
    windows: dict[int, list[str]] = {}  # lookback length -> stop strings searched in that many last tokens
    for s in dict.fromkeys(s for s in (stop or []) if s):
        windows.setdefault(len(tokenizer.encode(s, add_special_tokens=False)) + 2, []).append(s)

    mask = attention_mask.to(torch.long)
    positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)
    cache = DynamicCache(config=model.config)
    # plain full-attention layers (not sliding-window or other kinds) get reserved room and may be trimmed
    plain = all(type(layer) is DynamicLayer for layer in cache.layers)
    if plain:
        cache.layers = [_reserved_layer_class()(steps) for _ in cache.layers]
    logits = model(input_ids=input_ids, attention_mask=mask, position_ids=positions, past_key_values=cache,
                   use_cache=True, logits_to_keep=1).logits[:, -1]
    rows = torch.arange(batch, device=input_ids.device)  # which output row each batch row writes to
    taken = 0
    for step in range(steps):
        token = choose(logits, rows)
        out[rows, prompt_len + step] = token
        taken = step + 1
        done = torch.isin(token, eos) if eos.numel() else torch.zeros_like(token, dtype=torch.bool)
        for lookback, strings in windows.items():
            tails = tokenizer.batch_decode(out[rows, prompt_len + max(0, taken - lookback):prompt_len + taken])
            done |= torch.tensor([any(s in t for s in strings) for t in tails], device=done.device)
        if bool(done.all()) or taken == steps:
            break
        if bool(done.any()):
            keep = (~done).nonzero().squeeze(1)
            rows, token, mask = rows[keep], token[keep], mask[keep]
            cache.batch_select_indices(keep)
            first = int(mask.any(0).nonzero()[0])  # leading columns that are padding in every kept row
            if first and plain:
                mask = mask[:, first:]
                for layer in cache.layers:
                    layer.keys, layer.values = layer.keys[:, :, first:], layer.values[:, :, first:]
        mask = torch.cat([mask, mask.new_ones((mask.shape[0], 1))], dim=1)
        positions = mask.sum(-1, keepdim=True) - 1
        logits = model(input_ids=token[:, None], attention_mask=mask, position_ids=positions, past_key_values=cache,
                       use_cache=True).logits[:, -1]
    return out[:, :prompt_len + taken]
