"""The phases of one SRRL stage: sampling (with reflection), held-out generation, and the PPO update."""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from srrl.curriculum import StagePlan
from srrl.ddim import ddim_step_with_logprob
from srrl.distributed import all_true, strided_share
from srrl.models import DiffusionModel
from srrl.ppo import ppo_clip_loss
from srrl.profiling import timed
from srrl.sampling import (
    GuidedDenoiser,
    Trajectories,
    ddim_denoise,
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
    ``progress``: bars over the UNet rows of the reflection rounds and of the sampling.
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
    reflect_rows = plan.resample_num * steps * n * (guided_rows(1, r.forward_guidance_scale) +
                                                    guided_rows(1, r.inverse_guidance_scale))
    with timed("reflect"), denoiser.progress(f"reflect stage {plan.stage}", reflect_rows, progress and reflect_rows > 0):
        x_T = reflect(
            denoiser,
            model.scheduler,
            model.inverse_scheduler,
            x_T,
            cond,
            uncond,
            plan.resample_num,
            config.reflect.forward_guidance_scale,
            config.reflect.inverse_guidance_scale,
        )
    sample_rows = guided_rows((steps - plan.split_step) * n + plan.split_step * n * split_time,
                              config.sample.guidance_scale)
    with timed("sample"), denoiser.progress(f"sample stage {plan.stage}", sample_rows, progress):
        traj = sample_branched(
            denoiser,
            model.scheduler,
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
    deterministic DDIM when ``eval.eta`` is 0 (the default), else the stochastic sampler the policy trains."""
    model.set_timesteps(config.sample.num_steps, device)
    eta = config.eval.get("eta", 0.0)
    # with eta > 0, x_T and the step noise come from generators -2 and 0 of a row: the images of sample_branched
    # forking one child at the first step, without keeping the trajectory
    x_T_generators = row_generators(config.eval.seed, rows, child=-2 if eta else -1)
    x_T = initial_noise(model.latent_shape, x_T_generators, device, model.weight_dtype)
    cond, uncond = model.prompt_encoder.encode(prompts), model.prompt_encoder.negative()
    step_generators = row_generators(config.eval.seed, rows, child=0) if eta else None
    total = guided_rows(len(prompts), config.sample.guidance_scale) * config.sample.num_steps
    with denoiser.progress("held-out images", total, progress):
        x_0 = ddim_denoise(denoiser, model.scheduler, x_T, cond, uncond, config.sample.guidance_scale, eta,
                           step_generators)
    return model.decode(x_0).cpu()


def kl_exceeded(accelerator, approx_kls: list[float], target_kl: float) -> bool:
    """Whether the mean of ``approx_kls`` exceeds ``target_kl`` (> 0) on any process; False when it is off."""
    if target_kl <= 0:
        return False
    local_ok = not approx_kls or sum(approx_kls) / len(approx_kls) <= target_kl
    return not all_true(accelerator, local_ok)


@dataclass
class Accumulation:
    """Gradient accumulation that may span stages (docs/algorithm.md §7.11): pending sample-steps and micro-steps."""

    sample_steps: int = 0  # sample x kept-step terms accumulated since the last optimizer step
    micro_steps: int = 0  # backward calls since the last optimizer step


@dataclass
class UpdateStats:
    """Diagnostics of one stage's update."""

    losses: list[float] = field(default_factory=list)
    approx_kls: list[float] = field(default_factory=list)
    clipfracs: list[float] = field(default_factory=list)
    ratios: list[float] = field(default_factory=list)
    grad_norms: list[float] = field(default_factory=list)
    optimizer_steps: int = 0
    nonfinite_steps: int = 0
    stopped_early: bool = False  # the update stopped at train.target_kl

    def summary(self) -> dict[str, float | int | None]:
        def mean(xs: list[float]) -> float | None:
            return sum(xs) / len(xs) if xs else None

        return {
            "loss": mean(self.losses),
            "approx_kl": mean(self.approx_kls),
            "clipfrac": mean(self.clipfracs),
            "ratio_mean": mean(self.ratios),
            "grad_norm": mean(self.grad_norms),
            "optimizer_steps": self.optimizer_steps,
            "nonfinite_steps": self.nonfinite_steps,
            "stopped_early": int(self.stopped_early),
        }


def trained_rows(
    rows: torch.Tensor, advantages: torch.Tensor, row_weights: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The rows [b] of a micro-batch worth a forward pass, with their advantages and loss weights [b'].

    A row whose shaped advantage or loss weight is exactly 0 (every negative under ``train.beta2=0``; padding of a
    process's share) adds exactly 0 to the loss and its gradient, so it is left out; the weights of the others
    keep their normalisation over all rows, so the update is unchanged. One row is always kept so that every
    process runs every micro-step (DDP).
    """
    live = (advantages != 0) & (row_weights != 0)
    if not bool(live.any()):
        live[0] = True
    return rows[live], advantages[live], row_weights[live]


def steps_in_call(pending: int, per_step: int, target: int, remaining: int, max_steps: int) -> int:
    """How many of the ``remaining`` kept steps of a micro-batch go into its next UNet call: at most
    ``max_steps``, and never past the step that completes an accumulation (``pending`` sample-steps so far, each
    step adds ``per_step``, the optimizer steps once ``target`` is reached), so that calls end where optimizer
    steps do and the gradient is the same as with one step per call."""
    k = 1
    while k < min(max_steps, remaining) and pending + k * per_step < target:
        k += 1
    return k


def ppo_update(
    accelerator,
    unet: torch.nn.Module,
    denoiser: GuidedDenoiser,
    model: DiffusionModel,
    config,
    plan: StagePlan,
    samples: Trajectories,
    advantages_all: torch.Tensor,
    acc: Accumulation,
    optimizer_step: Callable[[], float | None],
) -> UpdateStats:
    """PPO-clip epochs over the selected trajectories ``samples`` [M] with their (shaped) advantages
    ``advantages_all`` [M] (docs/algorithm.md §3g).

    Every epoch shuffles the samples and, per sample, the order of its kept steps; both shuffles are keyed by
    the stage (identical on all processes, replayed exactly on resume). Each process trains a strided share of
    the shuffled samples; ``optimizer_step`` clips, steps and returns the gradient norm (None when it skipped a
    non-finite step). With ``train.target_kl``
    > 0 the stage's update ends after the first optimizer step whose micro-steps had a mean approx-KL above it
    (on any process), as in common PPO implementations.
    """
    stats = UpdateStats()
    t_cfg = config.train
    world, rank = accelerator.num_processes, accelerator.process_index
    n_rows, n_steps = advantages_all.numel(), samples.timesteps.numel()
    target = t_cfg.gradient_accumulation_steps * plan.split_step
    uncond = model.prompt_encoder.negative()
    generator = torch.Generator().manual_seed(config.seed * 100_003 + plan.stage)
    per_rank = -(-n_rows // world)
    total_micro = t_cfg.num_epochs * -(-per_rank // t_cfg.batch_size) * n_steps
    micro_index = 0
    window_start = 0  # first entry of stats.approx_kls since the last optimizer step
    target_kl = t_cfg.get("target_kl", 0.0)  # absent from configs of runs made before the field existed
    steps_per_call = t_cfg.get("timesteps_per_call", 1)  # likewise
    unet.train()
    bar = tqdm(total=total_micro, desc=f"train stage {plan.stage}", leave=False, disable=not accelerator.is_main_process)
    device = samples.latents.device
    for _ in range(t_cfg.num_epochs):
        perm = torch.randperm(n_rows, generator=generator)
        step_orders = torch.stack([torch.randperm(n_steps, generator=generator) for _ in range(n_rows)])  # [M, S]
        share, weight = strided_share(perm, world, rank)
        for start in range(0, share.numel(), t_cfg.batch_size):
            rows = share[start : start + t_cfg.batch_size]
            # real rows of this micro-batch over all processes: perm positions [start*world, (start+b)*world)
            global_real = min((start + len(rows)) * world, n_rows) - start * world
            row_weights = weight[start : start + len(rows)] * world / global_real
            rows, adv, row_weights = trained_rows(rows, advantages_all[rows], row_weights)
            adv, row_weights = adv.to(accelerator.device), row_weights.to(accelerator.device)
            rows_on_device = rows.to(device)
            cond_rows = samples.cond.index(rows_on_device)
            j = 0
            while j < n_steps:
                # kept steps [j, j + k) of these rows in one UNet call, never across an optimizer step
                k = steps_in_call(acc.sample_steps, global_real, target, n_steps - j, steps_per_call)
                micro_index += k
                bar.update(k)
                step_idx = step_orders[rows, j : j + k].to(device).reshape(-1)  # per-row step index [b*k], row-major
                row_idx = rows_on_device.repeat_interleave(k)
                latents = samples.latents[row_idx, step_idx]
                next_latents = samples.next_latents[row_idx, step_idx]
                old_log_prob = samples.log_probs[row_idx, step_idx]
                timesteps = samples.timesteps[step_idx]
                j += k
                sync = acc.sample_steps + k * global_real >= target or (
                    t_cfg.flush_accumulation_at_stage_end and micro_index == total_micro
                )
                with accelerator.no_sync(unet) if not sync else nullcontext():
                    with accelerator.autocast():
                        eps = denoiser(latents, timesteps, cond_rows.repeat_interleave(k), uncond,
                                       config.sample.guidance_scale)
                        _, log_prob, _ = ddim_step_with_logprob(
                            model.scheduler, eps, timesteps, latents, eta=config.sample.eta, prev_sample=next_latents
                        )
                    # weighted sum over rows and steps: the sum of the k one-step micro-step losses
                    terms = ppo_clip_loss(log_prob, old_log_prob, adv.repeat_interleave(k), t_cfg.clip_range,
                                          row_weights.repeat_interleave(k))
                    if not all_true(accelerator, bool(torch.isfinite(terms.loss))):
                        stats.nonfinite_steps += k
                        continue
                    with timed("backward"):
                        accelerator.backward(terms.loss)
                acc.sample_steps += k * global_real
                acc.micro_steps += k
                stats.losses.append(terms.loss.item() / k)
                stats.approx_kls.append(terms.approx_kl.item())
                stats.clipfracs.append(terms.clipfrac.item())
                stats.ratios.append(terms.ratio.mean().item())
                if sync:
                    norm = optimizer_step()  # None: skipped as non-finite (weights unchanged)
                    if norm is not None:
                        stats.grad_norms.append(norm)
                        stats.optimizer_steps += 1
                    window, window_start = stats.approx_kls[window_start:], len(stats.approx_kls)
                    stats.stopped_early = kl_exceeded(accelerator, window, target_kl)
                    if stats.stopped_early:
                        break
            if stats.stopped_early:
                break
        if stats.stopped_early:
            break
    bar.close()
    if stats.stopped_early:
        logger.info("stage %d: approx-KL above train.target_kl=%g; update stopped after %d optimizer steps",
                    plan.stage, target_kl, stats.optimizer_steps)
    return stats
