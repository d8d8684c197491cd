"""Memory of the published presets computed from the shapes alone: ``python bench/memory.py``.

Per preset (``sd14``, ``sdxl``): weight bytes of each model part (parameters counted on the meta device from the
configs in ``bench/configs``, no weights built) in the run's dtype, and the bytes a stage stores: per image the
kept steps' latents (``x_t`` and ``x_prev``, ``split_step`` each, the curriculum's largest), their log-probs,
the final latent and the prompt conditioning; per prompt row the reflection rounds' two latents (``x_T`` and the
denoised ``x_0``, overwritten every round). Activations of the UNet passes are not shapes-only figures (see
``bench/gpu_check.py`` for measured peaks). Prints a Markdown table.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from diffusers import AutoencoderKL, UNet2DConditionModel  # noqa: E402
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection  # noqa: E402

from config.stage_process import get_config  # noqa: E402
from testbed.fullsize import kept_config  # noqa: E402

BYTES = {"fp16": 2, "bf16": 2, "no": 4}


def parameters(arch: str) -> dict[str, int]:
    """Parameter counts of the UNet, the VAE and the text encoder(s), built on the meta device."""
    with torch.device("meta"):
        parts = {"unet": UNet2DConditionModel(**kept_config(arch, "unet")),
                 "vae": AutoencoderKL(**kept_config(arch, "vae")),
                 "text_encoder": CLIPTextModel(CLIPTextConfig(**kept_config(arch, "text_encoder")))}
        if arch == "sdxl":
            parts["text_encoder_2"] = CLIPTextModelWithProjection(CLIPTextConfig(**kept_config(arch, "text_encoder_2")))
    return {name: sum(p.numel() for p in m.parameters()) for name, m in parts.items()}


def stage_bytes(arch: str) -> dict[str, float]:
    """Bytes per image and per stage of what a stage of the ``arch`` preset stores."""
    c = get_config(arch)
    vae, unet = kept_config(arch, "vae"), kept_config(arch, "unet")
    side = c.sample.resolution // 2 ** (len(vae["block_out_channels"]) - 1)
    latent = unet["in_channels"] * side * side * BYTES[c.mixed_precision]
    kept = max(c.split_step, c.curriculum.split_right)
    hidden = unet["cross_attention_dim"]
    cond = 77 * hidden * BYTES[c.mixed_precision]
    if arch == "sdxl":
        cond += (kept_config(arch, "text_encoder_2")["projection_dim"] + 6) * BYTES[c.mixed_precision]
    per_image = 2 * kept * latent + kept * 4 + latent + cond
    rows = c.sample.batch_size * c.sample.num_batches_per_epoch
    images = rows * c.split_time
    return {"latent_kib": latent / 2**10, "kept_steps": kept, "per_image_mib": per_image / 2**20,
            "per_stage_mib": per_image * images / 2**20, "images": images,
            "reflection_mib": 2 * latent * rows / 2**20, "resolution": c.sample.resolution,
            "dtype_bytes": BYTES[c.mixed_precision]}


def main() -> None:
    print("| preset | part | parameters | weights (run dtype) |")  # noqa: T201
    print("|---|---|---|---|")  # noqa: T201
    for arch in ("sd14", "sdxl"):
        width = BYTES[get_config(arch).mixed_precision]
        for name, count in parameters(arch).items():
            print(f"| {arch} | {name} | {count / 1e6:.1f} M | {count * width / 2**30:.2f} GiB |")  # noqa: T201
    print("\n| preset | px | latent | kept steps | stored per image | per stage (images) | reflection state |")  # noqa: T201
    print("|---|---|---|---|---|---|---|")  # noqa: T201
    for arch in ("sd14", "sdxl"):
        s = stage_bytes(arch)
        print(f"| {arch} | {s['resolution']} | {s['latent_kib']:.0f} KiB | {s['kept_steps']} | "  # noqa: T201
              f"{s['per_image_mib']:.2f} MiB | {s['per_stage_mib']:.0f} MiB ({s['images']}) | "
              f"{s['reflection_mib']:.1f} MiB |")


if __name__ == "__main__":
    main()
