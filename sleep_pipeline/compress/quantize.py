"""int8 weights that run faster on a CPU and are stored without pickle.

Every ``nn.Linear`` (the LM head included) gets symmetric per-output-channel int8 weights and runs as
PyTorch's dynamic int8 ``Linear`` (int8 weights, activations quantised on the fly: the kernel that
makes a CPU faster). The token embedding is stored as int8 with a scale per row and turned back
into float32 when loaded (an embedding lookup gains nothing from int8 arithmetic, but it is often a
third of a small model's bytes). Modules PyTorch's dynamic int8 kernels hold cannot be saved as
safetensors, so the checkpoint holds plain tensors -- ``<module>.qweight`` (int8), ``<module>.scale``
(float32), the biases and every other float tensor -- in ``model.int8.safetensors``, with
``quantization.json`` saying what is where, and :func:`load_int8` rebuilds the served model exactly.
The file name is deliberately not ``model.safetensors``: plain ``from_pretrained`` then fails loudly
instead of loading a randomly initialised model. PyTorch has deprecated its quantised-tensor API in
favour of torchao, whose int8 kernels were slower than float32 on CPU at these sizes; the stored
format (plain int8 tensors and scales) does not depend on either, only :func:`int8_linear` does.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch

WEIGHTS = "model.int8.safetensors"
QUANTIZATION = "quantization.json"
METHOD = "int8-per-channel-dynamic"


def is_int8(path: Path) -> bool:
    return (Path(path) / QUANTIZATION).is_file()


def quantize_weight(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 per row (output channel): (int8 values, float32 scale per row)."""
    w = w.detach().to(torch.float32)
    scale = (w.abs().amax(dim=1) / 127.0).clamp_min(1e-12)
    q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scale


def int8_linear(q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None):
    """PyTorch's dynamic int8 Linear holding exactly these int8 weights and scales."""
    import torch.ao.nn.quantized.dynamic as nnqd

    out_features, in_features = q.shape
    with warnings.catch_warnings():  # the quantised-tensor API is deprecated; the stored format does not use it
        warnings.filterwarnings("ignore", message=".*quantized tensor creation functions.*")
        qweight = torch._make_per_channel_quantized_tensor(q, scale.to(torch.float64),
                                                           torch.zeros(out_features, dtype=torch.long), 0)
    mod = nnqd.Linear(in_features, out_features, bias_=bias is not None, dtype=torch.qint8)
    mod.set_weight_bias(qweight, None if bias is None else bias.detach().to(torch.float32))
    return mod


def _linear_names(model) -> list[str]:
    return [name for name, mod in model.named_modules() if isinstance(mod, torch.nn.Linear)]


@torch.no_grad()
def quantize(model) -> tuple[object, dict[str, torch.Tensor], dict]:
    """Quantise ``model`` in place: returns (the served model, the tensors to store, the description for
    ``quantization.json``)."""
    emb = model.get_input_embeddings()
    names = _linear_names(model)
    if not names:
        raise ValueError(f"{type(model).__name__} has no nn.Linear layers to quantise")
    tensors: dict[str, torch.Tensor] = {}
    for name in names:
        lin = model.get_submodule(name)
        q, scale = quantize_weight(lin.weight)
        tensors[f"{name}.qweight"], tensors[f"{name}.scale"] = q, scale
        if lin.bias is not None:
            tensors[f"{name}.bias"] = lin.bias.detach().to(torch.float32).contiguous()
        model.set_submodule(name, int8_linear(q, scale, lin.bias))
    emb_name = next(n for n, m in model.named_modules() if m is emb)
    q, scale = quantize_weight(emb.weight)
    tensors[f"{emb_name}.qweight"], tensors[f"{emb_name}.scale"] = q, scale
    emb.weight.data = q.to(torch.float32) * scale[:, None]
    for name, p in model.named_parameters():
        if name != f"{emb_name}.weight":
            tensors[name] = p.detach().to(torch.float32).contiguous()
    for name, b in model.named_buffers():
        if not name.endswith("inv_freq") and name not in tensors:  # rotary tables are rebuilt from the config
            tensors[name] = b.detach().contiguous()
    info = {"method": METHOD, "weights": WEIGHTS, "linear": names, "embedding": emb_name,
            "description": "int8 weights, symmetric per output channel, run by PyTorch's dynamic int8 Linear "
                           "(activations quantised per batch); the embedding is int8 per row, float32 once loaded"}
    model.config.tie_word_embeddings = False  # the LM head is its own int8 matrix now
    return model.eval(), tensors, info


def save_int8(model, tokenizer, tensors: dict[str, torch.Tensor], info: dict, directory: Path) -> None:
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(directory / WEIGHTS), metadata={"format": "pt", "quantization": METHOD})
    model.config.save_pretrained(directory)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    (directory / QUANTIZATION).write_text(json.dumps(info, indent=2))


@torch.no_grad()
def load_int8(path: Path):
    """The served int8 model of a checkpoint written by :func:`save_int8`."""
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    path = Path(path)
    info = json.loads((path / QUANTIZATION).read_text())
    if info.get("method") != METHOD:
        raise ValueError(f"{path}: unknown quantization method {info.get('method')!r} (this version reads {METHOD})")
    tensors = load_file(str(path / info["weights"]))
    config = AutoConfig.from_pretrained(path, local_files_only=True)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    for name in info["linear"]:
        model.set_submodule(name, int8_linear(tensors.pop(f"{name}.qweight"), tensors.pop(f"{name}.scale"),
                                              tensors.pop(f"{name}.bias", None)))
    emb = info["embedding"]
    q, scale = tensors.pop(f"{emb}.qweight"), tensors.pop(f"{emb}.scale")
    tensors[f"{emb}.weight"] = q.to(torch.float32) * scale[:, None]
    # plain float tensors are copied in one by one: load_state_dict would walk into the int8 modules,
    # which expect their own serialisation
    wanted = {n for n, _ in model.named_parameters()} | {n for n, _ in model.named_buffers() if not n.endswith("inv_freq")}
    unexpected = sorted(set(tensors) - wanted)
    missing = sorted(wanted - set(tensors))
    if missing or unexpected:
        raise ValueError(f"{path}: the int8 checkpoint does not match its config (missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]})")
    for name, value in tensors.items():
        module, _, attr = name.rpartition(".")
        getattr(model.get_submodule(module), attr).copy_(value)
    return model.eval()
