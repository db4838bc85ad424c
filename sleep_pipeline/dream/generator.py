"""Who dreams: a model that answers requests, greedily or with several sampled answers per request.

* :class:`LocalGenerator`: a model loaded in this process (the candidate being dreamed on, or a teacher
  such as SmolLM2-135M-Instruct or any local model directory), decoded in batches by the gate's decoder
  (:mod:`sleep_pipeline.gate.generation`: finished rows leave the batch), sampling included;
* :class:`EndpointGenerator`: an OpenAI-compatible ``/chat/completions`` endpoint, its key read from an
  environment variable (never stored in a recipe).

A request is ``(system, prompt)`` or ``(system, prompt, history)``, ``history`` being the chat turns
before ``prompt`` (a multi-turn attack); an answer is the generated text without the prompt.
"""

from __future__ import annotations

import json
import os
import urllib.request
from typing import Protocol


class Generator(Protocol):
    identity: str  # what made an answer, for provenance (a candidate id, a model path, an endpoint model)

    def greedy(self, requests: list[tuple[str, str]], max_new_tokens: int) -> list[str]: ...

    def sample(self, requests: list[tuple[str, str]], n: int, temperature: float, top_p: float,
               max_new_tokens: int, seed: int) -> list[list[str]]: ...


def _messages(system: str, prompt: str, history: list[dict] | tuple = ()) -> list[dict]:
    return (([{"role": "system", "content": system}] if system else []) + list(history)
            + [{"role": "user", "content": prompt}])


class LocalGenerator:
    def __init__(self, model, tokenizer, identity: str, batch_size: int = 16, max_context: int = 1024):
        self.model, self.tokenizer, self.identity = model.eval(), tokenizer, identity
        self.batch_size, self.max_context = batch_size, max_context
        self.tokenizer.padding_side = "left"

    def _encode(self, requests: list[tuple[str, str]]):
        texts = [self.tokenizer.apply_chat_template(_messages(*r), tokenize=False, add_generation_prompt=True)
                 for r in requests]
        self.tokenizer.truncation_side = "left"
        return self.tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False, truncation=True,
                              max_length=self.max_context)

    def _run(self, requests: list[tuple[str, str]], max_new_tokens: int, decode) -> list[str]:
        out: list[str] = []
        for i in range(0, len(requests), self.batch_size):
            enc = self._encode(requests[i:i + self.batch_size])
            width = enc.input_ids.shape[1]
            ids = decode(enc.input_ids, enc.attention_mask, width + max_new_tokens, i)
            out += self.tokenizer.batch_decode(ids[:, width:], skip_special_tokens=True)
        return [t.strip() for t in out]

    def greedy(self, requests: list[tuple[str, str]], max_new_tokens: int) -> list[str]:
        from sleep_pipeline.gate.generation import greedy_generate

        return self._run(requests, max_new_tokens,
                         lambda ids, mask, length, _: greedy_generate(self.model, self.tokenizer, ids, mask, length))

    def sample(self, requests: list[tuple[str, str]], n: int, temperature: float, top_p: float,
               max_new_tokens: int, seed: int) -> list[list[str]]:
        from sleep_pipeline.gate.generation import sample_generate

        repeated = [r for r in requests for _ in range(n)]  # n rows per request, each with its own generator
        flat = self._run(repeated, max_new_tokens, lambda ids, mask, length, offset: sample_generate(
            self.model, self.tokenizer, ids, mask, length, temperature=temperature, top_p=top_p, seed=seed + offset))
        return [flat[k * n:(k + 1) * n] for k in range(len(requests))]


class EndpointGenerator:
    """An OpenAI-compatible chat endpoint (``url`` ends before ``/chat/completions``)."""

    def __init__(self, url: str, model: str, api_key_env: str | None = None, timeout_s: float = 60.0):
        self.url, self.model, self.timeout_s = url.rstrip("/"), model, timeout_s
        self.key = os.environ.get(api_key_env, "") if api_key_env else ""
        if api_key_env and not self.key:
            raise ValueError(f"the dream generator's endpoint key variable {api_key_env} is not set")
        self.identity = f"endpoint:{model}@{self.url}"

    def _complete(self, request: tuple, n: int, temperature: float, top_p: float,
                  max_new_tokens: int, seed: int | None) -> list[str]:
        body = {"model": self.model, "messages": _messages(*request), "n": n, "temperature": temperature,
                "top_p": top_p, "max_tokens": max_new_tokens}
        if seed is not None:
            body["seed"] = seed
        req = urllib.request.Request(f"{self.url}/chat/completions", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json",
                                              **({"Authorization": f"Bearer {self.key}"} if self.key else {})})
        with urllib.request.urlopen(req, timeout=self.timeout_s) as resp:
            choices = json.loads(resp.read().decode("utf-8"))["choices"]
        return [(c.get("message") or {}).get("content") or "" for c in choices]

    def greedy(self, requests: list[tuple[str, str]], max_new_tokens: int) -> list[str]:
        return [self._complete(r, 1, 0.0, 1.0, max_new_tokens, None)[0].strip() for r in requests]

    def sample(self, requests: list[tuple[str, str]], n: int, temperature: float, top_p: float,
               max_new_tokens: int, seed: int) -> list[list[str]]:
        return [[t.strip() for t in self._complete(r, n, temperature, top_p, max_new_tokens, seed + k)]
                for k, r in enumerate(requests)]
