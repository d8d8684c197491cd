"""Prompt-file entries may be objects with metadata, and rewards that ask for it get it per image."""

from __future__ import annotations

import json

import pytest
import torch

from rewards import rewards as rw
from srrl.errors import ConfigError
from srrl.trainer import SRRLTrainer
from srrl.validate import load_prompt_entries, load_prompt_file, prompt_metadata
from tests.conftest import fast_config

CPU = torch.device("cpu")


def test_entries_are_strings_or_objects_with_a_prompt(tmp_path):
    path = tmp_path / "p.json"
    path.write_text(json.dumps(["a red square", {"prompt": "two cats", "count": 2}, "a red square"]))
    entries = load_prompt_entries(str(path), "prompt_file")
    assert entries == [{"prompt": "a red square"}, {"prompt": "two cats", "count": 2}, {"prompt": "a red square"}]
    assert load_prompt_file(str(path), "prompt_file") == ["a red square", "two cats", "a red square"]
    assert prompt_metadata(entries) == {"two cats": {"count": 2}}
    for bad, message in [([{"count": 2}], "entry 0"), ([""], "entry 0"), ([3], "entry 0"),
                         ([{"prompt": "x", "n": 1}, {"prompt": "x", "n": 2}], "two different metadata")]:
        path.write_text(json.dumps(bad))
        with pytest.raises(ConfigError, match=message):
            load_prompt_entries(str(path), "prompt_file")


@pytest.fixture()
def metadata_reward():
    seen: list[list[dict]] = []

    def factory(device, options):
        def score(images, prompts, metadata):
            seen.append(metadata)
            return torch.tensor([float(m.get("target", 0.0)) for m in metadata])

        return score

    rw.register("test_metadata")(factory)
    yield seen
    del rw.REWARDS["test_metadata"]


def test_rewards_with_a_metadata_parameter_get_it_and_others_do_not(metadata_reward):
    images = torch.rand(3, 3, 8, 8)
    prompts = ["a", "b", "a"]
    fn = rw.build_reward("test_metadata", CPU, {}, {"a": {"target": 0.5}})
    torch.testing.assert_close(fn(images, prompts), torch.tensor([0.5, 0.0, 0.5]))
    assert metadata_reward[-1] == [{"target": 0.5}, {}, {"target": 0.5}]
    mixed = rw.build_reward({"test_metadata": 1.0, "brightness": 1.0}, CPU, {}, {"b": {"target": 2.0}})
    torch.testing.assert_close(mixed(images, prompts), torch.tensor([0.0, 2.0, 0.0]) + images.mean(dim=(1, 2, 3)))


def test_the_trainer_hands_prompt_file_metadata_to_the_reward(tiny_pipe_dir, tmp_path, metadata_reward):
    config = fast_config(tiny_pipe_dir, tmp_path, **{"curriculum.total_stages": 1, "eval.every": 0,
                                                      "reward.fn": "test_metadata"})
    path = tmp_path / "meta_prompts.json"
    path.write_text(json.dumps([{"prompt": "a green ring", "target": 1.0}, "a yellow triangle"]))
    config.prompt_file = str(path)
    SRRLTrainer(config).run()
    (seen,) = metadata_reward
    assert seen and {m.get("target") for m in seen} <= {1.0, None} and any(m == {"target": 1.0} for m in seen)
