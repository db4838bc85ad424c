"""Model and tokenizer factory: a local Hugging Face directory, or a small Llama built from a config
with a byte-level BPE tokenizer trained locally on the training texts. Nothing is downloaded.

Mix rows become chat messages here, in one place, for training and evaluation alike. Training feeds
them to trl as a conversational prompt/completion pair (:func:`row_prompt_completion`): the loss
covers the tokens the chat template renders after the prompt (the answer and its end-of-turn
token), whatever the template looks like, so a model keeps its own chat template. Only a tokenizer
without any chat template gets the project's :data:`CHAT_TEMPLATE` (its ``{% generation %}``
markers are not needed for that loss; they stay so the template renders as it always did).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable

from sleep_pipeline.train.recipe import ModelSpec, TokenizerSpec

SPECIAL_TOKENS = ["<|pad|>", "<|bos|>", "<|eos|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}<|system|>{{ message['content'] }}<|end|>"
    "{% elif message['role'] == 'user' %}<|user|>{{ message['content'] }}<|end|>"
    "{% else %}<|assistant|>{% generation %}{{ message['content'] }}{{ eos_token }}{% endgeneration %}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def row_messages(row: dict) -> list[dict]:
    """A mix row as chat messages; the assistant turn is the target. A dream row may carry ``history``:
    the turns before its prompt (a multi-turn attack)."""
    messages = []
    if row.get("system"):
        messages.append({"role": "system", "content": row["system"]})
    messages += [{"role": m["role"], "content": m["content"]} for m in row.get("history") or ()]
    messages.append({"role": "user", "content": row["prompt"]})
    messages.append({"role": "assistant", "content": row["response"]})
    return messages


def row_prompt_completion(row: dict) -> dict:
    """A mix row as trl's conversational prompt/completion example: the loss covers the completion."""
    *prompt, answer = row_messages(row)
    return {"prompt": prompt, "completion": [answer]}


def read_jsonl(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def train_tokenizer(texts: Iterable[str], spec: TokenizerSpec):
    """A byte-level BPE tokenizer trained on ``texts`` (deterministic for the same texts)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=spec.vocab_size, min_frequency=spec.min_frequency, special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<|pad|>", bos_token="<|bos|>", eos_token="<|eos|>",
        additional_special_tokens=SPECIAL_TOKENS[3:], model_max_length=1 << 20,
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def load_tokenizer(path: Path):
    """The tokenizer of a local directory with its own chat template; one without a template gets ours."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    if not tok.chat_template:
        tok.chat_template = CHAT_TEMPLATE if tok.bos_token else CHAT_TEMPLATE.replace("{{ bos_token }}", "")
    return tok


ADAPTER_CONFIG = "adapter_config.json"


def is_model_directory(path: Path) -> bool:
    """A Hugging Face causal-LM directory, or a LoRA adapter directory (merged into its base on load)."""
    return (Path(path) / "config.json").is_file() or (Path(path) / ADAPTER_CONFIG).is_file()


def load_pretrained(path: Path, tokenizer=None, dequantize: bool = False):
    """A local model directory as a plain causal LM in fp32 (safetensors only). A LoRA adapter directory is
    loaded on its base and merged, so training continues from the weights the adapter stands for. An int8
    checkpoint is refused unless ``dequantize`` (then: the float weights it computes with)."""
    import torch
    from transformers import AutoModelForCausalLM

    from sleep_pipeline.compress import quantize

    path = Path(path)
    if quantize.is_int8(path):
        if not dequantize:
            raise ValueError(f"{path} is an int8 checkpoint, made for serving: train from the float checkpoint it "
                             "was quantised from (its parent candidate)")
        model = quantize.dequantize(quantize.load_int8(path))
    elif (path / ADAPTER_CONFIG).is_file():
        from peft import AutoPeftModelForCausalLM

        model = AutoPeftModelForCausalLM.from_pretrained(path, local_files_only=True, dtype=torch.float32).merge_and_unload()
    else:
        model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, use_safetensors=True,
                                                     dtype=torch.float32)
    if tokenizer is not None and model.get_input_embeddings().num_embeddings < len(tokenizer):
        model.resize_token_embeddings(len(tokenizer))
    return model


def build_model(spec: ModelSpec, tokenizer, seed: int):
    """The model to train: loaded from a local directory (safetensors only), or a fresh small Llama."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    if spec.path is not None:
        return load_pretrained(spec.path, tokenizer)
    cfg = dict(spec.config or {})
    cfg.pop("architecture", None)
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, **cfg,
    )
    return LlamaForCausalLM(config)


def count_parameters(model) -> int:
    # under ZeRO-3 a partitioned parameter is an empty placeholder; ds_numel is its real size
    return sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())


def completion_tensors(tokenizer, rows: list[dict], max_len: int):
    """Mix rows as one right-padded batch for a plain training loop: ``input_ids``, ``attention_mask`` and
    ``labels`` (-100 on the prompt and the padding, so the loss covers the answer as in Learn). A row
    longer than ``max_len`` loses tokens from the left, so its answer stays."""
    import torch

    seqs = []
    for row in rows:
        messages = row_messages(row)
        prompt = tokenizer(tokenizer.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True),
                           add_special_tokens=False)["input_ids"]
        full = tokenizer(tokenizer.apply_chat_template(messages, tokenize=False), add_special_tokens=False)["input_ids"]
        n = 0  # the answer starts where the rendered prompt stops being a prefix of the whole
        while n < min(len(prompt), len(full)) and prompt[n] == full[n]:
            n += 1
        cut = max(0, len(full) - max_len)
        seqs.append((full[cut:], [-100] * max(0, n - cut) + full[max(n, cut):]))
    width = max(len(ids) for ids, _ in seqs)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    labels = torch.full((len(seqs), width), -100, dtype=torch.long)
    for i, (s, lab) in enumerate(seqs):
        ids[i, :len(s)] = torch.tensor(s)
        mask[i, :len(s)] = 1
        labels[i, :len(lab)] = torch.tensor(lab)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}
