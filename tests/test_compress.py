"""Compress: structured pruning, int8 storage, LoRA merge behind an A/B check, the red lines and the
Pareto front, and distillation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from sleep_pipeline.compress import pareto, prune as pruning, quantize
from sleep_pipeline.compress.distil import build_trainer, mean_kl
from sleep_pipeline.compress.merge import merge_adapters
from sleep_pipeline.train.modeling import completion_tensors, train_tokenizer
from sleep_pipeline.train.recipe import TokenizerSpec

ROWS = [{"prompt": f"What is {a} plus {b}?", "response": f"{a} plus {b} is {a + b}."} for a in range(12) for b in range(4)]


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer((f"{r['prompt']} {r['response']}" for r in ROWS), TokenizerSpec(vocab_size=400, min_frequency=1))


def tiny_llama(tokenizer, heads: int = 6, kv_heads: int = 2, seed: int = 0, layers: int = 2):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=96, intermediate_size=256, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=256,
                      tie_word_embeddings=True, pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                      eos_token_id=tokenizer.eos_token_id)
    return LlamaForCausalLM(cfg).eval()


def batches(tokenizer, rows=ROWS, size: int = 8):
    return [completion_tensors(tokenizer, rows[i:i + size], 64) for i in range(0, len(rows), size)]


def dir_mb(path: Path) -> float:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) / 2**20


def greedy(model, tokenizer, prompt: str = "What is 3 plus 2?", tokens: int = 12) -> list[int]:
    text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True)
    enc = tokenizer(text, return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        out = model.generate(**enc, do_sample=False, max_new_tokens=tokens, min_new_tokens=tokens,
                             pad_token_id=tokenizer.pad_token_id)
    return out[0, enc["input_ids"].shape[1]:].tolist()


@pytest.mark.parametrize("heads,kv_heads", [(6, 2), (6, 6)])
def test_pruning_reaches_the_target_and_the_saved_model_is_smaller_and_loads(tmp_path, tokenizer, heads, kv_heads):
    from transformers import AutoModelForCausalLM

    model = tiny_llama(tokenizer, heads, kv_heads)
    res = pruning.prune(model, batches(tokenizer)[:2], mlp_keep=0.5, heads_keep=0.67)
    assert res.intermediate_size == (256, 128)
    assert res.attention_heads == (heads, 4)
    assert res.key_value_heads == (kv_heads, 2 if kv_heads == 2 else 4)  # MHA loses whole heads
    assert res.parameters[1] < 0.75 * res.parameters[0]
    model.save_pretrained(tmp_path / "full")
    res.model.save_pretrained(tmp_path / "pruned")
    assert dir_mb(tmp_path / "pruned") < 0.75 * dir_mb(tmp_path / "full")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "pruned")
    assert loaded.config.intermediate_size == 128 and loaded.config.num_attention_heads == 4
    assert not any((p == 0).all() for p in loaded.parameters())  # genuinely smaller, no zeroed tensors
    ids = batches(tokenizer)[0]
    with torch.no_grad():
        assert torch.allclose(loaded(**ids).logits, res.model(**ids).logits, atol=1e-5)


def test_pruning_keeps_the_most_important_units(tokenizer):
    """Keeping everything is the identity; the units kept are the ones that carry the most."""
    model = tiny_llama(tokenizer)
    ids = batches(tokenizer)[0]
    same = pruning.prune(model, [ids], 1.0, 1.0).model
    with torch.no_grad():
        assert torch.equal(same(**ids).logits, model(**ids).logits)
    # silence neurons 0..127 of every layer: they must be the ones pruned away
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.down_proj.weight[:, :128] = 0.0
    small = pruning.prune(model, [ids], 0.5, 1.0).model
    with torch.no_grad():
        assert torch.allclose(small(**ids).logits, model(**ids).logits, atol=1e-5)


def test_int8_checkpoint_loads_from_safetensors_and_generates_the_same_greedy_text(tmp_path, tokenizer):
    from transformers import AutoModelForCausalLM

    from sleep_pipeline.gate.evaluate import load_for_eval

    from sleep_pipeline.compress.cost import served_parameters

    model = tiny_llama(tokenizer)
    model.save_pretrained(tmp_path / "float")
    float_params, head = served_parameters(model), model.lm_head.weight.numel()
    served, tensors, info = quantize.quantize(model)
    before = greedy(served, tokenizer)
    quantize.save_int8(served, tokenizer, tensors, info, tmp_path / "int8")
    names = sorted(p.name for p in (tmp_path / "int8").iterdir())
    assert quantize.WEIGHTS in names and not any(n.endswith((".bin", ".pt", ".pkl")) for n in names)
    loaded, tok = load_for_eval(tmp_path / "int8")  # the gate's loader serves it on int8 kernels
    assert greedy(loaded, tok) == before
    assert any(isinstance(m, quantize.Int8Linear) for m in loaded.modules())
    assert served_parameters(loaded) == float_params + head  # every weight counted; the LM head is untied now
    assert dir_mb(tmp_path / "int8") < 0.45 * dir_mb(tmp_path / "float")
    with pytest.raises(OSError):  # a plain loader fails loudly instead of building a random model
        AutoModelForCausalLM.from_pretrained(tmp_path / "int8")


def test_int8_activations_are_scaled_per_token_so_one_loud_row_does_not_ruin_the_others():
    # one scale for the whole input (PyTorch's dynamic int8 Linear) leaves the quiet rows of a batch a
    # few quantisation levels when another row is loud: a batched prefill or a batch of prompts
    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 32)
    x = torch.randn(4, 64)
    x[0] *= 200.0
    q, scale = quantize.quantize_weight(lin.weight)
    layer = quantize.Int8Linear(q, scale, lin.bias)
    ref = lin(x).detach()
    quiet_err = ((layer(x)[1:] - ref[1:]).norm() / ref[1:].norm()).item()
    assert quiet_err < 0.03
    for i in range(4):  # the single-row kernel gives what the batched one gives for that row
        assert torch.allclose(layer(x[i:i + 1]), layer(x)[i:i + 1], rtol=0.03, atol=0.03 * ref[i].abs().max().item())
    import copy
    import pickle

    assert torch.equal(copy.deepcopy(layer)(x), layer(x)) and torch.equal(pickle.loads(pickle.dumps(layer))(x), layer(x))
    # its tensors are buffers, so moving the model to a GPU moves them; the state dict stays empty (the
    # checkpoint stores them under quantize's own names)
    assert {n for n, _ in layer.named_buffers()} == {"qweight", "scale", "bias_value"} and not layer.state_dict()


def test_smoothing_keeps_the_float_model_and_helps_its_int8_form(tokenizer):
    import copy

    model = tiny_llama(tokenizer, seed=3)
    with torch.no_grad():  # an outlier channel, as real language models have in their normed activations
        for layer in model.model.layers:
            layer.input_layernorm.weight[5] = 40.0
            layer.post_attention_layernorm.weight[7] = 40.0
    calib, evalb = batches(tokenizer, ROWS[:16]), batches(tokenizer, ROWS[16:])
    with torch.no_grad():
        ref = [model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits for b in evalb]

    def error(m) -> float:
        with torch.no_grad():
            out = [m(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits for b in evalb]
        return sum((o - r).norm().item() for o, r in zip(out, ref)) / sum(r.norm().item() for r in ref)

    smoothed = copy.deepcopy(model)
    assert quantize.smooth(smoothed, calib, alpha=0.5) == 3 * len(model.model.layers)
    assert error(smoothed) < 1e-4  # the same function in float
    plain_int8 = quantize.quantize(copy.deepcopy(model))[0]
    smooth_int8, _, info = quantize.quantize(copy.deepcopy(model), calibration=calib, alpha=0.5)
    assert info["smoothquant"] == {"alpha": 0.5, "groups": 3 * len(model.model.layers)}
    assert error(smooth_int8) < 0.7 * error(plain_int8)


def test_training_refuses_to_start_from_an_int8_checkpoint(tmp_path, tokenizer):
    from sleep_pipeline.train.modeling import load_pretrained

    served, tensors, info = quantize.quantize(tiny_llama(tokenizer))
    quantize.save_int8(served, tokenizer, tensors, info, tmp_path)
    with pytest.raises(ValueError, match="int8 checkpoint"):
        load_pretrained(tmp_path)


def _adapter(base, path: Path, scale: float, seed: int) -> Path:
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    peft_model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, scale)
    peft_model.save_pretrained(path)
    return path


def test_a_merge_that_regresses_is_skipped_and_the_others_are_exact(tmp_path, tokenizer):
    from peft import PeftModel

    base = tiny_llama(tokenizer)
    good = _adapter(tiny_llama(tokenizer), tmp_path / "good", 1e-3, 1)
    bad = _adapter(tiny_llama(tokenizer), tmp_path / "bad", 5.0, 2)
    probe = batches(tokenizer)[0]
    with torch.no_grad():
        reference = base(**probe).logits.argmax(-1)

    def score(model):  # share of next-token choices the base model would make: wrecked by the bad adapter
        with torch.no_grad():
            return {"agreement": float((model(**probe).logits.argmax(-1) == reference).float().mean())}

    before = {k: v.clone() for k, v in base.state_dict().items()}
    result = merge_adapters(base, [good, bad], score, max_drop=0.05)
    assert result.merged == [str(good)] and result.skipped == [str(bad)]
    assert "agreement" in result.steps[1].reason
    assert all(torch.equal(before[k], v) for k, v in base.state_dict().items())  # the base is untouched
    expected = PeftModel.from_pretrained(tiny_llama(tokenizer), str(good)).merge_and_unload()
    for k, v in expected.state_dict().items():
        assert torch.allclose(result.model.state_dict()[k], v, atol=1e-6)


def point(kind, capability, cost, reasoning=0.5, diversity=0.8, cid=None):
    groups = {"capability": capability, "reasoning": reasoning, "diversity": diversity}
    return pareto.Point(cid or kind, kind, capability, cost, groups, {})


def test_pareto_front_of_a_hand_made_table():
    pts = [point("parent", 0.60, 10.0), point("a", 0.58, 5.0), point("b", 0.50, 6.0), point("c", 0.40, 2.0),
           point("d", 0.60, 10.0, cid="d"), point("e", 0.30, 3.0)]
    assert sorted(p.kind for p in pareto.front(pts)) == ["a", "c", "d", "parent"]


def test_the_red_line_rejects_a_candidate_that_drops_reasoning_too_far():
    parent = point("parent", 0.60, 10.0, reasoning=0.50)
    cheap = point("int8", 0.59, 4.0, reasoning=0.40)  # cheapest, but reasoning fell by 0.10
    ok = point("pruned", 0.58, 6.0, reasoning=0.48)
    chosen = pareto.select([parent, cheap, ok], {"reasoning": 0.05, "capability": 0.05})
    assert chosen is ok and not cheap.within_red_lines and "reasoning 0.500 -> 0.400" in cheap.verdict
    # nothing within the red lines: the parent passes through, and the record says why
    parent2, cheap2 = point("parent", 0.60, 10.0, reasoning=0.50), point("int8", 0.59, 4.0, reasoning=0.40)
    assert pareto.select([parent2, cheap2], {"reasoning": 0.05}) is parent2
    assert "passed through uncompressed" in parent2.verdict and "red line" in parent2.verdict


def test_red_lines_protect_diversity():
    parent = point("parent", 0.60, 10.0, diversity=0.80)
    repetitive = point("pruned", 0.60, 5.0, diversity=0.60)
    assert pareto.select([parent, repetitive], {"diversity": 0.05}) is parent
    assert "diversity" in repetitive.verdict


def test_distillation_lowers_the_kl_to_the_teacher(tmp_path, tokenizer):
    from transformers import AutoModelForCausalLM

    teacher = tiny_llama(tokenizer, seed=1)
    student_full = tiny_llama(tokenizer, seed=2)
    student = pruning.prune(student_full, batches(tokenizer)[:1], 0.5, 0.67).model
    held = batches(tokenizer, ROWS[::5])
    before = mean_kl(student, teacher, held)
    args = dict(output_dir=str(tmp_path / "out"), max_steps=40, per_device_train_batch_size=8, learning_rate=3e-3,
                use_cpu=True, report_to=[], save_strategy="no", logging_steps=100, disable_tqdm=True, seed=0)
    trainer = build_trainer(student, teacher, tokenizer, ROWS, [], args, 64, temperature=2.0, kl_weight=1.0)
    trainer.train()
    after = mean_kl(student.eval(), teacher, held)
    assert after < 0.6 * before, (before, after)
    student.save_pretrained(tmp_path / "student")
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "student").config.intermediate_size == 128


def test_red_line_recipe_is_validated(tmp_path):
    from sleep_pipeline.compress.recipe import load_compress_recipe
    from sleep_pipeline.recipe_checks import RecipeError

    shipped = Path(__file__).resolve().parents[1] / "recipes"
    recipe = load_compress_recipe(shipped / "compress.yaml")
    assert recipe.red_lines["reasoning"] > 0 and recipe.distil.recipe.is_file()
    bad = json.loads(json.dumps({"red_lines": {"creativity": 0.1}, "distil": {"enabled": False},
                                 "quantize": {"sources": ["parent"]}}))
    (tmp_path / "compress.yaml").write_text(json.dumps(bad))
    with pytest.raises(RecipeError, match="red_lines.creativity"):
        load_compress_recipe(tmp_path / "compress.yaml")
    bad = {"distil": {"enabled": False}, "quantize": {"sources": ["parent"], "smooth_alpha": 1.5}}
    (tmp_path / "compress.yaml").write_text(json.dumps(bad))
    with pytest.raises(RecipeError, match="quantize.smooth_alpha"):
        load_compress_recipe(tmp_path / "compress.yaml")
    smol = load_compress_recipe(shipped / "smollm2" / "compress.yaml")
    assert smol.quantize.smooth_alpha > 0 and smol.quantize.sources == ("parent",)


def test_head_plan_keeps_a_config_transformers_accepts(tokenizer):
    """transformers refuses a Llama config whose hidden size is not a multiple of the head count: the
    plan takes the nearest count that divides it, the same in every key/value group."""
    assert pruning.head_plan(4, 4, 64, 0.67) == (2, 2)  # 3 heads would not divide 64
    assert pruning.head_plan(9, 3, 576, 0.67) == (6, 3)  # SmolLM2: 2 of the 3 query heads per group
    assert pruning.head_plan(6, 6, 192, 0.67) == (4, 4)
    assert pruning.head_plan(7, 7, 70, 0.5) == (5, 5)  # 3.5 heads: 5 divides 70, 3 and 4 do not
    small = pruning.prune(tiny_llama(tokenizer, heads=4, kv_heads=4), batches(tokenizer)[:1], 0.5, 0.5).model
    assert small.config.num_attention_heads == 2 and small.config.hidden_size % 2 == 0


def test_a_tied_lm_head_is_stored_once(tmp_path, tokenizer):
    """The trainer's save under DeepSpeed wrote the tied embedding twice (a Learn checkpoint looked 18%
    bigger than its pruned child for nothing); publishing stores it once and the model loads the same."""
    from safetensors import safe_open
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    from sleep_pipeline.train.runtime import drop_tied_copy

    model = tiny_llama(tokenizer)
    model.config.save_pretrained(tmp_path)
    save_file({k: v.clone().contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "model.safetensors"),
              metadata={"format": "pt"})
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as fh:
        assert "lm_head.weight" in fh.keys()
    before = dir_mb(tmp_path)
    assert drop_tied_copy(tmp_path)
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as fh:
        assert "lm_head.weight" not in fh.keys()
    assert dir_mb(tmp_path) < before
    ids = batches(tokenizer)[0]
    with torch.no_grad():
        assert torch.equal(AutoModelForCausalLM.from_pretrained(tmp_path)(**ids).logits, model(**ids).logits)


def test_peak_memory_is_the_measured_process_own_not_its_parents():
    # getrusage's ru_maxrss survives exec on Linux: a cost process started by a large benchmark or Dagster
    # run reported the parent's peak (4.8 GB for every SmolLM2 candidate) instead of the model's (~1 GB)
    import subprocess
    import sys

    big = bytearray(600 * 2**20)
    big[:: 4096] = b"\x01" * len(big[:: 4096])  # touch every page: resident, not just reserved
    out = subprocess.run([sys.executable, "-c", "from sleep_pipeline.compress.cost import peak_rss_mb; print(peak_rss_mb())"],
                         capture_output=True, text=True, check=True, cwd=Path(__file__).resolve().parents[1])
    assert float(out.stdout) < 300
    del big
