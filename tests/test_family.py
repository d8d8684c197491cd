"""The model family is a config field: recorded in config.json, read back by evaluate.py without a flag."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from cli.entry import FAMILIES
from config.stage_process import PRESETS, get_config
from srrl.trainer import train
from tests.conftest import fast_config, loader

ROOT = Path(__file__).resolve().parent.parent


def test_every_preset_names_a_family_the_wiring_has_a_loader_for():
    assert {p: get_config(p).family for p in ("sd14", "tiny", "sdxl", "tiny_xl", "sd35", "tiny_sd3")} == {
        "sd14": "sd", "tiny": "sd", "sdxl": "sdxl", "tiny_xl": "sdxl", "sd35": "sd3", "tiny_sd3": "sd3"}
    assert all(get_config(p).family in FAMILIES for p in PRESETS)


def test_an_unknown_family_is_one_config_error_of_the_wiring(tmp_path):
    from cli.wiring import family_loader
    from srrl.errors import ConfigError

    config = get_config("tiny")
    config.family = "wan"
    with pytest.raises(ConfigError, match="family='wan' is not a model family; expected one of: sd, sdxl, sd3, flux"):
        family_loader(config)


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


def test_the_trainer_looks_up_the_family_itself(tiny_xl_pipe_dir, tmp_path, monkeypatch):
    """Without a loader handed in, the core loads ``config.family``'s (srrl.families), and a family registered there
    is one the trainer can use: here an SDXL run through a registered stand-in that records its calls."""
    import dataclasses

    import srrl.families

    calls = []
    real = srrl.families.FAMILIES["sdxl"]

    def load(config, device, dtype):
        calls.append(config.family)
        return real.load(config, device, dtype)

    monkeypatch.setitem(srrl.families.FAMILIES, "sdxl_probe", dataclasses.replace(real, name="sdxl_probe", load=load))
    config = fast_config(tiny_xl_pipe_dir, tmp_path, family="sdxl_probe", **{"curriculum.total_stages": 1,
                                                                             "eval.every": 0})
    run = train(config)
    assert calls == ["sdxl_probe"] and (run / "checkpoints").is_dir()
