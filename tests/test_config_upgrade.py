"""One upgrade step for configs of older runs, and the hand-ins the core gets from the entry wiring."""

from __future__ import annotations

import ml_collections
import pytest

from config.stage_process import PRESETS, get_config
from srrl.errors import ConfigError, LoadError
from srrl.runconfig import RENAMED, UPGRADES, resume_changes, set_fields, upgrade_config


def test_presets_need_no_upgrade():
    """Every field the upgrade fills exists in every preset, so a fresh run is never changed by it."""
    for preset in PRESETS:
        assert upgrade_config(get_config(preset)) == [], preset


def test_an_old_config_gets_the_values_older_runs_ran_with_and_renamed_fields_move():
    old = ml_collections.ConfigDict({"eval": {"pos_threshold": 0.25, "history_cnt": 4, "every": 1}, "train": {}})
    old.lock()
    changed = upgrade_config(old)
    assert "eval.pos_threshold -> select.pos_threshold" in changed and "family" in changed
    assert old.select.pos_threshold == 0.25 and old.select.history_cnt == 4 and "pos_threshold" not in old.eval
    assert old.select.history_window == "appearance"  # how runs before the field normalised
    assert (old.family, old.train.timesteps_per_call, old.eval.verifier) == ("sd", 1, False)
    assert upgrade_config(old) == []  # idempotent
    assert set(RENAMED.values()).isdisjoint(RENAMED)  # no chains


def test_resume_compares_an_old_recorded_config_under_the_new_names():
    requested = get_config("tiny").to_dict()
    recorded = get_config("tiny").to_dict()
    sel = recorded.pop("select")
    recorded["eval"].update({k: v for k, v in sel.items()})
    assert resume_changes(requested, recorded) == []
    recorded["eval"]["history_window"] = "appearance"
    with pytest.raises(ConfigError, match="select.history_window"):
        resume_changes(requested, recorded)
    assert all(key.count(".") <= 1 for key in UPGRADES)


def test_a_model_source_not_registered_is_one_load_error():
    from srrl.models import MODEL_SOURCES, resolve_model

    saved = dict(MODEL_SOURCES)
    MODEL_SOURCES.clear()
    try:
        with pytest.raises(LoadError, match="no model source 'builtin': is registered"):
            resolve_model("builtin:tiny-sdxl")
        assert resolve_model("CompVis/stable-diffusion-v1-4") == "CompVis/stable-diffusion-v1-4"
    finally:
        MODEL_SOURCES.update(saved)
    import cli.wiring  # noqa: F401  (registers the testbed's built-in models)

    assert "builtin" in MODEL_SOURCES
    with pytest.raises(LoadError, match="unknown built-in model"):
        resolve_model("builtin:no-such-model")


def test_a_model_that_does_not_load_names_the_hf_download_command(tmp_path):
    """The hint is today's CLI (``hf download``, not the retired ``huggingface-cli``), with the model's name."""
    import torch

    from srrl.models import load_pipeline

    class Unloadable:
        @classmethod
        def from_pretrained(cls, source, **kwargs):
            raise OSError(f"{source} is not a pipeline\nsecond line")

    with pytest.raises(LoadError) as hub:
        load_pipeline(Unloadable, "CompVis/stable-diffusion-v1-4", "", torch.float32)
    message = str(hub.value)
    assert "(`hf download CompVis/stable-diffusion-v1-4`)" in message and "huggingface-cli" not in message
    assert "\n" not in message and "(the hub id)" in message
    with pytest.raises(LoadError) as folder:
        load_pipeline(Unloadable, str(tmp_path), "", torch.float32)
    assert f"`hf download REPO_ID --local-dir {tmp_path}`" in str(folder.value)
    assert "(the local folder)" in str(folder.value)


def test_eval_verifier_without_a_verifier_handed_in_is_one_config_error(tiny_pipe_dir, tmp_path):
    from srrl.trainer import SRRLTrainer
    from tests.conftest import fast_config

    config = fast_config(tiny_pipe_dir, tmp_path, **{"eval.verifier": True})
    with pytest.raises(ConfigError, match="eval.verifier=True: no verifier was handed in"):
        SRRLTrainer(config)
    assert not (tmp_path / "runs").exists()


def test_set_fields_casts_to_the_field_type():
    config = get_config("testbed")
    set_fields(config, ["lora_rank=8", "train.learning_rate=0.5", "sample.merge_lora=False", "prompt_file=x.json"])
    assert config.lora_rank == 8 and config.train.learning_rate == 0.5 and config.sample.merge_lora is False
    assert config.prompt_file == "x.json"
    with pytest.raises(KeyError):
        set_fields(config, ["train.no_such_field=1"])
