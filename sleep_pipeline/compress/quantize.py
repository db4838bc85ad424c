"""int8 weights that run faster on a CPU and are stored without pickle.

Every ``nn.Linear`` (the LM head included) gets symmetric per-output-channel int8 weights and runs as
:class:`Int8Linear`: activations quantised to int8 per token on the fly, int8 x int8 products with
int32 accumulation (the arithmetic that makes a CPU faster). Before that, :func:`smooth` can move
activation outliers into the weights (SmoothQuant) from a few calibration batches. The token embedding
is stored as int8 with a scale per row and turned back into float32 when loaded (an embedding lookup
gains nothing from int8 arithmetic, but it is often a third of a small model's bytes). The checkpoint
holds plain tensors -- ``<module>.qweight`` (int8), ``<module>.scale`` (float32), the biases and every
other float tensor -- in ``model.int8.safetensors`` (no pickle), with ``quantization.json`` saying
what is where, and :func:`load_int8` rebuilds the served model exactly. The file name is deliberately
not ``model.safetensors``: plain ``from_pretrained`` then fails loudly instead of loading a randomly
initialised model. PyTorch has deprecated its quantised-tensor API in favour of torchao, whose int8
kernels were slower than float32 on CPU at these sizes; the stored format does not depend on either,
only :class:`Int8Linear` does.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch

WEIGHTS = "model.int8.safetensors"
QUANTIZATION = "quantization.json"
METHOD = "int8-per-channel-per-token"
LEGACY_METHODS = ("int8-per-channel-dynamic",)  # the same stored tensors, served per tensor before


def is_int8(path: Path) -> bool:
    return (Path(path) / QUANTIZATION).is_file()


def quantize_weight(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 per row (output channel): (int8 values, float32 scale per row)."""
    w = w.detach().to(torch.float32)
    scale = (w.abs().amax(dim=1) / 127.0).clamp_min(1e-12)
    q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scale


