"""Pre-training of small text-to-image denoisers on procedurally rendered, captioned images.

Used by ``scripts/make_tiny_model.py`` and ``scripts/make_testbed_model.py``: the UNet and the CLIP text
encoder are trained jointly as a denoiser (epsilon or v-prediction, as the scheduler's config says) in the
identity-VAE latent space (latents = ``[R, G, B]`` of pixels in [-1, 1], padded with zero channels up to the
UNet's input channels) on freshly rendered batches, with caption dropout to "" (for classifier-free guidance),
AdamW with linear warm-up and cosine decay to 10%, min-SNR-gamma loss weighting and an exponential moving
average of the weights, which is copied into the models at the end.

With a ``state_dir`` the run is resumable: every ``save_every`` steps the weights, their average, AdamW's
moments and both random generators are written there atomically (safetensors + JSON); a later call with the
same options continues from the last saved step and ends bit for bit where an uninterrupted run ends.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from diffusers import DDIMScheduler, UNet2DConditionModel
from safetensors.torch import load_file, save_file
from transformers import CLIPTextModel, CLIPTokenizer

logger = logging.getLogger(__name__)

#: (batch size, rng) -> (images [B, 3, H, W] in [0, 1], captions)
SceneSampler = Callable[[int, np.random.Generator], tuple[torch.Tensor, list[str]]]
#: (step, unet, text_encoder) -> None: called with the EMA weights loaded every ``snapshot_every`` steps.
SnapshotHook = Callable[[int, UNet2DConditionModel, CLIPTextModel], None]


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
    save_every: int = 100  # state saves, when a state_dir is given
    snapshot_every: int = 0  # EMA snapshots handed to the snapshot hook (0: none)


def image_latents(images: torch.Tensor, channels: int = 4) -> torch.Tensor:
    """The identity VAE's latents of ``images`` [B, 3, H, W] in [0, 1]: [B, channels, H, W] = [R, G, B(, 0)] in
    [-1, 1]."""
    pixels = images * 2.0 - 1.0
    return torch.cat([pixels, pixels.new_zeros(pixels.shape[0], channels - 3, *pixels.shape[2:])], dim=1)


def min_snr_loss(pred: torch.Tensor, noise: torch.Tensor, alphas_cumprod: torch.Tensor, timesteps: torch.Tensor,
                 gamma: float) -> torch.Tensor:
    """The epsilon-prediction loss with min-SNR-gamma weighting (Hang et al. 2023): the mean over the batch of
    ``min(SNR_t, gamma) / SNR_t * mean((pred - noise)^2)``, SNR_t = alpha_bar_t / (1 - alpha_bar_t).

    ``pred``, ``noise``: [B, C, H, W]; ``alphas_cumprod``: [T] (float); ``timesteps``: [B] (long)."""
    snr = alphas_cumprod[timesteps] / (1.0 - alphas_cumprod[timesteps])
    weight = torch.clamp(snr, max=gamma) / snr
    return (weight * (pred.float() - noise).pow(2).mean(dim=(1, 2, 3))).mean()


def min_snr_v_loss(pred: torch.Tensor, target: torch.Tensor, alphas_cumprod: torch.Tensor,
                   timesteps: torch.Tensor, gamma: float) -> torch.Tensor:
    """The v-prediction loss with min-SNR-gamma weighting, the SNR floored at 1 in the numerator: the mean over the
    batch of ``clamp(SNR_t, 1, gamma) / (SNR_t + 1) * mean((pred - v)^2)``.

    Plain min-SNR for v is ``min(SNR, gamma) / (SNR + 1)`` (Hang et al. 2023), which gives the zero-SNR step
    t = T - 1, where trailing sampling starts, weight 0; the floor gives it weight 1 (there v = -x_0, and the
    loss is the plain x_0 loss). ``pred``, ``target`` (v): [B, C, H, W]; ``timesteps``: [B] (long)."""
    snr = alphas_cumprod[timesteps] / (1.0 - alphas_cumprod[timesteps])
    weight = torch.clamp(snr, min=1.0, max=gamma) / (snr + 1.0)
    return (weight * (pred.float() - target).pow(2).mean(dim=(1, 2, 3))).mean()


def denoising_loss(pred: torch.Tensor, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor,
                   scheduler: DDIMScheduler, gamma: float) -> torch.Tensor:
    """The min-SNR-weighted loss of the UNet output ``pred`` for ``latents`` noised with ``noise`` at ``timesteps``,
    for the scheduler config's prediction type (epsilon: :func:`min_snr_loss`, v: :func:`min_snr_v_loss`)."""
    alphas_cumprod = scheduler.alphas_cumprod.float()
    if scheduler.config.prediction_type == "epsilon":
        return min_snr_loss(pred, noise, alphas_cumprod, timesteps, gamma)
    if scheduler.config.prediction_type == "v_prediction":
        target = scheduler.get_velocity(latents, noise, timesteps)
        return min_snr_v_loss(pred, target, alphas_cumprod, timesteps, gamma)
    raise ValueError(f"pre-training supports epsilon and v_prediction, not {scheduler.config.prediction_type!r}")


