"""Pre-train the embedded tiny Stable-Diffusion model (``assets/tiny-sd``) on procedural scenes.

The UNet and the CLIP text encoder of :mod:`testbed.tiny_model` are trained jointly as an epsilon-prediction
denoiser in the identity-VAE latent space (latents = ``[R, G, B, 0]`` pixels in [-1, 1]) on freshly
rendered captioned scenes, with 10% caption dropout (for classifier-free guidance), AdamW, min-SNR-5 loss
weighting and an EMA of the weights (the EMA weights are saved). The pipeline is saved with
``save_pretrained(out, safe_serialization=True)``, reloaded, checked (colour accuracy and brightness of
DDIM samples) and described in ``out/README.md``.

Usage::

    python scripts/make_tiny_model.py --out assets/tiny-sd --steps 600 --seed 0
    python scripts/make_tiny_model.py --out assets/tiny-sd --eval_only   # re-run the checks only
"""

from __future__ import annotations

import os

# Set before torch/tokenizers start their thread pools. On a busy 2-core machine, spinning OpenMP threads
# and the Rust tokenizer's worker threads make each step 5-10x slower.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import argparse  # noqa: E402
import logging  # noqa: E402
import math  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
from diffusers import StableDiffusionPipeline  # noqa: E402
from PIL import Image  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from testbed.pretrain import PretrainOptions, pretrain_denoiser  # noqa: E402
from testbed.tiny_model import (  # noqa: E402
    COLOURS,
    SHAPES,
    assemble_pipeline,
    build_scheduler,
    build_tiny_text_encoder,
    build_tiny_unet,
    build_tokenizer,
    dominant_colour,
    sample_scenes,
)

logger = logging.getLogger("make_tiny_model")

EVAL_COLOURS = ("red", "green", "blue", "yellow", "cyan", "magenta", "orange", "purple")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="assets/tiny-sd", help="output folder of the pipeline")
    p.add_argument("--steps", type=int, default=600, help="optimisation steps")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--warmup", type=int, default=20, help="linear learning-rate warm-up steps")
    p.add_argument("--ema_decay", type=float, default=0.99)
    p.add_argument("--caption_dropout", type=float, default=0.1)
    p.add_argument("--snr_gamma", type=float, default=5.0, help="min-SNR-gamma loss weighting")
    p.add_argument("--size", type=int, default=32, help="image (= latent) resolution")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    p.add_argument("--grid", default="/tmp/tiny_sd_grid.png", help="where to save the 4x4 sample grid")
    p.add_argument("--eval_only", action="store_true", help="skip training; check the pipeline in --out")
    return p.parse_args(argv)


def train(args: argparse.Namespace) -> tuple[StableDiffusionPipeline, float, float]:
    """Pre-train UNet + text encoder; returns the pipeline (EMA weights), wall and CPU seconds."""
    torch.manual_seed(args.seed)  # one torch stream: initial weights, then the training noise
    tokenizer = build_tokenizer(Path(args.out) / "tokenizer")
    unet = build_tiny_unet(args.size)
    text_encoder = build_tiny_text_encoder(len(tokenizer))
    opts = PretrainOptions(
        steps=args.steps, batch_size=args.batch_size, lr=args.lr, warmup=args.warmup, ema_decay=args.ema_decay,
        caption_dropout=args.caption_dropout, snr_gamma=args.snr_gamma, seed=args.seed, seed_torch=False,
    )  # fmt: skip

    def scenes(n: int, rng: np.random.Generator) -> tuple[torch.Tensor, list[str]]:
        images, captions = sample_scenes(n, rng, args.size)
        return (images + 1.0) / 2.0, captions

    wall, cpu = pretrain_denoiser(unet, text_encoder, tokenizer, build_scheduler(), scenes, opts)
    return assemble_pipeline(unet, text_encoder, tokenizer, args.size), wall, cpu


def generate(pipe: StableDiffusionPipeline, prompts: list[str], seed: int) -> torch.Tensor:
    """DDIM samples (20 steps, guidance 5, eta 1) as a [N, 3, H, W] tensor in [0, 1]."""
    out = pipe(
        prompts,
        num_inference_steps=20,
        guidance_scale=5.0,
        eta=1.0,
        generator=torch.Generator().manual_seed(seed),
        output_type="pt",
    )
    return out.images.float().cpu()


