"""The testbed model: a small SD-v1-architecture pipeline for the 32x32 shapes world.

Same parts as :mod:`testbed.tiny_model` (identity VAE, word-level CLIP tokenizer, 2-layer CLIP text encoder)
with the shapes-world vocabulary, a wider, four-level UNet on three latent channels (the identity VAE's
``[R, G, B]``: no channel that carries nothing), and a zero-terminal-SNR, v-prediction DDIM scheduler with
trailing timestep spacing (:func:`build_testbed_scheduler`), so that sampling starts from what the model
was trained on (Lin et al. 2024, "Common Diffusion Noise Schedules and Sample Steps Are Flawed").
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from diffusers.schedulers.scheduling_ddim import rescale_zero_terminal_snr

from shapes.world import SIZE, WORDS
from testbed.tiny_model import TEXT_HIDDEN, assemble_pipeline, build_tiny_text_encoder, build_tokenizer

ROOT = Path(__file__).resolve().parents[1]
#: Where the pre-trained testbed pipeline is shipped (made by scripts/make_testbed_model.py).
TESTBED_MODEL = ROOT / "assets" / "testbed-sd"
#: Latent channels of the testbed model: the identity VAE's R, G, B.
LATENT_CHANNELS = 3
#: Floor of the last cumulative alpha (the value diffusers' Euler scheduler uses for zero terminal SNR): at exactly
#: 0 the stock DDIM step with eta > 0 takes sqrt of a negative number at t = 999.
ALPHA_BAR_FLOOR = 2.0**-24


def testbed_betas(num_train_timesteps: int = 1000) -> torch.Tensor:
    """SD v1's scaled-linear betas rescaled to zero terminal SNR (Lin et al. 2024, Algorithm 1), with the last
    cumulative alpha floored at :data:`ALPHA_BAR_FLOOR`: [T] float64 betas."""
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, num_train_timesteps, dtype=torch.float64) ** 2
    betas = rescale_zero_terminal_snr(betas)
    alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
    betas[-1] = 1.0 - ALPHA_BAR_FLOOR / alphas_cumprod[-2]  # alpha_bar_T = floor instead of 0
    return betas


def build_testbed_scheduler() -> DDIMScheduler:
    """DDIM over :func:`testbed_betas` (explicit ``trained_betas``, so the stock pipeline reads the same table),
    v-prediction, "trailing" spacing (10 steps start at t = 999)."""
    return DDIMScheduler(
        num_train_timesteps=1000, trained_betas=testbed_betas().tolist(), clip_sample=False,
        set_alpha_to_one=False, steps_offset=1, prediction_type="v_prediction", timestep_spacing="trailing",
    )  # fmt: skip


def build_testbed_unet(sample_size: int = SIZE) -> UNet2DConditionModel:
    """A 4.1 M parameter UNet: channels 16/32/64/128, cross-attention at 8x8 and 4x4 only."""
    return UNet2DConditionModel(
        sample_size=sample_size, in_channels=LATENT_CHANNELS, out_channels=LATENT_CHANNELS, layers_per_block=1,
        block_out_channels=(16, 32, 64, 128), norm_num_groups=8,
        down_block_types=("DownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
        cross_attention_dim=TEXT_HIDDEN, attention_head_dim=4,  # (diffusers: = number of heads)
    )  # fmt: skip


def build_testbed_parts(directory: str | Path, seed: int = 0) -> StableDiffusionPipeline:
    """Random-weight testbed pipeline (tokenizer files written under ``directory/tokenizer``), not saved."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        tokenizer = build_tokenizer(Path(directory) / "tokenizer", WORDS)
        return assemble_pipeline(
            build_testbed_unet(), build_tiny_text_encoder(len(tokenizer)), tokenizer, SIZE, build_testbed_scheduler()
        )
