"""Structured pruning of a Llama-style decoder into a genuinely smaller dense model.

MLP neurons and attention heads are ranked by how much they contribute on calibration text (the mean
magnitude of a neuron's activation, or of a head's output, times the norm of the weights that carry it
into the residual stream) and the weakest are removed from the weight matrices themselves. The result
is a model with a smaller config (``intermediate_size``, ``num_attention_heads``) that
``from_pretrained`` loads as it is: no masks, no tensors full of zeros, so it is smaller on disk and
faster on any backend. Hugging Face configs give every layer the same sizes, so every layer keeps the
same number of neurons and heads (its own best ones). Under grouped-query attention the same number of
query heads is kept in every key/value group, so each kept query head still reads its own key/value
head; with one query head per group (plain multi-head attention) whole heads go, keys and values too.

A short low-learning-rate recovery fine-tune (:func:`recover`) on the Learn mix follows; the heavier
repair is distillation from the teacher (:mod:`sleep_pipeline.train.distil`).
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class PruneResult:
    model: object
    intermediate_size: tuple[int, int]  # (before, after)
    attention_heads: tuple[int, int]
    key_value_heads: tuple[int, int]
    parameters: tuple[int, int]


def _layers(model):
    layers = getattr(getattr(model, "model", None), "layers", None)
    if layers is None or not all(hasattr(l, "mlp") and hasattr(l, "self_attn") for l in layers):
        raise ValueError(f"{type(model).__name__} is not a Llama-style decoder (model.layers[i].mlp / .self_attn)")
    for layer in layers:
        mlp, attn = layer.mlp, layer.self_attn
        for name in ("gate_proj", "up_proj", "down_proj"):
            if not isinstance(getattr(mlp, name, None), torch.nn.Linear):
                raise ValueError(f"mlp.{name} is not a plain Linear (an adapter or a quantised layer cannot be pruned)")
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            if not isinstance(getattr(attn, name, None), torch.nn.Linear):
                raise ValueError(f"self_attn.{name} is not a plain Linear")
    return layers


def _head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


@torch.no_grad()
def importance(model, batches: list[dict]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per layer: a score per MLP neuron and per query head, from forward passes over ``batches``
    (dicts with ``input_ids`` and ``attention_mask``); padding positions do not count."""
    layers = _layers(model)
    cfg = model.config
    heads, d = cfg.num_attention_heads, _head_dim(cfg)
    act = [torch.zeros(l.mlp.down_proj.in_features, dtype=torch.float64) for l in layers]
    out = [torch.zeros(heads, dtype=torch.float64) for _ in layers]
    mask_box: list[torch.Tensor] = []
    tokens = [0]

    def mlp_hook(i):
        def hook(_mod, args):
            x = args[0].abs() * mask_box[0][..., None]
            act[i] += x.sum(dim=(0, 1)).double()
        return hook

    def attn_hook(i):
        def hook(_mod, args):
            x = args[0]
            norms = x.view(*x.shape[:-1], heads, d).norm(dim=-1) * mask_box[0][..., None]
            out[i] += norms.sum(dim=(0, 1)).double()
        return hook

    handles = []
    for i, layer in enumerate(layers):
        handles.append(layer.mlp.down_proj.register_forward_pre_hook(mlp_hook(i)))
        handles.append(layer.self_attn.o_proj.register_forward_pre_hook(attn_hook(i)))
    model.eval()
    try:
        for batch in batches:
            mask_box[:] = [batch["attention_mask"].to(torch.float32)]
            tokens[0] += int(batch["attention_mask"].sum())
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    finally:
        for h in handles:
            h.remove()
    n = max(tokens[0], 1)
    mlp_scores, head_scores = [], []
    for i, layer in enumerate(layers):
        down = layer.mlp.down_proj.weight.detach().double()  # (hidden, intermediate)
        mlp_scores.append(act[i] / n * down.norm(dim=0))
        o = layer.self_attn.o_proj.weight.detach().double().view(cfg.hidden_size, heads, d)
        head_scores.append(out[i] / n * o.norm(dim=(0, 2)))
    return mlp_scores, head_scores


def _nearest_allowed(target: float, allowed: list[int]) -> int:
    """The allowed count nearest ``target`` (the larger one on a tie: pruning keeps rather than loses)."""
    return min(allowed, key=lambda n: (abs(n - target), -n))


def head_plan(heads: int, kv_heads: int, hidden: int, keep_ratio: float) -> tuple[int, int]:
    """(query heads, key/value heads) to keep per layer: as near ``keep_ratio`` of the query heads as a valid
    config allows -- transformers requires ``hidden_size`` to be a multiple of the head count, and every
    key/value group keeps the same number of query heads."""
    group = heads // kv_heads
    if group == 1:
        k = _nearest_allowed(heads * keep_ratio, [n for n in range(1, heads + 1) if hidden % n == 0])
        return k, k
    per_group = _nearest_allowed(group * keep_ratio, [p for p in range(1, group + 1) if hidden % (kv_heads * p) == 0])
    return kv_heads * per_group, kv_heads


