"""A supervised reference for RL on the shapes-world testbed: the same LoRA, trained on rendered ground truth.

RL on the full testbed gains +3 to +6 points of held-out strict accuracy at best (docs/testbed_tuning.md). This
script asks how far the *same* adapter (the ``tiny`` preset's LoRA targets and rank on ``assets/testbed-sd``)
moves held-out accuracy when it is trained by plain denoising regression on correct images of the training
captions, rendered by the world itself (:func:`shapes.world.render`) -- the signal RL can only approximate with
its own correct samples. The LoRA is written as a trainer checkpoint, so ``evaluate.py`` scores it on exactly the
held-out images of a run (same captions, seeds, sampler and dtype), paired against the base model::

    python scripts/lora_reference.py --out /tmp/ref --steps 200 --batch_size 32
    python evaluate.py --config config/stage_process.py:tiny \\
        --config.eval.prompt_file=config/prompt/testbed_test.json --config.eval.num_images_per_prompt=32 \\
        --checkpoints /tmp/ref/checkpoint --out /tmp/ref/eval

The loss is the pre-training loss (:mod:`testbed.pretrain`: the scheduler's prediction type, min-SNR-5 weighting,
uniform timesteps), without caption dropout: the text encoder is frozen and only the LoRA trains, as in RL.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import logging  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
from diffusers import DDIMScheduler  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from config.stage_process import get_config  # noqa: E402
from shapes.world import parse_caption, render  # noqa: E402
from srrl.families.sd import load_sd_model  # noqa: E402
from srrl.models import save_lora  # noqa: E402
from srrl.validate import load_prompt_file  # noqa: E402
from testbed.pretrain import denoising_loss, image_latents  # noqa: E402

logger = logging.getLogger("lora_reference")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="output folder (the LoRA goes to <out>/checkpoint)")
    p.add_argument("--model", default="", help="pipeline folder (default: the tiny preset's, assets/testbed-sd)")
    p.add_argument("--prompt_file", default="config/prompt/testbed_train.json", help="training captions")
    p.add_argument("--family", default="", choices=["", "single", "count", "relation"],
                   help="train on this caption family of the file only (default: every caption)")
    p.add_argument("--steps", type=int, default=200, help="optimizer steps")
    p.add_argument("--batch_size", type=int, default=32, help="rendered images per step")
    p.add_argument("--lr", type=float, default=3e-3, help="AdamW learning rate (the tiny preset's RL rate)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--snr_gamma", type=float, default=5.0)
    return p.parse_args(argv)


def read_captions(prompt_file: str, family: str = "") -> list[str]:
    """The captions of ``prompt_file`` (the project's prompt-file format), only those of caption family ``family`` when it is given."""
    kept = [c for c in load_prompt_file(prompt_file, "--prompt_file") if not family or parse_caption(c).family == family]
    if not kept:
        raise SystemExit(f"--family {family}: {prompt_file} holds no caption of that family")
    return kept


def reference_loss(unet: torch.nn.Module, scheduler: DDIMScheduler, latents: torch.Tensor, hidden: torch.Tensor,
                   snr_gamma: float, generator: torch.Generator) -> torch.Tensor:
    """The pre-training loss (:func:`testbed.pretrain.denoising_loss`, the scheduler's prediction type) of
    ``latents`` [B, C, H, W] under text states ``hidden`` [B, L, D], at uniform timesteps and noise drawn from
    ``generator``."""
    n = latents.shape[0]
    noise = torch.randn(latents.shape, generator=generator)
    t = torch.randint(0, scheduler.config.num_train_timesteps, (n,), generator=generator)
    pred = unet(scheduler.add_noise(latents, noise, t), t, encoder_hidden_states=hidden).sample
    return denoising_loss(pred, latents, noise, t, scheduler, snr_gamma)


def main(argv: list[str] | None = None) -> None:
    """Entry point."""
    logging.basicConfig(level=logging.INFO, stream=sys.stdout, format="%(asctime)s %(message)s")
    args = parse_args(argv)
    config = get_config("tiny")
    if args.model:
        config.pretrained.model = args.model
    captions = read_captions(args.prompt_file, args.family)
    torch.manual_seed(args.seed)
    model = load_sd_model(config, torch.device("cpu"), torch.float32)
    unet = model.denoiser.train()
    params = [p for p in unet.parameters() if p.requires_grad]
    t = config.train
    optim = torch.optim.AdamW(params, lr=args.lr, betas=(t.adam_beta1, t.adam_beta2), weight_decay=t.adam_weight_decay)
    rng, gen = np.random.default_rng(args.seed), torch.Generator().manual_seed(args.seed)
    hidden_of = {c: h for c, h in zip(captions, model.prompt_encoder.encode(captions).encoder_hidden_states, strict=True)}
    start = time.perf_counter()
    for step in range(args.steps):
        batch = [captions[i] for i in rng.integers(len(captions), size=args.batch_size)]
        images = torch.stack([render(parse_caption(c), rng, config.sample.resolution) for c in batch])  # [B,3,H,W]
        hidden = torch.stack([hidden_of[c] for c in batch])  # [B, L, D]
        latents = image_latents(images, unet.config.in_channels)
        loss = reference_loss(unet, model.sampler.scheduler, latents, hidden, args.snr_gamma, gen)
        optim.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, t.max_grad_norm)
        optim.step()
        if step % 25 == 0 or step == args.steps - 1:
            logger.info("step %d/%d loss %.4f %.0f s", step, args.steps, loss.item(), time.perf_counter() - start)
    out = Path(args.out) / "checkpoint"
    out.mkdir(parents=True, exist_ok=True)
    save_lora(model.pipeline_class, unet, out)
    logger.info("LoRA written to %s (%d images seen)", out, args.steps * args.batch_size)


if __name__ == "__main__":
    main()
