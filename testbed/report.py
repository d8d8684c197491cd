"""Measure a shapes-world pipeline with the exact verifier and describe it in a model card."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers import StableDiffusionPipeline

from shapes.world import FAMILIES, make_caption, random_spec
from srrl.plots import image_grid, save_png
from testbed.verifier import check_table, family_summary

#: Sampling settings of the model card's measurements.
CARD_SAMPLING = {"num_inference_steps": 20, "guidance_scale": 4.0, "eta": 0.0}


@torch.no_grad()
def measure_pipeline(
    pipe: StableDiffusionPipeline, n_per_family: int, seed: int, grid: Path | None = None
) -> dict[str, dict[str, float]]:
    """Verifier accuracy (with standard errors) per caption family on ``n_per_family`` random captions (one image
    each): the :func:`family_summary` entry of each family."""
    pipe.set_progress_bar_config(disable=True)
    rng = np.random.default_rng(seed)
    results: dict[str, dict[str, float]] = {}
    shown: list[torch.Tensor] = []
    labels: list[str] = []
    for k, family in enumerate(FAMILIES):
        captions = [make_caption(random_spec(rng, family)) for _ in range(n_per_family)]
        images = pipe(
            captions, generator=torch.Generator().manual_seed(seed + k), output_type="pt", **CARD_SAMPLING
        ).images.float().cpu()
        results[family] = family_summary(captions, check_table(captions, images))[family]
        shown.append(images[:6])
        labels += captions[:6]
    if grid is not None:
        save_png(image_grid(torch.cat(shown), labels, columns=6, cell=96), grid)
    return results


def write_model_readme(out: Path, training: dict[str, Any], results: dict[str, dict[str, float]]) -> None:
    """Write ``out/README.md``: how the model was made and its verifier accuracy per family."""
    args = training["args"]
    size_mb = sum(f.stat().st_size for f in out.rglob("*.safetensors")) / 2**20
    rows = "\n".join(
        f"| {fam} | {r['strict']:.2f} | {r['colour']:.2f} | {r['shape']:.2f} | {r['count']:.2f} "
        + (f"| {r['relation']:.2f} |" if "relation" in r else "| — |")
        + f" {int(r['n'])} |"
        for fam, r in results.items()
    )
    text = f"""# testbed-sd: the shapes-world model

Made offline by

    python scripts/make_testbed_model.py --out {args["out"]} --steps {args["steps"]} --seed {args["seed"]}

(batch {args["batch_size"]}, AdamW lr {args["lr"]:g}, EMA {args["ema_decay"]:g}, 10% caption dropout, min-SNR-5,
`torch.set_num_threads({args["threads"]})`: {training["wall_s"] / 60:.1f} min wall, {training["cpu_s"] / 60:.1f} CPU-min).
StableDiffusionPipeline: identity AutoencoderKL (latents = [R, G, B, 0]), word-level CLIP tokenizer over
`shapes.world.WORDS`, 2-layer CLIP text encoder, 4.1 M-parameter UNet (16/32/64/128, cross-attention at
8x8 and 4x4), DDIM. Weights: {size_mb:.1f} MB of fp32 safetensors.

## Exact-verifier accuracy (`shapes.verify`)

Random captions of each family, one image each; DDIM {CARD_SAMPLING["num_inference_steps"]} steps, CFG
{CARD_SAMPLING["guidance_scale"]:g}, eta {CARD_SAMPLING["eta"]:g}. *strict* = every part right; the other columns are the
share of images whose part is right.

| family | strict | colour | shape | count | relation | n |
|---|---|---|---|---|---|---|
{rows}

Rendered ground truth scores 1.00 in every column (tests/test_testbed_world.py). `samples.png`: the first 6
samples of each family, one family per row. Raw numbers: `card.json`.
"""
    (out / "README.md").write_text(text, encoding="utf-8")
    (out / "card.json").write_text(json.dumps(results, indent=1), encoding="utf-8")
