"""Device check of the Learn SFT worker and the Dream (DPO + SFT) worker: each trains a few steps under the
real ``deepspeed`` launcher (one CUDA rank in bf16; with ``--cpu`` two CPU ranks in fp32 at tiny sizes)
from SmolLM2-135M's architecture, randomly initialised from its config and tokenizer (``--model-files``,
no weights), on generated chat rows of realistic length, and ``OUT/gpu_check.json`` says whether each
passed, what its published checkpoint records, its warm tokens/s and its MFU.

    bash scripts/gpu_check.sh                                # GPU machine: installs .whl/, reads .gpu/smollm2/
    .venv/bin/python scripts/gpu_check.py --cpu --out DIR    # the same path on CPU ranks
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PEAK_DENSE_BF16 = 989e12     # H200 datasheet, dense bf16
PEAK_MEASURED_BF16 = 790e12  # bf16 matmul peak measured on the H200 machine
CPU_SHRINK = {"num_hidden_layers": 2, "hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4,
              "num_key_value_heads": 2, "head_dim": 16}
SYSTEMS = ["You are a concise assistant.", "Answer carefully and cite the steps you took.",
           "You are a helpful assistant for a small company."]
BUCKETS = ["benign", "long_context", "reasoning", "tool_use"]

T0 = time.monotonic()
REPORT: dict = {"started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "ok": False, "errors": []}
OUT: Path | None = None
RUNNING: list[subprocess.Popen] = []  # the launcher of the worker running now, ended on SIGTERM


def say(msg: str) -> None:
    print(f"[gpu_check {time.monotonic() - T0:6.1f}s] {msg}", flush=True)


def save_report() -> None:
    """Rewritten after every step (atomically), so a crash or a timeout still leaves what was measured."""
    REPORT["elapsed_s"] = round(time.monotonic() - T0, 1)
    if OUT is not None:
        tmp = OUT / "gpu_check.json.tmp"
        tmp.write_text(json.dumps(REPORT, indent=2, default=str))
        os.replace(tmp, OUT / "gpu_check.json")


def settings(args) -> dict:
    if args.cpu:
        return {"accelerator": "cpu", "ranks": 2, "precision": "fp32", "max_seq_len": 128, "logging_steps": 1,
                "worker_timeout_s": args.worker_timeout or 900,
                "sft": {"steps": args.sft_steps or 4, "micro": args.sft_micro or 2, "train": 48, "val": 8,
                        "prompt_words": (10, 30), "response_words": (15, 40)},
                "dpo": {"steps": args.dpo_steps or 3, "micro": args.dpo_micro or 2, "pairs": 16, "sft_rows": 6,
                        "val": 4, "prompt_words": (8, 25), "response_words": (10, 30), "rejected_words": (10, 30)}}
    return {"accelerator": "cuda", "ranks": 1, "precision": "bf16", "max_seq_len": 512, "logging_steps": 5,
            "worker_timeout_s": args.worker_timeout or 240,
            "sft": {"steps": args.sft_steps or 60, "micro": args.sft_micro or 32, "train": 2400, "val": 64,
                    "prompt_words": (50, 150), "response_words": (120, 250)},
            "dpo": {"steps": args.dpo_steps or 30, "micro": args.dpo_micro or 16, "pairs": 400, "sft_rows": 100,
                    "val": 32, "prompt_words": (40, 130), "response_words": (100, 210), "rejected_words": (80, 210)}}


# --------------------------------------------------------------------------------- model directory
def stand_in_model_files(dest: Path) -> Path:
    """Where SmolLM2's files are absent (CI): recipes/model/tiny.yaml's Llama config and a byte-level BPE
    tokenizer trained on made-up words, so the generated data still has whole-word tokens to draw from."""
    import yaml

    from sleep_pipeline.train.modeling import build_model, train_tokenizer
    from sleep_pipeline.train.recipe import ModelSpec, TokenizerSpec

    rng = random.Random(0)
    syllables = [c + v for c in "bdfghklmnprstvz" for v in "aeiou"]
    words = sorted({"".join(rng.choices(syllables, k=rng.randint(2, 4))) for _ in range(200)})
    texts = [" ".join(rng.choices(words, k=12)) for _ in range(2000)]
    tokenizer = train_tokenizer(texts, TokenizerSpec(vocab_size=2048, min_frequency=2))
    config = yaml.safe_load((ROOT / "recipes" / "model" / "tiny.yaml").read_text())
    build_model(ModelSpec(config=config), tokenizer, seed=0).config.save_pretrained(dest)
    tokenizer.save_pretrained(dest)
    return dest


def build_model_dir(files: Path, dest: Path, shrink: bool) -> dict:
    """The config in ``files`` randomly initialised (seeded), saved with its tokenizer and chat template."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    config = AutoConfig.from_pretrained(files, local_files_only=True)
    if shrink:
        for key, value in CPU_SHRINK.items():
            setattr(config, key, value)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(dest)
    AutoTokenizer.from_pretrained(files, local_files_only=True).save_pretrained(dest)
    for name in ("chat_template.jinja", "generation_config.json"):
        if (files / name).exists() and not (dest / name).exists():
            shutil.copy(files / name, dest / name)
    # the workers keep a model's own template; without one they would train on the project's instead
    assert AutoTokenizer.from_pretrained(dest, local_files_only=True).chat_template, "no chat template saved"
    return {"path": str(dest), "files": str(files), "shrunk_for_cpu": shrink,
            "parameters": sum(p.numel() for p in model.parameters()),  # the tied embedding once: one matmul
            "layers": config.num_hidden_layers, "hidden_size": config.hidden_size,
            "heads": config.num_attention_heads, "kv_heads": config.num_key_value_heads,
            "intermediate_size": config.intermediate_size, "vocab_size": config.vocab_size,
            "tie_word_embeddings": config.tie_word_embeddings}


