"""One short SRRL stage on the full-size SD v1.4 architecture with random weights (no download needed).

    python bench/gpu_stage.py                      # GPU: 512 px, fp16, 4 prompt batches x 5 branches, split 9
    python bench/gpu_stage.py --device cpu --resolution 128 --batches 1 --steps 4 --split 2   # smoke test

The UNet, VAE and text encoder are built from the configs in ``bench/configs/sd14`` (the published SD v1.4
shapes), so throughput equals the real model's. Reports images/s, UNet rows/s, achieved UNet TFLOP/s
(FLOPs of one row from ``torch.utils.flop_counter`` times the rows of the branched sampling, over its time) and peak GPU memory.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402
from transformers import CLIPTextConfig, CLIPTextModel  # noqa: E402

from config.stage_process import get_config  # noqa: E402
from srrl import profiling  # noqa: E402
from srrl.models import sd_model_from_pipeline  # noqa: E402
from srrl.tiny_model import build_tokenizer  # noqa: E402
from srrl.trainer import SRRLTrainer  # noqa: E402

CONFIGS = ROOT / "bench" / "configs" / "sd14"


def build_random_sd14(dtype: torch.dtype, tokenizer_dir: Path) -> StableDiffusionPipeline:
    """SD v1.4-shaped pipeline with random weights (a word-level tokenizer padded to 77 tokens)."""
    def cfg(name: str) -> dict:
        return {k: v for k, v in json.loads((CONFIGS / name).read_text()).items() if not k.startswith("_")}

    tokenizer = build_tokenizer(tokenizer_dir)
    tokenizer.model_max_length = 77
    text_cfg = CLIPTextConfig(**{k: v for k, v in cfg("text_encoder.json").items() if k != "architectures"})
    return StableDiffusionPipeline(
        vae=AutoencoderKL(**cfg("vae.json")).to(dtype),
        text_encoder=CLIPTextModel(text_cfg).to(dtype),
        tokenizer=tokenizer,
        unet=UNet2DConditionModel(**cfg("unet.json")).to(dtype),
        scheduler=DDIMScheduler(**cfg("scheduler.json")),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def unet_flops_per_row(unet: torch.nn.Module, latent: tuple[int, int, int], context: torch.Tensor) -> float:
    """Forward FLOPs of one UNet row (counted on a batch of 1)."""
    x = torch.zeros(1, *latent, device=context.device, dtype=context.dtype)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        unet(x, torch.tensor([500], device=context.device), encoder_hidden_states=context[:1])
    return float(counter.get_total_flops())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--precision", default="fp16", choices=["fp16", "bf16", "no"])
    parser.add_argument("--batches", type=int, default=4, help="prompt batches (of 1 prompt) in the stage")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--split", type=int, default=9)
    parser.add_argument("--micro-batch", type=int, default=32)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    device = torch.device(args.device)
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "no": torch.float32}[args.precision]

    config = get_config("sd14")
    config.mixed_precision = args.precision if device.type == "cuda" else "no"
    config.pretrained.model = "random-sd14-architecture"
    config.sample.resolution = args.resolution
    config.sample.num_steps = args.steps
    config.sample.num_batches_per_epoch = args.batches
    config.sample.max_micro_batch = args.micro_batch
    config.split_step, config.resample_num = args.split, 0
    config.curriculum.split_left = config.curriculum.split_right = args.split
    config.curriculum.total_stages = 1
    config.train.num_epochs = 1
    config.train.gradient_accumulation_steps = 1
    config.eval.every = 0
    config.reward.fn = "brightness"
    config.logging.tracker = "none"
    config.logging.log_images = False

    torch.backends.cuda.matmul.allow_tf32 = True
    with tempfile.TemporaryDirectory() as tmp:
        config.save_path = tmp
        pipe = build_random_sd14(dtype if device.type == "cuda" else torch.float32, Path(tmp) / "tok")
        trainer = SRRLTrainer(config, lambda c, d, w: sd_model_from_pipeline(pipe, c, d, w))
        model = trainer.model
        context = model.prompt_encoder.encode(["a"]).encoder_hidden_states
        flops = unet_flops_per_row(model.unet, model.latent_shape, context)
        profiling.enable_cuda_sync(True)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        record = trainer.run_stage(trainer.plan(0))
        wall = time.perf_counter() - start
        buckets = profiling.snapshot()
    images = args.batches * config.split_time
    sample_rows = 2 * (args.batches * (args.steps - args.split) + images * args.split)  # CFG doubles rows
    train_rows = 2 * (record["n_pos"] + record["n_neg"]) * args.split
    report = {
        "resolution": args.resolution, "precision": config.mixed_precision, "images": images,
        "stage_s": round(wall, 2), "sample_s": round(record["time_sample_s"], 2),
        "train_s": round(record["time_train_s"], 2), "images_per_s": round(images / record["time_sample_s"], 3),
        "unet_rows_per_s_sampling": round(sample_rows / record["time_sample_s"], 2),
        "unet_tflops_sampling": round(sample_rows * flops / 1e12 / buckets["sample"], 1),
        "unet_rows_trained": train_rows, "unet_gflops_per_row": round(flops / 1e9, 1),
        "peak_gpu_mem_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if device.type == "cuda" else None,
    }
    print(json.dumps(report, indent=1))  # noqa: T201


if __name__ == "__main__":
    main()
