"""GRPO's group advantages and preset, and the KL anchor to the base model."""

from __future__ import annotations

import math

import pytest
import torch

import srrl.trainer
from srrl.advantages import ADVANTAGE_RULES, GROUP_EPS, StageScores, group_advantages
from srrl.algorithms import get_algorithm
from srrl.curriculum import StagePlan
from srrl.models import lora_disabled
from srrl.objectives.ppo import micro_step_loss
from srrl.ppo import PPOTerms, gaussian_kl, with_kl_anchor
from srrl.sampling import GuidedDenoiser
from srrl.stage import sample_stage
from srrl.trainer import SRRLTrainer
from srrl.update import MicroStep
from tests.conftest import fast_config, loader

CPU = torch.device("cpu")


def test_group_advantages_on_hand_made_groups():
    rewards = torch.tensor([1.0, 3.0, 2.0, 2.0, 5.0, 5.0, 5.0, 5.0])  # groups of 4: varied, then all equal
    adv = group_advantages(rewards, 4)
    std = math.sqrt((1 + 1 + 0 + 0) / 4)  # mean 2, population std 0.7071
    expected = [(r - 2.0) / (std + GROUP_EPS) for r in (1.0, 3.0, 2.0, 2.0)] + [0.0] * 4
    assert adv.tolist() == pytest.approx(expected, rel=1e-6)
    assert torch.equal(adv[4:], torch.zeros(4))  # equal rewards: nothing to learn, no division by zero
    with_nan = group_advantages(torch.tensor([1.0, float("nan"), 3.0, 0.0]), 2)
    assert math.isnan(with_nan[1]) and with_nan[0] == 0.0  # a group of one finite reward
    assert with_nan[2:].tolist() == pytest.approx([1.5 / (1.5 + GROUP_EPS), -1.5 / (1.5 + GROUP_EPS)])
    with pytest.raises(ValueError, match="groups of 3"):
        group_advantages(torch.zeros(4), 3)


def test_grpo_rule_trains_every_finite_image_without_history(tiny_pipe_dir, tmp_path):
    config = fast_config(tiny_pipe_dir, tmp_path)
    scores = StageScores(["a", "a", "b", "b"], torch.tensor([0.0, 1.0, 2.0, float("inf")]), 2, stage=0)
    selection, history = ADVANTAGE_RULES["group_normalised"](scores, {"a": [[0, [9.0]]]}, config)
    assert selection.rows.tolist() == [0, 1, 2] and history == {"a": [[0, [9.0]]]}
    assert selection.advantages.tolist() == pytest.approx([-0.5 / (0.5 + GROUP_EPS), 0.5 / (0.5 + GROUP_EPS), 0.0])
    assert get_algorithm("grpo") == get_algorithm("grpo").__class__("grpo", False, False, "group_normalised")


