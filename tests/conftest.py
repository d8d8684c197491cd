"""Shared fixtures: a tiny random SD v1 pipeline saved to disk, and a fast config pointing at it."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from types import ModuleType

import pytest
import torch

from config.stage_process import get_config


def load_script(path: Path) -> ModuleType:
    """A script of bench/ or scripts/ (folders that are no packages) as a module."""
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def tiny_pipe_dir(tmp_path_factory) -> Path:
    """A randomly initialised tiny SD v1 pipeline (16 px), built in code and saved with save_pretrained."""
    import os
    if os.environ.get("SMOKE_PIPE"):
        return Path(os.environ["SMOKE_PIPE"])
    from testbed.tiny_model import build_tiny_pipeline

    directory = tmp_path_factory.mktemp("tiny_sd")
    build_tiny_pipeline(directory, seed=0, sample_size=16)
    return directory


@pytest.fixture(scope="session")
def tiny_xl_pipe_dir(tmp_path_factory) -> Path:
    """A randomly initialised tiny SDXL pipeline (16 px, two text encoders, text_time added conditioning)."""
    from testbed.tiny_xl import build_tiny_sdxl_pipeline

    directory = tmp_path_factory.mktemp("tiny_sdxl")
    build_tiny_sdxl_pipeline(directory, seed=0, sample_size=16)
    return directory


@pytest.fixture(scope="module", params=["sd", "sdxl"])
def family(request) -> str:
    """The model family under test: every test that uses it runs for SD v1.x and for SDXL."""
    return request.param


@pytest.fixture(scope="module")
def family_pipe_dir(family, request) -> Path:
    return request.getfixturevalue("tiny_pipe_dir" if family == "sd" else "tiny_xl_pipe_dir")


def loader(family: str):
    """The model loader of ``family`` (what train.py / train_xl.py pass to the trainer)."""
    from cli.entry import FAMILIES

    return FAMILIES[family]


def fast_config(pipe_dir: Path, tmp_path: Path, **overrides):
    """The tiny preset shrunk to seconds: 16 px, 4 DDIM steps, 2x2 prompts, 3 children per fork."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    c = get_config("tiny_sd")
    c.pretrained.model = str(pipe_dir)
    c.save_path = str(tmp_path / "runs")
    c.exp_name = "t"
    c.sample.resolution = 16
    c.sample.num_steps = 4
    c.sample.batch_size = 2
    c.sample.num_batches_per_epoch = 2
    c.split_time = 3
    c.curriculum.total_stages = 2
    c.curriculum.stage_cnt = 2
    c.curriculum.split_left = 2
    c.curriculum.split_right = 4
    c.train.batch_size = 2
    c.train.num_epochs = 1
    c.train.gradient_accumulation_steps = 1
    c.train.learning_rate = 1e-2
    c.train.lr_warmup_steps = 20  # still warming up when stage 1 starts: resume must restore the schedule
    c.eval.every = 1
    c.eval.num_images_per_prompt = 1
    c.select.pos_threshold = 0.3
    c.select.neg_threshold = -0.3
    c.eval.prompt_file = str(write_prompts(tmp_path / "test_prompts.json", ["a red circle", "a blue square"]))
    c.prompt_file = str(write_prompts(tmp_path / "train_prompts.json", ["a green ring", "a yellow triangle"]))
    c.reward.fn = "brightness"
    c.update_from_flattened_dict(overrides)
    return c


def write_prompts(path: Path, prompts) -> Path:
    path.write_text(json.dumps(prompts))
    return path


@pytest.fixture(autouse=True)
def _single_thread_determinism():
    torch.manual_seed(0)
    yield


TESTBED_STEPS = 4  # DDIM steps of tiny_testbed_config
TESTBED_SPLIT_TIME = 3  # children per fork of tiny_testbed_config


@pytest.fixture(scope="session")
def testbed_pipe_dir(tmp_path_factory) -> Path:
    """A randomly initialised pipeline of the shapes-world testbed architecture (32 px, word-level tokenizer)."""
    from testbed.model import build_testbed_parts

    directory = tmp_path_factory.mktemp("testbed_sd")
    build_testbed_parts(directory, seed=0).save_pretrained(directory)
    return directory


def tiny_testbed_config(pipe_dir: Path, tmp_path: Path, algorithm: str, **overrides):
    """The testbed preset shrunk to seconds: 4 steps, 2 prompts x 3 images, 2 stages (stage 1: one reflection
    round under srrl), brightness reward (graded, so selection has something to choose from)."""
    c = get_config("testbed")
    c.pretrained.model = str(pipe_dir)
    c.algorithm = algorithm
    c.update_from_flattened_dict({
        "save_path": str(tmp_path / "runs"), "exp_name": algorithm,
        "sample.num_steps": TESTBED_STEPS, "curriculum.split_left": 1, "curriculum.split_right": 4,
        "curriculum.total_stages": 2, "curriculum.stage_cnt": 1,
        "sample.batch_size": 2, "sample.num_batches_per_epoch": 1, "split_time": TESTBED_SPLIT_TIME,
        "eval.every": 0, "train.batch_size": 2, "train.num_epochs": 1, "reward.fn": "brightness",
        "logging.log_images": False, "train.trust_probe": False,
        # the preset's earlier regime, which these tests were written against (PPO, both signs, 4 rows a step)
        "prompt_file": str(Path(c.prompt_file).with_name("testbed_train.json")), "train.objective": "ppo",
        "train.learning_rate": 3e-3, "train.beta2": 1.0, "train.gradient_accumulation_steps": 4,
        "train.flush_accumulation_at_stage_end": False, "train.timesteps_per_call": 1, "sample.merge_lora": False,
        "sample.max_micro_batch": 256, "channels_last": False, "eval.dtype": "", **overrides,
    })  # fmt: skip
    return c
