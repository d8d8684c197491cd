"""Measure a shapes-world pipeline with the exact verifier and describe it in a model card."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from diffusers import StableDiffusionPipeline

from shapes.world import FAMILIES, parse_caption
from srrl.plots import image_grid, save_png
from testbed.verifier import check_table, family_summary

#: Sampling settings of the model card's measurements: the stock pipeline as the RL presets sample.
CARD_SAMPLING = {"num_inference_steps": 10, "guidance_scale": 4.0, "eta": 1.0}


@torch.no_grad()
def measure_pipeline(
    pipe: StableDiffusionPipeline, captions: list[str], per_caption: int, seed: int, grid: Path | None = None,
    chunk: int = 256,
) -> dict[str, dict[str, float]]:
    """Verifier accuracy (with standard errors) per caption family and pooled (``all``) of the stock pipeline on
    ``per_caption`` images of each caption (:data:`CARD_SAMPLING`; the noise from one generator seeded ``seed``,
    drawn ``chunk`` images at a time): the :func:`family_summary` of the images."""
    pipe.set_progress_bar_config(disable=True)
    prompts = [c for c in captions for _ in range(per_caption)]
    generator = torch.Generator().manual_seed(seed)
    images = torch.cat([
        pipe(prompts[i : i + chunk], generator=generator, output_type="pt", **CARD_SAMPLING).images.float().cpu()
        for i in range(0, len(prompts), chunk)
    ])  # fmt: skip
    if grid is not None:
        families = [parse_caption(c).family for c in prompts]
        shown = [i for family in FAMILIES for i in [k for k, f in enumerate(families) if f == family][::per_caption][:6]]
        save_png(image_grid(images[shown], [prompts[i] for i in shown], columns=6, cell=96), grid)
    return family_summary(prompts, check_table(prompts, images))


def _family_rows(results: dict[str, dict[str, float]]) -> str:
    """The card's table rows: one per family and the pooled ``all``."""
    return "\n".join(
        f"| {fam} | {r['strict']:.3f} ± {r['strict_stderr']:.3f} | {r['colour']:.2f} | {r['shape']:.2f} | "
        f"{r['count']:.2f} | " + (f"{r['relation']:.2f}" if "relation" in r else "—") + f" | {int(r['n'])} |"
        for fam, r in results.items()
    )


def write_model_readme(out: Path, training: dict[str, Any], results: dict[str, dict[str, float]],
                       points: list[dict[str, Any]]) -> None:
    """Write ``out/README.md`` (how the model was made, its verifier accuracy per family, the accuracy of the EMA
    snapshots against pre-training steps) and ``out/card.json``."""
    args = training["args"]
    size_mb = sum(f.stat().st_size for f in out.rglob("*.safetensors")) / 2**20
    fams = [f for f in (*FAMILIES, "all") if f in results]
    curve = "\n".join(
        f"| {p['step']} | " + " | ".join(f"{p[f]['strict']:.3f}" for f in fams) + " |" for p in points
    )
    text = f"""# testbed-sd: the shapes-world model

Made offline by

    python scripts/make_testbed_model.py --out {args["out"]} --steps {args["steps"]} --seed {args["seed"]}

(batch {args["batch_size"]}, AdamW lr {args["lr"]:g} with {args["warmup"]} warm-up steps and cosine decay to 10 %,
EMA {args["ema_decay"]:g}, 10 % caption dropout, v-prediction with min-SNR-5 weighting floored at SNR 1,
`torch.set_num_threads({args["threads"]})`: {training["wall_s"] / 60:.1f} min of training wall time on the machine that made it).
StableDiffusionPipeline: identity AutoencoderKL (latents = [R, G, B] of pixels in [-1, 1]), word-level CLIP
tokenizer over `shapes.world.WORDS`, 2-layer CLIP text encoder, 4.1 M-parameter UNet (16/32/64/128,
cross-attention at 8x8 and 4x4), DDIM over SD v1's scaled-linear betas rescaled to zero terminal SNR (the last
cumulative alpha floored at 2^-24, written as `trained_betas`), v-prediction, "trailing" timestep spacing.
Weights: {size_mb:.1f} MB of fp32 safetensors.

## Exact-verifier accuracy (`shapes.verify`)

The stock `StableDiffusionPipeline.from_pretrained` with the shipped scheduler, DDIM
{CARD_SAMPLING["num_inference_steps"]} steps, CFG {CARD_SAMPLING["guidance_scale"]:g}, eta {CARD_SAMPLING["eta"]:g}, from N(0, I)
noise: {args["per_caption"]} images of each held-out caption of `config/prompt/testbed_test.json` (seed
{args["seed"] + 1}). *strict* = every part right (± its standard error); the other columns are the share of
images whose part is right; *all* pools the families with that file's caption mix.

| family | strict | colour | shape | count | relation | n |
|---|---|---|---|---|---|---|
{_family_rows(results)}

## Strict accuracy against pre-training steps

The EMA weights at each snapshot, measured as above.

| step | {" | ".join(fams)} |
|---|{"---|" * len(fams)}
{curve}

Rendered ground truth scores 1.00 in every column (tests/test_testbed_world.py). `samples.png`: the first
image of up to six captions of each family, family after family. Raw numbers: `card.json`.
"""
    (out / "README.md").write_text(text, encoding="utf-8")
    card = {**results, "sampling": CARD_SAMPLING, "per_caption": args["per_caption"], "seed": args["seed"] + 1,
            "curve": points}  # fmt: skip
    (out / "card.json").write_text(json.dumps(card, indent=1), encoding="utf-8")
