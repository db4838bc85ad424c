"""`sleep-pipeline dedup`: a user's own corpus in, kept / duplicates / quarantine out."""

import json
import subprocess
import sys
from pathlib import Path

BIN = Path(sys.executable).parent / "sleep-pipeline"


def test_dedup_command_on_a_users_corpus(tmp_path):
    base = ("Rivers carry sediment from the mountains to the sea, building deltas where the current slows "
            "and the water spreads across the plain in many channels")
    lines = [
        json.dumps({"id": "orig", "text": base, "tier": 1}),
        json.dumps({"id": "shout", "text": base.upper() + "!!!", "tier": 3}),
        json.dumps({"id": "cut", "text": base.rsplit(" ", 2)[0], "tier": 2}),
        json.dumps({"id": "other", "text": "Volcanoes form where magma reaches the surface through cracks in the crust of the planet"}),
        "{broken json",
        json.dumps({"id": "weird", "text": "ok", "tier": 7}),
        "",
    ]
    src = tmp_path / "corpus.jsonl"
    src.write_text("\n".join(lines) + "\n")
    out = tmp_path / "out"
    proc = subprocess.run([str(BIN), "dedup", str(src), "--out", str(out), "--quiet"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    assert summary["balanced"] and summary["records_in"] == 7
    kept = [json.loads(line)["id"] for line in (out / "kept.jsonl").read_text().splitlines()]
    assert kept == ["orig", "other"]
    dups = {d["id"]: d for d in map(json.loads, (out / "duplicates.jsonl").read_text().splitlines())}
    assert dups["shout"]["duplicate_of"] == "orig" and dups["shout"]["kind"] == "exact"
    assert dups["cut"]["duplicate_of"] == "orig" and dups["cut"]["kind"] == "near" and dups["cut"]["similarity"] >= 0.7
    reasons = sorted(json.loads(line)["reason"] for line in (out / "quarantine.jsonl").read_text().splitlines())
    assert reasons == ["bad_field_type", "empty", "invalid_json"]
    assert json.loads((out / "summary.json").read_text())["kept"] == 2


def test_dedup_command_reports_a_missing_file(tmp_path):
    proc = subprocess.run([str(BIN), "dedup", str(tmp_path / "nope.jsonl"), "--out", str(tmp_path)], capture_output=True, text=True)
    assert proc.returncode == 2
    assert "does not exist" in proc.stderr
