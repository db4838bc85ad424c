"""What a candidate costs to serve, measured the way it will be served.

Every figure comes from a fresh process that loads the checkpoint with the gate's loader (int8 on
int8 kernels, a pruned model with its smaller config, an adapter merged), so peak memory is that
process's and nothing another model left behind counts:

* ``size_mb``: the checkpoint's files on disk (with its base model's, for a LoRA adapter); ``parameters``: the served model's (int8 ones included);
* ``latency_ms_per_token_b1`` / ``latency_ms_per_token_batch``: wall time per decoding step generating a
  fixed number of tokens greedily, at batch 1 and at the gate's batch size (median of repeats, after a
  warm-up); ``tokens_per_s_batch`` is the batched throughput;
* ``peak_memory_mb``: the serving process's peak resident memory;
* ``cpu_s_per_1k_tokens``: CPU seconds (user + system, all threads) per 1,000 generated tokens, an
  energy proxy on a CPU; on a GPU with NVML, ``energy_j_per_1k_tokens`` from the board's energy counter.

    python -m sleep_pipeline.compress.cost CHECKPOINT [--batch-size 16] [--new-tokens 32]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

DEFAULT_PROMPTS = (
    "Write a short note thanking a colleague for their help.",
    "Explain why the sky is blue in two sentences.",
    "Give three tips for learning a new language.",
    "What is 17 times 23? Show the steps.",
)


@dataclass(frozen=True)
class Cost:
    size_mb: float
    parameters: int
    latency_ms_per_token_b1: float
    latency_ms_per_token_batch: float
    batch_size: int
    tokens_per_s_batch: float
    peak_memory_mb: float
    cpu_s_per_1k_tokens: float
    energy_j_per_1k_tokens: float | None
    device: str
    threads: int

    def to_json(self) -> dict:
        return asdict(self)


def disk_mb(path: Path) -> float:
    from sleep_pipeline.checkpoint import CARD

    return round(sum(p.stat().st_size for p in Path(path).rglob("*")
                     if p.is_file() and p.relative_to(path) != Path(CARD)) / 2**20, 3)


def served_mb(path: Path) -> float:
    """What serving needs on disk: the checkpoint, plus its base model for a LoRA adapter."""
    from sleep_pipeline.compress.merge import adapter_base
    from sleep_pipeline.train.modeling import ADAPTER_CONFIG

    size = disk_mb(path)
    if (Path(path) / ADAPTER_CONFIG).is_file():
        size += disk_mb(adapter_base(path))
    return round(size, 3)


def served_parameters(model) -> int:
    """Parameters of the served model, the int8 layers' weights and biases (not torch parameters) included."""
    from sleep_pipeline.compress.quantize import Int8Linear

    n = sum(p.numel() for p in model.parameters())
    for mod in model.modules():
        if isinstance(mod, Int8Linear):
            n += mod.qweight.numel() + (mod.bias_value.numel() if mod.bias_value is not None else 0)
    return n


def _energy_counter():
    """A function returning the GPU's energy counter in joules, or None where there is none."""
    try:
        import torch

        if not torch.cuda.is_available():
            return None
        import pynvml

        pynvml.nvmlInit()
        handle = pynvml.nvmlDeviceGetHandleByIndex(torch.cuda.current_device())
        return lambda: pynvml.nvmlDeviceGetTotalEnergyConsumption(handle) / 1000.0
    except Exception:  # no NVML, or a board without an energy counter
        return None


def peak_rss_mb() -> float:
    """This process's peak resident memory. ``VmHWM`` belongs to the process's own address space;
    ``getrusage``'s ``ru_maxrss`` survives ``exec`` on Linux, so in a process started by a large one
    (a benchmark, a Dagster run) it reports the parent's peak instead of the model's."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def _cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def measure_here(path: Path, prompts: list[str], batch_size: int, new_tokens: int, repeats: int = 3) -> Cost:
    """Measure in this process (see the module docstring; :func:`measure` runs this in a fresh one)."""
    import torch

    from sleep_pipeline.gate.evaluate import load_for_eval

    model, tok = load_for_eval(Path(path))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        model = model.to(device)
    tok.padding_side = "left"
    texts = [tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
             for p in prompts]

    def run(batch: list[str], tokens: int) -> float:
        enc = tok(batch, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
        t0 = time.perf_counter()
        with torch.no_grad():
            model.generate(**enc, do_sample=False, max_new_tokens=tokens, min_new_tokens=tokens,
                           pad_token_id=tok.pad_token_id)
        if device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    run(texts[:1], 4)  # warm-up: first-call allocations and kernel selection
    batch = [texts[i % len(texts)] for i in range(batch_size)]
    energy = _energy_counter()
    cpu0, j0 = _cpu_s(), energy() if energy else None
    b1 = [run([texts[i % len(texts)]], new_tokens) / new_tokens for i in range(repeats)]
    bn = [run(batch, new_tokens) / new_tokens for _ in range(max(1, repeats - 1))]
    tokens = new_tokens * (len(b1) + batch_size * len(bn))
    cpu = _cpu_s() - cpu0
    joules = (energy() - j0) if energy else None
    step_batch = statistics.median(bn)
    return Cost(
        size_mb=served_mb(Path(path)),
        parameters=served_parameters(model),
        latency_ms_per_token_b1=round(statistics.median(b1) * 1000, 3),
        latency_ms_per_token_batch=round(step_batch * 1000, 3),
        batch_size=batch_size,
        tokens_per_s_batch=round(batch_size / step_batch, 1),
        peak_memory_mb=peak_rss_mb(),
        cpu_s_per_1k_tokens=round(cpu / tokens * 1000, 3),
        energy_j_per_1k_tokens=round(joules / tokens * 1000, 3) if joules is not None else None,
        device=device,
        threads=torch.get_num_threads(),
    )


class CostError(RuntimeError):
    pass


def measure(path: Path, prompts: list[str] | None = None, batch_size: int = 16, new_tokens: int = 32,
            timeout_s: float = 1800) -> Cost:
    """Measure ``path`` in a fresh Python process (its peak memory is the model's alone)."""
    cmd = [sys.executable, "-m", "sleep_pipeline.compress.cost", str(path), "--batch-size", str(batch_size),
           "--new-tokens", str(new_tokens), "--prompts", json.dumps(list(prompts or DEFAULT_PROMPTS))]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, env=env)
    if proc.returncode != 0:
        raise CostError(f"measuring {path} failed (exit {proc.returncode}): {proc.stderr.strip()[-800:]}")
    return Cost(**json.loads(proc.stdout.strip().splitlines()[-1]))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m sleep_pipeline.compress.cost", description=__doc__.split("\n\n")[0])
    ap.add_argument("checkpoint")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--prompts", default=None, help="a JSON list of user messages")
    args = ap.parse_args(argv)
    prompts = json.loads(args.prompts) if args.prompts else list(DEFAULT_PROMPTS)
    cost = measure_here(Path(args.checkpoint), prompts, args.batch_size, args.new_tokens)
    print(json.dumps(cost.to_json()), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
