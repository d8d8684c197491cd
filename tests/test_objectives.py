"""The objective seam and advantage-weighted matching (srrl/objectives): the forward process against diffusers', the
AWM loss against a hand computation, zero gradient without signal, the direction of one step, and a one-stage run
of each algorithm preset under it."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from diffusers import DDIMScheduler

import srrl.trainer
from srrl.curriculum import StagePlan
from srrl.ddim import forward_process
from srrl.objectives import OBJECTIVES, LossContext, get_objective
from srrl.objectives.awm import awm_loss, matching_error, matching_inputs
from srrl.sampling import GuidedDenoiser
from srrl.stage import sample_stage
from srrl.trainer import SRRLTrainer
from srrl.update import MicroStep
from tests.conftest import fast_config, loader

CPU = torch.device("cpu")


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_forward_process_matches_diffusers_add_noise_and_target(prediction_type):
    sched = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                          prediction_type=prediction_type)
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 4, 8, 8, generator=g)
    t = torch.tensor([999, 500, 1])
    x_t, target = forward_process(sched, x0, noise, t)
    torch.testing.assert_close(x_t, sched.add_noise(x0, noise, t))
    expected = {"epsilon": noise, "sample": x0, "v_prediction": sched.get_velocity(x0, noise, t)}[prediction_type]
    torch.testing.assert_close(target, expected)
    # by hand: x_t = sqrt(a) x0 + sqrt(1 - a) noise, v = sqrt(a) noise - sqrt(1 - a) x0
    a = sched.alphas_cumprod[t].reshape(-1, 1, 1, 1)
    torch.testing.assert_close(x_t, a.sqrt() * x0 + (1 - a).sqrt() * noise)
    if prediction_type == "v_prediction":
        torch.testing.assert_close(target, a.sqrt() * noise - (1 - a).sqrt() * x0)


def _stage(tiny_pipe_dir, tmp_path):
    config = fast_config(tiny_pipe_dir, tmp_path)
    model = loader("sd")(config, CPU, torch.float32)
    denoiser = GuidedDenoiser(model.denoiser, 64)
    plan = StagePlan(stage=0, resample_num=0, split_step=2, seed=1)
    traj, _ = sample_stage(model, denoiser, config, plan, ["a red circle", "a blue square"], [0, 1], CPU)
    traj = replace(traj, final_latents=traj.next_latents[:, -1])
    return model, denoiser, traj


def _micro(adv: list[float], steps: int, done: int = 1) -> MicroStep:
    n = len(adv)
    return MicroStep(torch.arange(n), torch.tensor(adv), torch.full((n,), 1.0 / n), torch.arange(steps).repeat(n, 1),
                     n, done)


def test_awm_loss_by_hand(tiny_pipe_dir, tmp_path):
    model, denoiser, traj = _stage(tiny_pipe_dir, tmp_path)
    ctx = LossContext(denoiser, model.sampler, traj, model.prompt_encoder.negative(), 0.1, 0.0, noise_seed=7)
    n = traj.latents.shape[0]
    adv = [float(i) - 2.0 for i in range(n)]
    micro = _micro(adv, 2)
    x_t, t, cond, target = matching_inputs(ctx, micro)
    # the inputs noise each row's *final* latent at its kept steps' timesteps (epsilon model: x0 from x_t, target)
    alpha = model.sampler.scheduler.alphas_cumprod[t].reshape(-1, 1, 1, 1)
    x0 = (x_t - (1 - alpha).sqrt() * target) / alpha.sqrt()
    torch.testing.assert_close(x0, traj.final_latents.repeat_interleave(2, dim=0), rtol=1e-4, atol=1e-4)
    assert t.tolist() == traj.timesteps.repeat(n).tolist()
    uncond = ctx.uncond.encoder_hidden_states.expand_as(cond.encoder_hidden_states)
    with torch.no_grad():  # the policy as it sampled: CFG at the trajectories' scale
        c = model.denoiser(x_t, t, encoder_hidden_states=cond.encoder_hidden_states).sample
        u = model.denoiser(x_t, t, encoder_hidden_states=uncond).sample
    pred = u + traj.guidance_scale * (c - u)
    err = ((pred - target) ** 2).mean(dim=(1, 2, 3))
    by_hand = sum(a * e / n for a, e in zip(torch.tensor(adv).repeat_interleave(2).tolist(), err.tolist(), strict=True))
    terms = awm_loss(ctx, micro)
    assert terms.loss.item() == pytest.approx(by_hand, rel=1e-5)
    assert terms.log_prob.tolist() == pytest.approx((-err).tolist(), rel=1e-5)
    # the same micro-step draws the same noise (probe recompute, resume); the next one fresh noise
    assert torch.equal(matching_inputs(ctx, micro)[0], x_t)
    assert not torch.equal(matching_inputs(ctx, _micro(adv, 2, done=2))[0], x_t)


def test_awm_without_signal_has_zero_gradient_and_one_step_follows_the_advantages(tiny_pipe_dir, tmp_path):
    model, denoiser, traj = _stage(tiny_pipe_dir, tmp_path)
    ctx = LossContext(denoiser, model.sampler, traj, model.prompt_encoder.negative(), 0.1, 0.0, noise_seed=3)
    params = [p for p in model.denoiser.parameters() if p.requires_grad]
    n = traj.latents.shape[0]
    awm_loss(ctx, _micro([0.0] * n, 2)).loss.backward()
    assert all(p.grad is None or not p.grad.any() for p in params)
    assert_one_step_follows_the_advantages(awm_loss, ctx, params, [1.0 if i % 2 == 0 else -1.0 for i in range(n)],
                                           lr=1e-2)


def assert_one_step_follows_the_advantages(loss_fn, ctx: LossContext, params, adv: list[float], lr: float) -> None:
    """One SGD step on ``loss_fn`` over two kept steps of rows with advantages ``adv`` lowers the matching error of
    the positive rows and raises that of the negative ones (on average)."""
    micro = _micro(adv, 2)
    before = -matching_error(ctx, micro)[0].detach()
    optimizer = torch.optim.SGD(params, lr=lr)
    optimizer.zero_grad()
    loss_fn(ctx, micro).loss.backward()
    optimizer.step()
    with torch.no_grad():
        after = -matching_error(ctx, micro)[0]
    sign = torch.tensor(adv).repeat_interleave(2)
    delta = after - before
    assert delta[sign > 0].mean() > 0 > delta[sign < 0].mean()  # positives' error down, negatives' up


def test_awm_kl_anchor_is_zero_for_the_base_model(tiny_pipe_dir, tmp_path):
    model, denoiser, traj = _stage(tiny_pipe_dir, tmp_path)
    ctx = LossContext(denoiser, model.sampler, traj, model.prompt_encoder.negative(), 0.1, 1.0, noise_seed=3)
    micro = _micro([1.0] * traj.latents.shape[0], 2)
    assert awm_loss(ctx, micro).kl.item() == 0.0
    with torch.no_grad():
        for name, p in model.denoiser.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    assert awm_loss(ctx, micro).kl.item() > 0


def test_unknown_objective_is_refused():
    assert set(OBJECTIVES) == {"ppo", "awm", "nft"}
    with pytest.raises(ValueError, match="known: ppo, awm, nft"):
        get_objective("dpo")


@pytest.mark.parametrize("objective", ["awm", "nft"])
@pytest.mark.parametrize("algorithm", ["srrl", "b2diffurl", "ddpo", "grpo"])
def test_one_forward_process_stage_of_each_preset_trains_on_final_latents(algorithm, objective, tiny_pipe_dir,
                                                                          tmp_path, monkeypatch):
    config = fast_config(tiny_pipe_dir, tmp_path, algorithm=algorithm, **{
        "curriculum.total_stages": 1, "eval.every": 0, "train.objective": objective, "train.beta2": 1.0,
        "select.pos_threshold": 0.0, "select.neg_threshold": 0.0})
    seen = []
    original = srrl.trainer.ppo_update

    def spy(*args, **kwargs):
        seen.append(args[6])
        return original(*args, **kwargs)

    monkeypatch.setattr(srrl.trainer, "ppo_update", spy)
    trainer = SRRLTrainer(config)
    before = {k: v.clone() for k, v in model_lora(trainer).items()}
    record = trainer.run_stage(trainer.plan(0))
    trainer.lock.release()
    samples = seen[0]
    assert samples.final_latents is not None
    assert torch.equal(samples.final_latents, samples.next_latents[:, -1])
    assert record["optimizer_steps"] >= 1
    assert any(not torch.equal(before[k], v) for k, v in model_lora(trainer).items())


def model_lora(trainer: SRRLTrainer) -> dict[str, torch.Tensor]:
    return {k: v.detach() for k, v in trainer.model.denoiser.named_parameters() if v.requires_grad}