# --------------------------------------------------------------------------------------------- data
def word_pool(tokenizer) -> list[str]:
    """The vocabulary's whole-word tokens (a space, then 3-10 lowercase ASCII letters): one token a word,
    so a row's length in words is its length in tokens."""
    return sorted(t[1:] for t in tokenizer.get_vocab()
                  if t.startswith("\u0120") and 3 <= len(t) - 1 <= 10 and t[1:].isascii() and t[1:].isalpha()
                  and t[1:].islower())


def text(rng: random.Random, words: list[str], lo_hi: tuple[int, int]) -> str:
    """Sentences of 8-16 random words: meaningless, but with the length and shape of real answers."""
    left, sentences = rng.randint(*lo_hi), []
    while left > 0:
        n = min(left, rng.randint(8, 16))
        sentences.append(" ".join(rng.choices(words, k=n)).capitalize() + ".")
        left -= n
    return " ".join(sentences)


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def length_stats(tokenizer, rows: list[dict], answer: str = "response") -> dict:
    """Templated token lengths of rows with ``answer`` as the assistant turn."""
    from sleep_pipeline.train.modeling import row_messages

    xs = sorted(len(tokenizer(tokenizer.apply_chat_template(row_messages({**r, "response": r[answer]}), tokenize=False),
                              add_special_tokens=False)["input_ids"]) for r in rows)
    return {"n": len(xs), "min": xs[0], "mean": round(sum(xs) / len(xs), 1), "max": xs[-1]} if xs else {"n": 0}


