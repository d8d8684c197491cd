"""Reflection, measured at a fixed policy: ``python bench/reflection.py [--run_dir logs/srrl_tiny]``.

For the base model and each checkpoint of ``--run_dir`` (default: the base model only), on the held-out prompts of
the config (default preset ``tiny``: the shapes-world testbed, exact verifier):

* the verifier's strict accuracy of images sampled as training samples them (``sample.eta``, CFG
  ``sample.guidance_scale``, the same per-row step noise) from the initial noise after 0, 1, 2 and 3 reflection
  rounds (``reflect.forward_guidance_scale`` / ``reflect.inverse_guidance_scale``), each against 0 rounds with
  the paired standard error (same noise, image by image);
* the DDIM inversion's reconstruction error at several inversion guidance scales: the relative L2 error of the
  inverted noise against the noise it came from, ``|x_T' - x_T| / |x_T|``, and of the image denoised again from
  it, ``|x_0' - x_0| / |x_0|`` (deterministic DDIM at the forward guidance).

Prints Markdown tables and writes ``--out`` (JSON). Numbers go to docs/, never into tests.
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

from cli.wiring import VERIFIER, family_loader  # noqa: E402
from config.stage_process import get_config  # noqa: E402
from shapes.world import parse_caption  # noqa: E402
from srrl.models import load_lora  # noqa: E402
from srrl.rundir import list_checkpoints  # noqa: E402
from srrl.sampling import GuidedDenoiser, denoise, initial_noise, invert, reflect, row_generators  # noqa: E402
from srrl.validate import load_prompt_file  # noqa: E402

logger = logging.getLogger("reflection")
CPU = torch.device("cpu")


def strict(prompts: list[str], images: torch.Tensor) -> torch.Tensor:
    return VERIFIER.table(prompts, images)[:, 0]


@torch.no_grad()
def accuracy_by_rounds(model, denoiser, config, prompts: list[str], rounds: list[int]) -> dict[int, torch.Tensor]:
    """Per reflection round count, the strict outcome [N] of each held-out image (same noise for all counts)."""
    rows = list(range(len(prompts)))
    x_T = initial_noise(model.latent_shape, row_generators(config.eval.seed, rows, child=-2), CPU, torch.float32)
    cond, uncond = model.prompt_encoder.encode(prompts), model.prompt_encoder.negative()
    r = config.reflect
    out = {}
    for n in rounds:
        start = reflect(denoiser, model.sampler, x_T, cond, uncond, n, r.forward_guidance_scale,
                        r.inverse_guidance_scale)
        x_0 = denoise(denoiser, model.sampler, start, cond, uncond, config.sample.guidance_scale, config.sample.eta,
                      row_generators(config.eval.seed, rows, child=0))
        out[n] = strict(prompts, model.decode(x_0))
    return out


@torch.no_grad()
def reconstruction(model, denoiser, config, prompts: list[str], scales: list[float],
                   iterations: int = 0) -> dict[float, dict]:
    """Relative L2 errors of one inversion round trip per inversion guidance scale (``iterations``: the fixed-point
    refinements of each inversion step, :func:`srrl.sampling.invert`)."""
    rows = list(range(len(prompts)))
    x_T = initial_noise(model.latent_shape, row_generators(config.eval.seed + 1, rows, child=-2), CPU, torch.float32)
    cond, uncond = model.prompt_encoder.encode(prompts), model.prompt_encoder.negative()
    forward = config.reflect.forward_guidance_scale
    x_0 = denoise(denoiser, model.sampler, x_T, cond, uncond, forward)
    out = {}
    for scale in scales:
        back = invert(denoiser, model.sampler, x_0, cond, uncond, scale, iterations)
        again = denoise(denoiser, model.sampler, back, cond, uncond, forward)
        out[scale] = {"noise_rel_err": float((back - x_T).norm() / x_T.norm()),
                      "image_rel_err": float((again - x_0).norm() / x_0.norm())}
    return out


def paired(base: torch.Tensor, other: torch.Tensor) -> tuple[float, float]:
    d = (other - base).double()
    return float(d.mean()), float(d.std() / d.numel() ** 0.5) if d.numel() > 1 else 0.0


def measure(model, config, prompts: list[str], label: str) -> dict:
    model.set_timesteps(config.sample.num_steps, CPU)
    denoiser = GuidedDenoiser(model.denoiser, config.sample.max_micro_batch, model.embedded_guidance)
    acc = accuracy_by_rounds(model, denoiser, config, prompts, [0, 1, 2, 3])
    rec = reconstruction(model, denoiser, config, prompts[: min(len(prompts), 64)], [0.0, 0.1, 1.0, 4.0])
    return {"label": label, "n": len(prompts), "strict": by_rounds(acc), "reconstruction": rec,
            "families": by_family(prompts, acc)}


def by_family(prompts: list[str], acc: dict[int, torch.Tensor]) -> dict[str, dict[int, dict]]:
    """:func:`by_rounds` over the images of each caption family of ``prompts`` (one per image)."""
    families = [parse_caption(p).family for p in prompts]
    out = {}
    for family in dict.fromkeys(families):
        rows = torch.tensor([f == family for f in families])
        out[family] = by_rounds({n: outcome[rows] for n, outcome in acc.items()})
    return out


def by_rounds(acc: dict[int, torch.Tensor]) -> dict[int, dict]:
    """Per round count: the accuracy of its outcomes [N] and its paired change against 0 rounds."""
    out = {}
    for n, outcome in acc.items():
        delta, se = paired(acc[0], outcome)
        out[n] = {"accuracy": float(outcome.mean()), "change": delta, "change_se": se, "n": outcome.numel()}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--run_dir", default="")
    parser.add_argument("--images_per_prompt", type=int, default=64)
    parser.add_argument("--out", default="reflection.json")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.manual_seed(0)
    config = get_config(args.preset)
    prompts = [p for p in load_prompt_file(config.eval.prompt_file, "eval.prompt_file")
               for _ in range(args.images_per_prompt)]
    model = family_loader(config)(config, CPU, torch.float32)
    model.denoiser.eval()
    results = [measure(model, config, prompts, "base")]
    for ckpt in list_checkpoints(Path(args.run_dir)) if args.run_dir else []:
        load_lora(model.denoiser, ckpt)
        results.append(measure(model, config, prompts, ckpt.name))
    print("| policy | rounds | strict accuracy | change vs 0 rounds (paired s.e.) |")  # noqa: T201
    print("|---|---|---|---|")  # noqa: T201
    for r in results:
        for n, s in r["strict"].items():
            print(f"| {r['label']} | {n} | {100 * s['accuracy']:.1f}% | "  # noqa: T201
                  f"{100 * s['change']:+.1f} ± {100 * s['change_se']:.1f} |")
    print("\n| policy | family | images | rounds 0 / 1 / 2 / 3 | change vs 0 rounds (paired s.e.) |")  # noqa: T201
    print("|---|---|---|---|---|")  # noqa: T201
    for r in results:
        for family, rows in r["families"].items():
            accs = " / ".join(f"{100 * s['accuracy']:.1f}" for s in rows.values())
            changes = " / ".join(f"{100 * s['change']:+.1f} ± {100 * s['change_se']:.1f}" for s in rows.values())
            print(f"| {r['label']} | {family} | {rows[0]['n']} | {accs} % | {changes} |")  # noqa: T201
    print("\n| policy | inversion guidance | noise rel. error | image rel. error |")  # noqa: T201
    print("|---|---|---|---|")  # noqa: T201
    for r in results:
        for scale, e in r["reconstruction"].items():
            print(f"| {r['label']} | {scale:g} | {e['noise_rel_err']:.3f} | {e['image_rel_err']:.3f} |")  # noqa: T201
    Path(args.out).write_text(json.dumps(results, indent=1), encoding="utf-8")


if __name__ == "__main__":
    main()
