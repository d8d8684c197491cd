"""Reconstruction error of the reflection rounds' inversion on each family's tiny model:
``python bench/inversion.py [--presets tiny,tiny_sd3,tiny_flux] [--iterations 0,1,3]``.

For each preset's model (the base policy) and held-out prompts (``--images`` of them, the first ones of
``eval.prompt_file``, repeated): noise ``x_T`` is denoised deterministically at ``reflect.forward_guidance_scale``
to ``x_0``, inverted back at each inversion guidance scale with each number of fixed-point iterations
(``reflect.inversion_iterations``), and denoised again; the relative L2 errors ``|x_T' - x_T| / |x_T|`` and
``|x_0' - x_0| / |x_0|`` and the denoiser calls of the inversion are reported (Markdown, and JSON to ``--out``).
DDIM for ``tiny`` (the testbed model), the rectified-flow Euler inversion for ``tiny_sd3`` and ``tiny_flux``
(random weights). Numbers go to docs/, never into tests.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from bench.reflection import reconstruction  # noqa: E402
from cli.wiring import family_loader  # noqa: E402
from config.stage_process import get_config  # noqa: E402
from srrl.sampling import GuidedDenoiser  # noqa: E402
from srrl.validate import load_prompt_file  # noqa: E402

CPU = torch.device("cpu")


def measure(preset: str, images: int, scales: list[float], iterations: list[int]) -> list[dict]:
    """One row per (inversion guidance scale, iterations) of ``preset``'s base model."""
    config = get_config(preset)
    prompts = load_prompt_file(config.eval.prompt_file, "eval.prompt_file")
    prompts = [prompts[i % len(prompts)] for i in range(images)]
    model = family_loader(config)(config, CPU, torch.float32)
    model.denoiser.eval()
    model.set_timesteps(config.sample.num_steps, CPU)
    rows = []
    for k in iterations:
        denoiser = GuidedDenoiser(model.denoiser, config.sample.max_micro_batch, model.embedded_guidance)
        errors = reconstruction(model, denoiser, config, prompts, scales, k)
        for scale, e in errors.items():
            rows.append({"preset": preset, "family": config.family, "steps": config.sample.num_steps,
                         "inverse_guidance": scale, "iterations": k, "calls_per_inversion_step": 1 + k, **e})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", default="tiny,tiny_sd3,tiny_flux")
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--scales", default="1.0,4.0")
    parser.add_argument("--iterations", default="0,1,3")
    parser.add_argument("--out", default="inversion.json")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.manual_seed(0)
    scales = [float(s) for s in args.scales.split(",")]
    iterations = [int(k) for k in args.iterations.split(",")]
    rows = [r for p in args.presets.split(",") for r in measure(p, args.images, scales, iterations)]
    print("| preset (family, steps) | inversion guidance | fixed-point iterations | noise rel. error | "  # noqa: T201
          "image rel. error |")
    print("|---|---|---|---|---|")  # noqa: T201
    for r in rows:
        print(f"| {r['preset']} ({r['family']}, {r['steps']}) | {r['inverse_guidance']:g} | {r['iterations']} | "  # noqa: T201
              f"{r['noise_rel_err']:.4f} | {r['image_rel_err']:.4f} |")
    Path(args.out).write_text(json.dumps(rows, indent=1), encoding="utf-8")


if __name__ == "__main__":
    main()