def test_one_grpo_stage_forks_nothing_and_trains_every_image_on_every_step(tiny_pipe_dir, tmp_path, monkeypatch):
    config = fast_config(tiny_pipe_dir, tmp_path, algorithm="grpo", **{"curriculum.total_stages": 1,
                                                                        "eval.every": 0, "train.beta2": 1.0})
    trained = []
    original = srrl.trainer.ppo_update

    def spy(*args, **kwargs):
        trained.append((args[6], args[7]))
        return original(*args, **kwargs)

    monkeypatch.setattr(srrl.trainer, "ppo_update", spy)
    trainer = SRRLTrainer(config)
    record = trainer.run_stage(trainer.plan(0))
    trainer.lock.release()
    samples, advantages = trained[0]
    images = config.sample.batch_size * config.sample.num_batches_per_epoch * config.split_time
    assert samples.latents.shape[:2] == (images, config.sample.num_steps)  # every image, every step
    assert samples.group_size == 1  # independent trajectories: nothing shared
    first = samples.latents[:, 0].reshape(images // config.split_time, config.split_time, -1)
    assert all(not torch.equal(g[0], g[1]) for g in first)  # each image its own x_T
    assert record["resample_num"] == 0 and advantages.numel() == images
    assert record["n_pos"] + record["n_neg"] == images and record["kl"] is None


def test_gaussian_kl_by_hand():
    mean = torch.tensor([[1.0, 2.0], [3.0, 4.0], [1.0, 1.0]])
    std = torch.tensor([[0.5], [0.5], [0.0]])
    kl = gaussian_kl(mean, torch.zeros_like(mean), std)
    assert kl.tolist() == [5.0, 25.0, 0.0]  # mean(1, 4) / 0.5, mean(9, 16) / 0.5; deterministic row: 0
    terms = PPOTerms(torch.tensor(1.0), torch.ones(3), torch.tensor(0.0), torch.tensor(0.0))
    anchored = with_kl_anchor(terms, kl, 0.1, torch.tensor([0.5, 0.5, 0.0]))
    assert anchored.loss.item() == pytest.approx(1.0 + 0.1 * (2.5 + 12.5)) and anchored.kl.item() == 10.0


def _micro(n: int, steps: int) -> MicroStep:
    return MicroStep(torch.arange(n), torch.ones(n), torch.full((n,), 1.0 / n),
                     torch.arange(steps).repeat(n, 1), n, 1)


def test_kl_anchor_is_zero_for_the_base_model_and_matches_the_two_means(tiny_pipe_dir, tmp_path):
    config = fast_config(tiny_pipe_dir, tmp_path, **{"sample.eta": 1.0})
    model = loader("sd")(config, CPU, torch.float32)
    denoiser = GuidedDenoiser(model.denoiser, 64)
    traj, _ = sample_stage(model, denoiser, config, StagePlan(stage=0, resample_num=0, split_step=2, seed=1), ["a red circle"], [0], CPU)
    uncond, micro = model.prompt_encoder.negative(), _micro(traj.latents.shape[0], 2)
    fresh = micro_step_loss(denoiser, model.sampler, traj, micro, uncond, 0.2, kl_coef=1.0)
    assert fresh.kl.item() == 0.0  # LoRA B starts at 0: the policy is the base model
    with torch.no_grad():
        for name, p in model.denoiser.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    with lora_disabled(model.denoiser):
        disabled = micro_step_loss(denoiser, model.sampler, traj, micro, uncond, 0.2, kl_coef=1.0)
    assert disabled.kl.item() == 0.0
    moved = micro_step_loss(denoiser, model.sampler, traj, micro, uncond, 0.2, kl_coef=1.0)
    plain = micro_step_loss(denoiser, model.sampler, traj, micro, uncond, 0.2, kl_coef=0.0)
    assert moved.kl.item() > 0 and plain.kl is None
    # by hand: the two Gaussians' means at the stored inputs, the same std
    rows, steps = micro.rows.repeat_interleave(2), micro.step_index.reshape(-1)
    x, t = traj.latents[rows, steps], traj.timesteps[steps]
    cond = traj.cond.index(micro.rows).repeat_interleave(2)
    with torch.no_grad():
        policy = model.sampler.step(denoiser(x, t, cond, uncond, traj.guidance_scale), t, x, traj.eta,
                                    prev_sample=traj.next_latents[rows, steps])
        with lora_disabled(model.denoiser):
            base = model.sampler.step(denoiser(x, t, cond, uncond, traj.guidance_scale), t, x, traj.eta,
                                      prev_sample=traj.next_latents[rows, steps])
    by_hand = ((policy.mean - base.mean) ** 2).mean(dim=(1, 2, 3)) / (2 * policy.std.reshape(-1) ** 2)
    assert moved.kl.item() == pytest.approx(by_hand.mean().item(), rel=1e-5)
    weights = micro.weights.repeat_interleave(2)
    assert moved.loss.item() == pytest.approx(plain.loss.item() + (by_hand * weights).sum().item(), rel=1e-5)