def _kept_heads(scores: torch.Tensor, heads: int, kv_heads: int, plan: tuple[int, int]) -> tuple[list[int], list[int]]:
    """(query heads kept, key/value heads kept) for one layer, in their original order."""
    group = heads // kv_heads
    if group == 1:  # multi-head attention: a head is its query, key and value
        kept = sorted(torch.topk(scores, plan[0]).indices.tolist())
        return kept, kept
    per_group = plan[0] // kv_heads
    kept = []
    for g in range(kv_heads):
        block = scores[g * group:(g + 1) * group]
        kept += sorted(g * group + j for j in torch.topk(block, per_group).indices.tolist())
    return kept, list(range(kv_heads))


def _rows(w: torch.Tensor, idx: list[int], width: int) -> torch.Tensor:
    """Rows of ``w`` in blocks of ``width`` (one block per head)."""
    return torch.cat([w[i * width:(i + 1) * width] for i in idx])


@torch.no_grad()
def prune(model, batches: list[dict], mlp_keep: float, heads_keep: float, multiple_of: int = 8) -> PruneResult:
    """A new, smaller model: ``mlp_keep`` of the MLP neurons and about ``heads_keep`` of the query heads (per
    key/value group, :func:`head_plan`) of every layer, ranked by :func:`importance` on ``batches``.
    ``model`` is left as it was."""
    from transformers import AutoModelForCausalLM

    if not (0 < mlp_keep <= 1 and 0 < heads_keep <= 1):
        raise ValueError(f"keep ratios must be in (0, 1], got mlp {mlp_keep}, heads {heads_keep}")
    layers = _layers(model)
    cfg = model.config
    heads, kv_heads, d = cfg.num_attention_heads, cfg.num_key_value_heads or cfg.num_attention_heads, _head_dim(cfg)
    inter = cfg.intermediate_size
    keep_inter = min(inter, max(multiple_of, int(math.ceil(inter * mlp_keep / multiple_of)) * multiple_of))
    plan = head_plan(heads, kv_heads, cfg.hidden_size, heads_keep)
    mlp_scores, head_scores = importance(model, batches)
    plans = []
    for i in range(len(layers)):
        neurons = sorted(torch.topk(mlp_scores[i], keep_inter).indices.tolist())
        q_heads, kv_kept = _kept_heads(head_scores[i], heads, kv_heads, plan)
        plans.append((neurons, q_heads, kv_kept))
    new_cfg = copy.deepcopy(cfg)
    new_cfg.intermediate_size = keep_inter
    new_cfg.num_attention_heads = len(plans[0][1])
    new_cfg.num_key_value_heads = len(plans[0][2])
    new_cfg.head_dim = d  # no longer hidden_size / heads
    small = AutoModelForCausalLM.from_config(new_cfg, dtype=next(model.parameters()).dtype)
    state = model.state_dict()
    new_state = {}
    for name, tensor in small.state_dict().items():
        parts = name.split(".")
        if "layers" not in parts:
            new_state[name] = state[name]
            continue
        i = int(parts[parts.index("layers") + 1])
        neurons, q_heads, kv_kept = plans[i]
        w = state[name]
        if name.endswith(("mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.gate_proj.bias", "mlp.up_proj.bias")):
            w = w[neurons]
        elif name.endswith("mlp.down_proj.weight"):
            w = w[:, neurons]
        elif name.endswith(("self_attn.q_proj.weight", "self_attn.q_proj.bias")):
            w = _rows(w, q_heads, d)
        elif name.endswith(("self_attn.k_proj.weight", "self_attn.v_proj.weight", "self_attn.k_proj.bias",
                            "self_attn.v_proj.bias")):
            w = _rows(w, kv_kept, d)
        elif name.endswith("self_attn.o_proj.weight"):
            w = _rows(w.T, q_heads, d).T
        if w.shape != tensor.shape:
            raise RuntimeError(f"pruning {name}: got {tuple(w.shape)}, the smaller config needs {tuple(tensor.shape)}")
        new_state[name] = w.clone()
    small.load_state_dict(new_state)
    if getattr(cfg, "tie_word_embeddings", False):
        small.tie_weights()
    small.generation_config = copy.deepcopy(model.generation_config)
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    return PruneResult(small.eval(), (inter, keep_inter), (heads, new_cfg.num_attention_heads),
                       (kv_heads, new_cfg.num_key_value_heads), (count(model), count(small)))


def recover(model, batches: list[dict], steps: int, learning_rate: float, log=None) -> list[float]:
    """A short fine-tune at a low learning rate on ``batches`` (with ``labels``), cycling through them;
    returns the loss of every step."""
    if steps <= 0 or not batches:
        return []
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=learning_rate, weight_decay=0.0)
    losses, t0 = [], time.monotonic()
    for step in range(steps):
        batch = batches[step % len(batches)]
        loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
        if log and ((step + 1) % max(1, steps // 5) == 0 or step + 1 == steps):
            el = time.monotonic() - t0
            log(f"recovery fine-tune: step {step + 1}/{steps} loss {losses[-1]:.4f} eta {el / (step + 1) * (steps - step - 1):.0f}s")
    model.eval()
    return losses