def save_grid(images: torch.Tensor, path: str | Path, cols: int = 4, scale: int = 4) -> None:
    """Save [N, 3, H, W] images in [0, 1] as an upscaled (nearest) grid PNG."""
    n, _, h, w = images.shape
    rows = math.ceil(n / cols)
    grid = torch.ones(3, rows * (h + 2), cols * (w + 2))
    for i, img in enumerate(images):
        r, c = divmod(i, cols)
        grid[:, r * (h + 2) + 1 : r * (h + 2) + 1 + h, c * (w + 2) + 1 : c * (w + 2) + 1 + w] = img
    arr = (grid.clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    pil = Image.fromarray(arr)
    pil.resize((pil.width * scale, pil.height * scale), Image.NEAREST).save(path)


def evaluate(pipe: StableDiffusionPipeline, grid_paths: list[Path], seed: int) -> dict[str, float | str]:
    """Sample from the pipeline and measure colour accuracy and brightness statistics."""
    pipe.set_progress_bar_config(disable=True)
    rng = np.random.default_rng(seed + 1)
    results: dict[str, float | str] = {}
    # 16 mixed prompts -> grid
    _, grid_prompts = sample_scenes(16, rng, 32)
    grid_images = generate(pipe, grid_prompts, seed)
    for path in grid_paths:
        save_grid(grid_images, path)
    results["grid_prompts"] = " | ".join(grid_prompts)
    # colour accuracy: 8 colour words x 4 samples (shape and background vary)
    prompts, targets = [], []
    for ci, colour in enumerate(EVAL_COLOURS):
        for k in range(4):
            bg = ("dark", "light")[(ci + k) % 2]
            prompts.append(f"a {colour} {SHAPES[k % 4]} on a {bg} background")
            targets.append(colour)
    preds = dominant_colour(generate(pipe, prompts, seed + 2))
    results["colour_accuracy"] = float(np.mean([p == t for p, t in zip(preds, targets, strict=True)]))
    results["colour_chance"] = 1.0 / len(COLOURS)
    real_rng = np.random.default_rng(seed + 3)
    real_hits = [
        pred == c
        for c in EVAL_COLOURS
        for pred in dominant_colour((sample_scenes(4, real_rng, 32, {"colour": c})[0] + 1) / 2)
    ]
    results["colour_accuracy_real_scenes"] = float(np.mean(real_hits))
    real = sample_scenes(32, real_rng, 32)[0]
    # brightness over 32 mixed prompts
    _, mixed = sample_scenes(32, rng, 32)
    bright = generate(pipe, mixed, seed + 4).mean(dim=(1, 2, 3))
    real_bright = ((real + 1) / 2).mean(dim=(1, 2, 3))
    results["brightness_mean"] = float(bright.mean())
    results["brightness_std"] = float(bright.std())
    results["brightness_min"] = float(bright.min())
    results["brightness_max"] = float(bright.max())
    results["real_brightness_mean"] = float(real_bright.mean())
    results["real_brightness_std"] = float(real_bright.std())
    return results


def write_readme(
    out: Path, args: argparse.Namespace, times: tuple[float, float], results: dict[str, float | str]
) -> None:
    """Describe how the model was made and what the checks measured."""
    unet_params = sum(p.numel() for p in build_tiny_unet(args.size).parameters())
    size_mb = sum(f.stat().st_size for f in out.rglob("*") if f.is_file()) / 2**20
    cmd = (
        f"python scripts/make_tiny_model.py --out {args.out} --steps {args.steps} --seed {args.seed}"
        f" --batch_size {args.batch_size} --threads {args.threads}"
    )
    r = results
    text = f"""# tiny-sd: embedded tiny Stable-Diffusion-v1-architecture model

Made offline by `scripts/make_tiny_model.py` (components from `testbed/tiny_model.py`):

    {cmd}

- UNet2DConditionModel ({unet_params / 1e6:.2f} M parameters) and a 2-layer CLIPTextModel trained jointly as an
  epsilon-prediction denoiser for {args.steps} steps: batch {args.batch_size}, AdamW lr {args.lr:g} (warm-up, cosine),
  min-SNR-{args.snr_gamma:g} weighting, {args.caption_dropout:.0%} caption dropout to "", EMA {args.ema_decay:g}
  (EMA weights saved), on freshly rendered {args.size}x{args.size} scenes (1-3 coloured shapes on a dark or
  light gray background, `testbed.tiny_model.sample_scenes`).
- Training time: {times[0]:.0f} s wall, {times[1]:.0f} s CPU, `torch.set_num_threads({args.threads})`.
- VAE: hand-set identity AutoencoderKL, latents = [R, G, B, 0] of pixels in [-1, 1]
  (`vae_scale_factor` 1, `scaling_factor` 1.0). Scheduler: DDIM with SD-v1 betas.
- Tokenizer: word-level CLIP BPE over `testbed.tiny_model.TINY_WORDS`, at most 16 tokens.
- Folder size: {size_mb:.1f} MB (fp32 safetensors).

## Checks (DDIM 20 steps, guidance 5, eta 1.0, 32x32)

| check | model | rendered scenes |
|---|---|---|
| colour accuracy, 8 colour words x 4 samples (chance {r["colour_chance"]:.2f}) | {r["colour_accuracy"]:.2f} | {r["colour_accuracy_real_scenes"]:.2f} |
| brightness mean over 32 mixed prompts | {r["brightness_mean"]:.3f} | {r["real_brightness_mean"]:.3f} |
| brightness std across the 32 samples | {r["brightness_std"]:.3f} | {r["real_brightness_std"]:.3f} |
| brightness range | [{r["brightness_min"]:.2f}, {r["brightness_max"]:.2f}] | |

Colour accuracy: is the mean colour of the non-background pixels nearest to the colour word's palette RGB
among {len(COLOURS)} colours (`testbed.tiny_model.dominant_colour`)? Brightness: mean pixel value in [0, 1].

`samples.png` (row-major) shows samples for: {r["grid_prompts"]}
"""
    (out / "README.md").write_text(text, encoding="utf-8")


def main(argv: list[str] | None = None) -> None:
    """Entry point."""
    logging.basicConfig(level=logging.INFO, stream=sys.stdout, format="%(asctime)s %(message)s")
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    times = (float("nan"), float("nan"))
    if not args.eval_only:
        pipe, wall, cpu = train(args)
        times = (wall, cpu)
        pipe.save_pretrained(str(out), safe_serialization=True)
        logger.info("saved to %s", out)
    pipe = StableDiffusionPipeline.from_pretrained(str(out))
    results = evaluate(pipe, [Path(args.grid), out / "samples.png"], args.seed)
    for key, value in results.items():
        logger.info("%s: %s", key, value)
    if not args.eval_only:
        write_readme(out, args, times, results)


if __name__ == "__main__":
    main()
