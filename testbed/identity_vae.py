"""The identity VAE of the tiny and testbed pipelines: an :class:`~diffusers.AutoencoderKL` whose weights are set by
hand so that it is (numerically) the identity between pixels in ``[-1, 1]`` and latents ``[R, G, B]`` (padded with
a zero channel to 4 for the tiny models), with ``vae_scale_factor == 1``: the models work in pixel space through
the stock pipeline's VAE calls."""

from __future__ import annotations

import math

import torch
from diffusers import AutoencoderKL

_VAE_K = 1000.0  # constant carried by the [x, -x, K, -K] channel groups
_VAE_OFFSET = 20.0  # GroupNorm beta offset that makes the following SiLU ~linear


def _set_conv(conv: torch.nn.Conv2d, weight_center: torch.Tensor, bias: torch.Tensor) -> None:
    """Set ``conv`` to a pointwise map: only the centre tap of the kernel is non-zero."""
    with torch.no_grad():
        conv.weight.zero_()
        kh, kw = conv.kernel_size
        conv.weight[:, :, kh // 2, kw // 2] = weight_center
        conv.bias.copy_(bias)


def _split_input_conv(conv: torch.nn.Conv2d) -> None:
    """Map input channels c=0..2 to the group [x_c, -x_c, K, -K] (channels 4c..4c+3)."""
    w = torch.zeros(conv.out_channels, conv.in_channels)
    b = torch.zeros(conv.out_channels)
    for c in range(3):
        w[4 * c, c], w[4 * c + 1, c] = 1.0, -1.0
        b[4 * c + 2], b[4 * c + 3] = _VAE_K, -_VAE_K
    _set_conv(conv, w, b)


def _rescale_group_norm(norm: torch.nn.GroupNorm) -> None:
    """Undo the GroupNorm scale (std of [x, -x, K, -K] is ~K/sqrt(2)) and add the SiLU offset."""
    with torch.no_grad():
        norm.weight.zero_()
        norm.bias.zero_()
        for c in range(3):
            norm.weight[4 * c] = _VAE_K / math.sqrt(2.0)
            norm.bias[4 * c] = _VAE_OFFSET


def _identity_resnets(module: torch.nn.Module) -> None:
    """Turn every ResnetBlock2D inside ``module`` into the identity (only the skip path remains)."""
    for name, sub in module.named_modules():
        if name.endswith(("conv1", "conv2")) and isinstance(sub, torch.nn.Conv2d):
            with torch.no_grad():
                sub.weight.zero_()
                sub.bias.zero_()


def build_identity_vae(sample_size: int = 32, latent_channels: int = 4) -> AutoencoderKL:
    """Return an AutoencoderKL that is (numerically) the identity between RGB in [-1,1] and [R,G,B] (padded with
    zero channels up to ``latent_channels``, 3 or 4).

    ``encode(img).latent_dist`` has mean ``[R, G, B(, 0)]`` and log-variance -30 (std ~3e-7);
    ``decode(z).sample`` returns ``z[:, :3]``. The single block level gives ``vae_scale_factor == 1``.
    """
    if latent_channels not in (3, 4):
        raise ValueError(f"latent_channels must be 3 or 4, got {latent_channels}")
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=latent_channels, sample_size=sample_size,
        down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",),
        block_out_channels=(12,), layers_per_block=1, norm_num_groups=3,  # 3 groups [x, -x, K, -K]
        scaling_factor=1.0, mid_block_add_attention=False, force_upcast=False,
        use_quant_conv=False, use_post_quant_conv=False,
    )  # fmt: skip
    enc, dec = vae.encoder, vae.decoder
    _identity_resnets(vae)
    _split_input_conv(enc.conv_in)
    _split_input_conv(dec.conv_in)
    _rescale_group_norm(enc.conv_norm_out)
    _rescale_group_norm(dec.conv_norm_out)
    # encoder head: mean = [R, G, B(, 0)], logvar = -30
    w = torch.zeros(enc.conv_out.out_channels, enc.conv_out.in_channels)
    b = torch.zeros(enc.conv_out.out_channels)
    for c in range(3):
        w[c, 4 * c] = 1.0
        b[c] = -_VAE_OFFSET
    b[latent_channels:] = -30.0
    _set_conv(enc.conv_out, w, b)
    # decoder head: RGB = latent[:3]
    w = torch.zeros(dec.conv_out.out_channels, dec.conv_out.in_channels)
    for c in range(3):
        w[c, 4 * c] = 1.0
    _set_conv(dec.conv_out, w, torch.full((3,), -_VAE_OFFSET))
    return vae.eval()
