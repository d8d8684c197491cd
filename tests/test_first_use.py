"""What a new user meets first: bfloat16 only where the device has it, progress bars whose totals are right,
one summary line per stage."""

from __future__ import annotations

import logging

import pytest
import torch

import srrl.heldout
import srrl.sampling
from srrl.curriculum import StagePlan
from srrl.families.sd import load_sd_model
from srrl.heldout import eval_dtype
from srrl.sampling import GuidedDenoiser
from srrl.stage import generate_eval_images, sample_stage
from srrl.trainer import stage_summary
from tests.conftest import tiny_testbed_config

CPU = torch.device("cpu")


def test_bfloat16_is_used_only_where_the_cpu_has_it(tmp_path, monkeypatch, caplog):
    config = tiny_testbed_config(tmp_path, tmp_path, "srrl", **{"eval.dtype": "bfloat16"})
    monkeypatch.setattr(srrl.heldout, "device_has_bf16", lambda device: True)
    assert eval_dtype(config, CPU) is torch.bfloat16
    monkeypatch.setattr(srrl.heldout, "device_has_bf16", lambda device: False)
    monkeypatch.setattr(srrl.heldout, "_NOTED", set())
    with caplog.at_level(logging.INFO, logger="srrl.heldout"):
        assert eval_dtype(config, CPU) is None and eval_dtype(config, CPU) is None  # the run's float32
    assert sum("no native bfloat16" in r.getMessage() for r in caplog.records) == 1  # logged once
    config.eval.dtype = "float16"
    assert eval_dtype(config, CPU) is torch.float16  # only bfloat16 is emulated where it is absent


class Recorder:
    """A stand-in for tqdm that records each bar's description, total and rows counted."""

    bars: list[Recorder] = []

    def __init__(self, total: int, desc: str, disable: bool = False, **_) -> None:
        self.total, self.desc, self.n, self.disable = total, desc, 0, disable
        Recorder.bars.append(self)

    def update(self, k: int) -> None:
        self.n += k

    def close(self) -> None:
        pass


@pytest.mark.parametrize("algorithm, fork, rounds", [("srrl", True, 2), ("ddpo", False, 0)])
def test_progress_bars_count_every_unet_row_they_announce(testbed_pipe_dir, tmp_path, monkeypatch, algorithm,
                                                           fork, rounds):
    monkeypatch.setattr(srrl.sampling, "tqdm", Recorder)
    Recorder.bars = []
    config = tiny_testbed_config(testbed_pipe_dir, tmp_path, algorithm, **{"reflect.inverse_guidance_scale": 1.0})
    model = load_sd_model(config, CPU, torch.float32)
    plan = StagePlan(stage=3, resample_num=rounds, split_step=2, seed=5)
    denoiser = GuidedDenoiser(model.denoiser, 7)  # chunks of 7 rows: totals must not depend on chunking
    sample_stage(model, denoiser, config, plan, ["a red circle", "a blue square"], [0, 1], CPU, fork=fork,
                 progress=True)
    generate_eval_images(model, denoiser, config, ["a red circle"] * 3, [0, 1, 2], CPU, progress=True)
    assert [b.desc for b in Recorder.bars] == ["reflect stage 3", "sample stage 3", "held-out images"]
    assert all(b.n == b.total for b in Recorder.bars), [(b.desc, b.n, b.total) for b in Recorder.bars]
    assert Recorder.bars[0].disable == (rounds == 0) and Recorder.bars[1].total > 0


def test_stage_summary_is_one_line_with_the_essentials():
    record = {"stage": 4, "reward_mean": 0.61234, "reward_std": 0.2, "n_pos": 7, "n_neg": 3, "optimizer_steps": 5,
              "approx_kl": 0.00012, "clipfrac": None, "nonfinite_rewards": 2, "skipped_steps": 0,
              "time_stage_s": 8.04, "time_sample_s": 3.0, "time_reward_s": 0.1, "time_train_s": 4.9}
    line = stage_summary(record, 10)
    assert "\n" not in line
    for part in ("stage 4 (5/10)", "reward 0.6123", "7 positives / 3 negatives", "5 optimizer steps",
                 "approx-KL 0.00012", "clip fraction -", "2 nonfinite rewards", "8.0 s"):
        assert part in line, (part, line)
    assert "skipped" not in line


def test_rewards_are_scored_in_chunks_with_a_bar(monkeypatch):
    import srrl.stage
    from srrl.stage import score_images

    calls = []

    def reward(images, prompts):
        calls.append(len(prompts))
        assert len(prompts) == images.shape[0]
        return images.mean(dim=(1, 2, 3)).double()

    images = torch.rand(10, 3, 4, 4)
    bars = []
    real_tqdm = srrl.stage.tqdm
    monkeypatch.setattr(srrl.stage, "tqdm", lambda it, **kw: bars.append(kw["desc"]) or real_tqdm(it, **kw))
    got = score_images(reward, images, [f"p{i}" for i in range(10)], 4, "reward stage 2", progress=True)
    assert calls == [4, 4, 2] and bars == ["reward stage 2"] and got.dtype == torch.float32
    torch.testing.assert_close(got, images.mean(dim=(1, 2, 3)))
