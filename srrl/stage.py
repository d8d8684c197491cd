"""The sampling phases of one SRRL stage (reflection, branched sampling, scoring) and held-out generation; the
PPO update is :mod:`srrl.update`."""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Sequence

import torch
from tqdm.auto import tqdm

from srrl.curriculum import StagePlan
from srrl.models import DiffusionModel
from srrl.profiling import timed
from srrl.sampling import (
    GuidedDenoiser,
    Trajectories,
    denoise,
    guided_rows,
    initial_noise,
    reflect,
    row_generators,
    sample_branched,
)

logger = logging.getLogger(__name__)


def choose_prompts(prompts: Sequence[str], count: int, seed: int, random_choose: bool) -> list[str]:
    """``count`` prompts for a stage: uniform draws seeded by the stage seed, or round-robin from the start."""
    if random_choose:
        rng = random.Random(seed)
        return [rng.choice(list(prompts)) for _ in range(count)]
    return [prompts[i % len(prompts)] for i in range(count)]


def score_images(
    reward_fn: Callable[[torch.Tensor, list[str]], torch.Tensor],
    images: torch.Tensor,
    prompts: Sequence[str],
    batch_size: int,
    desc: str,
    progress: bool = False,
) -> torch.Tensor:
    """``reward_fn`` over ``images`` [N, 3, H, W] in chunks of ``batch_size`` (the reward's own batch size, so the
    reward models see the batches they would anyway), with a progress bar over the chunks; rewards [N] float32."""
    chunks = []
    for start in tqdm(range(0, images.shape[0], batch_size), desc=desc, unit="batch", leave=False,
                      disable=not progress):
        part = slice(start, start + batch_size)
        chunks.append(reward_fn(images[part], list(prompts[part])).float())
    return torch.cat(chunks) if chunks else torch.zeros(0)


@torch.no_grad()
def sample_stage(
    model: DiffusionModel,
    denoiser: GuidedDenoiser,
    config,
    plan: StagePlan,
    prompts: Sequence[str],
    row_ids: Sequence[int],
    device: torch.device,
    fork: bool = True,
    progress: bool = False,
) -> tuple[Trajectories, torch.Tensor]:
    """Reflection rounds then branched sampling for ``prompts`` (one per row); returns trajectories and images.

    Images are [N, 3, H, W] in [0, 1] on CPU, N = len(prompts) * split_time, siblings contiguous. With
    ``fork=False`` (DDPO) the ``split_time`` images of a prompt are independent trajectories instead.
    ``progress``: bars over the denoiser rows of the reflection rounds and of the sampling.
    """
    model.set_timesteps(config.sample.num_steps, device)
    split_time = config.split_time
    if not fork:  # every image its own trajectory: one row per image, ids keyed by (prompt row, child)
        prompts = [p for p in prompts for _ in range(split_time)]
        row_ids = [r * split_time + k for r in row_ids for k in range(split_time)]
        split_time = 1
    cond = model.prompt_encoder.encode(prompts)
    uncond = model.prompt_encoder.negative()
    x_T = initial_noise(model.latent_shape, row_generators(plan.seed, row_ids, child=-2), device, model.weight_dtype)
    n, steps, r = len(prompts), config.sample.num_steps, config.reflect
    one = denoiser.embedded_guidance
    reflect_rows = plan.resample_num * steps * n * (guided_rows(1, r.forward_guidance_scale, one) + (
        1 + r.inversion_iterations) * guided_rows(1, r.inverse_guidance_scale, one))
    with timed("reflect"), denoiser.progress(f"reflect stage {plan.stage}", reflect_rows, progress and reflect_rows > 0):
        x_T = reflect(
            denoiser,
            model.sampler,
            x_T,
            cond,
            uncond,
            plan.resample_num,
            config.reflect.forward_guidance_scale,
            config.reflect.inverse_guidance_scale,
            config.reflect.inversion_iterations,
        )
    sample_rows = guided_rows((steps - plan.split_step) * n + plan.split_step * n * split_time,
                              config.sample.guidance_scale, one)
    with timed("sample"), denoiser.progress(f"sample stage {plan.stage}", sample_rows, progress):
        traj = sample_branched(
            denoiser,
            model.sampler,
            x_T,
            prompts,
            cond,
            uncond,
            plan.split_step,
            split_time,
            config.sample.guidance_scale,
            config.sample.eta,
            plan.seed,
            row_ids,
        )
    images = model.decode(traj.final_latents).cpu()
    return traj, images


@torch.no_grad()
def generate_eval_images(
    model: DiffusionModel,
    denoiser: GuidedDenoiser,
    config,
    prompts: Sequence[str],
    rows: Sequence[int],
    device: torch.device,
    progress: bool = False,
) -> torch.Tensor:
    """Images [N, 3, H, W] for held-out ``prompts`` whose noise is keyed by ``eval.seed`` and the row ids ``rows``:
    deterministic DDIM when ``eval.eta`` is 0 (the default), else the stochastic sampler the policy trains; CFG
    scale :func:`heldout_guidance_scale`."""
    model.set_timesteps(config.sample.num_steps, device)
    eta = config.eval.eta
    # with eta > 0, x_T and the step noise come from generators -2 and 0 of a row: the images of sample_branched
    # forking one child at the first step, without keeping the trajectory
    x_T_generators = row_generators(config.eval.seed, rows, child=-2 if eta else -1)
    x_T = initial_noise(model.latent_shape, x_T_generators, device, model.weight_dtype)
    cond, uncond = model.prompt_encoder.encode(prompts), model.prompt_encoder.negative()
    step_generators = row_generators(config.eval.seed, rows, child=0) if eta else None
    scale = heldout_guidance_scale(config)
    total = guided_rows(len(prompts), scale, denoiser.embedded_guidance) * config.sample.num_steps
    with denoiser.progress("held-out images", total, progress):
        x_0 = denoise(denoiser, model.sampler, x_T, cond, uncond, scale, eta, step_generators)
    return model.decode(x_0).cpu()


def heldout_guidance_scale(config) -> float:
    """The CFG scale of held-out images: ``eval.guidance_scale``, or ``sample.guidance_scale`` when that is 0 (the
    default), so that a run sampling its training images at another scale is still scored at a fixed one."""
    return config.eval.guidance_scale or config.sample.guidance_scale