def lr_factor(step: int, opts: PretrainOptions) -> float:
    """Linear warm-up over ``opts.warmup`` steps, then cosine decay to 10% at ``opts.steps``."""
    if step < opts.warmup:
        return (step + 1) / opts.warmup
    progress = (step - opts.warmup) / max(1, opts.steps - opts.warmup)
    return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress))


class _State:
    """What a resumed pre-training run needs: weights, their EMA, AdamW, both generators, the step."""

    def __init__(self, params: list[torch.nn.Parameter], opts: PretrainOptions) -> None:
        self.params, self.opts = params, opts
        self.ema = [p.detach().clone() for p in params]
        self.optim = torch.optim.AdamW(params, lr=opts.lr, betas=(0.9, 0.99), weight_decay=1e-2)
        self.rng = np.random.default_rng(opts.seed)
        self.step, self.running, self.elapsed = 0, 0.0, 0.0

    def save(self, directory: Path) -> None:
        """Write ``state.safetensors`` and ``state.json`` atomically (temporary files, then rename)."""
        directory.mkdir(parents=True, exist_ok=True)
        tensors = {"torch_rng": torch.get_rng_state()}
        for i, (p, e) in enumerate(zip(self.params, self.ema, strict=True)):
            tensors[f"param.{i}"], tensors[f"ema.{i}"] = p.detach(), e
            for key, value in self.optim.state.get(p, {}).items():
                tensors[f"adam.{i}.{key}"] = torch.as_tensor(value)
        meta = {"step": self.step, "running": self.running, "elapsed": self.elapsed,
                "rng": self.rng.bit_generator.state, "options": asdict(self.opts)}  # fmt: skip
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(directory / "state.safetensors.tmp"))
        (directory / "state.json.tmp").write_text(json.dumps(meta), encoding="utf-8")
        os.replace(directory / "state.safetensors.tmp", directory / "state.safetensors")
        os.replace(directory / "state.json.tmp", directory / "state.json")

    def load(self, directory: Path) -> bool:
        """Restore from ``directory`` if it holds a state of the same options; False when there is none."""
        if not (directory / "state.json").is_file():
            return False
        meta = json.loads((directory / "state.json").read_text(encoding="utf-8"))
        if meta["options"] != json.loads(json.dumps(asdict(self.opts))):
            raise ValueError(f"{directory} holds a pre-training state of other options: {meta['options']}")
        tensors = load_file(str(directory / "state.safetensors"))
        with torch.no_grad():
            for i, (p, e) in enumerate(zip(self.params, self.ema, strict=True)):
                p.copy_(tensors[f"param.{i}"])
                e.copy_(tensors[f"ema.{i}"])
                state = {k.split(".")[2]: v for k, v in tensors.items() if k.startswith(f"adam.{i}.")}
                if state:
                    self.optim.state[p] = state
        torch.set_rng_state(tensors["torch_rng"])
        self.rng.bit_generator.state = meta["rng"]
        self.step, self.running, self.elapsed = meta["step"], meta["running"], meta["elapsed"]
        logger.info("resumed pre-training at step %d from %s", self.step, directory)
        return True

    def swap_ema(self) -> None:
        """Exchange the weights and their EMA in place (twice restores them)."""
        with torch.no_grad():
            for p, e in zip(self.params, self.ema, strict=True):
                tmp = p.detach().clone()
                p.copy_(e)
                e.copy_(tmp)


