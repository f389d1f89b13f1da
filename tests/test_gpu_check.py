"""The GPU check's CPU rehearsal: ``benchmarks/gpu_check.py --device cpu --quick`` runs every stage and writes JSON
and Markdown with every section, so the script that a GPU machine runs once cannot rot unnoticed."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STAGES = ["kernel", "lossless", "inductor", "verify_cost", "end_to_end"]


def test_quick_cpu_run_writes_every_section(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "benchmarks/gpu_check.py", "--device", "cpu", "--quick", "--out",
                           str(tmp_path)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    data = json.loads((tmp_path / "gpu_check.json").read_text())
    md = (tmp_path / "gpu_check.md").read_text()
    assert list(data["stages"]) == STAGES
    for name, stage in data["stages"].items():
        assert stage["status"] == "ok", (name, stage.get("error"))
        failures = [r for rows in stage["tables"].values() for r in rows if str(r.get("status", "")).startswith("FAIL")]
        assert not failures, (name, failures, stage["notes"])
        assert stage["tables"], name
        assert f"## {name}: ok" in md
    tables = {name: stage["tables"] for name, stage in data["stages"].items()}
    (triton,) = tables["kernel"]["Triton kernel (compiled) against the torch reference"]
    assert triton["status"].startswith("skipped: needs CUDA")
    greedy = tables["lossless"]["tiny families, n-gram drafter, greedy vs model.generate"]
    assert {r["dtype"] for r in greedy} == {"float32", "bfloat16"} and all(r["within_promise"] for r in greedy)
    assert all(r["identical"] for r in greedy if r["dtype"] == "float32")
    sampling = tables["lossless"]["sampling: chi-square of the first three tokens against the target's exact joint"]
    assert len(sampling) == 2 and all(r["passed"] for r in sampling)
    assert all(r["identical"] for t in tables["end_to_end"].values() for r in t)
    cost = tables["verify_cost"]["one verify step against one plain decoding step (HF, eager)"]
    assert {r["backend"] for r in cost} == {"HF decode step", "eager", "inductor"}
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
