"""GPU options that keep results: gradient checkpointing trains the same LoRA; torch.compile of the UNet runs a
stage (its results differ only at float-rounding level, so it is off by default)."""

from __future__ import annotations

import pytest
import torch

from srrl.models import lora_state_dict
from srrl.trainer import SRRLTrainer
from tests.conftest import fast_config

ONE_STAGE = {"curriculum.total_stages": 1, "eval.every": 0}


def _trained_lora(pipe_dir, tmp_path, **overrides) -> dict[str, torch.Tensor]:
    trainer = SRRLTrainer(fast_config(pipe_dir, tmp_path, **ONE_STAGE, **overrides))
    record = trainer.run_stage(trainer.plan(0))
    trainer.lock.release()
    assert record["optimizer_steps"] >= 1
    return lora_state_dict(trainer.accelerator.unwrap_model(trainer.network))


def test_gradient_checkpointing_trains_the_same_lora(tiny_pipe_dir, tmp_path):
    plain = _trained_lora(tiny_pipe_dir, tmp_path / "a")
    checkpointed = _trained_lora(tiny_pipe_dir, tmp_path / "b", **{"train.gradient_checkpointing": True})
    assert plain.keys() == checkpointed.keys()
    for key, value in plain.items():
        torch.testing.assert_close(checkpointed[key], value, rtol=1e-5, atol=1e-6)
    base = SRRLTrainer(fast_config(tiny_pipe_dir, tmp_path / "c", **ONE_STAGE))
    base.lock.release()
    assert any(not torch.equal(v, lora_state_dict(base.model.denoiser)[k]) for k, v in plain.items())  # it trained


@pytest.mark.slow
def test_compiled_unet_runs_a_stage_close_to_eager(tiny_pipe_dir, tmp_path):
    eager = _trained_lora(tiny_pipe_dir, tmp_path / "a")
    compiled = _trained_lora(tiny_pipe_dir, tmp_path / "b", compile_denoiser=True)
    for key, value in eager.items():
        torch.testing.assert_close(compiled[key], value, rtol=1e-3, atol=1e-4)