class Int8Linear(torch.nn.Module):
    """A Linear layer on int8 arithmetic: int8 weights with a scale per output channel, activations
    quantised to int8 on the fly with a scale per token (per row of the input), int32 accumulation.

    Per token matters: PyTorch's dynamic int8 ``Linear`` quantises the whole input tensor with one scale,
    so in a batch of prompts (and at the padding positions a batched prefill carries) one row with large
    activations leaves every other row a few levels of resolution. On SmolLM2-135M that kept the float
    model's next-token choice on 41% of positions, and the quick suite's capability fell from 0.34 to 0.05;
    per token it kept 88%. A single row (decoding at batch 1) runs on fbgemm's dynamic kernel, where one
    scale for the tensor is one scale for the token and which is the fastest int8 kernel on x86 CPUs;
    several rows run on ``torch._int_mm``."""

    def __init__(self, q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.out_features, self.in_features = q.shape
        # buffers, so ``model.to(device)`` moves them; not persistent: the stored form is written and
        # read by quantize/load_int8 under the names ``<module>.qweight`` / ``.scale`` / ``.bias``
        self.register_buffer("qweight", q.contiguous(), persistent=False)
        self.register_buffer("scale", scale.to(torch.float32).contiguous(), persistent=False)
        self.register_buffer("bias_value", None if bias is None else bias.detach().to(torch.float32).contiguous(),
                             persistent=False)
        self._packed = None

    def __getstate__(self):  # fbgemm's packed weight is rebuilt on demand, never copied or pickled
        state = self.__dict__.copy()
        state["_packed"] = None
        return state

    def _single_row(self):
        if self._packed is None:
            with warnings.catch_warnings():  # the quantised-tensor API is deprecated; the stored format does not use it
                warnings.filterwarnings("ignore", message=".*quantized tensor creation functions.*")
                qw = torch._make_per_channel_quantized_tensor(self.qweight, self.scale.to(torch.float64),
                                                              torch.zeros(self.out_features, dtype=torch.long), 0)
            self._packed = torch.ops.quantized.linear_prepack(qw, self.bias_value)
        return self._packed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, self.in_features).to(torch.float32)
        if x2.device.type == "cpu" and x2.shape[0] == 1 and torch.backends.quantized.engine in ("fbgemm", "x86"):
            y = torch.ops.quantized.linear_dynamic(x2, self._single_row(), True)
        elif x2.device.type != "cpu" and x2.shape[0] <= 16:  # CUDA's int8 matmul wants more than 16 rows
            y = torch.nn.functional.linear(x2, self.qweight.to(torch.float32) * self.scale[:, None], self.bias_value)
        else:
            s = x2.abs().amax(dim=1, keepdim=True).clamp_min(1e-8) / 127.0
            xq = torch.round(x2 / s).to(torch.int8)
            y = torch._int_mm(xq, self.qweight.t()).to(torch.float32) * s * self.scale
            if self.bias_value is not None:
                y = y + self.bias_value
        return y.reshape(*shape[:-1], self.out_features).to(x.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 weights and activations"


@torch.no_grad()
def smooth(model, batches: list[dict], alpha: float = 0.5) -> int:
    """SmoothQuant: move activation outliers into the weights before int8. A few channels of a language
    model's activations are orders of magnitude larger than the rest, and a token's one int8 scale must
    cover its largest channel, which leaves the others few levels (on SmolLM2-135M, per-token int8 kept
    the float model's next-token choice on 88% of positions, 89% smoothed first). Per input channel j of a group of Linear
    layers reading the same activation, ``s_j = max|x_j|^alpha / max|W_:,j|^(1-alpha)`` (``batches``:
    calibration inputs); the weights' columns are multiplied by ``s`` and the operation producing the
    activation divided by it -- the RMSNorm before q/k/v and before gate/up, and up_proj's rows before
    down_proj -- so the float model computes the same function. Returns the number of groups smoothed."""
    layers = getattr(getattr(model, "model", None), "layers", None)
    needed = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj",
              "mlp.down_proj", "input_layernorm", "post_attention_layernorm")
    if not layers or not batches or not all(_has(layers[0], n) for n in needed):
        return 0
    probe = {k: batches[0][k] for k in ("input_ids", "attention_mask")}
    before = model(**probe).logits
    saved = {k: v.detach().clone() for k, v in model.state_dict().items()}
    act_max: dict[int, torch.Tensor] = {}

    def hook(mod, args):
        x = args[0].detach().abs().reshape(-1, args[0].shape[-1]).amax(dim=0).float()
        act_max[id(mod)] = torch.maximum(act_max[id(mod)], x) if id(mod) in act_max else x

    targets = []
    for layer in layers:
        attn, mlp = layer.self_attn, layer.mlp
        targets += [attn.q_proj, mlp.gate_proj, mlp.down_proj]
    handles = [t.register_forward_pre_hook(hook) for t in targets]
    try:
        for b in batches:
            model(input_ids=b["input_ids"], attention_mask=b["attention_mask"])
    finally:
        for h in handles:
            h.remove()

    def scales(x_max: torch.Tensor, linears) -> torch.Tensor:
        w_max = torch.stack([lin.weight.abs().amax(dim=0).float() for lin in linears]).amax(dim=0)
        return (x_max.clamp_min(1e-5) ** alpha / w_max.clamp_min(1e-5) ** (1 - alpha)).clamp_min(1e-5)

    groups = 0
    for layer in layers:
        attn, mlp = layer.self_attn, layer.mlp
        for norm, linears in ((layer.input_layernorm, [attn.q_proj, attn.k_proj, attn.v_proj]),
                              (layer.post_attention_layernorm, [mlp.gate_proj, mlp.up_proj])):
            s = scales(act_max[id(linears[0])], linears)
            norm.weight.div_(s.to(norm.weight.dtype))
            for lin in linears:
                lin.weight.mul_(s.to(lin.weight.dtype)[None, :])
            groups += 1
        s = scales(act_max[id(mlp.down_proj)], [mlp.down_proj])
        mlp.up_proj.weight.div_(s.to(mlp.up_proj.weight.dtype)[:, None])
        if mlp.up_proj.bias is not None:
            mlp.up_proj.bias.div_(s.to(mlp.up_proj.bias.dtype))
        mlp.down_proj.weight.mul_(s.to(mlp.down_proj.weight.dtype)[None, :])
        groups += 1
    # a norm that is not ``weight * x / rms(x)`` (Gemma's ``1 + weight``, say) would make this another
    # function: then the model is put back as it was and nothing is smoothed
    after = model(**probe).logits
    if not torch.allclose(after, before, rtol=1e-3, atol=1e-3 * before.abs().max().item()):
        model.load_state_dict(saved)
        return 0
    return groups


