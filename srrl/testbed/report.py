"""Measure a shapes-world pipeline with the exact verifier and describe it in a model card."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers import StableDiffusionPipeline

from srrl.plots import image_grid, save_png
from srrl.testbed.verify import check
from srrl.testbed.world import FAMILIES, make_caption, parse_caption, random_spec

#: Sampling settings of the model card's measurements.
CARD_SAMPLING = {"num_inference_steps": 20, "guidance_scale": 4.0, "eta": 0.0}


PARTS: tuple[str, ...] = ("strict", "colour", "shape", "count", "relation")


def check_table(captions: list[str], images: torch.Tensor) -> torch.Tensor:
    """Verifier results as FloatTensor[N, len(PARTS)]: 1/0 per part, NaN where a part does not apply."""
    rows = [
        [float(all(p.values()))] + [float(p[k]) if k in p else float("nan") for k in PARTS[1:]]
        for p in check(captions, images)
    ]
    return torch.tensor(rows, dtype=torch.float32).reshape(len(rows), len(PARTS))


def table_reward(name: str, table: torch.Tensor) -> torch.Tensor | None:
    """The reward ``name`` of the images of a :func:`check_table` [N, parts], read from it: ``shapes_verify`` (the
    strict column) or ``shapes_partial`` (the mean of the parts that apply): FloatTensor[N]; None for other rewards."""
    if name == "shapes_verify":
        return table[:, 0].clone()
    if name == "shapes_partial":
        return table[:, 1:].nanmean(dim=1)
    return None


def family_summary(captions: list[str], table: torch.Tensor) -> dict[str, dict[str, float]]:
    """Per caption family (and ``all``): mean and standard error of each part of a :func:`check_table`."""
    families = [parse_caption(c).family for c in captions]
    out: dict[str, dict[str, float]] = {}
    for family in [*dict.fromkeys(families), "all"]:
        rows = table[[i for i, f in enumerate(families) if family in (f, "all")]]
        entry: dict[str, float] = {"n": float(rows.shape[0])}
        for k, part in enumerate(PARTS):
            col = rows[:, k][~rows[:, k].isnan()]
            if col.numel():
                entry[part] = float(col.mean())
                entry[f"{part}_stderr"] = float(col.std() / col.numel() ** 0.5) if col.numel() > 1 else 0.0
        out[family] = entry
    return out


@dataclass(frozen=True)
class StrictGain:
    """Change of held-out strict accuracy between two evaluations of the same fixed-seed images."""

    delta: float  # after - before (fraction)
    stderr: float  # standard error of ``delta``
    gained: int  # images wrong before and right after (-1 where per-image outcomes are not known)
    lost: int  # images right before and wrong after (-1 where per-image outcomes are not known)

    @property
    def paired(self) -> bool:
        """Whether ``stderr`` is that of the paired difference (per-image outcomes known)."""
        return self.gained >= 0

    @property
    def in_se(self) -> float:
        """``delta`` in standard errors (0 if the standard error is 0)."""
        return self.delta / self.stderr if self.stderr > 0 else 0.0


def strict_gain(before: dict[str, Any], after: dict[str, Any]) -> StrictGain:
    """Change of strict accuracy between two ``eval.jsonl`` records (``"verifier"``: a :func:`family_summary`;
    ``"verifier_strict"``: the strict outcome, 0/1, of every image).

    Both evaluations score the same images' noise (fixed seeds), so the outcomes are paired: with per-image
    outcomes ``a``, ``b`` [N] the standard error is that of the mean of ``d = b - a`` (``std(d) / sqrt(N)``; the
    discordant images carry it). Records without per-image outcomes (runs made before they were stored) fall back
    to independent samples, ``sqrt(se_before**2 + se_after**2)``.
    """
    a, b = before.get("verifier_strict"), after.get("verifier_strict")
    if a is not None and b is not None and len(a) == len(b) > 1:
        x, y = torch.tensor(a, dtype=torch.float64), torch.tensor(b, dtype=torch.float64)
        d = y - x  # [N] in {-1, 0, 1}
        return StrictGain(float(d.mean()), float(d.std() / len(a) ** 0.5), int((d > 0).sum()), int((d < 0).sum()))
    sa, sb = before["verifier"]["all"], after["verifier"]["all"]
    stderr = (sa["strict_stderr"] ** 2 + sb["strict_stderr"] ** 2) ** 0.5
    return StrictGain(sb["strict"] - sa["strict"], stderr, -1, -1)


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
`srrl.testbed.world.WORDS`, 2-layer CLIP text encoder, 4.1 M-parameter UNet (16/32/64/128, cross-attention at
8x8 and 4x4), DDIM. Weights: {size_mb:.1f} MB of fp32 safetensors.

## Exact-verifier accuracy (`srrl.testbed.verify`)

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
