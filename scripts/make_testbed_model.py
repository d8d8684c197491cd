"""Pre-train the shapes-world testbed model (``assets/testbed-sd``) and measure it with the exact verifier.

The UNet (:func:`testbed.model.build_testbed_unet`) and the 2-layer CLIP text encoder are trained by
:func:`testbed.pretrain.pretrain_denoiser` on freshly rendered scenes of all three caption families
(:func:`shapes.world.sample_batch`). The pipeline is saved with ``save_pretrained``, reloaded, and its
samples (the stock pipeline, :data:`testbed.report.CARD_SAMPLING`, on the held-out captions of
``config/prompt/testbed_test.json``) are scored per family with :mod:`shapes.verify`, and so are the EMA
snapshots taken during training (the accuracy-versus-steps curve); the numbers go to ``out/README.md``.

Usage::

    python scripts/make_testbed_model.py --out assets/testbed-sd --steps 4000 --seed 0
    python scripts/make_testbed_model.py --out assets/testbed-sd --eval_only   # re-run the checks only

Interrupted, the same command resumes from ``--state_dir`` (bit for bit); ``--init DIR`` starts a new schedule
from the weights of another testbed pipeline (to pre-train further).
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
from diffusers import StableDiffusionPipeline, UNet2DConditionModel  # noqa: E402
from transformers import CLIPTextModel  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from shapes.world import sample_batch  # noqa: E402
from testbed.model import build_testbed_parts  # noqa: E402
from testbed.pretrain import PretrainOptions, SnapshotHook, pretrain_denoiser  # noqa: E402
from testbed.report import measure_pipeline, write_model_readme  # noqa: E402

logger = logging.getLogger("make_testbed_model")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="assets/testbed-sd", help="output folder of the pipeline")
    p.add_argument("--steps", type=int, default=4000, help="optimisation steps (the cosine schedule's length)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch_size", type=int, default=64)
    p.add_argument("--lr", type=float, default=1.5e-3)
    p.add_argument("--warmup", type=int, default=50, help="linear learning-rate warm-up steps")
    p.add_argument("--ema_decay", type=float, default=0.995)
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    p.add_argument("--state_dir", default="runs/testbed-pretrain",
                   help="resumable training state and EMA snapshots (a rerun continues from it)")
    p.add_argument("--snapshot_every", type=int, default=1000, help="EMA snapshots for the accuracy curve")
    p.add_argument("--init", default=None, help="start from the UNet and text encoder of this pipeline folder")
    p.add_argument("--per_caption", type=int, default=16, help="card images per held-out caption")
    p.add_argument("--eval_only", action="store_true", help="skip training; check the pipeline in --out")
    return p.parse_args(argv)


def _snapshot_saver(state_dir: Path) -> SnapshotHook:
    """A hook that saves the EMA UNet and text encoder of step N under ``state_dir/snapshots/step-N``."""

    def save(step: int, unet, text_encoder) -> None:
        folder = state_dir / "snapshots" / f"step-{step:06d}"
        unet.save_pretrained(str(folder / "unet"), safe_serialization=True)
        text_encoder.save_pretrained(str(folder / "text_encoder"), safe_serialization=True)

    return save


def train(args: argparse.Namespace, out: Path) -> None:
    """Pre-train (resuming from ``--state_dir``), save the pipeline to ``out`` and its ``training.json``."""
    pipe = build_testbed_parts(out, args.seed)
    if args.init:
        init = StableDiffusionPipeline.from_pretrained(args.init)
        pipe.unet.load_state_dict(init.unet.state_dict())
        pipe.text_encoder.load_state_dict(init.text_encoder.state_dict())
    opts = PretrainOptions(
        steps=args.steps, batch_size=args.batch_size, lr=args.lr, warmup=args.warmup, ema_decay=args.ema_decay,
        seed=args.seed, caption_dropout=0.1, snr_gamma=5.0, snapshot_every=args.snapshot_every,
    )  # fmt: skip
    state_dir = Path(args.state_dir)
    wall, cpu = pretrain_denoiser(
        pipe.unet, pipe.text_encoder, pipe.tokenizer, pipe.scheduler, lambda n, rng: sample_batch(n, rng), opts,
        state_dir=state_dir, on_snapshot=_snapshot_saver(state_dir),
    )  # fmt: skip
    pipe.save_pretrained(str(out), safe_serialization=True)
    state = json.loads((state_dir / "state.json").read_text(encoding="utf-8"))
    training = {"args": vars(args), "wall_s": state["elapsed"], "last_call_wall_s": wall, "last_call_cpu_s": cpu}
    (out / "training.json").write_text(json.dumps(training, indent=1), encoding="utf-8")
    logger.info("saved to %s", out)


def curve(args: argparse.Namespace, out: Path, captions: list[str]) -> list[dict]:
    """The card measurement of every EMA snapshot in ``--state_dir`` (step, per-family summary)."""
    points = []
    for folder in sorted((Path(args.state_dir) / "snapshots").glob("step-*")):
        pipe = StableDiffusionPipeline.from_pretrained(
            str(out), unet=UNet2DConditionModel.from_pretrained(str(folder / "unet")),
            text_encoder=CLIPTextModel.from_pretrained(str(folder / "text_encoder")),
        )  # fmt: skip
        points.append({"step": int(folder.name[5:]), **measure_pipeline(pipe, captions, args.per_caption, args.seed + 1)})
        logger.info("step %d: pooled strict %.3f", points[-1]["step"], points[-1]["all"]["strict"])
    return points


def main(argv: list[str] | None = None) -> None:
    """Entry point."""
    logging.basicConfig(level=logging.INFO, stream=sys.stdout, format="%(asctime)s %(message)s")
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    if not args.eval_only:
        train(args, out)
    captions = json.loads((ROOT / "config" / "prompt" / "testbed_test.json").read_text(encoding="utf-8"))
    pipe = StableDiffusionPipeline.from_pretrained(str(out))
    results = measure_pipeline(pipe, captions, args.per_caption, seed=args.seed + 1, grid=out / "samples.png")
    logger.info("%s", json.dumps(results, indent=1))
    points = curve(args, out, captions)
    write_model_readme(out, json.loads((out / "training.json").read_text(encoding="utf-8")), results, points)


if __name__ == "__main__":
    main()
