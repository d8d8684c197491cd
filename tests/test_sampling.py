"""Reflection rounds, branched sampling and log-prob recomputation on a tiny random pipeline."""

from __future__ import annotations

import pytest
import torch

from srrl.curriculum import StagePlan
from srrl.models import CastDenoiser, inference_denoiser, merged_lora
from srrl.sampling import (
    GuidedDenoiser,
    denoise,
    initial_noise,
    invert,
    reflect,
    row_generators,
    sample_branched,
)
from srrl.stage import sample_stage
from tests.conftest import fast_config, loader

CPU = torch.device("cpu")


@pytest.fixture()
def model_and_config(family, family_pipe_dir, tmp_path):
    config = fast_config(family_pipe_dir, tmp_path)
    torch.manual_seed(0)
    model = loader(family)(config, CPU, torch.float32)
    return model, config


def test_reflection_shape_and_no_grad(model_and_config):
    model, config = model_and_config
    model.set_timesteps(4, CPU)
    den = GuidedDenoiser(model.denoiser, 64)
    cond = model.prompt_encoder.encode(["a red circle", "a blue square"])
    x_T = initial_noise(model.latent_shape, row_generators(0, [0, 1]), CPU, torch.float32)
    with torch.enable_grad():
        out = reflect(den, model.sampler, x_T, cond, model.prompt_encoder.negative(),
                      rounds=2, forward_guidance_scale=3.0, inverse_guidance_scale=0.1)
    assert out.shape == x_T.shape == (2, *model.latent_shape)
    assert out.grad_fn is None and not out.requires_grad
    assert not torch.allclose(out, x_T)
    assert den.calls == 2 * 2 * 4 * 1  # rounds x (denoise + invert) x steps, one doubled batch per call
    same = reflect(den, model.sampler, x_T, cond, model.prompt_encoder.negative(),
                   rounds=0, forward_guidance_scale=3.0, inverse_guidance_scale=0.1)
    assert torch.equal(same, x_T)


def test_inversion_round_trip_reconstructs(model_and_config):
    """Deterministic DDIM x_T -> x_0, inversion x_0 -> x_T', and x_T' -> x_0' reproduces x_0 (25 steps)."""
    model, _ = model_and_config
    model.set_timesteps(25, CPU)
    den = GuidedDenoiser(model.denoiser, 64)
    cond = model.prompt_encoder.encode(["a red circle", "a blue square"])
    uncond = model.prompt_encoder.negative()
    x_T = initial_noise(model.latent_shape, row_generators(1, [0, 1]), CPU, torch.float32)
    x_0 = denoise(den, model.sampler, x_T, cond, uncond, 1.0)
    x_T2 = invert(den, model.sampler, x_0, cond, uncond, 1.0)
    x_02 = denoise(den, model.sampler, x_T2, cond, uncond, 1.0)
    rel = (x_02 - x_0).norm() / x_0.norm()
    rel_noise = (x_T2 - x_T).norm() / x_T.norm()
    print(f"round trip: x_0 relative error {rel:.4f}, x_T relative error {rel_noise:.4f}")  # noqa: T201
    assert rel < 0.05, f"round-trip relative error {rel:.4f}"
    assert rel_noise < 0.2, f"inverted noise relative error {rel_noise:.4f}"


def _sample(model, config, prompts, rows, split_step=3, seed=5):
    plan = StagePlan(stage=0, resample_num=1, split_step=split_step, seed=seed)
    den = GuidedDenoiser(model.denoiser, 64)
    traj, images = sample_stage(model, den, config, plan, prompts, rows, CPU)
    return traj, images, den


def test_branches_share_prefix_and_differ_after(model_and_config):
    model, config = model_and_config
    traj, images, _ = _sample(model, config, ["a red circle", "a blue square"], [0, 1], split_step=3)
    k = config.split_time
    assert traj.latents.shape == (2 * k, 3, *model.latent_shape)
    assert traj.log_probs.shape == (2 * k, 3) and images.shape == (2 * k, 3, 16, 16)
    assert traj.prompts == ["a red circle"] * k + ["a blue square"] * k
    for g in range(2):
        sib = slice(g * k, (g + 1) * k)
        fork_state = traj.latents[sib, 0]
        assert all(torch.equal(fork_state[0], fork_state[i]) for i in range(1, k))  # shared prefix, exactly
        after = traj.next_latents[sib, 0]
        assert all(not torch.allclose(after[0], after[i]) for i in range(1, k))  # independent noise after
        finals = traj.final_latents[sib]
        assert all(not torch.allclose(finals[0], finals[i]) for i in range(1, k))
    assert not torch.equal(traj.latents[0, 0], traj.latents[k, 0])  # different prompts/noise per group
    torch.testing.assert_close(traj.latents[:, 1:], traj.next_latents[:, :-1])  # a chain: next feeds the step


