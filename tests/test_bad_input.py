"""Each bad input exits with one clear line, before any model is loaded and without a run directory."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from srrl.trainer import SRRLTrainer
from srrl.validate import ConfigError
from tests.conftest import fast_config, write_prompts

ROOT = Path(__file__).resolve().parent.parent


def bad_prompt_file(tmp_path: Path, content: str | None) -> str:
    path = tmp_path / "prompts.json"
    if content is not None:
        path.write_text(content)
    return str(path)


CASES = [
    ("prompt_file", lambda t: {"prompt_file": bad_prompt_file(t, None)}, "file not found"),
    ("prompt_file", lambda t: {"prompt_file": bad_prompt_file(t, "[]")}, "empty"),
    ("prompt_file", lambda t: {"prompt_file": bad_prompt_file(t, '{"a": 1}')}, "JSON list"),
    ("prompt_file", lambda t: {"prompt_file": bad_prompt_file(t, "[1, 2]")}, "JSON list"),
    ("prompt_file", lambda t: {"prompt_file": bad_prompt_file(t, "not json")}, "not valid JSON"),
    ("split_step", lambda t: {"split_step": 9}, "1..sample.num_steps=4"),
    ("split_step", lambda t: {"split_step": -2}, "1..sample.num_steps=4"),
    ("curriculum.split_left", lambda t: {"curriculum.split_left": 0}, "1..sample.num_steps=4"),
    ("curriculum.split_right", lambda t: {"curriculum.split_right": 5}, "sample.num_steps=4"),
    ("split_time", lambda t: {"split_time": 1}, ">= 2"),
    ("eval.pos_threshold", lambda t: {"eval.pos_threshold": -1.0}, ">= eval.neg_threshold"),
    ("sample.batch_size", lambda t: {"sample.batch_size": 0}, "positive integer"),
    ("sample.num_batches_per_epoch", lambda t: {"sample.num_batches_per_epoch": -1}, "positive integer"),
    ("train.batch_size", lambda t: {"train.batch_size": 0}, "positive integer"),
    ("sample.num_steps", lambda t: {"sample.num_steps": 0}, "positive integer"),
    ("train.num_epochs", lambda t: {"train.num_epochs": 0}, "positive integer"),
    ("reward.fn", lambda t: {"reward.fn": "no_such_reward"}, "brightness"),
    ("train.target_kl", lambda t: {"train.target_kl": -0.1}, "0 (off) or a positive number"),
    ("train.lr_warmup_steps", lambda t: {"train.lr_warmup_steps": -1}, "an integer >= 0"),
    ("train.timesteps_per_call", lambda t: {"train.timesteps_per_call": 0}, "an integer >= 1"),
    ("lora_target_modules", lambda t: {"lora_target_modules": " , "}, "comma-separated UNet module names"),
    ("eval.dtype", lambda t: {"eval.dtype": "bf16"}, "'bfloat16'"),
]


@pytest.mark.parametrize(("field", "overrides", "allowed"), CASES)
def test_bad_config_is_one_clear_line_and_no_run_dir(tmp_path, field, overrides, allowed):
    config = fast_config(Path("/nonexistent/model"), tmp_path, **overrides(tmp_path))
    with pytest.raises(ConfigError) as info:
        SRRLTrainer(config)
    message = str(info.value)
    assert "\n" not in message and field.split(".")[-1] in message and allowed in message
    assert not (tmp_path / "runs").exists()


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "train.py"), *args], cwd=cwd, capture_output=True,
                          text=True, timeout=120)


def test_cli_bad_input_exits_2_with_one_line(tmp_path):
    empty = write_prompts(tmp_path / "empty.json", [])
    result = run_cli("--config", f"{ROOT}/config/stage_process.py:tiny", f"--config.prompt_file={empty}",
                     f"--config.save_path={tmp_path}/runs", cwd=tmp_path)
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if "invalid config" in line]
    assert len(errors) == 1 and "prompt_file" in errors[0] and "empty" in errors[0]
    assert "Traceback" not in result.stderr and not (tmp_path / "runs").exists()


def test_cli_unknown_preset_exits_2_with_one_line(tmp_path):
    result = run_cli("--config", f"{ROOT}/config/stage_process.py:nope", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "invalid config: ValueError: unknown preset 'nope'; known presets: sd14, tiny, testbed, tiny_sd, bench, sdxl, tiny_xl"
    ]
