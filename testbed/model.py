"""The testbed model: a small SD-v1-architecture pipeline for the 32x32 shapes world.

Same parts as :mod:`testbed.tiny_model` (identity VAE, word-level CLIP tokenizer, 2-layer CLIP text encoder,
SD-v1 DDIM scheduler) with the shapes-world vocabulary and a wider, four-level UNet.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import StableDiffusionPipeline, UNet2DConditionModel

from shapes.world import SIZE, WORDS
from testbed.tiny_model import TEXT_HIDDEN, assemble_pipeline, build_tiny_text_encoder, build_tokenizer

ROOT = Path(__file__).resolve().parents[2]
#: Where the pre-trained testbed pipeline is shipped (made by scripts/make_testbed_model.py).
TESTBED_MODEL = ROOT / "assets" / "testbed-sd"


def build_testbed_unet(sample_size: int = SIZE) -> UNet2DConditionModel:
    """A 4.1 M parameter UNet: channels 16/32/64/128, cross-attention at 8x8 and 4x4 only."""
    return UNet2DConditionModel(
        sample_size=sample_size, in_channels=4, out_channels=4, layers_per_block=1,
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
        return assemble_pipeline(build_testbed_unet(), build_tiny_text_encoder(len(tokenizer)), tokenizer, SIZE)
