"""Importing a pretrained model (a GGUF file or a Hugging Face directory) as a candidate; the SmolLM2 profile."""

import json
import os
from pathlib import Path

import pytest

from sleep_pipeline import cli
from sleep_pipeline.candidates import list_candidates
from sleep_pipeline.checkpoint import verify_checkpoint
from sleep_pipeline.importer import default_name, import_model
from sleep_pipeline.train.modeling import load_pretrained, load_tokenizer
from tests.conftest import ROOT
from tests.test_train import CHATML_TEMPLATE, tiny_model_dir

ROWS = [{"prompt": f"What is {a} plus {b}?", "response": f"{a} plus {b} is {a + b}."} for a in range(10) for b in range(10)]
SMOLLM2 = "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory) -> Path:
    """A tiny Llama with a ChatML tokenizer (chat template without generation markers)."""
    return tiny_model_dir(tmp_path_factory.mktemp("src") / "tiny-chat", ROWS, CHATML_TEMPLATE)


def write_gguf(model_dir: Path, out: Path) -> Path:
    """``model_dir`` (a tiny Llama, GPT-2 style BPE) as an f32 GGUF file laid out the way llama.cpp writes it."""
    import gguf
    import numpy as np
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, tok = AutoModelForCausalLM.from_pretrained(model_dir), AutoTokenizer.from_pretrained(model_dir)
    cfg = model.config
    w = gguf.GGUFWriter(str(out), "llama")
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    w.add_vocab_size(cfg.vocab_size)
    w.add_tokenizer_model("gpt2")
    tokens = [t for t, _ in sorted(tok.get_vocab().items(), key=lambda kv: kv[1])]
    w.add_token_list(tokens)
    w.add_token_types([3 if t in tok.all_special_tokens else 1 for t in tokens])
    merges = json.loads(tok.backend_tokenizer.to_str())["model"]["merges"]
    w.add_token_merges([" ".join(m) if isinstance(m, list) else m for m in merges])
    w.add_bos_token_id(tok.bos_token_id)
    w.add_eos_token_id(tok.eos_token_id)
    w.add_pad_token_id(tok.pad_token_id)
    w.add_chat_template(tok.chat_template)

    def permute(t, heads):  # llama.cpp's rotary layout of q and k
        return t.reshape(heads, 2, t.shape[0] // heads // 2, *t.shape[1:]).swapaxes(1, 2).reshape(t.shape)

    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight"}
    for i in range(cfg.num_hidden_layers):
        for hf, gg in [("input_layernorm", "attn_norm"), ("self_attn.q_proj", "attn_q"), ("self_attn.k_proj", "attn_k"),
                       ("self_attn.v_proj", "attn_v"), ("self_attn.o_proj", "attn_output"),
                       ("post_attention_layernorm", "ffn_norm"), ("mlp.gate_proj", "ffn_gate"),
                       ("mlp.up_proj", "ffn_up"), ("mlp.down_proj", "ffn_down")]:
            names[f"model.layers.{i}.{hf}.weight"] = f"blk.{i}.{gg}.weight"
    state = model.state_dict()
    for hf, gg in names.items():
        t = state[hf].numpy().astype(np.float32)
        if gg.endswith("attn_q.weight"):
            t = permute(t, cfg.num_attention_heads)
        elif gg.endswith("attn_k.weight"):
            t = permute(t, cfg.num_key_value_heads)
        w.add_tensor(gg, t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out


def _artefacts(home: Path) -> list[str]:
    models = home / "models"
    return sorted(str(p.relative_to(models)) for p in models.rglob("*")) if models.exists() else []


def test_default_names():
    assert default_name(Path(SMOLLM2)) == "smollm2-135m-instruct"
    assert default_name(Path("Qwen2.5-0.5B-Instruct-f16.gguf")) == "qwen2.5-0.5b-instruct"
    assert default_name(Path("/models/My Model")) == "my-model"


def test_a_gguf_file_becomes_an_import_candidate_with_the_same_weights(tmp_path, hf_dir):
    import torch

    src = write_gguf(hf_dir, tmp_path / "Tiny-Chat.Q8_0.gguf")
    home = tmp_path / "home"
    res = import_model(src, home / "sleep.duckdb", home / "models")
    cand = res.candidate
    assert res.created and cand.phase == "import" and cand.parents == () and cand.status == "candidate"
    assert cand.base_model.startswith("Tiny-Chat.Q8_0.gguf sha256:") and len(cand.base_model.split(":")[1]) == 64
    manifest = verify_checkpoint(Path(cand.path), reload=load_pretrained)
    assert manifest["checkpoint_sha256"] == cand.candidate_id and manifest["source_format"] == "gguf"
    assert not any(Path(name).suffix in (".bin", ".pt", ".pkl") for name in manifest["files"])
    # the stable alias a recipe names: {storage}/models/tiny-chat
    assert res.alias == home / "models" / "tiny-chat" and res.alias.resolve() == Path(cand.path)
    imported, original = load_pretrained(res.alias), load_pretrained(hf_dir)
    assert all(torch.equal(imported.state_dict()[k], v) for k, v in original.state_dict().items())
    tok = load_tokenizer(res.alias)
    assert tok.chat_template == CHATML_TEMPLATE  # the model's own template, kept
    assert tok("What is 3 plus 4?")["input_ids"] == load_tokenizer(hf_dir)("What is 3 plus 4?")["input_ids"]

    again = import_model(src, home / "sleep.duckdb", home / "models")
    assert not again.created and again.candidate.candidate_id == cand.candidate_id
    assert len(list_candidates(home / "sleep.duckdb")) == 1 and len(list((home / "models" / "imported").iterdir())) == 1


def test_import_command_on_a_model_directory(tmp_path, hf_dir, capsys):
    home = tmp_path / "home"
    assert cli.main(["import", str(hf_dir), "--home", str(home), "--quiet", "--name", "tiny"]) == 0
    out = capsys.readouterr().out
    [cand] = list_candidates(home / "sleep.duckdb")
    assert f"candidate: {cand.candidate_id}" in out and f"path: {cand.path}" in out
    assert cand.phase == "import" and cand.base_model.startswith("tiny-chat sha256:")
    assert (home / "models" / "tiny").resolve() == Path(cand.path)
    verify_checkpoint(Path(cand.path), reload=load_pretrained)
    assert load_tokenizer(Path(cand.path)).chat_template == CHATML_TEMPLATE

    assert cli.main(["import", str(hf_dir), "--home", str(home), "--quiet", "--name", "tiny"]) == 0
    assert "already imported, nothing written" in capsys.readouterr().out
    assert len(list_candidates(home / "sleep.duckdb")) == 1


def test_bad_sources_are_clear_errors_and_leave_nothing_behind(tmp_path, hf_dir, capsys):
    import shutil

    home = tmp_path / "home"
    (tmp_path / "empty").mkdir()
    pickled = tmp_path / "pickled"
    shutil.copytree(hf_dir, pickled)
    (pickled / "model.safetensors").unlink()
    (pickled / "pytorch_model.bin").write_bytes(b"\x80\x04pickle")
    (tmp_path / "corrupt.gguf").write_bytes(b"GGUF" + b"\x03\x00\x00\x00" + os.urandom(2000))
    (tmp_path / "not-gguf.gguf").write_bytes(b"PK\x03\x04 a zip, not a model")
    two = tmp_path / "two"
    two.mkdir()
    for name in ("a.gguf", "b.gguf"):
        (two / name).write_bytes(b"GGUF")
    for argv, message in [
        ([str(tmp_path / "missing")], "no such file or directory"),
        ([str(tmp_path / "empty")], "is not a model directory (no config.json and no .gguf file)"),
        ([str(pickled)], "holds only pickle-based weights (pytorch_model.bin)"),
        ([str(tmp_path / "corrupt.gguf")], "as a GGUF model (a corrupt or truncated file"),
        ([str(tmp_path / "not-gguf.gguf")], "is not a GGUF file"),
        ([str(two)], "choose one with --gguf-file"),
        ([str(two), "--gguf-file", "c.gguf"], "no such GGUF file"),
    ]:
        assert cli.main(["import", *argv, "--home", str(home), "--quiet"]) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("sleep-pipeline: error: ") and message in err, (argv, err)
        assert "Traceback" not in err
        assert [a for a in _artefacts(home) if a != "imported"] == [], (argv, _artefacts(home))
    assert not (home / "sleep.duckdb").exists() or list_candidates(home / "sleep.duckdb") == []


def test_smollm2_profile_names_the_imported_model_through_the_storage_dir(tmp_path, hf_dir, monkeypatch):
    from sleep_pipeline.config import load_data_recipe
    from sleep_pipeline.gate.decide import load_gate_recipe
    from sleep_pipeline.recipe_checks import RecipeError
    from sleep_pipeline.train.recipe import load_train_recipe

    profile = ROOT / "recipes" / "smollm2"
    home = tmp_path / "home"
    monkeypatch.setenv("SLEEP_PIPELINE_HOME", str(home))
    with pytest.raises(RecipeError, match=r"model\.path: .*smollm2-135m-instruct .*sleep-pipeline import"):
        load_train_recipe(profile / "learn.yaml")
    res = import_model(hf_dir, home / "sleep.duckdb", home / "models", name="smollm2-135m-instruct")
    recipe = load_train_recipe(profile / "learn.yaml")
    assert recipe.model.path == Path(res.candidate.path)  # the alias, resolved to the candidate
    assert recipe.lora.enabled and recipe.lora.r == 16 and len(recipe.lora.target_modules) == 7
    assert recipe.training.precision == "fp32" and recipe.training.max_seq_len == 512
    monkeypatch.delenv("SLEEP_PIPELINE_HOME")
    assert load_train_recipe(profile / "learn.yaml", storage_dir=home).model.path == recipe.model.path
    load_data_recipe(profile, home)
    load_gate_recipe(profile / "gate.yaml")


# ------------------------------------------------------------------------------- the real model
def _smollm2_file() -> Path:
    home = Path(os.environ.get("SLEEP_PIPELINE_HOME") or ROOT / ".sleep_pipeline")
    return home / "models" / "gguf" / SMOLLM2


@pytest.mark.slow
@pytest.mark.skipif(not _smollm2_file().is_file(), reason=f"no {SMOLLM2} (fetch it with scripts/get_smollm2.sh)")
def test_smollm2_imports_and_answers(tmp_path):
    from sleep_pipeline.gate.evaluate import load_for_eval

    home = tmp_path / "home"
    res = import_model(_smollm2_file(), home / "sleep.duckdb", home / "models")
    cand = res.candidate
    assert cand.phase == "import" and cand.parents == () and cand.base_model.startswith(f"{SMOLLM2} sha256:")
    manifest = verify_checkpoint(Path(cand.path), reload=load_pretrained)
    assert manifest["parameters"] == 134_515_008 and "model.safetensors" in manifest["files"]
    model, tok = load_for_eval(res.alias)
    assert "<|im_start|>" in tok.chat_template
    enc = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                  add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**enc, max_new_tokens=24, do_sample=False)
    answer = tok.decode(out[0][enc["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer, answer
