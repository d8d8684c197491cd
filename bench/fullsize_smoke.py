"""Full-size architectures through the real ``train.py`` on the CPU: ``python bench/fullsize_smoke.py``.

For SD v1.4, SDXL base and SD3.5 Medium (random weights from ``bench/configs``, built once into the cache: see
``testbed/fullsize.py``; SD3.5 without T5), in float32 and with ``mixed_precision=bf16``: one stage at 64 px (8x8
latents) of one prompt, 4 sampler steps (DDIM, or the flow SDE for SD3.5), one reflection round, a fork into 2
branches 2 steps before the end, one PPO update and a checkpoint; then a stock diffusers pipeline of that
architecture loads the checkpoint's LoRA and denoises one step. Prints one Markdown row per run (wall time, peak RSS of the training process, UNet calls, optimizer steps)
and exits non-zero on the first failure. ``--archs sd14`` runs only SD v1.4 (what the slow test runs).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

logger = logging.getLogger("fullsize_smoke")
PRESET = {"sd14": "sd14", "sdxl": "sdxl", "sd35": "sd35"}
EXTRA = {"sd35": {"pretrained.text_encoder_3": False}}  # the cached SD3.5 has no T5
PRECISIONS = ("no", "bf16")


def train_command(arch: str, precision: str, save_path: Path) -> list[str]:
    """``train.py`` with the architecture's preset shrunk to one short stage."""
    overrides = {
        "pretrained.model": f"fullsize:{arch}", "mixed_precision": precision, "sample.resolution": 64,
        "sample.num_steps": 4, "sample.batch_size": 1, "sample.num_batches_per_epoch": 1, "sample.max_micro_batch": 8,
        "split_time": 2, "split_step": 2, "resample_num": 1, "curriculum.split_left": 2, "curriculum.split_right": 2,
        "curriculum.total_stages": 1, "train.num_epochs": 1, "train.batch_size": 2,
        "train.gradient_accumulation_steps": 1, "eval.every": 0, "reward.fn": "brightness", "prompt": "a red circle",
        "logging.tracker": "none", "logging.log_images": False, "save_path": str(save_path),
        "exp_name": f"{arch}_{precision}", **EXTRA.get(arch, {}),
    }  # fmt: skip
    return [sys.executable, str(ROOT / "train.py"), f"--config={ROOT}/config/stage_process.py:{PRESET[arch]}",
            *(f"--config.{k}={v}" for k, v in overrides.items())]


def run_measured(command: list[str]) -> tuple[int, float, float, str]:
    """Run ``command``; (exit code, wall seconds, peak RSS of the process in GiB, the tail of its output)."""
    start = time.perf_counter()
    with tempfile.TemporaryFile("w+") as out:
        proc = subprocess.Popen(command, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        tail = out.read()[-3000:]
    return proc.returncode, time.perf_counter() - start, usage.ru_maxrss / 2**20, tail


def check_stock_load(arch: str, checkpoint: Path) -> None:
    """A stock pipeline of the architecture loads the checkpoint's LoRA and denoises one step at 64 px."""
    import torch
    from diffusers import StableDiffusion3Pipeline, StableDiffusionPipeline, StableDiffusionXLPipeline

    from testbed.fullsize import resolve_fullsize

    cls = {"sdxl": StableDiffusionXLPipeline, "sd35": StableDiffusion3Pipeline}.get(arch, StableDiffusionPipeline)
    no_t5 = {"text_encoder_3": None, "tokenizer_3": None} if arch == "sd35" else {}
    pipe = cls.from_pretrained(resolve_fullsize(f"fullsize:{arch}"), dtype=torch.bfloat16, **no_t5)
    pipe.load_lora_weights(str(checkpoint))
    pipe.set_progress_bar_config(disable=True)
    latents = pipe("a red circle", height=64, width=64, num_inference_steps=1, output_type="latent").images
    if not bool(torch.isfinite(latents.float()).all()):
        raise RuntimeError(f"{arch}: non-finite output after loading {checkpoint}")


def smoke(arch: str, precision: str, tmp: Path) -> dict:
    """One run: train, read its metrics, load its checkpoint into a stock pipeline."""
    code, wall, rss, tail = run_measured(train_command(arch, precision, tmp))
    if code != 0:
        raise RuntimeError(f"{arch} mixed_precision={precision}: train.py exited {code}:\n{tail}")
    run = tmp / f"{arch}_{precision}"
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    checkpoint = run / "checkpoints" / "stage_000"
    check_stock_load(arch, checkpoint)
    record = metrics[-1]
    return {"arch": arch, "precision": precision, "wall_s": round(wall, 1), "peak_rss_gib": round(rss, 2),
            "unet_calls": record["unet_calls"], "optimizer_steps": record["optimizer_steps"],
            "stage_s": round(record["time_stage_s"], 1)}


def build_cache(arch: str) -> float:
    """Build the cached random-weight pipeline of ``arch`` in its own process (seconds; 0 when cached)."""
    start = time.perf_counter()
    code = subprocess.call([sys.executable, "-c", f"from testbed.fullsize import resolve_fullsize; "
                            f"resolve_fullsize('fullsize:{arch}')"], cwd=ROOT)
    if code != 0:
        raise RuntimeError(f"building fullsize:{arch} failed (exit {code})")
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--archs", default="sd14,sdxl")
    parser.add_argument("--precisions", default=",".join(PRECISIONS))
    parser.add_argument("--json", default="", help="also write the rows to this JSON file")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    rows = []
    print("| architecture | mixed precision | wall s | peak RSS GiB | stage s | UNet calls | optimizer steps |")  # noqa: T201
    print("|---|---|---|---|---|---|---|")  # noqa: T201
    for arch in args.archs.split(","):
        logger.info("fullsize:%s cache ready after %.0f s", arch, build_cache(arch))
        for precision in args.precisions.split(","):
            with tempfile.TemporaryDirectory() as tmp:
                row = smoke(arch, precision, Path(tmp))
            rows.append(row)
            print(f"| {arch} | {precision} | {row['wall_s']} | {row['peak_rss_gib']} | {row['stage_s']} | "  # noqa: T201
                  f"{row['unet_calls']} | {row['optimizer_steps']} |", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1), encoding="utf-8")


if __name__ == "__main__":
    main()
