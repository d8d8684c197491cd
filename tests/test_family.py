"""The model family is a config field: recorded in config.json, read back by evaluate.py without a flag."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from config.stage_process import PRESETS, get_config
from srrl.entry import FAMILIES
from srrl.trainer import train
from srrl.validate import MODEL_FAMILIES
from tests.conftest import fast_config, loader

ROOT = Path(__file__).resolve().parent.parent


def test_every_family_the_config_allows_has_a_loader_and_presets_name_theirs():
    assert set(MODEL_FAMILIES) == set(FAMILIES)
    assert {p: get_config(p).family for p in ("sd14", "tiny", "sdxl", "tiny_xl")} == {
        "sd14": "sd", "tiny": "sd", "sdxl": "sdxl", "tiny_xl": "sdxl"}
    assert all(get_config(p).family in MODEL_FAMILIES for p in PRESETS)


def test_evaluate_reads_the_family_of_an_sdxl_run(tiny_xl_pipe_dir, tmp_path):
    config = fast_config(tiny_xl_pipe_dir, tmp_path, family="sdxl", **{"curriculum.total_stages": 1,
                                                                       "eval.every": 0})
    run = train(config, loader("sdxl"))
    assert json.loads((run / "config.json").read_text())["family"] == "sdxl"
    out = tmp_path / "eval"
    done = subprocess.run([sys.executable, str(ROOT / "evaluate.py"), f"--run_dir={run}", "--stages=last",
                           "--num_images_per_prompt=1", f"--out={out}", "--rewards=brightness"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-1500:]
    assert "stage_000" in (out / "index.html").read_text()
    assert {p.name for p in (out / "images").iterdir()} == {"base", "stage_000"}
