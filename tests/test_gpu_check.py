"""scripts/gpu_check.py in its ``--cpu`` mode: the path the GPU machine runs (real deepspeed launcher, the
SFT and Dream workers, the report), on two CPU ranks with the tiny stand-in model, as CI has no SmolLM2 files."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.conftest import ROOT


def test_gpu_check_cpu_mode_trains_both_workers_and_writes_the_report(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "scripts/gpu_check.py", "--cpu", "--out", str(out), "--work", str(tmp_path / "work"),
         "--model-files", str(tmp_path / "no-model-files")],
        cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-2000:]
    assert proc.stdout.splitlines()[-1].startswith("GPU_CHECK_SUMMARY ")
    report = json.loads((out / "gpu_check.json").read_text())
    assert report["ok"] and report["errors"] == [] and report["mode"] == "cpu"
    assert report["model"]["files"].endswith("stand_in_files") and report["data"]["dream"]["train_pairs"] > 0
    for name in ("sft", "dream"):
        worker = report["summary"][name]
        assert worker["passed"], report["workers"][name]
        assert worker["engine"] == "DeepSpeedEngine" and worker["accelerator"] == "cpu"
        assert worker["precision"] == "fp32" and worker["tokens"] > 0 and worker["warm_tokens_per_s"] > 0
        assert (Path(worker["checkpoint"]) / "manifest.json").is_file()
    assert report["workers"]["dream"]["manifest"]["objective"] == "dream: dpo+sft"