def make_data(model_dir: Path, work: Path, cfg: dict) -> dict:
    """SFT train/validation rows, and Dream's: preference pairs (with ``rejected``) mixed with SFT rows."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    words = word_pool(tokenizer)
    rng = random.Random(7)
    sft, dpo = cfg["sft"], cfg["dpo"]

    def rows(spec: dict, prefix: str, n: int, pairs: int | None = None) -> list[dict]:
        """``n`` rows; Dream's (``pairs`` given) name a strategy, and the first ``pairs`` get a rejected answer."""
        out = []
        for i in range(n):
            row = {"record_id": f"{prefix}:{i}", "bucket": rng.choice(BUCKETS),
                   "system": rng.choice(SYSTEMS) if rng.random() < 0.4 else "",
                   "prompt": text(rng, words, spec["prompt_words"]),
                   "response": text(rng, words, spec["response_words"])}
            if pairs is not None:
                row["strategy"] = "gpu_check"
                if i < pairs:
                    row["rejected"] = text(rng, words, spec["rejected_words"])
            out.append(row)
        rng.shuffle(out)
        return out

    val_pairs = max(1, dpo["val"] * 3 // 4)
    splits = {"sft": {"train": rows(sft, "sft", sft["train"]), "validation": rows(sft, "sftval", sft["val"])},
              "dream": {"train": rows(dpo, "dream", dpo["pairs"] + dpo["sft_rows"], dpo["pairs"]),
                        "validation": rows(dpo, "dreamval", dpo["val"], val_pairs)}}
    report: dict = {"word_pool": len(words)}
    for name, parts in splits.items():
        d = work / f"data_{name}"
        d.mkdir()
        for part, part_rows in parts.items():
            write_jsonl(d / f"{part}.jsonl", part_rows)
        train = parts["train"]
        report[name] = {"dir": str(d), "train_rows": len(train), "validation_rows": len(parts["validation"]),
                        "templated_tokens": length_stats(tokenizer, train)}
    (work / "data_dream" / "manifest.json").write_text(json.dumps({"dream_id": "gpu-check"}))
    pairs = [r for r in splits["dream"]["train"] if "rejected" in r]
    report["dream"].update(train_pairs=len(pairs), templated_tokens_rejected=length_stats(tokenizer, pairs, "rejected"))
    return report


def write_recipe(path: Path, model_dir: Path, cfg: dict, which: str) -> None:
    import yaml

    steps = cfg[which]["steps"]
    recipe = {
        "model": {"path": str(model_dir)},
        "tokenizer": {"vocab_size": 2048, "min_frequency": 2},  # unused: the model brings its tokenizer
        "training": {"max_steps": steps, "max_time_s": 3000, "micro_batch_size": cfg[which]["micro"],
                     "gradient_accumulation_steps": 1, "learning_rate": 3.0e-4 if which == "sft" else 5.0e-5,
                     "lr_scheduler": "cosine", "warmup_ratio": 0.05, "weight_decay": 0.01 if which == "sft" else 0.0,
                     "max_grad_norm": 1.0, "max_seq_len": cfg["max_seq_len"], "precision": cfg["precision"],
                     "seed": 1234, "logging_steps": cfg["logging_steps"],
                     "eval_steps": 100000,  # validation only before and after training: it would skew tokens/s
                     "save_steps": steps},  # one save, at the end
        "deepspeed": {"zero_stage": 2},
        "lora": {"enabled": False},
        "keep_last": 3,
    }
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))