def _train_step(unet: UNet2DConditionModel, text_encoder: CLIPTextModel, tokenizer: CLIPTokenizer,
                scheduler: DDIMScheduler, sample: SceneSampler, state: _State) -> float:
    """One optimisation step on a fresh batch, then the EMA update; returns the loss."""
    opts, rng = state.opts, state.rng
    images, captions = sample(opts.batch_size, rng)
    drop = rng.random(len(captions)) < opts.caption_dropout
    captions = ["" if d else c for c, d in zip(captions, drop, strict=True)]
    ids = tokenizer(
        captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt",
    ).input_ids  # fmt: skip
    latents = image_latents(images, unet.config.in_channels)
    noise = torch.randn_like(latents)
    timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (latents.shape[0],))
    noisy = scheduler.add_noise(latents, noise, timesteps)
    pred = unet(noisy, timesteps, text_encoder(ids)[0]).sample
    loss = denoising_loss(pred, latents, noise, timesteps, scheduler, opts.snr_gamma)
    for group in state.optim.param_groups:
        group["lr"] = opts.lr * lr_factor(state.step, opts)
    state.optim.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(state.params, 1.0)
    state.optim.step()
    with torch.no_grad():
        decay = min(opts.ema_decay, (1.0 + state.step) / (10.0 + state.step))
        torch._foreach_lerp_(state.ema, [p.detach() for p in state.params], 1.0 - decay)
    return loss.item()


def pretrain_denoiser(
    unet: UNet2DConditionModel,
    text_encoder: CLIPTextModel,
    tokenizer: CLIPTokenizer,
    scheduler: DDIMScheduler,
    sample: SceneSampler,
    opts: PretrainOptions,
    state_dir: str | Path | None = None,
    on_snapshot: SnapshotHook | None = None,
) -> tuple[float, float]:
    """Train ``unet`` and ``text_encoder`` in place (ending with their EMA weights); returns (wall, CPU) s of this
    call. With ``state_dir``, resume from the state saved there and save to it (see the module docstring)."""
    if opts.seed_torch:
        torch.manual_seed(opts.seed)
    unet.train()
    text_encoder.train()
    state = _State([p for m in (unet, text_encoder) for p in m.parameters()], opts)
    if state_dir is not None:
        state.load(Path(state_dir))
    start, cpu_start = time.perf_counter(), time.process_time()
    elapsed0 = state.elapsed
    while state.step < opts.steps:
        loss = _train_step(unet, text_encoder, tokenizer, scheduler, sample, state)
        state.running = loss if state.step == 0 else 0.95 * state.running + 0.05 * loss
        state.step += 1
        state.elapsed = elapsed0 + time.perf_counter() - start
        if state.step % opts.log_every == 1 or state.step == opts.steps:
            logger.info("step %4d/%d  loss %.4f (avg %.4f)  lr %.2e  %.1fs", state.step, opts.steps, loss,
                        state.running, state.optim.param_groups[0]["lr"], state.elapsed)  # fmt: skip
        if state_dir is not None and (state.step % opts.save_every == 0 or state.step == opts.steps):
            state.save(Path(state_dir))
        if on_snapshot is not None and opts.snapshot_every and state.step % opts.snapshot_every == 0:
            state.swap_ema()
            on_snapshot(state.step, unet, text_encoder)
            state.swap_ema()
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    logger.info("training: %.1f s wall, %.1f s CPU (all threads) in this call", wall, cpu)
    state.swap_ema()  # end with the EMA weights
    unet.eval()
    text_encoder.eval()
    return wall, cpu
