"""Pre-training of small text-to-image denoisers on procedurally rendered, captioned images.

Used by ``scripts/make_tiny_model.py`` and ``scripts/make_testbed_model.py``: the UNet and the CLIP text
encoder are trained jointly as an epsilon-prediction denoiser in the identity-VAE latent space (latents =
``[R, G, B, 0]`` of pixels in [-1, 1]) on freshly rendered batches, with caption dropout to "" (for
classifier-free guidance), AdamW with linear warm-up and cosine decay to 10%, min-SNR-gamma loss weighting
and an exponential moving average of the weights, which is copied into the models at the end.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from diffusers import DDIMScheduler, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTokenizer

logger = logging.getLogger(__name__)

#: (batch size, rng) -> (images [B, 3, H, W] in [0, 1], captions)
SceneSampler = Callable[[int, np.random.Generator], tuple[torch.Tensor, list[str]]]


@dataclass
class PretrainOptions:
    """Optimisation settings of :func:`pretrain_denoiser`."""

    steps: int = 600
    batch_size: int = 32
    lr: float = 2e-3
    warmup: int = 20
    ema_decay: float = 0.99
    caption_dropout: float = 0.1
    snr_gamma: float = 5.0
    seed: int = 0  # seeds the scene sampler's numpy generator (and torch, if seed_torch)
    seed_torch: bool = True  # False: keep the caller's torch RNG stream (seeded before building the models)
    log_every: int = 25


def image_latents(images: torch.Tensor) -> torch.Tensor:
    """The identity VAE's latents of ``images`` [B, 3, H, W] in [0, 1]: [B, 4, H, W] = [R, G, B, 0] in [-1, 1]."""
    pixels = images * 2.0 - 1.0
    return torch.cat([pixels, torch.zeros_like(pixels[:, :1])], dim=1)


def min_snr_loss(pred: torch.Tensor, noise: torch.Tensor, alphas_cumprod: torch.Tensor, timesteps: torch.Tensor,
                 gamma: float) -> torch.Tensor:
    """The epsilon-prediction loss with min-SNR-gamma weighting (Hang et al. 2023): the mean over the batch of
    ``min(SNR_t, gamma) / SNR_t * mean((pred - noise)^2)``, SNR_t = alpha_bar_t / (1 - alpha_bar_t).

    ``pred``, ``noise``: [B, C, H, W]; ``alphas_cumprod``: [T] (float); ``timesteps``: [B] (long)."""
    snr = alphas_cumprod[timesteps] / (1.0 - alphas_cumprod[timesteps])
    weight = torch.clamp(snr, max=gamma) / snr
    return (weight * (pred.float() - noise).pow(2).mean(dim=(1, 2, 3))).mean()


def pretrain_denoiser(
    unet: UNet2DConditionModel,
    text_encoder: CLIPTextModel,
    tokenizer: CLIPTokenizer,
    scheduler: DDIMScheduler,
    sample: SceneSampler,
    opts: PretrainOptions,
) -> tuple[float, float]:
    """Train ``unet`` and ``text_encoder`` in place (ending with their EMA weights); returns (wall, CPU) s."""
    if opts.seed_torch:
        torch.manual_seed(opts.seed)
    rng = np.random.default_rng(opts.seed)
    unet.train()
    text_encoder.train()
    alphas_cumprod = scheduler.alphas_cumprod.float()
    params = [p for m in (unet, text_encoder) for p in m.parameters()]
    ema = [p.detach().clone() for p in params]
    optim = torch.optim.AdamW(params, lr=opts.lr, betas=(0.9, 0.99), weight_decay=1e-2)

    def lr_factor(step: int) -> float:
        """Linear warm-up, then cosine decay to 10%."""
        if step < opts.warmup:
            return (step + 1) / opts.warmup
        progress = (step - opts.warmup) / max(1, opts.steps - opts.warmup)
        return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress))

    lr_sched = torch.optim.lr_scheduler.LambdaLR(optim, lr_factor)
    start, cpu_start = time.perf_counter(), time.process_time()
    running = 0.0
    for step in range(opts.steps):
        images, captions = sample(opts.batch_size, rng)
        drop = rng.random(len(captions)) < opts.caption_dropout
        captions = ["" if d else c for c, d in zip(captions, drop, strict=True)]
        ids = tokenizer(
            captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
            return_tensors="pt",
        ).input_ids  # fmt: skip
        latents = image_latents(images)
        noise = torch.randn_like(latents)
        timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (latents.shape[0],))
        noisy = scheduler.add_noise(latents, noise, timesteps)
        pred = unet(noisy, timesteps, text_encoder(ids)[0]).sample
        loss = min_snr_loss(pred, noise, alphas_cumprod, timesteps, opts.snr_gamma)
        optim.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optim.step()
        lr_sched.step()
        with torch.no_grad():
            decay = min(opts.ema_decay, (1.0 + step) / (10.0 + step))
            torch._foreach_lerp_(ema, [p.detach() for p in params], 1.0 - decay)
        running = loss.item() if step == 0 else 0.95 * running + 0.05 * loss.item()
        if step % opts.log_every == 0 or step == opts.steps - 1:
            logger.info(
                "step %4d/%d  loss %.4f (avg %.4f)  lr %.2e  %.1fs",
                step, opts.steps, loss.item(), running, lr_sched.get_last_lr()[0], time.perf_counter() - start,
            )  # fmt: skip
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    logger.info("training: %.1f s wall, %.1f s CPU (all threads)", wall, cpu)
    with torch.no_grad():
        for p, e in zip(params, ema, strict=True):
            p.copy_(e)
    unet.eval()
    text_encoder.eval()
    return wall, cpu