# ------------------------------------------------------------------------------------------ launching
def launcher() -> list[str]:
    """The ``deepspeed`` launcher script, run by this Python whatever its shebang says."""
    for candidate in (Path(sys.executable).parent / "deepspeed", shutil.which("deepspeed")):
        if candidate and Path(candidate).is_file():
            return [sys.executable, str(candidate)]
    return [sys.executable, "-m", "deepspeed.launcher.runner"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class GpuSampler:
    """nvidia-smi every 0.5 s while a worker runs: peak memory, utilisation, power and SM clock."""

    def __init__(self):
        self.rows: list[list[float | None]] = []
        self.proc = None
        if shutil.which("nvidia-smi"):
            self.proc = subprocess.Popen(
                ["nvidia-smi", "--query-gpu=memory.used,utilization.gpu,power.draw,clocks.sm",
                 "--format=csv,noheader,nounits", "-lms", "500"],
                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
            threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        def number(x: str) -> float | None:
            try:
                return float(x)
            except ValueError:  # "[N/A]"
                return None

        for line in self.proc.stdout:
            if line.count(",") == 3:
                self.rows.append([number(x) for x in line.split(",")])

    def stop(self) -> dict:
        if self.proc is None:
            return {}
        self.proc.terminate()
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        mem, util, power, clock = ([r[i] for r in self.rows if r[i] is not None] for i in range(4))
        busy = [u for u in util if u > 0]
        return {"samples": len(self.rows), "peak_memory_used_mib": max(mem, default=None),
                "mean_util_pct_when_busy": round(sum(busy) / len(busy), 1) if busy else 0.0,
                "busy_samples": len(busy), "max_power_w": max(power, default=None),
                "max_sm_clock_mhz": max(clock, default=None)}


def end_group(proc: subprocess.Popen, grace_s: float = 10) -> None:
    """TERM, then KILL, the launcher's process group: its ranks with it."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
            proc.wait(grace_s)
            return
        except ProcessLookupError:
            return
        except subprocess.TimeoutExpired:
            continue


def run_worker(name: str, module: str, extra: list[str], recipe: Path, data_dir: Path, model_dir: Path,
               work: Path, cfg: dict, timeout_s: float) -> dict:
    """One launch of the worker ``module`` through the deepspeed launcher, its log streamed and kept."""
    run_dir, port = work / f"run_{name}", free_port()
    cmd = [*launcher(), "--num_gpus", str(cfg["ranks"]), "--master_port", str(port), "--module", module,
           "--recipe", str(recipe), "--data-dir", str(data_dir), "--run-dir", str(run_dir),
           "--out-root", str(work / f"ckpt_{name}"), "--data-version", "dv-gpu-check", "--init-from", str(model_dir),
           *extra]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false", "DS_ACCELERATOR": cfg["accelerator"], "HF_HOME": str(work / "hf_home"),
           "SLEEP_PIPELINE_WATCH_PID": str(os.getpid()),  # the ranks stop if this process is gone
           "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p),
           # CPU ranks share two cores: more threads each only wait on one another
           "OMP_NUM_THREADS": "1" if cfg["accelerator"] == "cpu" else os.environ.get("OMP_NUM_THREADS", "4")}
    say(f"{name}: launching (timeout {timeout_s:.0f}s): {' '.join(cmd)}")
    result: dict = {"command": " ".join(cmd), "timeout_s": round(timeout_s)}
    sampler = GpuSampler() if cfg["accelerator"] == "cuda" else None
    started = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            errors="replace", start_new_session=True)
    RUNNING[:] = [proc]
    lines: list[str] = []

    def pump() -> None:
        with open(work / f"{name}.log", "w") as log:
            for line in proc.stdout:
                sys.stdout.write(f"[{name}] {line}")
                sys.stdout.flush()
                log.write(line)
                lines.append(line)

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        say(f"{name}: timed out after {timeout_s:.0f}s: ending the launcher's process group")
        result["timed_out"] = True
        end_group(proc)
    RUNNING.clear()
    reader.join(10)
    result.update(launcher_wall_s=round(time.monotonic() - started, 1), returncode=proc.returncode)
    if sampler is not None:
        result["gpu_sampled"] = sampler.stop()
    if cfg["accelerator"] == "cpu":  # gloo's shared-memory segments of a killed run would stay in /dev/shm
        from sleep_pipeline.train.shm import release_run_segments

        release_run_segments(addr="*", port=port)
    log = "".join(lines)
    result["log_checks"] = {
        "device_lines": [ln.strip()[-200:] for ln in lines if any(
            k in ln for k in ("ds_accelerator", "CUDA_VISIBLE_DEVICES", "nccl", "NCCL", "gloo"))][:6],
        # DeepSpeed compiling an op at run time: it would need nvcc/ninja on the machine and minutes
        "jit_build_seen": any(k in log for k in ("Building extension module", "ninja: ", "Emitting ninja",
                                                 "Loading extension module")),
        "errors": [ln.strip()[-300:] for ln in lines if ln.startswith("error:") or "Error" in ln][:8],
    }
    if proc.returncode != 0:
        result["log_tail"] = "".join(lines[-40:])[-6000:]
    result.update(collect(run_dir))
    return result


# ------------------------------------------------------------------------------------------ results
def safetensors_dtypes(path: Path) -> dict:
    """dtype -> tensor count, read from the safetensors header alone."""
    with open(path, "rb") as fh:
        header = json.loads(fh.read(struct.unpack("<Q", fh.read(8))[0]))
    counts: dict = {}
    for key, value in header.items():
        if key != "__metadata__":
            counts[value["dtype"]] = counts.get(value["dtype"], 0) + 1
    return counts


MANIFEST_KEYS = ("steps", "tokens", "engine", "accelerator", "precision", "wall_time_s", "train_loss",
                 "validation_loss", "initial_validation_loss", "parameters", "world_size", "zero_stage", "lora",
                 "objective", "dream_items", "preference_beta", "preference_sft_weight", "phase", "checkpoint_sha256")


def collect(run_dir: Path) -> dict:
    """The run's logged metrics and its published checkpoint's manifest."""
    metrics = run_dir / "metrics.jsonl"
    res: dict = {"metrics_rows": [json.loads(x) for x in metrics.read_text().splitlines() if x.strip()]
                 if metrics.exists() else []}
    last = run_dir / "last_checkpoint"
    if last.exists():
        ckpt = Path(last.read_text().strip())
        res["checkpoint"] = str(ckpt)
        try:
            manifest = json.loads((ckpt / "manifest.json").read_text())
            res["manifest"] = {k: manifest[k] for k in MANIFEST_KEYS if k in manifest}
            if (ckpt / "model.safetensors").exists():
                res["saved_weight_dtypes"] = safetensors_dtypes(ckpt / "model.safetensors")
        except Exception as exc:  # noqa: BLE001 - reported, the other figures still count
            res["manifest_error"] = repr(exc)
    return res


def throughput(res: dict, model: dict, micro: int, ranks: int, dpo: bool) -> dict:
    """Warm tokens/s and MFU, from the logged training steps (the first logged step on, so the warm-up of the
    first ``logging_steps`` steps and the validation passes before and after are left out).

    tokens are the manifest's: non-padding input tokens of all ranks, for DPO chosen + rejected sequences
    (padding is computed but not counted). Per token, SFT costs 6N flops (forward + backward) and DPO 8N
    (the policy's 6N plus the reference model's 2N forward); the ``_attn`` figures add attention's 6LdS
    (DPO 8LdS), with N = parameters (the tied embedding once), L = layers, d = hidden size, S = mean
    non-padding tokens per sequence. MFU is against 989e12 (H200 dense bf16) and 790e12 (measured)."""
    train = sorted((r for r in res.get("metrics_rows", []) if "loss" in r and "eval_loss" not in r),
                   key=lambda r: r["step"])
    out: dict = {"logged_training_rows": len(train)}
    if len(train) < 2:
        return {**out, "note": "fewer than two logged training steps: no warm interval"}
    a, b = train[0], train[-1]
    dt, dtokens, dsteps = b["elapsed_s"] - a["elapsed_s"], b["tokens"] - a["tokens"], b["step"] - a["step"]
    if dt <= 0 or dtokens <= 0:
        return {**out, "note": "no time or tokens between the logged steps"}
    seqs_per_step = micro * ranks * (2 if dpo else 1)
    tok_s, mean_seq = dtokens / dt, dtokens / (dsteps * seqs_per_step)
    factor = 8 if dpo else 6
    per_tok = factor * model["parameters"]
    per_tok_attn = per_tok + factor * model["layers"] * model["hidden_size"] * mean_seq
    out.update({
        "warm_window_steps": f"{a['step']}-{b['step']}", "warm_window_s": round(dt, 2), "warm_tokens": dtokens,
        "warm_tokens_per_s": round(tok_s), "warm_s_per_step": round(dt / dsteps, 4),
        "sequences_per_step": seqs_per_step, "mean_tokens_per_sequence": round(mean_seq, 1),
        "flops_per_token_formula": "8N (6N policy + 2N reference forward), chosen+rejected tokens" if dpo else "6N",
        "flops_per_token": per_tok, "flops_per_token_with_attention": round(per_tok_attn),
        "achieved_tflops": round(tok_s * per_tok / 1e12, 2),
        "achieved_tflops_with_attention": round(tok_s * per_tok_attn / 1e12, 2),
        "mfu_vs_989T": round(tok_s * per_tok / PEAK_DENSE_BF16, 4),
        "mfu_vs_790T": round(tok_s * per_tok / PEAK_MEASURED_BF16, 4),
        "mfu_attn_vs_989T": round(tok_s * per_tok_attn / PEAK_DENSE_BF16, 4),
        "mfu_attn_vs_790T": round(tok_s * per_tok_attn / PEAK_MEASURED_BF16, 4),
        # per logged interval: a rate still rising after the first shows a longer warm-up
        "interval_tokens_per_s": [round((q["tokens"] - p["tokens"]) / (q["elapsed_s"] - p["elapsed_s"]))
                                  for p, q in zip(train, train[1:]) if q["elapsed_s"] > p["elapsed_s"]],
    })
    return out


def summary(res: dict) -> dict:
    """What a reader of the check looks at first, per worker."""
    manifest, tp = res.get("manifest") or {}, res.get("throughput") or {}
    return {"passed": res.get("passed"), "launcher_wall_s": res.get("launcher_wall_s"),
            "manifest_wall_time_s": manifest.get("wall_time_s"), "checkpoint": res.get("checkpoint"),
            **{k: manifest.get(k) for k in ("steps", "tokens", "engine", "accelerator", "precision", "train_loss",
                                            "validation_loss", "initial_validation_loss")},
            "saved_weight_dtypes": res.get("saved_weight_dtypes"),
            **{k: tp.get(k) for k in ("warm_tokens_per_s", "warm_s_per_step", "mfu_vs_989T", "mfu_vs_790T",
                                      "mfu_attn_vs_989T")},
            "gpu_peak_memory_used_mib": (res.get("gpu_sampled") or {}).get("peak_memory_used_mib"),
            "jit_build_seen": (res.get("log_checks") or {}).get("jit_build_seen")}


PREFLIGHT = r"""
import importlib, json, sys
out = {"python": sys.version.split()[0], "executable": sys.executable}
for name in ("torch", "transformers", "trl", "peft", "accelerate", "datasets", "deepspeed", "tokenizers",
             "safetensors", "pyarrow", "pandas", "numpy", "huggingface_hub", "pydantic", "duckdb", "dill",
             "multiprocess", "hjson", "fsspec", "regex", "yaml"):
    try:
        m = importlib.import_module(name)
        out[name] = [getattr(m, "__version__", "?"), (getattr(m, "__file__", None) or "?").rsplit("/", 2)[0]]
    except Exception as exc:
        out[name] = ["IMPORT FAILED", repr(exc)[:300]]
try:
    import torch
    out["cuda_available"] = torch.cuda.is_available()
    if out["cuda_available"]:
        p = torch.cuda.get_device_properties(0)
        out.update(device=p.name, device_memory_gib=round(p.total_memory / 2**30, 1),
                   bf16_supported=torch.cuda.is_bf16_supported(), torch_cuda=torch.version.cuda)
    from transformers import TrainingArguments
    out["trainer_default_optim"] = str(TrainingArguments.__dataclass_fields__["optim"].default)
except Exception as exc:
    out["torch_error"] = repr(exc)[:300]
print("PREFLIGHT " + json.dumps(out))
"""


def preflight(accelerator: str) -> dict:
    """Versions and locations of what the workers import, and the device: in a process of its own, so that
    this one never holds CUDA while the workers train."""
    p = subprocess.run([sys.executable, "-c", PREFLIGHT], cwd=ROOT, capture_output=True, text=True, timeout=240,
                       env={**os.environ, "DS_ACCELERATOR": accelerator})
    line = next((x for x in p.stdout.splitlines() if x.startswith("PREFLIGHT ")), None)
    return json.loads(line.removeprefix("PREFLIGHT ")) if line else {"error": (p.stdout + p.stderr)[-3000:]}


def finish() -> None:
    REPORT["summary"] = {name: summary(res) for name, res in REPORT.get("workers", {}).items()}
    save_report()
    # one line, last, so that any tail of the output holds it
    print("GPU_CHECK_SUMMARY " + json.dumps({"ok": REPORT["ok"], "errors": REPORT["errors"],
                                             "elapsed_s": REPORT["elapsed_s"], **REPORT["summary"]}), flush=True)


def on_term(signum, frame) -> None:
    """Killed from outside (the wrapper's timeout): end the running launcher, keep what was measured."""
    for proc in RUNNING:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    REPORT["errors"].append(f"terminated by signal {signum} after {time.monotonic() - T0:.0f}s")
    finish()
    os._exit(124)


def main(argv=None) -> int:
    global OUT
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cpu", action="store_true", help="2 CPU ranks, fp32, tiny sizes")
    ap.add_argument("--full-model", action="store_true", help="with --cpu: keep the real 135M config")
    ap.add_argument("--out", default=os.environ.get("OUT") or "gpu_check_out", help="where gpu_check.json goes")
    ap.add_argument("--model-files", default=str(ROOT / ".gpu" / "smollm2"),
                    help="config, tokenizer and chat template (no weights); with --cpu, absent = a tiny stand-in")
    ap.add_argument("--work", default=None, help="work directory, kept (default: a temporary one, removed)")
    ap.add_argument("--sft-steps", type=int)
    ap.add_argument("--dpo-steps", type=int)
    ap.add_argument("--sft-micro", type=int)
    ap.add_argument("--dpo-micro", type=int)
    ap.add_argument("--worker-timeout", type=float)
    ap.add_argument("--budget", type=float, help="seconds for the whole check (default: GPU 500, CPU 3000)")
    ap.add_argument("--only", choices=("sft", "dream"))
    args = ap.parse_args(argv)
    signal.signal(signal.SIGTERM, on_term)
    OUT = Path(args.out)
    OUT.mkdir(parents=True, exist_ok=True)
    cfg = settings(args)
    budget = args.budget or (3000 if args.cpu else 500)
    REPORT.update(mode="cpu" if args.cpu else "gpu", settings=cfg, workers={},
                  peaks={"h200_dense_bf16": PEAK_DENSE_BF16, "h200_measured_matmul_bf16": PEAK_MEASURED_BF16})
    save_report()

    say("preflight: versions and device")
    REPORT["preflight"] = preflight(cfg["accelerator"])
    say("preflight: " + json.dumps(REPORT["preflight"]))
    save_report()

    work = Path(args.work or tempfile.mkdtemp(prefix="gpu_check_"))
    work.mkdir(parents=True, exist_ok=True)
    REPORT["work_dir"] = str(work)
    try:
        files = Path(args.model_files)
        if args.cpu and not (files / "config.json").is_file():
            say(f"no model files in {files}: a tiny stand-in config and tokenizer instead")
            files = stand_in_model_files(work / "stand_in_files")
        model_dir = work / "model"
        REPORT["model"] = build_model_dir(files, model_dir, shrink=args.cpu and not args.full_model)
        say(f"model: {REPORT['model']}")
        REPORT["data"] = make_data(model_dir, work, cfg)
        say(f"data: {json.dumps(REPORT['data'])}")
        recipes = {w: work / f"recipe_{w}.yaml" for w in ("sft", "dpo")}
        for w, path in recipes.items():
            write_recipe(path, model_dir, cfg, w)
        REPORT["recipes"] = {w: path.read_text() for w, path in recipes.items()}
    except Exception as exc:  # noqa: BLE001 - the report says what failed
        REPORT["errors"].append(f"setup: {exc!r}")
        REPORT["setup_traceback"] = traceback.format_exc()[-4000:]
        finish()
        return 1
    save_report()

    workers = [("sft", "sleep_pipeline.train.sft", [], "sft"),
               ("dream", "sleep_pipeline.train.dream", ["--beta", "0.1", "--sft-weight", "1.0"], "dpo")]
    for name, module, extra, kind in workers:
        if args.only and args.only != name:
            continue
        left = budget - (time.monotonic() - T0) - 10
        if left < 60:
            REPORT["errors"].append(f"{name}: skipped, only {left:.0f}s of the budget left")
            continue
        spec = cfg[kind]
        try:
            res = run_worker(name, module, extra, recipes[kind], Path(REPORT["data"][name]["dir"]), model_dir, work,
                             cfg, min(cfg["worker_timeout_s"], left))
            res["throughput"] = throughput(res, REPORT["model"], spec["micro"], cfg["ranks"], dpo=kind == "dpo")
        except Exception as exc:  # noqa: BLE001 - the report says what failed
            res = {"exception": repr(exc), "traceback": traceback.format_exc()[-3000:]}
        manifest = res.get("manifest") or {}
        res["passed"] = (res.get("returncode") == 0 and manifest.get("engine") == "DeepSpeedEngine"
                         and manifest.get("accelerator") == cfg["accelerator"]
                         and manifest.get("precision") == cfg["precision"] and manifest.get("steps") == spec["steps"])
        if not res["passed"]:
            REPORT["errors"].append(f"{name}: did not pass (rc {res.get('returncode')}, "
                                    f"manifest {manifest or 'missing'})")
        REPORT["workers"][name] = res
        save_report()
        tp = res.get("throughput", {})
        say(f"{name}: rc {res.get('returncode')}, wall {res.get('launcher_wall_s')}s, steps {manifest.get('steps')}, "
            f"tokens {manifest.get('tokens')}, warm {tp.get('warm_tokens_per_s')} tok/s, "
            f"MFU(989T) {tp.get('mfu_vs_989T')}")

    expected = [w[0] for w in workers if not args.only or args.only == w[0]]
    REPORT["ok"] = all(REPORT["workers"].get(name, {}).get("passed") for name in expected)
    finish()
    if not args.work and not os.environ.get("GPU_CHECK_KEEP_WORK"):
        shutil.rmtree(work, ignore_errors=True)
    return 0 if REPORT["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