def _has(module, dotted: str) -> bool:
    for part in dotted.split("."):
        module = getattr(module, part, None)
        if module is None:
            return False
    return True


def _plain_buffers(model):
    """Buffers stored as they are: not the rotary tables (rebuilt from the config), not an int8 layer's
    own (stored as ``qweight``/``scale``/``bias``)."""
    int8 = {n for n, m in model.named_modules() if isinstance(m, Int8Linear)}
    for name, b in model.named_buffers():
        if not name.endswith("inv_freq") and name.rpartition(".")[0] not in int8:
            yield name, b


def _linear_names(model) -> list[str]:
    return [name for name, mod in model.named_modules() if isinstance(mod, torch.nn.Linear)]


@torch.no_grad()
def quantize(model, calibration: list[dict] | None = None, alpha: float = 0.5) -> tuple[object, dict[str, torch.Tensor], dict]:
    """Quantise ``model`` in place, smoothed first (:func:`smooth`) when ``calibration`` batches are given:
    returns (the served model, the tensors to store, the description for ``quantization.json``)."""
    smoothed = smooth(model, calibration, alpha) if calibration else 0
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
        model.set_submodule(name, Int8Linear(q, scale, lin.bias))
    emb_name = next(n for n, m in model.named_modules() if m is emb)
    q, scale = quantize_weight(emb.weight)
    tensors[f"{emb_name}.qweight"], tensors[f"{emb_name}.scale"] = q, scale
    emb.weight.data = q.to(torch.float32) * scale[:, None]
    for name, p in model.named_parameters():
        if name != f"{emb_name}.weight":
            tensors[name] = p.detach().to(torch.float32).contiguous()
    for name, b in _plain_buffers(model):
        if name not in tensors:
            tensors[name] = b.detach().contiguous()
    info = {"method": METHOD, "weights": WEIGHTS, "linear": names, "embedding": emb_name,
            "smoothquant": {"alpha": alpha, "groups": smoothed} if smoothed else None,
            "description": "int8 weights, symmetric per output channel; activations quantised to int8 per token "
                           "at run time, int32 accumulation; the embedding is int8 per row, float32 once loaded"}
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
    if info.get("method") != METHOD and info.get("method") not in LEGACY_METHODS:
        raise ValueError(f"{path}: unknown quantization method {info.get('method')!r} (this version reads {METHOD})")
    tensors = load_file(str(path / info["weights"]))
    config = AutoConfig.from_pretrained(path, local_files_only=True)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    for name in info["linear"]:
        model.set_submodule(name, Int8Linear(tensors.pop(f"{name}.qweight"), tensors.pop(f"{name}.scale"),
                                              tensors.pop(f"{name}.bias", None)))
    emb = info["embedding"]
    q, scale = tensors.pop(f"{emb}.qweight"), tensors.pop(f"{emb}.scale")
    tensors[f"{emb}.weight"] = q.to(torch.float32) * scale[:, None]
    # plain float tensors are copied in one by one: load_state_dict would walk into the int8 modules,
    # which expect their own serialisation
    wanted = {n for n, _ in model.named_parameters()} | {n for n, _ in _plain_buffers(model)}
    unexpected = sorted(set(tensors) - wanted)
    missing = sorted(wanted - set(tensors))
    if missing or unexpected:
        raise ValueError(f"{path}: the int8 checkpoint does not match its config (missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]})")
    for name, value in tensors.items():
        module, _, attr = name.rpartition(".")
        getattr(model.get_submodule(module), attr).copy_(value)
    return model.eval()


@torch.no_grad()
def dequantize(model):
    """``model`` (as :func:`load_int8` serves it) with every :class:`Int8Linear` turned back into a float32
    ``nn.Linear`` holding exactly the weights the int8 model computes with (int8 value x scale): a model
    that can be trained again, then quantised again (Dream fine-tunes an int8 candidate that way)."""
    for name, mod in list(model.named_modules()):
        if isinstance(mod, Int8Linear):
            lin = torch.nn.Linear(mod.in_features, mod.out_features, bias=mod.bias_value is not None)
            lin.weight.copy_(mod.qweight.to(torch.float32) * mod.scale[:, None])
            if mod.bias_value is not None:
                lin.bias.copy_(mod.bias_value)
            model.set_submodule(name, lin)
    return model