def test_fork_at_first_step_keeps_all_steps(model_and_config):
    model, config = model_and_config
    traj, _, _ = _sample(model, config, ["a red circle"], [0], split_step=4)
    assert traj.timesteps.tolist() == model.sampler.timesteps.tolist()
    assert all(torch.equal(traj.latents[0, 0], traj.latents[i, 0]) for i in range(config.split_time))


def test_noise_does_not_depend_on_batching(model_and_config):
    model, config = model_and_config
    both, _, _ = _sample(model, config, ["a red circle", "a blue square"], [0, 1])
    second, _, _ = _sample(model, config, ["a blue square"], [1])
    k = config.split_time
    torch.testing.assert_close(both.next_latents[k:], second.next_latents, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(both.log_probs[k:], second.log_probs, atol=1e-4, rtol=1e-4)


def _rescored_ratio(model, config, traj) -> torch.Tensor:
    """exp(training-path log-prob - sampled log-prob) [N] of one stored step per row (a different step per row)."""
    den = GuidedDenoiser(model.denoiser, 4)  # other chunking than sampling
    n, s = traj.log_probs.shape
    rows = torch.arange(n)
    step_idx = torch.arange(n) % s  # a different step per row: batched timesteps
    lat, nxt = traj.latents[rows, step_idx], traj.next_latents[rows, step_idx]
    eps = den(lat, traj.timesteps[step_idx], traj.cond, model.prompt_encoder.negative(), config.sample.guidance_scale)
    logp = model.sampler.step(eps, traj.timesteps[step_idx], lat, traj.eta, prev_sample=nxt).log_prob
    return torch.exp(logp - traj.log_probs[rows, step_idx])


def test_recomputed_logprob_equals_sampling_logprob(model_and_config):
    """ratio == 1 before the first update: the training path re-scores stored steps to the sampled log-probs."""
    model, config = model_and_config
    traj, _, _ = _sample(model, config, ["a red circle", "a blue square"], [0, 1], split_step=3)
    ratio = _rescored_ratio(model, config, traj)
    torch.testing.assert_close(ratio, torch.ones_like(ratio), atol=1e-4, rtol=0)


def test_sampling_with_merged_lora(model_and_config):
    """sample.merge_lora: sampling with the adapters merged gives the unmerged trajectories up to float rounding,
    the (unmerged) training path re-scores them to ratio 1, and the base weights come back bit for bit."""
    model, config = model_and_config
    gen = torch.Generator().manual_seed(3)
    for name, param in model.denoiser.named_parameters():
        if "lora_B" in name:  # a trained-looking adapter (B starts at 0, which would make merging trivial)
            param.data = 0.05 * torch.randn(param.shape, generator=gen)
    before = {name: t.detach().clone() for name, t in model.denoiser.state_dict().items()}
    prompts = ["a red circle", "a blue square"]
    plain, _, _ = _sample(model, config, prompts, [0, 1])
    with merged_lora(model.denoiser):
        merged, _, _ = _sample(model, config, prompts, [0, 1])
    with merged_lora(model.denoiser, enabled=False):
        again, _, _ = _sample(model, config, prompts, [0, 1])
    for name, t in model.denoiser.state_dict().items():
        assert torch.equal(t, before[name]), name
    assert torch.equal(again.next_latents, plain.next_latents)  # unmerged again, and enabled=False is a no-op
    torch.testing.assert_close(merged.next_latents, plain.next_latents, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(merged.log_probs, plain.log_probs, atol=1e-3, rtol=1e-4)
    model.denoiser.disable_adapters()
    bare, _, _ = _sample(model, config, prompts, [0, 1])
    model.denoiser.enable_adapters()
    assert not torch.allclose(bare.next_latents, plain.next_latents, atol=1e-3)  # the adapters matter here
    ratio = _rescored_ratio(model, config, merged)
    torch.testing.assert_close(ratio, torch.ones_like(ratio), atol=1e-4, rtol=0)


def test_stochastic_held_out_images_are_seeded_and_batch_independent(tiny_pipe_dir, tmp_path):
    """eval.eta > 0: the held-out images are a pure function of (eval.seed, row) whatever the batch,
    and eta 0 keeps the deterministic sampler (other images)."""
    from srrl.stage import generate_eval_images

    config = fast_config(tiny_pipe_dir, tmp_path, **{"eval.eta": 1.0})
    model = loader("sd")(config, CPU, torch.float32)
    den = GuidedDenoiser(model.denoiser, 64)
    prompts = ["a red circle", "a blue square", "a green ring"]
    both = generate_eval_images(model, den, config, prompts, [0, 1, 2], CPU)
    alone = generate_eval_images(model, den, config, prompts[2:], [2], CPU)
    torch.testing.assert_close(both[2:], alone, atol=1e-5, rtol=0)
    assert not torch.equal(both, generate_eval_images(model, den, fast_config(tiny_pipe_dir, tmp_path), prompts,
                                                      [0, 1, 2], CPU))
    # the same images as sample_branched forking one child at the first step (which keeps the whole trajectory)
    model.set_timesteps(config.sample.num_steps, CPU)
    x_T = initial_noise(model.latent_shape, row_generators(config.eval.seed, [0, 1, 2], child=-2), CPU, torch.float32)
    cond, uncond = model.prompt_encoder.encode(prompts), model.prompt_encoder.negative()
    traj = sample_branched(den, model.sampler, x_T, prompts, cond, uncond, config.sample.num_steps, 1,
                           config.sample.guidance_scale, 1.0, config.eval.seed, [0, 1, 2])
    assert torch.equal(both, model.decode(traj.final_latents))


def test_held_out_guidance_scale_is_fixed_apart_from_the_training_one(tiny_pipe_dir, tmp_path):
    """eval.guidance_scale: 0 keeps sample.guidance_scale; a set value gives the held-out images of that scale
    whatever the training scale, so runs sampled at other scales are scored on the same images."""
    from srrl.stage import generate_eval_images

    prompts, rows = ["a red circle", "a blue square"], [0, 1]

    config = fast_config(tiny_pipe_dir, tmp_path)
    model = loader("sd")(config, CPU, torch.float32)  # the scales change only the config, so one model serves

    def images(**overrides):
        for key, value in {"eval.guidance_scale": 0.0, **overrides}.items():
            section, field = key.split(".")
            config[section][field] = value
        return generate_eval_images(model, GuidedDenoiser(model.denoiser, 64), config, prompts, rows, CPU)

    at_3 = images(**{"sample.guidance_scale": 3.0})
    assert torch.equal(images(**{"sample.guidance_scale": 3.0, "eval.guidance_scale": 0.0}), at_3)
    assert torch.equal(images(**{"sample.guidance_scale": 7.5, "eval.guidance_scale": 3.0}), at_3)
    assert not torch.equal(images(**{"sample.guidance_scale": 3.0, "eval.guidance_scale": 7.5}), at_3)


def test_inference_denoiser_in_another_dtype(model_and_config):
    """eval.dtype: a held-out pass runs a bfloat16 copy of the UNet with the LoRA merged in; its guided noise
    predictions match the float32 adapted UNet's to bf16 precision (not the base UNet's), in float32, and the
    policy's UNet is left bit for bit as it was. The run's own dtype gives the UNet itself."""
    model, config = model_and_config
    gen = torch.Generator().manual_seed(5)
    for name, param in model.denoiser.named_parameters():
        if "lora_B" in name:
            param.data = 0.2 * torch.randn(param.shape, generator=gen)
    before = {k: v.clone() for k, v in model.denoiser.state_dict().items()}
    x = initial_noise(model.latent_shape, row_generators(0, [0, 1, 2]), CPU, torch.float32)
    cond = model.prompt_encoder.encode(["a red circle", "a blue square", "a green ring"])
    uncond = model.prompt_encoder.negative()
    den = GuidedDenoiser(model.denoiser, 64)
    with torch.no_grad():
        adapted = den(x, 500, cond, uncond, 3.0)
        model.denoiser.disable_adapters()
        bare = den(x, 500, cond, uncond, 3.0)
        model.denoiser.enable_adapters()
        with inference_denoiser(model.denoiser, merge=False, dtype=torch.bfloat16) as unet:
            assert isinstance(unet, CastDenoiser) and {p.dtype for p in unet.parameters()} == {torch.bfloat16}
            cast = GuidedDenoiser(unet, 2)(x, 500, cond, uncond, 3.0)  # chunked: 6 rows in calls of 2
        with inference_denoiser(model.denoiser, merge=False, dtype=torch.float32) as same:
            assert same is model.denoiser
    assert cast.dtype == torch.float32
    error, adapter = (cast - adapted).abs().mean().item(), (bare - adapted).abs().mean().item()
    assert 0 < error < 0.05 * adapted.abs().mean().item() and error < adapter / 5, (error, adapter)
    for name, t in model.denoiser.state_dict().items():
        assert torch.equal(t, before[name]), name
