"""DiffusionNFT (srrl/objectives/nft.py) and its sampling policy (srrl.ema.OldPolicy): the x0 scale of each
prediction type, the loss against a hand computation, zero gradient without signal, the direction of one step,
the old policy's update, swap and checkpoint round trip."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDIMScheduler

from srrl.ddim import DDIMSampler
from srrl.ema import OLD_POLICY_FILE, OldPolicy
from srrl.errors import ConfigError, LoadError
from srrl.flow_match import FlowMatchSampler
from srrl.objectives import LossContext
from srrl.objectives.awm import matching_inputs
from srrl.objectives.nft import nft_loss, optimality, x0_scale
from srrl.trainer import SRRLTrainer, train
from tests.conftest import fast_config
from tests.test_objectives import _micro, _stage, assert_one_step_follows_the_advantages


def test_x0_scale_of_each_prediction_type():
    """``c`` with x0-error = c * output error: sigma (flow), sqrt((1-a)/a) (epsilon), sqrt(1-a) (v), 1 (sample)."""
    flow = FlowMatchSampler({"num_train_timesteps": 1000, "shift": 3.0})
    flow.set_timesteps(5, "cpu")
    t = flow.timesteps[[0, 2, 4]]
    torch.testing.assert_close(x0_scale(flow, t, 4).flatten(), flow.sigmas[[0, 2, 4]])
    for kind in ("epsilon", "v_prediction", "sample"):
        ddim = DDIMSampler(DDIMScheduler(prediction_type=kind).config)
        ddim.set_timesteps(5, "cpu")
        t = ddim.timesteps[[0, 3]]
        a = ddim.scheduler.alphas_cumprod[t]
        expected = {"epsilon": ((1 - a) / a).sqrt(), "v_prediction": (1 - a).sqrt(), "sample": torch.ones(2)}[kind]
        torch.testing.assert_close(x0_scale(ddim, t, 4).flatten(), expected, rtol=1e-5, atol=1e-6)


def test_optimality_maps_advantages_to_probabilities():
    adv = torch.tensor([-20.0, -5.0, 0.0, 2.5, 5.0, 9.0])
    assert optimality(adv, 5.0).tolist() == pytest.approx([0.0, 0.0, 0.5, 0.75, 1.0, 1.0])


def _nft_context(model, denoiser, traj, old: OldPolicy, beta: float = 1.0, kl: float = 0.0) -> LossContext:
    return LossContext(denoiser, model.sampler, traj, model.prompt_encoder.negative(), 0.1, kl, noise_seed=5,
                       old_policy=old.swapped, nft_beta=beta, nft_adv_clip=5.0)


def _lora(model) -> list[torch.nn.Parameter]:
    return [p for p in model.denoiser.parameters() if p.requires_grad]


def _perturb(model, std: float = 0.05) -> None:
    with torch.no_grad():
        for name, p in model.denoiser.named_parameters():
            if "lora_B" in name:
                p.add_(torch.randn_like(p) * std)


def test_nft_loss_by_hand(tiny_pipe_dir, tmp_path):
    model, denoiser, traj = _stage(tiny_pipe_dir, tmp_path)
    old = OldPolicy(_lora(model), 0.001, 0.5)
    _perturb(model)  # the trained weights move away from the sampling policy's
    beta = 0.7
    ctx = _nft_context(model, denoiser, traj, old, beta)
    n = traj.latents.shape[0]
    adv = [2.0 * i - n for i in range(n)]
    micro = _micro(adv, 2)
    x_t, t, cond, target = matching_inputs(ctx, micro)
    with torch.no_grad():
        pred = denoiser(x_t, t, cond, ctx.uncond, traj.guidance_scale)
        with old.swapped():
            prev = denoiser(x_t, t, cond, ctx.uncond, traj.guidance_scale)
    assert not torch.allclose(pred, prev)
    alpha = model.sampler.scheduler.alphas_cumprod[t].reshape(-1, 1, 1, 1)
    c = ((1 - alpha) / alpha).sqrt()  # epsilon model: x0 = (x_t - sqrt(1 - a) eps) / sqrt(a)

    def weighted(out):
        e = c * (out - target)
        return (e**2).mean(dim=(1, 2, 3)) / e.abs().mean(dim=(1, 2, 3)).clamp_min(1e-5)

    pos, neg = weighted(beta * pred + (1 - beta) * prev), weighted((1 + beta) * prev - beta * pred)
    r = (torch.tensor(adv).repeat_interleave(2) / 5.0 / 2 + 0.5).clamp(0, 1)
    by_hand = (5.0 * (r * pos + (1 - r) * neg) / beta / n).sum()
    assert nft_loss(ctx, micro).loss.item() == pytest.approx(by_hand.item(), rel=1e-5)


def test_nft_without_signal_has_zero_gradient_and_one_step_follows_the_advantages(tiny_pipe_dir, tmp_path):
    model, denoiser, traj = _stage(tiny_pipe_dir, tmp_path)
    params = _lora(model)
    old = OldPolicy(params, 0.001, 0.5)  # on-policy: theta == theta_old
    ctx = _nft_context(model, denoiser, traj, old)
    n = traj.latents.shape[0]
    nft_loss(ctx, _micro([0.0] * n, 2)).loss.backward()  # r = 1/2 everywhere
    assert all(p.grad is None or p.grad.abs().max() < 1e-7 for p in params)
    assert_one_step_follows_the_advantages(nft_loss, ctx, params, [3.0 if i % 2 == 0 else -3.0 for i in range(n)],
                                           lr=2e-3)


def test_old_policy_update_swap_and_state():
    params = [torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.ones(2, 2))]
    old = OldPolicy(params, rate=0.1, cap=0.25)
    assert [old.decay(s) for s in (0, 1, 2, 5)] == pytest.approx([0.1, 0.2, 0.25, 0.25])
    with torch.no_grad():
        params[0].fill_(1.0)
        params[1].fill_(3.0)
    old.update(0)  # eta 0.1: 0.1 * old + 0.9 * theta
    torch.testing.assert_close(old.weights[0], torch.full((3,), 0.9))
    torch.testing.assert_close(old.weights[1], torch.full((2, 2), 0.1 + 2.7))
    own = [p.detach().clone() for p in params]
    with old.swapped():
        assert torch.equal(params[0].detach(), old.weights[0])
    assert all(torch.equal(p.detach(), o) for p, o in zip(params, own, strict=True))
    again = OldPolicy(params, 0.1, 0.25)
    again.load(old.state())
    assert all(torch.equal(a, b) for a, b in zip(again.weights, old.weights, strict=True))
    with pytest.raises(LoadError, match="does not fit"):
        again.load({"0": torch.zeros(3)})
    with pytest.raises(LoadError, match="non-finite"):
        again.load({"0": torch.full((3,), float("nan")), "1": torch.zeros(2, 2)})


def test_an_nft_run_samples_with_the_old_policy_and_resumes_it(tiny_pipe_dir, tmp_path):
    overrides = {"algorithm": "grpo", "train.objective": "nft", "eval.every": 0, "curriculum.total_stages": 2,
                 "train.nft_old_decay_rate": 0.2}
    run = train(fast_config(tiny_pipe_dir, tmp_path, **overrides))
    saved = (run / "checkpoints" / "stage_001" / OLD_POLICY_FILE)
    assert saved.is_file()
    trainer = SRRLTrainer(fast_config(tiny_pipe_dir, tmp_path, **{**overrides, "resume_from": str(run),
                                                                   "curriculum.total_stages": 3}))
    from safetensors.torch import load_file

    state = load_file(str(saved))
    assert all(torch.equal(w, state[str(i)]) for i, w in enumerate(trainer.old_policy.weights))
    lora = [p.detach() for p in trainer.params]
    assert any(not torch.equal(w, p) for w, p in zip(trainer.old_policy.weights, lora, strict=True))  # eta > 0
    trainer.lock.release()
    saved.unlink()  # a run that was not nft (or lost the file) cannot resume as nft: one ConfigError
    with pytest.raises(ConfigError, match="holds no sampling policy"):
        SRRLTrainer(fast_config(tiny_pipe_dir, tmp_path, **{**overrides, "resume_from": str(run),
                                                            "curriculum.total_stages": 3}))
