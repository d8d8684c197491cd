"""Per-phase cost of SRRL stages: ``OMP_NUM_THREADS=1 python bench/stage_bench.py --stages 10``.

Runs ``--stages`` stages of a preset (default ``bench``: the tiny SD v1 pipeline at 64 px, 8 prompt batches,
20 steps, split 9 x 5, 2 epochs, fp32) for each reflection setting and UNet micro-batch, and prints a
Markdown table: median wall and CPU seconds per phase, CPU seconds per stage amortised over all stages,
UNet calls per stage, and the share of stage time inside UNet forward, backward, VAE decode and reward.
``--micro-batch 2`` reproduces the original code's one-branch-at-a-time UNet calls for comparison.
"""

from __future__ import annotations

import argparse
import logging
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from config.stage_process import get_config  # noqa: E402
from srrl import profiling  # noqa: E402
from srrl.runconfig import set_fields  # noqa: E402
from srrl.trainer import SRRLTrainer  # noqa: E402

PHASES = ("sample", "reward", "train", "stage")
BUCKETS = ("unet_forward", "backward", "vae_decode", "reward")


def bench(preset: str, resample_num: int, micro_batch: int, stages: int, overrides: list[str]) -> dict:
    """Run ``stages`` stages and summarise them."""
    config = get_config(preset)
    config.resample_num = resample_num
    config.sample.max_micro_batch = micro_batch
    config.curriculum.total_stages = stages
    set_fields(config, overrides)
    with tempfile.TemporaryDirectory() as tmp:
        config.save_path = tmp
        trainer = SRRLTrainer(config)
        records, shares = [], []
        for stage in range(stages):
            before = profiling.snapshot()
            record = trainer.run_stage(trainer.plan(stage))
            after = profiling.snapshot()
            records.append(record)
            shares.append({b: (after.get(b, 0.0) - before.get(b, 0.0)) / record["time_stage_s"] for b in BUCKETS})
    out = {
        "resample_num": resample_num,
        "micro_batch": micro_batch,
        "unet_calls": statistics.median(r["unet_calls"] for r in records),
        "cpu_per_stage": sum(r["cpu_stage_s"] for r in records) / stages,
    }
    for phase in PHASES:
        out[f"wall_{phase}"] = statistics.median(r[f"time_{phase}_s"] for r in records)
        out[f"cpu_{phase}"] = statistics.median(r[f"cpu_{phase}_s"] for r in records)
    for bucket in BUCKETS:
        out[f"share_{bucket}"] = statistics.median(s[bucket] for s in shares)
    return out


def table(rows: list[dict]) -> str:
    head = ["reflection rounds", "UNet micro-batch", "UNet calls/stage", "CPU s/stage (amortised)"]
    head += [f"{p} wall / CPU s" for p in PHASES] + [f"% in {b}" for b in BUCKETS]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [str(r["resample_num"]), str(r["micro_batch"]), f"{r['unet_calls']:.0f}", f"{r['cpu_per_stage']:.2f}"]
        cells += [f"{r[f'wall_{p}']:.2f} / {r[f'cpu_{p}']:.2f}" for p in PHASES]
        cells += [f"{100 * r[f'share_{b}']:.0f}" for b in BUCKETS]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="bench")
    parser.add_argument("--stages", type=int, default=10)
    parser.add_argument("--reflections", type=int, nargs="+", default=[0, 2])
    parser.add_argument("--micro-batch", type=int, nargs="+", default=[256])
    parser.add_argument("--set", nargs="*", default=[], help="config overrides FIELD=VALUE")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    start = time.time()
    rows = [bench(args.preset, r, m, args.stages, args.set) for r in args.reflections for m in args.micro_batch]
    print(f"preset {args.preset}, {args.stages} stages each; torch {torch.__version__}, "  # noqa: T201
          f"{torch.get_num_threads()} thread(s), {platform.processor() or platform.machine()}; "
          f"total {time.time() - start:.0f} s (medians over stages)\n")
    print(table(rows))  # noqa: T201


if __name__ == "__main__":
    main()
