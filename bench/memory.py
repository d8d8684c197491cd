"""Memory of the published presets computed from the shapes alone: ``python bench/memory.py``.

Per preset (``sd14``, ``sdxl``, ``sd35`` with T5, ``flux``): weight bytes of each model part (parameters and
buffers counted on the meta device from the configs in ``bench/configs``, no weights built) in the run's dtype,
and the bytes a stage stores: per image the kept steps' latents (``x_t`` and ``x_prev``, ``split_step`` each, the
curriculum's largest), their log-probs, the final latent and the prompt conditioning; per prompt row the
reflection rounds' two latents (``x_T`` and the denoised ``x_0``, overwritten every round). Activations of the
denoiser passes are not shapes-only figures (see ``bench/gpu_check.py`` for measured peaks). Prints Markdown
tables.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from config.stage_process import get_config  # noqa: E402
from testbed.fullsize import build_models, kept_config  # noqa: E402

BYTES = {"fp16": 2, "bf16": 2, "no": 4}
PRESETS = ("sd14", "sdxl", "sd35", "flux")


def parameters(arch: str) -> dict[str, tuple[int, int]]:
    """``(parameters, parameters + buffers)`` of each weighted part, built on the meta device (SD3.5 with T5)."""
    with torch.device("meta"):
        parts = build_models(arch, t5=True)
    return {name: (sum(p.numel() for p in m.parameters()),
                   sum(p.numel() for p in m.parameters()) + sum(b.numel() for b in m.buffers()))
            for name, m in parts.items()}


def cond_elements(arch: str) -> int:
    """Elements of one prompt's conditioning: the text states (77 CLIP tokens, plus the preset's T5 tokens for
    SD3.5; the T5 tokens alone for FLUX) and the pooled / size inputs."""
    c = get_config(arch)
    if arch in ("sd14", "sdxl"):
        extra = kept_config(arch, "text_encoder_2")["projection_dim"] + 6 if arch == "sdxl" else 0
        return 77 * kept_config(arch, "unet")["cross_attention_dim"] + extra
    transformer = kept_config(arch, "transformer")
    tokens = c.pretrained.max_sequence_length + (77 if arch == "sd35" else 0)
    return tokens * transformer["joint_attention_dim"] + transformer["pooled_projection_dim"]


def stage_bytes(arch: str) -> dict[str, float]:
    """Bytes per image and per stage of what a stage of the ``arch`` preset stores."""
    c = get_config(arch)
    vae, width = kept_config(arch, "vae"), BYTES[c.mixed_precision]
    side = c.sample.resolution // 2 ** (len(vae["block_out_channels"]) - 1)
    latent = vae["latent_channels"] * side * side * width
    kept = max(c.split_step, c.curriculum.split_right)
    per_image = 2 * kept * latent + kept * 4 + latent + cond_elements(arch) * width
    rows = c.sample.batch_size * c.sample.num_batches_per_epoch
    images = rows * c.split_time
    return {"latent_kib": latent / 2**10, "kept_steps": kept, "per_image_mib": per_image / 2**20,
            "per_stage_mib": per_image * images / 2**20, "images": images,
            "reflection_mib": 2 * latent * rows / 2**20, "resolution": c.sample.resolution, "dtype_bytes": width}


def main() -> None:
    print("| preset | part | parameters | weights (run dtype, buffers included) |")  # noqa: T201
    print("|---|---|---|---|")  # noqa: T201
    for arch in PRESETS:
        width = BYTES[get_config(arch).mixed_precision]
        counts = parameters(arch)
        for name, (count, stored) in counts.items():
            print(f"| {arch} | {name} | {count / 1e6:.1f} M | {stored * width / 2**30:.2f} GiB |")  # noqa: T201
        total = sum(stored for _, stored in counts.values())
        print(f"| {arch} | all | {sum(c for c, _ in counts.values()) / 1e9:.2f} B | "  # noqa: T201
              f"{total * width / 2**30:.1f} GiB |")
    print("\n| preset | px | latent | kept steps | stored per image | per stage (images) | reflection state |")  # noqa: T201
    print("|---|---|---|---|---|---|---|")  # noqa: T201
    for arch in PRESETS:
        s = stage_bytes(arch)
        print(f"| {arch} | {s['resolution']} | {s['latent_kib']:.0f} KiB | {s['kept_steps']} | "  # noqa: T201
              f"{s['per_image_mib']:.2f} MiB | {s['per_stage_mib']:.0f} MiB ({s['images']}) | "
              f"{s['reflection_mib']:.1f} MiB |")


if __name__ == "__main__":
    main()
