"""Pre-train the shapes-world testbed model (``assets/testbed-sd``) and measure it with the exact verifier.

The UNet (:func:`testbed.model.build_testbed_unet`) and the 2-layer CLIP text encoder are trained by
:func:`testbed.pretrain.pretrain_denoiser` on freshly rendered scenes of all three caption families
(:func:`shapes.world.sample_batch`). The pipeline is saved with ``save_pretrained``, reloaded, and its
samples are scored per family with :mod:`shapes.verify`; the numbers go to ``out/README.md``.

Usage::

    python scripts/make_testbed_model.py --out assets/testbed-sd --steps 2600 --seed 0
    python scripts/make_testbed_model.py --out assets/testbed-sd --eval_only   # re-run the checks only
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # idle OpenMP threads must not spin on a busy machine
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import argparse  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
from diffusers import StableDiffusionPipeline  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from shapes.world import sample_batch  # noqa: E402
from testbed.model import build_testbed_parts  # noqa: E402
from testbed.pretrain import PretrainOptions, pretrain_denoiser  # noqa: E402
from testbed.report import measure_pipeline, write_model_readme  # noqa: E402

logger = logging.getLogger("make_testbed_model")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="assets/testbed-sd", help="output folder of the pipeline")
    p.add_argument("--steps", type=int, default=2600, help="optimisation steps")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch_size", type=int, default=64)
    p.add_argument("--lr", type=float, default=1.5e-3)
    p.add_argument("--warmup", type=int, default=50, help="linear learning-rate warm-up steps")
    p.add_argument("--ema_decay", type=float, default=0.995)
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    p.add_argument("--eval_images", type=int, default=96, help="verifier samples per caption family")
    p.add_argument("--eval_only", action="store_true", help="skip training; check the pipeline in --out")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    """Entry point."""
    logging.basicConfig(level=logging.INFO, stream=sys.stdout, format="%(asctime)s %(message)s")
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    if not args.eval_only:
        pipe = build_testbed_parts(out, args.seed)
        opts = PretrainOptions(
            steps=args.steps, batch_size=args.batch_size, lr=args.lr, warmup=args.warmup,
            ema_decay=args.ema_decay, seed=args.seed, caption_dropout=0.1, snr_gamma=5.0,
        )  # fmt: skip
        wall, cpu = pretrain_denoiser(
            pipe.unet, pipe.text_encoder, pipe.tokenizer, pipe.scheduler, lambda n, rng: sample_batch(n, rng), opts
        )
        pipe.save_pretrained(str(out), safe_serialization=True)
        (out / "training.json").write_text(
            json.dumps({"args": vars(args), "wall_s": wall, "cpu_s": cpu}, indent=1), encoding="utf-8"
        )
        logger.info("saved to %s", out)
    pipe = StableDiffusionPipeline.from_pretrained(str(out))
    results = measure_pipeline(pipe, args.eval_images, seed=args.seed + 1, grid=out / "samples.png")
    logger.info("%s", json.dumps(results, indent=1))
    write_model_readme(out, json.loads((out / "training.json").read_text(encoding="utf-8")), results)


if __name__ == "__main__":
    main()
