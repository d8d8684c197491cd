"""The EMA of the LoRA weights (train.ema_decay): its recurrence, that it leaves training alone, what the
held-out evaluation scores, the checkpoint form, and resume."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from diffusers import StableDiffusionPipeline
from safetensors.torch import load_file

import srrl.update
from srrl.ema import averaged_weights, make_ema
from srrl.errors import ConfigError
from srrl.trainer import train
from tests.conftest import fast_config


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def weights(directory: Path) -> dict[str, torch.Tensor]:
    return load_file(str(directory / "pytorch_lora_weights.safetensors"))


def test_average_follows_the_recurrence_and_swaps_back_exactly():
    param = torch.nn.Parameter(torch.zeros(3))
    assert make_ema([param], 0.0) is None
    ema = make_ema([param], 0.2)
    values = [torch.tensor([1.0, 2.0, 3.0]), torch.tensor([-1.0, 0.5, 4.0]), torch.tensor([2.0, 2.0, -2.0])]
    expected = None
    for k, value in enumerate(values):
        with torch.no_grad():
            param.copy_(value)
        ema.step([param])
        decay = 0.0 if k == 0 else 0.2  # the first step copies; then the constant decay (no warm-up)
        expected = value.clone() if expected is None else decay * expected + (1 - decay) * value
    own = param.detach().clone()
    with averaged_weights(ema, [param]):
        torch.testing.assert_close(param.detach(), expected, rtol=0, atol=1e-6)
    assert torch.equal(param.detach(), own)
    with averaged_weights(None, [param]):
        assert torch.equal(param.detach(), own)


@pytest.fixture(scope="module")
def runs(tiny_pipe_dir, tmp_path_factory) -> tuple[Path, Path]:
    tmp = tmp_path_factory.mktemp("ema")
    plain = train(fast_config(tiny_pipe_dir, tmp / "plain"))
    averaged = train(fast_config(tiny_pipe_dir, tmp / "ema", **{"train.ema_decay": 0.5}))
    return plain, averaged


def test_average_changes_what_is_evaluated_not_what_is_trained(runs, tiny_pipe_dir):
    plain, averaged = runs
    for stage in (0, 1):
        a = weights(plain / "checkpoints" / f"stage_{stage:03d}")
        b = weights(averaged / "checkpoints" / f"stage_{stage:03d}")
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # the same policy trains
    ev_plain, ev_avg = read_jsonl(plain / "eval.jsonl"), read_jsonl(averaged / "eval.jsonl")
    assert ev_plain[0]["reward_mean"] == ev_avg[0]["reward_mean"]  # before training: nothing to average
    assert ev_plain[-1]["reward_mean"] != ev_avg[-1]["reward_mean"]  # after: the average is scored
    ckpt = averaged / "checkpoints" / "stage_001"
    online, mean = weights(ckpt), weights(ckpt / "ema")
    assert mean.keys() == online.keys() and any(not torch.equal(mean[k], online[k]) for k in mean)
    assert json.loads((ckpt / "state.json").read_text())["ema"]["optimization_step"] > 1
    assert "ema" not in {p.name for p in (plain / "checkpoints" / "stage_001").iterdir()}
    pipe = StableDiffusionPipeline.from_pretrained(tiny_pipe_dir)
    pipe.load_lora_weights(ckpt / "ema")  # a stock LoRA directory


def test_resume_restores_the_average(runs, tiny_pipe_dir, tmp_path, monkeypatch):
    _, averaged = runs
    config = fast_config(tiny_pipe_dir, tmp_path, **{"train.ema_decay": 0.5})
    original = srrl.update.ppo_update

    def crash_in_stage_1(*args, **kwargs):
        if args[5].stage == 1:
            raise KeyboardInterrupt("killed")
        return original(*args, **kwargs)

    monkeypatch.setattr("srrl.trainer.ppo_update", crash_in_stage_1)
    with pytest.raises(KeyboardInterrupt):
        train(config)
    monkeypatch.setattr("srrl.trainer.ppo_update", original)
    run = Path(config.save_path) / config.exp_name
    train(fast_config(tiny_pipe_dir, tmp_path, resume_from=str(run), **{"train.ema_decay": 0.5}))
    got, want = weights(run / "checkpoints" / "stage_001" / "ema"), weights(averaged / "checkpoints" / "stage_001" / "ema")
    for key in want:
        torch.testing.assert_close(got[key], want[key], atol=1e-5, rtol=0)
    assert read_jsonl(run / "eval.jsonl")[-1]["reward_mean"] == pytest.approx(
        read_jsonl(averaged / "eval.jsonl")[-1]["reward_mean"], abs=1e-5)


def test_turning_the_average_on_at_resume_is_one_clear_line(runs, tiny_pipe_dir, tmp_path):
    plain, _ = runs
    run = tmp_path / "copy"
    shutil.copytree(plain, run)
    with pytest.raises(ConfigError, match="holds no weight average; train.ema_decay must stay 0"):
        train(fast_config(tiny_pipe_dir, tmp_path, resume_from=str(run), **{"train.ema_decay": 0.5}))


def test_a_damaged_average_makes_resume_fall_back_to_the_checkpoint_before(runs, tiny_pipe_dir, tmp_path, caplog):
    _, averaged = runs
    run = tmp_path / "copy"
    shutil.copytree(averaged, run)
    damaged = run / "checkpoints" / "stage_001" / "ema" / "pytorch_lora_weights.safetensors"
    damaged.write_bytes(damaged.read_bytes()[:100])
    train(fast_config(tiny_pipe_dir, tmp_path, resume_from=str(run), **{"train.ema_decay": 0.5}))
    assert "stage_001 is damaged" in caplog.text
    got, want = weights(run / "checkpoints" / "stage_001" / "ema"), weights(averaged / "checkpoints" / "stage_001" / "ema")
    for key in want:
        torch.testing.assert_close(got[key], want[key], atol=1e-5, rtol=0)
