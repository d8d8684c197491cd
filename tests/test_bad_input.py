"""Each bad input exits with one clear line, before any model is loaded and without a run directory."""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

import ml_collections
import pytest

from srrl.errors import LoadError, TrainingError
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
    ("select.pos_threshold", lambda t: {"select.pos_threshold": -1.0}, ">= select.neg_threshold"),
    ("sample.batch_size", lambda t: {"sample.batch_size": 0}, "positive integer"),
    ("sample.num_batches_per_epoch", lambda t: {"sample.num_batches_per_epoch": -1}, "positive integer"),
    ("train.batch_size", lambda t: {"train.batch_size": 0}, "positive integer"),
    ("sample.num_steps", lambda t: {"sample.num_steps": 0}, "positive integer"),
    ("train.num_epochs", lambda t: {"train.num_epochs": 0}, "positive integer"),
    ("reward.fn", lambda t: {"reward.fn": "no_such_reward"}, "brightness"),
    ("train.target_kl", lambda t: {"train.target_kl": -0.1}, "0 (off) or a finite positive number"),
    ("train.max_grad_norm", lambda t: {"train.max_grad_norm": float("nan")}, "a finite number > 0"),
    ("exp_name", lambda t: {"exp_name": "../x"}, "a plain folder name"),
    ("train.lr_warmup_steps", lambda t: {"train.lr_warmup_steps": -1}, "an integer >= 0"),
    ("train.timestep_window", lambda t: {"train.timestep_window": -4}, "-3..-1 (all but the last -W)"),
    ("train.timestep_window", lambda t: {"train.timestep_window": -2}, "fewest post-fork steps of a stage (2"),
    ("train.timesteps_per_call", lambda t: {"train.timesteps_per_call": 0}, "an integer >= 1"),
    ("lora_target_modules", lambda t: {"lora_target_modules": " , "}, "comma-separated denoiser module names"),
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
        "invalid config: ValueError: unknown preset 'nope'; known presets: sd14, tiny, testbed, tiny_sd, bench, sdxl, tiny_xl, sd35, tiny_sd3, flux, flux_schnell, tiny_flux"
    ]


def cli_cases(tmp_path: Path) -> dict[str, tuple[list[str], list[str]]]:
    """Case name -> (train.py arguments, fragments of the one stderr line)."""
    preset = f"{ROOT}/config/stage_process.py:tiny"
    runs = f"--config.save_path={tmp_path}/runs"
    outside = write_prompts(tmp_path / "outside.json", ["a red circle", "a purple blob"])
    return {
        "nan_grad_norm": (["--config", preset, "--config.train.max_grad_norm=nan", runs],
                          ["invalid config: train.max_grad_norm=nan", "a finite number > 0"]),
        "exp_name_escapes": (["--config", preset, "--config.exp_name=../x", runs],
                             ["invalid config: exp_name='../x'", "a plain folder name"]),
        "missing_config_file": (["--config", "nonexist.py:tiny", runs],
                                ["invalid config: cannot load the config file", "nonexist.py"]),
        "missing_config_file_no_override": (["--config", "nonexist.py:tiny"],
                                            ["invalid config: cannot load the config file", "nonexist.py"]),
        "prompt_outside_grammar": (["--config", preset, f"--config.prompt_file={outside}", runs],
                                   [f"invalid config: prompt_file='{outside}'", "'a purple blob'", "'a COLOUR SHAPE'"]),
    }


def test_cli_bad_values_exit_2_with_one_line_and_no_run_dir(tmp_path):
    """Each case in its own train.py process (run side by side: each spends its seconds importing torch)."""
    procs = {
        name: subprocess.Popen([sys.executable, str(ROOT / "train.py"), *args], cwd=tmp_path, text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        for name, (args, _) in cli_cases(tmp_path).items()
    }
    for name, proc in procs.items():
        out, err = proc.communicate(timeout=120)
        lines = err.strip().splitlines()
        assert proc.returncode == 2 and len(lines) == 1, (name, proc.returncode, err[-3000:], out[-1000:])
        assert all(part in lines[0] for part in cli_cases(tmp_path)[name][1]), (name, lines[0])
        assert "Traceback" not in err + out, name
    assert not (tmp_path / "runs").exists() and not (tmp_path / "x").exists()


@pytest.mark.parametrize(("error", "code", "line"), [
    (ConfigError("train.clip_range=0 is not allowed; expected a finite number > 0"), 2,
     "invalid config: train.clip_range=0 is not allowed; expected a finite number > 0"),
    (LoadError("cannot create the run directory logs/t: [Errno 13] Permission denied\nchoose a writable save_path"), 2,
     "cannot create the run directory logs/t: [Errno 13] Permission denied choose a writable save_path"),
    (TrainingError("3 optimizer steps in a row were non-finite; lower train.learning_rate"), 1,
     "run stopped: 3 optimizer steps in a row were non-finite; lower train.learning_rate"),
])  # fmt: skip
def test_run_entry_turns_errors_of_the_run_into_one_line(monkeypatch, caplog, error, code, line):
    """Raised anywhere in the run (here: by the trainer), matched by type, not by message."""
    import cli.entry

    def failing_trainer(config):
        raise error

    monkeypatch.setattr(cli.entry, "trainer_for", failing_trainer)
    monkeypatch.setattr(cli.entry.logging, "basicConfig", lambda **kwargs: None)  # keep pytest's log capture
    with pytest.raises(SystemExit) as info:
        cli.entry.run_entry(ml_collections.ConfigDict(), "sd")
    assert info.value.code == code
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == [line]


def test_run_entry_lets_other_errors_through(monkeypatch):
    """A RuntimeError that is no LoadError is a bug: its traceback stays, whatever its message says."""
    import cli.entry

    def failing_trainer(config):
        raise RuntimeError("cannot load this (an internal error)")

    monkeypatch.setattr(cli.entry, "trainer_for", failing_trainer)
    monkeypatch.setattr(cli.entry.logging, "basicConfig", lambda **kwargs: None)
    with pytest.raises(RuntimeError, match="internal error"):
        cli.entry.run_entry(ml_collections.ConfigDict(), "sd")
