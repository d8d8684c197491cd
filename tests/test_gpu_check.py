"""bench/gpu_check.py at tiny size on the CPU, so the one-shot GPU check does not rot before a GPU is lent; and
the full-size smoke run (slow)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_gpu_check_runs_at_tiny_size_and_writes_its_json_and_table(tmp_path):
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_check.py"), "--tiny", "--device=cpu",
                           "--no-compile", "--archs=sd14,sdxl,sd35,flux", f"--out={tmp_path}"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    reports = json.loads((tmp_path / "gpu_check.json").read_text())
    assert [r["arch"] for r in reports] == ["sd14", "sdxl", "sd35", "flux"]
    for r in reports:
        assert r["optimizer_steps"] >= 1 and r["images"] == 8
        assert r["unet_rows_stage"] > 0 and r["unet_gflops_per_row"] > 0 and 0 < r["model_compute_share"] <= 1
        assert r["sdpa_s"] > 0 and r["math_s"] > 0 and r["compiled_s"] is None
        assert r["overflow_skipped"] and r["steps_after_overflow"] == 2 and r["weights_finite_after"]
        assert r["loss_scale_after_overflow"] == r["loss_scale_before"] / 2 == r["loss_scale_after"]
    table = (tmp_path / "gpu_check.md").read_text()
    assert table.startswith("| field | sd14 | sdxl | sd35 | flux |") and "| images_per_s |" in table


@pytest.mark.slow
def test_fullsize_sd14_smoke_runs_train_py_in_both_precisions(tmp_path):
    """The SD v1.4 architecture (random weights) through train.py in float32 and bf16; a stock pipeline loads
    each checkpoint (bench/fullsize_smoke.py checks that and fails loudly)."""
    out = tmp_path / "rows.json"
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "fullsize_smoke.py"), "--archs=sd14",
                           f"--json={out}"], cwd=ROOT, capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = json.loads(out.read_text())
    assert [(r["arch"], r["precision"]) for r in rows] == [("sd14", "no"), ("sd14", "bf16")]
    assert all(r["optimizer_steps"] >= 1 and r["unet_calls"] > 0 for r in rows)
